"""A new user's first hour, as the README has it: `duplexgate serve` on its embedded default (random demo
model on the CPU, admission on), then `duplexgate call` runs of synthesised speech. Every call is served
with agent audio for at least 80% of its input, and a call the engine cannot take exits non-zero with the
reason. Real processes, real sockets on loopback."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import wave
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from gateway.config import EXAMPLE_CONFIG

SPEECH = (
    "Hello, my dishwasher is leaking water all over the kitchen floor. Can somebody come this week to "
    "repair it? I am home on Monday and Tuesday after nine in the morning."
)


@dataclass
class Server:
    url: str
    process: subprocess.Popen
    log: Path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def speech_wav(path: Path, text: str) -> tuple[Path, float]:
    espeak = shutil.which("espeak-ng")
    if espeak is None:
        raise RuntimeError("espeak-ng is not installed: run scripts/test.sh, which installs it")
    subprocess.run([espeak, "-w", str(path), text], check=True, timeout=30)
    with wave.open(str(path)) as wav:
        return path, wav.getnframes() / wav.getframerate()


@contextmanager
def serve(directory: Path, slots: int) -> Iterator[Server]:
    """`duplexgate serve` with the example config (its engine held to `slots` calls), until /readyz says
    it would take a call; stopped with SIGINT afterwards."""
    config = directory / "gateway.toml"
    config.write_text(EXAMPLE_CONFIG.read_text().replace("slots = 0 ", f"slots = {slots} "))
    shutil.copy(EXAMPLE_CONFIG.parent / "customers.example.csv", directory)
    port = free_port()
    log = directory / "serve.log"
    env = {**os.environ, "DUPLEXGATE_HOME": str(directory / "home")}
    command = [sys.executable, "-m", "gateway.cli", "serve", "--config", str(config)]
    with log.open("wb") as out:
        process = subprocess.Popen(
            [*command, "--host", "127.0.0.1", "--port", str(port)],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
        )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    try:
        while True:
            assert process.poll() is None, f"serve exited {process.returncode}:\n{log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"not ready within 120 s:\n{log.read_text()[-3000:]}"
            try:
                if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        yield Server(url, process, log)
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()


def call(server: Server, caller: Path, output: Path) -> tuple[int, dict, str]:
    done = subprocess.run(
        [sys.executable, "-m", "gateway.cli", "call", "--webhook", server.url + "/twilio/voice"]
        + ["--input", str(caller), "--output", str(output)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    return done.returncode, json.loads(done.stdout) if done.stdout.strip() else {}, done.stderr


def assert_served(result: tuple[int, dict, str], input_s: float) -> None:
    status, summary, stderr = result
    assert status == 0, stderr[-2000:]
    assert summary["closed_by"] == "carrier" and summary["violations"] == 0
    assert summary["audio_received_s"] >= 0.8 * input_s


@pytest.fixture
def demo_server(tmp_path: Path) -> Iterator[Server]:
    with serve(tmp_path, slots=2) as server:
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
    assert status == 1 and summary["closed_by"] == "gateway"
    assert "close code 1000" in stderr and "all 2 engine slots are in use" in stderr
    assert "EngineBusy" in demo_server.log.read_text()


@pytest.mark.slow
def test_the_demo_serves_five_ten_second_calls_in_turn_then_two_at_once(tmp_path):
    """The issue's acceptance run: a 10 s espeak-ng recording, 5 calls in turn and then 2 at once."""
    caller, input_s = speech_wav(tmp_path / "caller.wav", SPEECH)
    assert input_s > 9
    with serve(tmp_path, slots=8) as server:
        for n in range(5):
            assert_served(call(server, caller, tmp_path / f"turn{n}.wav"), input_s)
        with ThreadPoolExecutor(2) as pool:
            for result in pool.map(lambda n: call(server, caller, tmp_path / f"both{n}.wav"), range(2)):
                assert_served(result, input_s)
