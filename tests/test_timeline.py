"""The duplex timeline: its measures on constructed calls with known answers, its voice activity on real
synthetic audio (harmonic bursts, espeak-ng speech), its bounds and cost, the record field that carries it,
and a simulated call through the real gateway whose agent echoes the caller a known delay later."""

from __future__ import annotations

import asyncio
import audioop
import json
import shutil
import subprocess
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soxr

from engine.api import FRAME_S, FRAME_SAMPLES, AgentFrame, SessionSpec
from engine.echo import EchoEngine
from gateway.call.events import CallerAudio, CallStarted
from gateway.call.session import CallSession
from gateway.call.timeline import (
    DuplexTimeline,
    VoiceTrack,
    backchannels,
    barge_ins,
    response_turns,
    summarize,
)
from gateway.ops.records import CallRecord, RecordFormatError
from gateway.simulator.call import simulate_call
from gateway.simulator.playout import read_wav_8k

RATE = 24_000
TOLERANCE_S = 2 * FRAME_S  # VAD edges land on the 80 ms grid, give or take a frame


# --- measures on constructed segment lists -----------------------------------------------------------


def test_response_latency_is_caller_end_to_agent_start() -> None:
    out = summarize([(0.0, 2.0)], [(2.4, 4.0)], 5.0)
    assert out["turns"] == [{"caller_end_s": 2.0, "agent_start_s": 2.4, "latency_s": 0.4}]
    assert out["measures"]["response_latency_s"] == {"count": 1, "mean": 0.4, "p50": 0.4, "max": 0.4}


def test_a_caller_who_resumes_first_only_paused() -> None:
    # The pause at 1.0-1.5 s is not a turn end; the turn ends at 2.0 s.
    turns = response_turns([(0.0, 1.0), (1.5, 2.0)], [(2.4, 3.0)])
    assert [(t["caller_end_s"], round(t["latency_s"], 3)) for t in turns] == [(2.0, 0.4)]


def test_an_agent_start_after_the_window_is_no_response() -> None:
    assert response_turns([(0.0, 1.0)], [(7.0, 8.0)]) == []
    assert len(response_turns([(0.0, 1.0)], [(5.9, 8.0)])) == 1  # 4.9 s: slow, but a response


def test_latency_spread_over_several_turns() -> None:
    caller = [(0.0, 1.0), (3.0, 4.0), (6.0, 7.0)]
    agent = [(1.2, 2.5), (4.6, 5.5), (8.0, 9.0)]
    latency = summarize(caller, agent, 10.0)["measures"]["response_latency_s"]
    assert latency == {"count": 3, "mean": 0.6, "p50": 0.6, "max": 1.0}


def test_a_barge_in_the_agent_yields_to() -> None:
    caller = [(0.0, 2.0), (5.0, 6.5)]
    agent = [(2.4, 5.3)]
    out = summarize(caller, agent, 8.0)
    assert out["barge_ins"] == [{"at_s": 5.0, "yield_s": 0.3}]
    m = out["measures"]
    assert (m["barge_ins"], m["yielded"], m["backchannels"]) == (1, 1, 0)
    assert m["yield_latency_s"] == {"count": 1, "mean": 0.3, "p50": 0.3, "max": 0.3}
    assert out["overlaps"] == [[5.0, 5.3]]


def test_a_barge_in_the_agent_talks_over() -> None:
    out = summarize([(4.0, 5.5)], [(2.0, 10.0)], 10.0)
    assert out["barge_ins"] == [{"at_s": 4.0, "yield_s": None}]  # 6 s more: past YIELD_WINDOW_S
    assert (out["measures"]["barge_ins"], out["measures"]["yielded"]) == (1, 0)
    assert out["measures"]["yield_latency_s"]["count"] == 0


def test_a_short_barge_in_the_agent_stops_for_is_not_a_backchannel() -> None:
    # 0.5 s, but the agent stops 0.3 s into it: the caller took the turn.
    assert barge_ins([(4.0, 4.5)], [(2.0, 4.3)]) == [{"at_s": 4.0, "yield_s": pytest.approx(0.3)}]


def test_a_caller_mm_hm_inside_the_agent_speech_is_a_backchannel() -> None:
    caller = [(0.0, 1.5), (4.0, 4.5)]
    agent = [(2.0, 8.0)]
    out = summarize(caller, agent, 10.0)
    m = out["measures"]
    assert (m["backchannels"], m["barge_ins"]) == (1, 0)
    assert m["backchannels_per_min"] == 6.0  # one in 10 s
    assert [t["caller_end_s"] for t in out["turns"]] == [1.5]  # the mm-hm ended no turn


def test_agent_backchannels_count_words_when_known() -> None:
    caller = [(0.0, 5.0)]
    agent = [(2.0, 2.4)]
    assert backchannels(agent, caller) == [(2.0, 2.4)]
    assert backchannels(agent, caller, [1]) == [(2.0, 2.4)]
    assert backchannels(agent, caller, [5]) == []  # five words in 0.4 s: it said something
    assert backchannels([(2.0, 3.2)], caller) == []  # 1.2 s: over the 1 s of a backchannel


def test_agent_words_are_counted_across_text_pieces() -> None:
    timeline = DuplexTimeline()
    timeline.agent = stub_track()
    for i, piece in enumerate([" hel", "lo", " there", "", " how", " are", " you"]):
        mark = 1.0 if i < 3 else 0.0  # "hello there" in one segment, the rest after it
        timeline.agent_frame(i * FRAME_S, np.full(FRAME_SAMPLES, mark, np.float32), piece)
    feed_pattern(timeline.agent, "")
    assert timeline.agent.closed_segments()[1] == [2]


def test_overlap_silence_and_talk_split() -> None:
    m = summarize([(0.0, 2.0)], [(1.0, 4.0)], 5.0)["measures"]
    assert m["overlap_ratio"] == 0.2  # 1.0-2.0 of 5 s
    assert m["silence_ratio"] == 0.2  # 4.0-5.0
    assert (m["caller_talk_s"], m["agent_talk_s"], m["caller_talk_share"]) == (2.0, 3.0, 0.4)
    assert m["duration_s"] == 5.0


def test_a_silent_call_has_empty_measures() -> None:
    out = summarize([], [], 3.0)
    m = out["measures"]
    assert m["response_latency_s"] == {"count": 0, "mean": None, "p50": None, "max": None}
    assert m["caller_talk_share"] is None and m["silence_ratio"] == 1.0 and m["overlap_ratio"] == 0.0
    assert summarize([], [], 0.0)["measures"]["silence_ratio"] == 0.0


def test_the_summary_has_exactly_the_agreed_schema() -> None:
    out = summarize([(0.0, 2.0), (5.0, 6.5)], [(2.4, 5.3)], 8.0)
    assert json.loads(json.dumps(out)) == out
    assert set(out) == {"caller", "agent", "overlaps", "barge_ins", "turns", "measures", "dropped_segments"}
    assert set(out["measures"]) == {
        "response_latency_s",
        "yield_latency_s",
        "barge_ins",
        "yielded",
        "backchannels",
        "backchannels_per_min",
        "overlap_ratio",
        "silence_ratio",
        "caller_talk_s",
        "agent_talk_s",
        "caller_talk_share",
        "duration_s",
    }
    assert set(out["barge_ins"][0]) == {"at_s", "yield_s"}
    assert set(out["turns"][0]) == {"caller_end_s", "agent_start_s", "latency_s"}
    assert out["caller"] == [[0.0, 2.0], [5.0, 6.5]]


# --- smoothing and bounds (voice activity stubbed: a frame is voiced when its first sample is) -----------


def stub_track(max_segments: int = 2000) -> VoiceTrack:
    track = VoiceTrack(3, max_segments)
    track.voiced = lambda pcm: bool(pcm[0])  # type: ignore[method-assign]
    return track


def feed_pattern(track: VoiceTrack, pattern: str) -> None:
    """'#': a voiced frame, '.': a silent one, from call time 0."""
    for i, mark in enumerate(pattern):
        track.feed(i * FRAME_S, np.full(FRAME_SAMPLES, 1.0 if mark == "#" else 0.0, np.float32))


def segments_of(track: VoiceTrack) -> list[tuple[float, float]]:
    return [(round(a, 3), round(b, 3)) for a, b in track.closed_segments()[0]]


def test_up_to_three_silent_frames_do_not_split_a_segment() -> None:
    track = stub_track()
    feed_pattern(track, "..#####.####..###...####....###.....")
    # gaps of 1, 2 and 3 frames are bridged; the gap of 4 splits
    assert segments_of(track) == [(0.16, 1.92), (2.24, 2.48)]


def test_a_lone_voiced_frame_is_a_click() -> None:
    track = stub_track()
    feed_pattern(track, "..#.....##.....#")
    assert segments_of(track) == [(0.64, 0.8)]


def test_segments_are_bounded_and_the_oldest_dropped_are_counted() -> None:
    timeline = DuplexTimeline(max_segments=3)
    timeline.caller = stub_track(3)
    timeline.agent = stub_track(3)
    feed_pattern(timeline.caller, "##....." * 5)
    out = timeline.summary()
    assert out["dropped_segments"] == 2
    assert out["caller"] == [[1.12, 1.28], [1.68, 1.84], [2.24, 2.4]]
    # talk time and ratios cover the part still held (from the end of the last dropped segment)
    assert out["measures"]["caller_talk_s"] == 0.48 and out["measures"]["duration_s"] == 2.8


# --- voice activity on real audio -------------------------------------------------------------------------


def voice(seconds: float, f0: float = 140.0, level: float = 0.2) -> np.ndarray:
    """A speech-like sound at 24 kHz: a glottal-like harmonic series with a wandering pitch, syllable-rate
    amplitude modulation (4 Hz) and 20 ms fades."""
    t = np.arange(int(seconds * RATE)) / RATE
    phase = 2 * np.pi * np.cumsum(f0 * (1 + 0.1 * np.sin(2 * np.pi * 1.5 * t))) / RATE
    tone = sum(np.sin(k * phase) / k for k in range(1, 25))
    envelope = (0.6 + 0.4 * np.sin(2 * np.pi * 4 * t)) * np.minimum(1, np.minimum(t, seconds - t) / 0.02)
    return (level * tone * envelope / np.abs(tone).max()).astype(np.float32)


def silence(seconds: float) -> np.ndarray:
    return np.zeros(int(seconds * RATE), np.float32)


def frames_of(audio: np.ndarray) -> list[np.ndarray]:
    audio = np.concatenate([audio, silence(FRAME_S)])
    return [audio[i : i + FRAME_SAMPLES] for i in range(0, len(audio) - FRAME_SAMPLES + 1, FRAME_SAMPLES)]


def assert_segments_near(found: list[list[float]], expected: list[tuple[float, float]]) -> None:
    assert len(found) == len(expected), found
    for (start, end), (want_start, want_end) in zip(found, expected, strict=True):
        assert abs(start - want_start) <= TOLERANCE_S + 1e-6, (found, expected)
        assert abs(end - want_end) <= TOLERANCE_S + 1e-6, (found, expected)


def test_vad_finds_speech_like_bursts_where_they_are() -> None:
    # caller 1.0-2.5 s; agent answers 2.9-4.7 s; the caller's 0.5 s "mm-hm" at 3.4 s sits inside it
    caller = np.concatenate([silence(1.0), voice(1.5), silence(0.9), voice(0.5, f0=210), silence(1.8)])
    agent = np.concatenate([silence(2.9), voice(1.8, f0=110), silence(1.0)])
    timeline = DuplexTimeline()
    for i, frame in enumerate(frames_of(caller)):
        timeline.caller_frame(i * FRAME_S, frame)
    for i, frame in enumerate(frames_of(agent)):
        timeline.agent_frame(i * FRAME_S, frame, " word" if i % 4 == 0 else "")
    out = timeline.summary()
    assert_segments_near(out["caller"], [(1.0, 2.5), (3.4, 3.9)])
    assert_segments_near(out["agent"], [(2.9, 4.7)])
    (turn,) = out["turns"]
    assert abs(turn["latency_s"] - 0.4) <= TOLERANCE_S + 1e-6
    assert (out["measures"]["backchannels"], out["measures"]["barge_ins"]) == (1, 0)


def test_vad_ignores_a_quiet_line_hiss() -> None:
    rng = np.random.default_rng(7)
    hiss = (0.003 * rng.standard_normal(RATE * 3)).astype(np.float32)  # about -50 dBFS
    hiss[RATE : RATE + len(voice(1.0))] += voice(1.0)
    timeline = DuplexTimeline()
    for i, frame in enumerate(frames_of(hiss)):
        timeline.caller_frame(i * FRAME_S, frame)
    assert_segments_near(timeline.summary()["caller"], [(1.0, 2.0)])


@pytest.fixture(scope="module")
def espeak_wav(tmp_path_factory: pytest.TempPathFactory) -> Path:
    espeak = shutil.which("espeak-ng")
    if espeak is None:
        raise RuntimeError("espeak-ng is not installed: run scripts/test.sh, which installs it")
    path = tmp_path_factory.mktemp("speech") / "hello.wav"
    subprocess.run([espeak, "-w", str(path), "Hello there."], check=True, timeout=30)
    return path


def test_vad_finds_espeak_speech_where_it_is(espeak_wav: Path) -> None:
    speech = soxr.resample(read_wav_8k(espeak_wav).astype(np.float32) / 32768.0, 8000, RATE)
    loud = np.flatnonzero(np.abs(speech) > 0.01)  # where the sound really is
    audio = np.concatenate([silence(1.0), speech.astype(np.float32), silence(1.0)])
    timeline = DuplexTimeline()
    for i, frame in enumerate(frames_of(audio)):
        timeline.caller_frame(i * FRAME_S, frame)
    assert_segments_near(timeline.summary()["caller"], [(1.0 + loud[0] / RATE, 1.0 + loud[-1] / RATE)])


def test_a_frame_costs_well_under_a_millisecond() -> None:
    """Run with -s to see the cost: half the frames speech-like, half silent (under the VAD's level gate)."""
    audio = frames_of(np.concatenate([voice(2.0), silence(2.0)]))
    timeline = DuplexTimeline()
    began = time.perf_counter()
    for _ in range(5):
        for i, frame in enumerate(audio):
            timeline.caller_frame(i * FRAME_S, frame)
            timeline.agent_frame(i * FRAME_S, frame, "")
    per_frame = (time.perf_counter() - began) / (10 * len(audio))
    speech, voiced = frames_of(voice(2.0)), DuplexTimeline()
    began = time.perf_counter()
    for _ in range(5):
        for i, frame in enumerate(speech):
            voiced.caller_frame(i * FRAME_S, frame)
    per_voiced = (time.perf_counter() - began) / (5 * len(speech))
    print(f"\nduplex timeline: {per_frame * 1e6:.1f} us a frame (mixed), {per_voiced * 1e6:.1f} us (voiced)")
    assert per_frame < 1e-3 and per_voiced < 1e-3  # ~40 us a voiced frame measured; a frame is 80 ms


# --- the record ------------------------------------------------------------------------------------------


def test_the_record_carries_the_timeline_through_json() -> None:
    summary = summarize([(0.0, 2.0), (5.0, 6.5)], [(2.4, 5.3)], 8.0)
    record = CallRecord(call_id="CA1", started_at=1.0, timeline=summary)
    assert record.to_dict()["timeline"] == summary
    assert CallRecord.from_json(record.to_json()) == record


def test_records_without_a_timeline_still_read() -> None:
    old = CallRecord(call_id="CA1", started_at=1.0).to_dict()
    del old["timeline"]
    assert CallRecord.from_dict(old).timeline == {}
    assert CallRecord.from_dict(old | {"timeline": None}).timeline == {}
    with pytest.raises(RecordFormatError, match="timeline"):
        CallRecord.from_dict(old | {"timeline": [1, 2]})


# --- a real call ------------------------------------------------------------------------------------------

ECHO_DELAY_FRAMES = 20  # 1.6 s: the echo of a short "Hello there." starts after the caller stopped


class DelayedEchoSession:
    """An echo session whose agent says nothing for ECHO_DELAY_FRAMES, then the caller's frames again."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    async def frames(self) -> AsyncIterator[AgentFrame]:
        held: list[np.ndarray] = [np.zeros(FRAME_SAMPLES, np.float32)] * ECHO_DELAY_FRAMES
        async for frame in self._inner.frames():
            held.append(frame.pcm)
            yield AgentFrame(index=frame.index, pcm=held.pop(0), text=frame.text, token=frame.token)


class DelayedEchoEngine(EchoEngine):
    async def open(self, spec: SessionSpec) -> Any:
        return DelayedEchoSession(await super().open(spec))


async def test_a_real_call_records_its_timeline(start_gateway, espeak_wav: Path) -> None:
    live = start_gateway(DelayedEchoEngine())
    heard: list[CallRecord] = []
    live.app.state.control.recorder.record_hooks.append(heard.append)
    speech = read_wav_8k(espeak_wav)
    onset_s = 0.5 + np.flatnonzero(np.abs(speech) > 300)[0] / 8000  # where the sound really starts
    caller = np.concatenate([np.zeros(4000, np.int16), speech])  # 0.5 s, then speech
    summary = await simulate_call(None, caller, webhook=live.webhook, tail_s=3.0)
    assert summary.violations == []
    assert await live.until(lambda: len(heard) == 1, timeout_s=5.0)

    timeline = heard[0].to_dict()["timeline"]
    assert timeline["caller"] and timeline["agent"], timeline
    (caller_start, caller_end), *_ = timeline["caller"]
    (agent_start, _), *_ = timeline["agent"]
    delay = ECHO_DELAY_FRAMES * FRAME_S
    assert abs(caller_start - onset_s) <= TOLERANCE_S + 1e-6, timeline
    assert abs(agent_start - (caller_start + delay)) <= TOLERANCE_S + 1e-6, timeline  # the echo, 1.6 s on
    latency = timeline["measures"]["response_latency_s"]
    assert latency["count"] >= 1, timeline
    assert abs(timeline["turns"][0]["latency_s"] - (agent_start - caller_end)) < 1e-6
    assert 0 < latency["p50"] < delay
    assert timeline["measures"]["duration_s"] >= 3.0


# --- the call session feeds it ----------------------------------------------------------------------------


def mulaw_speech(seconds: float) -> bytes:
    """`voice` as 8 kHz mu-law, the way a carrier sends it."""
    pcm = soxr.resample(voice(seconds), RATE, 8000)
    return audioop.lin2ulaw((np.clip(pcm, -1, 1) * 32767).astype("<i2").tobytes(), 2)


async def feed_call(call: CallSession, audio: bytes) -> None:
    for k in range(0, len(audio), 160):  # 20 ms carrier messages
        await call.handle(CallerAudio(audio[k : k + 160]))


def echo_call() -> CallSession:
    """A started call on the echo engine whose carrier takes every command."""

    async def carrier(command: Any) -> None:
        pass

    call = CallSession(
        CallStarted("CA-t", "MZ-t"), EchoEngine().open(SessionSpec(voice="v", prompt="p")), carrier
    )
    call.start()
    return call


async def test_the_session_puts_both_sides_on_the_call_clock() -> None:
    call = echo_call()
    silent = bytes([0xFF]) * 8000  # 1 s of mu-law silence
    await feed_call(call, silent + mulaw_speech(1.0) + silent)
    for _ in range(200):
        if call.stats.agent_frames == call.stats.caller_frames - call.stats.caller_frames_dropped:
            break
        await asyncio.sleep(0.01)
    assert call.timeline is not None
    out = call.timeline.summary()
    await call.end("test over")
    # the echo answers each caller frame with itself, on the same call-clock frame
    assert_segments_near(out["caller"], [(1.0, 2.0)])
    assert_segments_near(out["agent"], [(1.0, 2.0)])
    assert out["measures"]["duration_s"] == pytest.approx(3.04, abs=0.1)


async def test_a_failing_timeline_never_breaks_the_call(caplog: pytest.LogCaptureFixture) -> None:
    call = echo_call()
    assert call.timeline is not None

    def broken(*args: Any) -> None:
        raise RuntimeError("vad blew up")

    call.timeline.caller_frame = broken  # type: ignore[method-assign]
    await feed_call(call, bytes([0xFF]) * 1600)
    assert call.timeline is None and call.stats.caller_frames == 2 and not call.ended  # framing went on
    assert "duplex timeline failed" in caplog.text
    await call.end("test over")
