"""Find and load the PersonaPlex checkpoint: LM and Mimi weights, text tokenizer, voice prompts, config.

Files come from a local directory or from a Hugging Face hub repo (through `huggingface_hub`'s cache, which
honours `HF_TOKEN`, `HF_HUB_CACHE` and `HF_HUB_OFFLINE`). Every failure is a `CheckpointError` whose message
names the file concerned and says what to do about it.
"""

from __future__ import annotations

import re
import shutil
import tarfile
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from engine.config import TEXT_PAD, ModelConfig

if TYPE_CHECKING:  # torch and sentencepiece are imported where used: resolving paths needs neither
    import sentencepiece
    import torch

__all__ = [
    "CONFIG_FILE",
    "DEFAULT_HF_REPO",
    "LM_FILE",
    "MIMI_FILE",
    "TEXT_TOKENIZER_FILE",
    "VOICES_ARCHIVE",
    "VOICES_DIR",
    "CheckpointError",
    "CheckpointFiles",
    "encode_role_prompt",
    "extract_voices_archive",
    "load_safetensors_checked",
    "load_text_tokenizer",
    "resolve_checkpoint",
    "wrap_role_prompt",
]

DEFAULT_HF_REPO = "nvidia/personaplex-7b-v1"
# File names as published in the hub repo (engine-spec §1).
LM_FILE = "model.safetensors"
MIMI_FILE = "tokenizer-e351c8d8-checkpoint125.safetensors"
TEXT_TOKENIZER_FILE = "tokenizer_spm_32k_3.model"
VOICES_ARCHIVE = "voices.tgz"
VOICES_DIR = "voices"
# Our own hyper-parameter file (layout of the fixture's tiny_config.json). It deliberately does not use the
# name `config.json`: the hub repo ships an unrelated `config.json` that must never be read as ours.
# Absent means the published 7B sizes.
CONFIG_FILE = "duplexgate_config.json"

SYSTEM_TAG = "<system>"
_LIST_CAP = 10  # names shown per category in a mismatch report; the rest are counted


class CheckpointError(RuntimeError):
    """A checkpoint file is missing, unreadable or does not fit the model; the message says what to do."""


@dataclass(frozen=True)
class CheckpointFiles:
    """Where each part of a checkpoint lives on disk."""

    lm: Path
    mimi: Path
    tokenizer: Path
    voices_dir: Path
    config: Path | None  # None: the published model's sizes (ModelConfig defaults)

    def model_config(self) -> ModelConfig:
        """Hyper-parameters for these weights: our config file if there is one, else the 7B defaults."""
        if self.config is None:
            return ModelConfig()
        try:
            return ModelConfig.from_json(self.config)
        except ValueError as exc:
            raise CheckpointError(f"{exc}; fix or remove {self.config}") from exc


def resolve_checkpoint(
    source: str | Path | None = None,
    *,
    lm: str | Path | None = None,
    mimi: str | Path | None = None,
    tokenizer: str | Path | None = None,
    voices: str | Path | None = None,
    config: str | Path | None = None,
    hf_repo: str = DEFAULT_HF_REPO,
) -> CheckpointFiles:
    """Locate every checkpoint file, downloading from `hf_repo` when `source` is None.

    `source` is a directory holding the published file names (plus `voices/` or `voices.tgz`, and optionally
    `duplexgate_config.json`). Explicit per-file paths (relative to the working directory) win over both the
    directory and the hub. `voices` may be a directory of voice prompts or a `voices.tgz` archive.
    """
    explicit = {
        "lm": _explicit_file(lm, "LM weights"),
        "mimi": _explicit_file(mimi, "Mimi weights"),
        "tokenizer": _explicit_file(tokenizer, "text tokenizer"),
        "config": _explicit_file(config, "model config"),
    }
    voices_dir = _explicit_voices(voices) if voices is not None else None
    if source is not None:
        root = Path(source)
        if not root.is_dir():
            raise CheckpointError(
                f"checkpoint directory {root} does not exist or is not a directory; pass a directory holding "
                f"{LM_FILE}, {MIMI_FILE}, {TEXT_TOKENIZER_FILE} and {VOICES_ARCHIVE}, or none to use the hub "
                f"repo {hf_repo}"
            )
        found = {
            "lm": explicit["lm"] or _local_file(root, LM_FILE, hf_repo),
            "mimi": explicit["mimi"] or _local_file(root, MIMI_FILE, hf_repo),
            "tokenizer": explicit["tokenizer"] or _local_file(root, TEXT_TOKENIZER_FILE, hf_repo),
        }
        if voices_dir is None:
            voices_dir = _local_voices(root, hf_repo)
        config_path = explicit["config"]
        if config_path is None and (root / CONFIG_FILE).is_file():
            config_path = root / CONFIG_FILE
    else:
        found = {
            "lm": explicit["lm"] or _hub_file(hf_repo, LM_FILE),
            "mimi": explicit["mimi"] or _hub_file(hf_repo, MIMI_FILE),
            "tokenizer": explicit["tokenizer"] or _hub_file(hf_repo, TEXT_TOKENIZER_FILE),
        }
        if voices_dir is None:
            voices_dir = extract_voices_archive(_hub_file(hf_repo, VOICES_ARCHIVE))
        # The hub holds no file of ours; its config.json describes something else and is never fetched.
        config_path = explicit["config"]
    return CheckpointFiles(voices_dir=voices_dir, config=config_path, **found)


def _explicit_file(path: str | Path | None, what: str) -> Path | None:
    if path is None:
        return None
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{what} file {path} (given explicitly) does not exist or is not a file")
    return path


def _explicit_voices(path: str | Path) -> Path:
    path = Path(path)
    if path.is_dir():
        return path
    if path.is_file():
        return extract_voices_archive(path)
    raise CheckpointError(
        f"voices {path} (given explicitly) does not exist; give a directory of .pt/.wav voice prompts "
        f"or a {VOICES_ARCHIVE} archive"
    )


def _download_hint(root: Path, filename: str, hf_repo: str) -> str:
    return (
        f"Download it with `hf download {hf_repo} {filename} --local-dir {root}` (the repo is gated: accept "
        f"the licence at https://huggingface.co/{hf_repo} and export HF_TOKEN first), or create a random "
        f"demo model with `duplexgate engine init-random {root}`."
    )


def _local_file(root: Path, filename: str, hf_repo: str) -> Path:
    path = root / filename
    if not path.is_file():
        raise CheckpointError(
            f"{filename} is missing from checkpoint directory {root}. "
            f"{_download_hint(root, filename, hf_repo)}"
        )
    return path


def _local_voices(root: Path, hf_repo: str) -> Path:
    if (root / VOICES_DIR).is_dir():
        return root / VOICES_DIR
    if (root / VOICES_ARCHIVE).is_file():
        return extract_voices_archive(root / VOICES_ARCHIVE)
    raise CheckpointError(
        f"neither {VOICES_DIR}/ nor {VOICES_ARCHIVE} is in checkpoint directory {root}. "
        f"{_download_hint(root, VOICES_ARCHIVE, hf_repo)}"
    )


def _hub_file(hf_repo: str, filename: str) -> Path:
    """Fetch one file into (or find it in) the huggingface_hub cache, turning hub errors into advice."""
    from huggingface_hub import constants, hf_hub_download
    from huggingface_hub.utils import (
        EntryNotFoundError,
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
    )

    access_advice = (
        f"accept the licence at https://huggingface.co/{hf_repo} with your account, then "
        f"`export HF_TOKEN=<a token of that account>` (or run `hf auth login`) and retry"
    )
    try:
        return Path(hf_hub_download(hf_repo, filename))
    except GatedRepoError as exc:
        raise CheckpointError(
            f"cannot download {filename}: {hf_repo} is gated and this account has no access; {access_advice}"
        ) from exc
    except RepositoryNotFoundError as exc:
        raise CheckpointError(
            f"cannot download {filename}: repo {hf_repo} was not found or needs authentication; check the "
            f"repo name, and if it is gated {access_advice}"
        ) from exc
    except LocalEntryNotFoundError as exc:
        if constants.is_offline_mode():
            raise CheckpointError(
                f"HF_HUB_OFFLINE is set and {filename} of {hf_repo} is not in the Hugging Face cache "
                f"({constants.HF_HUB_CACHE}); run once with network access (unset HF_HUB_OFFLINE), or "
                f"download the files into a directory and pass that directory instead"
            ) from exc
        raise CheckpointError(
            f"cannot reach the Hugging Face hub to download {filename} of {hf_repo} and it is not in the "
            f"cache ({constants.HF_HUB_CACHE}): check the network (or HF_ENDPOINT), or pass a local "
            f"checkpoint directory"
        ) from exc
    except EntryNotFoundError as exc:
        raise CheckpointError(
            f"repo {hf_repo} has no file {filename}; it does not look like a PersonaPlex checkpoint repo "
            f"(default {DEFAULT_HF_REPO})"
        ) from exc
    except HfHubHTTPError as exc:
        status = exc.response.status_code if exc.response is not None else None
        if status in (401, 403):
            raise CheckpointError(
                f"cannot download {filename} of {hf_repo} (HTTP {status}); {access_advice}"
            ) from exc
        raise CheckpointError(f"downloading {filename} of {hf_repo} failed: {exc}") from exc


def extract_voices_archive(archive: Path) -> Path:
    """Unpack `voices.tgz` (top directory `voices/`) next to itself once and return the `voices/` directory.

    Members that would land outside the target, links and special files are refused (tarfile's "data"
    filter). Extraction goes to a temporary sibling first, so an interrupted run never leaves a half-filled
    `voices/` behind and concurrent processes do not clash.
    """
    archive = Path(archive)
    target = archive.parent / VOICES_DIR
    if target.is_dir():
        return target
    staging = Path(tempfile.mkdtemp(prefix=".voices-", dir=archive.parent))
    try:
        with tarfile.open(archive, "r:*") as tar:
            tar.extractall(staging, filter="data")
        unpacked = staging / VOICES_DIR
        if not unpacked.is_dir():
            raise CheckpointError(
                f"{archive} has no top-level {VOICES_DIR}/ directory; it is not a PersonaPlex voices archive "
                f"(delete it and download {VOICES_ARCHIVE} again)"
            )
        try:
            unpacked.rename(target)
        except OSError:
            if not target.is_dir():  # otherwise another process finished first, which is fine
                raise
    except tarfile.FilterError as exc:
        raise CheckpointError(
            f"refused to extract {archive}: member '{exc.tarinfo.name}' is unsafe ({exc}); the archive is "
            f"corrupt or tampered with, delete it and download {VOICES_ARCHIVE} again"
        ) from exc
    except (tarfile.TarError, OSError) as exc:
        raise CheckpointError(
            f"cannot extract {archive} into {archive.parent}: {exc}; check the directory is writable, or "
            f"delete the archive and download it again"
        ) from exc
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def load_safetensors_checked(
    path: str | Path,
    expected: Mapping[str, tuple[int, ...]],
    what: str,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
) -> dict[str, torch.Tensor]:
    """Read a safetensors file whose tensor names and shapes must equal `expected` exactly.

    All mismatches are reported together in one `CheckpointError`. With `dtype`, floating-point tensors are
    cast to it (the LM runs in bf16, Mimi in fp32); integer tensors are never cast.
    """
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{what} weights file {path} does not exist")
    try:
        with safe_open(str(path), framework="pt", device=str(device)) as handle:
            found = {name: tuple(handle.get_slice(name).get_shape()) for name in handle.keys()}
            report = _mismatch_report(found, expected)
            if report is None:
                tensors = {name: handle.get_tensor(name) for name in found}
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(
            f"cannot read {what} weights {path}: {exc}; the file is truncated or not a safetensors file, "
            f"download it again"
        ) from exc
    if report is not None:
        raise CheckpointError(
            f"{what} weights {path} do not match the model: {report}\nCheck that this is the {what} file for "
            f"this model's configuration (non-default sizes need a {CONFIG_FILE} next to the weights)."
        )
    if dtype is not None:
        tensors = {name: t.to(dtype) if t.is_floating_point() else t for name, t in tensors.items()}
    return tensors


def _mismatch_report(
    found: Mapping[str, tuple[int, ...]], expected: Mapping[str, tuple[int, ...]]
) -> str | None:
    missing = sorted(expected.keys() - found.keys(), key=_natural_key)
    unexpected = sorted(found.keys() - expected.keys(), key=_natural_key)
    wrong = sorted(
        (name for name in found.keys() & expected.keys() if tuple(found[name]) != tuple(expected[name])),
        key=_natural_key,
    )
    if not (missing or unexpected or wrong):
        return None
    lines = [f"{len(missing)} missing, {len(unexpected)} unexpected, {len(wrong)} with a wrong shape"]
    if missing:
        lines.append(f"  missing keys ({len(missing)}): {_capped(missing)}")
    if unexpected:
        lines.append(f"  unexpected keys ({len(unexpected)}): {_capped(unexpected)}")
    if wrong:
        shapes = [f"{name} file {tuple(found[name])} vs model {tuple(expected[name])}" for name in wrong]
        lines.append(f"  wrong shapes ({len(wrong)}): {_capped(shapes)}")
    return "\n".join(lines)


def _capped(items: list[str]) -> str:
    shown = ", ".join(items[:_LIST_CAP])
    if len(items) > _LIST_CAP:
        shown += f", ... and {len(items) - _LIST_CAP} more"
    return shown


def _natural_key(name: str) -> list[int | str]:
    """Sort `layers.2` before `layers.10` so reports read in model order."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def load_text_tokenizer(
    path: str | Path, expected_pieces: int | None = None
) -> sentencepiece.SentencePieceProcessor:
    """Load the SentencePiece text tokenizer; `expected_pieces` (the LM's text_card) catches a mix-up."""
    import sentencepiece

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(
            f"text tokenizer {path} does not exist; it is {TEXT_TOKENIZER_FILE} of the hub repo "
            f"{DEFAULT_HF_REPO}"
        )
    processor = sentencepiece.SentencePieceProcessor()
    try:
        processor.Load(str(path))
    except (RuntimeError, OSError) as exc:
        raise CheckpointError(
            f"text tokenizer {path} is not a valid SentencePiece model ({exc}); download "
            f"{TEXT_TOKENIZER_FILE} again"
        ) from exc
    if expected_pieces is not None and processor.get_piece_size() != expected_pieces:
        raise CheckpointError(
            f"text tokenizer {path} has {processor.get_piece_size()} pieces but the LM predicts "
            f"{expected_pieces} text tokens; use the tokenizer that belongs to these weights"
        )
    return processor


def wrap_role_prompt(text: str) -> str:
    """Wrap a role prompt in `<system>` tags the way the published inference does.

    The text is stripped; if it already starts and ends with `<system>` it is kept, otherwise it becomes
    `"<system> " + text + " <system>"`. An empty prompt therefore becomes `"<system>  <system>"` (two spaces),
    which still encodes to a few tokens; the published server crashes on empty prompts, we prime with the
    bare tags instead.
    """
    text = text.strip()
    if text.startswith(SYSTEM_TAG) and text.endswith(SYSTEM_TAG):
        return text
    return f"{SYSTEM_TAG} {text} {SYSTEM_TAG}"


def encode_role_prompt(processor: sentencepiece.SentencePieceProcessor, text: str) -> list[int]:
    """Token ids fed on the text stream in the role-prompt phase (no BOS/EOS; `<system>` is plain text)."""
    return list(processor.encode(wrap_role_prompt(text), out_type=int, add_bos=False, add_eos=False))


STEPS_PER_WORD = 5  # 400 ms a word when the agent is made to say something


def announcement_tokens(processor: sentencepiece.SentencePieceProcessor, text: str) -> list[int]:
    """Text tokens for a forced announcement: each word's pieces, then padding up to a speaking pace of
    about 2.5 words a second (the audio codebooks follow the text stream on their own). Gateways in front
    of remote workers count an announcement's steps with this too."""
    tokens: list[int] = []
    for word in text.split():
        pieces = processor.encode(word)
        tokens += pieces + [TEXT_PAD] * max(0, STEPS_PER_WORD - len(pieces))
    return tokens
