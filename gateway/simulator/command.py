"""`duplexgate call`: one simulated call as any carrier against a running gateway, its summary printed as
JSON and what the caller heard written to a wav; every failure is one line and an exit status."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys


def place_call(args: argparse.Namespace) -> int:
    """Place one simulated call; exit 0 only when the call ran its whole input, 1 when the gateway refused
    or ended it early or answered with no stream (with the gateway's words), 2 for bad arguments. Every
    failure is one line."""
    try:
        caller_audio, dtmf = _call_inputs(args)
        summary = asyncio.run(_place_call(args, caller_audio, dtmf))
        if summary.handshake_status == 101:
            write_wav_output(args.output, summary.heard, args.output_rate)
    except CallFailed as exc:
        print(f"duplexgate call: {exc}", file=sys.stderr)
        return exc.status
    print(json.dumps(summary.brief(), indent=2))
    for problem in summary.violations[:20]:
        print(f"violation: {problem}", file=sys.stderr)
    where = args.url or "the stream URL in the answer"
    if summary.handshake_status == 404:
        print(f"duplexgate call: no media stream at {where} (HTTP 404): check its path", file=sys.stderr)
        return 1
    if summary.handshake_status != 101:
        print(
            f"duplexgate call: the gateway refused the stream at {where} (HTTP {summary.handshake_status}): "
            "a missing or bad signature (--auth-token) or call token",
            file=sys.stderr,
        )
        return 1
    if summary.ended_early:
        print(
            f"duplexgate call: the gateway ended the call after {summary.media_sent * summary.chunk_s:.1f} s "
            f"of "
            f"{summary.input_s:.1f} s (close code {summary.close_code}, reason: "
            f"{summary.close_reason or 'none given'})",
            file=sys.stderr,
        )
        return 1
    return 1 if summary.violations else 0


class CallFailed(Exception):
    """`duplexgate call` cannot go on; the message is its one line, `status` its exit status."""

    def __init__(self, message: str, status: int = 1) -> None:
        super().__init__(message)
        self.status = status


def _call_inputs(args: argparse.Namespace):
    """The caller audio (8 kHz int16) and DTMF schedule, or CallFailed(status 2) naming what is wrong."""
    import wave

    from gateway.carriers import registry
    from gateway.simulator.playout import read_wav_8k

    if args.carrier not in registry():
        raise CallFailed(f"--carrier {args.carrier!r}: known carriers are {', '.join(sorted(registry()))}", 2)
    if not args.url and not args.webhook:
        raise CallFailed("give --url, --webhook, or both", 2)
    if args.url and not args.url.startswith(("ws://", "wss://")):
        raise CallFailed(f"--url {args.url!r}: a media stream URL starts with ws:// or wss://", 2)
    if args.webhook and not args.webhook.startswith(("http://", "https://")):
        raise CallFailed(
            f"--webhook {args.webhook!r}: a voice webhook URL starts with http:// or https://", 2
        )
    for flag, seconds in (("--tail", args.tail), ("--settle", args.settle)):
        if not seconds >= 0:
            raise CallFailed(f"{flag} {seconds}: seconds cannot be negative", 2)
    try:
        dtmf = [_parse_dtmf(spec) for spec in args.dtmf]
    except ValueError as exc:
        raise CallFailed(str(exc), 2) from None
    try:
        audio = read_wav_8k(args.input)
    except FileNotFoundError:
        raise CallFailed(f"--input {args.input}: no such file", 2) from None
    except (wave.Error, EOFError) as exc:
        detail = str(exc) or "no complete header"
        raise CallFailed(f"--input {args.input}: not a 16-bit PCM wav file ({detail})", 2) from None
    except (OSError, ValueError) as exc:
        raise CallFailed(f"--input {args.input}: {exc}", 2) from None
    if len(audio) == 0:
        raise CallFailed(f"--input {args.input}: the file holds no audio", 2)
    if not os.path.isdir(os.path.dirname(os.path.abspath(args.output))):
        raise CallFailed(f"--output {args.output}: no such directory", 2)
    return audio, dtmf


async def _place_call(args: argparse.Namespace, caller_audio, dtmf):
    """simulate_call, with network failures turned into CallFailed."""
    import httpx
    from websockets.exceptions import InvalidHandshake, InvalidURI

    from gateway.carriers.base import AnsweredWithoutStream
    from gateway.simulator.call import simulate_call

    try:
        return await simulate_call(
            args.url,
            caller_audio,
            carrier=args.carrier,
            webhook=args.webhook,
            caller=args.caller,
            called=args.called,
            auth_token=args.auth_token,
            dtmf=dtmf,
            tail_s=args.tail,
            settle_s=args.settle,
        )
    except httpx.HTTPError as exc:
        raise CallFailed(
            f"cannot reach the voice webhook {args.webhook}: {exc or type(exc).__name__}"
        ) from None
    except InvalidURI as exc:
        raise CallFailed(f"bad media stream URL: {exc}") from None
    except (OSError, InvalidHandshake, TimeoutError) as exc:
        target = args.url or "the stream URL in the answer"
        raise CallFailed(f"cannot open the media stream at {target}: {exc or type(exc).__name__}") from None
    except AnsweredWithoutStream as exc:  # no agent free: the gateway said so, or gave a busy answer
        raise CallFailed(f"no stream: {exc}") from None
    except RuntimeError as exc:  # the voice webhook answered, but not with usable TwiML
        raise CallFailed(str(exc)) from None


def write_wav_output(path: str, heard, rate: int) -> None:
    from gateway.simulator.playout import write_wav

    try:
        write_wav(path, heard, rate=rate)
    except OSError as exc:
        raise CallFailed(f"--output {path}: {exc}", 2) from None


def _parse_dtmf(spec: str) -> tuple[str, float]:
    """'1@2.5s' -> ('1', 2.5)."""
    digit, sep, at = spec.partition("@")
    try:
        if not sep or len(digit) != 1:
            raise ValueError
        return digit, float(at.removesuffix("s"))
    except ValueError:
        raise ValueError(f"--dtmf {spec!r}: expected DIGIT@SECONDS such as 1@2.5s") from None
