"""Mimi codec against the published code's recorded outputs on the tiny fixture, plus the batching rules
(independent slots, inactive slots frozen, per-slot reset) that the engine's step loop relies on."""

from __future__ import annotations

import dataclasses
import json
import wave
from pathlib import Path

import numpy as np
import pyloudnorm
import pytest
import torch
from safetensors.torch import load_file
from tinymodel import FIXTURE, KEY_LISTS

from engine.config import MimiConfig, ModelConfig
from engine.model.mimi import Mimi, MimiState

torch.set_num_threads(1)  # the reference outputs were recorded with one thread

KEY_LIST = KEY_LISTS / "mimi_state_dict_keys.tsv"
INT16_FULL_SCALE = 32767  # the reference's wav writer: clip to [-1, 1], scale by 32767, truncate
ROUNDING_AT_A_STEP = 0.02  # int16 steps: float32 rounding noise of the decoder (~3e-7 of full scale) x 2


def read_wav_int16(path: Path) -> np.ndarray:
    with wave.open(str(path)) as wav:
        assert (wav.getsampwidth(), wav.getnchannels(), wav.getframerate()) == (2, 1, 24_000), path
        return np.frombuffer(wav.readframes(wav.getnframes()), dtype="<i2")


def read_wav_float(path: Path) -> np.ndarray:
    """int16 wav as float32 in [-1, 1), as the reference's reader scales it."""
    return read_wav_int16(path).astype(np.float32) / 32768.0


def normalize_loudness(pcm: np.ndarray, sample_rate: int, target_lufs: float = -24.0) -> np.ndarray:
    """BS.1770 integrated loudness brought to `target_lufs`, as the reference prepares voice prompts."""
    meter = pyloudnorm.Meter(sample_rate)
    return pyloudnorm.normalize.loudness(pcm, meter.integrated_loudness(pcm), target_lufs)


@pytest.fixture(scope="module")
def tiny_config() -> MimiConfig:
    return ModelConfig.from_json(FIXTURE / "tiny_config.json").mimi


@pytest.fixture(scope="module")
def mimi(tiny_config: MimiConfig) -> Mimi:
    model = Mimi(tiny_config).eval()
    model.load_state_dict(load_file(FIXTURE / "tiny_mimi.safetensors"), strict=True)
    return model


@pytest.fixture(scope="module")
def user_pcm() -> torch.Tensor:
    return torch.from_numpy(read_wav_float(FIXTURE / "input_user.wav"))


def recorded_tokens(run: str) -> dict[str, np.ndarray]:
    with np.load(FIXTURE / "runs" / run / "tokens.npz") as tokens:
        return {name: tokens[name] for name in tokens.files}


@pytest.fixture(scope="module")
def decoded_agent_audio(mimi: Mimi, user_pcm: torch.Tensor) -> dict[str, np.ndarray]:
    """Each run's agent codes (live_out streams 1..8) decoded chunk by chunk, trimmed to the input."""
    decoded = {}
    for run in ("greedy_pt", "greedy_ctx24"):
        agent_codes = torch.from_numpy(recorded_tokens(run)["live_out"][:, 1:9]).T[None]
        decoded[run] = mimi.decode(agent_codes)[0, : user_pcm.shape[0]].numpy()
    return decoded


def test_module_tree_has_the_published_state_dict_keys_and_shapes() -> None:
    published = {}
    for line in KEY_LIST.read_text().splitlines():
        name, shape, _dtype = line.split("\t")
        published[name] = tuple(int(d) for d in shape.strip("()").split(",") if d.strip())
    with torch.device("meta"):
        real_size = Mimi(MimiConfig())
    ours = {name: tuple(t.shape) for name, t in real_size.state_dict().items()}
    assert ours == published


def test_tiny_checkpoint_loads_strictly_including_codebook_buffers(tiny_config: MimiConfig) -> None:
    weights = load_file(FIXTURE / "tiny_mimi.safetensors")
    model = Mimi(tiny_config)
    model.load_state_dict(weights, strict=True)
    state = model.state_dict()
    assert "quantizer.rvq_rest.vq.layers.0._codebook.cluster_usage" in state
    assert all(torch.equal(state[name], tensor) for name, tensor in weights.items())


def test_encoding_the_user_input_reproduces_the_recorded_codes(mimi: Mimi, user_pcm: torch.Tensor) -> None:
    # 138 frames: past frame 124 the transformers' 250-entry ring is full and the oldest entry hidden.
    expected = recorded_tokens("greedy_pt")["live_user_codes"]
    codes = mimi.encode(user_pcm[None])[0].T.numpy()
    assert codes.shape == expected.shape
    mismatched = np.flatnonzero((codes != expected).any(axis=1))
    assert mismatched.size == 0, f"codes differ from frame {mismatched[:5]}"


@pytest.mark.parametrize("run", ["greedy_pt", "greedy_ctx24"])
def test_decoded_agent_codes_match_the_recorded_wav_within_int16_quantisation(
    decoded_agent_audio: dict[str, np.ndarray], run: str
) -> None:
    recorded = read_wav_int16(FIXTURE / "runs" / run / "output.wav").astype(np.float64) / INT16_FULL_SCALE
    ours = np.clip(decoded_agent_audio[run], -1.0, 1.0).astype(np.float64)
    assert ours.shape == recorded.shape
    # Truncation to int16 loses up to one step (3.05e-5); float rounding adds far less.
    assert np.abs(ours - recorded).max() < 1.0 / INT16_FULL_SCALE + 1e-6


@pytest.mark.parametrize("run", ["greedy_pt", "greedy_ctx24"])
def test_decoded_agent_codes_write_the_recorded_int16_samples_but_for_float_rounding_at_a_step(
    decoded_agent_audio: dict[str, np.ndarray], run: str
) -> None:
    # On the recording's CPU every sample is identical. Elsewhere (an Intel CPU's MKL/oneDNN kernels,
    # even pinned to AVX2) float32 sums round differently by ~1e-7, which moves a value across an int16
    # truncation step only where it lies within a hair of one: such a sample may be one step off, no other.
    recorded = read_wav_int16(FIXTURE / "runs" / run / "output.wav")
    scaled = np.clip(decoded_agent_audio[run], -1.0, 1.0) * INT16_FULL_SCALE
    written = np.trunc(scaled).astype(np.int16)
    off = np.flatnonzero(written != recorded)
    off_by = np.abs(written[off].astype(np.int32) - recorded[off])
    distance_to_step = np.abs(scaled[off] - np.round(scaled[off]))
    assert off_by.max(initial=0) <= 1, f"samples {off[off_by > 1][:5]} differ by more than one step"
    at_a_step = distance_to_step < ROUNDING_AT_A_STEP
    assert at_a_step.all(), (
        f"samples {off[~at_a_step][:5]} differ yet lie up to {distance_to_step.max():.3g} from a step"
    )
    assert off.size < 0.01 * recorded.size  # rounding touches few samples; a real bug moves most of them


def test_loudness_normalised_voice_prompt_encodes_to_the_recorded_agent_codes(mimi: Mimi) -> None:
    steps = json.loads((FIXTURE / "runs" / "greedy_wav" / "steps.json").read_text())["steps"]
    expected = np.array([step["agent_in"] for step in steps if step["phase"] == "voice_prompt"])
    voice = normalize_loudness(
        read_wav_float(FIXTURE / "voices" / "voice_tiny.wav").astype(np.float64), 24_000
    )
    codes = mimi.encode(torch.from_numpy(voice.astype(np.float32))[None])[0].T.numpy()
    assert codes.shape == expected.shape == (19, 8)
    assert np.array_equal(codes, expected)


def _short_context(model: Mimi, context: int) -> Mimi:
    """The same weights with a smaller transformer ring, so slots wrap it within a short test."""
    cfg = model.cfg
    small = Mimi(dataclasses.replace(cfg, transformer=dataclasses.replace(cfg.transformer, context=context)))
    small.load_state_dict(model.state_dict(), strict=True)
    return small.eval()


class SlotFeed:
    """One caller's inputs: user frames from the fixture wav and agent codes from the recorded run."""

    def __init__(self, pcm_frames: torch.Tensor, codes: torch.Tensor, start: int) -> None:
        self.pcm_frames, self.codes, self.start = pcm_frames, codes, start

    def frame(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        at = (self.start + 3 * index) % self.codes.shape[0]
        return self.pcm_frames[at], self.codes[at]


def test_batched_slots_match_each_slot_run_alone(mimi: Mimi, user_pcm: torch.Tensor) -> None:
    model = _short_context(mimi, context=6)  # every slot wraps its ring several times, at its own steps
    frames = torch.nn.functional.pad(user_pcm, (0, 138 * 1920 - user_pcm.shape[0])).view(138, 1920)
    codes = torch.from_numpy(recorded_tokens("greedy_pt")["live_out"][:, 1:9])
    feeds = [SlotFeed(frames, codes, start) for start in (0, 40, 77)]
    # Per global step: which slots run. Slot 1 joins at step 3 and pauses at 9-10; slot 2 is reset
    # (a new call) at step 12 and restarts with another feed.
    steps = 22
    runs_at = [[True, step >= 3 and step not in (9, 10), True] for step in range(steps)]
    reset_at = {12: [False, False, True]}
    restarted = SlotFeed(frames, codes, start=101)

    state = model.init_state(3)
    got: list[list[tuple[torch.Tensor, torch.Tensor]]] = [[], [], []]
    fed = [0, 0, 0]
    segments: list[list[tuple[SlotFeed, int]]] = [[(feeds[slot], 0)] for slot in range(3)]
    for step in range(steps):
        if step in reset_at:
            mask = torch.tensor(reset_at[step])
            model.reset(state, mask)
            for slot in np.flatnonzero(reset_at[step]):
                fed[slot] = 0
                feeds[slot] = restarted
                segments[slot].append((restarted, len(got[slot])))
        active = torch.tensor(runs_at[step])
        inputs = [feeds[slot].frame(fed[slot]) for slot in range(3)]
        pcm_in = torch.stack([pcm for pcm, _ in inputs])
        codes_in = torch.stack([code for _, code in inputs])
        codes_out = model.encode_step(pcm_in, state, active)
        pcm_out = model.decode_step(codes_in, state, active)
        for slot in np.flatnonzero(runs_at[step]):
            got[slot].append((codes_out[slot].clone(), pcm_out[slot].clone()))
            fed[slot] += 1

    for slot in range(3):
        bounds = [begin for _, begin in segments[slot]] + [len(got[slot])]
        for (feed, begin), end in zip(segments[slot], bounds[1:], strict=True):
            alone = model.init_state(1)
            for index in range(end - begin):
                pcm, code = feed.frame(index)
                codes_alone = model.encode_step(pcm[None], alone)[0]
                pcm_alone = model.decode_step(code[None], alone)[0]
                batched_codes, batched_pcm = got[slot][begin + index]
                assert torch.equal(batched_codes, codes_alone), f"slot {slot} frame {begin + index}: codes"
                assert torch.equal(batched_pcm, pcm_alone), f"slot {slot} frame {begin + index}: pcm"
    assert [len(g) for g in got] == [22, 17, 22]


def _slot_rows(state: MimiState, slot: int) -> list[torch.Tensor]:
    return [tensor[slot].clone() for tensor in state.tensors()]


def _advance(model: Mimi, state: MimiState, frames: torch.Tensor, steps: int) -> None:
    codes = torch.zeros(state.batch, model.num_codebooks, dtype=torch.long)
    for step in range(steps):
        model.encode_step(frames[step : step + state.batch], state)
        model.decode_step(codes + step, state)


def test_inactive_slots_keep_their_state_bit_for_bit(mimi: Mimi, user_pcm: torch.Tensor) -> None:
    frames = user_pcm[: 8 * 1920].view(8, 1920)
    state = mimi.init_state(3)
    _advance(mimi, state, frames, steps=4)
    before = _slot_rows(state, 1)
    active = torch.tensor([True, False, True])
    mimi.encode_step(frames[4:7], state, active)
    mimi.decode_step(torch.full((3, 8), 7, dtype=torch.long), state, active)
    after = _slot_rows(state, 1)
    assert all(torch.equal(b, a) for b, a in zip(before, after, strict=True))
    assert int(state.encoder_transformer.frames[0]) == int(state.encoder_transformer.frames[1]) + 2


def test_reset_returns_only_the_masked_slots_to_the_fresh_state(mimi: Mimi, user_pcm: torch.Tensor) -> None:
    frames = user_pcm[: 8 * 1920].view(8, 1920)
    state = mimi.init_state(2)
    _advance(mimi, state, frames, steps=3)
    untouched = _slot_rows(state, 0)
    mimi.reset(state, torch.tensor([False, True]))
    fresh = _slot_rows(mimi.init_state(2), 1)
    assert all(torch.equal(r, f) for r, f in zip(_slot_rows(state, 1), fresh, strict=True))
    assert all(torch.equal(r, u) for r, u in zip(_slot_rows(state, 0), untouched, strict=True))


def test_one_frame_in_gives_one_code_frame_and_one_frame_out(mimi: Mimi) -> None:
    state = mimi.init_state(2)
    codes = mimi.encode_step(torch.zeros(2, mimi.frame_samples), state)
    pcm = mimi.decode_step(codes, state)
    assert mimi.frame_samples == 1920
    assert (codes.shape, codes.dtype) == ((2, 8), torch.int64)
    assert (pcm.shape, pcm.dtype) == ((2, 1920), torch.float32)


def test_wrong_frame_size_is_rejected_with_the_expected_shape(mimi: Mimi) -> None:
    state = mimi.init_state(2)
    with pytest.raises(ValueError, match=r"\[2, 1920\]"):
        mimi.encode_step(torch.zeros(2, 960), state)
