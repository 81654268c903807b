"""Role prompts wired into the gateway: agent and CRM configuration, the live app priming calls with prompts
rendered from CRM records (webhook fields, custom parameters, a CRM slower than its deadline), and the
`duplexgate prompt render` / `config check` commands."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from engine.echo import EchoEngine
from gateway.carriers.twilio import fetch_twiml
from gateway.cli import main
from gateway.config import EXAMPLE_CONFIG, ConfigError, load_config
from gateway.simulator.call import simulate_call

SERVICE_AGENT = """
[engine]
checkpoint = "{checkpoint}"
[crm.customers]
type = "static_file"
path = "customers.csv"
[agents.waste]
voice = "demo"
template = "waste_management.j2"
crm = {{ adapter = "customers", key = "caller" }}
[agents.waste.vars]
company = "CitySan Services"
persona = "Ayelen Lucero"
[agents.waste.limits]
max_duration = 600
[agents.waste.escalation]
dtmf = "0"
transfer_to = "+15550009999"
actions = {{ dtmf = ["announce", "transfer"] }}
"""


def write_config(directory: Path, text: str, checkpoint: str = "") -> Path:
    (directory / "customers.csv").write_text("phone,name,next_pickup\n+15550101234,Omar Torres,2026-04-12\n")
    path = directory / "gw.toml"
    path.write_text(text.format(checkpoint=checkpoint))
    return path


# --- configuration


def test_template_agent_with_crm_limits_and_escalation_tables_loads(tmp_path: Path) -> None:
    config = load_config(write_config(tmp_path, SERVICE_AGENT), env={})
    agent = config.agents["waste"]
    assert (agent.template, agent.crm.adapter, agent.crm.key) == (
        "waste_management.j2",
        "customers",
        "caller",
    )
    assert agent.vars["persona"] == "Ayelen Lucero" and agent.limits.max_duration == 600
    assert agent.escalation.actions_for("dtmf") == ("announce", "transfer")
    assert "customers" in config.crm


async def test_crm_file_path_is_relative_to_the_config_file(tmp_path: Path) -> None:
    from gateway.call.incoming import IncomingCall

    config = load_config(write_config(tmp_path, SERVICE_AGENT), env={})
    result = await config.crm["customers"].lookup(IncomingCall("CA1", caller="+15550101234"))
    assert result.data["name"] == "Omar Torres"


@pytest.mark.parametrize(
    "agent_table, names",
    [
        ('voice = "v"\nprompt = "p"\ntemplate = "casual.j2"', ["[agents.a]", "not both"]),
        ('voice = "v"\ntemplate = "nope.j2"', ["[agents.a]", "template = 'nope.j2'", "casual.j2"]),
        ('voice = "v"\ntemplate = "casual.j2"\ncrm = { adapter = "crmx" }', ["[agents.a.crm]", "crmx"]),
        (
            'voice = "v"\ntemplate = "casual.j2"\ncrm = { adapter = "c", key = "phone" }',
            ["[agents.a.crm]", "key"],
        ),
        ('voice = "v"\nprompt = "p"\ncrm = { adapter = "c" }', ["[agents.a]", "no template"]),
        ('voice = "v"\nprompt = "p"\nmax_prompt_tokens = 5000', ["[agents.a]", "max_prompt_tokens", "3000"]),
        ('voice = "v"\nprompt = "p"\nvars = "x"', ["[agents.a.vars]", "table"]),
    ],
)
def test_agent_prompt_errors_name_file_section_and_key(
    tmp_path: Path, agent_table: str, names: list[str]
) -> None:
    (tmp_path / "c.csv").write_text("phone\n")
    path = tmp_path / "bad.toml"
    path.write_text(f'[crm.c]\ntype = "static_file"\npath = "c.csv"\n[agents.a]\n{agent_table}\n')
    with pytest.raises(ConfigError) as error:
        load_config(path, env={})
    for name in [str(path), *names]:
        assert name in str(error.value)


def test_crm_adapter_error_names_file_and_section(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text('[crm.db]\ntype = "sql"\ndsn = "sqlite:///missing.db"\nquery = "SELECT 1 WHERE :key"\n')
    with pytest.raises(ConfigError, match=rf"{path}: \[crm.db\] dsn = .*missing.db does not exist"):
        load_config(path, env={})


# --- the live app


def crm_tables(path: Path, key: str = "caller", **crm: Any) -> dict[str, Any]:
    return {
        "crm": {"customers": {"type": "static_file", "path": str(path), **crm}},
        "agents": {
            "waste": {
                "voice": "demo",
                "template": "waste_management.j2",
                "crm": {"adapter": "customers", "key": key},
                "vars": {"company": "CitySan Services", "persona": "Ayelen Lucero"},
            }
        },
        "numbers": {"default": "waste"},
    }


@pytest.fixture
def customers_csv(tmp_path: Path) -> Path:
    path = tmp_path / "customers.csv"
    path.write_text("phone,account,name,next_pickup\n+15550001111,A-100,Omar Torres,2026-04-12\n")
    return path


async def test_webhook_call_is_primed_with_the_callers_crm_record(start_gateway, customers_csv: Path) -> None:
    live = start_gateway(EchoEngine(), tables=crm_tables(customers_csv))
    form = {"CallSid": "CA" + "1" * 32, "From": "+15550001111", "To": "+15550002222"}
    await fetch_twiml(live.webhook, form, None)
    assert await live.until(lambda: len(live.engine.specs) == 1)
    assert "Verify customer name Omar Torres. Upcoming pickup: April 12th" in live.engine.specs[0].prompt
    record = live.state.role_prompts[form["CallSid"]].summary()
    assert record["crm"]["status"] == "found" and record["template"] == "waste_management.j2"


async def test_webhook_form_fields_can_key_the_lookup(start_gateway, customers_csv: Path) -> None:
    live = start_gateway(
        EchoEngine(), tables=crm_tables(customers_csv, key="fields.AccountNumber", key_field="account")
    )
    form = {
        "CallSid": "CA" + "2" * 32,
        "From": "+15559999999",
        "To": "+15550002222",
        "AccountNumber": "A-100",
    }
    await fetch_twiml(live.webhook, form, None)
    assert await live.until(lambda: len(live.engine.specs) == 1)
    assert "Omar Torres" in live.engine.specs[0].prompt


async def test_stream_custom_parameters_can_key_the_lookup(
    start_gateway, customers_csv: Path, tone_wav
) -> None:
    live = start_gateway(
        EchoEngine(), tables=crm_tables(customers_csv, key="params.account", key_field="account")
    )
    await simulate_call(
        live.ws_url, tone_wav(440, 0.3), caller="+15559999999", custom_parameters={"account": "A-100"}
    )
    assert "Omar Torres" in live.engine.specs[0].prompt


class SlowCrm(BaseHTTPRequestHandler):
    def log_message(self, *args: Any) -> None:
        pass

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        time.sleep(2.0)
        body = json.dumps({"name": "Too Late"}).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        try:
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the gateway stopped waiting, as it should


@pytest.fixture
def slow_crm_url() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), SlowCrm)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/customers?phone={{key}}"
    server.shutdown()
    server.server_close()


async def test_crm_slower_than_its_deadline_does_not_hold_up_the_call(
    start_gateway, slow_crm_url: str
) -> None:
    tables = crm_tables(Path("unused"))
    tables["crm"] = {"customers": {"type": "http_json", "url": slow_crm_url, "deadline_s": 0.3}}
    live = start_gateway(EchoEngine(), tables=tables)
    form = {"CallSid": "CA" + "3" * 32, "From": "+15550001111", "To": "+15550002222"}
    started = time.monotonic()
    await fetch_twiml(live.webhook, form, None)
    assert await live.until(lambda: len(live.engine.specs) == 1, timeout_s=1.5)
    assert time.monotonic() - started < 1.5
    assert "Ask for the caller's name and street address" in live.engine.specs[0].prompt
    assert live.state.role_prompts[form["CallSid"]].crm.status == "timeout"


# --- the commands


def cli_config(tmp_path: Path, checkpoint: Path) -> Path:
    return write_config(tmp_path, SERVICE_AGENT, str(checkpoint))


def test_prompt_render_prints_the_prompt_and_its_token_count(
    tmp_path: Path, tiny_checkpoint: Path, capsys
) -> None:
    path = cli_config(tmp_path, tiny_checkpoint)
    assert (
        main(["prompt", "render", "--config", str(path), "--agent", "waste", "--caller", "+15550101234"]) == 0
    )
    text, summary = capsys.readouterr().out.strip().splitlines()
    assert "Verify customer name Omar Torres" in text
    assert summary.startswith("-- ") and "tokens of max 300" in summary and "found" in summary


def test_prompt_render_takes_the_record_from_a_data_file(
    tmp_path: Path, tiny_checkpoint: Path, capsys
) -> None:
    path = cli_config(tmp_path, tiny_checkpoint)
    data = tmp_path / "record.json"
    data.write_text(json.dumps({"name": "Ana Ruiz", "schedule": "weekly"}))
    argv = [
        "prompt",
        "render",
        "--config",
        str(path),
        "--agent",
        "waste",
        "--caller",
        "+1555",
        "--data",
        str(data),
    ]
    assert main(argv) == 0
    assert "Verify customer name Ana Ruiz. Current schedule: weekly." in capsys.readouterr().out


def test_config_check_passes_the_example_config(
    tiny_checkpoint: Path, tmp_path: Path, monkeypatch, capsys
) -> None:
    # The example runs the demo model, whose tokenizer is found under DUPLEXGATE_HOME (not the real home).
    (tmp_path / "random-tiny").symlink_to(tiny_checkpoint)
    monkeypatch.setenv("DUPLEXGATE_HOME", str(tmp_path))
    assert main(["config", "check", "--config", str(EXAMPLE_CONFIG)]) == 0
    assert capsys.readouterr().out.strip().endswith("OK")


def test_config_check_reports_every_problem_at_once(tmp_path: Path, tiny_checkpoint: Path, capsys) -> None:
    templates = tmp_path / "templates"
    templates.mkdir()
    (templates / "good.j2").write_text("You help {{ customer.name | default('callers') }}.")
    (templates / "strict.j2").write_text("You help {{ customer.name }} of {{ agent.company }}.")
    (templates / "broken.j2").write_text("{% if %}")
    agents = "".join(
        f'[agents.{name}]\nvoice = "demo"\ntemplate = "{name}.j2"\n' for name in ("good", "strict", "broken")
    )
    path = tmp_path / "gw.toml"
    path.write_text(
        f'[server]\ntemplates_dir = "templates"\n[engine]\ncheckpoint = "{tiny_checkpoint}"\n{agents}'
        '[agents.long]\nvoice = "demo"\nprompt = "word"\nmax_prompt_tokens = 1\n'
        '[numbers]\ndefault = "good"\n'
    )
    assert main(["config", "check", "--config", str(path)]) == 1
    problems = [line for line in capsys.readouterr().out.splitlines() if line.startswith("problem: ")]
    assert any("broken.j2:1: template syntax error" in p for p in problems)
    assert any("agent 'strict'" in p and "'name'" in p for p in problems)
    assert any("agent 'long'" in p and "max_prompt_tokens = 1" in p for p in problems)
    assert not any("agent 'good'" in p for p in problems)


def test_config_check_lists_every_schema_problem_across_sections(tmp_path: Path, capsys) -> None:
    path = tmp_path / "gw.toml"
    path.write_text(
        '[server]\nport = "80"\nhots = 1\n[twilio]\nauth_token = "in-the-file"\n'
        '[agents.a]\nvoice = "v"\nprompt = "p"\n[agents.a.limits]\nmax_duration = -1\n'
        '[agents.b]\nvoice = "v"\n'
        '[agents.c]\nvoice = "v"\nprompt = "p"\n[agents.c.sampling]\ntemp_text = "hot"\n'
        '[numbers]\ndefault = "b"\n"+1555" = "d"\n'
    )
    assert main(["config", "check", "--config", str(path)]) == 2
    lines = capsys.readouterr().err.splitlines()
    expected = [
        "[server] port = '80' should be an integer",
        "[server] has unknown key 'hots'",
        "[twilio] auth_token is read from the environment",
        "[agents.a.limits] max_duration = -1 should be greater than 0",
        "[agents.b] needs either prompt (inline text) or template",
        "[agents.c.sampling] temp_text = 'hot' should be a number",
        "[numbers] +1555 = 'd' is not an agent",
    ]
    for fragment in expected:
        assert sum(fragment in line and str(path) in line for line in lines) == 1, fragment
    assert lines[-1].endswith(f"{len(expected)} problem(s) in the config")
