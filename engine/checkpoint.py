"""Building the models from checkpoint files, and writing small random checkpoints in the same format.

Loading builds Mimi and the LM on the `meta` device, reads each safetensors file with its every name and
shape checked, and assigns the tensors (no second copy of 17 GB of weights). The random checkpoint
(`duplexgate engine init-random DIR`) has the published file names and layout, so the whole pipeline runs
on a fresh machine; its audio is noise.
"""

from __future__ import annotations

import io
import json
import logging
import math
from pathlib import Path

import numpy as np
import torch

from engine.config import FRAME_SAMPLES, SAMPLE_RATE, ModelConfig
from engine.loading import (
    CONFIG_FILE,
    LM_FILE,
    MIMI_FILE,
    TEXT_TOKENIZER_FILE,
    VOICES_DIR,
    CheckpointFiles,
    load_safetensors_checked,
)
from engine.model.lm import LMModel
from engine.model.mimi import Mimi

log = logging.getLogger(__name__)

RANDOM_VOICE = "demo"
NOISE_NOTICE = (
    "this is a RANDOM demo checkpoint: the agent's audio is noise and its text is gibberish; "
    "point the engine at the PersonaPlex weights (nvidia/personaplex-7b-v1) for a real agent"
)

# The fixture's tiny sizes: the published architecture, small enough for CPU tests.
TINY_SIZES = {
    "mimi": {
        "seanet": {"dimension": 32, "n_filters": 4},
        "quantizer": {"dimension": 16, "n_q": 16, "input_dimension": 32, "output_dimension": 32},
        "transformer": {"d_model": 32, "num_heads": 2, "num_layers": 2, "dim_feedforward": 64},
    },
    "lm": {
        "dim": 64,
        "num_heads": 4,
        "num_layers": 2,
        "depformer_dim": 32,
        "depformer_num_heads": 2,
        "depformer_num_layers": 2,
        "depformer_dim_feedforward": 132,
    },
}


def load_models(files: CheckpointFiles, cfg: ModelConfig, device: torch.device) -> tuple[LMModel, Mimi]:
    """LM in bf16 and Mimi in fp32 on `device`, from checked checkpoint files."""
    with torch.device("meta"):  # 17 GB of LM weights: build the shell only, then adopt the loaded tensors
        lm = LMModel(cfg.lm)
    mimi = Mimi(cfg.mimi)  # small; built for real so its derived codebook vectors are recomputed on load
    for module, path, what, dtype in (
        (lm, files.lm, "LM", torch.bfloat16),
        (mimi, files.mimi, "Mimi", torch.float32),
    ):
        expected = {name: tuple(t.shape) for name, t in module.state_dict().items()}
        tensors = load_safetensors_checked(path, expected, what, dtype=dtype, device="cpu")
        module.load_state_dict(tensors, strict=True, assign=module is lm)
    return lm.to(device).eval(), mimi.to(device).eval()


# ---- random checkpoints --------------------------------------------------------------------------------


def tiny_config(text_card: int) -> ModelConfig:
    raw = json.loads(json.dumps(TINY_SIZES))
    raw["lm"]["text_card"] = text_card
    return ModelConfig.from_dict(raw, source="tiny preset")


def write_random_checkpoint(directory: str | Path, size: str = "tiny", seed: int = 0) -> Path:
    """Write a deterministic random checkpoint in the published format to `directory`."""
    if size != "tiny":
        raise ValueError(f"unknown size '{size}': only 'tiny' is available")
    out = Path(directory)
    (out / VOICES_DIR).mkdir(parents=True, exist_ok=True)
    tokenizer_path = out / TEXT_TOKENIZER_FILE
    text_card = _train_tokenizer(tokenizer_path)
    cfg = tiny_config(text_card)
    lm, mimi = LMModel(cfg.lm), Mimi(cfg.mimi)
    randomise(lm, seed)
    randomise(mimi, seed + 1)
    lm = lm.to(torch.bfloat16)
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in lm.state_dict().items()}, str(out / LM_FILE))
    save_file({k: v.contiguous() for k, v in mimi.state_dict().items()}, str(out / MIMI_FILE))
    (out / CONFIG_FILE).write_text(json.dumps({"note": NOISE_NOTICE, **cfg.to_dict()}, indent=1))
    _write_voice(out / VOICES_DIR / f"{RANDOM_VOICE}.wav", seed)
    return out


@torch.no_grad()
def randomise(module: torch.nn.Module, seed: int) -> None:
    """Fill every checkpoint tensor in place, on its own device: unit norms, zero biases, LayerScale 0.1,
    unit codebook usage, and 1/sqrt(fan_in)-scaled normals for matrices, so activations stay in range."""
    device = next(module.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    for name, tensor in module.state_dict(keep_vars=True).items():
        leaf = name.rsplit(".", 1)[-1]
        if leaf in ("alpha", "weight") and "norm" in name:
            tensor.fill_(1.0)
        elif leaf == "bias":
            tensor.zero_()
        elif leaf == "scale":  # LayerScale
            tensor.fill_(0.1)
        elif leaf in ("cluster_usage", "_initialized"):
            tensor.fill_(1.0)
        elif leaf == "embedding_sum":
            tensor.copy_(torch.randn(tensor.shape, generator=generator, device=device))
        elif tensor.dim() >= 2:
            fan_in = math.prod(tensor.shape[1:])
            noise = torch.randn(tensor.shape, generator=generator, device=device)
            tensor.copy_(noise.div_(math.sqrt(fan_in)))
        else:
            raise ValueError(f"randomise: no init rule for checkpoint tensor '{name}'; add one")


_TOKENIZER_TEXT = """\
You work for CitySan Services which is a waste management company and your name is Ayelen Lucero.
You are a wise and friendly teacher. Answer questions or provide advice in a clear and engaging way.
<system> You enjoy having a good conversation. <system>
Information: the pickup is on Monday at 9 AM and costs $89.
Hello, thank you for calling. How can I help you today? Let me check that for you. One moment please.
Your appointment is confirmed for Tuesday afternoon. Is there anything else I can help you with?
"""


def _train_tokenizer(path: Path) -> int:
    """A small SentencePiece model with the published special ids (0 unk, 1 <s>, 2 </s>, 3 <pad>)."""
    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_TOKENIZER_TEXT.splitlines() * 4),
        model_writer=model,
        vocab_size=160,
        model_type="unigram",
        character_coverage=1.0,
        hard_vocab_limit=False,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=3,
        num_threads=1,
        minloglevel=2,
    )
    path.write_bytes(model.getvalue())
    return spm.SentencePieceProcessor(model_file=str(path)).get_piece_size()


def _write_voice(path: Path, seed: int) -> None:
    """1.5 s of a gliding two-tone hum as the demo voice prompt (16-bit WAV, 24 kHz)."""
    import wave

    rng = np.random.default_rng(seed)
    t = np.arange(int(1.5 * SAMPLE_RATE)) / SAMPLE_RATE
    pitch = 140 + 40 * t
    pcm = 0.3 * np.sin(2 * np.pi * np.cumsum(pitch) / SAMPLE_RATE) + 0.02 * rng.standard_normal(t.size)
    pcm = pcm[: (len(pcm) // FRAME_SAMPLES) * FRAME_SAMPLES + FRAME_SAMPLES // 2]
    with wave.open(str(path), "wb") as wav:
        wav.setnchannels(1)
        wav.setsampwidth(2)
        wav.setframerate(SAMPLE_RATE)
        wav.writeframes((np.clip(pcm, -1, 1) * 32767).astype("<i2").tobytes())
