"""Every carrier behind the one carrier interface passes the same conformance run, with the real app over
real WebSockets on loopback and its simulated carrier speaking that carrier's exact protocol: answer
webhook -> stream -> agent audio within 1 s -> playback acknowledged -> DTMF -> barge-in clear -> transfer
through that carrier's REST API (a loopback stand-in checking method, path, auth and body) -> hang-up -> a
call record; forged credentials are refused and malformed frames survived."""

from __future__ import annotations

from typing import Any

import pytest
from callaudio import speech_like
from carrier_api import CarrierApi
from test_recorder import API_KEY, stored_record

from engine.echo import EchoEngine
from gateway.call import escalation
from gateway.carriers import registry
from gateway.simulator.call import simulate_call

CARRIERS = sorted(registry())
HUMAN = "+15557654321"


@pytest.fixture(autouse=True)
def _control_key_and_short_grace(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DUPLEXGATE_API_KEY", API_KEY)
    monkeypatch.setattr(escalation, "TRANSFER_GRACE_S", 0.5)


@pytest.fixture
def api():
    stand_in = CarrierApi()
    yield stand_in
    stand_in.close()


def signed_gateway(start_gateway, name: str, api: CarrierApi, **agent: Any):
    """A gateway serving carrier `name` with its signatures on and its REST calls going to `api`."""
    peer = registry()[name].peer
    table, env, secret = peer.conformance_setup(api.url)
    helper = {"voice": "demo", "prompt": "You are a helpful assistant for SwiftPlex.", **agent}
    tables = {name: table, "agents": {"helper": helper}, "numbers": {"default": "helper"}}
    live = start_gateway(EchoEngine(), tables=tables, env=env)
    return live, secret


def urls(live: Any, name: str) -> tuple[str, str]:
    return live.base_url + f"/{name}/voice", live.base_url.replace("http://", "ws://") + f"/{name}/media"


@pytest.mark.parametrize("name", CARRIERS)
async def test_a_call_runs_its_whole_course_on_every_carrier(start_gateway, api, name: str) -> None:
    escalate = {"dtmf": "0", "transfer_to": HUMAN, "actions": {"dtmf": ["transfer"]}}
    live, secret = signed_gateway(start_gateway, name, api, escalation=escalate)
    peer_type = registry()[name].peer
    webhook, media = urls(live, name)
    summary = await simulate_call(
        None if peer_type.has_webhook else media,
        speech_like(4.0),
        carrier=name,
        webhook=webhook if peer_type.has_webhook else None,
        auth_token=secret,
        dtmf=[("0", 2.0)],
        tail_s=0,
    )
    assert summary.handshake_status == 101 and summary.violations == []
    assert summary.first_audio_latency_s is not None and summary.first_audio_latency_s < 1.0
    assert summary.marks_echoed >= 5  # playback acknowledged in the carrier's own way
    assert summary.dtmf_sent == 1 and summary.clears_received >= 1  # the key asked for a human
    if peer_type.transfers_over_rest:
        assert len(api.requests) == 1, api.requests
        assert summary.peer is not None and summary.peer.check_transfer(api.requests[0], HUMAN) == []
    else:  # the carrier's own flow takes the call on once the stream ends
        assert api.requests == []
    assert summary.closed_by == "gateway"  # the transferred call's stream is ended
    if registry()[name].transfer_ends_stream:  # at once: the carrier's own flow takes the call on
        assert summary.media_sent * summary.chunk_s < 2.0 + escalation.TRANSFER_GRACE_S - 0.1
    record = await stored_record(live, summary.call_sid)
    assert record["escalations"][0]["trigger"] == "dtmf" and record["end_reason"] == "transferred_dtmf"
    assert record["counters"]["agent_frames_sent"] == round(summary.audio_received_s / 0.08)


@pytest.mark.parametrize("name", CARRIERS)
async def test_forged_credentials_are_refused_on_every_carrier(start_gateway, api, name: str) -> None:
    live, _ = signed_gateway(start_gateway, name, api)
    peer_type = registry()[name].peer
    webhook, media = urls(live, name)
    forged = peer_type.forged_secret()
    if peer_type.has_webhook:
        with pytest.raises(RuntimeError, match="403"):
            await simulate_call(None, speech_like(0.5), carrier=name, webhook=webhook, auth_token=forged)
    stream = await simulate_call(media, speech_like(0.5), carrier=name, auth_token=forged)
    assert stream.handshake_status != 101 or stream.close_code == 1008
    assert stream.media_received == 0 and live.engine.opened == 0


@pytest.mark.parametrize("name", CARRIERS)
async def test_malformed_frames_are_survived_on_every_carrier(start_gateway, api, name: str) -> None:
    live, secret = signed_gateway(start_gateway, name, api)
    peer_type = registry()[name].peer
    webhook, media = urls(live, name)
    junk = ["{", "[]", '{"event": 7}', "\x00" * 300, b"\xff" * 3, b"", '{"event": "media"}', "x" * 70_000]
    summary = await simulate_call(
        None if peer_type.has_webhook else media,
        speech_like(2.0),
        carrier=name,
        webhook=webhook if peer_type.has_webhook else None,
        auth_token=secret,
        inject=[(0.4 + 0.1 * i, message) for i, message in enumerate(junk)],
        tail_s=0,
    )
    assert summary.handshake_status == 101 and summary.closed_by == "carrier"
    assert summary.audio_received_s >= 2.0 - 0.5  # the call kept its replies throughout
