"""The step is ready to be a CUDA graph: fixed work per step size, decided without reading device data.

No GPU runs in CI, so the accelerator code path is checked on PyTorch's meta device, which has shapes but
no data: any host sync (`.item()`, `bool(tensor)`, a data-dependent branch or shape) raises there, and a CPU
tensor mixed into the step fails the device check. A recorded call log then shows that the sequence of
tensor operations is the same whatever sessions share the step, which is what lets one captured graph
replay every step. The replay itself is compared with the eager step where CUDA exists.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import numpy as np
import pytest
import torch
from test_engine_runner import GREEDY, SAMPLED, plan_for, run_staggered
from tinymodel import FIXTURE, fixture_files, tiny_models
from torch.overrides import TorchFunctionMode

from engine.api import MAX_TOP_K, Sampling, SessionSpec
from engine.checkpoint import load_models
from engine.config import ModelConfig
from engine.embedded import build_engine
from engine.loading import resolve_checkpoint
from engine.model.lm import LMModel
from engine.model.mimi import Mimi
from engine.runner import BatchRunner, step_sizes


class DeviceCalls(TorchFunctionMode):
    """Logs every torch call that touches a device (meta) tensor: its name, and the shape and dtype of
    each tensor argument (other arguments by value). `host_mixed` names the calls that also take a host
    tensor: a graph would freeze such a value (a CPU scalar tensor is read when captured, not replayed)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[str, tuple]] = []
        self.host_mixed: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        flat = [*args, *kwargs.values()]
        devices = {a.device.type for a in _flatten(flat) if isinstance(a, torch.Tensor)}
        if "meta" in devices:
            name = getattr(func, "__name__", repr(func))
            self.calls.append((name, tuple(_describe(a) for a in flat)))
            if "cpu" in devices:
                self.host_mixed.append(name)
        return func(*args, **kwargs)


def _flatten(items: list[Any]) -> list[Any]:
    out: list[Any] = []
    for item in items:
        out.extend(_flatten(list(item)) if isinstance(item, list | tuple) else [item])
    return out


def _describe(item: Any) -> Any:
    if isinstance(item, torch.Tensor):
        return (tuple(item.shape), item.dtype, item.device.type)
    if isinstance(item, list | tuple):
        return tuple(_describe(i) for i in item)
    return item if isinstance(item, int | float | bool | str | None) else type(item).__name__


def meta_runner(capacity: int) -> BatchRunner:
    """The tiny model's shapes on the meta device: the non-CPU code path (batched GEMMs and convs, as on
    CUDA), with no data behind any tensor."""
    cfg = ModelConfig.from_json(FIXTURE / "tiny_config.json")
    with torch.device("meta"):
        lm = LMModel(cfg.lm).to(torch.bfloat16).eval()
        mimi = Mimi(cfg.mimi).eval()
    return BatchRunner(lm, mimi, capacity)


def logged_step(runner: BatchRunner, active: list[bool]) -> list[tuple[str, tuple]]:
    with DeviceCalls() as log:
        result = runner.step(torch.zeros(runner.capacity, 1920), torch.tensor(active))
    # Host data enters only through the two input copies that precede a replay.
    assert log.host_mixed == ["copy_", "copy_"]
    size = runner.rows_for(torch.tensor(active))
    assert result.pcm.device.type == "meta" and result.pcm.shape == (size, 1920)
    assert result.tokens.shape == (size, 17)
    return log.calls


def test_step_sizes_cover_every_capacity():
    assert step_sizes(1) == [1]
    assert step_sizes(8) == [1, 2, 4, 8]
    assert step_sizes(40) == [1, 2, 4, 8, 16, 32, 40]


def test_accelerator_step_reads_no_device_data_and_its_work_ignores_who_shares_it():
    runner = meta_runner(4)
    runner.warmup(steps=1)  # every step size, all slots idle
    plain = logged_step(runner, [True, False, False, True])
    # Now a mix of greedy, sampled and temperature-0 sessions, one of them with a forced text token.
    runner.configure(0, SAMPLED, 7)
    runner.configure(1, GREEDY, 8)
    runner.configure(3, Sampling(temp_audio=0.0, topk_text=MAX_TOP_K), 9)
    runner.force_text(3, 42)
    mixed = logged_step(runner, [True, False, False, True])
    other_slots = logged_step(runner, [False, True, True, True])
    assert len(plain) > 100  # the model really ran through the logger
    assert mixed == plain
    assert other_slots == plain
    # A smaller step size is a different, equally fixed, sequence.
    one = logged_step(runner, [True, False, False, False])
    assert one != plain and one == logged_step(runner, [True, False, False, False])


def test_a_step_runs_only_up_to_the_highest_active_slot_and_leaves_the_rest_alone():
    lm, mimi, _ = tiny_models()
    runner = BatchRunner(lm, mimi, 4)
    plan = plan_for(runner)
    for slot in (0, 3):
        runner.configure(slot, GREEDY, slot)
        runner.prefill(slot, plan)
    before = [t[3].clone() for t in runner.mimi_state.tensors()] + [runner.kv.keys[:, 3].clone()]
    frames = torch.zeros(4, 1920)
    assert runner.step(frames, torch.tensor([True, False, False, False])).tokens.shape == (1, 17)
    after = [t[3] for t in runner.mimi_state.tensors()] + [runner.kv.keys[:, 3]]
    assert all(torch.equal(b, a) for b, a in zip(before, after, strict=True))
    assert int(runner.next_position[0]) == plan.length + 1 and int(runner.next_position[3]) == plan.length
    assert runner.step(frames, torch.tensor([False, False, False, True])).tokens.shape == (4, 17)
    assert int(runner.next_position[3]) == plan.length + 1


def test_active_mask_must_be_on_the_host():
    runner = meta_runner(2)
    with pytest.raises(ValueError, match="host bool tensor"):
        runner.step(torch.zeros(2, 1920), torch.ones(2, dtype=torch.bool, device="meta"))
    with pytest.raises(ValueError, match="CUDA device"):
        runner.capture_graphs()


@pytest.mark.parametrize(
    "settings",
    [dict(topk_audio=0), dict(topk_text=MAX_TOP_K + 1), dict(temp_text=-0.5), dict(temp_audio=float("nan"))],
)
def test_sampling_settings_out_of_range_are_refused(settings):
    with pytest.raises(ValueError, match="sampling"):
        Sampling(**settings)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
def test_graph_replay_gives_what_the_eager_step_gives():
    cfg = ModelConfig.from_json(FIXTURE / "tiny_config.json")
    lm, mimi = load_models(fixture_files(), cfg, torch.device("cuda"))
    sessions = {0: (SAMPLED, 3, 5), 1: (GREEDY, 11, 0), 2: (GREEDY, 4, 9)}
    eager = run_staggered(BatchRunner(lm, mimi, 3), sessions, 16)
    graphed_runner = BatchRunner(lm, mimi, 3)
    graphed_runner.capture_graphs()
    graphed = run_staggered(graphed_runner, sessions, 16)
    for slot in sessions:
        assert np.array_equal(eager[slot][0], graphed[slot][0])
        assert np.allclose(eager[slot][1], graphed[slot][1], atol=1e-5)


def test_the_published_sizes_prime_and_step_on_the_meta_device():
    """The 7B shapes (context 3000, 16-step depformer, 4096-wide LM) through prefill and a step, with no
    memory behind them: what the GPU will run, minus the arithmetic."""
    cfg = ModelConfig()
    with torch.device("meta"):
        lm = LMModel(cfg.lm).to(torch.bfloat16).eval()
        mimi = Mimi(cfg.mimi).eval()
    runner = BatchRunner(lm, mimi, 2)
    codes = torch.zeros(52, 8, dtype=torch.long)  # a 4 s voice prompt
    plan = runner.plan(codes, list(range(4, 74)))
    runner.configure(1, Sampling(), 3)
    prefill = runner.prefill(1, plan)
    assert plan.length == 134 and prefill.first_pcm.shape == (1920,)
    assert prefill.prefix is not None and prefill.prefix.keys.shape == (32, 32, 58, 128)
    result = runner.step(torch.zeros(2, 1920), torch.tensor([False, True]))
    assert result.tokens.shape == (2, 17) and result.pcm.shape == (2, 1920)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_the_engine_on_cuda_captures_its_steps_and_serves_a_call(tiny_checkpoint, caplog):
    """What `duplexgate serve` does on a GPU: slots from free memory, graphs captured, a call served."""
    caplog.set_level(logging.INFO, logger="engine.embedded")
    engine = build_engine(resolve_checkpoint(tiny_checkpoint), torch.device("cuda"))
    assert engine.runner.graphed and engine.capacity >= 1
    assert any("CUDA graphs" in record.getMessage() for record in caplog.records)

    async def one_call() -> list:
        session = await engine.open(SessionSpec(voice="demo", prompt="You answer the phone."))
        stream = session.frames().__aiter__()
        frames = []
        for _ in range(3):
            session.push(np.zeros(1920, dtype=np.float32))
            frames.append(await asyncio.wait_for(stream.__anext__(), 10))
        await engine.aclose()
        return frames

    frames = asyncio.run(one_call())
    assert [f.index for f in frames] == [0, 1, 2] and all(np.isfinite(f.pcm).all() for f in frames)
