"""A simulated carrier: places one call against a gateway over real HTTP and WebSocket, speaking one
carrier's protocol (its `CarrierPeer`) the way that carrier does, and records what the caller heard.

It can request the voice webhook first (signed when given the carrier's secret), streams caller audio in
the carrier's wire format in real time, plays the gateway's audio on a real-time playout clock,
acknowledges marks when the audio before them has played (at once when nothing is queued), honours
clears, and checks every message the gateway sends against what the carrier accepts. Used by the tests, by
`duplexgate call` and by the load benchmark.

Size: the caller, the receiver with its playout, and the mark acknowledgements are three concurrent parts
of one live call sharing its state (the playout clock, the summary); they stay in one class here.
"""

from __future__ import annotations

import asyncio
import warnings
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import soxr
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from engine.config import FRAME_S
from gateway.carriers import DEFAULT_CARRIER, carrier_class
from gateway.carriers.base import CarrierPeer, StreamTarget, Violation
from gateway.simulator.playout import RATE, Playout, read_wav_8k

with warnings.catch_warnings():  # deprecated since 3.11, still the reference mu-law codec
    warnings.simplefilter("ignore", DeprecationWarning)
    import audioop


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
    chunk_s: float = 0.02  # caller audio per media message, as this carrier sends it
    outbound_log: list[tuple[float, str]] = field(default_factory=list)  # (time, event) in arrival order
    heard: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int16))
    peer: CarrierPeer | None = field(default=None, repr=False)  # the carrier's side of the call

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


async def simulate_call(
    url: str | None,
    audio: str | Path | np.ndarray,
    *,
    carrier: str = DEFAULT_CARRIER,
    webhook: str | None = None,
    caller: str = "+15550001111",
    called: str = "+15550002222",
    auth_token: object = None,
    custom_parameters: Mapping[str, str] | None = None,
    call_sid: str | None = None,
    dtmf: Sequence[tuple[str, float]] = (),
    inject: Sequence[tuple[float, str | bytes]] = (),
    tail_s: float = 0.5,
    settle_s: float = 0.0,
    drop_at_s: float | None = None,
    connect_timeout_s: float = 5.0,
) -> SimCallSummary:
    """Place one simulated call as `carrier` and return what happened.

    `url` is the media-stream WebSocket to connect to; with `webhook`, the carrier's answer is fetched
    first and its stream URL is used when `url` is None (and is what gets signed either way, as carriers
    sign the URL their markup named). `auth_token` is the carrier's secret (signing key, token, key pair).
    `audio` is a wav path or 8 kHz int16 samples; `tail_s` of silence follows it (a listening caller still
    sends audio). With `settle_s`, the caller then stays on the line, sending nothing, until every 80 ms
    frame it sent has been answered or `settle_s` has passed: replies that come late are then told apart
    from replies that never come. `dtmf` = [(digit, at_s)], `inject` = [(at_s, raw message)] for fault
    injection; `call_sid` defaults to a fresh one; `drop_at_s` cuts the connection at that time without a
    `stop`.
    A webhook that answers with no stream (the gateway's overflow, or a 503) raises AnsweredWithoutStream.
    """
    pcm = read_wav_8k(audio) if isinstance(audio, str | Path) else np.asarray(audio, dtype=np.int16)
    peer = carrier_class(carrier).peer(call_sid, caller, called, auth_token)
    summary = SimCallSummary(peer.call_id, peer.stream_id, chunk_s=peer.chunk_s, peer=peer)
    params = dict(custom_parameters or {})
    target = None
    if webhook is not None:
        async with httpx.AsyncClient(timeout=connect_timeout_s) as client:
            target = await peer.answer(client, webhook)
        summary.stream_parameters = dict(target.parameters)
        params = {**params, **target.parameters}
    if url is None and target is None:
        raise ValueError("simulate_call needs a stream url or a webhook that returns one")
    signed = target.url if target is not None else url
    target = peer.target(signed, params)  # type: ignore[arg-type]
    headers = peer.upgrade_headers(target)
    connect_url = url if url is not None else target.url
    if url is not None and target.url != signed:  # the peer put something in the URL (a query string)
        connect_url = url + target.url[len(signed) :]
    try:
        ws = await connect(
            connect_url,
            additional_headers=headers,
            user_agent_header=peer.ws_user_agent,
            compression=None,
            open_timeout=connect_timeout_s,
            max_size=2**20,
        )
    except InvalidStatus as exc:
        summary.handshake_status = exc.response.status_code
        return summary
    summary.handshake_status = 101
    async with ws:
        await _CallRun(ws, peer, target, summary, pcm, dtmf, inject, tail_s, settle_s, drop_at_s).run()
    summary.stream_sid = peer.stream_id
    return summary


class WireAudio:
    """The caller's 8 kHz audio in a carrier's wire format, and the gateway's back to 8 kHz for the ear."""

    def __init__(self, peer: CarrierPeer) -> None:
        self.encoding, self.rate = peer.wire.encoding, peer.wire.sample_rate
        self.chunk_bytes = round(self.rate * peer.chunk_s) * (1 if self.encoding == "mulaw" else 2)
        self._down = soxr.ResampleStream(self.rate, RATE, 1, dtype="float32") if self.rate != RATE else None

    def encode(self, pcm_8k: np.ndarray) -> bytes:
        pcm = pcm_8k
        if self.rate != RATE:
            up = soxr.resample(pcm_8k.astype(np.float32) / 32768.0, RATE, self.rate, quality="HQ")
            pcm = np.clip(np.round(up * 32768.0), -32768, 32767).astype(np.int16)
        per_chunk = self.chunk_bytes // (1 if self.encoding == "mulaw" else 2)
        pcm = np.concatenate([pcm, np.zeros(-len(pcm) % per_chunk, np.int16)])  # whole chunks
        data = pcm.astype("<i2").tobytes()
        return audioop.lin2ulaw(data, 2) if self.encoding == "mulaw" else data

    def seconds(self, payload: bytes) -> float:
        return len(payload) / (self.rate * (1 if self.encoding == "mulaw" else 2))

    def decode(self, payload: bytes) -> np.ndarray:
        if self.encoding == "mulaw":
            data = audioop.ulaw2lin(payload, 2)
        else:
            data = payload[: len(payload) - len(payload) % 2]
        pcm = np.frombuffer(data, dtype="<i2")
        if self._down is None:
            return pcm
        out = self._down.resample_chunk(pcm.astype(np.float32) / 32768.0)
        return np.clip(np.round(out * 32768.0), -32768, 32767).astype(np.int16)


class _CallRun:
    """The three concurrent parts of a live simulated call: caller, playout/receiver, mark echoes."""

    def __init__(
        self,
        ws: ClientConnection,
        peer: CarrierPeer,
        target: StreamTarget,
        summary: SimCallSummary,
        pcm: np.ndarray,
        dtmf: Sequence[tuple[str, float]],
        inject: Sequence[tuple[float, str | bytes]],
        tail_s: float,
        settle_s: float,
        drop_at_s: float | None,
    ) -> None:
        self.ws, self.peer, self.target = ws, peer, target
        self.s = summary
        self.audio = WireAudio(peer)
        silence = np.zeros(int(round(tail_s * RATE)), np.int16)
        self.wire = self.audio.encode(np.concatenate([pcm, silence]))
        summary.input_s = self.audio.seconds(self.wire)
        self.schedule = sorted(
            [(t, "dtmf", d) for d, t in dtmf] + [(t, "inject", m) for t, m in inject], key=lambda x: x[0]
        )
        self.settle_s, self.drop_at_s = settle_s, drop_at_s
        self.lock = asyncio.Lock()
        self.sent_at: list[float] = []  # send time of each caller chunk
        self.first_audio_at: float | None = None
        self.loop = asyncio.get_running_loop()
        self.playout: Playout | None = None
        self.gone = asyncio.Event()
        self.ended_at: float | None = None  # when the call ended for the caller
        self.unpaired_reply: tuple[float, int] | None = None  # (arrival, position) of the last media

    async def send(self, message: str | bytes | None) -> None:
        if message is None:
            return
        async with self.lock:  # sequence numbers must go out in order
            await self.ws.send(message)

    async def run(self) -> None:
        for message in self.peer.opening(self.target):
            await self.send(message)
        origin = self.loop.time()
        self.playout = Playout(origin, self.s.input_s)
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
        """Caller side: a media message per chunk on an absolute schedule, DTMF and injections between."""
        schedule = deque(self.schedule)
        size, chunk_s = self.audio.chunk_bytes, self.peer.chunk_s
        chunks = len(self.wire) // size
        try:
            for n in range(chunks):
                due = origin + (n + 1) * chunk_s  # a chunk goes out once its audio has been captured
                while schedule and schedule[0][0] <= n * chunk_s:
                    await self._scheduled(*schedule.popleft())
                if self.drop_at_s is not None and n * chunk_s >= self.drop_at_s:
                    self.s.closed_by = "carrier"
                    self.ended_at = self.loop.time()
                    self.ws.transport.abort()  # the carrier vanishes: no stop, no close handshake
                    return
                delay = due - self.loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)  # cheaper than a wait_for per chunk under load
                if self.gone.is_set():
                    return
                self.sent_at.append(self.loop.time())
                await self.send(self.peer.media(self.wire[n * size : (n + 1) * size], n))
                self.s.media_sent += 1
            self.ended_at = origin + chunks * chunk_s  # the caller hangs up as its audio ends
            if self.settle_s > 0:
                await self._settle()
                if self.gone.is_set():
                    return
                self.ended_at = self.loop.time()
            self.s.closed_by = "carrier"
            await self.send(self.peer.stop())
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

    async def _settle(self) -> None:
        """Wait, silent, until the agent has answered every whole frame of caller audio sent, or settle_s."""
        frames = int(self.s.media_sent * self.peer.chunk_s / FRAME_S + 1e-6)
        owed_s = frames * FRAME_S - 1e-6
        deadline = self.loop.time() + self.settle_s
        while self.s.audio_received_s < owed_s and not self.gone.is_set() and self.loop.time() < deadline:
            await asyncio.sleep(0.02)

    async def _scheduled(self, _at: float, kind: str, what: str | bytes) -> None:
        if kind == "dtmf":
            await self.send(self.peer.dtmf(str(what)))
            self.s.dtmf_sent += 1
        else:
            await self.send(what)

    async def _receive(self) -> None:
        """Carrier side of the gateway's messages: validate, play, queue marks, clear."""
        assert self.playout is not None
        playout = self.playout
        try:
            async for message in self.ws:
                now = self.loop.time()
                try:
                    out = self.peer.read(message)
                except Violation as exc:
                    self.s.violations.append(str(exc))
                    continue
                if out.kind == "other":
                    continue
                self.s.outbound_log.append((now - playout.origin, out.kind))
                if out.kind == "media":
                    self._on_media(now, out.payload)
                elif out.kind == "mark":
                    self.s.marks_received += 1
                    self._pair_reply(out.name)
                    if playout.end <= now:
                        await self._echo(out.name)
                    else:
                        playout.pending.append((playout.end, out.name))
                        playout.wake.set()
                else:  # clear
                    self.s.clears_received += 1
                    dropped = playout.clear(now)
                    if self.peer.echoes_marks_on_clear:
                        for name in dropped:
                            await self._echo(name)
                    await self.send(self.peer.cleared())
        except ConnectionClosed:
            pass
        if not self.s.closed_by:
            self.s.closed_by = "gateway"
        self.s.close_code, self.s.close_reason = self.ws.close_code, self.ws.close_reason or ""
        if self.ended_at is None:
            self.ended_at = self.loop.time()
        self.gone.set()

    def _on_media(self, now: float, payload: bytes) -> None:
        assert self.playout is not None
        self.playout.play(now, self.audio.decode(payload))
        self.s.audio_received_s += self.audio.seconds(payload)
        self.unpaired_reply = (now, self.s.media_received)
        self.s.media_received += 1
        if self.first_audio_at is None:
            self.first_audio_at = now

    def _pair_reply(self, mark_name: str) -> None:
        """Time the media just before this mark against the caller chunk that completed its frame.

        Frame k ends with caller chunk (k + 1) * 80 ms / chunk - 1. k is the number at the end of the
        mark's name when there is one (duplexgate names marks `agent-<frame>`, so frames the gateway
        dropped do not shift the pairing), else the reply's position in the stream.
        """
        if self.unpaired_reply is None:
            return
        received_at, position = self.unpaired_reply
        self.unpaired_reply = None
        suffix = mark_name.rpartition("-")[2]
        frame = int(suffix) if suffix.isdigit() else position
        per_frame = max(1, round(FRAME_S / self.peer.chunk_s))
        last = per_frame * (frame + 1) - 1
        if last < len(self.sent_at):
            self.s.frame_latencies_ms.append((received_at - self.sent_at[last]) * 1000)

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
            await self.send(self.peer.played(name))
            self.s.marks_echoed += 1
        except ConnectionClosed:
            pass
