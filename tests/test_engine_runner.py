"""Batched runner behaviour on the tiny fixture: prefill shortcuts change nothing, slots are independent,
sampling replays from the seed."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tinymodel import FIXTURE, reference_prompt, run_tokens, tiny_models

from engine.api import Sampling
from engine.loading import encode_role_prompt, load_text_tokenizer
from engine.runner import BatchRunner
from engine.voices import load_voice

GREEDY = Sampling(greedy=True)
SAMPLED = Sampling(temp_audio=0.8, temp_text=0.7, topk_audio=250, topk_text=25)


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_runner(capacity: int, context: int | None = None) -> BatchRunner:
    lm, mimi, _ = tiny_models(context)
    return BatchRunner(lm, mimi, capacity)


def plan_for(runner: BatchRunner, prompt: str = reference_prompt(), voice: str = "voice_tiny.pt"):
    tokenizer = load_text_tokenizer(FIXTURE / "tokenizer_tiny.model")
    source = runner.voice_source(load_voice(FIXTURE / "voices" / voice, None))
    return runner.plan(source, encode_role_prompt(tokenizer, prompt))


def caller_codes(steps: int, offset: int = 0) -> torch.Tensor:
    return torch.from_numpy(run_tokens("greedy_pt")["live_user_codes"][offset : offset + steps])


def live_tokens(runner: BatchRunner, slot: int, codes: torch.Tensor) -> np.ndarray:
    active = torch.zeros(runner.capacity, dtype=torch.bool)
    active[slot] = True
    rows = []
    for frame in codes:
        user = torch.zeros(runner.capacity, 8, dtype=torch.long)
        user[slot] = frame
        rows.append(runner.step_codes(user, active)[slot].clone())
    return torch.stack(rows).numpy()


def test_one_pass_prefill_gives_the_same_live_tokens_as_step_by_step():
    codes = caller_codes(30)
    outputs = []
    for one_pass in (True, False):
        runner = make_runner(1)
        runner.configure(0, GREEDY, 0)
        runner.prefill(0, plan_for(runner), one_pass=one_pass)
        outputs.append(live_tokens(runner, 0, codes))
    assert np.array_equal(outputs[0], outputs[1])


@pytest.mark.parametrize("chunk", [1, 7, 40])
def test_a_prime_in_chunks_between_another_calls_steps_gives_the_one_pass_tokens(chunk: int):
    codes = caller_codes(30)
    plan = plan_for(runner := make_runner(2))
    runner.configure(0, GREEDY, 0)
    runner.prefill(0, plan)
    runner.configure(1, SAMPLED, 7)
    runner.prefill(1, plan)
    one_pass = live_tokens(runner, 1, codes)
    # Slot 1 again, now primed in chunks while slot 0 takes a live step between every two chunks.
    runner.configure(1, SAMPLED, 7)
    job, steps = runner.begin_prefill(1, plan), 0
    while not runner.prefill_chunk(job, chunk):
        live_tokens(runner, 0, caller_codes(1, offset=steps % 20))
        steps += 1
    runner.finish_prefill(job)
    assert steps >= (plan.length - 1) // chunk - 1  # the other call stepped between the chunks
    assert np.array_equal(live_tokens(runner, 1, codes), one_pass)


def test_cached_voice_prefix_gives_the_same_live_tokens_as_a_fresh_prefill():
    runner = make_runner(2)
    plan = plan_for(runner)
    runner.configure(0, GREEDY, 0)
    first = runner.prefill(0, plan)
    runner.configure(1, GREEDY, 0)
    second = runner.prefill(1, plan, first.prefix)
    assert first.prefix is not None and second.prefix is first.prefix
    codes = caller_codes(20)
    assert np.array_equal(live_tokens(runner, 0, codes), live_tokens(runner, 1, codes))


def test_audio_voice_and_stored_embeddings_prime_the_same_session():
    runner = make_runner(1)
    outputs = []
    for voice in ("voice_tiny.pt", "voice_tiny.wav"):
        runner.configure(0, GREEDY, 0)
        runner.prefill(0, plan_for(runner, voice=voice))
        outputs.append(live_tokens(runner, 0, caller_codes(15)))
    assert np.array_equal(outputs[0], outputs[1])


def run_staggered(runner: BatchRunner, sessions: dict[int, tuple[Sampling, int, int]], steps: int):
    """Run slots that start at different steps; sessions maps slot -> (sampling, seed, start step).
    Returns slot -> (tokens, pcm) for every step the slot was live."""
    rng = np.random.default_rng(5)
    audio = torch.from_numpy(rng.standard_normal((steps, 1920)).astype(np.float32) * 0.1)
    out = {slot: ([], []) for slot in sessions}
    plan = plan_for(runner)
    for step in range(steps):
        for slot, (sampling, seed, start) in sessions.items():
            if step == start:
                runner.configure(slot, sampling, seed)
                runner.prefill(slot, plan)
        active = torch.tensor(
            [slot in sessions and sessions[slot][2] <= step for slot in range(runner.capacity)]
        )
        frames = torch.zeros(runner.capacity, 1920)  # on the host: the runner copies them in
        for slot, (_, _, start) in sessions.items():
            if start <= step:
                frames[slot] = audio[step - start]  # each call hears the same audio from its own start
        result = runner.step(frames, active)
        for slot, (_, _, start) in sessions.items():
            if start <= step:
                out[slot][0].append(result.tokens[slot].to("cpu", copy=True))
                out[slot][1].append(result.pcm[slot].to("cpu", copy=True))
    return {slot: (torch.stack(t).numpy(), torch.stack(p).numpy()) for slot, (t, p) in out.items()}


@pytest.mark.parametrize("sampling", [GREEDY, SAMPLED], ids=["greedy", "sampled"])
def test_session_output_is_identical_alone_and_in_a_batch(sampling):
    steps = 24
    alone = run_staggered(make_runner(3), {1: (sampling, 11, 0)}, steps)[1]
    crowd = run_staggered(
        make_runner(3), {0: (SAMPLED, 3, 5), 1: (sampling, 11, 0), 2: (GREEDY, 4, 9)}, steps
    )
    assert np.array_equal(alone[0], crowd[1][0])
    assert np.array_equal(alone[1], crowd[1][1])
    # The companions really ran: they produced frames for the steps after they joined.
    assert crowd[0][0].shape[0] == steps - 5 and crowd[2][0].shape[0] == steps - 9


def test_sampled_session_replays_from_its_seed_and_seeds_differ():
    def tokens(seed: int) -> np.ndarray:
        runner = make_runner(1)
        runner.configure(0, SAMPLED, seed)
        runner.prefill(0, plan_for(runner))
        return live_tokens(runner, 0, caller_codes(12))

    assert np.array_equal(tokens(1234), tokens(1234))
    assert not np.array_equal(tokens(1234), tokens(4321))


def test_inactive_slot_state_is_untouched_by_other_slots_steps():
    runner = make_runner(2)
    for slot in (0, 1):
        runner.configure(slot, GREEDY, 0)
        runner.prefill(slot, plan_for(runner))
    before = (runner.pending[1].clone(), runner.next_position[1].clone(), runner.kv.keys[:, 1].clone())
    live_tokens(runner, 0, caller_codes(5))
    assert torch.equal(before[0], runner.pending[1]) and torch.equal(before[1], runner.next_position[1])
    assert torch.equal(before[2], runner.kv.keys[:, 1])


def test_empty_role_prompt_primes_and_runs():
    runner = make_runner(1)
    runner.configure(0, GREEDY, 0)
    plan = plan_for(runner, prompt="")
    runner.prefill(0, plan)
    tokens = live_tokens(runner, 0, caller_codes(3))
    assert tokens.shape == (3, 17)


def test_forced_text_replaces_the_sampled_text_token():
    runner = make_runner(1)
    runner.configure(0, GREEDY, 0)
    runner.prefill(0, plan_for(runner))
    runner.force_text(0, 42)
    tokens = live_tokens(runner, 0, caller_codes(3))
    # The token chosen at step n is emitted with frame n + 1.
    assert tokens[1, 0] == 42 and tokens[2, 0] == 42
