"""The Redis hash adapter against a real redis-server started by the tests."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis.asyncio as redis
from services import RedisServer, free_port, redis_server  # noqa: F401 (a fixture)

from crm_adapters.base import CrmConfigError, create_adapter
from gateway.call.incoming import IncomingCall


@pytest.fixture
async def prefix(redis_server: RedisServer) -> AsyncIterator[str]:  # noqa: F811
    """A fresh key prefix holding one customer hash and one key of another type."""
    prefix = f"test{uuid.uuid4().hex[:8]}"
    client = redis.Redis.from_url(redis_server.url)
    await client.hset(f"{prefix}:+15550101234", mapping={"name": "Omar Torres", "next_pickup": "2026-04-12"})
    await client.set(f"{prefix}:+15550105555", "a plain string, not a hash")
    yield prefix
    await client.delete(f"{prefix}:+15550101234", f"{prefix}:+15550105555")
    await client.aclose()


def hash_adapter(url: str, prefix: str, **settings: Any):
    table = {"type": "redis_hash", "url": url, "key_pattern": f"{prefix}:{{key}}", **settings}
    return create_adapter("cache", table, "test.toml: [crm.cache]")


async def test_hash_is_the_record(redis_server: RedisServer, prefix: str) -> None:  # noqa: F811
    crm = hash_adapter(redis_server.url, prefix)
    result = await crm.lookup(IncomingCall("CA1", caller="+15550101234"))
    await crm.aclose()
    assert result.status == "found"
    assert dict(result.data) == {"name": "Omar Torres", "next_pickup": "2026-04-12"}


async def test_listed_fields_only_are_read(redis_server: RedisServer, prefix: str) -> None:  # noqa: F811
    crm = hash_adapter(redis_server.url, prefix, fields=["name", "balance"])
    result = await crm.lookup(IncomingCall("CA1", caller="+15550101234"))
    await crm.aclose()
    assert dict(result.data) == {"name": "Omar Torres"}


async def test_missing_hash_is_not_found(redis_server: RedisServer, prefix: str) -> None:  # noqa: F811
    crm = hash_adapter(redis_server.url, prefix)
    result = await crm.lookup(IncomingCall("CA1", caller="+15559999999"))
    await crm.aclose()
    assert result.status == "not_found"


async def test_key_of_another_type_is_an_error(redis_server: RedisServer, prefix: str) -> None:  # noqa: F811
    crm = hash_adapter(redis_server.url, prefix)
    result = await crm.lookup(IncomingCall("CA1", caller="+15550105555"))
    await crm.aclose()
    assert result.status == "error"
    assert "WRONGTYPE" in result.reason


async def test_unreachable_server_is_an_error_not_an_exception() -> None:
    crm = hash_adapter(f"redis://127.0.0.1:{free_port()}/0", "nobody", deadline_s=2.0)
    started = time.monotonic()
    result = await crm.lookup(IncomingCall("CA1", caller="+15550101234"))
    await crm.aclose()
    assert result.status == "error"  # refused at once on loopback, long before the deadline
    assert result.data == {}
    assert time.monotonic() - started < 2.5


def test_key_pattern_without_placeholder_is_a_config_error() -> None:
    with pytest.raises(
        CrmConfigError, match=r"test.toml: \[crm.cache\] key_pattern = 'customer' must contain"
    ):
        create_adapter("cache", {"type": "redis_hash", "key_pattern": "customer"}, "test.toml: [crm.cache]")
