"""Mimi's split residual vector quantizer: one semantic codebook plus a residual stack of acoustic ones,
both reading the same latent, with nearest-neighbour search computed as the reference computes it."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from engine.config import QuantizerConfig
from engine.model.conv import conv_per_slot, nested

_USAGE_FLOOR = 1e-5  # clamp on cluster usage before dividing, as in training-time EMA codebooks


class Codebook(nn.Module):
    """One codebook stored as EMA statistics; the vectors are `embedding_sum / usage`."""

    def __init__(self, dim: int, bins: int) -> None:
        super().__init__()
        self.register_buffer("_initialized", torch.ones(1))
        self.register_buffer("cluster_usage", torch.ones(bins))
        self.register_buffer("embedding_sum", torch.zeros(bins, dim))
        # Derived from the two statistics above (zero sum / unit usage -> zero vectors until loaded).
        self.register_buffer("embedding", torch.zeros(bins, dim), persistent=False)
        self.register_load_state_dict_post_hook(lambda module, _incompatible: module.refresh())

    @torch.no_grad()
    def refresh(self) -> None:
        """Recompute the vectors from the statistics (after loading weights)."""
        usage = self.cluster_usage.clamp(min=_USAGE_FLOOR)
        self.embedding = self.embedding_sum / usage[:, None]

    def nearest(self, x: Tensor) -> Tensor:
        """x [B, T, dim] -> int64 [B, T]: index of the closest vector, first one on ties.

        torch.cdist takes the ||x||^2 + ||e||^2 - 2 x.e matrix-product route for a codebook this size, as
        in the reference; computing ||x - e|| directly would flip near-ties. On CPU each slot gets its own
        product (one GEMM over all slots rounds differently as the batch grows); on GPU one product."""
        codebook = self.embedding[None]
        if x.device.type != "cpu":
            flat = x.reshape(1, -1, x.shape[-1])
            return torch.cdist(flat, codebook, p=2)[0].argmin(dim=-1).view(x.shape[:-1])
        return torch.cdist(x, codebook.expand(x.shape[0], -1, -1), p=2).argmin(dim=-1)

    def lookup(self, codes: Tensor) -> Tensor:
        return F.embedding(codes, self.embedding)


class ResidualQuantizer(nn.Module):
    """1x1 input projection, residual VQ over the first `n` codebooks, 1x1 output projection."""

    def __init__(self, cfg: QuantizerConfig, num_layers: int) -> None:
        super().__init__()
        self.input_proj = nn.Conv1d(cfg.input_dimension, cfg.dimension, 1, bias=False)
        self.output_proj = nn.Conv1d(cfg.dimension, cfg.output_dimension, 1, bias=False)
        layers = [nested(_codebook=Codebook(cfg.dimension, cfg.bins)) for _ in range(num_layers)]
        self.vq = nested(layers=nn.ModuleList(layers))

    def codebook(self, index: int) -> Codebook:
        return self.vq.layers[index]._codebook

    def encode(self, latent: Tensor, n: int) -> Tensor:
        """latent [B, C, T] -> codes int64 [B, n, T]."""
        residual = conv_per_slot(self.input_proj, latent)
        codes = []
        for index in range(n):
            codebook = self.codebook(index)
            layer_codes = codebook.nearest(residual.transpose(1, 2))
            residual = residual - codebook.lookup(layer_codes).transpose(1, 2)
            codes.append(layer_codes)
        return torch.stack(codes, dim=1)

    def decode(self, codes: Tensor) -> Tensor:
        """codes [B, n, T] -> [B, C, T]: sum of the codebook vectors (in codebook order), projected."""
        total: Tensor | float = 0.0
        for index in range(codes.shape[1]):
            total = total + self.codebook(index).lookup(codes[:, index])
        assert isinstance(total, Tensor)
        return conv_per_slot(self.output_proj, total.transpose(1, 2))


class SplitResidualQuantizer(nn.Module):
    """Code 0 from the semantic quantizer (`rvq_first`), codes 1.. from the acoustic one (`rvq_rest`)."""

    def __init__(self, cfg: QuantizerConfig) -> None:
        super().__init__()
        if cfg.n_q < 2:
            raise ValueError(f"mimi quantizer n_q is {cfg.n_q}; it needs 1 semantic + at least 1 acoustic")
        self.rvq_first = ResidualQuantizer(cfg, 1)
        self.rvq_rest = ResidualQuantizer(cfg, cfg.n_q - 1)

    def encode(self, latent: Tensor, num_codebooks: int) -> Tensor:
        """latent [B, C, T] -> codes int64 [B, num_codebooks, T]."""
        semantic = self.rvq_first.encode(latent, 1)
        acoustic = self.rvq_rest.encode(latent, num_codebooks - 1)
        return torch.cat([semantic, acoustic], dim=1)

    def decode(self, codes: Tensor) -> Tensor:
        """codes [B, K, T] -> latent [B, C, T]."""
        return self.rvq_first.decode(codes[:, :1]) + self.rvq_rest.decode(codes[:, 1:])
