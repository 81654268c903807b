"""The GPU check script cannot rot: its CPU dry run (the tiny model, short runs) passes here, printing the
same sections the GPU run prints, the churn scenario's whole-versus-chunked table included."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_gpu_check_dry_run_passes_on_a_cpu() -> None:
    done = subprocess.run(
        ["bash", str(ROOT / "scripts" / "gpu-check.sh"), "--device", "cpu", "--size", "tiny"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = done.stdout
    for section in ("1. step time", "4. targets", "5. churn", "gpu-check done"):
        assert section in out, out[-3000:]
    assert re.findall(r"^\s+(none|whole|chunked)\s+\d", out, re.M) == ["none", "whole", "chunked"]
