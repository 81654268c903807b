"""The end-to-end call each carrier's tests place: `python -m gateway.cli call --carrier X` against a live
gateway, the caller's wav written first and what the caller heard measured after."""

from __future__ import annotations

import json
import subprocess
import sys
import wave
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def sine(seconds: float, amplitude: float, rate: int = 8000, hz: float = 300) -> np.ndarray:
    """`seconds` of a `hz` tone at `rate`, peaking at `amplitude` (16-bit sample units)."""
    t = np.arange(int(seconds * rate)) / rate
    return amplitude * np.sin(2 * np.pi * hz * t)


def write_wav(path: Path, pcm: np.ndarray, rate: int = 8000) -> Path:
    """`pcm` as a mono 16-bit wav file at `path`."""
    with wave.open(str(path), "wb") as wav:
        wav.setnchannels(1)
        wav.setsampwidth(2)
        wav.setframerate(rate)
        wav.writeframes(pcm.astype("<i2").tobytes())
    return path


def cli_call(carrier: str, *options: str) -> subprocess.CompletedProcess[str]:
    """`duplexgate call --carrier <carrier> <options>` run to its end (30 s at most)."""
    command = [sys.executable, "-m", "gateway.cli", "call", "--carrier", carrier, *options]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=30)


def placed_call(carrier: str, *options: str) -> dict[str, Any]:
    """The JSON summary of a `duplexgate call` that exited 0 and saw no protocol violation."""
    done = cli_call(carrier, *options)
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert summary["violations"] == 0, summary
    return summary


def loud_seconds(path: Path, threshold: int = 500) -> float:
    """Seconds of the wav at `path` whose samples are louder than `threshold`."""
    with wave.open(str(path), "rb") as wav:
        pcm = np.frombuffer(wav.readframes(wav.getnframes()), "<i2")
        return np.count_nonzero(np.abs(pcm.astype(np.int32)) > threshold) / wav.getframerate()


def voiced_seconds(path: Path) -> tuple[int, float]:
    """The rate of the 24 kHz wav at `path`, and seconds of its 20 ms windows above RMS 1000."""
    with wave.open(str(path)) as wav:
        rate, heard = wav.getframerate(), np.frombuffer(wav.readframes(wav.getnframes()), "<i2")
    windows = heard[: len(heard) // 480 * 480].reshape(-1, 480).astype(np.float64)  # 20 ms at 24 kHz
    return rate, float((np.sqrt((windows**2).mean(axis=1)) > 1000).sum()) * 0.02
