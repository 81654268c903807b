"""Transformer building blocks of the PersonaPlex LM: RMSNorm, interleaved RoPE, SiLU gating and
attention over a per-slot KV ring.

Numerics follow the published model exactly (engine-spec §3.4, §7): RMSNorm in float32 with eps 1e-8,
RoPE angles and rotation in float32 on interleaved pairs, scaled_dot_product_attention with a boolean mask.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-8) -> None:
        super().__init__()
        self.eps = eps
        self.alpha = nn.Parameter(torch.ones(1, 1, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        scale = self.alpha.float() * torch.rsqrt(x32.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return (x32 * scale).to(x.dtype)


class Gating(nn.Module):
    """SwiGLU feed-forward: the first half of `linear_in` gates the second half."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.linear_in = nn.Linear(dim, 2 * hidden, bias=False)
        self.linear_out = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, value = self.linear_in(x).unflatten(-1, (2, -1)).unbind(-2)
        return self.linear_out(F.silu(gate) * value)


Rope = tuple[torch.Tensor, torch.Tensor]  # cos, sin [B, 1, T, Dh/2] of the rotary angles


def rope_rotation(positions: torch.Tensor, head_dim: int, max_period: float) -> Rope:
    """The rotary angles of absolute positions [B, T], for the LM and Mimi's transformers alike: float32
    frequencies from one `exp`, float32 positions, one product, as the reference computes them, so the
    angles agree bit for bit. Built per call, never held as a buffer: Module.to(bfloat16) would round a
    buffer, and bf16 frequencies break bit-exactness from position 2 on."""
    pair = torch.arange(head_dim // 2, dtype=torch.float32, device=positions.device)
    freqs = torch.exp(pair * (-math.log(max_period) * 2 / head_dim))
    angles = positions.to(torch.float32)[:, None, :, None] * freqs  # [B, 1, T, Dh/2]
    return torch.cos(angles), torch.sin(angles)


def apply_rope(x: torch.Tensor, rope: Rope) -> torch.Tensor:
    """Rotate interleaved pairs (2i, 2i+1) of x [B, H, T, Dh] as complex numbers, in float32."""
    cos, sin = rope
    real, imag = x.float().unflatten(-1, (-1, 2)).unbind(-1)
    rotated = torch.stack((real * cos - imag * sin, real * sin + imag * cos), dim=-1)
    return rotated.flatten(-2).to(x.dtype)


def ring_mask(query_pos: torch.Tensor, key_pos: torch.Tensor, context: int) -> torch.Tensor:
    """Which ring entries each query may see: [B, T] x [B, C] -> bool [B, 1, T, C].

    A query sees keys no later than itself and at most `context - 1` steps back: the published code
    hides the oldest entry of a full ring, and we reproduce that so long calls stay identical.
    """
    delta = query_pos[:, :, None] - key_pos[:, None, :]
    visible = (key_pos[:, None, :] >= 0) & (delta >= 0) & (delta < context - 1)
    return visible[:, None]


class KVRing:
    """Keys and values of one attention stack for `batch` slots: [layers, B, H, C, Dh] plus the absolute
    position held by each ring entry ([B, C], -1 when empty). Entry for position p lives at p % C."""

    def __init__(
        self,
        layers: int,
        batch: int,
        heads: int,
        capacity: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | None = None,
    ) -> None:
        shape = (layers, batch, heads, capacity, head_dim)
        self.keys = torch.zeros(shape, dtype=dtype, device=device)
        self.values = torch.zeros(shape, dtype=dtype, device=device)
        self.positions = torch.full((batch, capacity), -1, dtype=torch.long, device=device)
        self.capacity = capacity
        self.visible = capacity  # ring entries attention looks at (all, unless only a prefix is filled)

    def rows(self, start: int, stop: int, visible: int | None = None) -> KVRing:
        """A view of slots [start, stop): writes through it land in this ring. With `visible`, attention
        only looks at the first `visible` entries: for a prompt that fills the ring from 0 without wrapping,
        the rest is empty and masked anyway, so skipping it changes no result."""
        view = KVRing.__new__(KVRing)
        view.keys, view.values = self.keys[:, start:stop], self.values[:, start:stop]
        view.positions, view.capacity = self.positions[start:stop], self.capacity
        view.visible = self.capacity if visible is None else visible
        return view

    def attended(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.keys[layer][:, :, : self.visible], self.values[layer][:, :, : self.visible]

    def reset(self, slot: int) -> None:
        """Empty the ring of one slot (its keys and values are then never looked at)."""
        self.positions[slot] = -1

    def record_positions(self, positions: torch.Tensor, active: torch.Tensor | None) -> torch.Tensor:
        """Mark ring entries for positions [B, T] as written (rows with active False untouched);
        returns the ring indices [B, T]."""
        index = positions % self.capacity
        rows = torch.arange(positions.shape[0], device=positions.device)[:, None].expand_as(index)
        new = (
            positions
            if active is None
            else torch.where(active[:, None], positions, self.positions[rows, index])
        )
        self.positions[rows, index] = new
        return index

    def write(
        self, layer: int, index: torch.Tensor, k: torch.Tensor, v: torch.Tensor, active: torch.Tensor | None
    ) -> None:
        """Store k, v [B, H, T, Dh] at ring indices [B, T] of `layer`."""
        rows = torch.arange(index.shape[0], device=index.device)[:, None].expand_as(index)
        for cache, new in ((self.keys[layer], k), (self.values[layer], v)):
            new = new.transpose(1, 2)  # [B, T, H, Dh], the layout of cache[rows, :, index]
            if active is not None:
                new = torch.where(active[:, None, None, None], new, cache[rows, :, index])
            cache[rows, :, index] = new


class RingSelfAttention(nn.Module):
    """Causal self-attention whose keys live in a KVRing. Weight names match the checkpoint."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * dim, dim))
        self.out_proj = nn.Linear(dim, dim, bias=False)

    def forward(
        self,
        x: torch.Tensor,
        ring: KVRing,
        layer: int,
        index: torch.Tensor,
        mask: torch.Tensor,
        rope: Rope,
        active: torch.Tensor | None,
    ) -> torch.Tensor:
        batch, steps, dim = x.shape
        qkv = F.linear(x, self.in_proj_weight).view(batch, steps, 3, self.num_heads, -1)
        q, k, v = (t.transpose(1, 2) for t in qkv.unbind(2))  # [B, H, T, Dh]
        q, k = apply_rope(q, rope), apply_rope(k, rope)
        ring.write(layer, index, k, v, active)
        keys, values = ring.attended(layer)
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)
        return self.out_proj(out.transpose(1, 2).reshape(batch, steps, dim))


class TemporalLayer(nn.Module):
    def __init__(self, dim: int, num_heads: int, ffn_hidden: int) -> None:
        super().__init__()
        self.norm1 = RMSNorm(dim)
        self.self_attn = RingSelfAttention(dim, num_heads)
        self.norm2 = RMSNorm(dim)
        self.gating = Gating(dim, ffn_hidden)

    def forward(self, x: torch.Tensor, **attn: object) -> torch.Tensor:
        x = x + self.self_attn(self.norm1(x), **attn)
        return x + self.gating(self.norm2(x))


class DepformerLayer(nn.Module):
    """A depformer layer: every sub-step k has its own slice of the attention projections and its own
    gating module; attention runs over the sub-steps of the current frame only, without positions."""

    def __init__(self, dim: int, num_heads: int, ffn_hidden: int, steps: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.norm1 = RMSNorm(dim)
        self.self_attn = nn.Module()
        self.self_attn.in_proj_weight = nn.Parameter(torch.empty(steps * 3 * dim, dim))
        self.self_attn.out_proj = nn.Linear(dim, steps * dim, bias=False)
        self.norm2 = RMSNorm(dim)
        self.gating = nn.ModuleList(Gating(dim, ffn_hidden) for _ in range(steps))

    def forward(
        self, x: torch.Tensor, step: int, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        """x [B, 1, D] at sub-step `step`; keys/values [B, H, S, Dh] hold this frame's sub-steps."""
        batch, _, dim = x.shape
        h = self.norm1(x)
        w_in = self.self_attn.in_proj_weight[step * 3 * dim : (step + 1) * 3 * dim]
        w_out = self.self_attn.out_proj.weight[step * dim : (step + 1) * dim]
        q, k, v = F.linear(h, w_in).view(batch, 1, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        keys[:, :, step : step + 1] = k
        values[:, :, step : step + 1] = v
        attn = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)
        x = x + F.linear(attn.transpose(1, 2).reshape(batch, 1, dim), w_out)
        return x + self.gating[step](self.norm2(x))
