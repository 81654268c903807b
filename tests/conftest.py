"""Shared fixtures: the engine the gateway tests run on, a live gateway under real uvicorn on 127.0.0.1,
and real wav files of test tones."""

from __future__ import annotations

import os
import sys

# The tiny fixture's recordings were made with PyTorch's AVX2 CPU kernels; AVX-512/AMX kernels round bf16
# ties differently and flip argmaxes. The pins must be set before torch is imported (scripts/test.sh
# exports the same; this covers a bare `pytest`).
CPU_KERNEL_PINS = {
    "ATEN_CPU_CAPABILITY": "avx2",
    "DNNL_MAX_CPU_ISA": "AVX2",
    "MKL_ENABLE_INSTRUCTIONS": "AVX2",
}
if "torch" in sys.modules and any(os.environ.get(k) != v for k, v in CPU_KERNEL_PINS.items()):
    raise RuntimeError(
        f"torch was imported before tests/conftest.py could pin its CPU kernels: set {CPU_KERNEL_PINS}"
    )
for _name, _value in CPU_KERNEL_PINS.items():
    os.environ.setdefault(_name, _value)

import asyncio
import socket
import threading
import time
import tomllib
import wave
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import uvicorn
from serveproc import ADMIT_FRACTION

from engine.api import Engine
from engine.checkpoint import write_random_checkpoint
from engine.echo import EchoEngine
from engine.embedded import build_engine
from engine.loading import resolve_checkpoint
from gateway.cli import WS_IMPLEMENTATION
from gateway.config import EXAMPLE_CONFIG, GatewayConfig, parse_config
from gateway.edge.app import create_app

# One CPU thread, as the engine runs on a CPU by default and as the fixture's recordings were made: a
# single test file then computes exactly what the whole suite does.
torch.set_num_threads(1)

TEST_AUTH_TOKEN = "test-auth-token-0123456789abcdef"


def pytest_report_header() -> str:
    return f"torch CPU kernels: {torch.backends.cpu.get_cpu_capability()} (pinned: {CPU_KERNEL_PINS})"


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random tiny checkpoint in the published format, written once per test run (voice "demo", the
    example config's voice)."""
    return write_random_checkpoint(tmp_path_factory.mktemp("tiny-checkpoint"))


@pytest.fixture
def engine(tiny_checkpoint: Path) -> Iterator[Engine]:
    """The real engine (model, batching worker, admission by free slots) on the tiny checkpoint, for gateway
    tests."""
    files = resolve_checkpoint(tiny_checkpoint)
    worker = build_engine(files, torch.device("cpu"), capacity=4, admit_fraction=ADMIT_FRACTION)
    yield worker
    worker.shutdown()


@pytest.fixture
def echo_engine() -> EchoEngine:
    """An echo engine for tests that need its knobs (slow priming, busy, failing, losing sessions)."""
    return EchoEngine()


@dataclass
class LiveGateway:
    """A gateway app served by uvicorn in its own thread and event loop, on a real loopback port."""

    base_url: str
    app: Any
    engine: Any
    auth_token: str | None

    @property
    def ws_url(self) -> str:
        return self.base_url.replace("http://", "ws://") + "/twilio/media"

    @property
    def webhook(self) -> str:
        return self.base_url + "/twilio/voice"

    @property
    def state(self) -> Any:
        return self.app.state.gateway

    async def until(self, condition: Callable[[], bool], timeout_s: float = 3.0) -> bool:
        """Poll `condition` (gateway state lives in the server thread) for at most `timeout_s`."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if condition():
                return True
            await asyncio.sleep(0.01)
        return condition()


def gateway_config(
    public_url: str,
    auth_token: str | None = None,
    tables: dict[str, Any] | None = None,
    env: dict[str, str] | None = None,
    **server: Any,
) -> GatewayConfig:
    """The example config with this server's public URL filled in, optionally an auth token, whole
    top-level tables replaced (`tables={"agents": ..., "numbers": ...}`), environment variables the config
    reads (`env`) and [server] keys overridden."""
    with EXAMPLE_CONFIG.open("rb") as fh:
        raw = tomllib.load(fh)
    raw.update(tables or {})
    raw["server"].update(public_url=public_url, **server)
    env = dict(env or {})
    if auth_token:
        env[raw["twilio"].get("auth_token_env", "TWILIO_AUTH_TOKEN")] = auth_token
    return parse_config(raw, source=str(EXAMPLE_CONFIG), env=env)


@pytest.fixture
def start_gateway() -> Iterator[Callable[..., LiveGateway]]:
    """Factory: start_gateway(engine, auth_token=None, tables=None, **server_keys) -> LiveGateway; the
    arguments after the engine go to `gateway_config`. Servers are stopped at teardown."""
    servers: list[tuple[uvicorn.Server, threading.Thread]] = []

    def start(
        engine: Any,
        auth_token: str | None = None,
        tables: dict[str, Any] | None = None,
        env: dict[str, str] | None = None,
        **server: Any,
    ) -> LiveGateway:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        base_url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        app = create_app(gateway_config(base_url, auth_token, tables, env, **server), engine)
        config = uvicorn.Config(
            app, log_level="warning", ws=WS_IMPLEMENTATION, ws_max_size=1 << 20, lifespan="on"
        )
        uv = uvicorn.Server(config)
        thread = threading.Thread(target=uv.run, kwargs={"sockets": [sock]}, daemon=True)
        thread.start()
        servers.append((uv, thread))
        deadline = time.monotonic() + 10
        while not uv.started:
            if time.monotonic() > deadline or not thread.is_alive():
                raise RuntimeError(f"test gateway on {base_url} did not start")
            time.sleep(0.01)
        return LiveGateway(base_url, app, engine, auth_token)

    yield start
    for uv, thread in servers:
        uv.should_exit = True
        thread.join(timeout=10)


@pytest.fixture
def live_gateway(start_gateway: Callable[..., LiveGateway], engine: Engine) -> LiveGateway:
    """A running gateway without Twilio auth, on the `engine` fixture (tests of engine-agnostic behaviour)."""
    return start_gateway(engine)


@pytest.fixture
def echo_gateway(start_gateway: Callable[..., LiveGateway], echo_engine: EchoEngine) -> LiveGateway:
    """A running gateway on the echo engine, for tests that check what comes back or count sessions."""
    return start_gateway(echo_engine)


@pytest.fixture
def tone_wav(tmp_path: Path) -> Callable[..., Path]:
    """Factory: tone_wav(freq_hz, seconds, rate=24000, amplitude=0.3) -> path of a real 16-bit wav file."""

    def write(freq_hz: float, seconds: float, rate: int = 24000, amplitude: float = 0.3) -> Path:
        t = np.arange(int(seconds * rate)) / rate
        pcm = np.round(amplitude * 32767 * np.sin(2 * np.pi * freq_hz * t)).astype("<i2")
        path = tmp_path / f"tone_{freq_hz:g}hz_{seconds:g}s_{rate}.wav"
        with wave.open(str(path), "wb") as wav:
            wav.setnchannels(1)
            wav.setsampwidth(2)
            wav.setframerate(rate)
            wav.writeframes(pcm.tobytes())
        return path

    return write
