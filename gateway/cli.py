"""The `duplexgate` command: `serve` runs the gateway with the embedded engine, `call` places a simulated
Twilio call against a running gateway; the engine adds its own subcommands when `engine.cli` exists.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import importlib.util
import inspect
import json
import logging
import sys
from collections.abc import Sequence

log = logging.getLogger("duplexgate")

WS_MAX_BYTES = 1 << 20  # hard cap in the server; the app itself drops messages over 64 KiB


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="duplexgate", description="Telephony gateway for full-duplex speech"
    )
    parser.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING (default INFO)")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the gateway with the embedded engine")
    serve.add_argument("--config", help="TOML config file (default: the embedded deploy/example.toml)")
    serve.add_argument("--host", help="override [server] host")
    serve.add_argument("--port", type=int, help="override [server] port")
    serve.set_defaults(run=_serve)

    call = commands.add_parser("call", help="place a simulated Twilio call against a running gateway")
    call.add_argument("--url", help="media-stream WebSocket, e.g. ws://127.0.0.1:8080/twilio/media")
    call.add_argument("--input", required=True, help="caller audio: 16-bit PCM wav at any rate")
    call.add_argument("--output", required=True, help="where to write what the caller heard (wav)")
    call.add_argument("--output-rate", type=int, choices=(8000, 24000), default=24000)
    call.add_argument(
        "--webhook", help="voice webhook to fetch TwiML from first, e.g. http://HOST:PORT/twilio/voice"
    )
    call.add_argument("--from", dest="caller", default="+15550001111", help="caller number (From)")
    call.add_argument("--to", dest="called", default="+15550002222", help="called number (To)")
    call.add_argument("--auth-token", help="sign the webhook and the upgrade with this Twilio auth token")
    call.add_argument(
        "--dtmf", nargs="*", default=[], metavar="DIGIT@SECONDS", help="key presses, e.g. 1@2.5s"
    )
    call.add_argument("--tail", type=float, default=1.0, help="seconds of silence sent after the input")
    call.set_defaults(run=_call)

    if importlib.util.find_spec("engine.cli") is not None:
        importlib.import_module("engine.cli").register(commands)

    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        return int(args.run(args) or 0)
    except KeyboardInterrupt:
        return 130


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from gateway.app import create_app
    from gateway.config import ConfigError, load_config

    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(f"duplexgate: {exc}", file=sys.stderr)
        return 2
    host = args.host or config.server.host
    port = args.port or config.server.port

    async def serve() -> None:
        from engine.embedded import create_default_engine  # heavy (torch): only when serving

        engine = create_default_engine(config.engine)
        if inspect.isawaitable(engine):
            engine = await engine
        app = create_app(config, engine)
        server = uvicorn.Server(
            uvicorn.Config(
                app, host=host, port=port, ws_max_size=WS_MAX_BYTES, log_level="info", lifespan="on"
            )
        )
        try:
            await server.serve()
        finally:
            await engine.aclose()

    asyncio.run(serve())
    return 0


def _call(args: argparse.Namespace) -> int:
    from gateway.simcarrier import simulate_call, write_wav

    if not args.url and not args.webhook:
        print("duplexgate call: give --url, --webhook, or both", file=sys.stderr)
        return 2
    try:
        dtmf = [_parse_dtmf(spec) for spec in args.dtmf]
    except ValueError as exc:
        print(f"duplexgate call: {exc}", file=sys.stderr)
        return 2
    summary = asyncio.run(
        simulate_call(
            args.url,
            args.input,
            webhook=args.webhook,
            caller=args.caller,
            called=args.called,
            auth_token=args.auth_token,
            dtmf=dtmf,
            tail_s=args.tail,
        )
    )
    if summary.handshake_status == 101:
        write_wav(args.output, summary.heard, rate=args.output_rate)
    print(json.dumps(summary.brief(), indent=2))
    for problem in summary.violations[:20]:
        print(f"violation: {problem}", file=sys.stderr)
    if summary.handshake_status != 101:
        print(
            f"duplexgate call: the gateway refused the stream (HTTP {summary.handshake_status})",
            file=sys.stderr,
        )
        return 1
    return 1 if summary.violations else 0


def _parse_dtmf(spec: str) -> tuple[str, float]:
    """'1@2.5s' -> ('1', 2.5)."""
    digit, sep, at = spec.partition("@")
    try:
        if not sep or len(digit) != 1:
            raise ValueError
        return digit, float(at.removesuffix("s"))
    except ValueError:
        raise ValueError(f"--dtmf {spec!r}: expected DIGIT@SECONDS such as 1@2.5s") from None


if __name__ == "__main__":
    sys.exit(main())
