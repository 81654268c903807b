"""The Mimi neural audio codec (24 kHz PCM <-> 8 codebooks at 12.5 Hz), streamed one 80 ms frame per call
for a batch of independent slots.

On CPU every slot's codes and audio are bit-identical to the published streaming code run on that slot
alone (same kernels, same reduction order); on GPU the batched kernels are chosen for speed instead."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace

import torch
from torch import Tensor, nn

from engine.config import MimiConfig
from engine.model.conv import (
    CausalConv1d,
    CausalConvTranspose1d,
    ConvState,
    ConvTransposeState,
    SEANetDecoder,
    SEANetEncoder,
    StreamState,
    nested,
)
from engine.model.mimi_transformer import KVRing, MimiTransformer
from engine.model.quantizer import SplitResidualQuantizer

__all__ = ["Mimi", "MimiState"]


@dataclass
class MimiState:
    """All streaming state of `batch` slots, encoder and decoder side; fixed size for the whole call.
    Dimension 0 of every tensor is the slot."""

    encoder: list[StreamState]
    encoder_transformer: KVRing
    downsample: ConvState
    upsample: ConvTransposeState
    decoder_transformer: KVRing
    decoder: list[StreamState]

    @property
    def batch(self) -> int:
        return self.downsample.tail.shape[0]

    def tensors(self) -> list[Tensor]:
        """Every state tensor, slot-major (for copying, comparing or snapshotting slots)."""
        found: list[Tensor] = []
        for part in fields(self):
            _collect(getattr(self, part.name), found)
        return found

    def rows(self, start: int, stop: int) -> MimiState:
        """A view of slots [start, stop): a step over it updates those slots in place and no others."""
        return _rows(self, slice(start, stop))


def _collect(item: object, found: list[Tensor]) -> None:
    if isinstance(item, Tensor):
        found.append(item)
    elif isinstance(item, list):
        for element in item:
            _collect(element, found)
    elif item is not None:
        for part in fields(item):  # type: ignore[arg-type]
            _collect(getattr(item, part.name), found)


def _rows(item: object, rows: slice) -> object:
    if isinstance(item, Tensor):
        return item[rows]
    if isinstance(item, list):
        return [_rows(element, rows) for element in item]
    if item is None:
        return None
    parts = {part.name: _rows(getattr(item, part.name), rows) for part in fields(item)}  # type: ignore[arg-type]
    return replace(item, **parts)  # type: ignore[type-var]


class Mimi(nn.Module):
    """Mimi codec whose state-dict keys are exactly the published checkpoint's.

    Load weights with `model.load_state_dict(safetensors.torch.load_file(path), strict=True)`.
    """

    def __init__(self, cfg: MimiConfig) -> None:
        super().__init__()
        self.cfg = cfg
        seanet = cfg.seanet
        hop = math.prod(seanet.ratios)  # waveform samples per latent frame out of SEANet (25 Hz)
        stride = round(cfg.sample_rate / hop / cfg.frame_rate)  # latent frames per code frame
        if stride < 1 or stride * cfg.frame_rate * hop != cfg.sample_rate:
            raise ValueError(
                f"mimi config: SEANet hop {hop} at {cfg.sample_rate} Hz does not divide into frames of "
                f"{cfg.frame_rate} Hz; fix seanet.ratios or frame_rate"
            )
        if cfg.transformer.d_model != seanet.dimension:
            raise ValueError(
                f"mimi config: transformer.d_model {cfg.transformer.d_model} must equal seanet.dimension "
                f"{seanet.dimension} (input/output projections are not implemented)"
            )
        if not 1 < cfg.num_codebooks <= cfg.quantizer.n_q:
            raise ValueError(f"mimi config: num_codebooks {cfg.num_codebooks} not in 2..{cfg.quantizer.n_q}")
        self._frame_samples = hop * stride
        dim = seanet.dimension
        self.encoder = SEANetEncoder(seanet)
        self.decoder = SEANetDecoder(seanet)
        self.encoder_transformer = nested(transformer=MimiTransformer(cfg.transformer))
        self.decoder_transformer = nested(transformer=MimiTransformer(cfg.transformer))
        # 25 -> 12.5 Hz and back: a learnt strided conv (replicate-padded) and a depthwise transposed conv.
        self.downsample = nested(
            conv=CausalConv1d(dim, dim, 2 * stride, stride=stride, bias=False, pad_mode="replicate")
        )
        self.upsample = nested(
            convtr=CausalConvTranspose1d(dim, dim, 2 * stride, stride, groups=dim, bias=False)
        )
        self.quantizer = SplitResidualQuantizer(cfg.quantizer)

    @property
    def frame_samples(self) -> int:
        return self._frame_samples

    @property
    def num_codebooks(self) -> int:
        return self.cfg.num_codebooks

    def _device(self, device: torch.device | str | None) -> torch.device:
        if device is not None:
            return torch.device(device)
        return next(self.parameters()).device

    def init_state(self, batch: int, device: torch.device | str | None = None) -> MimiState:
        dev = self._device(device)
        return MimiState(
            encoder=self.encoder.init_state(batch, dev),
            encoder_transformer=self.encoder_transformer.transformer.init_state(batch, dev),
            downsample=self.downsample.conv.init_state(batch, dev),
            upsample=self.upsample.convtr.init_state(batch, dev),
            decoder_transformer=self.decoder_transformer.transformer.init_state(batch, dev),
            decoder=self.decoder.init_state(batch, dev),
        )

    @torch.no_grad()
    def reset(self, state: MimiState, mask: Tensor) -> None:
        """Return the slots where `mask` (bool [batch]) is True to the just-constructed state, in place."""
        mask = self._check_mask(mask, state, "reset mask")
        self.encoder.reset_state(state.encoder, mask)
        self.encoder_transformer.transformer.reset_state(state.encoder_transformer, mask)
        self.downsample.conv.reset_state(state.downsample, mask)
        self.upsample.convtr.reset_state(state.upsample, mask)
        self.decoder_transformer.transformer.reset_state(state.decoder_transformer, mask)
        self.decoder.reset_state(state.decoder, mask)

    @torch.no_grad()
    def encode_step(self, pcm: Tensor, state: MimiState, active: Tensor | None = None) -> Tensor:
        """pcm float32 [batch, frame_samples] -> codes int64 [batch, num_codebooks].

        Slots where `active` is False keep their state bit for bit; their codes are meaningless."""
        if pcm.dim() != 2 or pcm.shape != (state.batch, self.frame_samples):
            raise ValueError(
                f"mimi encode_step: pcm must be [{state.batch}, {self.frame_samples}], got {list(pcm.shape)}"
            )
        active = None if active is None else self._check_mask(active, state, "active mask")
        latent = self.encoder.step(pcm[:, None, :], state.encoder, active)
        latent = self.encoder_transformer.transformer.step(latent, state.encoder_transformer, active)
        latent = self.downsample.conv.step(latent, state.downsample, active)
        return self.quantizer.encode(latent, self.num_codebooks)[:, :, 0]

    @torch.no_grad()
    def decode_step(self, codes: Tensor, state: MimiState, active: Tensor | None = None) -> Tensor:
        """codes int64 [batch, num_codebooks] -> pcm float32 [batch, frame_samples].

        Slots where `active` is False keep their state bit for bit; their pcm is meaningless."""
        if codes.dim() != 2 or codes.shape != (state.batch, self.num_codebooks):
            raise ValueError(
                f"mimi decode_step: codes must be [{state.batch}, {self.num_codebooks}], "
                f"got {list(codes.shape)}"
            )
        active = None if active is None else self._check_mask(active, state, "active mask")
        latent = self.quantizer.decode(codes[:, :, None])
        latent = self.upsample.convtr.step(latent, state.upsample, active)
        latent = self.decoder_transformer.transformer.step(latent, state.decoder_transformer, active)
        return self.decoder.step(latent, state.decoder, active)[:, 0, :]

    @torch.no_grad()
    def encode(self, pcm: Tensor) -> Tensor:
        """Whole signals pcm [B, T] -> codes [B, num_codebooks, ceil(T / frame_samples)], streamed from a
        fresh state; the last frame is zero-padded."""
        frames = -(-pcm.shape[-1] // self.frame_samples)
        padded = torch.nn.functional.pad(pcm, (0, frames * self.frame_samples - pcm.shape[-1]))
        state = self.init_state(pcm.shape[0], pcm.device)
        chunks = padded.view(pcm.shape[0], frames, self.frame_samples)
        codes = [self.encode_step(chunks[:, i], state) for i in range(frames)]
        return torch.stack(codes, dim=-1)

    @torch.no_grad()
    def decode(self, codes: Tensor) -> Tensor:
        """codes [B, num_codebooks, F] -> pcm [B, F * frame_samples], streamed from a fresh state."""
        state = self.init_state(codes.shape[0], codes.device)
        pcm = [self.decode_step(codes[:, :, i], state) for i in range(codes.shape[-1])]
        return torch.cat(pcm, dim=-1)

    def _check_mask(self, mask: Tensor, state: MimiState, what: str) -> Tensor:
        if mask.dtype != torch.bool or mask.shape != (state.batch,):
            raise ValueError(
                f"mimi {what}: expected bool [{state.batch}], got {mask.dtype} {list(mask.shape)}"
            )
        return mask
