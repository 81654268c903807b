"""Tests for engine.loading: locating checkpoint files (local and hub cache), checked safetensors reads,
the text tokenizer and role-prompt wrapping, against the tiny PersonaPlex fixture."""

from __future__ import annotations

import ast
import hashlib
import io
import json
import os
import shutil
import struct
import subprocess
import sys
import tarfile
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from tinymodel import FIXTURE, KEY_LISTS, REPO_ROOT

from engine.loading import (
    CONFIG_FILE,
    DEFAULT_HF_REPO,
    LM_FILE,
    MIMI_FILE,
    TEXT_TOKENIZER_FILE,
    VOICES_ARCHIVE,
    VOICES_DIR,
    CheckpointError,
    encode_role_prompt,
    extract_voices_archive,
    load_safetensors_checked,
    load_text_tokenizer,
    resolve_checkpoint,
    wrap_role_prompt,
)

REFERENCE_STEPS = FIXTURE / "runs" / "greedy_pt" / "steps.json"


def _published_layout(root: Path) -> Path:
    """A checkpoint directory with the published file names, made of the tiny fixture's files."""
    root.mkdir(parents=True, exist_ok=True)
    (root / LM_FILE).symlink_to(FIXTURE / "tiny_lm.safetensors")
    (root / MIMI_FILE).symlink_to(FIXTURE / "tiny_mimi.safetensors")
    (root / TEXT_TOKENIZER_FILE).symlink_to(FIXTURE / "tokenizer_tiny.model")
    return root


def _voices_tgz(path: Path, extra_members: dict[str, bytes] | None = None) -> Path:
    """A voices archive laid out like the published one (top directory `voices/`)."""
    with tarfile.open(path, "w:gz") as tar:
        for voice in sorted((FIXTURE / "voices").iterdir()):
            tar.add(voice, arcname=f"{VOICES_DIR}/{voice.name}")
        for name, data in (extra_members or {}).items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def _header_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Tensor shapes from a safetensors header, parsed by hand (independently of the safetensors package)."""
    with path.open("rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        header = json.loads(handle.read(length))
    return {name: tuple(entry["shape"]) for name, entry in header.items() if name != "__metadata__"}


def _key_list(tsv: Path) -> dict[str, tuple[int, ...]]:
    rows = (line.split("\t") for line in tsv.read_text().splitlines() if line.strip())
    return {row[0]: tuple(ast.literal_eval(row[1])) for row in rows}


# --- local directories -----------------------------------------------------------------------------------


def test_local_directory_resolves_published_file_names(tmp_path: Path) -> None:
    root = _published_layout(tmp_path / "ckpt")
    shutil.copytree(FIXTURE / "voices", root / VOICES_DIR)

    files = resolve_checkpoint(root)

    assert files.lm == root / LM_FILE
    assert files.mimi == root / MIMI_FILE
    assert files.tokenizer == root / TEXT_TOKENIZER_FILE
    assert files.voices_dir == root / VOICES_DIR
    assert files.config is None


def test_local_directory_uses_our_config_file_not_the_hubs_config_json(tmp_path: Path) -> None:
    root = _published_layout(tmp_path / "ckpt")
    shutil.copytree(FIXTURE / "voices", root / VOICES_DIR)
    (root / "config.json").write_text('{"architectures": ["unrelated hub metadata"]}')
    shutil.copy(FIXTURE / "tiny_config.json", root / CONFIG_FILE)

    files = resolve_checkpoint(root)

    assert files.config == root / CONFIG_FILE
    tiny = json.loads((FIXTURE / "tiny_config.json").read_text())
    assert files.model_config().lm.dim == tiny["lm"]["dim"]


def test_hub_config_json_alone_is_not_taken_for_a_model_config(tmp_path: Path) -> None:
    root = _published_layout(tmp_path / "ckpt")
    shutil.copytree(FIXTURE / "voices", root / VOICES_DIR)
    shutil.copy(FIXTURE / "tiny_config.json", root / "config.json")

    assert resolve_checkpoint(root).config is None


def test_explicit_paths_override_directory_files(tmp_path: Path) -> None:
    root = _published_layout(tmp_path / "ckpt")
    shutil.copytree(FIXTURE / "voices", root / VOICES_DIR)

    files = resolve_checkpoint(
        root,
        lm=FIXTURE / "tiny_lm.safetensors",
        voices=FIXTURE / "voices",
        config=FIXTURE / "tiny_config.json",
    )

    assert files.lm == FIXTURE / "tiny_lm.safetensors"
    assert files.mimi == root / MIMI_FILE
    assert files.voices_dir == FIXTURE / "voices"
    assert files.config == FIXTURE / "tiny_config.json"


def test_missing_local_file_error_names_file_directory_and_how_to_get_it(tmp_path: Path) -> None:
    root = _published_layout(tmp_path / "ckpt")
    shutil.copytree(FIXTURE / "voices", root / VOICES_DIR)
    (root / MIMI_FILE).unlink()

    with pytest.raises(CheckpointError) as caught:
        resolve_checkpoint(root)

    message = str(caught.value)
    assert MIMI_FILE in message and str(root) in message
    assert f"hf download {DEFAULT_HF_REPO} {MIMI_FILE}" in message
    assert f"duplexgate engine init-random {root}" in message


def test_missing_checkpoint_directory_is_reported(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        resolve_checkpoint(tmp_path / "nowhere")


def test_voices_archive_in_local_directory_is_extracted_next_to_it(tmp_path: Path) -> None:
    root = _published_layout(tmp_path / "ckpt")
    _voices_tgz(root / VOICES_ARCHIVE)

    files = resolve_checkpoint(root)

    assert files.voices_dir == root / VOICES_DIR
    assert sorted(p.name for p in files.voices_dir.iterdir()) == sorted(
        p.name for p in (FIXTURE / "voices").iterdir()
    )
    voice = "voice_tiny.pt"
    assert (files.voices_dir / voice).read_bytes() == (FIXTURE / "voices" / voice).read_bytes()
    assert [p.name for p in root.iterdir() if p.name.startswith(".voices-")] == []


def test_voices_archive_is_extracted_only_once(tmp_path: Path) -> None:
    archive = _voices_tgz(tmp_path / VOICES_ARCHIVE)
    first = extract_voices_archive(archive)
    marker = first / "marker"
    marker.write_text("kept")

    second = extract_voices_archive(archive)

    assert second == first and marker.read_text() == "kept"


def test_archive_member_escaping_with_parent_path_is_refused(tmp_path: Path) -> None:
    box = tmp_path / "box"
    box.mkdir()
    archive = _voices_tgz(box / VOICES_ARCHIVE, extra_members={"../evil": b"pwned"})

    with pytest.raises(CheckpointError) as caught:
        extract_voices_archive(archive)

    assert str(archive) in str(caught.value) and "../evil" in str(caught.value)
    assert not (tmp_path / "evil").exists()
    assert sorted(p.name for p in box.iterdir()) == [VOICES_ARCHIVE]  # no voices/, no staging left


# --- hub cache (huggingface_hub reads its environment at import, so each case runs in a fresh interpreter) --

_RESOLVE_FROM_HUB = """
import json
from engine.loading import CheckpointError, resolve_checkpoint
try:
    files = resolve_checkpoint(None)
except CheckpointError as exc:
    print(json.dumps({"error": str(exc)}))
else:
    print(json.dumps({name: str(value) for name, value in vars(files).items()}))
"""


def _resolve_from_hub(tmp_path: Path, **env: str) -> dict[str, str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
    clean.update(
        HF_HOME=str(tmp_path / "hf-home"),  # no stored token or settings from this machine
        HF_HUB_CACHE=str(tmp_path / "hub-cache"),
        HF_HUB_DISABLE_TELEMETRY="1",
        PYTHONPATH=str(REPO_ROOT),
        **env,
    )
    proc = subprocess.run(
        [sys.executable, "-c", _RESOLVE_FROM_HUB],
        env=clean,
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=90,
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _populate_hub_cache(cache: Path, repo: str, files: dict[str, Path]) -> Path:
    """Lay `files` out as huggingface_hub caches a revision: blobs by hash, snapshot symlinks, refs/main."""
    repo_dir = cache / f"models--{repo.replace('/', '--')}"
    commit = hashlib.sha1(repo.encode()).hexdigest()
    snapshot = repo_dir / "snapshots" / commit
    for folder in (repo_dir / "blobs", repo_dir / "refs", snapshot):
        folder.mkdir(parents=True, exist_ok=True)
    (repo_dir / "refs" / "main").write_text(commit)
    for name, source in files.items():
        data = source.read_bytes()
        blob = repo_dir / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snapshot / name).symlink_to(os.path.relpath(blob, snapshot))
    return snapshot


def test_offline_hub_cache_resolves_every_file_and_extracts_voices(tmp_path: Path) -> None:
    archive = _voices_tgz(tmp_path / VOICES_ARCHIVE)
    snapshot = _populate_hub_cache(
        tmp_path / "hub-cache",
        DEFAULT_HF_REPO,
        {
            LM_FILE: FIXTURE / "tiny_lm.safetensors",
            MIMI_FILE: FIXTURE / "tiny_mimi.safetensors",
            TEXT_TOKENIZER_FILE: FIXTURE / "tokenizer_tiny.model",
            VOICES_ARCHIVE: archive,
        },
    )

    files = _resolve_from_hub(tmp_path, HF_HUB_OFFLINE="1")

    assert "error" not in files, files.get("error")
    assert files["lm"] == str(snapshot / LM_FILE)
    assert files["mimi"] == str(snapshot / MIMI_FILE)
    assert files["tokenizer"] == str(snapshot / TEXT_TOKENIZER_FILE)
    assert files["voices_dir"] == str(snapshot / VOICES_DIR)
    assert files["config"] == "None"
    assert (snapshot / VOICES_DIR / "voice_tiny.pt").read_bytes() == (
        FIXTURE / "voices" / "voice_tiny.pt"
    ).read_bytes()


def test_offline_with_empty_cache_says_hf_hub_offline_and_which_file(tmp_path: Path) -> None:
    outcome = _resolve_from_hub(tmp_path, HF_HUB_OFFLINE="1")

    assert "HF_HUB_OFFLINE" in outcome["error"]
    assert f"{LM_FILE} of {DEFAULT_HF_REPO} is not in the Hugging Face cache" in outcome["error"]


class _RefusingHub(BaseHTTPRequestHandler):
    """A loopback stand-in for the hub that refuses every request the way huggingface.co refuses access."""

    status = 403
    error_code: str | None = "GatedRepo"

    def _refuse(self) -> None:
        self.send_response(self.status)
        if self.error_code:
            self.send_header("X-Error-Code", self.error_code)
        self.send_header("X-Error-Message", "Access to this model is restricted.")
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_HEAD = do_GET = _refuse

    def log_message(self, format: str, *args: object) -> None:  # keep test output quiet
        pass


@pytest.fixture
def refusing_hub(request: pytest.FixtureRequest) -> Iterator[str]:
    status, error_code = request.param
    handler = type("Handler", (_RefusingHub,), {"status": status, "error_code": error_code})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


@pytest.mark.parametrize("refusing_hub", [(403, "GatedRepo")], indirect=True)
def test_gated_repo_error_says_accept_licence_and_export_hf_token(tmp_path: Path, refusing_hub: str) -> None:
    outcome = _resolve_from_hub(tmp_path, HF_ENDPOINT=refusing_hub)

    assert f"https://huggingface.co/{DEFAULT_HF_REPO}" in outcome["error"]
    assert "export HF_TOKEN" in outcome["error"]
    assert LM_FILE in outcome["error"]


@pytest.mark.parametrize("refusing_hub", [(401, None)], indirect=True)
def test_unauthorised_hub_answer_says_accept_licence_and_export_hf_token(
    tmp_path: Path, refusing_hub: str
) -> None:
    outcome = _resolve_from_hub(tmp_path, HF_ENDPOINT=refusing_hub)

    assert f"https://huggingface.co/{DEFAULT_HF_REPO}" in outcome["error"]
    assert "export HF_TOKEN" in outcome["error"]


# --- checked safetensors reads -----------------------------------------------------------------------------


def test_fixture_lm_loads_every_tensor_with_the_shape_in_its_header() -> None:
    path = FIXTURE / "tiny_lm.safetensors"
    expected = _header_shapes(path)

    tensors = load_safetensors_checked(path, expected, "LM")

    assert {name: tuple(t.shape) for name, t in tensors.items()} == expected
    assert all(t.dtype == torch.bfloat16 for t in tensors.values())


def test_dtype_cast_applies_to_floating_tensors_only(tmp_path: Path) -> None:
    weight = torch.linspace(-1, 1, 12, dtype=torch.float32).reshape(3, 4)
    counter = torch.arange(5, dtype=torch.int64)
    save_file({"weight": weight, "counter": counter}, str(tmp_path / "w.safetensors"))

    tensors = load_safetensors_checked(
        tmp_path / "w.safetensors", {"weight": (3, 4), "counter": (5,)}, "test", dtype=torch.bfloat16
    )

    assert tensors["weight"].dtype == torch.bfloat16
    assert torch.equal(tensors["weight"], weight.to(torch.bfloat16))
    assert tensors["counter"].dtype == torch.int64 and torch.equal(tensors["counter"], counter)


def test_wrong_shape_error_names_file_key_and_both_shapes() -> None:
    path = FIXTURE / "tiny_lm.safetensors"
    expected = _header_shapes(path)
    found_shape = expected["out_norm.alpha"]
    expected["out_norm.alpha"] = (*found_shape[:-1], found_shape[-1] + 1)

    with pytest.raises(CheckpointError) as caught:
        load_safetensors_checked(path, expected, "LM")

    message = str(caught.value)
    assert str(path) in message and "0 missing, 0 unexpected, 1 with a wrong shape" in message
    assert f"out_norm.alpha file {found_shape} vs model {expected['out_norm.alpha']}" in message


def test_missing_key_error_names_file_and_key() -> None:
    path = FIXTURE / "tiny_lm.safetensors"
    expected = _header_shapes(path)
    expected["transformer.layers.2.norm1.alpha"] = expected["transformer.layers.1.norm1.alpha"]

    with pytest.raises(CheckpointError) as caught:
        load_safetensors_checked(path, expected, "LM")

    message = str(caught.value)
    assert str(path) in message and "1 missing, 0 unexpected, 0 with a wrong shape" in message
    assert "missing keys (1): transformer.layers.2.norm1.alpha" in message


def test_unexpected_key_error_names_file_and_key() -> None:
    path = FIXTURE / "tiny_mimi.safetensors"
    expected = _header_shapes(path)
    del expected["upsample.convtr.convtr.convtr.weight"]

    with pytest.raises(CheckpointError) as caught:
        load_safetensors_checked(path, expected, "Mimi")

    message = str(caught.value)
    assert str(path) in message and "0 missing, 1 unexpected, 0 with a wrong shape" in message
    assert "unexpected keys (1): upsample.convtr.convtr.convtr.weight" in message


def test_tiny_lm_against_the_7b_key_list_reports_all_problems_in_one_capped_error() -> None:
    path = FIXTURE / "tiny_lm.safetensors"
    found = _header_shapes(path)
    expected = _key_list(KEY_LISTS / "lm_state_dict_keys_depq16.tsv")
    n_missing = len(expected.keys() - found.keys())
    n_unexpected = len(found.keys() - expected.keys())
    n_wrong = sum(found[k] != expected[k] for k in found.keys() & expected.keys())

    with pytest.raises(CheckpointError) as caught:
        load_safetensors_checked(path, expected, "LM")

    message = str(caught.value)
    assert f"{n_missing} missing, {n_unexpected} unexpected, {n_wrong} with a wrong shape" in message
    assert f"... and {n_missing - 10} more" in message
    assert f"... and {n_wrong - 10} more" in message
    assert len(message) < 4000  # capped: 475 keys never end up in the message


def test_truncated_safetensors_file_is_reported_as_unreadable(tmp_path: Path) -> None:
    truncated = tmp_path / LM_FILE
    truncated.write_bytes((FIXTURE / "tiny_lm.safetensors").read_bytes()[:4096])

    with pytest.raises(CheckpointError) as caught:
        load_safetensors_checked(truncated, _header_shapes(FIXTURE / "tiny_lm.safetensors"), "LM")

    assert str(truncated) in str(caught.value) and "download it again" in str(caught.value)


# --- text tokenizer and role prompt ------------------------------------------------------------------------


def test_role_prompt_encodes_to_the_reference_prompt_tokens() -> None:
    reference = json.loads(REFERENCE_STEPS.read_text())
    processor = load_text_tokenizer(FIXTURE / "tokenizer_tiny.model")

    tokens = encode_role_prompt(processor, reference["args"]["text_prompt"])

    assert tokens == reference["text_prompt_tokens"]


def test_wrap_adds_system_tags_around_the_stripped_prompt() -> None:
    assert wrap_role_prompt("  You are Alex.\n") == "<system> You are Alex. <system>"


def test_wrap_keeps_a_prompt_already_in_system_tags() -> None:
    assert wrap_role_prompt(" <system> You are Alex. <system> ") == "<system> You are Alex. <system>"


def test_empty_prompt_becomes_the_two_tags_and_encodes_to_their_tokens() -> None:
    reference = json.loads(REFERENCE_STEPS.read_text())["text_prompt_tokens"]
    processor = load_text_tokenizer(FIXTURE / "tokenizer_tiny.model")

    tokens = encode_role_prompt(processor, "")

    assert wrap_role_prompt("") == "<system>  <system>"
    half = len(tokens) // 2
    assert tokens and tokens == reference[:half] + reference[-half:]  # the reference's opening + closing tag


def test_missing_tokenizer_file_is_reported(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=f"{tmp_path / TEXT_TOKENIZER_FILE}.* does not exist"):
        load_text_tokenizer(tmp_path / TEXT_TOKENIZER_FILE)


def test_corrupt_tokenizer_file_is_reported(tmp_path: Path) -> None:
    corrupt = tmp_path / TEXT_TOKENIZER_FILE
    corrupt.write_bytes((FIXTURE / "tokenizer_tiny.model").read_bytes()[:100])

    with pytest.raises(CheckpointError, match="not a valid SentencePiece model"):
        load_text_tokenizer(corrupt)


def test_tokenizer_with_another_vocabulary_size_is_refused() -> None:
    tiny = json.loads((FIXTURE / "tiny_config.json").read_text())
    other_size = tiny["lm"]["text_card"] + 1

    with pytest.raises(CheckpointError, match=f"{tiny['lm']['text_card']} pieces"):
        load_text_tokenizer(FIXTURE / "tokenizer_tiny.model", expected_pieces=other_size)
