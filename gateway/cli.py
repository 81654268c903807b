"""The `duplexgate` command: `serve` runs the gateway (with the embedded engine, or in front of engine
workers), `worker` runs an engine worker, `call` places a simulated call (as any carrier) against a
running gateway, `prompt render` and `config check` show and check role prompts; the engine adds its own
subcommands when `engine.cli` exists.
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
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any

from gateway.carriers import DEFAULT_CARRIER

if TYPE_CHECKING:
    from gateway.agents.prompts import RolePrompt
    from gateway.config import GatewayConfig

log = logging.getLogger("duplexgate")

WS_MAX_BYTES = 1 << 20
# uvicorn's sans-I/O websockets protocol: at 120 simulated calls it lost no frames and cut p99 from
# 167 to 28 ms against the default implementation (python -m bench.load --ws ..., same machine, same run)
WS_IMPLEMENTATION = "websockets-sansio"  # hard cap in the server; the app itself drops messages over 64 KiB


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
    serve.add_argument(
        "--confirm-unsigned",
        action="store_true",
        help="with [<carrier>] allow_unsigned = true: serve unsigned traffic on a non-loopback address",
    )
    serve.set_defaults(run=_serve)

    worker = commands.add_parser(
        "worker", help="run an engine worker (one per GPU) for gateways with [workers] enabled"
    )
    worker.add_argument("--config", help="TOML config file (default: the embedded deploy/example.toml)")
    worker.add_argument("--host", help="override [workers] host")
    worker.add_argument("--port", type=int, help="override [workers] port")
    worker.set_defaults(run=_worker)

    call = commands.add_parser("call", help="place a simulated carrier call against a running gateway")
    call.add_argument(
        "--carrier",
        default=DEFAULT_CARRIER,
        help=f"the carrier whose protocol to speak (default {DEFAULT_CARRIER})",
    )
    call.add_argument("--url", help="media-stream WebSocket, e.g. ws://127.0.0.1:8080/<carrier>/media")
    call.add_argument("--input", required=True, help="caller audio: 16-bit PCM wav at any rate")
    call.add_argument("--output", required=True, help="where to write what the caller heard (wav)")
    call.add_argument("--output-rate", type=int, choices=(8000, 24000), default=24000)
    call.add_argument(
        "--webhook", help="answer webhook to request first, e.g. http://HOST:PORT/<carrier>/voice"
    )
    call.add_argument("--from", dest="caller", default="+15550001111", help="caller number (From)")
    call.add_argument("--to", dest="called", default="+15550002222", help="called number (To)")
    call.add_argument(
        "--auth-token", help="the carrier's secret: sign the webhook and the upgrade as that carrier does"
    )
    call.add_argument(
        "--dtmf", nargs="*", default=[], metavar="DIGIT@SECONDS", help="key presses, e.g. 1@2.5s"
    )
    call.add_argument("--tail", type=float, default=1.0, help="seconds of silence sent after the input")
    call.add_argument(
        "--settle",
        type=float,
        default=0.0,
        help="then stay on the line, sending nothing, up to this many seconds until every frame is answered",
    )
    call.set_defaults(run=_call)

    prompt = commands.add_parser("prompt", help="role prompt tools")
    prompt_commands = prompt.add_subparsers(dest="prompt_command", required=True)
    render = prompt_commands.add_parser(
        "render", help="print an agent's role prompt for a caller (CRM looked up) and its token count"
    )
    render.add_argument("--config", help="TOML config file (default: the embedded deploy/example.toml)")
    render.add_argument("--agent", required=True, help="agent name ([agents.<name>] in the config)")
    render.add_argument("--caller", help="caller number (From), the usual CRM lookup key")
    render.add_argument("--called", help="called number (To)")
    render.add_argument("--call-id", default="CApreview", help="call id (CallSid) the template sees")
    render.add_argument("--data", help="JSON file holding the CRM record to use instead of looking it up")
    render.add_argument(
        "--param", action="append", default=[], metavar="NAME=VALUE", help="a custom parameter (repeatable)"
    )
    render.set_defaults(run=_prompt_render)

    config_command = commands.add_parser("config", help="configuration tools")
    config_commands = config_command.add_subparsers(dest="config_command", required=True)
    check = config_commands.add_parser(
        "check", help="validate the config and render every template with its sample data; list all problems"
    )
    check.add_argument("--config", help="TOML config file (default: the embedded deploy/example.toml)")
    check.set_defaults(run=_config_check)

    if importlib.util.find_spec("engine.cli") is not None:
        importlib.import_module("engine.cli").register(commands)

    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    quiet_http_clients()
    try:
        return int(args.run(args) or 0)
    except KeyboardInterrupt:
        return 130


def quiet_http_clients() -> None:
    """httpx logs every request's full URL at INFO, and a webhook or CRM URL may carry a token in its query
    string: its requests are logged at WARNING and above only."""
    for name in ("httpx", "httpcore"):
        logging.getLogger(name).setLevel(max(logging.WARNING, logging.getLogger(name).level))


def _serve(args: argparse.Namespace) -> int:

    from gateway.edge.app import create_app

    loaded = _checked_config(args.config, "duplexgate")
    if isinstance(loaded, int):
        return loaded
    config, problems = loaded
    if problems:  # a template that cannot render must not meet its first caller
        for problem in problems:
            print(f"duplexgate: {problem}", file=sys.stderr)
        print(
            "duplexgate: fix the role prompts above (`duplexgate config check` lists them)", file=sys.stderr
        )
        return 2
    host = args.host or config.server.host
    port = args.port or config.server.port
    from gateway.config import exposure_problem

    unsafe = exposure_problem(config, host, args.confirm_unsigned)
    if unsafe is not None:
        print(f"duplexgate: {unsafe}", file=sys.stderr)
        return 2

    if config.workers.enabled and not config.workers.key:
        print(
            f"duplexgate: [workers] enabled needs the workers' key in {config.workers.key_env}",
            file=sys.stderr,
        )
        return 2

    async def serve() -> None:
        from engine.embedded import create_default_engine, create_remote_engine  # heavy (torch)

        if config.workers.enabled:
            engine = create_remote_engine(config.engine, config.store.url, config.workers.key or "")
        else:
            engine = create_default_engine(config.engine)
        if inspect.isawaitable(engine):
            engine = await engine
        app = create_app(config, engine)
        await serve_until_drained(app, app.state.drain, host, port, engine)

    asyncio.run(serve())
    return 0


async def serve_until_drained(
    app: Any, drain: Callable[[], Awaitable[None]], host: str, port: int, engine: Any
) -> None:
    """Serve `app` with uvicorn until it stops (the first SIGTERM drains first), then close `engine`."""
    import uvicorn

    from gateway.edge.server import DrainingServer

    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        ws=WS_IMPLEMENTATION,
        ws_max_size=WS_MAX_BYTES,
        log_level="info",
        lifespan="on",
    )
    try:
        await DrainingServer(drain, config).serve()
    finally:
        await engine.aclose()


def _worker(args: argparse.Namespace) -> int:
    """An engine worker: the embedded engine behind the worker app, announced in the [store] Redis."""
    import os
    import socket

    from gateway.config import ConfigError, load_config

    try:
        config = load_config(args.config)
    except ConfigError as exc:
        for problem in exc.problems:
            print(f"duplexgate worker: {problem}", file=sys.stderr)
        return 2
    settings = config.workers
    if not settings.key:
        print(f"duplexgate worker: export the workers' shared key in {settings.key_env}", file=sys.stderr)
        return 2
    if not config.store.url:
        print("duplexgate worker: set [store] url: gateways find workers in that Redis", file=sys.stderr)
        return 2
    host, port = args.host or settings.host, args.port or settings.port
    url = os.environ.get(settings.advertise_url_env) or f"http://{host}:{port}"
    if host in ("0.0.0.0", "::") and not os.environ.get(settings.advertise_url_env):
        url = f"http://{socket.gethostname()}:{port}"
        log.warning("no %s: gateways will dial %s", settings.advertise_url_env, url)
    worker_id = settings.id or f"{socket.gethostname()}-{os.getpid()}"

    async def serve() -> None:
        from engine.embedded import create_default_engine  # heavy (torch): only when serving
        from engine.remote.registry import Registry
        from engine.remote.server import WorkerServer

        engine = create_default_engine(config.engine)
        worker = WorkerServer(
            engine,
            key=settings.key or "",
            worker_id=worker_id,
            url=url,
            registry=Registry(config.store.url),
            reserve_ttl_s=settings.reserve_ttl_s,
        )
        log.info("engine worker %s serving gateways at %s (%d slots)", worker_id, url, engine.capacity)
        await serve_until_drained(
            worker.app, lambda: worker.drain(settings.drain_grace_s), host, port, engine
        )

    asyncio.run(serve())
    return 0


def _call(args: argparse.Namespace) -> int:
    from gateway.simulator.command import place_call

    return place_call(args)


def _token_counter(config: GatewayConfig) -> Callable[[str], int]:
    """Count prompt tokens with the configured checkpoint's tokenizer (no model is loaded)."""
    from engine.embedded import prompt_token_counter
    from engine.loading import CheckpointError
    from gateway.config import ConfigError

    try:
        return prompt_token_counter(config.engine.checkpoint)
    except CheckpointError as exc:
        raise ConfigError(f"{config.source}: cannot count prompt tokens: {exc}") from None


def prompt_problems(config: GatewayConfig, count_tokens: Callable[[str], int]) -> list[str]:
    """Every role-prompt problem of `config`: template syntax, templates against their sample data, and each
    agent's prompt with its sample record and without one, within its token budget."""
    from gateway.agents.prompts import check_agent
    from gateway.agents.templates import PromptRenderer, check_templates

    renderer = PromptRenderer(config.templates_dir)
    problems = check_templates(renderer)
    for agent in config.agents.values():
        problems += check_agent(agent, renderer, count_tokens)
    return problems


def _checked_config(path: str | None, command: str) -> tuple[GatewayConfig, list[str]] | int:
    """The config and its role-prompt problems, or exit status 2 after printing why it cannot load."""
    from gateway.config import ConfigError, load_config

    try:
        config = load_config(path)
        return config, prompt_problems(config, _token_counter(config))
    except ConfigError as exc:
        for problem in exc.problems:
            print(f"{command}: {problem}", file=sys.stderr)
        print(f"{command}: {len(exc.problems)} problem(s) in the config", file=sys.stderr)
        return 2


def _config_check(args: argparse.Namespace) -> int:
    loaded = _checked_config(args.config, "duplexgate config check")
    if isinstance(loaded, int):
        return loaded
    config, problems = loaded
    for problem in problems:
        print(f"problem: {problem}")
    verdict = f"{len(problems)} problem(s)" if problems else "OK"
    print(f"{config.source}: {len(config.agents)} agent(s), {len(config.crm)} CRM adapter(s): {verdict}")
    return 1 if problems else 0


def _prompt_render(args: argparse.Namespace) -> int:
    from crm_adapters.base import CrmResult
    from gateway.agents.prompts import prepare_role_prompt, render_role_prompt
    from gateway.agents.templates import PromptError, PromptRenderer
    from gateway.call.incoming import IncomingCall
    from gateway.config import ConfigError, load_config

    try:
        config = load_config(args.config)
        count_tokens = _token_counter(config)
        record = _read_record(args.data) if args.data else None
        params = dict(_parse_param(spec) for spec in args.param)
    except (ConfigError, ValueError) as exc:
        print(f"duplexgate prompt render: {exc}", file=sys.stderr)
        return 2
    agent = config.agents.get(args.agent)
    if agent is None:
        print(
            f"duplexgate prompt render: no agent {args.agent!r}; agents: {sorted(config.agents)}",
            file=sys.stderr,
        )
        return 2
    fields = {"CallSid": args.call_id, "From": args.caller or "", "To": args.called or ""}
    call = IncomingCall(
        args.call_id, args.caller, args.called, fields={k: v for k, v in fields.items() if v}, params=params
    )
    renderer = PromptRenderer(config.templates_dir)

    async def render() -> RolePrompt:
        try:
            if record is not None:
                crm = CrmResult(args.data, "found", data=record, key=args.caller)
                return render_role_prompt(agent, call, crm, renderer, count_tokens)
            return await prepare_role_prompt(agent, call, config.crm, renderer, count_tokens)
        finally:
            await asyncio.gather(*(adapter.aclose() for adapter in config.crm.values()))

    try:
        prompt = asyncio.run(render())
    except PromptError as exc:
        print(f"duplexgate prompt render: {exc}", file=sys.stderr)
        return 1
    print(prompt.text)
    crm = prompt.crm
    looked_up = (
        f"CRM {crm.adapter}: {crm.status}{f' ({crm.reason})' if crm.reason else ''}" if crm else "no CRM"
    )
    source = prompt.template or "inline prompt"
    print(f"-- {prompt.tokens} tokens of max {agent.max_prompt_tokens}; {source}; {looked_up}")
    if prompt.degraded:
        print(f"-- CRM record left out: {prompt.degraded}")
    return 0


def _read_record(path: str) -> dict:
    """A CRM record from a JSON file (an object of fields)."""
    try:
        with open(path, encoding="utf-8") as fh:
            record = json.load(fh)
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"--data {path}: cannot read JSON: {exc}") from None
    if not isinstance(record, dict):
        raise ValueError(f"--data {path}: expected an object of fields, got {type(record).__name__}")
    return record


def _parse_param(spec: str) -> tuple[str, str]:
    name, sep, value = spec.partition("=")
    if not sep or not name:
        raise ValueError(f"--param {spec!r}: expected NAME=VALUE")
    return name, value


if __name__ == "__main__":
    sys.exit(main())
