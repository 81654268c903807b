"""The SQL adapter against a real SQLite file and a real PostgreSQL server started by the tests."""

from __future__ import annotations

import sqlite3
import time
import uuid
from datetime import date
from decimal import Decimal
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from services import PostgresServer, postgres_server  # noqa: F401 (a fixture)

from crm_adapters.base import CrmConfigError, create_adapter
from gateway.call.incoming import IncomingCall

CALL = IncomingCall("CA1", caller="+15550101234")


def sql_adapter(dsn: str, query: str, env: dict[str, str] | None = None, **settings: Any):
    table = {"type": "sql", "dsn": dsn, "query": query, **settings}
    return create_adapter("db", table, "test.toml: [crm.db]", env)


@pytest.fixture
def crm_db(tmp_path: Path) -> Path:
    path = tmp_path / "crm.db"
    with sqlite3.connect(path) as db:
        db.execute(
            "CREATE TABLE customers (phone TEXT PRIMARY KEY, name TEXT, next_pickup TEXT, balance REAL)"
        )
        db.execute("INSERT INTO customers VALUES ('+15550101234', 'Omar Torres', '2026-04-12', NULL)")
    db.close()
    return path


async def test_sqlite_row_is_the_record_by_column_name(crm_db: Path) -> None:
    crm = sql_adapter(
        f"sqlite:///{crm_db}", "SELECT name, next_pickup, balance FROM customers WHERE phone = :key"
    )
    result = await crm.lookup(CALL)
    assert result.status == "found"
    assert dict(result.data) == {"name": "Omar Torres", "next_pickup": "2026-04-12", "balance": None}


async def test_sqlite_no_row_is_not_found(crm_db: Path) -> None:
    crm = sql_adapter(f"sqlite:///{crm_db}", "SELECT name FROM customers WHERE phone = :key")
    result = await crm.lookup(IncomingCall("CA2", caller="+15559999999"))
    assert result.status == "not_found"


async def test_sqlite_is_opened_read_only(crm_db: Path) -> None:
    crm = sql_adapter(f"sqlite:///{crm_db}", "DELETE FROM customers WHERE phone = :key RETURNING name")
    result = await crm.lookup(CALL)
    assert result.status == "error"
    assert "readonly" in result.reason.replace(" ", "").lower()
    with sqlite3.connect(crm_db) as db:
        assert db.execute("SELECT count(*) FROM customers").fetchone() == (1,)


async def test_sqlite_bad_query_is_an_error_naming_the_database(crm_db: Path) -> None:
    crm = sql_adapter(f"sqlite:///{crm_db}", "SELECT name FROM clients WHERE phone = :key")
    result = await crm.lookup(CALL)
    assert result.status == "error"
    assert str(crm_db) in result.reason and "no such table: clients" in result.reason


async def test_sqlite_slow_query_is_interrupted_at_the_deadline(crm_db: Path) -> None:
    endless = (
        "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n) "
        "SELECT name FROM customers WHERE phone = :key AND (SELECT max(i) FROM n) > 0"
    )
    crm = sql_adapter(f"sqlite:///{crm_db}", endless, deadline_s=0.3)
    started = time.monotonic()
    result = await crm.lookup(CALL)
    assert result.status == "timeout"
    assert time.monotonic() - started < 1.0


def test_sqlite_missing_database_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(CrmConfigError, match=r"test.toml: \[crm.db\] dsn = .*nowhere.db does not exist"):
        sql_adapter(f"sqlite:///{tmp_path / 'nowhere.db'}", "SELECT 1 WHERE :key IS NOT NULL")


def test_query_without_key_parameter_is_a_config_error(crm_db: Path) -> None:
    with pytest.raises(CrmConfigError, match=r"\[crm.db\] query must name the lookup key as :key"):
        sql_adapter(f"sqlite:///{crm_db}", "SELECT name FROM customers WHERE phone = ?")


def test_unknown_database_scheme_is_a_config_error() -> None:
    with pytest.raises(
        CrmConfigError, match=r"dsn = 'mysql://x/y' should start with sqlite:/// or postgresql://"
    ):
        sql_adapter("mysql://x/y", "SELECT 1 WHERE :key = ''")


@pytest.fixture
async def pg_table(postgres_server: PostgresServer) -> str:  # noqa: F811
    table = f"customers_{uuid.uuid4().hex[:8]}"
    connection = await asyncpg.connect(postgres_server.dsn, password=postgres_server.password)
    await connection.execute(
        f"CREATE TABLE {table} (phone text PRIMARY KEY, name text, next_pickup date, balance numeric(10,2))"
    )
    await connection.execute(
        f"INSERT INTO {table} VALUES ('+15550101234', 'Omar Torres', '2026-04-12', 42.50), "
        "('+15550100000', 'Slow Sam', NULL, NULL)"
    )
    await connection.close()
    return table


def pg_adapter(server: PostgresServer, query: str, **settings: Any):
    return sql_adapter(
        server.dsn, query, {"PG_PASSWORD": server.password}, password_env="PG_PASSWORD", **settings
    )


async def test_postgres_row_keeps_database_types(postgres_server: PostgresServer, pg_table: str) -> None:  # noqa: F811
    crm = pg_adapter(postgres_server, f"SELECT name, next_pickup, balance FROM {pg_table} WHERE phone = :key")
    result = await crm.lookup(CALL)
    await crm.aclose()
    assert result.status == "found"
    assert dict(result.data) == {
        "name": "Omar Torres",
        "next_pickup": date(2026, 4, 12),
        "balance": Decimal("42.50"),
    }


async def test_postgres_no_row_is_not_found(postgres_server: PostgresServer, pg_table: str) -> None:  # noqa: F811
    crm = pg_adapter(postgres_server, f"SELECT name FROM {pg_table} WHERE phone = :key")
    result = await crm.lookup(IncomingCall("CA2", caller="+15559999999"))
    await crm.aclose()
    assert result.status == "not_found"


async def test_postgres_cast_after_key_is_kept(postgres_server: PostgresServer, pg_table: str) -> None:  # noqa: F811
    crm = pg_adapter(postgres_server, f"SELECT name FROM {pg_table} WHERE phone = :key::text")
    result = await crm.lookup(CALL)
    await crm.aclose()
    assert result.status == "found"


async def test_postgres_slow_query_times_out_and_the_pool_serves_the_next_call(
    postgres_server: PostgresServer,  # noqa: F811
    pg_table: str,
) -> None:
    # The customer on +15550100000 is one whose lookup hangs.
    slow_then_fast = (
        f"SELECT name, pg_sleep(CASE WHEN phone = '+15550100000' THEN 3 ELSE 0 END) AS waited "
        f"FROM {pg_table} WHERE phone = :key"
    )
    crm = pg_adapter(postgres_server, slow_then_fast, deadline_s=0.5)
    started = time.monotonic()
    slow = await crm.lookup(IncomingCall("CA2", caller="+15550100000"))
    assert slow.status == "timeout"
    assert time.monotonic() - started < 1.5
    fast = await crm.lookup(CALL)
    await crm.aclose()
    assert fast.status == "found"


async def test_postgres_wrong_password_is_an_error_not_an_exception(
    postgres_server: PostgresServer,  # noqa: F811
    pg_table: str,
) -> None:
    crm = sql_adapter(
        postgres_server.dsn,
        f"SELECT name FROM {pg_table} WHERE phone = :key",
        {"PG_PASSWORD": "wrong"},
        password_env="PG_PASSWORD",
    )
    result = await crm.lookup(CALL)
    await crm.aclose()
    assert result.status == "error"
    assert "password authentication failed" in result.reason


def test_postgres_unset_password_variable_is_a_config_error(postgres_server: PostgresServer) -> None:  # noqa: F811
    with pytest.raises(CrmConfigError, match=r"password_env = 'PG_PASSWORD'.*PG_PASSWORD is not set"):
        sql_adapter(postgres_server.dsn, "SELECT 1 WHERE :key = ''", {}, password_env="PG_PASSWORD")
