"""Real database servers for tests: a redis-server and a PostgreSQL cluster started once per test session on
free loopback ports in temporary directories, stopped at the end. Import the fixtures into a test module.

A missing server binary fails the test with the Debian package to install (redis-server, postgresql); nothing
is skipped.
"""

from __future__ import annotations

import asyncio
import glob
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

START_TIMEOUT_S = 30.0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _binary(name: str, package: str, extra_globs: tuple[str, ...] = ()) -> str:
    found = shutil.which(name)
    for pattern in extra_globs:
        found = found or next(iter(sorted(glob.glob(pattern), reverse=True)), None)
    if not found:
        pytest.fail(f"{name} not found: install the Debian package {package} (apt-get install {package})")
    return found


def _stop(process: subprocess.Popen[bytes], stop_signal: int = signal.SIGTERM) -> None:
    if process.poll() is None:
        process.send_signal(stop_signal)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


def _wait_for(ready: Callable[[], bool], process: subprocess.Popen[bytes], what: str, log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"{what} exited with code {process.returncode}; its log:\n{log.read_text()[-3000:]}")
        if ready():
            return
        time.sleep(0.05)
    _stop(process)
    pytest.fail(
        f"{what} did not accept connections in {START_TIMEOUT_S:.0f} s; log:\n{log.read_text()[-3000:]}"
    )


@dataclass(frozen=True)
class RedisServer:
    port: int

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"


def start_redis(port: int, directory: Path) -> subprocess.Popen[bytes]:
    """A redis-server on 127.0.0.1:`port` without persistence, answering PING when this returns."""
    binary = _binary("redis-server", "redis-server")
    log = directory / "redis.log"
    with log.open("ab") as out:
        process = subprocess.Popen(
            [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=directory,
        )
    _wait_for(lambda: _redis_answers(port), process, f"redis-server on port {port}", log)
    return process


def _redis_answers(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(16).startswith(b"+PONG")
    except OSError:
        return False


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """A throwaway redis-server on 127.0.0.1 (no persistence)."""
    directory = Path(tempfile.mkdtemp(prefix="duplexgate-redis-"))
    port = free_port()
    process = start_redis(port, directory)
    try:
        yield RedisServer(port)
    finally:
        _stop(process)
        shutil.rmtree(directory, ignore_errors=True)


@dataclass(frozen=True)
class PostgresServer:
    port: int
    user: str
    password: str
    database: str = "postgres"

    @property
    def dsn(self) -> str:
        """Without the password, as a config would hold it (the password comes from the environment)."""
        return f"postgresql://{self.user}@127.0.0.1:{self.port}/{self.database}"


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """A throwaway PostgreSQL cluster on 127.0.0.1 with password (SCRAM) authentication. PostgreSQL refuses to
    run as root, so as root the cluster runs as the `postgres` user the Debian package creates."""
    pg_globs = ("/usr/lib/postgresql/*/bin/{}",)
    initdb = _binary("initdb", "postgresql", tuple(g.format("initdb") for g in pg_globs))
    postgres = _binary("postgres", "postgresql", tuple(g.format("postgres") for g in pg_globs))
    run_as: str | None = None
    if os.geteuid() == 0:
        try:
            account = pwd.getpwnam("postgres")
        except KeyError:
            pytest.fail("running as root, and no `postgres` user to run PostgreSQL as: install postgresql")
        run_as = "postgres"
    directory = Path(tempfile.mkdtemp(prefix="duplexgate-pg-"))
    data = directory / "data"
    password = secrets.token_urlsafe(16)
    password_file = directory / "password"
    password_file.write_text(password)
    if run_as is not None:
        for path in (directory, password_file):
            os.chown(path, account.pw_uid, account.pw_gid)
    log = directory / "postgres.log"
    port = free_port()
    user = "duplexgate"
    process: subprocess.Popen[bytes] | None = None
    try:
        init = subprocess.run(
            [
                initdb,
                "-D",
                str(data),
                "-U",
                user,
                "-A",
                "scram-sha-256",
                f"--pwfile={password_file}",
                "--no-sync",
                "-E",
                "UTF8",
                "--locale=C",
            ],
            capture_output=True,
            user=run_as,
            timeout=120,
        )
        if init.returncode != 0:
            pytest.fail(f"initdb failed ({init.returncode}): {init.stderr.decode(errors='replace')[-2000:]}")
        with log.open("wb") as out:
            if run_as is not None:
                os.chown(log, account.pw_uid, account.pw_gid)
            process = subprocess.Popen(
                [
                    postgres,
                    "-D",
                    str(data),
                    "-p",
                    str(port),
                    "-c",
                    "listen_addresses=127.0.0.1",
                    "-c",
                    "unix_socket_directories=",
                    "-c",
                    "fsync=off",
                    "-c",
                    "full_page_writes=off",
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
                user=run_as,
            )
        server = PostgresServer(port, user, password)
        _wait_for(lambda: _accepts_login(server), process, f"postgres on port {port}", log)
        yield server
    finally:
        if process is not None:
            _stop(process, signal.SIGINT)  # "fast" shutdown: SIGTERM would wait for clients to disconnect
        shutil.rmtree(directory, ignore_errors=True)


def _accepts_login(server: PostgresServer) -> bool:
    import asyncpg

    async def login() -> bool:
        try:
            connection = await asyncpg.connect(server.dsn, password=server.password, timeout=1)
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError):
            return False
        await connection.close()
        return True

    return asyncio.run(login())
