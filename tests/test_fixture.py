"""The vendored tiny fixture is the recorded one: every file copied byte for byte matches the fixture's own
manifest and run summaries, and the slimmed token arrays hash as the recording's did."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
from tinymodel import FIXTURE, RUNS, run_tokens


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_fixture_files_match_their_manifest() -> None:
    manifest = json.loads((FIXTURE / "manifest.json").read_text())
    assets = {name: entry for name, entry in manifest.items() if not name.startswith("_")}
    assert len(assets) == 8
    for name, entry in assets.items():
        data = (FIXTURE / name).read_bytes()
        assert (len(data), sha256(data)) == (entry["bytes"], entry["sha256"]), name


@pytest.mark.parametrize("run", RUNS)
def test_run_outputs_and_slim_tokens_match_the_recorded_summary(run: str) -> None:
    directory = FIXTURE / "runs" / run
    summary = json.loads((directory / "summary.json").read_text())
    for name in ("output.wav", "output_text.json", "steps.json"):
        assert sha256((directory / name).read_bytes()) == summary[f"sha256_{name}"], name
    live_out = run_tokens(run)["live_out"]
    assert live_out.shape == (summary["n_live"], 17)
    assert (
        sha256(np.ascontiguousarray(live_out, dtype=np.int64).tobytes()) == summary["sha256_live_out_int64"]
    )
