"""Shared access to the tiny PersonaPlex fixture (../shared/fixtures/personaplex-tiny) for engine tests."""

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


def _find_fixture() -> Path:
    """The fixture lives in ../shared beside the checkout (or where DUPLEXGATE_FIXTURES points)."""
    env = os.environ.get("DUPLEXGATE_FIXTURES")
    roots = [Path(env)] if env else []
    roots += [REPO_ROOT / "shared" / "fixtures", REPO_ROOT.parent / "shared" / "fixtures"]
    for root in roots:
        if (root / "personaplex-tiny").is_dir():
            return root / "personaplex-tiny"
    raise RuntimeError(
        f"no personaplex-tiny fixture under {[str(r) for r in roots]}: set DUPLEXGATE_FIXTURES"
    )


FIXTURE = _find_fixture()
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
