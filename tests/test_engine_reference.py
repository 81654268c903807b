"""The engine reproduces the published inference code on the tiny fixture checkpoint, bit for bit."""

from __future__ import annotations

import json
import subprocess
import sys
import wave

import numpy as np
import pytest
import torch
from tinymodel import FIXTURE, RUNS, context_config, fixture_files, reference_prompt, run_tokens

from engine.api import Sampling
from engine.offline import read_input, run_offline

VOICES = {"greedy_pt": "voice_tiny.pt", "greedy_wav": "voice_tiny.wav", "greedy_ctx24": "voice_tiny.pt"}


@pytest.fixture(autouse=True)
def one_thread():
    # The reference outputs were recorded with one CPU thread.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def reference_wav(run: str) -> np.ndarray:
    with wave.open(str(FIXTURE / "runs" / run / "output.wav")) as wav:
        return np.frombuffer(wav.readframes(wav.getnframes()), "<i2").astype(np.float32)


@pytest.fixture(scope="module")
def offline_results(tmp_path_factory):
    results = {}
    pcm = read_input(FIXTURE / "input_user.wav")
    for run in RUNS:
        config = context_config(tmp_path_factory.mktemp(run), 24) if run.endswith("ctx24") else None
        files = fixture_files(config)
        voice = str(FIXTURE / "voices" / VOICES[run])
        results[run] = run_offline(files, voice, reference_prompt(), pcm, Sampling(greedy=True), seed=0)
    return results


@pytest.mark.parametrize("run", RUNS)
def test_live_tokens_match_reference_exactly(offline_results, run):
    ours, ref = offline_results[run].tokens, run_tokens(run)["live_out"]
    assert ours.shape == ref.shape == (138, 17)
    mismatched_rows = np.flatnonzero((ours != ref).any(axis=1))
    assert mismatched_rows.size == 0, f"{run}: first differing frame {mismatched_rows[:5]}"


@pytest.mark.parametrize("run", RUNS)
def test_caller_codes_match_reference(offline_results, run):
    # Frame i (i >= 1) carries the Mimi codes of input frame i-1 in its user streams.
    ours = offline_results[run].tokens[1:, 9:]
    assert np.array_equal(ours, run_tokens(run)["live_user_codes"][:-1])


@pytest.mark.parametrize("run", RUNS)
def test_text_pieces_match_reference(offline_results, run):
    expected = json.loads((FIXTURE / "runs" / run / "output_text.json").read_text())
    assert offline_results[run].text == expected


@pytest.mark.parametrize("run", RUNS)
def test_decoded_audio_matches_reference_within_1e4(offline_results, run):
    ours = offline_results[run].pcm
    ref = reference_wav(run) / 32767.0  # the reference writer scales by 32767 and truncates
    assert ours.shape == ref.shape
    assert float(np.abs(np.clip(ours, -1, 1) - ref).max()) < 1e-4


def test_ctx24_run_differs_from_full_context_run(offline_results):
    # Guards the ring-wrap test against being vacuous: the 24-step window must change the outputs.
    assert not np.array_equal(offline_results["greedy_ctx24"].tokens, offline_results["greedy_pt"].tokens)


def test_offline_cli_writes_the_contract_outputs(tmp_path):
    out = {"wav": tmp_path / "out.wav", "json": tmp_path / "out.json", "npz": tmp_path / "out.npz"}
    cmd = [
        sys.executable,
        "-m",
        "gateway.cli",
        "offline",
        "--input",
        str(FIXTURE / "input_user.wav"),
        "--output",
        str(out["wav"]),
        "--output-text",
        str(out["json"]),
        "--output-tokens",
        str(out["npz"]),
        "--voice",
        str(FIXTURE / "voices" / "voice_tiny.pt"),
        "--text-prompt",
        reference_prompt(),
        "--config",
        str(FIXTURE / "tiny_config.json"),
        "--lm",
        str(FIXTURE / "tiny_lm.safetensors"),
        "--mimi",
        str(FIXTURE / "tiny_mimi.safetensors"),
        "--tokenizer",
        str(FIXTURE / "tokenizer_tiny.model"),
        "--greedy",
    ]
    done = subprocess.run(
        cmd, capture_output=True, text=True, timeout=300, env={"OMP_NUM_THREADS": "1", **_env()}
    )
    assert done.returncode == 0, done.stderr
    with np.load(out["npz"]) as npz:
        live_out = npz["live_out"]
    assert live_out.dtype == np.int64
    assert np.array_equal(live_out, run_tokens("greedy_pt")["live_out"])
    assert len(json.loads(out["json"].read_text())) == live_out.shape[0]
    with wave.open(str(out["wav"])) as wav, wave.open(str(FIXTURE / "input_user.wav")) as inp:
        assert (wav.getframerate(), wav.getnframes()) == (24000, inp.getnframes())


def test_offline_cli_names_a_missing_checkpoint_file(tmp_path):
    cmd = [
        sys.executable,
        "-m",
        "gateway.cli",
        "offline",
        "--input",
        str(FIXTURE / "input_user.wav"),
        "--voice",
        "NATF2",
        "--checkpoint",
        str(tmp_path),
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=_env())
    assert done.returncode == 2
    assert "model.safetensors" in done.stderr and str(tmp_path) in done.stderr


def test_offline_cli_refuses_sampling_settings_out_of_range_before_loading(tmp_path):
    cmd = [sys.executable, "-m", "gateway.cli", "offline", "--input", str(FIXTURE / "input_user.wav")]
    cmd += ["--voice", "NATF2", "--checkpoint", str(tmp_path), "--topk-audio", "1000"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=_env())
    assert done.returncode == 2
    assert "topk_audio must be an integer from 1 to 256, got 1000" in done.stderr
    assert "model.safetensors" not in done.stderr


def _env() -> dict[str, str]:
    import os

    return {k: v for k, v in os.environ.items()}
