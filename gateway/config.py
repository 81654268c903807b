"""The gateway's configuration: one TOML file mapping phone numbers to agents, plus server and engine.

Read with the standard library's tomllib; secrets come from environment variables named in the file.
Every validation error names the file, the section and the key, and says what was expected.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import tomllib
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from crm_adapters.base import CrmAdapter, CrmConfigError, check_key_spec, create_adapter
from engine.api import CONTEXT_STEPS, Sampling
from gateway.agents.prompts import DEFAULT_MAX_PROMPT_TOKENS, CrmBinding
from gateway.agents.templates import TEMPLATES_DIR
from gateway.assets import asset_root
from gateway.call.escalation import EscalationPolicy, parse_escalation
from gateway.call.incoming import normalise_number
from gateway.call.limits import CallLimits, parse_limits

log = logging.getLogger(__name__)

EXAMPLE_CONFIG = asset_root() / "deploy" / "example.toml"


class ConfigError(ValueError):
    """The configuration file is unusable; the message names file, section and key."""


@dataclass(frozen=True)
class ServerSection:
    host: str = "0.0.0.0"
    port: int = 8080
    public_url: str = ""  # "https://gw.example.com": base of the TwiML stream URL and of signed URLs
    stream_start_timeout_s: float = 5.0  # close a media stream that does not say `start` in time
    call_token_ttl_s: float = 30.0  # how long a prepared call waits for its media stream
    # Agent audio sent but not yet confirmed played (mark echoes) before the next frame is dropped
    # instead of sent. It includes the network round trip to the carrier: raise it for distant carriers.
    carrier_buffer_s: float = 0.2
    templates_dir: str = ""  # role-prompt templates; empty: the bundled templates/ (relative: from this file)


@dataclass(frozen=True)
class TwilioSection:
    auth_token_env: str = "TWILIO_AUTH_TOKEN"
    auth_token: str | None = None  # resolved from the environment, never read from the file
    account_sid_env: str = "TWILIO_ACCOUNT_SID"  # for call control (transfer); else the stream's accountSid
    account_sid: str | None = None  # resolved from the environment
    api_base: str = "https://api.twilio.com"  # Twilio's REST API (call transfer and hang-up)


@dataclass(frozen=True)
class StoreSection:
    url: str = ""  # empty: in this process's memory (one gateway); "redis://host:6379/0": shared by replicas
    replica_id: str = ""  # this gateway process's name in the store; empty: <hostname>-<pid>


@dataclass(frozen=True)
class ControlSection:
    # The control API's bearer key is read from this environment variable; unset: the API answers 503.
    api_key_env: str = "DUPLEXGATE_API_KEY"


@dataclass(frozen=True)
class WebhooksSection:
    url: str = ""  # where call events (call.started/.warning/.escalated/.ended) are POSTed; empty: none
    secret_env: str = "DUPLEXGATE_WEBHOOK_SECRET"  # the signing secret is read from this variable
    secret: str | None = None  # resolved from the environment, never read from the file


@dataclass(frozen=True)
class EngineSection:
    checkpoint: str = ""  # local directory or hub repo id; empty: the random tiny demo model
    device: str = ""  # "cuda", "cuda:1", "cpu"; empty: the engine picks
    cuda_graphs: bool = True  # on CUDA, replay the step from CUDA graphs (false: eager, for debugging)
    cpu_threads: int = 1  # torch threads when the engine runs on the CPU
    slots: int = 0  # calls the engine holds at once; 0: as many as fit in GPU memory, 8 on a CPU


@dataclass(frozen=True)
class AgentConfig:
    """One agent a number can be routed to: voice, role prompt (inline text, or a template filled per call
    with CRM data), sampling, per-call limits and escalation."""

    name: str
    voice: str
    prompt: str = ""  # inline role prompt, the simplest agent
    template: str = ""  # or a template in the templates directory, rendered for each call
    vars: Mapping[str, Any] = field(default_factory=dict)  # [agents.<name>.vars]: the template's agent.*
    crm: CrmBinding | None = None  # [agents.<name>.crm]: adapter, key, deadline_s
    max_prompt_tokens: int = DEFAULT_MAX_PROMPT_TOKENS
    seed: int | None = None
    sampling: Sampling = Sampling()
    limits: CallLimits = CallLimits()
    escalation: EscalationPolicy = EscalationPolicy()


@dataclass(frozen=True)
class GatewayConfig:
    server: ServerSection = ServerSection()
    twilio: TwilioSection = TwilioSection()
    engine: EngineSection = EngineSection()
    agents: Mapping[str, AgentConfig] = field(default_factory=dict)
    numbers: Mapping[str, str] = field(default_factory=dict)  # normalised called number -> agent name
    default_agent: str = ""
    source: str = "<defaults>"
    crm: Mapping[str, CrmAdapter] = field(default_factory=dict)  # [crm.<name>] adapters, built and checked
    templates_dir: Path = TEMPLATES_DIR
    store: StoreSection = StoreSection()
    control: ControlSection = ControlSection()
    webhooks: WebhooksSection = WebhooksSection()

    def agent_for(self, called: str | None) -> AgentConfig:
        """The agent answering calls to `called`; the default agent for unknown or missing numbers."""
        name = self.numbers.get(normalise_number(called or ""), self.default_agent)
        return self.agents[name]


def load_config(path: str | Path | None = None, env: Mapping[str, str] | None = None) -> GatewayConfig:
    """Read and validate a config file; without a path, the embedded `deploy/example.toml`."""
    path = Path(path) if path is not None else EXAMPLE_CONFIG
    try:
        with path.open("rb") as fh:
            raw = tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read config: {exc}") from None
    return parse_config(raw, source=str(path), env=os.environ if env is None else env)


def parse_config(raw: Mapping[str, Any], source: str, env: Mapping[str, str]) -> GatewayConfig:
    """Validate an already-parsed TOML document."""
    sections = {"server", "twilio", "engine", "crm", "agents", "numbers", "store", "control", "webhooks"}
    _reject_unknown(raw, sections, source, "top level")
    server = _build(ServerSection, raw.get("server", {}), source, "[server]")
    twilio = _build(
        TwilioSection, raw.get("twilio", {}), source, "[twilio]", skip={"auth_token", "account_sid"}
    )
    engine = _build(EngineSection, raw.get("engine", {}), source, "[engine]")
    store = _build(StoreSection, raw.get("store", {}), source, "[store]")
    if store.url and urlsplit(store.url).scheme not in ("redis", "rediss", "unix"):
        raise ConfigError(
            f"{source}: [store] url = {store.url!r} should be empty (in memory) or start with redis://, "
            "rediss:// or unix://"
        )
    control = _build(ControlSection, raw.get("control", {}), source, "[control]")
    webhooks = _build(WebhooksSection, raw.get("webhooks", {}), source, "[webhooks]", skip={"secret"})
    if webhooks.url:
        if urlsplit(webhooks.url).scheme not in ("http", "https"):
            raise ConfigError(f"{source}: [webhooks] url = {webhooks.url!r} should be an http(s) URL")
        if not env.get(webhooks.secret_env):
            raise ConfigError(
                f"{source}: [webhooks] url is set but {webhooks.secret_env} is not: webhooks are always "
                "signed; export the secret your receiver verifies with"
            )
        webhooks = dataclasses.replace(webhooks, secret=env[webhooks.secret_env])

    if server.public_url:
        _check_public_url(server.public_url, source)
    token = env.get(twilio.auth_token_env) or None
    if token and not server.public_url:
        raise ConfigError(
            f"{source}: [server] public_url is required when {twilio.auth_token_env} is set "
            "(Twilio signs the public URL, e.g. https://gw.example.com)"
        )
    twilio = dataclasses.replace(
        twilio, auth_token=token, account_sid=env.get(twilio.account_sid_env) or None
    )

    # Paths in the file (templates, CRM files) are relative to the file, wherever the gateway is started.
    base_dir = Path(source).resolve().parent if Path(source).is_file() else Path.cwd()
    templates_dir = (
        base_dir / Path(server.templates_dir).expanduser() if server.templates_dir else TEMPLATES_DIR
    )
    adapters: dict[str, CrmAdapter] = {}
    for name, table in _table(raw.get("crm", {}), source, "[crm]").items():
        try:
            adapters[name] = create_adapter(name, table, f"{source}: [crm.{name}]", env, base_dir)
        except CrmConfigError as exc:
            raise ConfigError(str(exc)) from None

    agents_raw = _table(raw.get("agents", {}), source, "[agents]")
    agents: dict[str, AgentConfig] = {}
    for name, table in agents_raw.items():
        section = f"[agents.{name}]"
        agents[name] = _agent(name, _table(table, source, section), source, section, adapters, templates_dir)
    if not agents:
        raise ConfigError(f"{source}: no agents; add an [agents.<name>] section with voice and prompt")

    numbers_raw = dict(_table(raw.get("numbers", {}), source, "[numbers]"))
    default_agent = numbers_raw.pop("default", None)
    if default_agent is None:
        if len(agents) > 1:
            raise ConfigError(f"{source}: [numbers] default is missing; name the agent for unknown numbers")
        default_agent = next(iter(agents))
    numbers: dict[str, str] = {}
    for number, agent in [("default", default_agent), *numbers_raw.items()]:
        if not isinstance(agent, str) or agent not in agents:
            raise ConfigError(
                f"{source}: [numbers] {number} = {agent!r} is not an agent; known agents: {sorted(agents)}"
            )
        if number != "default":
            numbers[normalise_number(number)] = agent
    return GatewayConfig(
        server=server,
        twilio=twilio,
        engine=engine,
        agents=agents,
        numbers=numbers,
        default_agent=default_agent,
        source=source,
        crm=adapters,
        templates_dir=templates_dir,
        store=store,
        control=control,
        webhooks=webhooks,
    )


def _agent(
    name: str,
    table: Mapping[str, Any],
    source: str,
    section: str,
    adapters: Mapping[str, CrmAdapter],
    templates_dir: Path,
) -> AgentConfig:
    """One [agents.<name>] table: its sub-tables checked here, the rest by `_build`."""
    table = dict(table)
    given: dict[str, Any] = {}
    if "vars" in table:  # free-form: the template's agent.* values
        given["vars"] = dict(_table(table.pop("vars"), source, f"{section[:-1]}.vars]"))
    if "escalation" in table:
        where = f"{section[:-1]}.escalation]"
        try:
            given["escalation"] = parse_escalation(
                _table(table.pop("escalation"), source, where), f"{source}: {where}"
            )
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
    if "limits" in table:
        where = f"{source}: {section[:-1]}.limits]"
        try:
            given["limits"] = parse_limits(
                _table(table.pop("limits"), source, f"{section[:-1]}.limits]"), where
            )
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
    if "crm" in table:
        given["crm"] = _crm_binding(table.pop("crm"), source, f"{section[:-1]}.crm]", adapters)
    agent = _build(AgentConfig, table, source, section, name=name, **given)
    if bool(agent.prompt.strip()) == bool(agent.template):
        raise ConfigError(
            f"{source}: {section} needs either prompt (inline text) or template (a file in {templates_dir}), "
            f"not {'both' if agent.template else 'neither'}"
        )
    if agent.template and not (templates_dir / agent.template).is_file():
        there = sorted(p.name for p in templates_dir.glob("*.j2"))
        raise ConfigError(
            f"{source}: {section} template = {agent.template!r} is not in {templates_dir}; "
            f"templates there: {there}"
        )
    if agent.crm is not None and not agent.template:
        raise ConfigError(f"{source}: {section} has a crm lookup but no template to put the record in")
    if not 0 < agent.max_prompt_tokens < CONTEXT_STEPS:
        raise ConfigError(
            f"{source}: {section} max_prompt_tokens = {agent.max_prompt_tokens} should be between 1 and "
            f"{CONTEXT_STEPS - 1} (the model sees only its last {CONTEXT_STEPS} steps)"
        )
    return agent


def _crm_binding(value: Any, source: str, section: str, adapters: Mapping[str, CrmAdapter]) -> CrmBinding:
    table = dict(_table(value, source, section))
    binding = _build(CrmBinding, table, source, section)
    if binding.adapter not in adapters:
        raise ConfigError(
            f"{source}: {section} adapter = {binding.adapter!r} is not declared; add a "
            f"[crm.{binding.adapter}] table (declared: {sorted(adapters)})"
        )
    try:
        check_key_spec(binding.key, f"{source}: {section}")
    except CrmConfigError as exc:
        raise ConfigError(str(exc)) from None
    if binding.deadline_s is not None and binding.deadline_s <= 0:
        raise ConfigError(f"{source}: {section} deadline_s = {binding.deadline_s} must be positive")
    return binding


def _check_public_url(url: str, source: str) -> None:
    parts = urlsplit(url)
    if parts.scheme not in ("https", "http") or not parts.hostname or parts.path.strip("/") or parts.query:
        raise ConfigError(
            f"{source}: [server] public_url = {url!r} must be a bare https:// base such as "
            "'https://gw.example.com' (no path or query)"
        )


def _table(value: Any, source: str, section: str) -> Mapping[str, Any]:
    if not isinstance(value, dict):
        raise ConfigError(f"{source}: {section} must be a table, got {type(value).__name__}")
    return value


def _reject_unknown(table: Mapping[str, Any], known: set[str], source: str, section: str) -> None:
    for key in table:
        if key not in known:
            raise ConfigError(f"{source}: {section} has unknown key '{key}'; known keys: {sorted(known)}")


def _build(kind: type, table: Any, source: str, section: str, skip: frozenset | set = frozenset(), **given):
    """Build dataclass `kind` from a TOML table, checking every key's name and type against its fields."""
    table = _table(table, source, section)
    hints = typing.get_type_hints(kind)
    settable = {f.name for f in dataclasses.fields(kind)} - set(given) - set(skip)
    _reject_unknown(table, settable, source, section)
    kwargs: dict[str, Any] = dict(given)
    for key, value in table.items():
        expected = hints[key]
        if dataclasses.is_dataclass(expected):
            kwargs[key] = _build(expected, value, source, f"{section[:-1]}.{key}]")
        else:
            kwargs[key] = _check_type(value, expected, source, section, key)
    try:
        return kind(**kwargs)
    except TypeError as exc:  # a required field without a value
        missing = [f.name for f in dataclasses.fields(kind) if f.name not in kwargs]
        raise ConfigError(f"{source}: {section} is missing required key(s) {missing}") from exc


def _check_type(value: Any, expected: Any, source: str, section: str, key: str) -> Any:
    options = typing.get_args(expected) if isinstance(expected, types.UnionType) else (expected,)
    for option in options:
        if option is type(None):
            continue
        if option is float and isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if option is int and isinstance(value, bool):
            continue
        if isinstance(value, option):
            return value
    names = " or ".join(getattr(o, "__name__", str(o)) for o in options if o is not type(None))
    raise ConfigError(f"{source}: {section} {key} = {value!r} should be {names}")
