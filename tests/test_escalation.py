"""Escalation: its configuration, and real calls (simulated Twilio, real gateway and tiny engine) handed to
a human through Twilio's REST API, here a recording HTTP server on loopback standing in for Twilio."""

from __future__ import annotations

import base64
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs

import pytest
from callaudio import speech_like
from conftest import TEST_AUTH_TOKEN

from gateway.call import escalation
from gateway.call.escalation import parse_escalation
from gateway.simulator.call import simulate_call

ACCOUNT = "AC" + "0" * 32  # what the simulated carrier puts in start.accountSid
HUMAN = "+15550009999"


class TwilioStandIn:
    """Records every request; answers 200 like Twilio's call update."""

    def __init__(self) -> None:
        self.requests: list[dict] = []
        recorder = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
                body = self.rfile.read(int(self.headers.get("Content-Length", 0))).decode()
                recorder.requests.append(
                    {"path": self.path, "auth": self.headers.get("Authorization", ""), "form": parse_qs(body)}
                )
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(b'{"status": "in-progress"}')

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


@pytest.fixture
def twilio_api():
    stand_in = TwilioStandIn()
    yield stand_in
    stand_in.server.shutdown()


@pytest.fixture(autouse=True)
def short_transfer_grace(monkeypatch):
    monkeypatch.setattr(escalation, "TRANSFER_GRACE_S", 0.5)


def tables(api_url: str, limits: dict | None = None, **policy) -> dict:
    agent = {"voice": "demo", "prompt": "You are a helpful assistant for SwiftPlex.", "escalation": policy}
    agent["allow_unprepared_streams"] = True  # these calls stream straight to /twilio/media, signed
    if limits:
        agent["limits"] = limits
    return {
        "agents": {"helper": agent},
        "numbers": {"default": "helper"},
        "twilio": {"auth_token_env": "TWILIO_AUTH_TOKEN", "api_base": api_url},
    }


def notices_of(live) -> list:
    notices: list = []
    live.state.notice_hooks.append(notices.append)
    return notices


def assert_transferred_to_the_human(request: dict, call_sid: str) -> None:
    assert request["path"] == f"/2010-04-01/Accounts/{ACCOUNT}/Calls/{call_sid}.json"
    assert request["auth"] == "Basic " + base64.b64encode(f"{ACCOUNT}:{TEST_AUTH_TOKEN}".encode()).decode()
    assert set(request["form"]) == {"Twiml"}
    (twiml,) = request["form"]["Twiml"]
    assert (
        twiml
        == f'<?xml version="1.0" encoding="UTF-8"?><Response><Dial><Number>{HUMAN}</Number></Dial></Response>'
    )


async def test_a_call_at_max_duration_is_transferred_through_twilios_api(start_gateway, engine, twilio_api):
    live = start_gateway(
        engine,
        auth_token=TEST_AUTH_TOKEN,
        tables=tables(
            twilio_api.url,
            limits={"max_duration": 1.2},
            transfer_to=HUMAN,
            actions={"max_duration": ["transfer"]},
        ),
    )
    notices = notices_of(live)
    sid = "CA" + "7" * 32
    summary = await simulate_call(
        live.ws_url, speech_like(4.0), auth_token=TEST_AUTH_TOKEN, call_sid=sid, tail_s=0
    )
    assert len(twilio_api.requests) == 1
    assert_transferred_to_the_human(twilio_api.requests[0], sid)
    # the gateway closes the stream first and says "ended" after: wait for it (bounded)
    assert await live.until(lambda: any(n.kind == "ended" for n in notices))
    kinds = [n.kind for n in notices]
    assert kinds.index("max_duration") < kinds.index("escalated") < kinds.index("ended")
    assert [n.detail for n in notices if n.kind == "ended"] == ["transferred_max_duration"]
    assert summary.closed_by == "gateway"
    # Nothing is kept for a call that is over: the switchboard's memory does not grow with calls served.
    assert await live.until(lambda: sid not in live.state.escalated and sid not in live.state.role_prompts)


async def test_a_dtmf_key_escalates_with_an_announcement_then_a_transfer(start_gateway, engine, twilio_api):
    live = start_gateway(
        engine,
        auth_token=TEST_AUTH_TOKEN,
        tables=tables(
            twilio_api.url,
            dtmf="0",
            announcement="one moment please",
            transfer_to=HUMAN,
            actions={"dtmf": ["announce", "transfer"]},
        ),
    )
    notices = notices_of(live)
    sid = "CA" + "8" * 32
    await simulate_call(
        live.ws_url,
        speech_like(4.5),
        auth_token=TEST_AUTH_TOKEN,
        call_sid=sid,
        dtmf=[("5", 0.4), ("0", 0.8)],
        tail_s=0,
    )
    escalated = [n for n in notices if n.kind == "escalated"]
    assert len(escalated) == 1 and escalated[0].detail.startswith("dtmf: 0")  # the 5 did not escalate
    assert len(twilio_api.requests) == 1
    assert_transferred_to_the_human(twilio_api.requests[0], sid)


async def test_a_phrase_in_the_agents_words_escalates(start_gateway, engine, twilio_api):
    # The spoken warning puts known words in the agent's mouth; the phrase trigger hears them.
    live = start_gateway(
        engine,
        tables=tables(
            twilio_api.url,
            limits={"max_duration": 30, "warn_before": 29.5, "wrap_up_line": "thank you for calling"},
            phrases=["for\\s+calling"],
            actions={"phrase": ["hangup"]},
        ),
    )
    notices = notices_of(live)
    summary = await simulate_call(live.ws_url, speech_like(5.0), tail_s=0)
    assert [n.detail for n in notices if n.kind == "phrase"] == ["for\\s+calling"]
    # the gateway closes the stream first and says "ended" after: wait for it (bounded)
    assert await live.until(lambda: any(n.kind == "ended" for n in notices))
    assert [n.detail for n in notices if n.kind == "ended"] == ["escalated_phrase"]
    assert summary.closed_by == "gateway" and twilio_api.requests == []


async def test_an_engine_that_loses_the_session_hands_the_caller_to_a_human(
    start_gateway, engine, twilio_api, monkeypatch
):
    live = start_gateway(
        engine,
        auth_token=TEST_AUTH_TOKEN,
        tables=tables(twilio_api.url, transfer_to=HUMAN, actions={"engine_lost": ["transfer"]}),
    )
    notices = notices_of(live)
    real_step, steps = engine.runner.step, []

    def failing_after_a_while(pcm, active):
        steps.append(1)
        if len(steps) > 5:
            raise RuntimeError("simulated GPU fault")
        return real_step(pcm, active)

    monkeypatch.setattr(engine.runner, "step", failing_after_a_while)
    sid = "CA" + "9" * 32
    await simulate_call(live.ws_url, speech_like(3.0), auth_token=TEST_AUTH_TOKEN, call_sid=sid, tail_s=0)
    assert "engine_lost" in [n.kind for n in notices]
    assert len(twilio_api.requests) == 1
    assert_transferred_to_the_human(twilio_api.requests[0], sid)


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ({"transfer_to": HUMAN, "actions": {"dtmf": ["teleport"]}}, "dtmf = 'teleport' should be 'announce'"),
        ({"actions": {"dtmf": ["transfer"]}, "dtmf": "0"}, "needs transfer_to"),
        ({"dtmf": "0"}, "actions.dtmf lists nothing"),
        ({"phrases": ["(unclosed"], "actions": {"phrase": ["hangup"]}}, "not a regular expression"),
        (
            {"actions": {"sneeze": ["hangup"]}},
            r"\[agents.a.escalation.actions\] key 'sneeze' should be 'dtmf'",
        ),
    ],
)
def test_bad_escalation_settings_are_errors_naming_the_key(table, message):
    with pytest.raises(ValueError, match=message):
        parse_escalation(table, "gw.toml: [agents.a.escalation]")
