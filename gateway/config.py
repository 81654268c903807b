"""The gateway's configuration: one TOML file mapping phone numbers to agents, plus server and engine.

Read with the standard library's tomllib; secrets come from environment variables named in the file.
Every validation error names the file, the section and the key, and says what was expected.

Size: every section's schema sits beside the one validation pass that reads them all, so a reader sees
each key, its default and its checks in one place.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import logging
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, TypeVar
from urllib.parse import urlsplit

from annotated_types import Ge, Gt, Lt

from crm_adapters.base import CrmAdapter, CrmConfigError, check_key_spec, create_adapter
from engine.api import CONTEXT_STEPS, Sampling
from gateway.agents.prompts import DEFAULT_MAX_PROMPT_TOKENS, CrmBinding
from gateway.agents.templates import TEMPLATES_DIR
from gateway.assets import asset_root
from gateway.call.escalation import EscalationPolicy
from gateway.call.incoming import masked_number, normalise_number
from gateway.call.limits import CallLimits
from gateway.carriers import DEFAULT_CARRIER, carrier_class, registry
from gateway.carriers.base import CarrierSettings
from gateway.schema import ConfigProblems, validate

log = logging.getLogger(__name__)

T = TypeVar("T")

EXAMPLE_CONFIG = asset_root() / "deploy" / "example.toml"


@dataclass(frozen=True)
class ServerSection:
    host: str = "127.0.0.1"  # this machine only; "0.0.0.0" serves the network (signatures required)
    port: int = 8080
    public_url: str = ""  # "https://gw.example.com": base of the TwiML stream URL and of signed URLs
    public_url_env: str = "DUPLEXGATE_PUBLIC_URL"  # when this variable is set, it is the public URL
    allow_http_public_url: bool = False  # an http:// public URL for a host other than this machine
    stream_start_timeout_s: float = 5.0  # close a media stream that does not say `start` in time
    stream_idle_timeout_s: Annotated[float, Gt(0)] = 10.0  # end a call whose stream sends no audio this long
    # On SIGTERM: no new calls, live calls may finish for this long, then they are ended (with records).
    # A Kubernetes pod's terminationGracePeriodSeconds must be longer.
    drain_grace_s: Annotated[float, Ge(0)] = 120.0
    call_token_ttl_s: float = 30.0  # how long a prepared call waits for its media stream
    # Agent audio sent but not yet confirmed played (mark echoes) before the next frame is dropped
    # instead of sent. It includes the network round trip to the carrier: raise it for distant carriers.
    carrier_buffer_s: float = 0.2
    templates_dir: str = ""  # role-prompt templates; empty: the bundled templates/ (relative: from this file)
    # HTTP request bodies over this are refused (413) before they are read: a voice webhook's form is a
    # few KiB, control API bodies less.
    max_body_bytes: Annotated[int, Gt(0)] = 64 * 1024
    log_numbers: bool = False  # log callers' numbers in full (else masked: "+1********11")
    # An address that fails this many signature or API-key checks in a minute gets 429 until the minute is
    # out, its credentials unchecked.
    auth_failures_per_minute: Annotated[int, Gt(0)] = 20
    # When no engine slot is free anywhere, the answer webhook says this and hangs up, or, with a number in
    # overflow_transfer_to, hands the call to it (where the carrier's answer markup can say so).
    overflow_message: str = "Sorry, all of our agents are busy right now. Please call again in a few minutes."
    overflow_transfer_to: str = ""


@dataclass(frozen=True)
class StoreSection:
    url: str = ""  # empty: in this process's memory (one gateway); "redis://host:6379/0": shared by replicas
    replica_id: str = ""  # this gateway process's name in the store; empty: <hostname>-<pid>


@dataclass(frozen=True)
class WorkersSection:
    """Remote engine workers (the two-tier deployment): gateways with `enabled` find the workers in the
    [store] Redis and run no model; `duplexgate worker` reads the rest."""

    enabled: bool = False  # gateways: use the workers registered in [store] instead of an embedded engine
    key_env: str = "DUPLEXGATE_WORKER_KEY"  # the shared secret between gateways and workers
    key: str | None = field(default=None, repr=False)  # from the environment, never the file
    host: str = "127.0.0.1"  # a worker's listening address (`duplexgate worker --host` overrides it)
    port: int = 8090
    # the URL gateways reach a worker at, read from this variable (e.g. http://$(POD_IP):8090); unset:
    # http://<host>:<port>
    advertise_url_env: str = "DUPLEXGATE_WORKER_URL"
    id: str = ""  # the worker's name in the registry; empty: <hostname>-<pid>
    # a primed session waits this long for its gateway to attach, then its slot is freed
    reserve_ttl_s: Annotated[float, Gt(0)] = 30.0
    # On SIGTERM a worker takes no new calls and lets its live calls finish for this long; the rest move
    # to other workers. A Kubernetes pod's terminationGracePeriodSeconds must be longer.
    drain_grace_s: Annotated[float, Ge(0)] = 600.0


@dataclass(frozen=True)
class ControlSection:
    # The control API's bearer key is read from this environment variable; unset: the API answers 503.
    api_key_env: str = "DUPLEXGATE_API_KEY"


@dataclass(frozen=True)
class WebhooksSection:
    url: str = ""  # where call events (call.started/.warning/.escalated/.ended) are POSTed; empty: none
    secret_env: str = "DUPLEXGATE_WEBHOOK_SECRET"  # the signing secret is read from this variable
    secret: str | None = field(default=None, repr=False)  # from the environment, never the file


@dataclass(frozen=True)
class EngineSection:
    checkpoint: str = ""  # local directory or hub repo id; empty: the random tiny demo model
    device: str = ""  # "cuda", "cuda:1", "cpu"; empty: the engine picks
    cuda_graphs: bool = True  # on CUDA, replay the step from CUDA graphs (false: eager, for debugging)
    cpu_threads: int = 1  # torch threads when the engine runs on the CPU
    slots: int = 0  # calls the engine holds at once; 0: as many as fit in GPU memory, 8 on a CPU
    # a call is admitted while the steps it would make take at most this share of the 80 ms frame
    admit_fraction: Annotated[float, Gt(0)] = 0.8


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
    # every prompt token is a model step the model then keeps in view
    max_prompt_tokens: Annotated[int, Gt(0), Lt(CONTEXT_STEPS)] = DEFAULT_MAX_PROMPT_TOKENS
    seed: int | None = None
    sampling: Sampling = Sampling()
    limits: CallLimits = CallLimits()
    escalation: EscalationPolicy = EscalationPolicy()
    # With signatures on, a media stream must carry the call token its voice webhook handed out; true lets
    # streams started without one (a carrier pointed straight at /<carrier>/media) reach this agent.
    allow_unprepared_streams: bool = False


@dataclass(frozen=True)
class GatewayConfig:
    server: ServerSection = ServerSection()
    # the carriers served, by name: each one's [<name>] section (its file in gateway/carriers/ says what it
    # holds); a file with no carrier section serves Twilio with its defaults
    carriers: Mapping[str, CarrierSettings] = field(default_factory=lambda: {DEFAULT_CARRIER: _default()})
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
    workers: WorkersSection = WorkersSection()

    def number(self, number: str | None) -> str:
        """`number` as this config wants it in logs: masked unless [server] log_numbers."""
        return (number or "-") if self.server.log_numbers else masked_number(number)

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


class ConfigError(ValueError):
    """The configuration file is unusable. `problems` lists every problem found, one line each, naming the
    file, the section and the key; the message is those lines."""

    def __init__(self, problems: str | list[str]) -> None:
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("\n".join(self.problems))


SECTIONS = ("server", "engine", "crm", "agents", "numbers", "store", "control", "webhooks", "workers")
SECRETS_FROM_ENV = {"webhooks": ("secret",), "workers": ("key",)}


def _default() -> CarrierSettings:
    return carrier_class(DEFAULT_CARRIER).settings_type()


class _Problems:
    """What is wrong with one config file, collected so that all of it is reported at once."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.found: list[str] = []

    def add(self, problem: str) -> None:
        self.found.append(f"{self.source}: {problem}")

    def section(self, kind: type[T], table: Any, section: str, default: T | None = None) -> T | None:
        """`kind` from `table`, or `default` (after noting what is wrong) when it cannot be built."""
        try:
            return validate(kind, table, f"{self.source}: {section}")
        except ConfigProblems as exc:
            self.found += exc.problems
            return default


def parse_config(raw: Mapping[str, Any], source: str, env: Mapping[str, str]) -> GatewayConfig:
    """Validate an already-parsed TOML document. Raises ConfigError listing every problem found."""
    problems = _Problems(source)
    carrier_names = registry()
    for key in raw:
        if key not in SECTIONS and key not in carrier_names:
            known = sorted([*SECTIONS, *carrier_names])
            problems.add(f"top level has unknown key '{key}'; known keys (carriers included): {known}")
    tables = {name: raw.get(name, {}) for name in SECTIONS}
    carrier_tables = {name: raw[name] for name in carrier_names if name in raw} or {DEFAULT_CARRIER: {}}
    secrets_from_env = dict(SECRETS_FROM_ENV)
    for name in carrier_tables:
        secrets_from_env[name] = tuple(carrier_names[name].settings_type.secrets)
        tables[name] = carrier_tables[name]
    for name, secrets in secrets_from_env.items():
        given = [key for key in secrets if isinstance(tables[name], dict) and key in tables[name]]
        for key in given:
            problems.add(
                f"[{name}] {key} is read from the environment (its *_env key names the variable), "
                "never from this file"
            )
        if given:
            tables[name] = {k: v for k, v in tables[name].items() if k not in given}
    server = problems.section(ServerSection, tables["server"], "[server]", ServerSection())
    engine = problems.section(EngineSection, tables["engine"], "[engine]", EngineSection())
    store = problems.section(StoreSection, tables["store"], "[store]", StoreSection())
    control = problems.section(ControlSection, tables["control"], "[control]", ControlSection())
    webhooks = problems.section(WebhooksSection, tables["webhooks"], "[webhooks]", WebhooksSection())
    workers = problems.section(WorkersSection, tables["workers"], "[workers]", WorkersSection())
    assert server and engine and store and control and webhooks and workers  # defaults when invalid
    if env.get(workers.key_env):
        workers = dataclasses.replace(workers, key=env[workers.key_env])
    if workers.enabled and not store.url:
        problems.add("[workers] enabled needs [store] url: gateways find the workers in that Redis")

    if store.url and urlsplit(store.url).scheme not in ("redis", "rediss", "unix"):
        problems.add(
            f"[store] url = {store.url!r} should be empty (in memory) or start with redis://, rediss:// or unix://"
        )
    if webhooks.url:
        if urlsplit(webhooks.url).scheme not in ("http", "https"):
            problems.add(f"[webhooks] url = {webhooks.url!r} should be an http(s) URL")
        if not env.get(webhooks.secret_env):
            problems.add(
                f"[webhooks] url is set but {webhooks.secret_env} is not: webhooks are always signed; export "
                "the secret your receiver verifies with"
            )
        else:
            webhooks = dataclasses.replace(webhooks, secret=env[webhooks.secret_env])
    if env.get(server.public_url_env):
        server = dataclasses.replace(server, public_url=env[server.public_url_env])
    if server.public_url:
        parts = urlsplit(server.public_url)
        if parts.scheme == "http" and not server.allow_http_public_url and not is_loopback(parts.hostname):
            problems.add(
                f"[server] public_url = {server.public_url!r} is plain http: carriers would send calls "
                "unencrypted; use https:// (TLS in front), or set allow_http_public_url = true"
            )
        if (
            parts.scheme not in ("https", "http")
            or not parts.hostname
            or parts.path.strip("/")
            or parts.query
        ):
            problems.add(
                f"[server] public_url = {server.public_url!r} must be a bare https:// base such as "
                "'https://gw.example.com' (no path or query)"
            )
    carriers: dict[str, CarrierSettings] = {}
    for name in carrier_tables:
        kind = carrier_names[name].settings_type
        settings = problems.section(kind, tables[name], f"[{name}]", kind())
        assert settings is not None
        resolved = {
            key: env.get(str(getattr(settings, variable))) or None for key, variable in kind.secrets.items()
        }
        carriers[name] = settings = dataclasses.replace(settings, **resolved)
        for problem in settings.problems(server.public_url):
            problems.add(f"[{name}] {problem}")

    # Paths in the file (templates, CRM files) are relative to the file, wherever the gateway is started.
    base_dir = Path(source).resolve().parent if Path(source).is_file() else Path.cwd()
    templates_dir = (
        base_dir / Path(server.templates_dir).expanduser() if server.templates_dir else TEMPLATES_DIR
    )
    adapters: dict[str, CrmAdapter] = {}
    for name, table in _tables(tables["crm"], "[crm]", problems).items():
        try:
            adapters[name] = create_adapter(name, table, f"{source}: [crm.{name}]", env, base_dir)
        except CrmConfigError as exc:
            problems.found += str(exc).splitlines()

    agents: dict[str, AgentConfig] = {}
    for name, table in _tables(tables["agents"], "[agents]", problems).items():
        section = f"[agents.{name}]"
        agent = problems.section(
            AgentConfig, {**table, "name": name} if isinstance(table, dict) else table, section
        )
        if agent is not None:
            for problem in _agent_problems(agent, section, adapters, templates_dir):
                problems.add(problem)
            agents[name] = agent
    if not agents and not any("[agents." in p for p in problems.found):
        problems.add("no agents; add an [agents.<name>] section with voice and prompt")

    numbers_raw = dict(_tables(tables["numbers"], "[numbers]", problems, values=str))
    default_agent = numbers_raw.pop("default", None)
    if default_agent is None and len(agents) > 1:
        problems.add("[numbers] default is missing; name the agent for unknown numbers")
    default_agent = default_agent or next(iter(agents), "")
    numbers: dict[str, str] = {}
    for number, agent_name in [("default", default_agent), *numbers_raw.items()]:
        if agents and agent_name not in agents:
            problems.add(
                f"[numbers] {number} = {agent_name!r} is not an agent; known agents: {sorted(agents)}"
            )
        elif number != "default":
            numbers[normalise_number(number)] = agent_name
    if problems.found:
        raise ConfigError(problems.found)
    return GatewayConfig(
        server=server,
        carriers=carriers,
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
        workers=workers,
    )


def _tables(value: Any, section: str, problems: _Problems, values: type = dict) -> dict[str, Any]:
    """A table of named entries ([crm], [agents], [numbers]); entries of the wrong kind are noted and left
    out."""
    if not isinstance(value, dict):
        problems.add(f"{section} must be a table, got {type(value).__name__}")
        return {}
    kept = {}
    for name, entry in value.items():
        if isinstance(entry, values):
            kept[name] = entry
        else:
            what = "a table" if values is dict else "an agent's name"
            problems.add(f"{section[:-1]}.{name}] should be {what}, got {entry!r}")
    return kept


def _agent_problems(
    agent: AgentConfig, section: str, adapters: Mapping[str, CrmAdapter], templates_dir: Path
) -> list[str]:
    """What an agent's table gets wrong across its keys, or against the rest of the file."""
    found = []
    if bool(agent.prompt.strip()) == bool(agent.template):
        found.append(
            f"{section} needs either prompt (inline text) or template (a file in {templates_dir}), "
            f"not {'both' if agent.template else 'neither'}"
        )
    if agent.template and not (templates_dir / agent.template).is_file():
        there = sorted(p.name for p in templates_dir.glob("*.j2"))
        found.append(
            f"{section} template = {agent.template!r} is not in {templates_dir}; templates there: {there}"
        )
    if agent.crm is not None:
        where = f"{section[:-1]}.crm]"
        if not agent.template:
            found.append(f"{section} has a crm lookup but no template to put the record in")
        if agent.crm.adapter not in adapters:
            found.append(
                f"{where} adapter = {agent.crm.adapter!r} is not declared; add a [crm.{agent.crm.adapter}] "
                f"table (declared: {sorted(adapters)})"
            )
        try:
            check_key_spec(agent.crm.key, where)
        except CrmConfigError as exc:
            found.append(str(exc))
    return found


def is_loopback(host: str | None) -> bool:
    """Whether `host` (a name or address) is this machine only."""
    if host in ("localhost", "ip6-localhost"):
        return True
    try:
        return ipaddress.ip_address((host or "").strip("[]")).is_loopback
    except ValueError:
        return False


def exposure_problem(config: GatewayConfig, host: str, confirmed_unsigned: bool = False) -> str | None:
    """Why serving `config` on `host` would be unsafe, or None. A carrier whose signatures are not checked
    lets anyone who can reach the port place calls: that is fine on this machine (the demo), and beyond it
    only when the operator says so twice (its `allow_unsigned` and `--confirm-unsigned`)."""
    if is_loopback(host):
        return None
    for name, settings in config.carriers.items():
        if _signs(name, settings, config.server.public_url):
            continue
        variables = settings.signing_variables()
        if settings.allow_unsigned and confirmed_unsigned:
            continue
        fix = (
            "add --confirm-unsigned to serve unsigned traffic anyway"
            if settings.allow_unsigned
            else f"export {' / '.join(variables)} and set [server] public_url (or "
            f"{config.server.public_url_env}), or bind to 127.0.0.1; to serve unsigned traffic anyway set "
            f"[{name}] allow_unsigned = true and add --confirm-unsigned"
        )
        return (
            f"{config.source}: refusing to serve on {host} without {name} signatures "
            f"({' / '.join(variables)} not set): anyone who can reach it could place calls; {fix}"
        )
    return None


def _signs(name: str, settings: CarrierSettings, public_url: str) -> bool:
    """Whether the carrier built from `settings` checks who is calling."""
    try:
        return carrier_class(name)(settings, public_url or None).authenticates
    except ValueError:
        return False
