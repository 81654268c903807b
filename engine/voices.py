"""Voice prompts: the published `.pt` stored embeddings, or an audio file normalised to -24 LUFS.

A voice is named by a bare name (`NATF2`, looked up as `NATF2.pt` then `NATF2.wav` in the voices directory)
or by a path to a `.pt`/`.wav` file. Loading is cheap; the engine caches the primed KV per voice, not this.
"""

from __future__ import annotations

import math
import pickle
import struct
import wave
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyloudnorm
import soxr
import torch

from engine.config import FRAME_SAMPLES, SAMPLE_RATE
from engine.loading import CheckpointError

__all__ = [
    "VOICE_LOUDNESS_LUFS",
    "VoiceAudio",
    "VoiceEmbeddings",
    "VoiceError",
    "list_voices",
    "load_voice",
    "read_wav",
]

VOICE_LOUDNESS_LUFS = -24.0  # the published inference normalises audio voice prompts to this level
VOICE_SUFFIXES = (".pt", ".wav")  # lookup order for a bare voice name
NUM_STREAMS = 17  # text + 8 agent + 8 user token streams in the stored token ring
TOKEN_RING_SLOTS = 4


class VoiceError(CheckpointError):
    """A voice prompt is unknown, unreadable or made for another model."""


@dataclass(frozen=True, eq=False)
class VoiceEmbeddings:
    """A voice prompt in the published `.pt` form: model-specific inputs replayed instead of audio."""

    embeddings: torch.Tensor  # [N, D] bf16: summed temporal-transformer inputs of prompt positions 0..N-1
    cache: torch.Tensor  # [17, 4] int64: the 4-slot token ring after the voice prompt, restored after replay
    path: Path | None = None

    @classmethod
    def load(cls, path: str | Path, model_dim: int | None = None) -> VoiceEmbeddings:
        """Read a `.pt` voice (`{"embeddings": [N,1,1,D], "cache": [1,17,4]}`) without running pickled code.

        `model_dim` is the LM width D the embeddings must have (they bake in that model's embedding tables).
        """
        path = Path(path)
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except FileNotFoundError as exc:
            raise VoiceError(f"voice prompt {path} does not exist") from exc
        except Exception as exc:  # torch.load raises many unrelated types for a damaged or foreign file
            if not zipfile.is_zipfile(path):
                reason = "not a PyTorch archive, or a damaged one"
            elif isinstance(exc, pickle.UnpicklingError):  # the weights-only unpickler refused some object
                reason = "it holds Python objects, not only tensors"
            else:
                reason = f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:160]}"
            raise _unreadable_pt(path, reason) from exc
        embeddings = _stored_tensor(state, "embeddings", path)
        cache = _stored_tensor(state, "cache", path)
        if embeddings.dim() != 4 or embeddings.shape[1:3] != (1, 1) or embeddings.shape[0] < 1:
            raise VoiceError(
                f"voice prompt {path}: 'embeddings' has shape {tuple(embeddings.shape)}, expected "
                f"[N, 1, 1, D] with N >= 1"
            )
        if not embeddings.is_floating_point():
            raise VoiceError(f"voice prompt {path}: 'embeddings' has dtype {embeddings.dtype}, expected bf16")
        width = embeddings.shape[-1]
        if model_dim is not None and width != model_dim:
            raise VoiceError(
                f"voice prompt {path} was made for a model of width {width}, this model's width is "
                f"{model_dim}; .pt voices are model-specific: use the voices shipped with these weights or a "
                f".wav voice prompt"
            )
        if tuple(cache.shape) != (1, NUM_STREAMS, TOKEN_RING_SLOTS) or cache.is_floating_point():
            raise VoiceError(
                f"voice prompt {path}: 'cache' is {cache.dtype} {tuple(cache.shape)}, expected an integer "
                f"tensor of shape [1, {NUM_STREAMS}, {TOKEN_RING_SLOTS}]"
            )
        return cls(
            embeddings=embeddings.reshape(-1, width).to(torch.bfloat16),
            cache=cache[0].to(torch.int64),
            path=path,
        )


def _unreadable_pt(path: Path, reason: str) -> VoiceError:
    return VoiceError(
        f"voice prompt {path} is not a readable .pt voice file ({reason}); use a file from the checkpoint's "
        f"voices.tgz or an audio (.wav) voice prompt"
    )


def _stored_tensor(state: object, key: str, path: Path) -> torch.Tensor:
    if not isinstance(state, dict) or not isinstance(state.get(key), torch.Tensor):
        keys = sorted(map(str, state)) if isinstance(state, dict) else type(state).__name__
        raise VoiceError(
            f"voice prompt {path} has no '{key}' tensor (found {keys}); a .pt voice holds 'embeddings' and "
            f"'cache'"
        )
    return state[key]


@dataclass(frozen=True, eq=False)
class VoiceAudio:
    """A voice prompt as audio, ready for Mimi: float32 mono 24 kHz, loudness-normalised to -24 LUFS."""

    pcm: np.ndarray  # float32 [T]
    path: Path | None = None

    @property
    def num_frames(self) -> int:
        """Model steps the prompt takes (the last 80 ms frame is zero-padded)."""
        return math.ceil(len(self.pcm) / FRAME_SAMPLES)

    @classmethod
    def load(cls, path: str | Path) -> VoiceAudio:
        """Read a WAV file, keep its first channel, resample to 24 kHz and normalise its loudness.

        Matches the published pipeline for 24 kHz mono input: samples scaled to [-1, 1) as float32, loudness
        measured on them, gain applied in float64 and the result rounded to float32 (what Mimi is fed).
        """
        path = Path(path)
        pcm, rate = read_wav(path)
        if rate != SAMPLE_RATE:
            pcm = soxr.resample(pcm, rate, SAMPLE_RATE, quality="VHQ").astype(np.float32)
        if not np.isfinite(pcm).all():
            raise VoiceError(f"voice prompt {path} contains NaN or infinite samples")
        try:
            measured = pyloudnorm.Meter(SAMPLE_RATE).integrated_loudness(pcm)
        except ValueError as exc:  # pyloudnorm needs at least one 400 ms gating block
            raise VoiceError(
                f"voice prompt {path} is too short ({len(pcm) / SAMPLE_RATE:.2f} s) to measure its loudness; "
                f"record a few seconds of speech"
            ) from exc
        if not math.isfinite(measured):
            raise VoiceError(f"voice prompt {path} is silent (loudness {measured} LUFS); record speech")
        normalised = pyloudnorm.normalize.loudness(pcm.astype(np.float64), measured, VOICE_LOUDNESS_LUFS)
        return cls(pcm=normalised.astype(np.float32), path=path)


def read_wav(path: str | Path) -> tuple[np.ndarray, int]:
    """First channel of a WAV file as float32 in [-1, 1], and its sample rate.

    Integer PCM (8/16/24/32-bit) is read with the stdlib `wave` module and scaled by 2^(bits-1); IEEE float
    and WAVE_FORMAT_EXTENSIBLE files, which `wave` refuses on Python 3.11, are read from their RIFF chunks.
    """
    path = Path(path)
    try:
        with wave.open(str(path), "rb") as wav:
            channels, width, rate = wav.getnchannels(), wav.getsampwidth(), wav.getframerate()
            raw = wav.readframes(wav.getnframes())
        fmt_tag = 1
    except wave.Error as exc:
        if "unknown format" not in str(exc):
            raise VoiceError(f"voice prompt {path} is not a readable WAV file ({exc})") from exc
        fmt_tag, channels, width, rate, raw = _read_riff(path)
    except (OSError, EOFError) as exc:
        raise VoiceError(f"cannot read voice prompt {path}: {exc}") from exc
    if channels < 1 or len(raw) < channels * width:
        raise VoiceError(f"voice prompt {path} holds no audio")
    raw = raw[: len(raw) - len(raw) % (channels * width)]
    samples = _decode_samples(raw, fmt_tag, width, path)
    return samples.reshape(-1, channels)[:, 0].copy(), rate


def _decode_samples(raw: bytes, fmt_tag: int, width: int, path: Path) -> np.ndarray:
    if fmt_tag == 3 and width in (4, 8):
        return np.frombuffer(raw, dtype=f"<f{width}").astype(np.float32)
    if fmt_tag == 1 and width == 1:  # 8-bit WAV is unsigned
        return (np.frombuffer(raw, dtype=np.uint8).astype(np.float32) - 128.0) / np.float32(128.0)
    if fmt_tag == 1 and width in (2, 4):
        ints = np.frombuffer(raw, dtype=f"<i{width}")
    elif fmt_tag == 1 and width == 3:
        # Put each 3-byte sample in the top of an int32 and shift back down to sign-extend it.
        padded = np.zeros((len(raw) // 3, 4), dtype=np.uint8)
        padded[:, 1:] = np.frombuffer(raw, dtype=np.uint8).reshape(-1, 3)
        ints = padded.view("<i4").ravel() >> 8
    else:
        raise VoiceError(
            f"voice prompt {path}: unsupported WAV encoding (format tag {fmt_tag}, {8 * width}-bit); use "
            f"16/24/32-bit PCM or 32/64-bit float"
        )
    return ints.astype(np.float32) / np.float32(2 ** (8 * width - 1))


def _read_riff(path: Path) -> tuple[int, int, int, int, bytes]:
    """(format tag, channels, bytes per sample, rate, data) of a float or extensible WAV (`wave` refuses)."""
    blob = path.read_bytes()
    if blob[:4] != b"RIFF" or blob[8:12] != b"WAVE":
        raise VoiceError(f"voice prompt {path} is not a WAV (RIFF/WAVE) file")
    fmt: tuple[int, int, int, int] | None = None
    pos = 12
    while pos + 8 <= len(blob):
        chunk_id, size = blob[pos : pos + 4], struct.unpack("<I", blob[pos + 4 : pos + 8])[0]
        body = blob[pos + 8 : pos + 8 + size]
        if chunk_id == b"fmt " and len(body) >= 16:
            tag, channels, rate, _, _, bits = struct.unpack("<HHIIHH", body[:16])
            # WAVE_FORMAT_EXTENSIBLE keeps the real format tag in the first bytes of its sub-format GUID.
            if tag == 0xFFFE and len(body) >= 26:
                tag = struct.unpack("<H", body[24:26])[0]
            fmt = (tag, channels, bits // 8, rate)
        elif chunk_id == b"data" and fmt is not None:
            tag, channels, width, rate = fmt
            return tag, channels, width, rate, body
        pos += 8 + size + (size & 1)  # chunks are padded to an even length
    raise VoiceError(f"voice prompt {path} has no fmt/data chunk; the WAV file is truncated or corrupt")


def list_voices(voices_dir: str | Path) -> list[str]:
    """Names of the voice prompts (`.pt` or `.wav`) in a directory, sorted, each once."""
    voices_dir = Path(voices_dir)
    if not voices_dir.is_dir():
        raise VoiceError(f"voices directory {voices_dir} does not exist")
    names = {entry.stem for entry in voices_dir.iterdir() if entry.suffix.lower() in VOICE_SUFFIXES}
    return sorted(names)


def load_voice(
    name_or_path: str | Path,
    voices_dir: str | Path | None,
    *,
    model_dim: int | None = None,
) -> VoiceEmbeddings | VoiceAudio:
    """Load a voice by bare name (from `voices_dir`, `.pt` preferred over `.wav`) or by path to a file.

    `model_dim` (the LM width) is checked against `.pt` voices, which only fit the model that made them.
    """
    text = str(name_or_path)
    if not text.strip():
        raise VoiceError("no voice given: name a voice (e.g. NATF2) or give a path to a .pt/.wav file")
    if _looks_like_path(text):
        path = Path(text).expanduser()
        if not path.is_file():
            raise VoiceError(f"voice prompt file {path} does not exist")
    else:
        path = _find_named_voice(text, voices_dir)
    suffix = path.suffix.lower()
    if suffix == ".pt":
        return VoiceEmbeddings.load(path, model_dim=model_dim)
    if suffix == ".wav":
        return VoiceAudio.load(path)
    raise VoiceError(f"voice prompt {path}: unsupported file type '{path.suffix}'; use a .pt or .wav file")


def _looks_like_path(text: str) -> bool:
    return "/" in text or "\\" in text or text.startswith("~") or Path(text).suffix.lower() in VOICE_SUFFIXES


def _find_named_voice(name: str, voices_dir: str | Path | None) -> Path:
    if voices_dir is None:
        raise VoiceError(f"voice '{name}' is a name but no voices directory is configured; give a file path")
    voices_dir = Path(voices_dir)
    for suffix in VOICE_SUFFIXES:
        candidate = voices_dir / f"{name}{suffix}"
        if candidate.is_file():
            return candidate
    available = ", ".join(list_voices(voices_dir)) or "none"
    raise VoiceError(
        f"unknown voice '{name}': no {name}.pt or {name}.wav in {voices_dir}. Available voices: {available} "
        f"(or give a path to a .pt/.wav file)"
    )
