"""Model checkpoints: the random demo checkpoint is real-format, deterministic and servable; loading checks
every tensor against the model."""

from __future__ import annotations

import asyncio
import hashlib
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from serveproc import ADMIT_FRACTION

from engine.api import SessionSpec
from engine.checkpoint import load_models, write_random_checkpoint
from engine.embedded import create_default_engine
from engine.loading import LM_FILE, MIMI_FILE, CheckpointError, resolve_checkpoint
from engine.model.lm import LMModel


def digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_random_checkpoint_is_deterministic_for_a_seed(tmp_path):
    first = write_random_checkpoint(tmp_path / "a", seed=3)
    second = write_random_checkpoint(tmp_path / "b", seed=3)
    other = write_random_checkpoint(tmp_path / "c", seed=4)
    for name in (LM_FILE, MIMI_FILE):
        assert digest(first / name) == digest(second / name)
    assert digest(first / LM_FILE) != digest(other / LM_FILE)


def test_random_checkpoint_uses_the_published_layout_and_dtypes(tmp_path):
    directory = write_random_checkpoint(tmp_path / "ckpt")
    files = resolve_checkpoint(directory)
    cfg = files.model_config()
    lm_tensors = load_file(str(files.lm))
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in LMModel(cfg.lm).state_dict().items()}
    assert {k: tuple(v.shape) for k, v in lm_tensors.items()} == expected
    assert {v.dtype for v in lm_tensors.values()} == {torch.bfloat16}
    assert any(k.startswith("depformer.layers.0.gating.15.") for k in lm_tensors)  # 16 depformer steps
    assert (directory / "voices" / "demo.wav").is_file()


def test_loading_reports_every_wrong_tensor_with_the_file(tmp_path):
    directory = write_random_checkpoint(tmp_path / "ckpt")
    tensors = load_file(str(directory / LM_FILE))
    del tensors["text_emb.weight"]
    tensors["out_norm.alpha"] = torch.ones(1, 1, 3, dtype=torch.bfloat16)
    tensors["extra.weight"] = torch.zeros(2)
    save_file(tensors, str(directory / LM_FILE))
    files = resolve_checkpoint(directory)
    with pytest.raises(CheckpointError) as err:
        load_models(files, files.model_config(), torch.device("cpu"))
    message = str(err.value)
    for fragment in (LM_FILE, "text_emb.weight", "out_norm.alpha", "extra.weight"):
        assert fragment in message


def test_default_engine_serves_the_random_model_with_a_noise_notice(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("DUPLEXGATE_HOME", str(tmp_path))
    threads = torch.get_num_threads()
    try:
        settings = SimpleNamespace(
            checkpoint="",
            device="cpu",
            cuda_graphs=True,
            cpu_threads=1,
            slots=0,
            admit_fraction=ADMIT_FRACTION,
        )
        engine = create_default_engine(settings)
        assert torch.get_num_threads() == 1  # the demo engine runs its CPU kernels on one thread
    finally:
        torch.set_num_threads(threads)
    assert "noise" in (engine.notice or "")
    assert any("NOISE" in record.getMessage() for record in caplog.records)

    async def one_call() -> list:
        session = await engine.open(SessionSpec(voice="demo", prompt="You are a helpful assistant."))
        session.push(np.zeros(1920, dtype=np.float32))
        stream = session.frames().__aiter__()
        frame = await asyncio.wait_for(stream.__anext__(), 10)
        await session.close()
        await engine.aclose()
        return [frame]

    frames = asyncio.run(one_call())
    assert frames[0].pcm.shape == (1920,) and np.isfinite(frames[0].pcm).all()


def test_init_random_command_writes_a_checkpoint(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "gateway.cli", "engine", "init-random", str(tmp_path / "demo")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "noise" in done.stdout
    assert resolve_checkpoint(tmp_path / "demo").model_config().lm.dim == 64
