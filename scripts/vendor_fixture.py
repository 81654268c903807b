"""Copy the slim part of the tiny PersonaPlex fixture into tests/fixtures/, so a bare clone runs every test.

Usage: python scripts/vendor_fixture.py [SHARED_DIR]   (default: ../shared beside the checkout)

Weights, tokenizer, voices, caller input, manifest and the per-run texts, steps and decoded audio are
copied byte for byte. Each run's tokens.npz keeps only the arrays the tests read (`live_out`,
`live_user_codes`, `prompt_out`); the logits recorded beside them (17 MB a run) stay behind. The
published checkpoint-key lists are copied too.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
TARGET = REPO / "tests" / "fixtures"
VERBATIM = [
    "tiny_config.json",
    "tiny_lm.safetensors",
    "tiny_mimi.safetensors",
    "tokenizer_tiny.model",
    "tokenizer_tiny.vocab",
    "input_user.wav",
    "manifest.json",
    "voices/voice_tiny.pt",
    "voices/voice_tiny.wav",
]
RUN_FILES = ["output.wav", "output_text.json", "steps.json", "summary.json"]
RUNS = ["greedy_pt", "greedy_wav", "greedy_ctx24"]
KEPT_ARRAYS = ["live_out", "live_user_codes", "prompt_out"]
KEY_LISTS = ["lm_state_dict_keys_depq16.tsv", "mimi_state_dict_keys.tsv"]


def copy(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, target)


def main(argv: list[str]) -> int:
    shared = Path(argv[1]) if len(argv) > 1 else REPO.parent / "shared"
    fixture = shared / "fixtures" / "personaplex-tiny"
    if not fixture.is_dir():
        print(f"vendor_fixture: no fixture at {fixture}", file=sys.stderr)
        return 2
    out = TARGET / "personaplex-tiny"
    for name in VERBATIM:
        copy(fixture / name, out / name)
    for run in RUNS:
        for name in RUN_FILES:
            copy(fixture / "runs" / run / name, out / "runs" / run / name)
        with np.load(fixture / "runs" / run / "tokens.npz") as tokens:
            kept = {name: tokens[name] for name in KEPT_ARRAYS}
        np.savez_compressed(out / "runs" / run / "tokens.npz", **kept)
    for name in KEY_LISTS:
        copy(shared / "docs" / "checkpoint-keys" / name, TARGET / "checkpoint-keys" / name)
    print(f"vendored {fixture} into {TARGET}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
