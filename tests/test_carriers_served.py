"""`duplexgate call --carrier X` against `duplexgate serve` for every carrier, as a user would run them:
one real gateway process (the example config plus every carrier's section, the real tiny engine) and one
real simulated-carrier process per carrier; each call hears at least 80% of its input back as agent
audio, with no protocol violation."""

from __future__ import annotations

import pytest
from serveproc import assert_served, call, example_config, serve, speech_wav

from gateway.carriers import registry


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    directory = tmp_path_factory.mktemp("carriers")
    config = example_config(directory, slots=2)
    sections = "".join(f"\n[{name}]\n" for name in sorted(registry()) if name != "twilio")
    config.write_text(config.read_text() + sections)  # loopback: the demo needs no carrier secrets
    with serve(directory, config) as running:
        yield running, directory


@pytest.mark.parametrize("carrier", sorted(registry()))
def test_a_simulated_call_on_every_carrier_is_answered_by_duplexgate_serve(server, carrier: str) -> None:
    running, directory = server
    caller, input_s = speech_wav(directory / f"{carrier}.wav", "My dishwasher is leaking, can you help?")
    assert_served(call(running, caller, directory / f"{carrier}-heard.wav", carrier), input_s)
    assert (directory / f"{carrier}-heard.wav").stat().st_size > 0
