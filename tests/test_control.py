"""The control API over real HTTP on real gateways: bearer-key auth, live calls placed by the simulated
carrier on the real tiny engine (list, get, hang up, escalate), past call records page by page, and a
hang-up sent to one replica that ends a call held by another through a real redis-server."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest
import torch
from services import RedisServer, redis_server  # noqa: F401 (a fixture)

from engine.echo import EchoEngine
from gateway.simulator.call import SimCallSummary, simulate_call

API_KEY = "control-test-key-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {API_KEY}"}


@pytest.fixture(autouse=True)
def _control_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DUPLEXGATE_API_KEY", API_KEY)
    torch.set_num_threads(1)


async def poll(fetch: Callable[[], Any], done: Callable[[Any], bool], timeout_s: float = 5.0) -> Any:
    """Call async `fetch` until `done(result)` or `timeout_s`; returns the last result."""
    deadline = time.monotonic() + timeout_s
    while True:
        result = await fetch()
        if done(result) or time.monotonic() > deadline:
            return result
        await asyncio.sleep(0.05)


async def place_live_call(live: Any, audio: Any, call_sid: str) -> asyncio.Task[SimCallSummary]:
    """Start a simulated call through `live`'s voice webhook; return once the control API lists it."""
    call = asyncio.create_task(simulate_call(None, audio, webhook=live.webhook, call_sid=call_sid))
    async with httpx.AsyncClient(headers=AUTH) as client:
        listed = await poll(
            lambda: client.get(live.base_url + "/v1/calls"),
            lambda r: call_sid in [c["call_id"] for c in r.json()["calls"]] or call.done(),
        )
    assert call_sid in [c["call_id"] for c in listed.json()["calls"]], listed.text
    return call


async def test_control_api_answers_503_when_its_key_variable_is_unset(
    start_gateway, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("DUPLEXGATE_API_KEY")
    live = start_gateway(EchoEngine())
    async with httpx.AsyncClient() as client:
        response = await client.get(live.base_url + "/v1/calls", headers=AUTH)
    assert response.status_code == 503
    assert "DUPLEXGATE_API_KEY" in response.json()["detail"]


async def test_control_api_refuses_a_request_without_a_key(start_gateway) -> None:
    live = start_gateway(EchoEngine())
    async with httpx.AsyncClient() as client:
        response = await client.get(live.base_url + "/v1/records")
    assert response.status_code == 401
    assert response.headers["www-authenticate"] == "Bearer"


async def test_control_api_refuses_a_wrong_key(start_gateway) -> None:
    live = start_gateway(EchoEngine())
    async with httpx.AsyncClient() as client:
        response = await client.get(live.base_url + "/v1/calls", headers={"Authorization": "Bearer nope"})
    assert response.status_code == 401


async def test_a_live_call_is_listed_and_fetched_while_it_lasts(start_gateway, engine, tone_wav) -> None:
    live = start_gateway(engine)
    call_sid = "CA" + "1" * 32
    call = await place_live_call(live, tone_wav(440, 1.5), call_sid)
    async with httpx.AsyncClient(headers=AUTH) as client:
        response = await client.get(f"{live.base_url}/v1/calls/{call_sid}")
        assert response.status_code == 200
        got = response.json()
        assert (got["replica"], got["agent"]) == (live.app.state.control.replica_id, "receptionist")
        assert (got["caller"], got["called"]) == ("+15550001111", "+15550002222")
        await call
        gone = await poll(
            lambda: client.get(f"{live.base_url}/v1/calls/{call_sid}"), lambda r: r.status_code == 404
        )
    assert gone.status_code == 404


async def test_hangup_over_http_ends_the_live_call(start_gateway, engine, tone_wav) -> None:
    live = start_gateway(engine)
    call_sid = "CA" + "2" * 32
    call = await place_live_call(live, tone_wav(440, 4.0), call_sid)
    async with httpx.AsyncClient(headers=AUTH) as client:
        response = await client.post(f"{live.base_url}/v1/calls/{call_sid}/hangup")
        assert response.status_code == 200
        summary = await asyncio.wait_for(call, 5.0)
        record = await poll(
            lambda: client.get(f"{live.base_url}/v1/records/{call_sid}"), lambda r: r.is_success
        )
    # The gateway closed the stream ("" when that close met the caller mid-send) long before 4 s (200 chunks).
    assert summary.closed_by == "gateway" and summary.media_sent < 150
    assert record.json()["end_reason"] == "api_hangup"


async def test_hangup_of_a_call_no_replica_holds_is_404(start_gateway) -> None:
    live = start_gateway(EchoEngine())
    async with httpx.AsyncClient(headers=AUTH) as client:
        response = await client.post(f"{live.base_url}/v1/calls/CA{'9' * 32}/hangup")
    assert response.status_code == 404
    assert "CA" + "9" * 32 in response.json()["detail"]


REASON = "caller asked for a person: now; actions transfer,webhook"


async def test_escalation_over_http_is_in_the_call_record(start_gateway, engine, tone_wav) -> None:
    live = start_gateway(engine)
    call_sid = "CA" + "3" * 32
    call = await place_live_call(live, tone_wav(440, 1.5), call_sid)
    async with httpx.AsyncClient(headers=AUTH) as client:
        response = await client.post(f"{live.base_url}/v1/calls/{call_sid}/escalate", json={"reason": REASON})
        assert response.status_code == 200
        await asyncio.wait_for(call, 5.0)
        record = await poll(
            lambda: client.get(f"{live.base_url}/v1/records/{call_sid}"), lambda r: r.is_success
        )
    escalations = record.json()["escalations"]
    # The reason is kept as given, even when it looks like the text a record line was once parsed from.
    assert [(e["trigger"], e["reason"], e["actions"]) for e in escalations] == [("api", REASON, ["hangup"])]


async def test_records_are_listed_newest_first_a_page_at_a_time(start_gateway, engine, tone_wav) -> None:
    live = start_gateway(engine)
    first = await simulate_call(None, tone_wav(440, 0.4), webhook=live.webhook, tail_s=0.1)
    second = await simulate_call(None, tone_wav(440, 0.4), webhook=live.webhook, tail_s=0.1)
    url = live.base_url + "/v1/records"
    async with httpx.AsyncClient(headers=AUTH) as client:
        page = await poll(lambda: client.get(url, params={"limit": 1}), lambda r: r.json()["records"])
        page = await poll(
            lambda: client.get(url, params={"limit": 1}),
            lambda r: r.json()["records"][0]["call_id"] == second.call_sid,
        )
        older = await client.get(url, params={"limit": 1, "before": page.json()["next_before"]})
        everything = await client.get(url, params={"limit": 10})
    assert [r["call_id"] for r in page.json()["records"]] == [second.call_sid]
    assert [r["call_id"] for r in older.json()["records"]] == [first.call_sid]
    assert [r["call_id"] for r in everything.json()["records"]] == [second.call_sid, first.call_sid]
    assert everything.json()["next_before"] is None


async def test_hangup_sent_to_one_replica_ends_a_call_held_by_another(
    start_gateway,
    engine,
    tone_wav,
    redis_server: RedisServer,  # noqa: F811
) -> None:
    url = f"redis://127.0.0.1:{redis_server.port}/3"
    replica_a = start_gateway(EchoEngine(), tables={"store": {"url": url, "replica_id": "replica-a"}})
    replica_b = start_gateway(engine, tables={"store": {"url": url, "replica_id": "replica-b"}})
    call_sid = "CA" + "4" * 32
    call = await place_live_call(replica_b, tone_wav(440, 4.0), call_sid)
    async with httpx.AsyncClient(headers=AUTH) as client:
        seen_by_a = await client.get(f"{replica_a.base_url}/v1/calls/{call_sid}")
        assert seen_by_a.json()["replica"] == "replica-b"
        response = await client.post(f"{replica_a.base_url}/v1/calls/{call_sid}/hangup")
        assert response.status_code == 200 and response.json()["replica"] == "replica-b"
        summary = await asyncio.wait_for(call, 5.0)
        record = await poll(
            lambda: client.get(f"{replica_a.base_url}/v1/records/{call_sid}"), lambda r: r.is_success
        )
    # The gateway closed the stream ("" when that close met the caller mid-send) long before 4 s (200 chunks).
    assert summary.closed_by == "gateway" and summary.media_sent < 150
    assert record.json()["end_reason"] == "api_hangup"
    assert replica_a.state.calls == {}  # A never held it
