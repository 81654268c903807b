"""`duplexgate serve` and `duplexgate call` as real processes, for the tests that use the gateway the way
a user does: the README's commands on loopback."""

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
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

from gateway.config import EXAMPLE_CONFIG

# Admission by free slots only in the tests' engines. The step-time budget (a share of the 80 ms frame) is
# a GPU's: the tiny model on a loaded 2-core test machine can step slower than that and would turn the
# tests' calls away. The budget itself is tested on purpose, with set budgets, in test_engine_worker.py.
ADMIT_FRACTION = 100.0


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


def example_config(directory: Path, slots: int) -> Path:
    """The example config in `directory` (beside its CRM sample), its engine held to `slots` calls."""
    config = directory / "gateway.toml"
    text = EXAMPLE_CONFIG.read_text()
    for old, new in (
        ("slots = 0 ", f"slots = {slots} "),
        ("admit_fraction = 0.8", f"admit_fraction = {ADMIT_FRACTION}"),
    ):
        assert old in text, old
        text = text.replace(old, new, 1)
    config.write_text(text)
    shutil.copy(EXAMPLE_CONFIG.parent / "customers.example.csv", directory)
    return config


@contextmanager
def serve(directory: Path, config: Path) -> Iterator[Server]:
    """`duplexgate serve --config config` on a free loopback port, until /readyz says it would take a call;
    stopped with SIGINT afterwards if it is still running."""
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
        if process.poll() is None:
            process.send_signal(signal.SIGINT)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()


def call(server: Server, caller: Path, output: Path, carrier: str = "twilio") -> tuple[int, dict, str]:
    """`duplexgate call --carrier carrier` against `server`: through its answer webhook, or straight to
    its media stream for a carrier that has none (a PBX)."""
    from gateway.carriers import registry

    if registry()[carrier].peer.has_webhook:
        target = ["--webhook", f"{server.url}/{carrier}/voice"]
    else:
        target = ["--url", f"{server.url.replace('http://', 'ws://')}/{carrier}/media"]
    done = subprocess.run(
        [sys.executable, "-m", "gateway.cli", "call", "--carrier", carrier, *target]
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
