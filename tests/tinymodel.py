"""Shared access to the tiny PersonaPlex fixture (tests/fixtures/personaplex-tiny, a slim copy of the shared
one; see tests/fixtures/README.md) for engine tests."""

from __future__ import annotations

import dataclasses
import json
import os
from functools import cache
from pathlib import Path

import numpy as np
import torch

from engine.checkpoint import load_models
from engine.config import ModelConfig
from engine.loading import CheckpointFiles, resolve_checkpoint

REPO_ROOT = Path(__file__).resolve().parents[1]
FIXTURES = Path(os.environ.get("DUPLEXGATE_FIXTURES") or REPO_ROOT / "tests" / "fixtures")
FIXTURE = FIXTURES / "personaplex-tiny"
KEY_LISTS = REPO_ROOT / "tests" / "fixtures" / "checkpoint-keys"  # published tensor names and shapes
if not (FIXTURE / "tiny_config.json").is_file():
    raise RuntimeError(
        f"no tiny fixture at {FIXTURE}: DUPLEXGATE_FIXTURES must name a directory holding personaplex-tiny/ "
        "(the repository keeps one under tests/fixtures; see its README)"
    )
RUNS = ("greedy_pt", "greedy_wav", "greedy_ctx24")


def fixture_files(config: Path | None = None) -> CheckpointFiles:
    return resolve_checkpoint(
        None,
        lm=FIXTURE / "tiny_lm.safetensors",
        mimi=FIXTURE / "tiny_mimi.safetensors",
        tokenizer=FIXTURE / "tokenizer_tiny.model",
        voices=FIXTURE / "voices",
        config=config or FIXTURE / "tiny_config.json",
    )


def run_steps(run: str) -> dict:
    return json.loads((FIXTURE / "runs" / run / "steps.json").read_text())


def run_tokens(run: str) -> dict[str, np.ndarray]:
    with np.load(FIXTURE / "runs" / run / "tokens.npz") as data:
        return {k: data[k] for k in ("live_out", "live_user_codes")}


def reference_prompt() -> str:
    return run_steps("greedy_pt")["args"]["text_prompt"]


def context_config(tmp_dir: Path, context: int) -> Path:
    """The fixture config with another LM context (the ring-wrap run uses 24)."""
    raw = json.loads((FIXTURE / "tiny_config.json").read_text())
    raw["lm"]["context"] = context
    path = tmp_dir / f"tiny_config_ctx{context}.json"
    path.write_text(json.dumps(raw))
    return path


@cache
def tiny_models(context: int | None = None):
    """(lm, mimi, cfg) on CPU, loaded once per process; tests must not modify the weights."""
    cfg = ModelConfig.from_json(FIXTURE / "tiny_config.json")
    if context is not None:
        cfg = dataclasses.replace(cfg, lm=dataclasses.replace(cfg.lm, context=context))
    lm, mimi = load_models(fixture_files(), cfg, torch.device("cpu"))
    return lm, mimi, cfg
