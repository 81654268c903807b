"""The PersonaPlex dual-stream LM: a temporal transformer over 17 token streams (text, 8 agent and 8 user
Mimi codebooks) and a depth transformer ("depformer") that predicts one frame's audio codebooks in turn.

Module names match the published checkpoint (engine-spec §3.6) so its state dict loads as is.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from engine.config import LMConfig
from engine.model.layers import DepformerLayer, KVRing, RMSNorm, TemporalLayer, ring_mask, rope_rotation
from engine.model.sampling import SamplingParams, sample_tokens

TEXT_STREAM = 0


class StreamEmbedding(nn.Embedding):
    """Token embedding in which token -1 contributes an exact zero vector."""

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        emb = F.embedding(tokens.clamp_min(0), self.weight)
        return torch.where((tokens < 0)[..., None], torch.zeros((), dtype=emb.dtype, device=emb.device), emb)


class LMModel(nn.Module):
    def __init__(self, cfg: LMConfig) -> None:
        super().__init__()
        self.cfg = cfg
        dim, dep_dim = cfg.dim, cfg.depformer_dim
        self.emb = nn.ModuleList(StreamEmbedding(cfg.card + 1, dim) for _ in range(cfg.n_q))
        self.text_emb = StreamEmbedding(cfg.text_card + 1, dim)
        self.transformer = nn.Module()
        self.transformer.layers = nn.ModuleList(
            TemporalLayer(dim, cfg.num_heads, cfg.ffn_hidden) for _ in range(cfg.num_layers)
        )
        self.out_norm = RMSNorm(dim)
        self.text_linear = nn.Linear(dim, cfg.text_card, bias=False)
        self.depformer_in = nn.ModuleList(nn.Linear(dim, dep_dim, bias=False) for _ in range(cfg.dep_q))
        self.depformer_emb = nn.ModuleList(
            StreamEmbedding(cfg.card + 1, dep_dim) for _ in range(cfg.dep_q - 1)
        )
        self.depformer_text_emb = StreamEmbedding(cfg.text_card + 1, dep_dim)
        self.depformer = nn.Module()
        self.depformer.layers = nn.ModuleList(
            DepformerLayer(dep_dim, cfg.depformer_num_heads, cfg.depformer_ffn_hidden, cfg.dep_q)
            for _ in range(cfg.depformer_num_layers)
        )
        self.linears = nn.ModuleList(nn.Linear(dep_dim, cfg.card, bias=False) for _ in range(cfg.dep_q))

    @property
    def device(self) -> torch.device:
        return self.text_linear.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.text_linear.weight.dtype

    def new_kv(self, batch: int) -> KVRing:
        cfg = self.cfg
        return KVRing(
            cfg.num_layers,
            batch,
            cfg.num_heads,
            cfg.context,
            cfg.dim // cfg.num_heads,
            self.dtype,
            self.device,
        )

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [B, T, 17] -> summed input embedding [B, T, D]: audio streams first, text last."""
        total = self.emb[0](tokens[..., 1])
        for i in range(1, self.cfg.n_q):
            total = total + self.emb[i](tokens[..., i + 1])
        return total + self.text_emb(tokens[..., TEXT_STREAM])

    def temporal(
        self, x: torch.Tensor, positions: torch.Tensor, kv: KVRing, active: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Run the temporal transformer on inputs x [B, T, D] at absolute positions [B, T], appending to kv.
        Rows with active False leave kv unchanged. Returns the normalised hidden state [B, T, D]."""
        rope = rope_rotation(positions, self.cfg.dim // self.cfg.num_heads, self.cfg.max_period)
        index = kv.record_positions(positions, active)
        mask = ring_mask(positions, kv.positions[:, : kv.visible], self.cfg.context)
        if active is not None:  # idle rows may have an empty ring; give them something to attend to
            mask = mask | ~active[:, None, None, None]
        for layer_id, layer in enumerate(self.transformer.layers):
            x = layer(
                x,
                ring=kv,
                layer=layer_id,
                index=index,
                mask=mask,
                rope=rope,
                active=active,
            )
        return self.out_norm(x)

    def depformer_frame(
        self,
        z: torch.Tensor,
        text: torch.Tensor,
        steps: int,
        params: SamplingParams,
        position: torch.Tensor,
        forced: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Predict the first `steps` audio codebooks of one frame.

        z [B, D] is the temporal output, text [B] the text token of the frame. forced [B, steps] (-1 = not
        forced) replaces a sampled token as the next sub-step's input and in the result. Returns [B, steps].
        """
        cfg = self.cfg
        batch = z.shape[0]
        head_dim = cfg.depformer_dim // cfg.depformer_num_heads
        shape = (batch, cfg.depformer_num_heads, cfg.dep_q, head_dim)
        keys = [z.new_zeros(shape) for _ in self.depformer.layers]
        values = [z.new_zeros(shape) for _ in self.depformer.layers]
        slots = torch.arange(cfg.dep_q, device=z.device)
        token_emb = self.depformer_text_emb(text)
        out = []
        for k in range(steps):
            x = (self.depformer_in[k](z) + token_emb)[:, None]
            mask = (slots <= k)[None, None, None, :]
            for layer, lk, lv in zip(self.depformer.layers, keys, values, strict=True):
                x = layer(x, k, lk, lv, mask)
            token = sample_tokens(self.linears[k](x[:, 0]), params, position, stream=k + 1)
            if forced is not None:
                token = torch.where(forced[:, k] >= 0, forced[:, k], token)
            out.append(token)
            if k + 1 < steps:
                token_emb = self.depformer_emb[k](token)
        return torch.stack(out, dim=-1)

    def text_token(self, z: torch.Tensor, params: SamplingParams, position: torch.Tensor) -> torch.Tensor:
        return sample_tokens(self.text_linear(z), params, position, stream=TEXT_STREAM)
