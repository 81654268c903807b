"""CRM adapter over SQL: one query returning the caller's row, from SQLite (read-only, stdlib sqlite3 in a
worker thread) or PostgreSQL (asyncpg connection pool).

The query names the lookup key `:key` in both databases, e.g.
`SELECT name, next_pickup FROM customers WHERE phone = :key`; the first row found is the record.
"""

from __future__ import annotations

import asyncio
import re
import sqlite3
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from crm_adapters.base import CrmAdapter, CrmConfigError, CrmLookupError, CrmSettings

CONNECT_TIMEOUT_S = 10.0  # a connection attempt outlives many lookups' deadlines, but not forever
_KEY_PARAMETER = re.compile(r"(?<!:):key\b")  # `:key`, but not the `::key` of a PostgreSQL cast


@dataclass(frozen=True, kw_only=True)
class SqlSettings(CrmSettings):
    # sqlite:///relative/path.db (from the config file's folder), sqlite:////absolute/path.db,
    # or postgresql://user@host:5432/database
    dsn: str
    query: str  # SQL naming the lookup key as :key
    password_env: str = ""  # PostgreSQL: environment variable holding the password (kept out of the dsn)
    pool_size: int = 4  # PostgreSQL: most connections held open


class SqlAdapter(CrmAdapter):
    """The first row `query` returns for the key, as a record of column name -> value."""

    settings_type = SqlSettings
    settings: SqlSettings

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if not _KEY_PARAMETER.search(self.settings.query):
            raise CrmConfigError(
                f"{self.where} query must name the lookup key as :key, e.g. "
                "SELECT name FROM customers WHERE phone = :key"
            )
        scheme = urlsplit(self.settings.dsn).scheme
        if scheme == "sqlite":
            self.sqlite_path: Path | None = self.resolve_path(self.settings.dsn.removeprefix("sqlite:///"))
            if not self.sqlite_path.is_file():
                raise CrmConfigError(
                    f"{self.where} dsn = {self.settings.dsn!r}: {self.sqlite_path} does not exist"
                )
        elif scheme in ("postgresql", "postgres"):
            self.sqlite_path = None
            self._password = self.secret("password_env")
            if self.settings.pool_size < 1:
                raise CrmConfigError(f"{self.where} pool_size = {self.settings.pool_size} must be at least 1")
        else:
            raise CrmConfigError(
                f"{self.where} dsn = {self.settings.dsn!r} should start with sqlite:/// or postgresql://"
            )
        self._pool_task: asyncio.Task[Any] | None = None

    def describe(self) -> str:
        if self.sqlite_path is not None:
            return f"sqlite {self.sqlite_path}"
        parts = urlsplit(self.settings.dsn)
        return f"postgresql {parts.hostname}:{parts.port or 5432}{parts.path}"  # no user or password

    async def fetch(self, key: str) -> Mapping[str, Any] | None:
        if self.sqlite_path is not None:
            return await self._fetch_sqlite(self.sqlite_path, key)
        return await self._fetch_postgres(key)

    async def aclose(self) -> None:
        task, self._pool_task = self._pool_task, None
        if task is None:
            return
        if not task.done():
            task.cancel()
        try:
            pool = await task
        except BaseException:  # it never connected: nothing to close
            return
        await pool.close()

    async def _fetch_sqlite(self, path: Path, key: str) -> Mapping[str, Any] | None:
        opened: list[sqlite3.Connection] = []

        def run() -> Mapping[str, Any] | None:
            connection = sqlite3.connect(
                f"{path.resolve().as_uri()}?mode=ro", uri=True, check_same_thread=False
            )
            opened.append(connection)
            try:
                connection.row_factory = sqlite3.Row
                row = connection.execute(self.settings.query, {"key": key}).fetchone()
                return None if row is None else {name: row[name] for name in row.keys()}
            finally:
                connection.close()

        try:
            return await asyncio.to_thread(run)
        except asyncio.CancelledError:
            # Past the deadline: stop the query rather than let it hold the worker thread.
            for connection in opened:
                try:
                    connection.interrupt()
                except sqlite3.ProgrammingError:
                    pass  # it finished and closed meanwhile
            raise
        except sqlite3.Error as exc:
            raise CrmLookupError(f"SQLite {path}: {exc}") from None

    async def _fetch_postgres(self, key: str) -> Mapping[str, Any] | None:
        import asyncpg

        pool = await self._pool()
        try:
            row = await pool.fetchrow(_KEY_PARAMETER.sub("$1", self.settings.query), key)
        except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError) as exc:
            raise CrmLookupError(f"PostgreSQL {self.describe()}: {type(exc).__name__}: {exc}") from None
        return None if row is None else dict(row.items())

    async def _pool(self) -> Any:
        """The connection pool, connecting once in the background: a lookup that gives up at its deadline
        does not abort the connection the next call will use."""
        import asyncpg

        task = self._pool_task
        if task is None or (task.done() and (task.cancelled() or task.exception() is not None)):
            self._pool_task = asyncio.ensure_future(
                asyncpg.create_pool(
                    self.settings.dsn,
                    password=self._password,
                    min_size=1,
                    max_size=self.settings.pool_size,
                    timeout=CONNECT_TIMEOUT_S,
                )
            )
        try:
            return await asyncio.shield(self._pool_task)
        except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError) as exc:
            raise CrmLookupError(f"PostgreSQL {self.describe()}: cannot connect: {exc}") from None


ADAPTER = SqlAdapter
