"""The duplex timeline of a call: when the caller spoke, when the agent spoke, and the conversation-quality
measures that follow from the two (response latency, barge-ins and how fast the agent yields, backchannels,
overlap, silence, talk time). Definitions, sources and thresholds: docs/quality.md.

Voice activity, per 80 ms frame and per side: the 24 kHz frame is decimated to 8 kHz (the mean of each 3
samples: cheap on the hot path, and enough for a voice detector) and cut into four 20 ms pieces for
webrtcvad; the frame is voiced when at least half of its pieces are. 8 kHz loses nothing: webrtcvad
downsamples every rate it accepts to 8 kHz before it classifies, and a phone line carries nothing above
4 kHz anyway. Frames quieter than SILENCE_RMS (-60 dBFS) are unvoiced without asking the VAD.

Aggressiveness (webrtcvad 0-3): the caller gets 3, the most eager to call sound "not speech": phone lines
carry hiss, codec noise and background talk, and a noise burst mistaken for speech would count as a false
barge-in (FD-Bench's "noise interrupt rate" error). The agent gets 2: its audio is clean model output, and a
less eager VAD keeps the soft ends of its words, which matter for yield latency.

Smoothing: a segment stays open across up to HANGOVER_S (0.24 s, three unvoiced frames) of silence, so a
stop closure or a word gap (one or two silent 80 ms frames) does not split it; a longer pause closes it at
the end of its last voiced frame (the hangover never lengthens a segment). Voiced stretches shorter than
MIN_SEGMENT_S (0.16 s: one lone frame) are dropped as clicks. Both sides keep at most MAX_SEGMENTS
segments; older ones are dropped and counted, and the measures then cover the part of the call still held.

Times are call-clock seconds: both clocks start at the first caller frame; a frame's time is its start.
"""

from __future__ import annotations

import bisect
import statistics
from collections import deque
from collections.abc import Sequence
from typing import Any

import numpy as np
import webrtcvad

from engine.api import FRAME_S

Segment = tuple[float, float]  # (start_s, end_s), end > start

SAMPLE_RATE = 24_000  # of the frames fed
VAD_RATE = 8_000
VAD_PIECE = VAD_RATE // 50  # 20 ms at 8 kHz
DECIMATE = SAMPLE_RATE // VAD_RATE  # 24 kHz frames -> the VAD's 8 kHz
CALLER_AGGRESSIVENESS = 3
AGENT_AGGRESSIVENESS = 2
SILENCE_RMS = 0.001  # -60 dBFS of full scale: below this a frame is silent without asking the VAD
HANGOVER_S = 3 * FRAME_S  # silence a segment bridges
MIN_SEGMENT_S = 2 * FRAME_S  # shorter voiced stretches are clicks, not speech
MAX_SEGMENTS = 2000  # per side: well over an hour of conversation

# Measure thresholds (docs/quality.md)
RESPONSE_WINDOW_S = 5.0  # an agent start later than this after the caller stops is not a response to it
YIELD_WINDOW_S = 2.0  # an agent still talking this long after a barge-in did not yield to it
BACKCHANNEL_MAX_S = 1.0  # Full-Duplex-Bench: output under 1 s ...
BACKCHANNEL_MAX_WORDS = 3  # ... and of at most 3 words does not take the turn

_EPS = 1e-6  # times are multiples of 80 ms computed in floats


# --- measures: pure functions of the segment lists ------------------------------------------------------


def speaking_at(segments: Sequence[Segment], t: float) -> bool:
    """Whether `t` falls strictly inside one of `segments` (sorted, not overlapping)."""
    i = bisect.bisect_right(segments, (t + _EPS, float("inf"))) - 1
    return i >= 0 and segments[i][0] < t - _EPS and t + _EPS < segments[i][1]


def overlaps(a: Sequence[Segment], b: Sequence[Segment]) -> list[Segment]:
    """The stretches where both sides speak."""
    both: list[Segment] = []
    i = j = 0
    while i < len(a) and j < len(b):
        start, end = max(a[i][0], b[j][0]), min(a[i][1], b[j][1])
        if end > start + _EPS:
            both.append((start, end))
        if a[i][1] < b[j][1]:
            i += 1
        else:
            j += 1
    return both


def talk_s(segments: Sequence[Segment], since: float = 0.0, until: float = float("inf")) -> float:
    """Seconds of speech in `segments` within [since, until]."""
    return sum(max(0.0, min(end, until) - max(start, since)) for start, end in segments)


def is_backchannel(segment: Segment, other: Sequence[Segment], words: int | None = None) -> bool:
    """A short utterance inside the other side's speech that does not take the turn: under
    BACKCHANNEL_MAX_S (and at most BACKCHANNEL_MAX_WORDS words when the words are known), begun while the
    other side speaks, and the other side still speaking when it ends."""
    start, end = segment
    if end - start >= BACKCHANNEL_MAX_S - _EPS:
        return False
    if words is not None and words > BACKCHANNEL_MAX_WORDS:
        return False
    return speaking_at(other, start) and speaking_at(other, end)


def backchannels(
    side: Sequence[Segment], other: Sequence[Segment], words: Sequence[int] | None = None
) -> list[Segment]:
    """The segments of `side` that are backchannels to `other` (`words`: per segment of `side`, if known)."""
    return [
        segment
        for k, segment in enumerate(side)
        if is_backchannel(segment, other, None if words is None else words[k])
    ]


def barge_ins(
    caller: Sequence[Segment], agent: Sequence[Segment], window_s: float = YIELD_WINDOW_S
) -> list[dict[str, Any]]:
    """Caller onsets while the agent speaks that are not backchannels. `yield_s`: from the onset to the end
    of the agent's segment it cut into; None when the agent talked on for longer than `window_s`."""
    found = []
    for segment in caller:
        at = segment[0]
        if not speaking_at(agent, at) or is_backchannel(segment, agent):
            continue
        cut = agent[bisect.bisect_right(agent, (at + _EPS, float("inf"))) - 1]
        yield_s = cut[1] - at
        found.append({"at_s": at, "yield_s": yield_s if yield_s <= window_s + _EPS else None})
    return found


def response_turns(
    caller: Sequence[Segment], agent: Sequence[Segment], window_s: float = RESPONSE_WINDOW_S
) -> list[dict[str, float]]:
    """Agent responses: the caller stops while the agent is silent, and the agent starts speaking within
    `window_s`, before the caller speaks again (a caller who resumes first only paused)."""
    turns = []
    starts = [start for start, _ in agent]
    for k, (_, end) in enumerate(caller):
        if speaking_at(agent, end):
            continue
        i = bisect.bisect_left(starts, end - _EPS)
        if i == len(starts):
            break
        start = starts[i]
        resumed = caller[k + 1][0] if k + 1 < len(caller) else float("inf")
        if start - end <= window_s + _EPS and start <= resumed + _EPS:
            turns.append({"caller_end_s": end, "agent_start_s": start, "latency_s": max(0.0, start - end)})
    return turns


def spread(values: Sequence[float]) -> dict[str, Any]:
    """count, mean, median and max of `values` (None for an empty list), rounded."""
    if not values:
        return {"count": 0, "mean": None, "p50": None, "max": None}
    return {
        "count": len(values),
        "mean": round(statistics.fmean(values), 3),
        "p50": round(statistics.median(values), 3),
        "max": round(max(values), 3),
    }


def summarize(
    caller: Sequence[Segment],
    agent: Sequence[Segment],
    duration_s: float,
    *,
    agent_words: Sequence[int] | None = None,
    since: float = 0.0,
    dropped_segments: int = 0,
) -> dict[str, Any]:
    """The timeline summary (the schema of DuplexTimeline.summary) of a call with these segments.
    `since`: where the segments kept begin (after dropped ones); ratios and talk times cover
    [since, duration_s], `duration_s` stays the whole call."""
    both = overlaps(caller, agent)
    turns = response_turns(caller, agent)
    barges = barge_ins(caller, agent)
    yields = [b["yield_s"] for b in barges if b["yield_s"] is not None]
    bc = len(backchannels(caller, agent)) + len(backchannels(agent, caller, agent_words))
    span = max(0.0, duration_s - since)
    caller_s = talk_s(caller, since, duration_s)
    agent_s = talk_s(agent, since, duration_s)
    both_s = talk_s(both, since, duration_s)
    anyone_s = caller_s + agent_s - both_s
    measures = {
        "response_latency_s": spread([t["latency_s"] for t in turns]),
        "yield_latency_s": spread(yields),
        "barge_ins": len(barges),
        "yielded": len(yields),
        "backchannels": bc,
        "backchannels_per_min": round(bc * 60.0 / span, 3) if span > 0 else 0.0,
        "overlap_ratio": round(both_s / span, 3) if span > 0 else 0.0,
        "silence_ratio": round(max(0.0, span - anyone_s) / span, 3) if span > 0 else 0.0,
        "caller_talk_s": round(caller_s, 3),
        "agent_talk_s": round(agent_s, 3),
        "caller_talk_share": round(caller_s / (caller_s + agent_s), 3) if caller_s + agent_s > 0 else None,
        "duration_s": round(duration_s, 3),
    }
    return {
        "caller": _rounded(caller),
        "agent": _rounded(agent),
        "overlaps": _rounded(both),
        "barge_ins": [
            {"at_s": round(b["at_s"], 3), "yield_s": None if b["yield_s"] is None else round(b["yield_s"], 3)}
            for b in barges
        ],
        "turns": [{key: round(value, 3) for key, value in turn.items()} for turn in turns],
        "measures": measures,
        "dropped_segments": dropped_segments,
    }


def _rounded(segments: Sequence[Segment]) -> list[list[float]]:
    return [[round(start, 3), round(end, 3)] for start, end in segments]


# --- voice activity -------------------------------------------------------------------------------------


class VoiceTrack:
    """One side's voice activity: frames in, smoothed speech segments out."""

    def __init__(self, aggressiveness: int, max_segments: int = MAX_SEGMENTS) -> None:
        self._vad = webrtcvad.Vad(aggressiveness)
        self.segments: deque[Segment] = deque()
        self.words: deque[int] = deque()  # per segment: words of text seen with it (the agent's hint)
        self.max_segments = max_segments
        self.dropped = 0
        self.dropped_until = 0.0  # end of the newest dropped segment
        self.end_s = 0.0  # end of the latest frame fed
        self._start: float | None = None  # of the open segment
        self._last_voiced_end = 0.0
        self._open_words = 0
        self._waiting_words = 0  # text seen with silent frames: it goes with the next voiced frame

    def feed(self, at_s: float, pcm: np.ndarray, words: int = 0) -> bool:
        """One 80 ms frame starting at `at_s`; returns whether it was voiced."""
        voiced = self.voiced(pcm)
        end = at_s + FRAME_S
        self.end_s = max(self.end_s, end)
        if self._start is not None:
            gap = (at_s if voiced else end) - self._last_voiced_end
            if gap > HANGOVER_S + _EPS:
                self._close()
        self._waiting_words += words
        if voiced:
            if self._start is None:
                self._start = at_s
                self._open_words = 0
            self._last_voiced_end = end
            self._open_words += self._waiting_words
            self._waiting_words = 0
        return voiced

    def voiced(self, pcm: np.ndarray) -> bool:
        """Whether at least half of the frame's 20 ms pieces are speech to webrtcvad."""
        pcm = np.asarray(pcm, dtype=np.float32)
        if float(np.dot(pcm, pcm)) < SILENCE_RMS * SILENCE_RMS * pcm.size:
            return False
        # 24 -> 8 kHz by averaging each 3 samples: a boxcar whose first null sits at 8 kHz. Crude as audio,
        # enough for a voice detector, and a fraction of a streaming resampler's cost on the hot path.
        whole = pcm.size - pcm.size % (DECIMATE * VAD_PIECE)
        if whole == 0:
            return False
        low = pcm[0:whole:3] + pcm[1:whole:3]
        low += pcm[2:whole:3]
        low *= 32767.0 / DECIMATE
        np.clip(low, -32768.0, 32767.0, out=low)
        raw = low.astype("<i2").tobytes()
        step = 2 * VAD_PIECE
        votes = sum(self._vad.is_speech(raw[k : k + step], VAD_RATE) for k in range(0, len(raw), step))
        return 2 * votes >= len(raw) // step

    def closed_segments(self) -> tuple[list[Segment], list[int]]:
        """The segments so far, the open one ended at its last voiced frame, with their word counts."""
        segments, words = list(self.segments), list(self.words)
        if self._start is not None and self._last_voiced_end - self._start >= MIN_SEGMENT_S - _EPS:
            segments.append((self._start, self._last_voiced_end))
            words.append(self._open_words)
        return segments, words

    def _close(self) -> None:
        start, self._start = self._start, None
        assert start is not None
        if self._last_voiced_end - start < MIN_SEGMENT_S - _EPS:
            return
        if len(self.segments) == self.max_segments:
            self.dropped_until = self.segments.popleft()[1]
            self.words.popleft()
            self.dropped += 1
        self.segments.append((start, self._last_voiced_end))
        self.words.append(self._open_words)


class DuplexTimeline:
    """Both sides of one call: feed every caller frame and every agent frame, read `summary()` at the end."""

    def __init__(self, max_segments: int = MAX_SEGMENTS) -> None:
        self.caller = VoiceTrack(CALLER_AGGRESSIVENESS, max_segments)
        self.agent = VoiceTrack(AGENT_AGGRESSIVENESS, max_segments)
        self._after_space = True  # the agent's text so far ends between words

    def caller_frame(self, at_s: float, pcm: np.ndarray) -> None:
        self.caller.feed(at_s, pcm)

    def agent_frame(self, at_s: float, pcm: np.ndarray, text: str = "") -> None:
        """`text`: the piece of the agent's text that came with the frame; its words are counted by where
        they start, so a word spread over several pieces (" hel", "lo") counts once."""
        words = 0
        for char in text:
            space = char.isspace()
            words += self._after_space and not space
            self._after_space = space
        self.agent.feed(at_s, pcm, words)

    def summary(self) -> dict[str, Any]:
        """JSON-ready: segments per side, overlaps, barge-ins, turns and the measures (docs/quality.md)."""
        caller, _ = self.caller.closed_segments()
        agent, agent_words = self.agent.closed_segments()
        return summarize(
            caller,
            agent,
            max(self.caller.end_s, self.agent.end_s),
            agent_words=agent_words,
            since=max(self.caller.dropped_until, self.agent.dropped_until),
            dropped_segments=self.caller.dropped + self.agent.dropped,
        )
