"""The HTTP JSON adapter against a real HTTP server on 127.0.0.1: records, field mapping, auth, and CRMs that
are slow, failing, not JSON or too big."""

from __future__ import annotations

import base64
import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest

from crm_adapters.base import CrmConfigError, create_adapter
from gateway.call.incoming import IncomingCall

CUSTOMERS = {
    "+15550101234": {"customer": {"full_name": "Omar Torres", "plan": {"next_pickup": "2026-04-12"}}},
}
SLOW_S = 3.0


class FakeCrm(BaseHTTPRequestHandler):
    """A small CRM API: /customers?phone=..., plus endpoints that misbehave on purpose."""

    seen_headers: list[dict[str, str]] = []

    def log_message(self, *args: Any) -> None:  # keep test output quiet
        pass

    def _json(self, status: int, body: Any) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        try:
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the adapter gave up waiting (the slow endpoint): that is the point

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        FakeCrm.seen_headers.append(dict(self.headers.items()))
        parts = urlsplit(self.path)
        phone = parse_qs(parts.query).get("phone", [""])[0]
        if parts.path == "/customers":
            if phone in CUSTOMERS:
                self._json(200, {"data": [CUSTOMERS[phone]]})
            else:
                self._json(200, {"data": []})
        elif parts.path == "/by-id":
            self._json(404, {"error": "no such customer"})
        elif parts.path == "/slow":
            time.sleep(SLOW_S)
            self._json(200, {"data": [CUSTOMERS["+15550101234"]]})
        elif parts.path == "/fail":
            self._json(500, {"error": "database down"})
        elif parts.path == "/html":
            body = b"<html>maintenance</html>"
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        elif parts.path == "/list":
            self._json(200, ["not", "a", "record"])
        elif parts.path == "/big":
            self._json(200, {"name": "x" * 100_000})
        else:
            self._json(404, {})


@pytest.fixture(scope="module")
def crm_url() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeCrm)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()
    thread.join(timeout=5)


def adapter(url: str, env: dict[str, str] | None = None, **settings: Any):
    return create_adapter("crm", {"type": "http_json", "url": url, **settings}, "test.toml: [crm.crm]", env)


CALL = IncomingCall("CA1", caller="+15550101234")


async def test_record_is_found_under_record_path_and_fields_are_mapped(crm_url: str) -> None:
    crm = adapter(
        f"{crm_url}/customers?phone={{key}}",
        record_path="data.0.customer",
        fields={"name": "full_name", "next_pickup": "plan.next_pickup", "missing": "plan.nowhere"},
    )
    result = await crm.lookup(CALL)
    await crm.aclose()
    assert result.status == "found"
    assert dict(result.data) == {"name": "Omar Torres", "next_pickup": "2026-04-12"}


async def test_empty_result_list_is_not_found(crm_url: str) -> None:
    crm = adapter(f"{crm_url}/customers?phone={{key}}", record_path="data.0")
    result = await crm.lookup(IncomingCall("CA2", caller="+15559999999"))
    await crm.aclose()
    assert result.status == "not_found"


async def test_http_404_is_not_found(crm_url: str) -> None:
    crm = adapter(f"{crm_url}/by-id?phone={{key}}")
    result = await crm.lookup(CALL)
    await crm.aclose()
    assert result.status == "not_found"


async def test_server_error_is_an_error_naming_the_status(crm_url: str) -> None:
    crm = adapter(f"{crm_url}/fail?phone={{key}}")
    result = await crm.lookup(CALL)
    await crm.aclose()
    assert result.status == "error"
    assert "HTTP 500" in result.reason


async def test_slow_crm_is_abandoned_at_the_deadline(crm_url: str) -> None:
    crm = adapter(f"{crm_url}/slow?phone={{key}}", deadline_s=0.3)
    started = time.monotonic()
    result = await crm.lookup(CALL)
    waited = time.monotonic() - started
    await crm.aclose()
    assert result.status == "timeout"
    assert result.data == {}
    assert waited < 0.3 + 0.5 < SLOW_S


async def test_a_response_that_is_not_json_is_an_error(crm_url: str) -> None:
    crm = adapter(f"{crm_url}/html?phone={{key}}")
    result = await crm.lookup(CALL)
    await crm.aclose()
    assert result.status == "error"
    assert "not JSON" in result.reason


async def test_a_response_that_is_not_a_record_is_an_error(crm_url: str) -> None:
    crm = adapter(f"{crm_url}/list?phone={{key}}")
    result = await crm.lookup(CALL)
    await crm.aclose()
    assert result.status == "error"
    assert "list" in result.reason


async def test_a_response_over_max_bytes_is_refused(crm_url: str) -> None:
    crm = adapter(f"{crm_url}/big?phone={{key}}", max_bytes=10_000)
    result = await crm.lookup(CALL)
    await crm.aclose()
    assert result.status == "error"
    assert "max_bytes" in result.reason


async def test_key_is_percent_encoded_into_the_url(crm_url: str) -> None:
    # Unencoded, the '+' of an E.164 number would arrive as a space and match nobody.
    crm = adapter(f"{crm_url}/customers?phone={{key}}", record_path="data.0")
    result = await crm.lookup(CALL)
    await crm.aclose()
    assert result.status == "found"


async def test_bearer_token_and_secret_headers_come_from_the_environment(crm_url: str) -> None:
    env = {"CRM_TOKEN": "tok-123", "CRM_KEY": "key-456"}
    crm = adapter(
        f"{crm_url}/customers?phone={{key}}",
        env,
        auth="bearer",
        token_env="CRM_TOKEN",
        headers_env={"X-Api-Key": "CRM_KEY"},
        headers={"X-Tenant": "citysan"},
    )
    FakeCrm.seen_headers.clear()
    await crm.lookup(CALL)
    await crm.aclose()
    headers = FakeCrm.seen_headers[-1]
    assert headers["Authorization"] == "Bearer tok-123"
    assert headers["X-Api-Key"] == "key-456"
    assert headers["X-Tenant"] == "citysan"


async def test_basic_auth_password_comes_from_the_environment(crm_url: str) -> None:
    crm = adapter(
        f"{crm_url}/customers?phone={{key}}",
        {"CRM_PW": "s3cret"},
        auth="basic",
        username="gw",
        password_env="CRM_PW",
    )
    FakeCrm.seen_headers.clear()
    await crm.lookup(CALL)
    await crm.aclose()
    assert FakeCrm.seen_headers[-1]["Authorization"] == "Basic " + base64.b64encode(b"gw:s3cret").decode()


def test_unset_secret_variable_is_a_start_up_error_naming_it() -> None:
    with pytest.raises(CrmConfigError, match=r"\[crm.crm\] token_env = 'CRM_TOKEN'.*CRM_TOKEN is not set"):
        adapter("https://crm.example.com/c?phone={key}", {}, auth="bearer", token_env="CRM_TOKEN")


def test_url_without_key_placeholder_is_a_config_error() -> None:
    with pytest.raises(CrmConfigError, match=r"test.toml: \[crm.crm\] url = .*\{key\}"):
        adapter("https://crm.example.com/customers")
