"""A simulated Twilio carrier: places one call against a gateway over real HTTP and WebSocket, speaking
Twilio's Media Streams protocol the way Twilio does, and records what the caller would have heard.

It can fetch TwiML from the voice webhook first, signs requests when given an auth token, streams caller
audio as 20 ms mu-law `media` messages in real time, plays the gateway's audio on a real-time playout
clock, echoes marks when the audio before them has played (at once when nothing is queued), honours
`clear`, and checks every message the gateway sends against Twilio's exact outbound shapes. Used by the
tests, by `duplexgate call` and by the load benchmark.

Size: the caller, the receiver with its playout, and the mark echoes are three concurrent parts of one live
call sharing its state (sequence numbers, the playout clock, the summary); they stay in one class here.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import secrets
import warnings
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from xml.etree import ElementTree

import httpx
import numpy as np
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from gateway.edge.transports.twilio import compute_signature
from gateway.simulator.playout import RATE, Playout, read_wav_8k

with warnings.catch_warnings():  # deprecated since 3.11, still the reference mu-law codec
    warnings.simplefilter("ignore", DeprecationWarning)
    import audioop

CHUNK = 160  # 20 ms of 8 kHz mu-law: what Twilio sends per media message
CHUNK_S = CHUNK / RATE
MULAW_SILENCE = 0xFF
USER_AGENT = "Twilio.TmeWs/1.0"
_OUTBOUND_KEYS = {
    "media": {"event", "streamSid", "media"},
    "mark": {"event", "streamSid", "mark"},
    "clear": {"event", "streamSid"},
}


@dataclass
class SimCallSummary:
    """What one simulated call saw. Times are seconds; `heard` is the caller's ear at 8 kHz int16."""

    call_sid: str
    stream_sid: str
    handshake_status: int | None = None  # 101 when the stream was accepted, else the HTTP status
    stream_parameters: dict[str, str] = field(default_factory=dict)  # <Parameter>s from the TwiML
    media_sent: int = 0
    dtmf_sent: int = 0
    media_received: int = 0
    audio_received_s: float = 0.0
    marks_received: int = 0
    marks_echoed: int = 0
    marks_pending: int = 0  # marks still waiting for their audio to play when the call ended
    clears_received: int = 0
    violations: list[str] = field(default_factory=list)
    first_audio_latency_s: float | None = None  # first caller audio sent -> first agent audio received
    # Per reply (a media followed by its mark): sending the caller chunk that completed the frame it
    # answers -> the reply's arrival. Meaningful when agent frame k answers caller frame k, as with the
    # echo engine (load benchmark); see _CallRun._pair_reply.
    frame_latencies_ms: list[float] = field(default_factory=list)
    closed_by: str = ""  # "carrier" (we sent stop / dropped) or "gateway"
    close_code: int | None = None
    close_reason: str = ""  # the reason in the gateway's close frame
    input_s: float = 0.0  # caller audio this call was to send (input plus the silent tail)
    outbound_log: list[tuple[float, str]] = field(default_factory=list)  # (time, event) in arrival order
    heard: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int16))

    @property
    def heard_s(self) -> float:
        return len(self.heard) / RATE

    def brief(self) -> dict[str, Any]:
        """The summary without the recording and logs, for printing."""
        lat = np.asarray(self.frame_latencies_ms)
        gaps = self.agent_gaps_s
        return {
            "call_sid": self.call_sid,
            "handshake_status": self.handshake_status,
            "media_sent": self.media_sent,
            "media_received": self.media_received,
            "audio_received_s": round(self.audio_received_s, 3),
            "marks_received": self.marks_received,
            "marks_echoed": self.marks_echoed,
            "marks_pending": self.marks_pending,
            "clears_received": self.clears_received,
            "violations": len(self.violations),
            "first_audio_latency_ms": None
            if self.first_audio_latency_s is None
            else round(self.first_audio_latency_s * 1000, 1),
            "frame_latency_p50_ms": round(float(np.percentile(lat, 50)), 2) if lat.size else None,
            "frame_latency_p99_ms": round(float(np.percentile(lat, 99)), 2) if lat.size else None,
            "agent_gap_p99_ms": None if gaps.size == 0 else round(float(np.percentile(gaps, 99)) * 1000, 1),
            "agent_gap_max_ms": None if gaps.size == 0 else round(float(gaps.max()) * 1000, 1),
            "closed_by": self.closed_by,
            "close_code": self.close_code,
            "close_reason": self.close_reason,
        }

    @property
    def agent_gaps_s(self) -> np.ndarray:
        """Seconds between consecutive agent audio messages as they arrived: how steady the agent sounds."""
        return np.diff([t for t, event in self.outbound_log if event == "media"])

    @property
    def ended_early(self) -> bool:
        """The gateway ended the call before the caller's audio did."""
        return self.closed_by == "gateway"


async def fetch_twiml(
    webhook: str, form: Mapping[str, str], auth_token: str | None, timeout_s: float = 5.0
) -> tuple[str, dict[str, str]]:
    """POST the voice webhook as Twilio does and return the <Stream> url and its <Parameter>s."""
    headers = {"User-Agent": "TwilioProxy/1.1"}
    if auth_token:
        headers["X-Twilio-Signature"] = compute_signature(auth_token, webhook, form.items())
    async with httpx.AsyncClient(timeout=timeout_s) as client:
        response = await client.post(webhook, data=dict(form), headers=headers)
    if response.status_code != 200:
        raise RuntimeError(f"voice webhook {webhook} answered {response.status_code}: {response.text[:200]}")
    root = ElementTree.fromstring(response.text)
    stream = root.find("./Connect/Stream")
    if stream is None or not stream.get("url"):
        raise RuntimeError(
            f"voice webhook {webhook}: TwiML has no <Connect><Stream url>: {response.text[:300]}"
        )
    params = {p.get("name", ""): p.get("value", "") for p in stream.findall("Parameter")}
    return stream.get("url", ""), params


def check_outbound(message: str | bytes, stream_sid: str) -> tuple[dict[str, Any] | None, str | None]:
    """Validate one gateway -> Twilio message; returns (message, None) or (None, what is wrong)."""
    if not isinstance(message, str):
        return None, "binary frame (Twilio error 31950)"
    try:
        data = json.loads(message)
    except ValueError:
        return None, f"not JSON: {message[:80]!r}"
    if not isinstance(data, dict):
        return None, "JSON is not an object"
    event = data.get("event")
    keys = _OUTBOUND_KEYS.get(event)  # type: ignore[arg-type]
    if keys is None:
        return None, f"unknown event {event!r}"
    if set(data) != keys:
        return None, f"{event}: fields {sorted(data)} != {sorted(keys)}"
    if data["streamSid"] != stream_sid:
        return None, f"{event}: wrong streamSid {data['streamSid']!r}"
    if event == "media":
        media = data["media"]
        if not isinstance(media, dict) or set(media) != {"payload"} or not isinstance(media["payload"], str):
            return None, f"media: 'media' must be exactly {{'payload': str}}, got {media!r:.80}"
        try:
            payload = base64.b64decode(media["payload"], validate=True)
        except binascii.Error:
            return None, "media: payload is not base64"
        if not payload:
            return None, "media: empty payload"
        if payload[:4] in (b"RIFF", b".snd"):
            return None, "media: payload has a file header (it would play as noise)"
    elif event == "mark":
        mark = data["mark"]
        if not isinstance(mark, dict) or set(mark) != {"name"} or not isinstance(mark["name"], str):
            return None, f"mark: 'mark' must be exactly {{'name': str}}, got {mark!r:.80}"
    return data, None


async def simulate_call(
    url: str | None,
    audio: str | Path | np.ndarray,
    *,
    webhook: str | None = None,
    caller: str = "+15550001111",
    called: str = "+15550002222",
    auth_token: str | None = None,
    custom_parameters: Mapping[str, str] | None = None,
    call_sid: str | None = None,
    dtmf: Sequence[tuple[str, float]] = (),
    inject: Sequence[tuple[float, str | bytes]] = (),
    tail_s: float = 0.5,
    drop_at_s: float | None = None,
    connect_timeout_s: float = 5.0,
) -> SimCallSummary:
    """Place one simulated call and return what happened.

    `url` is the media-stream WebSocket to connect to; with `webhook`, the TwiML is fetched first and its
    stream URL is used when `url` is None (and is what gets signed either way, as Twilio signs the URL
    written in the TwiML). `audio` is a wav path or 8 kHz int16 samples; `tail_s` of silence follows it
    (a listening caller still sends audio). `dtmf` = [(digit, at_s)], `inject` = [(at_s, raw message)]
    for fault injection; `call_sid` defaults to a fresh one; `drop_at_s` cuts the connection at that
    time without a `stop`.
    """
    pcm = read_wav_8k(audio) if isinstance(audio, str | Path) else np.asarray(audio, dtype=np.int16)
    call_sid = call_sid or "CA" + secrets.token_hex(16)
    summary = SimCallSummary(call_sid=call_sid, stream_sid="MZ" + secrets.token_hex(16))
    params = dict(custom_parameters or {})
    signed_url = url
    if webhook is not None:
        form = {
            "AccountSid": "AC" + "0" * 32,
            "ApiVersion": "2010-04-01",
            "CallSid": call_sid,
            "CallStatus": "ringing",
            "Called": called,
            "Caller": caller,
            "Direction": "inbound",
            "From": caller,
            "To": called,
        }
        signed_url, twiml_params = await fetch_twiml(webhook, form, auth_token, connect_timeout_s)
        params.update(twiml_params)
        summary.stream_parameters = twiml_params
        url = url or signed_url
    if url is None:
        raise ValueError("simulate_call needs a stream url or a webhook that returns one")
    headers = {"x-twilio-signature": compute_signature(auth_token, signed_url or url)} if auth_token else {}
    try:
        ws = await connect(
            url,
            additional_headers=headers,
            user_agent_header=USER_AGENT,
            compression=None,
            open_timeout=connect_timeout_s,
            max_size=2**20,
        )
    except InvalidStatus as exc:
        summary.handshake_status = exc.response.status_code
        return summary
    summary.handshake_status = 101
    async with ws:
        await _CallRun(ws, summary, pcm, params, dtmf, inject, tail_s, drop_at_s).run()
    return summary


class _CallRun:
    """The three concurrent parts of a live simulated call: caller, playout/receiver, mark echoes."""

    def __init__(
        self,
        ws: ClientConnection,
        summary: SimCallSummary,
        pcm: np.ndarray,
        params: dict[str, str],
        dtmf: Sequence[tuple[str, float]],
        inject: Sequence[tuple[float, str | bytes]],
        tail_s: float,
        drop_at_s: float | None,
    ) -> None:
        self.ws = ws
        self.s = summary
        silence = np.zeros(int(round(tail_s * RATE)), np.int16)
        padded = np.concatenate([pcm, silence])
        padded = np.concatenate([padded, np.zeros(-len(padded) % CHUNK, np.int16)])
        self.ulaw = audioop.lin2ulaw(padded.astype("<i2").tobytes(), 2)
        summary.input_s = len(padded) / RATE
        self.params = params
        self.schedule = sorted(
            [(t, "dtmf", d) for d, t in dtmf] + [(t, "inject", m) for t, m in inject], key=lambda x: x[0]
        )
        self.drop_at_s = drop_at_s
        self.seq = 0
        self.lock = asyncio.Lock()
        self.sent_at: list[float] = []  # send time of each caller chunk
        self.first_audio_at: float | None = None
        self.loop = asyncio.get_running_loop()
        self.playout: Playout | None = None
        self.gone = asyncio.Event()
        self.ended_at: float | None = None  # when the call ended for the caller
        self.unpaired_reply: tuple[float, int] | None = None  # (arrival, position) of the last media

    async def send_event(self, message: dict[str, Any]) -> None:
        async with self.lock:  # sequence numbers must go out in order
            self.seq += 1
            message["sequenceNumber"] = str(self.seq)
            await self.ws.send(json.dumps(message))

    async def run(self) -> None:
        await self.ws.send(json.dumps({"event": "connected", "protocol": "Call", "version": "1.0.0"}))
        await self.send_event(
            {
                "event": "start",
                "start": {
                    "accountSid": "AC" + "0" * 32,
                    "streamSid": self.s.stream_sid,
                    "callSid": self.s.call_sid,
                    "tracks": ["inbound"],
                    "customParameters": self.params,
                    "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": RATE, "channels": 1},
                },
                "streamSid": self.s.stream_sid,
            }
        )
        origin = self.loop.time()
        self.playout = Playout(origin, len(self.ulaw) / RATE)
        receiver = asyncio.create_task(self._receive())
        echoes = asyncio.create_task(self._echo_marks())
        try:
            await self._speak(origin)
        finally:
            echoes.cancel()
            if not receiver.done():
                receiver.cancel()
            await asyncio.gather(receiver, echoes, return_exceptions=True)
        self.s.marks_pending = len(self.playout.pending)
        # The caller hears nothing after the call ended, whichever side ended it.
        ended_at = self.ended_at if self.ended_at is not None else self.loop.time()
        self.s.heard = self.playout.recording(until=ended_at)
        if self.first_audio_at is not None and self.sent_at:
            self.s.first_audio_latency_s = self.first_audio_at - self.sent_at[0]

    async def _speak(self, origin: float) -> None:
        """Caller side: a media message every 20 ms on an absolute schedule, DTMF and injections between."""
        schedule = deque(self.schedule)
        chunks = len(self.ulaw) // CHUNK
        try:
            for n in range(chunks):
                due = origin + (n + 1) * CHUNK_S  # a chunk goes out once its 20 ms have been captured
                while schedule and schedule[0][0] <= n * CHUNK_S:
                    await self._scheduled(*schedule.popleft())
                if self.drop_at_s is not None and n * CHUNK_S >= self.drop_at_s:
                    self.s.closed_by = "carrier"
                    self.ended_at = self.loop.time()
                    self.ws.transport.abort()  # the carrier vanishes: no stop, no close handshake
                    return
                delay = due - self.loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)  # cheaper than a wait_for per chunk under load
                if self.gone.is_set():
                    return
                payload = base64.b64encode(self.ulaw[n * CHUNK : (n + 1) * CHUNK]).decode("ascii")
                media = {
                    "track": "inbound",
                    "chunk": str(n + 1),
                    "timestamp": str(n * 20),
                    "payload": payload,
                }
                self.sent_at.append(self.loop.time())
                await self.send_event({"event": "media", "media": media, "streamSid": self.s.stream_sid})
                self.s.media_sent += 1
            self.s.closed_by = "carrier"
            self.ended_at = origin + chunks * CHUNK_S  # the caller hangs up as its audio ends
            await self.send_event(
                {
                    "event": "stop",
                    "stop": {"accountSid": "AC" + "0" * 32, "callSid": self.s.call_sid},
                    "streamSid": self.s.stream_sid,
                }
            )
            try:
                await asyncio.wait_for(self.ws.close(), 2.0)
            except TimeoutError:
                pass
        except ConnectionClosed:
            # A send found the socket closed under us: the gateway ended the call (the receiver, which
            # would say so too, may not have seen the close yet when it is cancelled).
            if not self.s.closed_by:
                self.s.closed_by = "gateway"
                self.s.close_code, self.s.close_reason = self.ws.close_code, self.ws.close_reason or ""
            return

    async def _scheduled(self, _at: float, kind: str, what: str | bytes) -> None:
        if kind == "dtmf":
            dtmf = {"track": "inbound_track", "digit": what}
            await self.send_event({"event": "dtmf", "streamSid": self.s.stream_sid, "dtmf": dtmf})
            self.s.dtmf_sent += 1
        else:
            await self.ws.send(what)

    async def _receive(self) -> None:
        """Carrier side of the gateway's messages: validate, play, queue marks, clear."""
        assert self.playout is not None
        playout = self.playout
        try:
            async for message in self.ws:
                now = self.loop.time()
                data, problem = check_outbound(message, self.s.stream_sid)
                if problem is not None:
                    self.s.violations.append(problem)
                    continue
                assert data is not None
                event = data["event"]
                self.s.outbound_log.append((now - playout.origin, event))
                if event == "media":
                    self._on_media(now, base64.b64decode(data["media"]["payload"]))
                elif event == "mark":
                    self.s.marks_received += 1
                    self._pair_reply(data["mark"]["name"])
                    if playout.end <= now:
                        await self._echo(data["mark"]["name"])
                    else:
                        playout.pending.append((playout.end, data["mark"]["name"]))
                        playout.wake.set()
                else:  # clear
                    self.s.clears_received += 1
                    for name in playout.clear(now):
                        await self._echo(name)
        except ConnectionClosed:
            pass
        if not self.s.closed_by:
            self.s.closed_by = "gateway"
        self.s.close_code, self.s.close_reason = self.ws.close_code, self.ws.close_reason or ""
        if self.ended_at is None:
            self.ended_at = self.loop.time()
        self.gone.set()

    def _on_media(self, now: float, ulaw: bytes) -> None:
        assert self.playout is not None
        pcm = np.frombuffer(audioop.ulaw2lin(ulaw, 2), dtype="<i2")
        self.playout.play(now, pcm)
        self.s.audio_received_s += len(ulaw) / RATE
        self.unpaired_reply = (now, self.s.media_received)
        self.s.media_received += 1
        if self.first_audio_at is None:
            self.first_audio_at = now

    def _pair_reply(self, mark_name: str) -> None:
        """Time the media just before this mark against the caller chunk that completed its frame.

        Frame k is caller chunks 4k..4k+3. k is the number at the end of the mark's name when there is
        one (duplexgate names marks `agent-<frame>`, so frames the gateway dropped do not shift the
        pairing), else the reply's position in the stream.
        """
        if self.unpaired_reply is None:
            return
        received_at, position = self.unpaired_reply
        self.unpaired_reply = None
        suffix = mark_name.rpartition("-")[2]
        frame = int(suffix) if suffix.isdigit() else position
        fourth = 4 * frame + 3
        if fourth < len(self.sent_at):
            self.s.frame_latencies_ms.append((received_at - self.sent_at[fourth]) * 1000)

    async def _echo_marks(self) -> None:
        assert self.playout is not None
        playout = self.playout
        while True:
            if not playout.pending:
                playout.wake.clear()
                await playout.wake.wait()
                continue
            due, name = playout.pending[0]
            delay = due - self.loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
                continue  # a clear may have emptied the queue meanwhile
            playout.pending.popleft()
            await self._echo(name)

    async def _echo(self, name: str) -> None:
        try:
            await self.send_event({"event": "mark", "streamSid": self.s.stream_sid, "mark": {"name": name}})
            self.s.marks_echoed += 1
        except ConnectionClosed:
            pass
