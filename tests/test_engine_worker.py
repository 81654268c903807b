"""The engine worker serving sessions over asyncio: admission, batching of concurrent sessions, teardown,
and a failing step isolated to the sessions in it."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest
from tinymodel import FIXTURE, reference_prompt, tiny_models

from engine.api import MAX_QUEUED_FRAMES, EngineBusy, EngineError, Sampling, SessionClosed, SessionSpec
from engine.loading import load_text_tokenizer
from engine.runner import BatchRunner
from engine.worker import EngineWorker

SPEC = SessionSpec(voice="voice_tiny", prompt=reference_prompt(), sampling=Sampling(greedy=True))


def tiny_worker(capacity: int, **options) -> EngineWorker:
    lm, mimi, _ = tiny_models()
    tokenizer = load_text_tokenizer(FIXTURE / "tokenizer_tiny.model")
    return EngineWorker(BatchRunner(lm, mimi, capacity), tokenizer, FIXTURE / "voices", **options)


@pytest.fixture
async def worker():
    # Admission is tested on its own below; a loaded CI machine must not refuse these calls.
    engine = tiny_worker(2, admit_fraction=float("inf"))
    yield engine
    await engine.aclose()


@pytest.fixture
async def worker_of_four():
    engine = tiny_worker(4, admit_fraction=float("inf"))
    yield engine
    await engine.aclose()


def caller_frames(count: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [(rng.standard_normal(1920) * 0.1).astype(np.float32) for _ in range(count)]


async def talk(session, frames) -> list:
    received, stream = [], session.frames().__aiter__()
    for frame in frames:
        session.push(frame)
        received.append(await asyncio.wait_for(stream.__anext__(), 10))
    return received


async def test_each_pushed_frame_yields_one_agent_frame_in_order(worker):
    session = await worker.open(SPEC)
    frames = await talk(session, caller_frames(6))
    assert [f.index for f in frames] == list(range(6))
    assert all(f.pcm.shape == (1920,) and f.pcm.dtype == np.float32 for f in frames)
    assert session.prompt_positions == 147
    assert worker.stats.steps == 6 and 0 < worker.stats.recent_step_s < 5


async def test_concurrent_sessions_get_the_same_frames_as_alone(worker):
    alone = await worker.open(SPEC)
    solo = await talk(alone, caller_frames(8, seed=1))
    await alone.close()
    first, second = await worker.open(SPEC), await worker.open(SPEC)
    both = await asyncio.gather(talk(first, caller_frames(8, seed=1)), talk(second, caller_frames(8, seed=2)))
    assert [f.token for f in both[0]] == [f.token for f in solo]
    assert all(np.array_equal(a.pcm, b.pcm) for a, b in zip(both[0], solo, strict=True))
    assert worker.stats.steps < 8 + 8 + 8  # the two concurrent calls shared steps


async def test_open_is_refused_when_every_slot_is_taken_and_close_frees_one(worker):
    sessions = [await worker.open(SPEC), await worker.open(SPEC)]
    with pytest.raises(EngineBusy):
        await worker.open(SPEC)
    await sessions[0].close()
    again = await worker.open(SPEC)
    assert again.slot == sessions[0].slot
    with pytest.raises(SessionClosed):
        sessions[0].push(caller_frames(1)[0])


async def test_a_new_session_takes_the_lowest_free_slot_so_steps_stay_small(worker):
    first, second = await worker.open(SPEC), await worker.open(SPEC)
    assert (first.slot, second.slot) == (0, 1)
    await first.close()
    await second.close()
    again = await worker.open(SPEC)  # slot 1 was freed last, but slot 0 keeps steps at size 1
    assert again.slot == 0


async def test_unknown_voice_is_an_error_naming_the_voices(worker):
    with pytest.raises(EngineError, match="voice_tiny"):
        await worker.open(SessionSpec(voice="NOPE", prompt="hi"))
    assert worker.active == 0 and len(worker._free) == 2


async def test_prompt_longer_than_the_context_is_refused(worker):
    long_prompt = "the repair visit costs eighty nine dollars " * 200
    with pytest.raises(EngineError, match="shorten the role prompt"):
        await worker.open(SessionSpec(voice="voice_tiny", prompt=long_prompt))


async def test_a_failing_step_ends_only_the_sessions_in_it(worker, monkeypatch):
    victim, bystander = await worker.open(SPEC), await worker.open(SPEC)
    real_step, faults = worker.runner.step, [RuntimeError("simulated device fault")]

    def failing_step(pcm, active):
        if faults:  # the first step, which only the victim is in, fails
            assert bool(active[victim.slot]) and not bool(active[bystander.slot])
            raise faults.pop()
        return real_step(pcm, active)

    monkeypatch.setattr(worker.runner, "step", failing_step)
    victim.push(caller_frames(1)[0])
    with pytest.raises(SessionClosed, match="lost"):
        async for _ in victim.frames():
            pass
    assert victim.close_reason == "engine_lost"
    frames = await talk(bystander, caller_frames(2))
    assert len(frames) == 2


async def test_sampled_sessions_report_their_seed_and_replay(worker):
    spec = SessionSpec(voice="voice_tiny", prompt="hello", seed=None, sampling=Sampling())
    first = await worker.open(spec)
    tokens = [f.token for f in await talk(first, caller_frames(6))]
    await first.close()
    replay = await worker.open(SessionSpec(voice="voice_tiny", prompt="hello", seed=first.seed))
    assert [f.token for f in await talk(replay, caller_frames(6))] == tokens


async def test_calls_are_refused_while_measured_steps_break_the_real_time_budget(worker, monkeypatch):
    worker.admit_fraction = 0.8
    session = await worker.open(SPEC)
    real_run = worker.runner._run

    def slow_run(rows):  # every step, live or measuring, as on a machine too loaded to keep up
        time.sleep(0.07)  # 70 ms of an 80 ms frame: over the 80% admission threshold
        return real_run(rows)

    monkeypatch.setattr(worker.runner, "_run", slow_run)
    await talk(session, caller_frames(3))
    with pytest.raises(EngineBusy, match="real-time budget"):
        await worker.open(SPEC)
    assert worker.stats.recent_step_s >= 0.07


async def test_cancelling_open_while_priming_frees_the_slot(worker):
    opening = asyncio.ensure_future(worker.open(SPEC))
    await asyncio.sleep(0)  # priming has started on the model thread
    opening.cancel()
    with pytest.raises(asyncio.CancelledError):
        await opening
    sessions = [await worker.open(SPEC), await worker.open(SPEC)]  # both slots are free again
    assert {s.slot for s in sessions} == {0, 1}


async def test_say_forces_the_announcement_into_the_text_stream(worker):
    session = await worker.open(SPEC)
    await talk(session, caller_frames(2))
    expected = worker.announcement_tokens("let me transfer you")
    steps = session.say("let me transfer you")
    assert steps == len(expected) and steps >= 4 * 5  # four words at the speaking pace
    frames = await talk(session, caller_frames(steps + 1, seed=3))
    # A token forced at a step is emitted with the next frame.
    assert [f.token for f in frames[1:]] == expected
    assert "".join(f.text for f in frames[1:]).split() == ["let", "me", "transfer", "you"]


async def test_position_and_prompt_horizon_follow_the_call(worker):
    session = await worker.open(SPEC)
    assert session.position == session.prompt_positions == 147
    first_horizon = session.prompt_horizon_steps
    assert first_horizon == session.text_start + worker.context - 2 - 147
    await talk(session, caller_frames(4))
    assert session.position == 151 and session.prompt_horizon_steps == first_horizon - 4


async def test_reprime_re_anchors_a_call_like_a_fresh_session_with_that_prompt(worker):
    new_prompt = "You work for SwiftPlex Appliances. The caller asked about a leaking dishwasher."
    later_audio = caller_frames(6, seed=9)
    session = await worker.open(SPEC)
    await talk(session, caller_frames(5))
    await session.reprime(new_prompt)
    after = await talk(session, later_audio)
    assert [f.index for f in after] == list(range(5, 11))  # numbering continues
    fresh = await worker.open(
        SessionSpec(voice="voice_tiny", prompt=new_prompt, sampling=Sampling(greedy=True))
    )
    expected = await talk(fresh, later_audio)
    assert [f.token for f in after] == [f.token for f in expected]
    assert all(np.array_equal(a.pcm, b.pcm) for a, b in zip(after, expected, strict=True))
    assert session.position == fresh.position


async def test_admission_judges_the_step_size_the_new_call_would_need(monkeypatch):
    # As profiled at start-up: steps of one or two slots fit the budget, steps of four do not.
    engine = tiny_worker(4, step_profile={1: 0.010, 2: 0.020, 4: 0.075})
    try:
        first, second = await engine.open(SPEC), await engine.open(SPEC)  # slots 0 and 1: size 2
        await talk(first, caller_frames(2))
        with pytest.raises(EngineBusy, match="steps of size 4 take 75 ms"):
            await engine.open(SPEC)  # slot 2 would make every step a size-4 step
        assert engine.active == 2 and sorted(engine._free) == [2, 3]
        await second.close()
        third = await engine.open(SPEC)  # slot 1 again: steps stay at size 2
        assert third.slot == 1
    finally:
        await engine.aclose()


async def test_a_call_left_in_a_high_slot_moves_down_and_goes_on_exactly(worker_of_four):
    spec = SessionSpec(voice="voice_tiny", prompt=reference_prompt(), seed=77, sampling=Sampling())
    frames = caller_frames(10, seed=3)
    alone = await worker_of_four.open(spec)
    reference = await talk(alone, frames)
    await alone.close()

    first, second = await worker_of_four.open(SPEC), await worker_of_four.open(SPEC)
    moved = await worker_of_four.open(spec)
    assert (first.slot, second.slot, moved.slot) == (0, 1, 2)
    stream = moved.frames().__aiter__()
    heard = []
    for frame in frames[:4]:
        moved.push(frame)
        heard.append(await asyncio.wait_for(stream.__anext__(), 10))
    await first.close()  # slot 0 frees: the call in slot 2 can step at size 2 instead of 4
    for frame in frames[4:]:
        moved.push(frame)
        heard.append(await asyncio.wait_for(stream.__anext__(), 10))
    assert moved.slot == 0 and second.slot == 1
    assert sorted(worker_of_four._free) == [2, 3]
    assert [f.token for f in heard] == [f.token for f in reference]
    assert all(np.array_equal(a.pcm, b.pcm) for a, b in zip(heard, reference, strict=True))


async def test_a_slow_start_up_profile_refuses_calls_only_until_it_is_re_measured():
    # A cold start-up timed every step at 500 ms; the engine is really far faster than that.
    engine = tiny_worker(2, step_profile={1: 0.5, 2: 0.5}, probe_interval_s=0.3)
    try:
        before = await engine.admission()
        assert not before.ready and "take 500 ms (measured 0.0 s ago)" in before.reason
        with pytest.raises(EngineBusy, match="size 1 take 500 ms"):
            await engine.open(SPEC)  # a figure fresher than the probe interval stands
        await asyncio.sleep(0.35)
        session = await engine.open(SPEC)  # the old figure is re-measured first, and the call admitted
        step_s, age_s = engine.stats.expected_step_s(1)
        assert step_s < 0.8 * 0.080 and age_s < 0.3
        assert len(await talk(session, caller_frames(2))) == 2
    finally:
        await engine.aclose()


async def test_a_call_is_refused_only_on_a_fresh_measurement_that_names_the_figure():
    engine = tiny_worker(2, admit_fraction=1e-4, probe_interval_s=0.0)  # a budget no step can meet
    timed = []
    real_time_steps = engine.runner.time_steps

    def time_steps(size, repeats):
        timed.append(size)
        return real_time_steps(size, repeats)

    engine.runner.time_steps = time_steps
    try:
        with pytest.raises(EngineBusy, match=r"steps of size 1 take \d+ ms \(measured 0\.\d s ago\)"):
            await engine.open(SPEC)
        assert timed == [1]  # nothing was known of size 1: it was measured before refusing
        admission = await engine.admission()
        assert not admission.ready and admission.size == 1 and admission.step_s is not None
        assert engine.active == 0 and sorted(engine._free) == [0, 1]
    finally:
        await engine.aclose()


async def test_refused_callers_cannot_make_the_engine_measure_more_often_than_the_probe_interval():
    engine = tiny_worker(2, step_profile={1: 0.5}, admit_fraction=1e-4, probe_interval_s=60.0)
    engine.stats.remeasured(1, [0.5], at=time.monotonic() - 61)  # an old figure: re-measured once
    timed = []
    real_time_steps = engine.runner.time_steps
    engine.runner.time_steps = lambda size, repeats: timed.append(size) or real_time_steps(size, repeats)
    try:
        for _ in range(20):
            with pytest.raises(EngineBusy):
                await engine.open(SPEC)
        assert timed == [1]
    finally:
        await engine.aclose()


async def test_admission_says_why_not_when_every_slot_is_taken(worker):
    sessions = [await worker.open(SPEC), await worker.open(SPEC)]
    admission = await worker.admission()
    assert not admission.ready and admission.reason == "all 2 engine slots are in use"
    await sessions[1].close()
    assert (await worker.admission()).ready


async def test_every_live_session_is_told_engine_lost_when_the_step_loop_dies(worker):
    sessions = [await worker.open(SPEC), await worker.open(SPEC)]
    for session in sessions:
        await talk(session, caller_frames(1))
    streams = [session.frames().__aiter__() for session in sessions]
    killed_at = time.monotonic()
    worker._loop_task.cancel()  # the loop dies, as a bug in it would end it
    for stream in streams:
        with pytest.raises(SessionClosed, match="engine lost"):
            await asyncio.wait_for(stream.__anext__(), 1.0)
    assert time.monotonic() - killed_at < 1.0
    assert [s.close_reason for s in sessions] == ["engine_lost", "engine_lost"] and worker.active == 0
    replacement = await worker.open(SPEC)  # a new call gets a new loop
    assert len(await talk(replacement, caller_frames(2))) == 2


async def test_agent_frames_nobody_reads_are_bounded_and_the_newest_kept(worker):
    session = await worker.open(SPEC)
    for batch in range(1, 4):  # 60 frames, pushed 20 at a time (the caller side holds at most 25)
        for frame in caller_frames(20):
            session.push(frame)
        deadline = time.monotonic() + 10
        while worker.stats.steps < 20 * batch and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
    assert session._outbox.waiting() == MAX_QUEUED_FRAMES
    assert worker.stats.dropped_frames == 60 - MAX_QUEUED_FRAMES
    first = await asyncio.wait_for(session.frames().__anext__(), 1)
    assert first.index == 60 - MAX_QUEUED_FRAMES


# --- chunked priming ---------------------------------------------------------------------------------

LONG_PROMPT = " ".join(["You help callers of SwiftPlex Appliances book repairs and answer questions."] * 12)


async def keep_talking(session, stop: asyncio.Event) -> int:
    """Push a caller frame whenever the last one has been answered, until `stop`; returns the count."""
    stream, count = session.frames().__aiter__(), 0
    while not stop.is_set():
        session.push(caller_frames(1, seed=count)[0])
        await asyncio.wait_for(stream.__anext__(), 10)
        count += 1
    return count


async def test_a_long_prime_runs_in_chunks_between_a_live_calls_steps_and_primes_exactly(worker):
    spec = SessionSpec(voice="voice_tiny", prompt=LONG_PROMPT, sampling=Sampling(greedy=True))
    live = await worker.open(SPEC)
    stop = asyncio.Event()
    talking = asyncio.create_task(keep_talking(live, stop))
    await asyncio.sleep(0.2)
    worker.ticks.clear()
    primed = await worker.open(spec)
    stop.set()
    assert await talking > 0
    chunks = [t for t in worker.ticks if t.prime is not None]
    assert len(chunks) >= 3  # not one piece
    assert primed.prompt_positions > 3 * max(t.chunk for t in chunks[1:])
    stepped_beside = [t for t in chunks if live.slot in t.step]
    assert len(stepped_beside) >= len(chunks) // 2  # the live call stepped in the same ticks
    heard = await talk(primed, caller_frames(6, seed=5))
    # The same prompt primed in one piece (no live call to wait for) answers with the same tokens.
    alone = tiny_worker(1, admit_fraction=float("inf"))
    try:
        whole = await alone.open(spec)
        # whole: the voice positions (kept for the next call with this voice), then all of the rest
        assert len([t for t in alone.ticks if t.prime is not None]) == 2
        expected = await talk(whole, caller_frames(6, seed=5))
    finally:
        await alone.aclose()
    assert [f.token for f in heard] == [f.token for f in expected]
    assert all(np.array_equal(a.pcm, b.pcm) for a, b in zip(heard, expected, strict=True))


async def test_a_caller_who_hangs_up_while_priming_frees_the_slot(worker):
    spec = SessionSpec(voice="voice_tiny", prompt=LONG_PROMPT, sampling=Sampling(greedy=True))
    live = await worker.open(SPEC)
    stop = asyncio.Event()
    talking = asyncio.create_task(keep_talking(live, stop))
    opening = asyncio.create_task(worker.open(spec))
    await asyncio.sleep(0.05)
    opening.cancel()
    with pytest.raises(asyncio.CancelledError):
        await opening
    await asyncio.sleep(0.2)
    stop.set()
    await talking
    assert not worker._primes and worker._free == [1]
    again = await worker.open(SPEC)  # the freed slot primes cleanly for the next call
    assert again.slot == 1 and len(await talk(again, caller_frames(2))) == 2
