"""Each carrier's `[<name>]` config section, whatever the carrier: its settings load with secrets from the
environment, `config check` reports a bad key or a secret written in the file naming the section, the
served carriers are the ones with a section, and a served carrier without its secret keeps the gateway off
the network unless the operator says so twice."""

from __future__ import annotations

import re
import tomllib

import pytest
from carrier_api import CarrierApi

from gateway.carriers import registry
from gateway.config import EXAMPLE_CONFIG, ConfigError, exposure_problem, parse_config

CARRIERS = sorted(registry())
PUBLIC = "https://gw.example.com"


def config_with(carriers: dict[str, dict], env: dict[str, str] | None = None):
    raw = tomllib.loads(EXAMPLE_CONFIG.read_text())
    raw.pop("twilio", None)
    raw.update(carriers)
    raw["server"]["public_url"] = PUBLIC
    return parse_config(raw, source=str(EXAMPLE_CONFIG), env=env or {})


@pytest.fixture(scope="module")
def api():
    stand_in = CarrierApi()
    yield stand_in
    stand_in.close()


@pytest.mark.parametrize("name", CARRIERS)
def test_a_carrier_section_loads_with_its_secrets_from_the_environment(name: str, api) -> None:
    kind = registry()[name]
    table, env, _ = kind.peer.conformance_setup(api.url)
    config = config_with({name: table}, env)
    settings = config.carriers[name]
    assert list(config.carriers) == [name] and isinstance(settings, kind.settings_type)
    for secret, variable in kind.settings_type.secrets.items():
        expected = env.get(getattr(settings, variable))
        assert getattr(settings, secret) == (expected or None)
        if expected:
            assert expected not in repr(settings)  # secrets stay out of logs
    carrier = kind(settings, PUBLIC)
    assert carrier.authenticates and exposure_problem(config, "0.0.0.0") is None


@pytest.mark.parametrize("name", CARRIERS)
def test_config_check_names_the_section_of_a_bad_key_and_of_a_secret_in_the_file(name: str) -> None:
    kind = registry()[name].settings_type
    secret = next(iter(kind.secrets), None)
    table = {"no_such_key": 1} | ({secret: "written-in-the-file"} if secret else {})
    with pytest.raises(ConfigError) as refused:
        config_with({name: table})
    problems = "\n".join(refused.value.problems)
    assert f"[{name}] has unknown key 'no_such_key'" in problems
    if secret:
        assert f"[{name}] {secret} is read from the environment" in problems


@pytest.mark.parametrize("name", CARRIERS)
def test_a_served_carrier_without_its_secret_is_not_exposed(name: str) -> None:
    config = config_with({name: {}})
    problem = exposure_problem(config, "0.0.0.0")
    assert problem is not None and f"without {name} signatures" in problem
    confirmed = config_with({name: {"allow_unsigned": True}})
    assert exposure_problem(confirmed, "0.0.0.0", confirmed_unsigned=True) is None


def test_a_config_naming_no_carrier_serves_twilio_and_an_unknown_section_is_refused() -> None:
    assert list(config_with({}).carriers) == ["twilio"]
    with pytest.raises(ConfigError, match="unknown key 'twillio'"):
        config_with({"twillio": {}})


def test_several_carriers_are_served_side_by_side_and_numbers_map_whatever_the_carrier() -> None:
    config = config_with({name: {} for name in CARRIERS})
    assert sorted(config.carriers) == CARRIERS
    assert config.agent_for("+15550002222").name == config.default_agent


def test_the_example_configs_commented_carrier_sections_load_when_uncommented() -> None:
    text = EXAMPLE_CONFIG.read_text()
    start = text.index("# [signalwire]")
    end = text.index("\n\n", start)
    block = re.sub(r"^# ?", "", text[start:end], flags=re.M)
    config = parse_config(
        tomllib.loads(text[:start] + block + text[end:]),
        source=str(EXAMPLE_CONFIG),
        env={"ASTERISK_ARI_PASSWORD": "ari-secret"},
    )
    assert sorted(config.carriers) == CARRIERS  # every carrier is documented there
