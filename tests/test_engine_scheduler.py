"""The step loop's policy without a model: every ready slot steps each tick, primes run in chunks sized
from the measured prefill speed to fit beside the live step, take turns least recently served first, and
run whole when no live call would wait."""

from __future__ import annotations

import pytest

from engine.scheduler import CHUNK_BUDGET_S, FIRST_CHUNK, FRAME_BUDGET_S, PrimeRequest, Scheduler


def test_every_ready_slot_steps_and_nothing_else_runs_without_a_prime() -> None:
    tick = Scheduler().tick([3, 0, 1], [], live=4, step_s=0.02)
    assert (tick.step, tick.prime, tick.chunk, tick.move) == ((0, 1, 3), None, 0, None)
    assert Scheduler().tick([], [], live=0).idle


def test_a_prime_runs_whole_when_no_call_is_live() -> None:
    tick = Scheduler().tick([], [PrimeRequest(1, 900)], live=0)
    assert (tick.prime, tick.chunk) == (1, 900)


def test_before_the_speed_is_known_a_chunk_is_small() -> None:
    assert Scheduler().tick([0], [PrimeRequest(1, 900)], live=1).chunk == FIRST_CHUNK


def test_a_chunk_fits_the_chunk_budget_at_the_measured_speed() -> None:
    scheduler = Scheduler()
    scheduler.observe_chunk(100, 0.050)  # 0.5 ms a position
    assert scheduler.tick([0], [PrimeRequest(1, 900)], live=1, step_s=0.02).chunk == int(
        CHUNK_BUDGET_S / 0.0005
    )


def test_a_slow_step_leaves_less_room_for_the_chunk_and_the_tick_stays_in_the_frame() -> None:
    scheduler = Scheduler()
    scheduler.observe_chunk(100, 0.050)
    step_s = FRAME_BUDGET_S - 0.005
    chunk = scheduler.tick([0, 1], [PrimeRequest(1, 900)], live=2, step_s=step_s).chunk
    assert chunk == 10 and step_s + chunk * 0.0005 <= FRAME_BUDGET_S
    over = scheduler.tick([0], [PrimeRequest(1, 900)], live=1, step_s=0.2).chunk
    assert over == 1  # a step over budget still lets priming creep on, one position a tick


def test_the_last_chunk_is_what_remains() -> None:
    scheduler = Scheduler()
    scheduler.observe_chunk(10, 0.001)
    assert scheduler.tick([0], [PrimeRequest(1, 3)], live=1, step_s=0.02).chunk == 3


def test_primes_in_flight_take_turns() -> None:
    scheduler = Scheduler()
    primes = [PrimeRequest(1, 500), PrimeRequest(2, 500), PrimeRequest(3, 500)]
    served = [scheduler.tick([0], primes, live=1).prime for _ in range(6)]
    assert served == [1, 2, 3, 1, 2, 3]
    served = [scheduler.tick([0], primes[1:] + [PrimeRequest(4, 10)], live=1).prime for _ in range(3)]
    assert served == [4, 2, 3]  # a newcomer goes first: it has waited since it arrived, served never


def test_the_speed_estimate_follows_the_machine() -> None:
    scheduler = Scheduler()
    scheduler.observe_chunk(100, 0.1)
    scheduler.observe_chunk(100, 0.2)
    assert scheduler.seconds_per_position == pytest.approx(0.7 * 0.001 + 0.3 * 0.002)
    scheduler.observe_chunk(0, 1.0)  # nothing ran: nothing learnt
    assert scheduler.seconds_per_position == pytest.approx(0.0013)


def test_a_compaction_the_worker_found_is_carried_out_first() -> None:
    assert Scheduler().tick([0], [], live=1, move=(5, 1)).move == (5, 1)
