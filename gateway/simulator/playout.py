"""What a simulated caller hears and says: 16-bit WAV files in and out at the carrier's 8 kHz, and the
carrier's outbound buffer played on a real-time clock into the caller's ear."""

from __future__ import annotations

import asyncio
import wave
from collections import deque
from pathlib import Path

import numpy as np
import soxr

RATE = 8000  # the carrier side of a simulated call


def read_wav_8k(path: str | Path) -> np.ndarray:
    """A 16-bit PCM wav at any rate and channel count, as mono int16 at 8 kHz."""
    with wave.open(str(path), "rb") as wav:
        if wav.getsampwidth() != 2:
            raise ValueError(f"{path}: {8 * wav.getsampwidth()}-bit samples; give a 16-bit PCM wav")
        rate, channels = wav.getframerate(), wav.getnchannels()
        pcm = np.frombuffer(wav.readframes(wav.getnframes()), dtype="<i2").astype(np.float32) / 32768.0
    pcm = pcm.reshape(-1, channels).mean(axis=1)
    if rate != RATE:
        pcm = soxr.resample(pcm, rate, RATE, quality="HQ")
    return np.clip(np.round(pcm * 32768.0), -32768, 32767).astype(np.int16)


def write_wav(path: str | Path, pcm_8k: np.ndarray, rate: int = RATE) -> None:
    """Write 8 kHz int16 audio as a 16-bit mono wav at `rate` (8000 or 24000)."""
    pcm = pcm_8k
    if rate != RATE:
        pcm = soxr.resample(pcm_8k.astype(np.float32) / 32768.0, RATE, rate, quality="HQ")
        pcm = np.clip(np.round(pcm * 32768.0), -32768, 32767).astype(np.int16)
    with wave.open(str(path), "wb") as wav:
        wav.setnchannels(1)
        wav.setsampwidth(2)
        wav.setframerate(rate)
        wav.writeframes(pcm.astype("<i2").tobytes())


class Playout:
    """The carrier's outbound buffer on a real-time clock, and the caller's ear recording it."""

    def __init__(self, origin: float, expected_s: float) -> None:
        self.origin = origin
        self.end = origin  # when the audio queued so far will have finished playing
        self.ear = np.zeros(int((expected_s + 2.0) * RATE), np.int16)
        self.last_sample = 0
        self.pending: deque[tuple[float, str]] = deque()  # (due time, mark name)
        self.wake = asyncio.Event()

    def play(self, now: float, pcm: np.ndarray) -> None:
        start = max(now, self.end)
        self.end = start + len(pcm) / RATE
        first = int(round((start - self.origin) * RATE))
        last = first + len(pcm)
        if last > len(self.ear):
            self.ear = np.concatenate([self.ear, np.zeros(last - len(self.ear) + 10 * RATE, np.int16)])
        self.ear[first:last] = pcm
        self.last_sample = max(self.last_sample, last)

    def recording(self, until: float) -> np.ndarray:
        """What the ear heard from the origin up to `until` (silence where nothing played)."""
        n = max(0, int(round((until - self.origin) * RATE)))
        if n > len(self.ear):
            return np.concatenate([self.ear, np.zeros(n - len(self.ear), np.int16)])
        return self.ear[:n].copy()

    def clear(self, now: float) -> list[str]:
        """Drop unplayed audio; returns the pending marks, all of which are echoed at once."""
        cut = int(round((now - self.origin) * RATE))
        if cut < self.last_sample:
            self.ear[max(cut, 0) : self.last_sample] = 0
            self.last_sample = max(cut, 0)
        self.end = now
        names = [name for _, name in self.pending]
        self.pending.clear()
        return names
