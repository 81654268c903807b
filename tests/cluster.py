"""A two-tier duplexgate on loopback, as real processes: a redis-server that can be stopped and started
again on its port, engine workers (`duplexgate worker`) and gateways (`duplexgate serve` with [workers]
enabled), all reading one config built from the example config."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from serveproc import ADMIT_FRACTION
from services import free_port, start_redis

from engine.checkpoint import write_random_checkpoint
from engine.remote.registry import Registry, WorkerInfo
from gateway.config import EXAMPLE_CONFIG

WORKER_KEY = "cluster-test-worker-key-0123456789"
START_TIMEOUT_S = 120.0


@dataclass
class Proc:
    name: str
    port: int
    process: subprocess.Popen
    log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]


@dataclass
class Cluster:
    directory: Path
    slots: int = 2
    drain_grace_s: float = 30.0
    redis_port: int = field(default_factory=free_port)
    redis: subprocess.Popen | None = None
    procs: dict[str, Proc] = field(default_factory=dict)

    def __post_init__(self) -> None:
        checkpoint = self.directory / "tiny"
        write_random_checkpoint(checkpoint)  # once, before any worker starts (they would race to write it)
        text = EXAMPLE_CONFIG.read_text()
        replacements = {
            'checkpoint = ""': f'checkpoint = "{checkpoint}"',
            "slots = 0 ": f"slots = {self.slots} ",
            "admit_fraction = 0.8": f"admit_fraction = {ADMIT_FRACTION}",
            "enabled = false": "enabled = true",
            "drain_grace_s = 600.0": f"drain_grace_s = {self.drain_grace_s}",
        }
        for old, new in replacements.items():
            assert old in text, old
            text = text.replace(old, new, 1)
        store = "[store]\n"
        text = text.replace(store, f'{store}url = "{self.redis_url}"\n', 1).replace(
            'url = ""\nreplica_id', "replica_id", 1
        )
        self.config = self.directory / "cluster.toml"
        self.config.write_text(text)
        shutil.copy(EXAMPLE_CONFIG.parent / "customers.example.csv", self.directory)

    @property
    def redis_url(self) -> str:
        return f"redis://127.0.0.1:{self.redis_port}/0"

    # --- redis ---------------------------------------------------------------------------------------

    def start_redis(self) -> None:
        self.redis = start_redis(self.redis_port, self.directory)

    def stop_redis(self) -> None:
        if self.redis is not None and self.redis.poll() is None:
            self.redis.terminate()
            self.redis.wait(timeout=10)

    # --- workers and gateways -------------------------------------------------------------------------

    def start(self, kind: str, name: str) -> Proc:
        """Start `duplexgate worker` (kind "worker") or `duplexgate serve` ("serve") as `name`."""
        port = free_port()
        log = self.directory / f"{name}.log"
        env = {
            **os.environ,
            "DUPLEXGATE_WORKER_KEY": WORKER_KEY,
            "DUPLEXGATE_HOME": str(self.directory / "home"),
        }
        env.pop("DUPLEXGATE_WORKER_URL", None)
        command = [sys.executable, "-m", "gateway.cli", kind, "--config", str(self.config)]
        command += ["--host", "127.0.0.1", "--port", str(port)]
        with log.open("ab") as out:  # a restarted process adds to its log: the story of a test stays whole
            process = subprocess.Popen(
                command, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=self.directory
            )
        self.procs[name] = proc = Proc(name, port, process, log)
        return proc

    def wait_ready(self, *procs: Proc) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        for proc in procs:
            while True:
                assert proc.process.poll() is None, (
                    f"{proc.name} exited {proc.process.returncode}:\n{proc.tail()}"
                )
                assert time.monotonic() < deadline, f"{proc.name} not ready in time:\n{proc.tail()}"
                try:
                    if httpx.get(proc.url + "/readyz", timeout=2).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                time.sleep(0.25)

    def stop(self, proc: Proc, sig: int = signal.SIGINT, timeout_s: float = 30.0) -> int:
        if proc.process.poll() is None:
            proc.process.send_signal(sig)
            try:
                proc.process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                proc.process.kill()
                proc.process.wait(timeout=10)
        return proc.process.returncode

    def close(self) -> None:
        for proc in self.procs.values():
            self.stop(proc)
        self.stop_redis()

    # --- the registry, as the gateways see it ---------------------------------------------------------

    async def workers(self) -> list[WorkerInfo]:
        registry = Registry(self.redis_url)
        try:
            return await registry.workers()
        finally:
            await registry.aclose()

    async def worker_of(self, proc: Proc) -> WorkerInfo | None:
        return next((w for w in await self.workers() if w.url == proc.url), None)

    async def until(self, check, timeout_s: float = 10.0, interval_s: float = 0.05) -> bool:
        """Poll the async predicate `check` until it holds (True) or the time is up (False)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if await check():
                return True
            await asyncio.sleep(interval_s)
        return False

    async def idle(self, workers: int, timeout_s: float = 30.0) -> None:
        """Wait until `workers` workers are registered, ready, with every slot free."""

        async def check() -> bool:
            listed = await self.workers()
            return len(listed) == workers and all(w.takes_calls and w.free == w.capacity for w in listed)

        assert await self.until(check, timeout_s), f"workers not idle: {await self.workers()}"
