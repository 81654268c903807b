"""Tests for engine.voices: the published `.pt` voice format, audio voice prompts normalised to -24 LUFS,
and looking voices up by name, against the tiny PersonaPlex fixture."""

from __future__ import annotations

import json
import shutil
import wave
from pathlib import Path

import numpy as np
import pyloudnorm
import pytest
import torch
from scipy.io import wavfile
from tinymodel import FIXTURE

from engine.config import SAMPLE_RATE
from engine.voices import (
    VOICE_LOUDNESS_LUFS,
    VoiceAudio,
    VoiceEmbeddings,
    VoiceError,
    list_voices,
    load_voice,
    read_wav,
)

VOICE_PT = FIXTURE / "voices" / "voice_tiny.pt"
VOICE_WAV = FIXTURE / "voices" / "voice_tiny.wav"


def _tiny_lm_dim() -> int:
    return json.loads((FIXTURE / "tiny_config.json").read_text())["lm"]["dim"]


def _write_pcm_wav(path: Path, samples: np.ndarray, rate: int, width: int) -> Path:
    """Integer PCM WAV through the stdlib writer; `samples` is float [T, C] in [-1, 1)."""
    scaled = np.round(samples * 2 ** (8 * width - 1)).astype(np.int64)
    raw = b"".join(int(v).to_bytes(width, "little", signed=True) for v in scaled.ravel())
    with wave.open(str(path), "wb") as out:
        out.setnchannels(samples.shape[1])
        out.setsampwidth(width)
        out.setframerate(rate)
        out.writeframes(raw)
    return path


def _loudness(pcm: np.ndarray) -> float:
    return pyloudnorm.Meter(SAMPLE_RATE).integrated_loudness(pcm)


# --- .pt stored embeddings ---------------------------------------------------------------------------------


def test_fixture_pt_voice_loads_as_rows_of_embeddings_and_the_token_ring() -> None:
    stored = torch.load(VOICE_PT, weights_only=True)

    voice = VoiceEmbeddings.load(VOICE_PT, model_dim=_tiny_lm_dim())

    n_rows = stored["embeddings"].shape[0]
    assert voice.embeddings.dtype == torch.bfloat16
    assert torch.equal(voice.embeddings, stored["embeddings"].reshape(n_rows, _tiny_lm_dim()))
    assert voice.cache.dtype == torch.int64 and torch.equal(voice.cache, stored["cache"][0])
    assert voice.path == VOICE_PT


def test_pt_voice_for_another_model_width_is_refused_naming_both_widths() -> None:
    with pytest.raises(VoiceError) as caught:
        VoiceEmbeddings.load(VOICE_PT, model_dim=4096)

    message = str(caught.value)
    assert str(VOICE_PT) in message and f"width {_tiny_lm_dim()}" in message and "4096" in message


def test_pt_voice_without_token_ring_is_refused(tmp_path: Path) -> None:
    stored = torch.load(VOICE_PT, weights_only=True)
    broken = tmp_path / "no_cache.pt"
    torch.save({"embeddings": stored["embeddings"]}, broken)

    with pytest.raises(VoiceError, match=r"no_cache\.pt has no 'cache' tensor"):
        VoiceEmbeddings.load(broken)


def test_pt_voice_with_wrong_embedding_layout_is_refused(tmp_path: Path) -> None:
    stored = torch.load(VOICE_PT, weights_only=True)
    flat = tmp_path / "flat.pt"
    torch.save({"embeddings": stored["embeddings"][:, 0, 0], "cache": stored["cache"]}, flat)

    with pytest.raises(VoiceError) as caught:
        VoiceEmbeddings.load(flat)

    flat_shape = tuple(stored["embeddings"][:, 0, 0].shape)
    assert f"flat.pt: 'embeddings' has shape {flat_shape}, expected [N, 1, 1, D]" in str(caught.value)


def test_file_that_is_not_a_torch_archive_is_refused(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(VOICE_WAV.read_bytes()[:500])

    with pytest.raises(
        VoiceError, match=r"garbage\.pt is not a readable \.pt voice file \(not a PyTorch archive"
    ):
        VoiceEmbeddings.load(garbage)


class _PickledPayload:
    """Stands for arbitrary code in a pickle; weights_only loading must refuse to build it."""


def test_pt_voice_holding_pickled_objects_is_refused(tmp_path: Path) -> None:
    stored = torch.load(VOICE_PT, weights_only=True)
    hostile = tmp_path / "hostile.pt"
    torch.save(
        {"embeddings": stored["embeddings"], "cache": stored["cache"], "x": _PickledPayload()}, hostile
    )

    with pytest.raises(
        VoiceError, match=r"hostile\.pt is not a readable \.pt voice file \(it holds Python objects"
    ):
        VoiceEmbeddings.load(hostile)


# --- audio voice prompts ------------------------------------------------------------------------------------


def test_fixture_wav_voice_is_normalised_to_minus_24_lufs() -> None:
    voice = VoiceAudio.load(VOICE_WAV)

    assert voice.pcm.dtype == np.float32 and voice.pcm.ndim == 1
    assert abs(_loudness(voice.pcm) - VOICE_LOUDNESS_LUFS) < 0.1


def test_fixture_wav_voice_follows_the_published_recipe_sample_for_sample() -> None:
    # The published pipeline: samples / 32768 as float32, loudness measured on those, gain applied in float64
    # (NumPy 2 promotion), rounded to float32 when handed to Mimi. Reader here: scipy, not ours.
    rate, ints = wavfile.read(VOICE_WAV)
    samples = ints.astype(np.float32) / np.float32(32768)
    measured = pyloudnorm.Meter(rate).integrated_loudness(samples)
    gain = 10.0 ** ((VOICE_LOUDNESS_LUFS - measured) / 20.0)
    expected = (samples.astype(np.float64) * gain).astype(np.float32)

    voice = VoiceAudio.load(VOICE_WAV)

    assert rate == SAMPLE_RATE
    np.testing.assert_array_equal(voice.pcm, expected)


def test_wav_voice_loading_is_deterministic() -> None:
    first, second = VoiceAudio.load(VOICE_WAV), VoiceAudio.load(VOICE_WAV)

    assert first.pcm.tobytes() == second.pcm.tobytes()


def test_fixture_wav_voice_takes_as_many_frames_as_the_reference_run() -> None:
    summary = json.loads((FIXTURE / "runs" / "greedy_wav" / "summary.json").read_text())

    assert VoiceAudio.load(VOICE_WAV).num_frames == summary["phase_counts"]["voice_prompt"]


def test_float_wav_gives_the_same_voice_as_the_pcm_wav(tmp_path: Path) -> None:
    _, ints = wavfile.read(VOICE_WAV)
    float_wav = tmp_path / "voice_float.wav"
    wavfile.write(float_wav, SAMPLE_RATE, ints.astype(np.float32) / np.float32(32768))

    np.testing.assert_array_equal(VoiceAudio.load(float_wav).pcm, VoiceAudio.load(VOICE_WAV).pcm)


def test_24_bit_pcm_is_scaled_to_unit_range(tmp_path: Path) -> None:
    ramp = np.linspace(-1.0, 1.0 - 2.0**-23, 4801)[:, None]
    path = _write_pcm_wav(tmp_path / "ramp24.wav", ramp, SAMPLE_RATE, width=3)

    samples, rate = read_wav(path)

    assert rate == SAMPLE_RATE
    np.testing.assert_allclose(samples, ramp[:, 0], atol=2.0**-23)


def test_48k_stereo_voice_keeps_the_first_channel_resampled_to_24k(tmp_path: Path) -> None:
    rate, seconds = 48_000, 2.0
    t = np.arange(int(rate * seconds)) / rate
    stereo = np.stack([0.3 * np.sin(2 * np.pi * 440 * t), 0.3 * np.sin(2 * np.pi * 1000 * t)], axis=1)
    path = _write_pcm_wav(tmp_path / "stereo48k.wav", stereo, rate, width=2)

    voice = VoiceAudio.load(path)

    assert len(voice.pcm) == int(SAMPLE_RATE * seconds)
    spectrum = np.abs(np.fft.rfft(voice.pcm))
    peak_hz = np.argmax(spectrum) * SAMPLE_RATE / len(voice.pcm)
    assert abs(peak_hz - 440) < 1.0
    assert abs(_loudness(voice.pcm) - VOICE_LOUDNESS_LUFS) < 0.1


def test_silent_wav_voice_is_refused(tmp_path: Path) -> None:
    path = _write_pcm_wav(tmp_path / "silence.wav", np.zeros((SAMPLE_RATE, 1)), SAMPLE_RATE, width=2)

    with pytest.raises(VoiceError, match=r"silence\.wav is silent"):
        VoiceAudio.load(path)


def test_wav_voice_shorter_than_a_loudness_block_is_refused(tmp_path: Path) -> None:
    t = np.arange(SAMPLE_RATE // 5) / SAMPLE_RATE
    path = _write_pcm_wav(tmp_path / "short.wav", 0.3 * np.sin(2 * np.pi * 440 * t)[:, None], SAMPLE_RATE, 2)

    with pytest.raises(VoiceError, match=r"short\.wav is too short \(0\.20 s\)"):
        VoiceAudio.load(path)


def test_file_that_is_not_a_wav_is_refused(tmp_path: Path) -> None:
    fake = tmp_path / "fake.wav"
    fake.write_bytes(VOICE_PT.read_bytes())

    with pytest.raises(VoiceError, match=r"fake\.wav is not a readable WAV file"):
        VoiceAudio.load(fake)


# --- lookup by name ---------------------------------------------------------------------------------------


@pytest.fixture
def voices_dir(tmp_path: Path) -> Path:
    """NATF2 exists as .pt and .wav, NATM1 only as .wav; plus a file that is no voice."""
    folder = tmp_path / "voices"
    folder.mkdir()
    shutil.copy(VOICE_PT, folder / "NATF2.pt")
    shutil.copy(VOICE_WAV, folder / "NATF2.wav")
    shutil.copy(VOICE_WAV, folder / "NATM1.wav")
    (folder / "README.txt").write_text("not a voice")
    return folder


def test_list_voices_names_each_voice_once(voices_dir: Path) -> None:
    assert list_voices(voices_dir) == ["NATF2", "NATM1"]


def test_bare_name_prefers_the_pt_voice(voices_dir: Path) -> None:
    voice = load_voice("NATF2", voices_dir, model_dim=_tiny_lm_dim())

    assert isinstance(voice, VoiceEmbeddings) and voice.path == voices_dir / "NATF2.pt"


def test_bare_name_falls_back_to_the_wav_voice(voices_dir: Path) -> None:
    voice = load_voice("NATM1", voices_dir)

    assert isinstance(voice, VoiceAudio) and voice.path == voices_dir / "NATM1.wav"


def test_path_is_used_as_is_whatever_the_voices_directory(voices_dir: Path) -> None:
    voice = load_voice(str(VOICE_WAV), voices_dir)

    assert isinstance(voice, VoiceAudio) and voice.path == VOICE_WAV


def test_unknown_voice_error_lists_the_available_voices(voices_dir: Path) -> None:
    with pytest.raises(VoiceError) as caught:
        load_voice("VARF9", voices_dir)

    message = str(caught.value)
    assert "unknown voice 'VARF9'" in message and str(voices_dir) in message
    assert "Available voices: NATF2, NATM1" in message


def test_missing_voice_file_path_is_reported(voices_dir: Path) -> None:
    with pytest.raises(VoiceError, match=r"voice prompt file .*nowhere\.wav does not exist"):
        load_voice(str(voices_dir / "nowhere.wav"), voices_dir)
