"""Secure by default: the shipped config serves this machine only; `serve` refuses to expose a gateway
that checks no signatures unless the operator says so twice; public URLs are https; the compose file runs
with signatures on."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest
import yaml
from conftest import gateway_config

from gateway.cli import main
from gateway.config import EXAMPLE_CONFIG, ConfigError, exposure_problem, load_config, parse_config

ROOT = Path(__file__).resolve().parents[1]
SIGNED = {"TWILIO_AUTH_TOKEN": "t" * 32, "DUPLEXGATE_PUBLIC_URL": "https://gw.example.com"}


def example(env: dict[str, str] | None = None, **twilio):
    raw = tomllib.loads(EXAMPLE_CONFIG.read_text())
    raw["twilio"].update(twilio)
    return parse_config(raw, source=str(EXAMPLE_CONFIG), env=env or {})


def test_the_shipped_config_listens_on_this_machine_only() -> None:
    assert load_config(env={}).server.host == "127.0.0.1"


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.5", "::1", "localhost"])
def test_the_unsigned_demo_may_serve_this_machine(host: str) -> None:
    assert exposure_problem(example(), host) is None


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "10.1.2.3", "gw.example.com"])
def test_an_unsigned_gateway_is_not_exposed_beyond_this_machine(host: str) -> None:
    problem = exposure_problem(example(), host)
    assert problem is not None and f"on {host} without twilio signatures" in problem
    assert "TWILIO_AUTH_TOKEN" in problem


def test_exposing_an_unsigned_gateway_takes_the_switch_and_the_confirmation() -> None:
    assert exposure_problem(example(), "0.0.0.0", confirmed_unsigned=True) is not None
    allowed = example(allow_unsigned=True)
    assert "--confirm-unsigned" in (exposure_problem(allowed, "0.0.0.0") or "")
    assert exposure_problem(allowed, "0.0.0.0", confirmed_unsigned=True) is None


def test_a_signed_gateway_with_its_public_url_from_the_environment_may_be_exposed() -> None:
    config = example(env=SIGNED)
    assert config.server.public_url == "https://gw.example.com"
    assert config.carriers["twilio"].auth_token == "t" * 32
    assert exposure_problem(config, "0.0.0.0") is None


def test_serve_refuses_an_unsigned_public_address_at_once(
    tmp_path, tiny_checkpoint, monkeypatch, capsys
) -> None:
    (tmp_path / "random-tiny").symlink_to(tiny_checkpoint)  # the demo's tokenizer, for the prompt checks
    monkeypatch.setenv("DUPLEXGATE_HOME", str(tmp_path))
    monkeypatch.delenv("TWILIO_AUTH_TOKEN", raising=False)
    assert main(["serve", "--host", "0.0.0.0", "--port", "9"]) == 2
    assert "refusing to serve on 0.0.0.0 without twilio signatures" in capsys.readouterr().err


def test_a_plain_http_public_url_is_refused_unless_allowed() -> None:
    with pytest.raises(ConfigError, match=r"public_url = 'http://gw.example.com' is plain http"):
        gateway_config("http://gw.example.com")
    assert gateway_config("http://gw.example.com", allow_http_public_url=True).server.public_url
    assert gateway_config("http://127.0.0.1:8080").server.public_url  # a test or a local tunnel


def test_the_compose_file_runs_with_signatures_on() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    environment = compose["services"]["gateway"]["environment"]
    for variable in SIGNED:  # required: compose stops with the message if either is missing
        assert re.fullmatch(r"\$\{" + variable + r":\?.+\}", environment[variable])
    dockerfile = (ROOT / "deploy" / "Dockerfile").read_text()
    command = re.search(r"^CMD (\[.*\])$", dockerfile, re.M)
    assert command is not None and '"--host", "0.0.0.0"' in command.group(1)
    assert exposure_problem(example(env=SIGNED), "0.0.0.0") is None
