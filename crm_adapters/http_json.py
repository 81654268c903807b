"""CRM adapter over any HTTP JSON API: GET a URL built from the lookup key, pick the record out of the
response and map its fields to the names templates use.

Secrets (bearer token, basic-auth password, API-key headers) are read from environment variables named in the
config, never from the file.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote, urlsplit

import httpx

from crm_adapters.base import CrmAdapter, CrmConfigError, CrmLookupError, CrmSettings


@dataclass(frozen=True, kw_only=True)
class HttpJsonSettings(CrmSettings):
    url: str  # with {key} where the (percent-encoded) lookup key goes, e.g. https://crm/api/customers?phone={key}
    headers: dict[str, str] = field(default_factory=dict)  # sent as they are
    headers_env: dict[str, str] = field(
        default_factory=dict
    )  # header name -> environment variable with its value
    auth: str = ""  # "", "bearer" (token_env) or "basic" (username + password_env)
    token_env: str = ""
    username: str = ""
    password_env: str = ""
    record_path: str = ""  # dotted path to the record inside the response, e.g. "data.0"; empty: the response
    fields: dict[str, str] = field(
        default_factory=dict
    )  # template name -> dotted path in the record; empty: all
    max_bytes: int = 256 * 1024  # a larger response is refused rather than read


class HttpJsonAdapter(CrmAdapter):
    """One GET per lookup; 404 or an empty record path means "no record", other non-2xx answers are errors."""

    settings_type = HttpJsonSettings
    settings: HttpJsonSettings

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        settings = self.settings
        parts = urlsplit(settings.url)
        if parts.scheme not in ("http", "https") or not parts.hostname or "{key}" not in settings.url:
            raise CrmConfigError(
                f"{self.where} url = {settings.url!r} should be an http(s) URL containing {{key}}, "
                "e.g. https://crm.example.com/api/customers?phone={key}"
            )
        headers = dict(settings.headers)
        for header, variable in settings.headers_env.items():
            value = self.env.get(variable)
            if not value:
                raise CrmConfigError(
                    f"{self.where} headers_env.{header} = {variable!r}: environment variable "
                    f"{variable} is not set"
                )
            headers[header] = value
        self._auth: httpx.Auth | None = None
        if settings.auth == "bearer":
            if not settings.token_env:
                raise CrmConfigError(
                    f'{self.where} auth = "bearer" needs token_env (the variable with the token)'
                )
            headers["Authorization"] = f"Bearer {self.secret('token_env')}"
        elif settings.auth == "basic":
            if not settings.username or not settings.password_env:
                raise CrmConfigError(f'{self.where} auth = "basic" needs username and password_env')
            self._auth = httpx.BasicAuth(settings.username, self.secret("password_env") or "")
        elif settings.auth:
            raise CrmConfigError(f'{self.where} auth = {settings.auth!r} should be "bearer", "basic" or ""')
        self._headers = headers
        self._client: httpx.AsyncClient | None = None

    def describe(self) -> str:
        parts = urlsplit(self.settings.url)
        return f"http_json {parts.scheme}://{parts.netloc}{parts.path}"

    async def fetch(self, key: str) -> Mapping[str, Any] | None:
        if self._client is None:
            self._client = httpx.AsyncClient(
                headers=self._headers,
                auth=self._auth,
                timeout=self.settings.deadline_s,
                follow_redirects=False,
            )
        url = self.settings.url.replace("{key}", quote(key, safe=""))
        try:
            async with self._client.stream("GET", url, headers={"Accept": "application/json"}) as response:
                if response.status_code == 404:
                    return None
                if not response.is_success:
                    raise CrmLookupError(f"HTTP {response.status_code} from {self.describe()}")
                body = await self._read_capped(response)
        except httpx.HTTPError as exc:
            raise CrmLookupError(f"{self.describe()}: {type(exc).__name__}: {exc}") from None
        try:
            document = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise CrmLookupError(f"{self.describe()} answered something that is not JSON ({exc})") from None
        record = _follow(document, self.settings.record_path)
        if record is None or record == [] or record == {}:
            return None
        if not isinstance(record, dict):
            where = f"at {self.settings.record_path!r}" if self.settings.record_path else "as its response"
            raise CrmLookupError(
                f"{self.describe()} returned a {type(record).__name__} {where}, not a record"
            )
        if not self.settings.fields:
            return record
        mapped = {name: _follow(record, path) for name, path in self.settings.fields.items()}
        return {name: value for name, value in mapped.items() if value is not None}

    async def aclose(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()

    async def _read_capped(self, response: httpx.Response) -> bytes:
        chunks: list[bytes] = []
        size = 0
        async for chunk in response.aiter_bytes():
            size += len(chunk)
            if size > self.settings.max_bytes:
                raise CrmLookupError(
                    f"{self.describe()} sent more than max_bytes = {self.settings.max_bytes}; refused"
                )
            chunks.append(chunk)
        return b"".join(chunks)


def _follow(document: Any, path: str) -> Any:
    """The value at dotted `path` ("data.0.name": keys of objects, indexes of lists); None where it stops."""
    for step in filter(None, path.split(".")):
        if isinstance(document, dict):
            document = document.get(step)
        elif (
            isinstance(document, list)
            and step.lstrip("-").isdigit()
            and -len(document) <= int(step) < len(document)
        ):
            document = document[int(step)]
        else:
            return None
    return document


ADAPTER = HttpJsonAdapter
