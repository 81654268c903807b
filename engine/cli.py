"""The engine's command-line tools: `duplexgate offline` and `duplexgate engine init-random`."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from engine.api import EngineError, Sampling

log = logging.getLogger(__name__)


def register(commands: argparse._SubParsersAction) -> None:
    offline = commands.add_parser("offline", help="run one conversation from a WAV file (no telephony)")
    offline.add_argument("--input", required=True, type=Path, help="caller audio (WAV)")
    offline.add_argument("--output", type=Path, help="agent audio (WAV, 24 kHz, the input's length)")
    offline.add_argument("--output-text", type=Path, help="JSON list: one text piece per 80 ms frame")
    offline.add_argument("--output-tokens", type=Path, help="NPZ with live_out int64 [frames, 17]")
    offline.add_argument(
        "--voice", required=True, help="voice name in the checkpoint's voices, or a .pt/.wav path"
    )
    offline.add_argument("--text-prompt", default="", help="role prompt (wrapped in <system> tags)")
    offline.add_argument("--checkpoint", help="local checkpoint directory (default: the hub repo)")
    offline.add_argument("--config", help="model config JSON (tiny_config.json layout)")
    offline.add_argument("--lm", help="LM weights (model.safetensors)")
    offline.add_argument("--mimi", help="Mimi weights (tokenizer-e351c8d8-checkpoint125.safetensors)")
    offline.add_argument("--tokenizer", help="SentencePiece model (tokenizer_spm_32k_3.model)")
    offline.add_argument("--voices", help="directory (or voices.tgz) of voice prompts")
    offline.add_argument("--hf-repo", default="nvidia/personaplex-7b-v1")
    offline.add_argument("--device", default="cpu")
    offline.add_argument(
        "--greedy", action="store_true", help="argmax decoding (reproducible across engines)"
    )
    offline.add_argument("--seed", type=int, default=0)
    offline.add_argument("--temp-audio", type=float, default=0.8)
    offline.add_argument("--temp-text", type=float, default=0.7)
    offline.add_argument("--topk-audio", type=int, default=250)
    offline.add_argument("--topk-text", type=int, default=25)
    offline.set_defaults(run=_offline)

    engine = commands.add_parser("engine", help="engine tools")
    engine_commands = engine.add_subparsers(dest="engine_command", required=True)
    init = engine_commands.add_parser(
        "init-random", help="write a random demo checkpoint (its audio is noise)"
    )
    init.add_argument("directory", type=Path)
    init.add_argument("--size", default="tiny", choices=["tiny"])
    init.add_argument("--seed", type=int, default=0)
    init.set_defaults(run=_init_random)


def _offline(args: argparse.Namespace) -> int:
    from engine.loading import CheckpointError

    try:
        return _run_offline(args)
    except (CheckpointError, EngineError, ValueError, OSError) as exc:
        print(f"duplexgate offline: {exc}", file=sys.stderr)
        return 2


def _run_offline(args: argparse.Namespace) -> int:
    from engine.loading import resolve_checkpoint
    from engine.offline import read_input, run_offline, write_outputs

    # Bad settings are reported before anything is loaded or downloaded.
    sampling = Sampling(args.greedy, args.temp_audio, args.temp_text, args.topk_audio, args.topk_text)
    voices = args.voices
    if voices is None and Path(args.voice).suffix in (".pt", ".wav"):
        voices = str(Path(args.voice).parent)
    files = resolve_checkpoint(
        args.checkpoint,
        lm=args.lm,
        mimi=args.mimi,
        tokenizer=args.tokenizer,
        voices=voices,
        config=args.config,
        hf_repo=args.hf_repo,
    )
    result = run_offline(
        files, args.voice, args.text_prompt, read_input(args.input), sampling, args.seed, args.device
    )
    write_outputs(result, args.output, args.output_text, args.output_tokens)
    words = "".join(piece for piece in result.text if piece not in ("PAD", "EPAD"))
    print(f"{len(result.text)} frames; agent text: {words.strip()[:200]}", file=sys.stderr)
    return 0


def _init_random(args: argparse.Namespace) -> int:
    from engine.checkpoint import NOISE_NOTICE, write_random_checkpoint

    out = write_random_checkpoint(args.directory, size=args.size, seed=args.seed)
    print(f"wrote a random {args.size} checkpoint to {out}\nNOTE: {NOISE_NOTICE}")
    return 0
