"""Who may start a call on the edge: with signatures on, only a stream carrying its call's single-use
token; never a second stream for a live call; a stream's parameters only tighten the agent's limits; the
configured Twilio account, not a stream's, is used for call control; SIDs must have Twilio's shapes.
Attacked over real sockets on loopback against the real app."""

from __future__ import annotations

import asyncio

import httpx
from callaudio import speech_like
from conftest import TEST_AUTH_TOKEN
from test_escalation import HUMAN, TwilioStandIn

from engine.echo import EchoEngine
from gateway.simulator.call import simulate_call

SID = "CA" + "c" * 32


def agent_tables(**agent) -> dict:
    base = {"voice": "demo", "prompt": "You are a helpful assistant for SwiftPlex."}
    return {"agents": {"helper": {**base, **agent}}, "numbers": {"default": "helper"}}


async def test_a_tokenless_stream_is_refused_when_signatures_are_on(start_gateway) -> None:
    live = start_gateway(EchoEngine(), auth_token=TEST_AUTH_TOKEN)
    # The upgrade is validly signed (a captured header replays for every call), but no call token.
    summary = await simulate_call(live.ws_url, speech_like(1.0), auth_token=TEST_AUTH_TOKEN, call_sid=SID)
    assert summary.handshake_status == 101 and summary.close_code == 1008
    assert summary.closed_by == "gateway" and summary.media_received == 0
    assert live.engine.opened == 0


async def test_an_agent_can_take_unprepared_streams_when_its_operator_says_so(start_gateway) -> None:
    live = start_gateway(
        EchoEngine(), auth_token=TEST_AUTH_TOKEN, tables=agent_tables(allow_unprepared_streams=True)
    )
    summary = await simulate_call(live.ws_url, speech_like(0.5), auth_token=TEST_AUTH_TOKEN, call_sid=SID)
    assert summary.closed_by == "carrier" and summary.media_received > 0


async def test_a_stream_naming_a_live_call_is_refused_and_the_live_call_goes_on(start_gateway) -> None:
    live = start_gateway(EchoEngine())
    first = asyncio.create_task(simulate_call(live.ws_url, speech_like(2.0), call_sid=SID, tail_s=0))
    assert await live.until(lambda: SID in live.state.calls)
    intruder = await simulate_call(live.ws_url, speech_like(1.0), call_sid=SID)
    original = await first
    assert intruder.close_code == 1008 and intruder.media_received == 0
    assert original.closed_by == "carrier" and original.violations == []
    assert original.media_received >= 2.0 / 0.08 - 2  # it kept its replies throughout


async def test_stream_parameters_cannot_lift_or_lengthen_the_agents_maximum(start_gateway) -> None:
    live = start_gateway(EchoEngine(), tables=agent_tables(limits={"max_duration": 0.6}))
    for asked in ("off", "3600"):
        summary = await simulate_call(
            live.ws_url, speech_like(2.5), custom_parameters={"limit_max_duration": asked}
        )
        assert summary.closed_by == "gateway", asked
        assert summary.media_sent * 0.02 < 1.2, asked  # ended near 0.6 s, far before 2.5 s


async def test_the_configured_account_is_used_for_transfers_not_the_streams(start_gateway, engine) -> None:
    api = TwilioStandIn()
    configured = "AC" + "7" * 32
    try:
        live = start_gateway(
            engine,
            auth_token=TEST_AUTH_TOKEN,
            env={"TWILIO_ACCOUNT_SID": configured},
            tables={
                **agent_tables(
                    allow_unprepared_streams=True,
                    limits={"max_duration": 1.0},
                    escalation={"transfer_to": HUMAN, "actions": {"max_duration": ["transfer"]}},
                ),
                "twilio": {"auth_token_env": "TWILIO_AUTH_TOKEN", "api_base": api.url},
            },
        )
        # The simulated stream says its account is AC000...; the configured one must be used.
        await simulate_call(live.ws_url, speech_like(2.5), auth_token=TEST_AUTH_TOKEN, call_sid=SID, tail_s=0)
        assert await live.until(lambda: len(api.requests) == 1)
    finally:
        api.server.shutdown()
    assert api.requests[0]["path"] == f"/2010-04-01/Accounts/{configured}/Calls/{SID}.json"


async def test_a_voice_webhook_with_a_malformed_call_sid_is_refused(echo_gateway) -> None:
    async with httpx.AsyncClient() as client:
        for sid in ("", "CA1", "CA" + "g" * 32, "live:CA" + "a" * 32):
            response = await client.post(echo_gateway.webhook, data={"CallSid": sid, "From": "+15550001111"})
            assert response.status_code == 400, sid
    assert echo_gateway.engine.opened == 0
