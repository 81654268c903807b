"""Hyper-parameters of the PersonaPlex model (Mimi codec + dual-stream LM).

Defaults are the published `nvidia/personaplex-7b-v1`; a JSON file in the layout of the fixture's
`tiny_config.json` (`{"mimi": {...}, "lm": {...}}`) overrides them.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SAMPLE_RATE = 24_000
FRAME_SAMPLES = 1920  # 80 ms at 24 kHz: one model step
FRAME_S = FRAME_SAMPLES / SAMPLE_RATE  # 0.08 s: the one place the 80 ms frame is written down
CONTEXT_STEPS = 3000  # positions the published LM attends to; every prompt token takes one
N_CODEBOOKS = 8  # Mimi codebooks per audio stream used by the LM
TEXT_PAD = 3  # "no new word"; also the text fed during voice and silence phases


@dataclass(frozen=True)
class SEANetConfig:
    channels: int = 1
    dimension: int = 512
    n_filters: int = 64
    ratios: tuple[int, ...] = (8, 6, 5, 4)  # decoder order; the encoder uses them reversed
    kernel_size: int = 7
    last_kernel_size: int = 3
    residual_kernel_size: int = 3
    n_residual_layers: int = 1
    dilation_base: int = 2
    compress: int = 2


@dataclass(frozen=True)
class QuantizerConfig:
    dimension: int = 256  # codebook vector size
    n_q: int = 32  # codebooks in the checkpoint (1 semantic + n_q-1 acoustic)
    bins: int = 2048
    input_dimension: int = 512
    output_dimension: int = 512


@dataclass(frozen=True)
class MimiTransformerConfig:
    d_model: int = 512
    num_heads: int = 8
    num_layers: int = 8
    dim_feedforward: int = 2048
    context: int = 250
    max_period: float = 10_000.0


@dataclass(frozen=True)
class MimiConfig:
    sample_rate: int = SAMPLE_RATE
    frame_rate: float = 12.5
    num_codebooks: int = N_CODEBOOKS
    seanet: SEANetConfig = field(default_factory=SEANetConfig)
    quantizer: QuantizerConfig = field(default_factory=QuantizerConfig)
    transformer: MimiTransformerConfig = field(default_factory=MimiTransformerConfig)


@dataclass(frozen=True)
class LMConfig:
    dim: int = 4096
    num_heads: int = 32
    num_layers: int = 32
    hidden_scale: float = 4.125
    context: int = CONTEXT_STEPS
    max_period: float = 10_000.0
    text_card: int = 32_000
    card: int = 2048
    n_q: int = 16  # audio streams: 8 agent + 8 user
    dep_q: int = 16  # the published loader always builds 16 depformer steps
    depformer_dim: int = 1024
    depformer_num_heads: int = 16
    depformer_num_layers: int = 6
    depformer_dim_feedforward: int = 4224
    delays: tuple[int, ...] = (0, 0, 1, 1, 1, 1, 1, 1, 1, 0, 1, 1, 1, 1, 1, 1, 1)

    @property
    def num_streams(self) -> int:
        return self.n_q + 1

    @property
    def ffn_hidden(self) -> int:
        """Width of the SiLU-gated hidden layer (two thirds of dim_feedforward)."""
        return 2 * int(self.hidden_scale * self.dim) // 3

    @property
    def depformer_ffn_hidden(self) -> int:
        return 2 * self.depformer_dim_feedforward // 3

    @property
    def text_initial_token(self) -> int:
        return self.text_card

    @property
    def audio_initial_token(self) -> int:
        return self.card


@dataclass(frozen=True)
class ModelConfig:
    mimi: MimiConfig = field(default_factory=MimiConfig)
    lm: LMConfig = field(default_factory=LMConfig)

    @classmethod
    def from_json(cls, path: str | Path) -> ModelConfig:
        try:
            raw = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ValueError(f"cannot read model config {path}: {exc}") from exc
        return cls.from_dict(raw, source=str(path))

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "<dict>") -> ModelConfig:
        mimi_raw = raw.get("mimi", {})
        seanet = _pick(SEANetConfig, mimi_raw.get("seanet", {}), source, "mimi.seanet")
        quant = _pick(QuantizerConfig, mimi_raw.get("quantizer", {}), source, "mimi.quantizer")
        trans = _pick(MimiTransformerConfig, mimi_raw.get("transformer", {}), source, "mimi.transformer")
        mimi_top = {k: v for k, v in mimi_raw.items() if k not in ("seanet", "quantizer", "transformer")}
        if "num_codebooks_used" in mimi_top:
            mimi_top["num_codebooks"] = mimi_top.pop("num_codebooks_used")
        mimi = _pick(MimiConfig, mimi_top, source, "mimi", seanet=seanet, quantizer=quant, transformer=trans)
        lm_raw = dict(raw.get("lm", {}))
        # The published loader forces 16 depformer steps whatever the file says.
        lm_raw["dep_q"] = 16
        lm = _pick(LMConfig, lm_raw, source, "lm")
        if len(lm.delays) != lm.num_streams:
            raise ValueError(f"{source}: lm.delays has {len(lm.delays)} entries, expected {lm.num_streams}")
        return cls(mimi=mimi, lm=lm)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _pick(kind: type, raw: dict[str, Any], source: str, section: str, **extra: Any) -> Any:
    """Build dataclass `kind` from the keys of `raw` it knows; other keys describe the published
    architecture's fixed choices (norm type, gating, causal...) and are ignored."""
    names = {f.name for f in dataclasses.fields(kind)}
    kwargs: dict[str, Any] = {}
    for key, value in raw.items():
        if key in names and key not in extra:
            kwargs[key] = tuple(value) if isinstance(value, list) else value
    try:
        return kind(**kwargs, **extra)
    except TypeError as exc:
        raise ValueError(f"{source}: bad section '{section}': {exc}") from exc
