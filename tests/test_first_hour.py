"""A new user's first hour, as the README has it: `duplexgate serve` on its embedded default (random demo
model on the CPU, admission on), then `duplexgate call` runs of synthesised speech. Every call is served
with agent audio for at least 80% of its input, and a call the engine cannot take exits non-zero with the
reason. Real processes, real sockets on loopback."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from serveproc import Server, assert_served, call, example_config, serve, speech_wav

SPEECH = (
    "Hello, my dishwasher is leaking water all over the kitchen floor. Can somebody come this week to "
    "repair it? I am home on Monday and Tuesday after nine in the morning."
)


@pytest.fixture
def demo_server(tmp_path: Path) -> Iterator[Server]:
    with serve(tmp_path, example_config(tmp_path, slots=2)) as server:
        yield server


def test_the_demo_serves_a_call_then_two_at_once_and_refuses_a_third_with_the_reason(demo_server, tmp_path):
    caller, input_s = speech_wav(tmp_path / "caller.wav", SPEECH.split("?")[0])
    assert_served(call(demo_server, caller, tmp_path / "first.wav"), input_s)
    with ThreadPoolExecutor(3) as pool:
        results = list(pool.map(lambda n: call(demo_server, caller, tmp_path / f"agent{n}.wav"), range(3)))
    served = [r for r in results if r[0] == 0]
    refused = [r for r in results if r[0] != 0]
    assert len(served) == 2 and len(refused) == 1
    for result in served:
        assert_served(result, input_s)
    status, summary, stderr = refused[0]
    assert status == 1
    if summary:  # all three webhooks came before a prime held a slot: the stream is refused when it opens
        assert summary["closed_by"] == "gateway"
        assert "close code 1000" in stderr and "all 2 engine slots are in use" in stderr
        assert "EngineBusy" in demo_server.log.read_text()
    else:  # the usual case: the third webhook found both slots taken and answered the overflow
        assert "no stream: said 'Sorry, all of our agents are busy" in stderr
        assert "no engine slot free (all 2 engine slots are in use)" in demo_server.log.read_text()


@pytest.mark.slow
def test_the_demo_serves_five_ten_second_calls_in_turn_then_two_at_once(tmp_path):
    """The issue's acceptance run: a 10 s espeak-ng recording, 5 calls in turn and then 2 at once."""
    caller, input_s = speech_wav(tmp_path / "caller.wav", SPEECH)
    assert input_s > 9
    with serve(tmp_path, example_config(tmp_path, slots=8)) as server:
        for n in range(5):
            assert_served(call(server, caller, tmp_path / f"turn{n}.wav"), input_s)
        with ThreadPoolExecutor(2) as pool:
            for result in pool.map(lambda n: call(server, caller, tmp_path / f"both{n}.wav"), range(2)):
                assert_served(result, input_s)
