"""Run one conversation from a WAV file, as the published offline script does, with its output format.

The output follows the reference's conventions: the first frame is the last prompt frame (PAD text, agent
silence), then one frame per 80 ms of input; audio is trimmed to the input's length; `live_out` holds the
17 tokens of every frame; the text list has one piece per frame ("PAD"/"EPAD" for ids 3/0).
"""

from __future__ import annotations

import json
import wave
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from engine.api import FRAME_SAMPLES, SAMPLE_RATE, Sampling
from engine.checkpoint import load_models
from engine.loading import CheckpointFiles, encode_role_prompt, load_text_tokenizer
from engine.prompt import TEXT_EPAD, TEXT_PAD
from engine.runner import BatchRunner, prompt_frame_tokens
from engine.voices import load_voice, read_wav


@dataclass
class OfflineResult:
    pcm: np.ndarray  # float32 [input samples]
    tokens: np.ndarray  # int64 [frames, 17]
    text: list[str]  # one piece per frame


def read_input(path: str | Path) -> np.ndarray:
    """Caller audio as float32 mono 24 kHz (first channel; resampled if needed)."""
    pcm, rate = read_wav(path)
    if rate != SAMPLE_RATE:
        import soxr

        pcm = soxr.resample(pcm, rate, SAMPLE_RATE, quality="VHQ").astype(np.float32)
    return pcm


def run_offline(
    files: CheckpointFiles,
    voice: str,
    prompt: str,
    pcm: np.ndarray,
    sampling: Sampling | None = None,
    seed: int = 0,
    device: torch.device | str = "cpu",
) -> OfflineResult:
    cfg = files.model_config()
    tokenizer = load_text_tokenizer(files.tokenizer)
    lm, mimi = load_models(files, cfg, torch.device(device))
    runner = BatchRunner(lm, mimi, capacity=1)
    source = runner.voice_source(load_voice(voice, files.voices_dir, model_dim=cfg.lm.dim))
    plan = runner.plan(source, encode_role_prompt(tokenizer, prompt))
    runner.configure(0, sampling or Sampling(), seed)
    prefill = runner.prefill(0, plan)

    frames = -(-len(pcm) // FRAME_SAMPLES)
    padded = np.zeros(frames * FRAME_SAMPLES, dtype=np.float32)
    padded[: len(pcm)] = pcm
    chunks = torch.from_numpy(padded).view(frames, 1, FRAME_SAMPLES).to(lm.device)
    active = torch.ones(1, dtype=torch.bool)
    audio, rows = [prefill.first_pcm.cpu()], [torch.tensor(prompt_frame_tokens())]
    # Output frame i answers input frame i-1, so the last input frame is never needed.
    for i in range(frames - 1):
        result = runner.step(chunks[i], active)
        audio.append(result.pcm[0].cpu())
        rows.append(result.tokens[0].cpu())
    tokens = torch.stack(rows).numpy().astype(np.int64)
    text = [_piece_label(tokenizer, int(t)) for t in tokens[:, 0]]
    out = torch.cat(audio).numpy()[: len(pcm)]
    return OfflineResult(out, tokens, text)


def _piece_label(tokenizer, token: int) -> str:
    if token == TEXT_PAD:
        return "PAD"
    if token == TEXT_EPAD:
        return "EPAD"
    return tokenizer.id_to_piece(token).replace("\u2581", " ")


def write_outputs(
    result: OfflineResult, wav_path: Path | None, text_path: Path | None, npz_path: Path | None
) -> None:
    if wav_path is not None:
        write_wav(wav_path, result.pcm)
    if text_path is not None:
        text_path.write_text(json.dumps(result.text, ensure_ascii=False))
    if npz_path is not None:
        np.savez(npz_path, live_out=result.tokens)


def write_wav(path: str | Path, pcm: np.ndarray, rate: int = SAMPLE_RATE) -> None:
    """16-bit mono WAV; like the reference writer: clip to [-1, 1], scale by 32767, truncate."""
    samples = (np.clip(pcm, -1.0, 1.0) * 32767).astype("<i2")
    with wave.open(str(path), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(rate)
        out.writeframes(samples.tobytes())
