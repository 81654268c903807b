"""Failed-authentication throttling over real sockets: an address that keeps failing signature or API-key
checks gets 429 (credentials unchecked, good ones included) until its window is out, while another
address is served as before; and the throttle's own bookkeeping (windows, bounded table)."""

from __future__ import annotations

import httpx
import pytest
from test_app_twilio import TOKEN, voice_form
from test_control import API_KEY
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from engine.echo import EchoEngine
from gateway.carriers.twilio import compute_signature
from gateway.ops.auth_throttle import AuthThrottle

ALLOWED = 3
OTHER = "127.0.0.2"  # a second loopback address stands in for another peer


def client(local_address: str = "127.0.0.1") -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.AsyncHTTPTransport(local_address=local_address))


async def test_bad_webhook_signatures_lock_out_that_address_only(start_gateway) -> None:
    live = start_gateway(EchoEngine(), auth_token=TOKEN, auth_failures_per_minute=ALLOWED)
    form = voice_form()
    good = compute_signature(TOKEN, live.webhook, form.items())
    bad = compute_signature("guess", live.webhook, form.items())
    async with client() as attacker, client(OTHER) as carrier:
        codes = [
            (await attacker.post(live.webhook, data=form, headers={"X-Twilio-Signature": bad})).status_code
            for _ in range(ALLOWED + 2)
        ]
        assert codes == [403] * ALLOWED + [429, 429]
        locked = await attacker.post(live.webhook, data=form, headers={"X-Twilio-Signature": good})
        assert locked.status_code == 429 and 1 <= int(locked.headers["retry-after"]) <= 60
        served = await carrier.post(live.webhook, data=form, headers={"X-Twilio-Signature": good})
        assert served.status_code == 200 and "<Stream" in served.text
    assert live.state.auth_throttle.refused == 3


async def test_bad_stream_signatures_lock_out_the_upgrade_before_it_is_checked(start_gateway) -> None:
    live = start_gateway(EchoEngine(), auth_token=TOKEN, auth_failures_per_minute=ALLOWED)
    bad = {"x-twilio-signature": compute_signature("guess", live.ws_url)}
    statuses = []
    for _ in range(ALLOWED + 1):
        with pytest.raises(InvalidStatus) as refused:
            async with connect(live.ws_url, additional_headers=bad, open_timeout=5):
                pass
        statuses.append(refused.value.response.status_code)
    assert statuses == [403] * ALLOWED + [429]
    good = {"x-twilio-signature": compute_signature(TOKEN, live.ws_url)}
    async with connect(live.ws_url, additional_headers=good, local_addr=(OTHER, 0), open_timeout=5) as ws:
        assert ws.protocol.state.name == "OPEN"


async def test_bad_control_keys_lock_out_that_address(start_gateway, monkeypatch) -> None:
    monkeypatch.setenv("DUPLEXGATE_API_KEY", API_KEY)
    live = start_gateway(EchoEngine(), auth_failures_per_minute=ALLOWED)
    calls = live.base_url + "/v1/calls"
    async with client() as attacker, client(OTHER) as operator:
        codes = [
            (await attacker.get(calls, headers={"Authorization": f"Bearer guess{i}"})).status_code
            for i in range(ALLOWED + 1)
        ]
        assert codes == [401] * ALLOWED + [429]
        locked = await attacker.get(calls, headers={"Authorization": f"Bearer {API_KEY}"})
        assert locked.status_code == 429
        served = await operator.get(calls, headers={"Authorization": f"Bearer {API_KEY}"})
        assert served.status_code == 200 and served.json() == {"calls": []}


def test_an_address_may_try_again_when_its_window_is_out() -> None:
    now = [0.0]
    throttle = AuthThrottle(2, window_s=60, clock=lambda: now[0])
    throttle.failed("a")
    throttle.failed("a")
    now[0] = 59.0
    assert throttle.blocked("a") == pytest.approx(1.0)
    now[0] = 60.0
    assert throttle.blocked("a") == 0.0 and len(throttle) == 0
    throttle.failed("a")  # a fresh window: one failure counted, not three
    assert throttle.blocked("a") == 0.0


def test_the_table_forgets_the_oldest_address_when_full() -> None:
    throttle = AuthThrottle(1, max_addresses=100)
    for i in range(1000):
        throttle.failed(f"10.0.{i // 256}.{i % 256}")
    assert len(throttle) == 100
    assert throttle.blocked("10.0.3.231") > 0 and throttle.blocked("10.0.0.0") == 0.0


async def test_forged_requests_to_a_carriers_own_routes_count_too(start_gateway) -> None:
    # Plivo's one-time transfer URL: a forged signature there is a failed authentication like any other.
    from gateway.carriers.plivo import PlivoPeer

    table, env, _ = PlivoPeer.conformance_setup("http://127.0.0.1:9")
    agents = {
        "agents": {"helper": {"voice": "demo", "prompt": "You help."}},
        "numbers": {"default": "helper"},
    }
    live = start_gateway(
        EchoEngine(), tables={"plivo": table, **agents}, env=env, auth_failures_per_minute=ALLOWED
    )
    forged = {"X-Plivo-Signature-V3": "Zm9yZ2Vk", "X-Plivo-Signature-V3-Nonce": "1"}
    async with client() as attacker:
        codes = [
            (await attacker.post(live.base_url + "/plivo/transfer/abc", headers=forged)).status_code
            for _ in range(ALLOWED + 1)
        ]
    assert codes == [403] * ALLOWED + [429]
