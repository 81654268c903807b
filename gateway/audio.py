"""Carrier audio <-> model audio: mu-law/L16 at 8/16/24 kHz <-> 24 kHz float32 in 80 ms frames.

Resampling is a streaming polyphase FIR (Kaiser-windowed sinc designed at import) that emits every output
sample as soon as the input it depends on has arrived, so the only added latency is the filter's group
delay (2.1 ms for 8 kHz, 1.4 ms for 16 kHz).
"""

from __future__ import annotations

import math
import warnings
from functools import cache

import numpy as np

from engine.config import FRAME_SAMPLES, SAMPLE_RATE

with warnings.catch_warnings():
    # Deprecated in the 3.11/3.12 stdlib; the audioop-lts package provides the same module on 3.13+.
    warnings.simplefilter("ignore", DeprecationWarning)
    import audioop

ENCODINGS = ("mulaw", "l16")
RATES = (8000, 16000, 24000)
MULAW_SILENCE = 0xFF  # what audioop.lin2ulaw(0) gives; 0x7F also decodes to 0 but is never produced

# Filter targets. Telephony content ends at 3.4 kHz, so its first image/alias lands at 8 - 3.4 = 4.6 kHz;
# wideband (16 kHz) content ends at 7 kHz, its first image at 9 kHz. 80 dB leaves 20 dB of margin over
# the 60 dB the gateway promises and costs about 2 ms of group delay at 8 kHz.
STOPBAND_DB = 80.0
_NARROWBAND = (3400.0, 4600.0)  # pass edge, stop edge (Hz) for 8 kHz <-> 24 kHz, designed at 24 kHz
_WIDEBAND = (7000.0, 9000.0)  # for 16 kHz <-> 24 kHz, designed at 48 kHz

_INT16_SCALE = 32768.0  # float PCM = int16 / 32768
_INT16_MAX = np.float32(32767.0)
_INT16_MIN = np.float32(-32768.0)
_BLOCK_S = 0.005  # resampler work unit: 5 ms of input is a whole number of samples at every rate


# --- mu-law and PCM conversions ----------------------------------------------------------------------


def mulaw_decode(data: bytes | bytearray) -> np.ndarray:
    """G.711 mu-law bytes -> int16 samples, exactly as `audioop.ulaw2lin`."""
    return np.frombuffer(audioop.ulaw2lin(data, 2), dtype=np.int16)


def mulaw_encode(samples: np.ndarray | bytes) -> bytes:
    """int16 samples (array or native-order bytes) -> G.711 mu-law bytes, exactly as `audioop.lin2ulaw`."""
    if isinstance(samples, np.ndarray) and samples.dtype != np.int16:
        raise TypeError(f"mulaw_encode expects int16 samples, got {samples.dtype}; use float_to_pcm16 first")
    return audioop.lin2ulaw(samples, 2)


def pcm16_to_float(samples: np.ndarray) -> np.ndarray:
    """int16 samples -> float32 in [-1, 1)."""
    return samples.astype(np.float32) * np.float32(1.0 / _INT16_SCALE)


def float_to_pcm16(pcm: np.ndarray) -> np.ndarray:
    """float samples -> int16, rounding to nearest and clipping to [-1, 1)."""
    scaled = np.multiply(pcm, np.float32(_INT16_SCALE), dtype=np.float32)
    return _round_clip_to_int16(scaled)


def _round_clip_to_int16(scaled: np.ndarray) -> np.ndarray:
    """float32 already in int16 units -> little-endian int16; modifies `scaled` in place."""
    np.minimum(scaled, _INT16_MAX, out=scaled)
    np.maximum(scaled, _INT16_MIN, out=scaled)
    np.rint(scaled, out=scaled)
    return scaled.astype("<i2")


# --- filter design -----------------------------------------------------------------------------------


def design_lowpass(
    rate: float, pass_hz: float, stop_hz: float, atten_db: float, delay_multiple: int = 1
) -> np.ndarray:
    """Linear-phase Kaiser-windowed-sinc low-pass with unit DC gain.

    Length and window shape come from Kaiser's formulas for `atten_db` over the transition band
    `pass_hz`..`stop_hz`. The group delay (len - 1) / 2 is rounded up to a multiple of `delay_multiple`
    so that it is a whole number of samples at the rates either side of a resampler.
    """
    transition = 2.0 * math.pi * (stop_hz - pass_hz) / rate  # rad/sample
    beta = _kaiser_beta(atten_db)
    min_order = math.ceil((atten_db - 7.95) / (2.285 * transition))
    delay = math.ceil(min_order / 2 / delay_multiple) * delay_multiple
    n = np.arange(2 * delay + 1) - delay
    cutoff = (pass_hz + stop_hz) / 2.0 / rate  # cycles/sample
    taps = 2.0 * cutoff * np.sinc(2.0 * cutoff * n) * np.kaiser(2 * delay + 1, beta)
    return taps / taps.sum()


def _kaiser_beta(atten_db: float) -> float:
    if atten_db > 50:
        return 0.1102 * (atten_db - 8.7)
    if atten_db >= 21:
        return 0.5842 * (atten_db - 21) ** 0.4 + 0.07886 * (atten_db - 21)
    return 0.0


_LOWPASS = {
    # (carrier rate, design rate = lcm with 24 kHz) -> taps at the design rate; the group delay is a whole
    # number of samples at both the carrier rate and 24 kHz
    (8000, 24000): design_lowpass(24000, *_NARROWBAND, STOPBAND_DB, delay_multiple=3),
    (16000, 48000): design_lowpass(48000, *_WIDEBAND, STOPBAND_DB, delay_multiple=6),
}
for _taps in _LOWPASS.values():
    _taps.setflags(write=False)


# --- streaming resampler -----------------------------------------------------------------------------


class PolyphaseResampler:
    """Streaming rational resampler (in_rate -> out_rate) for one direction of one call.

    Equivalent to: zero-stuff by `up`, low-pass, keep every `down`-th sample, times `gain`. Work is done in
    5 ms input blocks as one matrix product (block Toeplitz form), so there is no per-sample Python.
    Output sample m depends on inputs up to floor(m * down / up) and is emitted by the call that delivers
    that input: nothing is withheld, so chunking never changes the output or adds delay.
    """

    def __init__(self, in_rate: int, out_rate: int, gain: float = 1.0) -> None:
        g = math.gcd(in_rate, out_rate)
        self.in_rate, self.out_rate = in_rate, out_rate
        self.up, self.down = out_rate // g, in_rate // g
        self.gain = gain
        self.taps = _filter_for(in_rate, out_rate)
        if self.taps is None:  # same rate: only the gain applies
            self.delay_out_samples = 0.0
            return
        self.delay_out_samples = (len(self.taps) - 1) / 2 / self.down  # group delay at out_rate
        self._block_in = round(in_rate * _BLOCK_S)
        self._block_out = self._block_in * self.up // self.down
        self._history = -(-len(self.taps) // self.up) - 1  # input samples before a block that reach into it
        self._kernel = _block_kernel(self.in_rate, self.out_rate, self._block_in, self._history, gain)
        self._max_blocks = round(FRAME_SAMPLES / SAMPLE_RATE / _BLOCK_S)  # a frame at a time; more in pieces
        width = self._history + self._block_in
        self._buf = np.zeros(self._history + self._max_blocks * self._block_in, dtype=np.float32)
        # Row b views the history plus block b; copied into `_rows` so the product can use BLAS.
        self._windows = np.lib.stride_tricks.sliding_window_view(self._buf, width)[:: self._block_in]
        self._rows = np.empty((self._max_blocks, width), dtype=np.float32)
        self._staged = 0  # input samples of the unfinished block (in _buf after the history)
        self._emitted = 0  # outputs of the unfinished block already returned

    @property
    def delay_ms(self) -> float:
        """Group delay of the filter in milliseconds (the resampler's whole algorithmic latency)."""
        return 1000.0 * self.delay_out_samples / self.out_rate

    def reset(self) -> None:
        """Forget the history, as if the stream started again."""
        if self.taps is not None:
            self._buf[:] = 0.0
            self._staged = self._emitted = 0

    def process(self, samples: np.ndarray) -> np.ndarray:
        """Resample the next piece of the stream; any length, including 0. Returns float32."""
        x = np.asarray(samples)
        if x.ndim != 1:
            raise ValueError(f"resampler input must be 1-D mono samples, got shape {x.shape}")
        if self.taps is None:
            return np.multiply(x, np.float32(self.gain), dtype=np.float32)
        pieces = []
        pos, total = 0, len(x)
        while pos < total:
            take = min(self._max_blocks * self._block_in - self._staged, total - pos)
            start = self._history + self._staged
            self._buf[start : start + take] = x[pos : pos + take]
            self._staged += take
            pos += take
            pieces.append(self._run_staged())
        if len(pieces) == 1:
            return pieces[0]
        return np.concatenate(pieces) if pieces else np.empty(0, dtype=np.float32)

    def _run_staged(self) -> np.ndarray:
        full, partial = divmod(self._staged, self._block_in)
        rows = self._rows[: full + (partial > 0)]
        rows[:full] = self._windows[:full]
        keep_from = full * self._block_in
        if partial:
            # Outputs of the unfinished block that depend only on arrived input are exact with zeros after.
            width = self._history + partial
            rows[full, :width] = self._buf[keep_from : keep_from + width]
            rows[full, width:] = 0.0
        out = np.empty((len(rows), self._block_out), dtype=np.float32)
        np.matmul(rows, self._kernel, out=out)
        ready = -(-partial * self.up // self.down)  # outputs of the unfinished block computable now
        flat = out.reshape(-1)[self._emitted : full * self._block_out + ready]
        if full:
            self._buf[: self._history + partial] = self._buf[keep_from : keep_from + self._history + partial]
        self._staged, self._emitted = partial, ready
        return flat


def _filter_for(in_rate: int, out_rate: int) -> np.ndarray | None:
    if in_rate == out_rate:
        return None
    low, high = sorted((in_rate, out_rate))
    taps = _LOWPASS.get((low, math.lcm(low, high)))
    if taps is None:
        pairs = ", ".join(f"{lo} <-> {SAMPLE_RATE}" for lo, _ in _LOWPASS)
        raise ValueError(f"no resampling filter for {in_rate} Hz -> {out_rate} Hz; supported: {pairs}")
    return taps


@cache
def _block_kernel(in_rate: int, out_rate: int, block_in: int, history: int, gain: float) -> np.ndarray:
    """Matrix K with out_block = [history, in_block] @ K: the filter laid out for one block (shared)."""
    taps = _filter_for(in_rate, out_rate)
    g = math.gcd(in_rate, out_rate)
    up, down = out_rate // g, in_rate // g
    block_out = block_in * up // down
    offset = np.arange(-history, block_in)[:, None]  # input sample relative to the block start
    index = np.arange(block_out)[None, :] * down - offset * up  # tap that joins them
    inside = (index >= 0) & (index < len(taps))
    # Zero-stuffing by `up` divides the level by `up`; the filter gain puts it back.
    kernel = np.where(inside, taps[np.clip(index, 0, len(taps) - 1)], 0.0) * (up * gain)
    kernel = kernel.astype(np.float32)
    kernel.setflags(write=False)
    return kernel


# --- per-call converters -----------------------------------------------------------------------------


def _check_format(encoding: str, rate: int) -> None:
    if encoding not in ENCODINGS:
        raise ValueError(f"unsupported carrier audio encoding {encoding!r}; expected one of {ENCODINGS}")
    if rate not in RATES:
        raise ValueError(f"unsupported carrier sample rate {rate!r} Hz; expected one of {RATES}")


class InboundAudio:
    """Carrier payload bytes -> 80 ms float32 frames at 24 kHz (stateful: one per call)."""

    def __init__(self, encoding: str = "mulaw", rate: int = 8000) -> None:
        _check_format(encoding, rate)
        self.encoding, self.rate = encoding, rate
        self._sample_bytes = 1 if encoding == "mulaw" else 2
        self._frame_bytes = FRAME_SAMPLES * rate // SAMPLE_RATE * self._sample_bytes
        # Payload bytes wait here until they make a whole frame (an L16 sample split across payloads
        # included), so a 20 ms message costs only an append. Each frame is then decoded and resampled
        # whole: a resampled sample could not leave before its frame is complete anyway.
        self._pending = bytearray()
        self._resampler = PolyphaseResampler(rate, SAMPLE_RATE, gain=1.0 / _INT16_SCALE)

    @property
    def buffered_ms(self) -> float:
        """Audio received but not yet part of a complete frame (whole samples)."""
        return 1000.0 * (len(self._pending) // self._sample_bytes) / self.rate

    def reset(self) -> None:
        """Forget buffered samples and filter history."""
        self._pending.clear()
        self._resampler.reset()

    def push(self, payload: bytes) -> list[np.ndarray]:
        """Add one carrier payload; returns the [1920] float32 frames it completed (often none)."""
        self._pending += payload
        if len(self._pending) < self._frame_bytes:
            return []
        frames = []
        size = self._frame_bytes
        complete = len(self._pending) // size * size
        for start in range(0, complete, size):
            frames.append(self._resampler.process(self._decode(self._pending[start : start + size])))
        del self._pending[:complete]
        return frames

    def _decode(self, frame: bytes | bytearray) -> np.ndarray:
        if self.encoding == "mulaw":
            return mulaw_decode(frame)
        return np.frombuffer(frame, dtype="<i2")


class OutboundAudio:
    """80 ms float32 frames at 24 kHz -> carrier payload bytes (stateful: one per call)."""

    def __init__(self, encoding: str = "mulaw", rate: int = 8000) -> None:
        _check_format(encoding, rate)
        self.encoding, self.rate = encoding, rate
        # Scaling to int16 units is folded into the filter, saving a pass over the samples.
        self._resampler = PolyphaseResampler(SAMPLE_RATE, rate, gain=_INT16_SCALE)

    def reset(self) -> None:
        """After `clear`/barge-in: drop filter history so no tail of the old audio is played."""
        self._resampler.reset()

    def encode(self, pcm: np.ndarray) -> bytes:
        """One [1920] float32 frame -> carrier bytes (640 mu-law bytes at 8 kHz).

        Any length works; output follows the input sample for sample (a 24 -> 8 kHz stream of n samples
        has produced ceil(n / 3) output samples so far).
        """
        pcm16 = _round_clip_to_int16(self._resampler.process(pcm))
        if self.encoding == "mulaw":
            return audioop.lin2ulaw(pcm16, 2)
        return pcm16.tobytes()
