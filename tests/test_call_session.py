"""CallSession on the echo engine and the real audio converters: what goes to the carrier and when, mark
accounting, the carrier-buffer bound, transcript clock, and teardown from every side."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest

from engine.api import FRAME_S, SessionSpec
from engine.echo import EchoEngine
from gateway.call import session as session_module
from gateway.call.events import (
    CallerAudio,
    CallStarted,
    CallStopped,
    ClearAudio,
    DtmfPressed,
    EndStream,
    MarkPlayed,
    OutboundCommand,
    PlaceMark,
    PlayAudio,
)
from gateway.call.notices import CallNotice
from gateway.call.session import EARLY_FRAMES_KEPT, CallSession

CHUNK = bytes([0xFF]) * 160  # 20 ms of mu-law silence, as Twilio sends it
FRAME_CHUNKS = 4  # 80 ms model frame = 4 carrier chunks
STARTED = CallStarted(call_id="CA-test", stream_id="MZ-test")


class CarrierRecorder:
    """Stands where the carrier socket would be: records every command the call sends."""

    def __init__(self) -> None:
        self.commands: list[OutboundCommand] = []

    async def __call__(self, command: OutboundCommand) -> None:
        self.commands.append(command)

    def of(self, kind: type) -> list[OutboundCommand]:
        return [c for c in self.commands if isinstance(c, kind)]


async def until(condition: Callable[[], bool], timeout_s: float = 2.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not condition():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.005)


async def open_call(engine: EchoEngine, **kwargs: object) -> tuple[CallSession, CarrierRecorder]:
    carrier = CarrierRecorder()
    call = CallSession(STARTED, engine.open(SessionSpec(voice="v", prompt="p")), carrier, **kwargs)  # type: ignore[arg-type]
    call.start()
    return call, carrier


async def speak(call: CallSession, frames: int) -> None:
    for _ in range(frames * FRAME_CHUNKS):
        await call.handle(CallerAudio(CHUNK))


async def test_each_agent_frame_is_sent_as_media_then_mark() -> None:
    engine = EchoEngine()
    call, carrier = await open_call(engine)
    await until(lambda: engine.opened == 1)
    await speak(call, 2)
    await until(lambda: len(carrier.commands) == 4)
    kinds = [type(c) for c in carrier.commands]
    assert kinds == [PlayAudio, PlaceMark, PlayAudio, PlaceMark]
    assert [len(c.payload) for c in carrier.of(PlayAudio)] == [640, 640]  # 80 ms of 8 kHz mu-law
    assert [c.name for c in carrier.of(PlaceMark)] == ["agent-0", "agent-1"]
    await call.end("test over")


async def test_caller_audio_before_engine_is_ready_reaches_it_once_primed() -> None:
    engine = EchoEngine(open_delay_s=0.2)
    call, carrier = await open_call(engine)
    await speak(call, 2)  # arrives while priming
    assert (call.stats.caller_frames, call.stats.caller_frames_dropped) == (2, 0)
    await until(lambda: engine.opened == 1)
    await asyncio.sleep(0.01)  # let the call pick up the opened session
    await speak(call, 1)
    await until(lambda: call.stats.agent_frames == 3)  # the two early frames were answered too, first
    assert call.stats.caller_frames_dropped == 0
    assert call.agent_clock_s == pytest.approx(3 * FRAME_S)  # agent frame 0 answers caller frame 0
    await call.end("test over")


async def test_only_the_newest_two_seconds_are_kept_while_priming_and_a_call_that_never_opens_drops_them():
    engine = EchoEngine(open_delay_s=0.5)
    call, carrier = await open_call(engine)
    await speak(call, 30)
    assert call.stats.caller_frames_dropped == 30 - EARLY_FRAMES_KEPT
    await until(lambda: call.stats.agent_frames == EARLY_FRAMES_KEPT)
    assert call.agent_clock_s == pytest.approx(30 * FRAME_S)  # the oldest five never reached the engine
    await call.end("test over")
    slow = EchoEngine(open_delay_s=5.0)
    never, _ = await open_call(slow)
    await speak(never, 3)
    await never.end("caller hung up")
    assert never.stats.caller_frames_dropped == 3


async def test_mark_echo_confirms_that_frame_and_all_before_it() -> None:
    engine = EchoEngine()
    call, carrier = await open_call(engine)
    await until(lambda: engine.opened == 1)
    await speak(call, 3)
    await until(lambda: len(carrier.of(PlaceMark)) == 3)
    await call.handle(MarkPlayed("agent-1"))
    assert call.stats.agent_frames_heard == 2
    assert call.heard_s == pytest.approx(2 * FRAME_S)
    assert call.carrier_ahead_s == pytest.approx(FRAME_S)
    await call.end("test over")


async def test_frames_beyond_max_ahead_are_dropped_until_marks_echo() -> None:
    engine = EchoEngine()
    call, carrier = await open_call(engine, max_ahead_s=0.2)
    await until(lambda: engine.opened == 1)
    await speak(call, 5)
    await until(lambda: call.stats.agent_frames == 5)
    # 0, 1, 2 go out (at most 160 ms unconfirmed before each send); 3 and 4 would exceed 200 ms.
    assert [c.name for c in carrier.of(PlaceMark)] == ["agent-0", "agent-1", "agent-2"]
    assert call.stats.agent_frames_dropped == 2
    await call.handle(MarkPlayed("agent-0"))
    await speak(call, 1)
    await until(lambda: call.stats.agent_frames == 6)
    assert carrier.of(PlaceMark)[-1] == PlaceMark("agent-5")
    await call.end("test over")


async def test_clear_drops_carrier_audio_and_later_echoes_count_as_discarded() -> None:
    engine = EchoEngine()
    call, carrier = await open_call(engine)
    await until(lambda: engine.opened == 1)
    await speak(call, 2)
    await until(lambda: len(carrier.of(PlaceMark)) == 2)
    await call.clear_carrier()
    assert carrier.commands[-1] == ClearAudio()
    assert call.carrier_ahead_s == 0.0
    for name in ("agent-0", "agent-1"):  # the carrier echoes every pending mark after a clear
        await call.handle(MarkPlayed(name))
    assert (call.stats.agent_frames_heard, call.stats.agent_frames_discarded) == (0, 2)
    await call.end("test over")


async def test_end_clears_carrier_closes_stream_and_frees_engine_slot() -> None:
    engine = EchoEngine()
    call, carrier = await open_call(engine)
    await until(lambda: engine.opened == 1)
    await speak(call, 1)
    await until(lambda: len(carrier.of(PlaceMark)) == 1)
    await call.end("agent_hung_up")
    assert carrier.commands[-2:] == [ClearAudio(), EndStream("agent_hung_up")]
    assert engine.active == 0
    assert call.ended and call.end_reason == "agent_hung_up"


async def test_carrier_stop_ends_call_without_messages_back() -> None:
    engine = EchoEngine()
    call, carrier = await open_call(engine)
    await until(lambda: engine.opened == 1)
    await speak(call, 1)
    await until(lambda: len(carrier.commands) == 2)
    await call.handle(CallStopped())
    assert call.ended and call.end_reason == "carrier_stop"
    assert len(carrier.commands) == 2  # nothing after the stop
    assert engine.active == 0


async def test_end_while_priming_frees_the_slot() -> None:
    engine = EchoEngine(open_delay_s=0.5)
    call, _ = await open_call(engine)
    await until(lambda: engine.active == 1)
    await call.end("caller_hung_up", notify_carrier=False)
    await until(lambda: engine.active == 0)
    assert engine.opened == 0


async def test_engine_open_failure_closes_the_stream_with_reason() -> None:
    engine = EchoEngine(fail_open="voice 'NATX' not found")
    call, carrier = await open_call(engine)
    await call.wait_ended()
    (end,) = carrier.of(EndStream)
    assert "EngineError" in end.reason and "NATX" in end.reason


async def test_engine_busy_closes_the_stream() -> None:
    engine = EchoEngine(max_sessions=0)
    call, carrier = await open_call(engine)
    await call.wait_ended()
    assert "EngineBusy" in carrier.of(EndStream)[0].reason


async def test_engine_losing_the_session_ends_the_call() -> None:
    engine = EchoEngine(session_frames_limit=2)
    call, carrier = await open_call(engine)
    await until(lambda: engine.opened == 1)
    await speak(call, 3)
    await call.wait_ended()
    assert call.end_reason == "engine_lost"
    assert carrier.commands[-1] == EndStream("engine_lost")
    assert engine.active == 0


async def test_transcript_pieces_carry_the_agent_clock() -> None:
    engine = EchoEngine(text_every=2)
    call, _ = await open_call(engine)
    await until(lambda: engine.opened == 1)
    await speak(call, 5)
    await until(lambda: call.stats.agent_frames == 5)
    assert [(p.at_s, p.text) for p in call.transcript] == [
        (0.0, " echo0"),
        (0.16, " echo2"),
        (0.32, " echo4"),
    ]
    await call.end("test over")


async def test_dtmf_is_recorded_and_reaches_the_notice_hook() -> None:
    notices: list[CallNotice] = []
    engine = EchoEngine()
    call, _ = await open_call(engine, on_notice=notices.append)
    await call.handle(DtmfPressed("5"))
    await call.end("test over")
    assert call.stats.dtmf_presses == 1
    assert [(n.kind, n.detail) for n in notices] == [
        ("started", "stream MZ-test"),
        ("dtmf", "5"),
        ("ended", "test over"),
    ]


async def test_echo_of_unknown_mark_is_ignored() -> None:
    engine = EchoEngine()
    call, carrier = await open_call(engine)
    await until(lambda: engine.opened == 1)
    await speak(call, 1)
    await until(lambda: len(carrier.of(PlaceMark)) == 1)
    await call.handle(MarkPlayed("someone-else"))
    assert call.stats.agent_frames_heard == 0 and call.carrier_ahead_s == pytest.approx(FRAME_S)
    await call.end("test over")


async def test_caller_clock_counts_whole_frames() -> None:
    engine = EchoEngine()
    call, _ = await open_call(engine)
    for _ in range(7):  # 140 ms: one whole frame, three chunks pending
        await call.handle(CallerAudio(CHUNK))
    assert call.caller_clock_s == pytest.approx(FRAME_S)
    await call.end("test over")


async def test_the_transcript_keeps_the_newest_words_within_its_bound(monkeypatch) -> None:
    monkeypatch.setattr(session_module, "MAX_TRANSCRIPT_PIECES", 8)
    engine = EchoEngine(text_every=1)
    call, _ = await open_call(engine)
    await until(lambda: engine.opened == 1)
    await speak(call, 40)
    await until(lambda: call.stats.agent_frames == 40)
    assert 8 <= len(call.transcript) <= 8 + 8 // 8
    assert call.transcript[-1].text == " echo39"  # the newest kept
    assert call.stats.transcript_pieces_dropped == 40 - len(call.transcript)
    await call.end("test over")
