"""The engine inside the gateway process: pick the device, load (or create) a checkpoint, size the slots.

With no checkpoint configured, a random tiny checkpoint is written once under the duplexgate home
directory and served with a loud notice that its audio is noise, so the whole pipeline can be tried on
any machine.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import torch

from engine.api import EngineError
from engine.checkpoint import NOISE_NOTICE, load_models, write_random_checkpoint
from engine.loading import (
    DEFAULT_HF_REPO,
    TEXT_TOKENIZER_FILE,
    CheckpointError,
    CheckpointFiles,
    encode_role_prompt,
    load_text_tokenizer,
    resolve_checkpoint,
)
from engine.runner import BatchRunner
from engine.worker import EngineWorker

if TYPE_CHECKING:
    from engine.remote.client import RemoteEngine

log = logging.getLogger(__name__)

CPU_SLOTS = 8
MAX_SLOTS = 64
GPU_RESERVE_BYTES = 4 << 30  # CUDA context, cuBLAS workspace, graphs and activations


class EngineSettings(Protocol):
    checkpoint: str  # local directory, hub repo id, or "" for the random demo model
    device: str  # "cuda", "cuda:1", "cpu", or "" to pick
    cuda_graphs: bool  # on CUDA, replay each step size from a CUDA graph
    cpu_threads: int  # torch threads for a CPU engine
    slots: int  # calls held at once; 0: as many as fit (GPU memory), 8 on a CPU
    admit_fraction: float  # admit while steps take at most this share of the 80 ms frame


def home_dir() -> Path:
    return Path(os.environ.get("DUPLEXGATE_HOME", Path.home() / ".cache" / "duplexgate"))


def checkpoint_source(checkpoint: str) -> Path | str:
    """What `[engine] checkpoint` names: a local directory (a Path) or a hub repo id (a str)."""
    local = Path(checkpoint).expanduser()
    if local.is_dir():
        return local
    if "/" in checkpoint and not checkpoint.startswith((".", "/", "~")):
        return checkpoint
    raise CheckpointError(
        f"[engine] checkpoint = '{checkpoint}' is neither a directory nor a hub repo id "
        f"like {DEFAULT_HF_REPO}"
    )


def demo_checkpoint() -> Path:
    """The random demo checkpoint served when none is configured, written once under the home directory."""
    directory = home_dir() / "random-tiny"
    if not (directory / "duplexgate_config.json").is_file():
        write_random_checkpoint(directory)
    return directory


def pick_device(name: str) -> torch.device:
    if name:
        return torch.device(name)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def create_default_engine(settings: EngineSettings) -> EngineWorker:
    device = pick_device(settings.device)
    if device.type == "cpu":
        use_cpu_threads(settings.cpu_threads)
    notice = None
    if settings.checkpoint:
        source = checkpoint_source(settings.checkpoint)
        if isinstance(source, Path):
            files = resolve_checkpoint(source)
        else:
            files = resolve_checkpoint(None, hf_repo=source)
    else:
        files = resolve_checkpoint(demo_checkpoint())
        notice = NOISE_NOTICE
        banner = "!" * 100
        log.warning("%s\n%s\n(set [engine] checkpoint in the config)\n%s", banner, notice.upper(), banner)
    if settings.slots < 0:
        raise EngineError(f"[engine] slots must be 0 (automatic) or more, got {settings.slots}")
    return build_engine(
        files,
        device,
        settings.slots or None,
        notice=notice,
        cuda_graphs=settings.cuda_graphs,
        admit_fraction=settings.admit_fraction,
    )


def use_cpu_threads(threads: int) -> None:
    """Run the model's CPU kernels on `threads` threads. One is the default: the step is small enough that
    more threads barely help on an idle machine, and when another process takes a core, threads that wait
    for each other make steps several times slower (bench/README.md)."""
    if threads < 1:
        raise EngineError(f"[engine] cpu_threads must be at least 1, got {threads}")
    torch.set_num_threads(threads)


def build_engine(
    files: CheckpointFiles,
    device: torch.device,
    capacity: int | None = None,
    notice: str | None = None,
    cuda_graphs: bool = True,
    admit_fraction: float = 0.8,
) -> EngineWorker:
    cfg = files.model_config()
    tokenizer = load_text_tokenizer(files.tokenizer)
    if tokenizer.get_piece_size() != cfg.lm.text_card:
        raise CheckpointError(
            f"text tokenizer {files.tokenizer} has {tokenizer.get_piece_size()} pieces but the LM expects "
            f"{cfg.lm.text_card}: the tokenizer and weights come from different checkpoints"
        )
    lm, mimi = load_models(files, cfg, device)
    capacity = capacity or slot_count(device, lm)
    runner = BatchRunner(lm, mimi, capacity)
    if device.type == "cuda" and cuda_graphs:
        try:
            runner.capture_graphs()  # warms every step size up first
        except RuntimeError as exc:
            raise EngineError(
                f"capturing the engine step as CUDA graphs failed on {device} ({exc}); set "
                "[engine] cuda_graphs = false to run it eagerly (slower), and please report it"
            ) from exc
    profile = runner.profile()  # also the warm-up: first-use kernel set-up does not land on a call
    log.info(
        "engine on %s: %d slots (context %d steps)%s; step ms by size: %s",
        device,
        capacity,
        cfg.lm.context,
        ", CUDA graphs" if runner.graphed else "",
        ", ".join(f"{size}: {seconds * 1000:.1f}" for size, seconds in profile.items()),
    )
    return EngineWorker(
        runner,
        tokenizer,
        files.voices_dir,
        notice=notice,
        step_profile=profile,
        admit_fraction=admit_fraction,
    )


def slot_count(device: torch.device, lm: torch.nn.Module) -> int:
    """Slots whose KV rings fit in the free accelerator memory (all allocated up front)."""
    if device.type != "cuda":
        return CPU_SLOTS
    cfg = lm.cfg
    per_slot = 2 * cfg.num_layers * cfg.context * cfg.dim * 2  # keys + values, bf16
    free, _total = torch.cuda.mem_get_info(device)
    slots = max(1, min(MAX_SLOTS, (free - GPU_RESERVE_BYTES) // per_slot))
    log.info("free GPU memory %.1f GiB, %.2f GiB per slot", free / 2**30, per_slot / 2**30)
    return int(slots)


def create_remote_engine(settings: EngineSettings, registry_url: str, key: str) -> RemoteEngine:
    """A gateway's engine when the model runs in worker processes: the workers registered at
    `registry_url`, and only the text tokenizer of `settings.checkpoint` (the workers' model) loaded here."""
    from engine.remote.client import RemoteEngine
    from engine.remote.registry import Registry

    tokenizer = load_text_tokenizer(_tokenizer_path(settings.checkpoint))
    return RemoteEngine(Registry(registry_url), key, tokenizer)


def prompt_token_counter(checkpoint: str) -> Callable[[str], int]:
    """Count role-prompt tokens with the tokenizer of `checkpoint` (as `[engine] checkpoint` names it: a local
    directory, a hub repo id, or "" for the demo model), loading only the tokenizer: what `config check` and
    `prompt render` use where no engine runs."""
    tokenizer = load_text_tokenizer(_tokenizer_path(checkpoint))
    return lambda text: len(encode_role_prompt(tokenizer, text))


def _tokenizer_path(checkpoint: str) -> Path:
    source = checkpoint_source(checkpoint) if checkpoint else demo_checkpoint()
    if isinstance(source, Path):
        return source / TEXT_TOKENIZER_FILE
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(checkpoint, TEXT_TOKENIZER_FILE))
    except Exception as exc:  # hub errors come in many types; all mean the same to the user here
        raise CheckpointError(
            f"cannot fetch {TEXT_TOKENIZER_FILE} from hub repo {checkpoint}: {exc}; check HF_TOKEN and the "
            "licence acceptance, or point [engine] checkpoint at a local directory"
        ) from None
