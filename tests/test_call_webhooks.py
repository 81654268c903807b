"""Call events reach the business's webhook, signed: started, warning, escalated and ended (with the call
record), from real calls through the gateway and the tiny engine to a real HTTP receiver on loopback."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from callaudio import speech_like

from gateway.config import ConfigError
from gateway.ops.webhooks import verify
from gateway.simulator.call import simulate_call

SECRET = "whsec-test-0123456789"
ENV = {"TEST_WEBHOOK_SECRET": SECRET}


class Receiver:
    def __init__(self) -> None:
        self.events: list[tuple[dict, bytes, dict]] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                receiver.events.append((json.loads(body), body, dict(self.headers)))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hooks"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def types(self) -> list[str]:
        return [event["type"] for event, _, _ in self.events]


@pytest.fixture
def receiver():
    r = Receiver()
    yield r
    r.server.shutdown()


def tables(url: str, **agent_extra) -> dict:
    agent = {"voice": "demo", "prompt": "You are a helpful assistant for SwiftPlex.", **agent_extra}
    return {
        "agents": {"helper": agent},
        "numbers": {"default": "helper"},
        "webhooks": {"url": url, "secret_env": "TEST_WEBHOOK_SECRET"},
    }


async def wait_for(condition, timeout_s: float = 5.0) -> bool:
    import asyncio

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and not condition():
        await asyncio.sleep(0.02)
    return condition()


async def test_a_call_sends_signed_started_warning_and_ended_events(start_gateway, engine, receiver):
    limits = {"max_duration": 1.6, "warn_before": 1.0}
    live = start_gateway(engine, tables=tables(receiver.url, limits=limits), env=ENV)
    sid = "CA" + "4" * 32
    await simulate_call(live.ws_url, speech_like(4.0), call_sid=sid, tail_s=0)
    assert await wait_for(lambda: "call.ended" in receiver.types())
    assert receiver.types() == ["call.started", "call.warning", "call.ended"]
    for event, body, headers in receiver.events:
        assert verify(SECRET, headers, body, now=time.time())
        assert event["call_id"] == sid and event["id"].startswith("evt_")
    record = receiver.events[-1][0]["data"]["record"]
    assert record["call_id"] == sid and record["end_reason"] == "max_duration"
    assert record["agent"] == "helper" and isinstance(record["transcript"], list)


async def test_the_webhook_escalation_action_sends_call_escalated(start_gateway, engine, receiver):
    escalation = {"dtmf": "0", "actions": {"dtmf": ["webhook", "hangup"]}}
    live = start_gateway(engine, tables=tables(receiver.url, escalation=escalation), env=ENV)
    await simulate_call(live.ws_url, speech_like(4.0), dtmf=[("0", 0.6)], tail_s=0)
    assert await wait_for(lambda: "call.ended" in receiver.types())
    escalated = [e for e, _, _ in receiver.events if e["type"] == "call.escalated"]
    assert len(escalated) == 1 and escalated[0]["data"]["trigger"] == "dtmf"
    ended = [e for e, _, _ in receiver.events if e["type"] == "call.ended"]
    assert ended[0]["data"]["record"]["end_reason"] == "escalated_dtmf"


def test_a_webhook_url_without_its_secret_is_a_config_error(tmp_path):
    from gateway.config import load_config

    path = tmp_path / "gw.toml"
    path.write_text(
        '[webhooks]\nurl = "https://crm.example.com/hooks"\n[agents.a]\nvoice = "demo"\nprompt = "hello"\n'
    )
    with pytest.raises(ConfigError, match="DUPLEXGATE_WEBHOOK_SECRET"):
        load_config(path, env={})
