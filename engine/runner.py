"""The batched model step: Mimi encode -> temporal + depth transformers -> Mimi decode for every slot
that has a caller frame, leaving the other slots untouched.

A slot is one conversation. All of its state lives in rows of preallocated tensors (KV ring, Mimi
streaming buffers, the tokens of its next input position, its sampling settings), so slots start, stop
and sit at different positions independently and a step of a given size always has the same shapes.

Bookkeeping (engine-spec §3.8, reorganised): the reference's step n runs the transformer on position n-1
and emits frame n-1; the caller frame it receives at step n is not used by that computation. We therefore
run position n as soon as caller frame n arrives and emit frame n at once — the same tokens as the
reference, 80 ms earlier. The reference's first live output (the last prompt frame, constant silence) is
decoded during the prefill so the Mimi decoder state matches.

Step sizes: a step runs slots [0, n) for the smallest n in (1, 2, 4, ..., capacity) that covers every
active slot, and the worker hands out the lowest free slot, so a lightly loaded engine does light work.
Each size has fixed shapes and reads its inputs from the runner's own buffers, so on CUDA each is recorded
once as a CUDA graph and a step is a single launch.

Size: the step, the prime (whole or in chunks between steps) and slot moves all read and write the same
preallocated per-slot tensors; apart, each would reach into the others' buffers.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch

from engine.api import MAX_TOP_K, Sampling
from engine.config import FRAME_SAMPLES
from engine.model.layers import KVRing
from engine.model.lm import LMModel
from engine.model.mimi import Mimi, MimiState
from engine.model.sampling import SamplingParams
from engine.prompt import (
    SILENCE_TOKENS,
    SINE_TOKENS,
    TEXT_PAD,
    PromptPlan,
    plan_from_codes,
    plan_from_embeddings,
)
from engine.voices import VoiceAudio, VoiceEmbeddings

AGENT_CODEBOOKS = 8


@dataclass
class VoicePrefix:
    """KV of the voice-only prompt positions (voice + first silence), shared by sessions of one voice."""

    keys: torch.Tensor  # [layers, heads, positions, head_dim]
    values: torch.Tensor


@dataclass
class Prefill:
    first_pcm: torch.Tensor  # float32 [1920]: audio of the last prompt frame (the reference's first output)
    prefix: VoicePrefix | None  # to cache for the next session with this voice


@dataclass
class PrefillJob:
    """A prime under way in one slot: its inputs, how many positions have run, and what they left."""

    slot: int
    plan: PromptPlan
    inputs: torch.Tensor  # [1, length, dim] embedded prompt
    positions: torch.Tensor  # [1, length]
    done: int = 0  # positions run so far
    prefix: VoicePrefix | None = None  # the voice positions' KV, once they have run (or were copied)
    z: torch.Tensor | None = None  # the last position's hidden state, once it has run

    @property
    def remaining(self) -> int:
        return self.plan.length - self.done


@dataclass
class StepResult:
    pcm: torch.Tensor  # float32 [n, 1920] agent audio of the emitted frame, for slots [0, n)
    tokens: torch.Tensor  # int64 [n, 17] frame tokens: text, agent cb0..7, user cb0..7


@dataclass
class SlotRows:
    """Views of slots [0, count) of every per-slot tensor of a runner, and of its input buffers: a step
    over them touches no other slot, and its tensors never move (a CUDA graph reads them in place)."""

    count: int
    kv: KVRing
    codec: MimiState
    next_position: torch.Tensor
    pending: torch.Tensor
    user_delayed: torch.Tensor
    forced_text: torch.Tensor
    text_params: SamplingParams
    audio_params: SamplingParams
    pcm_in: torch.Tensor  # float32 [count, 1920]: the caller frame of each slot
    active_in: torch.Tensor  # bool [count]: which slots have one


def step_sizes(capacity: int) -> list[int]:
    """1, 2, 4, ... below the capacity, then the capacity."""
    return [1 << i for i in range((capacity - 1).bit_length())] + [capacity]


class BatchRunner:
    def __init__(self, lm: LMModel, mimi: Mimi, capacity: int) -> None:
        self.lm, self.mimi, self.capacity = lm, mimi, capacity
        device = lm.device
        self.kv = lm.new_kv(capacity)
        self.mimi_state = mimi.init_state(capacity, device)
        long = dict(dtype=torch.long, device=device)
        self.next_position = torch.zeros(capacity, **long)
        # Agent side of the next input position: text, agent cb0, agent cb1..7 (the previous frame's).
        self.pending = torch.zeros(capacity, 2 + AGENT_CODEBOOKS - 1, **long)
        self.user_delayed = torch.zeros(capacity, AGENT_CODEBOOKS - 1, **long)
        self.forced_text = torch.full((capacity,), -1, **long)
        self.text_params = _params(capacity, device)
        self.audio_params = _params(capacity, device)
        self._pcm_in = torch.zeros(capacity, FRAME_SAMPLES, device=device)
        self._active_in = torch.zeros(capacity, dtype=torch.bool, device=device)
        self.step_sizes = step_sizes(capacity)
        self._rows = {count: self._slot_rows(count) for count in self.step_sizes}
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, StepResult]] = {}
        self._primed_codec, self._primer_pcm = self._prime_codec()

    def _slot_rows(self, count: int) -> SlotRows:
        return SlotRows(
            count,
            self.kv.rows(0, count),
            self.mimi_state.rows(0, count),
            self.next_position[:count],
            self.pending[:count],
            self.user_delayed[:count],
            self.forced_text[:count],
            self.text_params.rows(0, count),
            self.audio_params.rows(0, count),
            self._pcm_in[:count],
            self._active_in[:count],
        )

    @torch.inference_mode()
    def _prime_codec(self) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Codec state of a slot that has just decoded the last prompt frame (constant agent silence):
        every session starts from it, so it is computed once and copied into a slot at prefill."""
        state = self.mimi.init_state(1, self.lm.device)
        codes = torch.tensor([SILENCE_TOKENS], device=self.lm.device)
        pcm = self.mimi.decode_step(codes, state)[0].clone()
        return [t[0].clone() for t in state.tensors()], pcm

    # ---- slot lifecycle -------------------------------------------------------------------------------

    def configure(self, slot: int, sampling: Sampling, seed: int) -> None:
        for params, temp, top_k in (
            (self.text_params, sampling.temp_text, sampling.topk_text),
            (self.audio_params, sampling.temp_audio, sampling.topk_audio),
        ):
            params.greedy[slot] = sampling.greedy
            params.temperature[slot] = temp
            params.top_k[slot] = top_k
            params.seed[slot] = seed & 0x7FFFFFFFFFFFFFFF
        self.forced_text[slot] = -1

    @torch.inference_mode()
    def prefill(
        self, slot: int, plan: PromptPlan, prefix: VoicePrefix | None = None, one_pass: bool = True
    ) -> Prefill:
        """Reset `slot` and prime it with the prompt, ready for its first live frame, in one piece
        (`one_pass`) or position by position.

        `prefix` is the KV state of the plan's voice-only positions from an earlier session with the same
        voice; those positions are then copied instead of recomputed. The result carries that prefix (to
        cache) and the audio of the last prompt frame, which the reference emits as its first output.
        """
        job = self.begin_prefill(slot, plan, prefix)
        while not self.prefill_chunk(job, job.remaining if one_pass else 1):
            pass
        return self.finish_prefill(job)

    @torch.inference_mode()
    def begin_prefill(self, slot: int, plan: PromptPlan, prefix: VoicePrefix | None = None) -> PrefillJob:
        """Reset `slot` and set up its prime, to be run in chunks between live steps (`prefill_chunk`),
        then finished (`finish_prefill`). The slot is idle meanwhile, so live steps leave it untouched."""
        self.reset(slot)
        lm, device = self.lm, self.lm.device
        length = plan.length
        inputs = lm.embed(plan.tokens.to(device)[None])
        if plan.embeddings is not None:
            inputs = torch.cat([plan.embeddings.to(device, lm.dtype)[None], inputs], dim=1)
        job = PrefillJob(slot, plan, inputs, torch.arange(length, device=device)[None])
        if prefix is not None and length <= lm.cfg.context:
            kv = self._prefill_kv(job)
            cached = plan.voice_positions
            kv.keys[:, 0, :, :cached] = prefix.keys
            kv.values[:, 0, :, :cached] = prefix.values
            kv.positions[0, :cached] = job.positions[0, :cached]
            job.done, job.prefix = cached, prefix
        return job

    @torch.inference_mode()
    def prefill_chunk(self, job: PrefillJob, positions: int) -> bool:
        """Run the next `positions` prompt positions of `job` (at least one); True once all have run.

        Exact at any chunking: every position attends to the same ring entries with the same mask as in a
        one-pass prime, and only the last position's output is kept. A prompt longer than the ring must see
        it wrap, so it runs one position at a time whatever the chunk."""
        lm, length = self.lm, job.plan.length
        kv = self._prefill_kv(job)
        end = min(length, job.done + max(1, positions))
        cached = job.plan.voice_positions
        if job.prefix is None and job.done < cached < end and length <= lm.cfg.context:
            end = cached  # stop at the voice's end, so its KV can be cached for the next session
        if length > lm.cfg.context:
            for p in range(job.done, end):
                job.z = lm.temporal(job.inputs[:, p : p + 1], job.positions[:, p : p + 1], kv)[:, -1]
        else:
            span = slice(job.done, end)
            job.z = lm.temporal(job.inputs[:, span], job.positions[:, span], kv)[:, -1]
        job.done = end
        if job.prefix is None and end == cached and length <= lm.cfg.context:
            job.prefix = VoicePrefix(kv.keys[:, 0, :, :cached].clone(), kv.values[:, 0, :, :cached].clone())
        return job.done >= length

    @torch.inference_mode()
    def finish_prefill(self, job: PrefillJob) -> Prefill:
        """Finish a prime whose positions have all run: the slot is ready for its first live frame."""
        if job.remaining or job.z is None:
            raise RuntimeError(f"slot {job.slot}: prime finished with {job.remaining} positions left")
        prefix = job.prefix if job.plan.length <= self.lm.cfg.context else None
        return Prefill(self._finish_prompt(job.slot, job.z, job.plan), prefix)

    def _prefill_kv(self, job: PrefillJob) -> KVRing:
        return self.kv.rows(job.slot, job.slot + 1, visible=min(job.plan.length, self.lm.cfg.context))

    def _finish_prompt(self, slot: int, z: torch.Tensor, plan: PromptPlan) -> torch.Tensor:
        """Sample the first live position's text and agent cb0 from the last prompt position; put the
        codec in the state of having decoded the last prompt frame, as the reference has. Returns that
        frame's audio."""
        position = torch.full((1,), plan.length, dtype=torch.long, device=z.device)
        text_params = self.text_params.rows(slot, slot + 1)
        audio_params = self.audio_params.rows(slot, slot + 1)
        text = self.lm.text_token(z, text_params, position)
        agent0 = self.lm.depformer_frame(z, text, 1, audio_params, position)[:, 0]
        self.pending[slot, 0], self.pending[slot, 1] = text[0], agent0[0]
        self.pending[slot, 2:] = plan.next_agent_delayed.to(z.device)
        self.user_delayed[slot] = plan.next_user_delayed.to(z.device)
        self.next_position[slot] = plan.length
        for tensor, primed in zip(self.mimi_state.tensors(), self._primed_codec, strict=True):
            tensor[slot] = primed
        return self._primer_pcm.clone()

    @torch.inference_mode()
    def voice_source(self, voice: VoiceEmbeddings | VoiceAudio) -> VoiceEmbeddings | torch.Tensor:
        """What a prompt plan needs from a voice: stored embeddings as they are, audio as Mimi codes [V, 8]
        (encoded from a fresh codec state, as the reference encodes the voice after a reset)."""
        if isinstance(voice, VoiceEmbeddings):
            return voice
        pcm = torch.from_numpy(voice.pcm).to(self.lm.device)[None]
        return self.mimi.encode(pcm)[0].T.cpu()

    def plan(self, source: VoiceEmbeddings | torch.Tensor, text_ids: list[int]) -> PromptPlan:
        if isinstance(source, VoiceEmbeddings):
            return plan_from_embeddings(source.embeddings, source.cache, text_ids)
        return plan_from_codes(source, text_ids, self.lm.cfg)

    def reset(self, slot: int) -> None:
        """Forget the slot's conversation (its codec state is replaced wholesale at the next prefill)."""
        self.kv.reset(slot)
        self.forced_text[slot] = -1

    def force_text(self, slot: int, token: int) -> None:
        """Make the next sampled text token of `slot` be `token` (-1 to stop forcing)."""
        self.forced_text[slot] = token

    @torch.inference_mode()
    def move_slot(self, source: int, target: int) -> None:
        """Move the conversation in slot `source` to slot `target` (overwritten), leaving `source` empty:
        the conversation goes on there exactly as it would have (slots do not interact)."""
        for tensor, dim in self._slot_tensors():
            tensor.select(dim, target).copy_(tensor.select(dim, source))
        self.reset(source)

    def _slot_tensors(self) -> list[tuple[torch.Tensor, int]]:
        """Every per-slot state tensor with its slot dimension."""
        found = [(self.kv.keys, 1), (self.kv.values, 1), (self.kv.positions, 0)]
        rows = [self.next_position, self.pending, self.user_delayed, self.forced_text]
        for params in (self.text_params, self.audio_params):
            rows += [params.greedy, params.temperature, params.top_k, params.seed]
        return found + [(t, 0) for t in [*rows, *self.mimi_state.tensors()]]

    # ---- the step -----------------------------------------------------------------------------------

    def step(self, pcm: torch.Tensor, active: torch.Tensor) -> StepResult:
        """Run one frame for every slot where `active` (bool [capacity], a host tensor) is True, with pcm
        float32 [capacity, 1920] their caller audio; other slots are left untouched.

        Returns slots [0, n) of the step size n that ran. The tensors are the runner's own: read them
        before the next step."""
        rows = self._rows[self.rows_for(active)]
        rows.pcm_in.copy_(pcm[: rows.count])
        rows.active_in.copy_(active[: rows.count])
        return self._run(rows)

    def step_codes(self, user: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
        """The LM part of a step alone, from the caller's Mimi codes [capacity, 8]; returns the emitted
        frame [n, 17] of slots [0, n) (never graphed: for tests and the benchmark)."""
        rows = self._rows[self.rows_for(active)]
        rows.active_in.copy_(active[: rows.count])
        return self._lm_step(rows, user[: rows.count].to(self.lm.device))

    def rows_for(self, active: torch.Tensor) -> int:
        """The smallest step size covering every active slot (decided on the host: no device sync)."""
        if active.device.type != "cpu" or active.shape != (self.capacity,):
            raise ValueError(f"active must be a host bool tensor [{self.capacity}], got {active}")
        live = torch.nonzero(active)
        return self.size_covering(int(live[-1, 0]) + 1 if live.numel() else 1)

    def size_covering(self, slots: int) -> int:
        """The step size that runs slots [0, slots)."""
        return next(count for count in self.step_sizes if count >= slots)

    def profile(self, repeats: int = 3) -> dict[int, float]:
        """Median seconds a step of each size takes, timed after one untimed pass over every size: the
        first run of a size pays its kernels' set-up (so this is also the warm-up), and a profile that
        timed it would say the engine is slower than it is."""
        for count in self.step_sizes:
            self.time_steps(count, 1)
        return {count: statistics.median(self.time_steps(count, repeats)) for count in self.step_sizes}

    def time_steps(self, size: int, repeats: int) -> list[float]:
        """Seconds each of `repeats` steps of `size` takes (results fetched to the host), run with every
        slot idle: the same work as a busy step of that size, and no state changes. Runs between live
        steps on the model thread (their inputs are copied in afresh by each `step`)."""
        self._active_in.zero_()
        rows = self._rows[size]
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            self._run(rows).tokens.cpu()
            times.append(time.perf_counter() - started)
        return times

    def _run(self, rows: SlotRows) -> StepResult:
        captured = self._graphs.get(rows.count)
        if captured is None:
            return self._step(rows)
        graph, result = captured
        graph.replay()
        return result

    @torch.inference_mode()
    def _step(self, rows: SlotRows) -> StepResult:
        user = self.mimi.encode_step(rows.pcm_in, rows.codec, rows.active_in)
        tokens = self._lm_step(rows, user)
        pcm = self.mimi.decode_step(tokens[:, 1 : 1 + AGENT_CODEBOOKS], rows.codec, rows.active_in)
        return StepResult(pcm, tokens)

    @torch.inference_mode()
    def _lm_step(self, rows: SlotRows, user: torch.Tensor) -> torch.Tensor:
        """Temporal then depth transformer for one position of every active slot; returns the emitted
        frame [n, 17] and moves each active slot on to its next input position."""
        lm, active, position = self.lm, rows.active_in, rows.next_position
        x = torch.cat([rows.pending, user[:, :1], rows.user_delayed], dim=1)
        z = lm.temporal(lm.embed(x[:, None]), position[:, None], rows.kv, active)[:, 0]
        upcoming = position + 1
        text = lm.text_token(z, rows.text_params, upcoming)
        text = torch.where(rows.forced_text >= 0, rows.forced_text, text)
        audio = lm.depformer_frame(z, text, AGENT_CODEBOOKS, rows.audio_params, upcoming)
        emitted = torch.cat([rows.pending[:, :2], audio[:, 1:], user], dim=1)
        keep = ~active[:, None]
        rows.pending.copy_(torch.where(keep, rows.pending, torch.cat([text[:, None], audio], dim=1)))
        rows.user_delayed.copy_(torch.where(keep, rows.user_delayed, user[:, 1:]))
        position.add_(active.long())
        return emitted

    def warmup(self, steps: int = 2) -> None:
        """Run every step size with all slots idle (which changes no state), so first-use kernel set-up
        does not land on a call."""
        self._active_in.zero_()
        for count in self.step_sizes:
            for _ in range(steps):
                self._step(self._rows[count])

    def capture_graphs(self) -> None:
        """Record every step size as a CUDA graph (largest first, sharing one memory pool: they never run
        at once). A step of a few sessions is bound by launching thousands of small kernels; a graph
        launches them all at once. The graphs read and write the runner's tensors in place, so prefill
        and configure keep working on the same state between replays."""
        device = self.lm.device
        if device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device; this runner is on {device}")
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):  # warm-up off the default stream, as capture requires
            self.warmup()
        torch.cuda.current_stream(device).wait_stream(side)
        pool = None
        for count in sorted(self.step_sizes, reverse=True):
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                result = self._step(self._rows[count])
            pool = graph.pool()
            self._graphs[count] = (graph, result)

    @property
    def graphed(self) -> bool:
        return bool(self._graphs)


def prompt_frame_tokens() -> list[int]:
    """The frame every session emits first in the reference: PAD text, agent silence, user sine."""
    return [TEXT_PAD, *SILENCE_TOKENS, *SINE_TOKENS]


def _params(capacity: int, device: torch.device) -> SamplingParams:
    return SamplingParams(
        greedy=torch.ones(capacity, dtype=torch.bool, device=device),
        temperature=torch.ones(capacity, dtype=torch.float32, device=device),
        top_k=torch.ones(capacity, dtype=torch.long, device=device),
        seed=torch.zeros(capacity, dtype=torch.long, device=device),
        width=MAX_TOP_K,
    )
