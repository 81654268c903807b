"""Tests for gateway.audio: mu-law exactness, resampler latency and filtering, 20 ms <-> 80 ms framing."""

from __future__ import annotations

import math
import warnings
import wave

import numpy as np
import pytest
from tinymodel import FIXTURE

from engine.config import FRAME_SAMPLES, SAMPLE_RATE
from gateway.audio import (
    InboundAudio,
    OutboundAudio,
    PolyphaseResampler,
    float_to_pcm16,
    mulaw_decode,
    mulaw_encode,
)

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    import audioop

FIXTURE_WAV = FIXTURE / "input_user.wav"
PAIRS = [(8000, 24000), (24000, 8000), (16000, 24000), (24000, 16000)]
# Edges of the band the gateway carries and of the band where images/aliases must be gone, per carrier rate.
PASS_EDGE = {8000: 3400, 16000: 7000}
STOP_EDGE = {8000: 4600, 16000: 9000}


# --- helpers -----------------------------------------------------------------------------------------


def stream(resampler: PolyphaseResampler, x: np.ndarray, chunk: int) -> tuple[np.ndarray, list[int]]:
    """Feed `x` in pieces of `chunk`; returns the output and how many samples each call returned."""
    out = [resampler.process(x[i : i + chunk]) for i in range(0, len(x), chunk)]
    return np.concatenate(out), [len(y) for y in out]


def chirp(rate: int, seconds: float, f0: float, f1: float) -> np.ndarray:
    t = np.arange(round(rate * seconds)) / rate
    x = 0.5 * np.sin(2 * np.pi * (f0 * t + (f1 - f0) / (2 * seconds) * t**2))
    ramp = round(0.02 * rate)  # soft ends so the correlation peak comes from the sweep, not the edges
    taper = 0.5 - 0.5 * np.cos(np.pi * np.arange(ramp) / ramp)
    x[:ramp] *= taper
    x[-ramp:] *= taper[::-1]
    return x.astype(np.float32)


def lag_of(y: np.ndarray, ref: np.ndarray) -> int:
    """Samples by which `y` trails `ref`, from the peak of their cross-correlation."""
    n = 1 << (len(y) + len(ref)).bit_length()
    xcorr = np.fft.irfft(np.fft.rfft(y, n) * np.conj(np.fft.rfft(ref, n)), n)
    peak = int(np.argmax(xcorr))
    return peak if peak < n // 2 else peak - n


def tone(freq: float, rate: int, seconds: float, amplitude: float = 0.5) -> np.ndarray:
    return (amplitude * np.sin(2 * np.pi * freq * np.arange(round(rate * seconds)) / rate)).astype(np.float32)


def steady_spectrum(in_rate: int, out_rate: int, freq: int) -> np.ndarray:
    """Amplitude per 1 Hz bin of 1 s of output, after 0.25 s settling, for a 0.5 tone streamed in 20 ms."""
    y, _ = stream(PolyphaseResampler(in_rate, out_rate), tone(freq, in_rate, 1.3), in_rate // 50)
    segment = y[out_rate // 4 : out_rate // 4 + out_rate].astype(np.float64)
    return np.abs(np.fft.rfft(segment)) * 2 / out_rate


def snr_db(reference: np.ndarray, test: np.ndarray) -> float:
    return 10 * math.log10(np.sum(reference.astype(np.float64) ** 2) / np.sum((test - reference) ** 2.0))


# --- mu-law and PCM ----------------------------------------------------------------------------------


def test_mulaw_decode_matches_audioop_for_all_256_codes() -> None:
    codes = bytes(range(256))
    expected = np.frombuffer(audioop.ulaw2lin(codes, 2), dtype=np.int16)
    np.testing.assert_array_equal(mulaw_decode(codes), expected)


def test_mulaw_encode_matches_audioop_for_all_65536_int16_inputs() -> None:
    levels = np.arange(-32768, 32768, dtype=np.int16)
    assert mulaw_encode(levels) == audioop.lin2ulaw(levels.tobytes(), 2)


def test_outbound_float_path_encodes_every_int16_level_as_audioop_does() -> None:
    levels = np.arange(-32768, 32768, dtype=np.int16)
    outbound = OutboundAudio("mulaw", 24000)  # no resampling: only float -> int16 -> mu-law
    assert outbound.encode(levels.astype(np.float32) / 32768) == audioop.lin2ulaw(levels.tobytes(), 2)


def test_inbound_float_path_decodes_every_mulaw_code_as_audioop_does() -> None:
    codes = bytes(range(256)) * 15  # 3840 samples: exactly 2 frames at 24 kHz
    frames = InboundAudio("mulaw", 24000).push(codes)
    assert len(frames) == 2
    expected = np.frombuffer(audioop.ulaw2lin(codes, 2), dtype=np.int16)
    np.testing.assert_array_equal(np.concatenate(frames) * 32768, expected)


def test_silence_is_encoded_as_0xff() -> None:
    outbound = OutboundAudio()
    frames = [outbound.encode(np.zeros(FRAME_SAMPLES, dtype=np.float32)) for _ in range(3)]
    assert frames == [b"\xff" * 640] * 3


def test_float_to_pcm16_clips_to_minus_one_up_to_one() -> None:
    pcm = np.array([-3.0, -1.0, -0.5, 0.0, 0.5, 32767 / 32768, 1.0, 3.0], dtype=np.float32)
    expected = [-32768, -32768, -16384, 0, 16384, 32767, 32767, 32767]
    np.testing.assert_array_equal(float_to_pcm16(pcm), expected)


def test_float_to_pcm16_rounds_to_the_nearest_level() -> None:
    steps = np.array([-2.6, -1.4, -0.6, -0.4, 0.4, 0.6, 1.4, 2.6], dtype=np.float32)
    np.testing.assert_array_equal(float_to_pcm16(steps / 32768), [-3, -1, -1, 0, 0, 1, 1, 3])


# --- resamplers --------------------------------------------------------------------------------------


@pytest.mark.parametrize(("in_rate", "out_rate"), PAIRS)
def test_resampler_equals_zero_stuffing_filtering_and_decimating(in_rate: int, out_rate: int) -> None:
    x = np.random.default_rng(1).uniform(-0.5, 0.5, in_rate // 4).astype(np.float32)
    resampler = PolyphaseResampler(in_rate, out_rate)
    stuffed = np.zeros(len(x) * resampler.up)
    stuffed[:: resampler.up] = x
    direct = np.convolve(stuffed, resampler.taps)[:: resampler.down][: len(x) * out_rate // in_rate]
    np.testing.assert_allclose(resampler.process(x), direct * resampler.up, atol=1e-6)


@pytest.mark.parametrize(("in_rate", "out_rate"), PAIRS)
def test_resampler_output_does_not_depend_on_chunking(in_rate: int, out_rate: int) -> None:
    rng = np.random.default_rng(2)
    x = rng.uniform(-0.5, 0.5, in_rate // 2).astype(np.float32)
    whole = PolyphaseResampler(in_rate, out_rate).process(x)
    chunked, pos, resampler = [], 0, PolyphaseResampler(in_rate, out_rate)
    while pos < len(x):
        n = int(rng.integers(0, in_rate // 20))  # 0 to 50 ms, 0 included
        chunked.append(resampler.process(x[pos : pos + n]))
        pos += n
    np.testing.assert_allclose(np.concatenate(chunked), whole, atol=1e-6)
    assert len(whole) == len(x) * out_rate // in_rate


@pytest.mark.parametrize(("in_rate", "out_rate"), PAIRS)
def test_resampler_adds_at_most_3ms_of_latency(in_rate: int, out_rate: int) -> None:
    band = PASS_EDGE[min(in_rate, out_rate)]
    x = chirp(in_rate, 1.0, 300, band)
    chunk = in_rate // 50 if in_rate < out_rate else in_rate * 2 // 25  # 20 ms in, 80 ms out
    resampler = PolyphaseResampler(in_rate, out_rate)
    y, sizes = stream(resampler, x, chunk)
    # Withheld output: what the input so far determines but a call did not return.
    fed = np.cumsum([len(x[i : i + chunk]) for i in range(0, len(x), chunk)])
    withheld = fed * out_rate / in_rate - np.cumsum(sizes)
    group_delay_ms = 1000 * lag_of(y, chirp(out_rate, 1.0, 300, band)) / out_rate
    assert withheld.max() <= 0
    assert 0 <= group_delay_ms <= 3.0


@pytest.mark.parametrize(("in_rate", "out_rate"), [(8000, 24000), (16000, 24000)])
def test_upsampler_rejects_images_by_60db(in_rate: int, out_rate: int) -> None:
    worst = math.inf
    for f in range(20, PASS_EDGE[in_rate] + 1, 20):  # images land from STOP_EDGE up to 12 kHz
        spectrum = steady_spectrum(in_rate, out_rate, f)
        signal = spectrum[f]
        spectrum[f - 2 : f + 3] = 0  # everything else the output holds is an image (or noise)
        worst = min(worst, 20 * math.log10(signal / spectrum.max()))
    assert worst >= 60


@pytest.mark.parametrize(("in_rate", "out_rate"), [(24000, 8000), (24000, 16000)])
def test_downsampler_rejects_aliases_by_60db(in_rate: int, out_rate: int) -> None:
    worst = math.inf
    for f in range(STOP_EDGE[out_rate], in_rate // 2, 20):
        worst = min(worst, 20 * math.log10(0.5 / steady_spectrum(in_rate, out_rate, f).max()))
    assert worst >= 60


@pytest.mark.parametrize(("in_rate", "out_rate"), PAIRS)
def test_passband_300_to_pass_edge_is_flat_within_0_01db(in_rate: int, out_rate: int) -> None:
    edge = PASS_EDGE[min(in_rate, out_rate)]
    gains = [
        20 * math.log10(steady_spectrum(in_rate, out_rate, f)[f] / 0.5) for f in range(300, edge + 1, 50)
    ]
    assert max(abs(g) for g in gains) <= 0.01


def round_trip_8k_24k_8k(x: np.ndarray) -> np.ndarray:
    up, _ = stream(PolyphaseResampler(8000, 24000), x, 160)  # 20 ms in, as from the carrier
    back, _ = stream(PolyphaseResampler(24000, 8000), up, 1920)  # 80 ms frames out, as from the model
    return back


def test_round_trip_8k_24k_8k_of_1khz_tone_has_high_snr() -> None:
    # A tone repeats every 8 samples, so take the delay from a chirp rather than from the tone itself.
    probe = chirp(8000, 1.0, 300, 3400)
    delay = lag_of(round_trip_8k_24k_8k(probe), probe)
    x = tone(1000, 8000, 1.0)
    settled = slice(800, len(x) - 800)
    assert snr_db(x[settled], round_trip_8k_24k_8k(x)[delay:][settled]) >= 60


# --- inbound framing ---------------------------------------------------------------------------------


def test_inbound_frames_random_length_payloads_without_loss_or_duplication() -> None:
    rng = np.random.default_rng(3)
    mulaw = rng.integers(0, 256, 8000 * 2 + 123, dtype=np.uint8).tobytes()
    inbound, frames, pos = InboundAudio(), [], 0
    while pos < len(mulaw):
        n = int(rng.integers(0, 500))
        frames += inbound.push(mulaw[pos : pos + n])
        pos += n
    assert len(frames) == len(mulaw) // 640
    assert all(f.dtype == np.float32 and f.shape == (FRAME_SAMPLES,) for f in frames)
    direct = PolyphaseResampler(8000, 24000).process(mulaw_decode(mulaw) / 32768)
    np.testing.assert_allclose(np.concatenate(frames), direct[: len(frames) * FRAME_SAMPLES], atol=1e-6)
    assert inbound.buffered_ms == pytest.approx(len(mulaw) % 640 / 8)


def test_inbound_reports_buffered_audio_until_a_frame_completes() -> None:
    inbound = InboundAudio()
    seen = []
    for _ in range(4):
        frames = inbound.push(b"\xff" * 160)
        seen.append((len(frames), inbound.buffered_ms))
    assert seen == [(0, 20.0), (0, 40.0), (0, 60.0), (1, 0.0)]


@pytest.mark.parametrize("rate", [8000, 16000, 24000])
def test_inbound_l16_joins_samples_split_across_payloads(rate: int) -> None:
    rng = np.random.default_rng(4)
    pcm = rng.integers(-20000, 20000, rate // 2, dtype=np.int16).astype("<i2").tobytes()
    split, pos, inbound = [], 0, InboundAudio("l16", rate)
    while pos < len(pcm):
        n = int(rng.integers(1, 301)) | 1  # odd sizes: samples straddle payloads
        split += inbound.push(pcm[pos : pos + n])
        pos += n
    whole = InboundAudio("l16", rate).push(pcm)
    assert len(split) == len(whole) == len(pcm) // 2 // (FRAME_SAMPLES * rate // SAMPLE_RATE)
    np.testing.assert_array_equal(np.concatenate(split), np.concatenate(whole))


def test_inbound_reset_forgets_buffered_samples_and_history() -> None:
    rng = np.random.default_rng(5)
    before, after = (rng.integers(0, 256, n, dtype=np.uint8).tobytes() for n in (1000, 1280))
    inbound = InboundAudio()
    inbound.push(before)
    inbound.reset()
    assert inbound.buffered_ms == 0
    np.testing.assert_array_equal(
        np.concatenate(inbound.push(after)), np.concatenate(InboundAudio().push(after))
    )


# --- outbound ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("encoding", "rate", "size"),
    [("mulaw", 8000, 640), ("l16", 8000, 1280), ("l16", 16000, 2560), ("l16", 24000, 3840)],
)
def test_outbound_frame_becomes_80ms_of_carrier_bytes(encoding: str, rate: int, size: int) -> None:
    outbound = OutboundAudio(encoding, rate)
    frames = np.random.default_rng(6).uniform(-0.5, 0.5, (3, FRAME_SAMPLES)).astype(np.float32)
    assert [len(outbound.encode(f)) for f in frames] == [size] * 3


def test_outbound_reset_drops_filter_history() -> None:
    loud, frame = np.random.default_rng(7).uniform(-0.9, 0.9, (2, FRAME_SAMPLES)).astype(np.float32)
    outbound = OutboundAudio()
    outbound.encode(loud)
    outbound.reset()
    assert outbound.encode(frame) == OutboundAudio().encode(frame)


@pytest.mark.parametrize(("encoding", "rate", "named"), [("alaw", 8000, "'alaw'"), ("mulaw", 44100, "44100")])
def test_unsupported_format_is_rejected_naming_the_value(encoding: str, rate: int, named: str) -> None:
    for converter in (InboundAudio, OutboundAudio):
        with pytest.raises(ValueError, match=named):
            converter(encoding, rate)


# --- the whole path on real caller audio -------------------------------------------------------------


def test_fixture_caller_audio_through_twilio_mulaw_loses_only_mulaw_precision() -> None:
    with wave.open(str(FIXTURE_WAV)) as wav:
        audio = np.frombuffer(wav.readframes(wav.getnframes()), dtype="<i2").astype(np.float32) / 32768
    frames = audio[: len(audio) // FRAME_SAMPLES * FRAME_SAMPLES].reshape(-1, FRAME_SAMPLES)
    outbound, inbound, received = OutboundAudio(), InboundAudio(), []
    for frame in frames:
        payload = outbound.encode(frame)
        for i in range(0, len(payload), 160):  # as Twilio would send it: 20 ms messages
            received += inbound.push(payload[i : i + 160])
    # The same conversions without mu-law: what the path would give with perfect 8 kHz samples.
    ideal = PolyphaseResampler(8000, 24000).process(PolyphaseResampler(24000, 8000).process(frames.ravel()))
    # G.711 mu-law quantisation noise sits about 35-38 dB under speech.
    assert snr_db(ideal, np.concatenate(received)) >= 30
