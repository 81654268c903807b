"""The small causal transformers inside Mimi (one after the encoder, one before the decoder), streamed
with a per-slot KV ring that reproduces the published code's attention window exactly."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from engine.config import MimiTransformerConfig
from engine.model.layers import Rope, apply_rope, rope_rotation


@dataclass
class KVRing:
    """Keys/values of every layer for B slots, in a ring of `context` entries per slot."""

    keys: list[Tensor]  # per layer [B, heads, context, head_dim]; latent frame p sits at slot p % context
    values: list[Tensor]  # same layout as keys
    frames: Tensor  # int64 [B]: latent frames written since reset (also the RoPE position of the next one)


def linear_per_slot(x: Tensor, weight: Tensor) -> Tensor:
    """x [B, T, C] @ weight.T without bias.

    On CPU this runs one GEMM per slot: a single GEMM over all B*T rows rounds differently as B changes,
    and the reference ran one slot. On GPU one batched GEMM (no bit-compatibility is possible there)."""
    if x.device.type != "cpu":
        return F.linear(x, weight)
    return torch.bmm(x, weight.t().expand(x.shape[0], -1, -1))


class LayerScale(nn.Module):
    """Learned per-channel gain on a residual branch."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.full((channels,), 0.01))

    def forward(self, x: Tensor) -> Tensor:
        return self.scale * x


def visible_slots(frames_before: Tensor, steps: int, context: int) -> Tensor:
    """Bool [B, 1, steps, context]: which ring slots each new query may attend to.

    After writing, a slot i holds the latest frame congruent to i (mod context), except that, like the
    published code, the slot about to be overwritten next is labelled with a future position and so hidden:
    once the ring is full a query sees at most context - 1 frames."""
    device = frames_before.device
    written = (frames_before + steps).view(-1, 1, 1, 1)
    slots = torch.arange(context, device=device).view(1, 1, 1, -1)
    label = written - torch.remainder(written - slots, context)
    query = frames_before.view(-1, 1, 1, 1) + torch.arange(steps, device=device).view(1, 1, -1, 1)
    age = query - label
    return (label >= 0) & (age >= 0) & (age < context)


class MimiSelfAttention(nn.Module):
    """Multi-head causal self-attention with a fused [q; k; v] projection and RoPE, no biases."""

    def __init__(self, d_model: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = d_model // num_heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * d_model, d_model))
        self.out_proj = nn.Linear(d_model, d_model, bias=False)
        nn.init.xavier_uniform_(self.in_proj_weight)

    def forward(
        self,
        x: Tensor,
        keys: Tensor,
        values: Tensor,
        write_at: Tensor,
        visible: Tensor,
        rope: Rope,
        active: Tensor | None,
    ) -> Tensor:
        """x [B, T, C]; keys/values [B, H, context, D] of this layer, updated in place at `write_at`
        (int64 [B, H, T, D] slot indexes) for active slots only."""
        batch, steps, _ = x.shape
        qkv = linear_per_slot(x, self.in_proj_weight).view(batch, steps, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        q, k = apply_rope(q, rope), apply_rope(k, rope)
        if active is not None:
            # Inactive slots write back what their ring already holds, leaving it bit-identical.
            keep = ~active.view(-1, 1, 1, 1)
            k = torch.where(keep, keys.gather(2, write_at), k)
            v = torch.where(keep, values.gather(2, write_at), v)
        keys.scatter_(2, write_at, k)
        values.scatter_(2, write_at, v)
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=visible)
        return linear_per_slot(out.transpose(1, 2).reshape(batch, steps, -1), self.out_proj.weight)


class MimiTransformerLayer(nn.Module):
    """Pre-norm layer: LayerNorm -> attention -> LayerScale, LayerNorm -> GELU FFN -> LayerScale."""

    def __init__(self, cfg: MimiTransformerConfig) -> None:
        super().__init__()
        self.self_attn = MimiSelfAttention(cfg.d_model, cfg.num_heads)
        self.norm1 = nn.LayerNorm(cfg.d_model, eps=1e-5)
        self.norm2 = nn.LayerNorm(cfg.d_model, eps=1e-5)
        self.linear1 = nn.Linear(cfg.d_model, cfg.dim_feedforward, bias=False)
        self.linear2 = nn.Linear(cfg.dim_feedforward, cfg.d_model, bias=False)
        self.layer_scale_1 = LayerScale(cfg.d_model)
        self.layer_scale_2 = LayerScale(cfg.d_model)

    def forward(self, x: Tensor, *attn_args: object) -> Tensor:
        x = x + self.layer_scale_1(self.self_attn(self.norm1(x), *attn_args))
        hidden = F.gelu(linear_per_slot(self.norm2(x), self.linear1.weight))
        return x + self.layer_scale_2(linear_per_slot(hidden, self.linear2.weight))


class MimiTransformer(nn.Module):
    """Stack of layers on [B, C, T] latents (conv layout in and out), streamed frame-chunk by chunk."""

    def __init__(self, cfg: MimiTransformerConfig) -> None:
        super().__init__()
        if cfg.d_model % cfg.num_heads:
            raise ValueError(
                f"mimi transformer: d_model {cfg.d_model} not divisible by {cfg.num_heads} heads"
            )
        self.cfg = cfg
        self.layers = nn.ModuleList([MimiTransformerLayer(cfg) for _ in range(cfg.num_layers)])

    @property
    def head_dim(self) -> int:
        return self.cfg.d_model // self.cfg.num_heads

    def init_state(self, batch: int, device: torch.device) -> KVRing:
        shape = (batch, self.cfg.num_heads, self.cfg.context, self.head_dim)
        layers = range(self.cfg.num_layers)
        return KVRing(
            keys=[torch.zeros(shape, device=device) for _ in layers],
            values=[torch.zeros(shape, device=device) for _ in layers],
            frames=torch.zeros(batch, dtype=torch.long, device=device),
        )

    def reset_state(self, state: KVRing, mask: Tensor) -> None:
        rows = mask.view(-1, 1, 1, 1)
        for ring in state.keys + state.values:
            ring.masked_fill_(rows, 0.0)
        state.frames.masked_fill_(mask, 0)

    def step(self, x: Tensor, state: KVRing, active: Tensor | None) -> Tensor:
        """x [B, C, T] -> [B, C, T]; appends T frames to the ring of every active slot."""
        x = x.transpose(1, 2)
        batch, steps, _ = x.shape
        frames, context = state.frames, self.cfg.context
        write_at = torch.remainder(frames.view(-1, 1) + torch.arange(steps, device=x.device), context)
        write_at = write_at.view(batch, 1, steps, 1).expand(batch, self.cfg.num_heads, steps, self.head_dim)
        visible = visible_slots(frames, steps, context)
        positions = frames.view(-1, 1) + torch.arange(steps, device=x.device)
        rope = rope_rotation(positions, self.head_dim, self.cfg.max_period)
        for layer, keys, values in zip(self.layers, state.keys, state.values, strict=True):
            x = layer(x, keys, values, write_at, visible, rope, active)
        advance = steps if active is None else active.long() * steps
        state.frames.add_(advance)
        return x.transpose(1, 2)
