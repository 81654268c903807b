"""The edge caps what it reads before it knows who is talking: request bodies (413 before they are read,
memory not grown by them), messages before a stream's `start`, and the control API's fields; attacked
over real sockets on loopback."""

from __future__ import annotations

import asyncio
import json
import resource

import httpx
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from engine.echo import EchoEngine

BODY_BYTES = 64 << 20  # 64 MiB


def rss_bytes() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


async def test_a_64_mib_voice_webhook_is_refused_with_413_before_it_is_read(echo_gateway) -> None:
    chunk = b"x" * (1 << 20)

    async def body():  # streamed, so the client holds 1 MiB at a time
        for _ in range(BODY_BYTES // len(chunk)):
            yield chunk

    before, peak_before = rss_bytes(), peak_rss_bytes()
    headers = {"content-length": str(BODY_BYTES), "content-type": "application/x-www-form-urlencoded"}
    async with httpx.AsyncClient(timeout=30) as client:
        try:
            response = await client.post(echo_gateway.webhook, content=body(), headers=headers)
            status = response.status_code
        except httpx.TransportError:  # the server answered and closed while the client still sent
            status = 413
    assert status == 413
    assert rss_bytes() - before < 5 << 20 and peak_rss_bytes() - peak_before < 5 << 20
    assert echo_gateway.engine.opened == 0


async def test_a_chunked_body_is_cut_off_at_the_cap(echo_gateway) -> None:
    async def body():
        for _ in range(64):
            yield b"CallSid=CA" + b"a" * 4096 + b"&"

    async with httpx.AsyncClient(timeout=10) as client:
        try:
            status = (await client.post(echo_gateway.webhook, content=body())).status_code
        except httpx.TransportError:
            status = 413
    assert status == 413 and echo_gateway.engine.opened == 0


async def test_a_body_under_the_cap_is_served(echo_gateway) -> None:
    form = {"CallSid": "CA" + "b" * 32, "From": "+15550001111", "To": "+15550002222", "Pad": "x" * 30_000}
    async with httpx.AsyncClient() as client:
        response = await client.post(echo_gateway.webhook, data=form)
    assert response.status_code == 200 and "<Stream" in response.text


async def test_a_huge_message_before_start_closes_the_stream_with_1009(echo_gateway) -> None:
    async with connect(echo_gateway.ws_url, max_size=None) as ws:
        await ws.send(json.dumps({"event": "connected", "padding": "x" * (200 << 10)}))
        with pytest.raises(ConnectionClosed) as closed:
            await asyncio.wait_for(ws.recv(), 5)
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1009


async def test_an_escalation_reason_longer_than_the_cap_is_refused(start_gateway, monkeypatch) -> None:
    monkeypatch.setenv("DUPLEXGATE_API_KEY", "k" * 32)
    live = start_gateway(EchoEngine())
    async with httpx.AsyncClient(headers={"Authorization": "Bearer " + "k" * 32}) as client:
        response = await client.post(
            f"{live.base_url}/v1/calls/CA{'1' * 32}/escalate", json={"reason": "r" * 501}
        )
    assert response.status_code == 422


async def test_the_carrier_listener_publishes_no_api_documentation(echo_gateway) -> None:
    async with httpx.AsyncClient() as client:
        for path in ("/docs", "/redoc", "/openapi.json"):
            assert (await client.get(echo_gateway.base_url + path)).status_code == 404, path
