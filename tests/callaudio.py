"""Caller audio for call tests: what a simulated caller says."""

from __future__ import annotations

import numpy as np


def speech_like(seconds: float) -> np.ndarray:
    """8 kHz int16 tone (300 Hz, about -15 dBFS): loud enough to count as the caller speaking."""
    t = np.arange(int(seconds * 8000)) / 8000
    return (6000 * np.sin(2 * np.pi * 300 * t)).astype(np.int16)
