"""The simulated Twilio carrier against a scripted gateway peer on a loopback socket: what it sends and how
it plays, echoes marks, honours clear and polices the gateway's messages; and `duplexgate call` end to end."""

from __future__ import annotations

import asyncio
import base64
import json
import wave
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import numpy as np
import pytest
from websockets.asyncio.server import ServerConnection, serve

from gateway.carriers.twilio import compute_signature
from gateway.cli import main
from gateway.simulator.call import RATE, simulate_call

Script = Callable[[ServerConnection, "Peer"], Awaitable[None]]


class Peer:
    """A scripted stand-in for a gateway: records what the carrier sends, with arrival times."""

    def __init__(self) -> None:
        self.received: list[tuple[float, dict[str, Any]]] = []
        self.headers: dict[str, str] = {}
        self.started = asyncio.Event()
        self.stream_sid = ""

    def events(self, name: str) -> list[tuple[float, dict[str, Any]]]:
        return [(t, m) for t, m in self.received if m.get("event") == name]

    async def next_event(
        self, name: str, after: int = 0, timeout_s: float = 2.0
    ) -> tuple[float, dict[str, Any]]:
        deadline = asyncio.get_running_loop().time() + timeout_s
        while len(self.events(name)) <= after:
            if asyncio.get_running_loop().time() > deadline:
                raise AssertionError(f"no {name} event in time")
            await asyncio.sleep(0.002)
        return self.events(name)[after]


@asynccontextmanager
async def scripted_peer(script: Script | None = None) -> AsyncIterator[tuple[str, Peer]]:
    peer = Peer()
    loop = asyncio.get_running_loop()

    async def handler(ws: ServerConnection) -> None:
        peer.headers = {k.lower(): v for k, v in ws.request.headers.raw_items()}

        async def read() -> None:
            async for raw in ws:
                message = json.loads(raw)
                peer.received.append((loop.time(), message))
                if message.get("event") == "start":
                    peer.stream_sid = message["streamSid"]
                    peer.started.set()

        reader = asyncio.create_task(read())
        await peer.started.wait()
        if script is not None:
            await script(ws, peer)
        await reader

    async with serve(handler, "127.0.0.1", 0) as server:
        port = server.sockets[0].getsockname()[1]
        yield f"ws://127.0.0.1:{port}/twilio/media", peer


def tone(freq: float, seconds: float, amplitude: float = 0.3) -> np.ndarray:
    t = np.arange(int(seconds * RATE)) / RATE
    return np.round(amplitude * 32767 * np.sin(2 * np.pi * freq * t)).astype(np.int16)


def ulaw_b64(pcm: np.ndarray) -> str:
    import audioop  # deprecated, filtered in pytest settings; the independent reference codec here

    return base64.b64encode(audioop.lin2ulaw(pcm.astype("<i2").tobytes(), 2)).decode()


def media(sid: str, pcm: np.ndarray) -> str:
    return json.dumps({"event": "media", "streamSid": sid, "media": {"payload": ulaw_b64(pcm)}})


def mark(sid: str, name: str) -> str:
    return json.dumps({"event": "mark", "streamSid": sid, "mark": {"name": name}})


async def test_carrier_sends_connected_start_media_stop_in_twilio_shapes() -> None:
    async with scripted_peer() as (url, peer):
        summary = await simulate_call(url, np.zeros(int(0.2 * RATE), np.int16), tail_s=0.0)
    messages = [m for _, m in peer.received]
    connected = {"event": "connected", "protocol": "Call", "version": "1.0.0"}
    assert messages[0] == connected
    assert [m["event"] for m in messages[1:]] == ["start"] + ["media"] * 10 + ["stop"]
    assert [m["sequenceNumber"] for m in messages[1:]] == [str(n) for n in range(1, 13)]
    start = messages[1]["start"]
    assert start["callSid"] == summary.call_sid and start["streamSid"] == messages[1]["streamSid"]
    assert start["mediaFormat"] == {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1}
    first = messages[2]["media"]
    assert (first["track"], first["chunk"], first["timestamp"]) == ("inbound", "1", "0")
    assert len(first["payload"]) == 216 and base64.b64decode(first["payload"]) == b"\xff" * 160
    assert messages[3]["media"]["chunk"] == "2" and messages[3]["media"]["timestamp"] == "20"
    assert messages[-1]["stop"]["callSid"] == summary.call_sid


async def test_media_goes_out_every_20_ms_in_real_time() -> None:
    async with scripted_peer() as (url, peer):
        await simulate_call(url, np.zeros(int(0.5 * RATE), np.int16), tail_s=0.0)
    times = np.array([t for t, _ in peer.events("media")])
    assert len(times) == 25
    assert (times[-1] - times[0]) / 24 == pytest.approx(0.020, abs=0.002)


async def test_mark_is_echoed_at_once_when_nothing_is_buffered() -> None:
    async def script(ws: ServerConnection, peer: Peer) -> None:
        await ws.send(mark(peer.stream_sid, "idle"))
        peer.sent_at = asyncio.get_running_loop().time()  # type: ignore[attr-defined]

    async with scripted_peer(script) as (url, peer):
        await simulate_call(url, np.zeros(int(0.3 * RATE), np.int16), tail_s=0.0)
    echoed_at, echo = peer.events("mark")[0]
    assert echo["mark"] == {"name": "idle"} and echo["streamSid"] == peer.stream_sid
    assert echoed_at - peer.sent_at < 0.05  # type: ignore[attr-defined]


async def test_mark_is_echoed_when_the_audio_before_it_has_played() -> None:
    async def script(ws: ServerConnection, peer: Peer) -> None:
        peer.sent_at = asyncio.get_running_loop().time()  # type: ignore[attr-defined]
        await ws.send(media(peer.stream_sid, tone(440, 0.4)))
        await ws.send(mark(peer.stream_sid, "after-400ms"))

    async with scripted_peer(script) as (url, peer):
        summary = await simulate_call(url, np.zeros(int(0.8 * RATE), np.int16), tail_s=0.0)
    echoed_at, echo = peer.events("mark")[0]
    assert echo["mark"]["name"] == "after-400ms"
    assert 0.39 <= echoed_at - peer.sent_at < 0.5  # type: ignore[attr-defined]
    assert summary.marks_echoed == 1 and summary.marks_pending == 0


async def test_clear_drops_buffered_audio_and_echoes_pending_marks_at_once() -> None:
    async def script(ws: ServerConnection, peer: Peer) -> None:
        await ws.send(media(peer.stream_sid, tone(440, 1.0)))
        await ws.send(mark(peer.stream_sid, "end-of-tone"))
        await asyncio.sleep(0.2)
        peer.cleared_at = asyncio.get_running_loop().time()  # type: ignore[attr-defined]
        await ws.send(json.dumps({"event": "clear", "streamSid": peer.stream_sid}))

    async with scripted_peer(script) as (url, peer):
        summary = await simulate_call(url, np.zeros(int(0.8 * RATE), np.int16), tail_s=0.0)
    echoed_at, echo = peer.events("mark")[0]
    assert echo["mark"]["name"] == "end-of-tone"
    assert echoed_at - peer.cleared_at < 0.05  # type: ignore[attr-defined]
    heard = summary.heard.astype(np.float64)
    assert np.sqrt(np.mean(heard[int(0.05 * RATE) : int(0.15 * RATE)] ** 2)) > 5000  # the tone played...
    assert not heard[int(0.35 * RATE) :].any()  # ...and nothing after the clear
    assert summary.clears_received == 1


async def test_gateway_messages_with_wrong_shapes_are_counted_and_not_played() -> None:
    async def script(ws: ServerConnection, peer: Peer) -> None:
        sid = peer.stream_sid
        payload = ulaw_b64(tone(440, 0.08))
        bad = [
            json.dumps(
                {"event": "media", "streamSid": sid, "media": {"payload": payload, "track": "outbound"}}
            ),
            json.dumps({"event": "media", "streamSid": sid, "media": {"payload": payload}, "chunk": "1"}),
            mark("MZ-someone-else", "x"),
            json.dumps({"event": "play", "streamSid": sid}),
            json.dumps({"event": "clear", "streamSid": sid, "reason": "barge-in"}),
        ]
        for message in bad:
            await ws.send(message)
        await ws.send(b"\x00binary")

    async with scripted_peer(script) as (url, peer):
        summary = await simulate_call(url, np.zeros(int(0.3 * RATE), np.int16), tail_s=0.0)
    assert len(summary.violations) == 6
    assert summary.media_received == 0 and summary.marks_received == 0 and summary.clears_received == 0
    assert not summary.heard.any()


async def test_recording_has_silence_where_nothing_played() -> None:
    async def script(ws: ServerConnection, peer: Peer) -> None:
        await asyncio.sleep(0.3)
        await ws.send(media(peer.stream_sid, tone(440, 0.1)))

    async with scripted_peer(script) as (url, peer):
        summary = await simulate_call(url, np.zeros(int(0.6 * RATE), np.int16), tail_s=0.0)
    heard = summary.heard
    assert len(heard) == int(0.6 * RATE)
    assert not heard[: int(0.25 * RATE)].any() and not heard[int(0.45 * RATE) :].any()
    assert np.abs(heard[int(0.32 * RATE) : int(0.38 * RATE)]).max() > 5000


async def test_dtmf_is_sent_in_twilio_shape_at_its_time() -> None:
    async with scripted_peer() as (url, peer):
        await simulate_call(url, np.zeros(int(0.4 * RATE), np.int16), dtmf=[("5", 0.2)], tail_s=0.0)
    ((_, dtmf),) = peer.events("dtmf")
    assert dtmf["dtmf"] == {"track": "inbound_track", "digit": "5"} and dtmf["streamSid"] == peer.stream_sid
    order = [m["event"] for _, m in peer.received]
    assert order.index("dtmf") == 2 + 10  # after connected, start and the chunks of the first 200 ms


async def test_upgrade_is_signed_over_the_stream_url() -> None:
    async with scripted_peer() as (url, peer):
        await simulate_call(url, np.zeros(int(0.1 * RATE), np.int16), auth_token="secret", tail_s=0.0)
    assert peer.headers["x-twilio-signature"] == compute_signature("secret", url)
    assert peer.headers["user-agent"] == "Twilio.TmeWs/1.0"


def test_cli_call_writes_what_the_caller_heard(echo_gateway, tone_wav, tmp_path, capsys) -> None:
    out = tmp_path / "heard.wav"
    rc = main(
        [
            "call",
            "--url",
            echo_gateway.ws_url,
            "--input",
            str(tone_wav(440, 0.5)),
            "--output",
            str(out),
            "--tail",
            "0.34",  # 0.84 s: 10 whole frames and two spare chunks, so the last reply beats the stop
        ]
    )
    assert rc == 0
    report = json.loads(capsys.readouterr().out)
    # At most one reply per whole 80 ms frame sent (10); frames that arrive while the session is still
    # priming (the example agent's CRM lookup included) are dropped by design, so a loaded machine may
    # answer fewer. Each reply is one whole frame of audio.
    assert report["violations"] == 0 and 1 <= report["media_received"] <= 10
    assert report["audio_received_s"] == pytest.approx(0.08 * report["media_received"])
    with wave.open(str(out), "rb") as wav:
        assert (wav.getframerate(), wav.getnchannels(), wav.getsampwidth()) == (24000, 1, 2)
        assert wav.getnframes() == pytest.approx(0.84 * 24000, abs=48)


def test_cli_call_rejects_a_malformed_dtmf_spec(tone_wav, tmp_path, capsys) -> None:
    rc = main(
        [
            "call",
            "--url",
            "ws://127.0.0.1:9/x",
            "--input",
            str(tone_wav(440, 0.1)),
            "--output",
            str(tmp_path / "o.wav"),
            "--dtmf",
            "12",
        ]
    )
    assert rc == 2 and "DIGIT@SECONDS" in capsys.readouterr().err


async def test_reply_latency_is_timed_from_the_chunk_that_completed_its_frame() -> None:
    async def script(ws: ServerConnection, peer: Peer) -> None:
        await peer.next_event("media", after=7)  # chunk 8: caller frame 1 (chunks 4..7) is complete
        await ws.send(media(peer.stream_sid, tone(440, 0.08)))
        await ws.send(mark(peer.stream_sid, "agent-1"))

    async with scripted_peer(script) as (url, peer):
        summary = await simulate_call(url, np.zeros(int(0.4 * RATE), np.int16), tail_s=0.0)
    (latency,) = summary.frame_latencies_ms
    assert 0.0 <= latency < 15.0  # paired with chunk 8, not with chunk 4 (80 ms earlier)
