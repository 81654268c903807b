"""Causal streaming convolutions and the SEANet encoder/decoder stacks of the Mimi codec.

Every streaming layer keeps a fixed-size state per batch slot (the input tail a causal conv still needs,
the overlap a transposed conv has not finished), so independent calls advance together in one tensor op.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from engine.config import SEANetConfig


def nested(**children: nn.Module) -> nn.Module:
    """A bare container adding one level of naming: the published checkpoint nests every conv two or
    three modules deep (`model.0.conv.conv.weight`), and the keys must match exactly."""
    holder = nn.Module()
    for name, child in children.items():
        holder.add_module(name, child)
    return holder


@functools.lru_cache(maxsize=512)
def _one_slot_runs_native(
    slot_shape: tuple[int, ...],
    weight_shape: tuple[int, ...],
    stride: tuple[int, ...],
    dilation: tuple[int, ...],
    groups: int,
    transposed: bool,
    threads: int,
) -> bool:
    """Would PyTorch run this conv for a single slot with its native im2col+GEMM kernel (not oneDNN)?"""
    select = getattr(torch._C, "_select_conv_backend", None)
    if select is None:  # private API gone: fall back to PyTorch's own choice
        return False
    zeros = tuple(0 for _ in stride)  # padding and output padding: the streaming convs pad themselves
    slot, weight = torch.empty(1, *slot_shape), torch.empty(weight_shape)
    backend = select(slot, weight, None, stride, zeros, dilation, transposed, zeros, groups, None)
    return backend.name.startswith("Slow")


def conv_per_slot(layer: nn.Conv1d | nn.ConvTranspose1d, x: Tensor) -> Tensor:
    """Run `layer` on x [B, C, T] so that every slot's output is bit-identical to running it alone.

    On CPU PyTorch picks oneDNN for any batch > 1 but a native kernel for many single-slot shapes, and the
    two round differently; the reference ran one slot, so batches are forced onto the single-slot choice.
    The switch is process-global while the conv runs (other threads' CPU convs would see it too)."""
    if x.device.type != "cpu" or x.shape[0] == 1:
        return layer(x)
    native = _one_slot_runs_native(
        tuple(x.shape[1:]),
        tuple(layer.weight.shape),
        tuple(layer.stride),
        tuple(layer.dilation),
        layer.groups,
        isinstance(layer, nn.ConvTranspose1d),
        torch.get_num_threads(),
    )
    if not native:
        return layer(x)
    mkldnn_was = torch.backends.mkldnn.enabled
    (nnpack_was,) = torch.backends.nnpack.set_flags(False)
    torch.backends.mkldnn.enabled = False
    try:
        return layer(x)
    finally:
        torch.backends.mkldnn.enabled = mkldnn_was
        torch.backends.nnpack.set_flags(nnpack_was)


def _keep_inactive(new: Tensor, old: Tensor, active: Tensor | None) -> Tensor:
    """`new` for active slots, `old` (bit for bit) for the others; `active` is bool [B]."""
    if active is None:
        return new
    return torch.where(active.view(-1, *([1] * (new.dim() - 1))), new, old)


@dataclass
class ConvState:
    """Streaming state of one causal conv for B slots."""

    tail: Tensor  # [B, C_in, k_eff - stride]: the input samples the next output window still overlaps
    fresh: Tensor | None  # bool [B], replicate-padded convs only: no chunk seen since reset


@dataclass
class ConvTransposeState:
    """Streaming state of one causal transposed conv for B slots."""

    overlap: Tensor  # [B, C_out, k - stride]: last outputs of the previous chunk, bias included


class CausalConv1d(nn.Module):
    """Conv1d with causal left padding, run chunk by chunk exactly as the published streaming code does:
    the first chunk after a reset is left-padded (zeros, or its first frame repeated for `replicate`),
    later chunks are prefixed with the previous chunk's unconsumed tail."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int = 1,
        dilation: int = 1,
        bias: bool = True,
        pad_mode: str = "constant",
    ) -> None:
        super().__init__()
        if pad_mode not in ("constant", "replicate"):
            raise ValueError(f"unsupported pad_mode {pad_mode!r} (Mimi uses 'constant' or 'replicate')")
        self.conv = nested(
            conv=nn.Conv1d(in_channels, out_channels, kernel_size, stride, dilation=dilation, bias=bias)
        )
        self.stride = stride
        self.tail_length = (kernel_size - 1) * dilation + 1 - stride
        self.pad_mode = pad_mode

    @property
    def layer(self) -> nn.Conv1d:
        return self.conv.conv

    def init_state(self, batch: int, device: torch.device) -> ConvState:
        tail = torch.zeros(batch, self.layer.in_channels, self.tail_length, device=device)
        fresh = torch.ones(batch, dtype=torch.bool, device=device) if self.pad_mode == "replicate" else None
        return ConvState(tail=tail, fresh=fresh)

    def reset_state(self, state: ConvState, mask: Tensor) -> None:
        # A zero tail is the reference's zero left padding of the first chunk.
        state.tail.masked_fill_(mask.view(-1, 1, 1), 0.0)
        if state.fresh is not None:
            state.fresh.logical_or_(mask)

    def step(self, x: Tensor, state: ConvState, active: Tensor | None) -> Tensor:
        """x [B, C_in, T] with T a multiple of the stride -> [B, C_out, T / stride]."""
        tail = state.tail
        if state.fresh is not None:
            first_frame = x[..., :1].expand(-1, -1, self.tail_length)
            tail = torch.where(state.fresh.view(-1, 1, 1), first_frame, tail)
            fresh = state.fresh.logical_and(~active) if active is not None else torch.zeros_like(state.fresh)
            state.fresh.copy_(fresh)
        window = torch.cat([tail, x], dim=-1)
        # With T a multiple of the stride, the last `tail_length` samples are exactly what the next window
        # start still needs.
        new_tail = window[..., window.shape[-1] - self.tail_length :]
        state.tail.copy_(_keep_inactive(new_tail, state.tail, active))
        return conv_per_slot(self.layer, window)


class CausalConvTranspose1d(nn.Module):
    """ConvTranspose1d whose last `k - stride` outputs per chunk are held back and completed by the next
    chunk (bias counted once), so chunked output equals the causal whole-signal output."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int,
        groups: int = 1,
        bias: bool = True,
    ) -> None:
        super().__init__()
        self.convtr = nested(
            convtr=nn.ConvTranspose1d(
                in_channels, out_channels, kernel_size, stride, groups=groups, bias=bias
            )
        )
        self.overlap_length = kernel_size - stride

    @property
    def layer(self) -> nn.ConvTranspose1d:
        return self.convtr.convtr

    def init_state(self, batch: int, device: torch.device) -> ConvTransposeState:
        overlap = torch.empty(batch, self.layer.out_channels, self.overlap_length, device=device)
        state = ConvTransposeState(overlap)
        self.reset_state(state, torch.ones(batch, dtype=torch.bool, device=device))
        return state

    def reset_state(self, state: ConvTransposeState, mask: Tensor) -> None:
        # A fresh slot holds the bias, so `overlap - bias` adds exactly 0.0 to its first chunk: the
        # reference emits that chunk untouched.
        bias = self.layer.bias
        fresh = torch.zeros_like(state.overlap) if bias is None else bias.detach().view(1, -1, 1)
        state.overlap.copy_(torch.where(mask.view(-1, 1, 1), fresh, state.overlap))

    def step(self, x: Tensor, state: ConvTransposeState, active: Tensor | None) -> Tensor:
        """x [B, C_in, T] -> [B, C_out, T * stride]."""
        y = conv_per_slot(self.layer, x)
        n = self.overlap_length
        carried = state.overlap if self.layer.bias is None else state.overlap - self.layer.bias.view(-1, 1)
        y = torch.cat([y[..., :n] + carried, y[..., n:]], dim=-1)
        state.overlap.copy_(_keep_inactive(y[..., y.shape[-1] - n :], state.overlap, active))
        return y[..., : y.shape[-1] - n]


class ResidualUnit(nn.Module):
    """SEANet residual block: x + conv1x1(ELU(conv_k(ELU(x)))), identity shortcut."""

    def __init__(self, channels: int, kernel_size: int, dilation: int, compress: int) -> None:
        super().__init__()
        hidden = channels // compress
        self.block = nn.ModuleList(
            [
                nn.ELU(alpha=1.0),
                CausalConv1d(channels, hidden, kernel_size, dilation=dilation),
                nn.ELU(alpha=1.0),
                CausalConv1d(hidden, channels, 1),
            ]
        )

    def streaming_convs(self) -> list[CausalConv1d]:
        return [self.block[1], self.block[3]]

    def step(self, x: Tensor, states: list[ConvState], active: Tensor | None) -> Tensor:
        h = self.block[0](x)
        h = self.block[1].step(h, states[0], active)
        h = self.block[2](h)
        h = self.block[3].step(h, states[1], active)
        return x + h


StreamingConv = CausalConv1d | CausalConvTranspose1d
StreamState = ConvState | ConvTransposeState


class _SEANetStack(nn.Module):
    """A `model` list of ELUs, residual units and (transposed) convs applied in order."""

    model: nn.ModuleList

    def streaming_convs(self) -> list[StreamingConv]:
        convs: list[StreamingConv] = []
        for layer in self.model:
            if isinstance(layer, ResidualUnit):
                convs.extend(layer.streaming_convs())
            elif isinstance(layer, CausalConv1d | CausalConvTranspose1d):
                convs.append(layer)
        return convs

    def init_state(self, batch: int, device: torch.device) -> list[StreamState]:
        return [conv.init_state(batch, device) for conv in self.streaming_convs()]

    def reset_state(self, states: list[StreamState], mask: Tensor) -> None:
        for conv, state in zip(self.streaming_convs(), states, strict=True):
            conv.reset_state(state, mask)

    def step(self, x: Tensor, states: list[StreamState], active: Tensor | None) -> Tensor:
        pending = iter(states)
        for layer in self.model:
            if isinstance(layer, ResidualUnit):
                x = layer.step(x, [next(pending), next(pending)], active)
            elif isinstance(layer, CausalConv1d | CausalConvTranspose1d):
                x = layer.step(x, next(pending), active)
            else:
                x = layer(x)
        return x


def _residual_units(cfg: SEANetConfig, channels: int) -> list[nn.Module]:
    return [
        ResidualUnit(channels, cfg.residual_kernel_size, cfg.dilation_base**j, cfg.compress)
        for j in range(cfg.n_residual_layers)
    ]


class SEANetEncoder(_SEANetStack):
    """Waveform [B, 1, T] -> latent [B, dimension, T / prod(ratios)]."""

    def __init__(self, cfg: SEANetConfig) -> None:
        super().__init__()
        channels = cfg.n_filters
        layers: list[nn.Module] = [CausalConv1d(cfg.channels, channels, cfg.kernel_size)]
        for ratio in reversed(cfg.ratios):
            layers += _residual_units(cfg, channels)
            layers += [nn.ELU(alpha=1.0), CausalConv1d(channels, 2 * channels, 2 * ratio, stride=ratio)]
            channels *= 2
        layers += [nn.ELU(alpha=1.0), CausalConv1d(channels, cfg.dimension, cfg.last_kernel_size)]
        self.model = nn.ModuleList(layers)


class SEANetDecoder(_SEANetStack):
    """Latent [B, dimension, T] -> waveform [B, 1, T * prod(ratios)]; no output activation."""

    def __init__(self, cfg: SEANetConfig) -> None:
        super().__init__()
        channels = cfg.n_filters * 2 ** len(cfg.ratios)
        layers: list[nn.Module] = [CausalConv1d(cfg.dimension, channels, cfg.kernel_size)]
        for ratio in cfg.ratios:
            layers += [nn.ELU(alpha=1.0), CausalConvTranspose1d(channels, channels // 2, 2 * ratio, ratio)]
            channels //= 2
            layers += _residual_units(cfg, channels)
        layers += [nn.ELU(alpha=1.0), CausalConv1d(channels, cfg.channels, cfg.last_kernel_size)]
        self.model = nn.ModuleList(layers)
