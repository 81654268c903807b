"""Token sampling for a batch of sessions, each with its own settings and its own random stream.

Greedy is argmax of the float32 logits (first index on ties). Sampling is temperature softmax, top-k,
then an exponential race (argmax of p / q with q ~ Exp(1)), as the published model does. The noise is
counter-based: a hash of (session seed, position, stream, rank), so a session's draws do not depend on
which other sessions share the batch, a call can be replayed from its seed, and no generator state has to
be carried between steps (friendly to CUDA graphs).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

_MASK32 = 0xFFFFFFFF


@dataclass
class SamplingParams:
    """Per-slot sampling settings as tensors [B], plus the candidate width every slot samples from.

    The width is fixed (not the largest top-k in the batch) and greedy slots run the same kernels as
    sampled ones, so a step's work never depends on which sessions share it: no host-side decision, one
    CUDA graph for every mix of sessions."""

    greedy: torch.Tensor  # bool
    temperature: torch.Tensor  # float32
    top_k: torch.Tensor  # int64, 1 <= top_k <= width
    seed: torch.Tensor  # int64
    width: int  # candidates kept before the race: the largest top-k a session may ask for

    def rows(self, start: int, stop: int) -> SamplingParams:
        """A view of slots [start, stop): writes through it land here."""
        rows = slice(start, stop)
        return SamplingParams(
            self.greedy[rows], self.temperature[rows], self.top_k[rows], self.seed[rows], self.width
        )


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer finaliser (xorshift-multiply) on int64 tensors holding values < 2**32."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _MASK32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _MASK32
    return x ^ (x >> 16)


def uniform_noise(seed: torch.Tensor, position: torch.Tensor, stream: int, width: int) -> torch.Tensor:
    """Deterministic uniforms in (0, 1), shape [B, width], from seed [B], position [B] and a stream id."""
    lo, hi = seed & _MASK32, (seed >> 32) & _MASK32
    key = _mix32(lo ^ _mix32(hi ^ _mix32((position & _MASK32) ^ _mix32(torch.full_like(seed, stream)))))
    rank = torch.arange(width, device=seed.device, dtype=torch.long)
    bits = _mix32(key[:, None] ^ _mix32(rank + 0x9E3779B9)[None, :])
    return ((bits >> 8).to(torch.float32) + 0.5) / float(1 << 24)


def sample_tokens(
    logits: torch.Tensor, params: SamplingParams, position: torch.Tensor, stream: int
) -> torch.Tensor:
    """logits [B, V] -> tokens [B] (int64)."""
    scores = logits.float()
    greedy_tokens = scores.argmax(dim=-1)
    width = min(params.width, scores.shape[-1])
    temperature = params.temperature.clamp_min(1e-6)[:, None]
    probs = torch.softmax(scores / temperature, dim=-1)
    top_probs, top_index = probs.topk(width, dim=-1)
    race = top_probs / -torch.log(uniform_noise(params.seed, position, stream, width))
    in_top_k = torch.arange(width, device=logits.device)[None, :] < params.top_k[:, None]
    race = torch.where(in_top_k, race, torch.full_like(race, -1.0))
    sampled = top_index.gather(-1, race.argmax(dim=-1, keepdim=True)).squeeze(-1)
    use_greedy = params.greedy | (params.temperature <= 0)
    return torch.where(use_greedy, greedy_tokens, sampled)
