"""CRM adapter over Redis hashes: the caller's record is the hash at a key built from the lookup key,
e.g. `customer:+15551230000`, read with one HGETALL (or HMGET of the listed fields)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import redis.asyncio as redis
from redis.exceptions import RedisError

from crm_adapters.base import CrmAdapter, CrmConfigError, CrmLookupError, CrmSettings


@dataclass(frozen=True, kw_only=True)
class RedisHashSettings(CrmSettings):
    url: str = "redis://127.0.0.1:6379/0"  # redis:// or rediss://; the password belongs in password_env
    key_pattern: str = "customer:{key}"  # the hash's name, {key} being the lookup key
    fields: tuple[str, ...] = ()  # read only these fields; empty: the whole hash
    password_env: str = ""


class RedisHashAdapter(CrmAdapter):
    """A missing or empty hash is "no record"; values are strings, as Redis stores them."""

    settings_type = RedisHashSettings
    settings: RedisHashSettings

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if urlsplit(self.settings.url).scheme not in ("redis", "rediss", "unix"):
            raise CrmConfigError(
                f"{self.where} url = {self.settings.url!r} should start with redis:// or rediss://"
            )
        if "{key}" not in self.settings.key_pattern:
            raise CrmConfigError(
                f"{self.where} key_pattern = {self.settings.key_pattern!r} must contain {{key}}, "
                "e.g. customer:{key}"
            )
        self._password = self.secret("password_env")
        self._client: redis.Redis | None = None

    def describe(self) -> str:
        parts = urlsplit(self.settings.url)
        return f"redis_hash {parts.hostname}:{parts.port or 6379}{parts.path} {self.settings.key_pattern}"

    async def fetch(self, key: str) -> Mapping[str, Any] | None:
        if self._client is None:
            self._client = redis.Redis.from_url(
                self.settings.url, password=self._password, decode_responses=True, encoding_errors="replace"
            )
        name = self.settings.key_pattern.replace("{key}", key)
        try:
            if self.settings.fields:
                values = await self._client.hmget(name, list(self.settings.fields))
                record = {f: v for f, v in zip(self.settings.fields, values, strict=True) if v is not None}
            else:
                record = await self._client.hgetall(name)
        except RedisError as exc:
            raise CrmLookupError(f"{self.describe()}: {type(exc).__name__}: {exc}") from None
        return record or None

    async def aclose(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()


ADAPTER = RedisHashAdapter
