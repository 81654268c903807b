"""What the model is fed before the first live step: voice prompt, silence, role prompt text, silence.

PersonaPlex primes a conversation by teacher-forcing every stream for P positions (engine-spec §4.1). All
of those inputs are known in advance, so we lay them out as one sequence and run it as a single forward
pass. This module builds that sequence: a block of stored voice embeddings (published `.pt` voices) followed
by a [positions, 17] token matrix, plus the delayed codes the first live position inherits.

Position p of the token sequence holds text, agent cb0 and user cb0 of frame p, and agent/user cb1..7 of
frame p-1 (those codebooks are delayed by one frame). Frame 0 never reaches the model: position 0 holds the
initial tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.config import TEXT_PAD, LMConfig

__all__ = ["TEXT_PAD", "PromptPlan", "plan_from_codes", "plan_from_embeddings"]
TEXT_EPAD = 0  # end of padding, the step before a word
SILENCE_TOKENS = (948, 243, 1178, 546, 1736, 1030, 1978, 2008)  # agent stream during prompt phases
SINE_TOKENS = (430, 1268, 381, 1611, 1095, 1495, 56, 472)  # user stream during prompt phases
SILENCE_FRAMES = 6  # int(0.5 s * 12.5 Hz), before and after the role prompt text
RING_SLOTS = 4  # slots of the published token ring stored in `.pt` voices


@dataclass(frozen=True)
class PromptPlan:
    embeddings: torch.Tensor | None  # [N, D] stored voice embeddings for positions 0..N-1, or None
    tokens: torch.Tensor  # [P - N, 17] int64 inputs for positions N..P-1
    voice_positions: int  # positions 0..voice_positions-1 depend on the voice only (cacheable)
    next_agent_delayed: torch.Tensor  # [7] agent cb1..7 forced at position P (last prompt frame's)
    next_user_delayed: torch.Tensor  # [7] user cb1..7 at position P

    @property
    def length(self) -> int:
        """P: positions fed before the first live step."""
        n = 0 if self.embeddings is None else self.embeddings.shape[0]
        return n + self.tokens.shape[0]


def _row(
    text: int, agent0: int, agent_delayed: torch.Tensor, user0: int, user_delayed: torch.Tensor
) -> torch.Tensor:
    return torch.cat([torch.tensor([text, agent0]), agent_delayed, torch.tensor([user0]), user_delayed])


def _conditioning_rows(
    text_ids: list[int], agent_delayed: torch.Tensor, user_delayed: torch.Tensor
) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    """Rows for silence, role text and silence, starting at the position right after the voice."""
    silence = torch.tensor(SILENCE_TOKENS)
    sine = torch.tensor(SINE_TOKENS)
    texts = [TEXT_PAD] * SILENCE_FRAMES + list(text_ids) + [TEXT_PAD] * SILENCE_FRAMES
    rows = []
    for text in texts:
        rows.append(_row(text, SILENCE_TOKENS[0], agent_delayed, SINE_TOKENS[0], user_delayed))
        agent_delayed, user_delayed = silence[1:], sine[1:]
    return rows, agent_delayed, user_delayed


def plan_from_embeddings(embeddings: torch.Tensor, ring: torch.Tensor, text_ids: list[int]) -> PromptPlan:
    """A `.pt` voice: N stored embeddings (positions 0..N-1) and the published 4-slot token ring [17, 4]
    as it stood after the voice, whose slot N % 4 holds position N and slot (N+1) % 4 the delayed codes
    of the last voice frame."""
    n = embeddings.shape[0]
    last = ring[:, n % RING_SLOTS].long()
    after = ring[:, (n + 1) % RING_SLOTS].long()
    rows, agent_delayed, user_delayed = _conditioning_rows(text_ids, after[2:9], after[10:17])
    tokens = torch.stack([last, *rows])
    return PromptPlan(embeddings, tokens, n + 1 + SILENCE_FRAMES, agent_delayed, user_delayed)


def plan_from_codes(codes: torch.Tensor, text_ids: list[int], cfg: LMConfig) -> PromptPlan:
    """An audio voice: its Mimi codes [V, 8], one frame per position (frame 0 is dropped)."""
    initial_audio = torch.full((7,), cfg.audio_initial_token)
    sine = torch.tensor(SINE_TOKENS)
    rows = [torch.tensor([cfg.text_initial_token] + [cfg.audio_initial_token] * cfg.n_q)]
    for p in range(1, codes.shape[0]):
        agent_delayed = codes[p - 1, 1:] if p >= 2 else initial_audio
        user_delayed = sine[1:] if p >= 2 else initial_audio
        rows.append(_row(TEXT_PAD, int(codes[p, 0]), agent_delayed, SINE_TOKENS[0], user_delayed))
    tail, agent_delayed, user_delayed = _conditioning_rows(text_ids, codes[-1, 1:].long(), sine[1:])
    tokens = torch.stack(rows + tail)
    return PromptPlan(None, tokens, codes.shape[0] + SILENCE_FRAMES, agent_delayed, user_delayed)
