"""The gateway app under real uvicorn on 127.0.0.1, driven over real HTTP and WebSockets by the simulated
Twilio carrier: webhook and TwiML, signatures (403 before accept), tokens, exact outbound shapes, marks and
clear, malformed input, isolation between calls, and engine slots freed however a call ends; plus the
TOML configuration the app is built from."""

from __future__ import annotations

import asyncio
import json
import logging
import math
from pathlib import Path
from xml.etree import ElementTree

import httpx
import numpy as np
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from engine.api import FRAME_S
from engine.echo import EchoEngine
from gateway.call.notices import CallNotice
from gateway.carriers.twilio import compute_signature, fetch_twiml
from gateway.config import ConfigError, load_config
from gateway.simulator.call import simulate_call

TOKEN = "test-auth-token-0123456789abcdef"
CHUNK_S = 0.02  # Twilio media cadence


def frames_answered(seconds_sent: float) -> int:
    """Agent frames the echo engine returns for this much caller audio: one per 4 whole chunks. Tests
    choose lengths that leave spare chunks after the last whole frame, so its reply beats the `stop`."""
    return round(seconds_sent / CHUNK_S) // 4


def dominant_hz(pcm: np.ndarray, rate: int = 8000) -> float:
    """Frequency of the strongest spectral peak."""
    spectrum = np.abs(np.fft.rfft(pcm.astype(np.float64) * np.hanning(len(pcm))))
    spectrum[0] = 0.0
    return float(np.argmax(spectrum) * rate / len(pcm))


def voice_form(call_sid: str = "CA" + "a" * 32) -> dict[str, str]:
    return {"AccountSid": "AC" + "0" * 32, "CallSid": call_sid, "From": "+15550001111", "To": "+15550002222"}


async def test_healthz_answers_ok(live_gateway) -> None:
    async with httpx.AsyncClient() as client:
        response = await client.get(live_gateway.base_url + "/healthz")
    assert response.status_code == 200
    assert response.json() == {"status": "ok", "calls": 0, "prepared": 0}


async def test_readyz_says_the_real_engine_would_admit_a_call_and_its_step_time(live_gateway) -> None:
    async with httpx.AsyncClient() as client:
        response = await client.get(live_gateway.base_url + "/readyz")
    assert response.status_code == 200
    body = response.json()
    assert body["status"] == "ready" and body["step_ms"] > 0


async def test_readyz_is_503_with_the_reason_while_no_call_can_be_admitted(start_gateway) -> None:
    live = start_gateway(EchoEngine(max_sessions=1))
    async with httpx.AsyncClient() as client:
        assert (await client.get(live.base_url + "/readyz")).status_code == 200
        await client.post(live.webhook, data=voice_form())  # primes a session: the only slot is taken
        assert await live.until(lambda: live.engine.active == 1)
        response = await client.get(live.base_url + "/readyz")
        alive = await client.get(live.base_url + "/healthz")
    assert response.status_code == 503
    assert response.json() == {"status": "unready", "calls": 0, "reason": "echo engine full (1 sessions)"}
    assert alive.status_code == 200  # alive all the same


async def test_voice_webhook_answers_twiml_with_stream_and_token_and_starts_priming(echo_gateway) -> None:
    async with httpx.AsyncClient() as client:
        response = await client.post(echo_gateway.webhook, data=voice_form())
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/xml")
    stream = ElementTree.fromstring(response.text).find("./Connect/Stream")
    assert stream is not None and stream.get("url") == echo_gateway.ws_url  # no query string
    (param,) = stream.findall("Parameter")
    assert param.get("name") == "token" and len(param.get("value", "")) >= 32
    assert await echo_gateway.until(lambda: echo_gateway.engine.opened == 1)  # primed while ringing


async def test_voice_webhook_with_bad_signature_is_refused(start_gateway) -> None:
    live = start_gateway(EchoEngine(), auth_token=TOKEN)
    form = voice_form()
    signature = compute_signature("wrong-token", live.webhook, form.items())
    async with httpx.AsyncClient() as client:
        response = await client.post(live.webhook, data=form, headers={"X-Twilio-Signature": signature})
    assert response.status_code == 403
    assert live.engine.opened == 0 and len(live.state.prepared) == 0


async def test_signed_call_through_webhook_hears_its_own_echo(start_gateway, tone_wav) -> None:
    live = start_gateway(EchoEngine(), auth_token=TOKEN)
    summary = await simulate_call(
        None, tone_wav(440, 1.0), webhook=live.webhook, auth_token=TOKEN, tail_s=0.4
    )
    assert summary.handshake_status == 101
    assert summary.violations == []  # every outbound message had Twilio's exact shape
    assert summary.media_received == frames_answered(1.4)  # one reply per 80 ms of caller audio
    assert dominant_hz(summary.heard[800:8000]) == pytest.approx(440, abs=5)
    assert summary.closed_by == "carrier"
    assert await live.until(lambda: live.engine.active == 0 and not live.state.calls)


async def test_every_frame_is_followed_by_a_mark_that_is_echoed_once(live_gateway, tone_wav) -> None:
    summary = await simulate_call(live_gateway.ws_url, tone_wav(440, 0.6), tail_s=0.3)
    events = [event for _, event in summary.outbound_log]
    marked = summary.marks_received
    assert marked > 0 and events[: 2 * marked] == ["media", "mark"] * marked
    assert events[2 * marked :] in ([], ["media"])  # the call may end between the last media and its mark
    # the frames still buffered at the carrier when the caller stops (up to carrier_buffer_s of audio) have
    # not played yet, so their marks are not echoed
    buffered = math.ceil(live_gateway.app.state.gateway.config.server.carrier_buffer_s / FRAME_S)
    assert summary.marks_echoed >= summary.marks_received - buffered


async def test_stream_with_bad_signature_is_refused_with_403_before_accept(start_gateway, tone_wav) -> None:
    live = start_gateway(EchoEngine(), auth_token=TOKEN)
    summary = await simulate_call(live.ws_url, tone_wav(440, 0.2), auth_token="wrong-token")
    assert summary.handshake_status == 403
    assert live.engine.opened == 0


async def test_stream_without_signature_is_refused_with_403(start_gateway, tone_wav) -> None:
    live = start_gateway(EchoEngine(), auth_token=TOKEN)
    summary = await simulate_call(live.ws_url, tone_wav(440, 0.2))
    assert summary.handshake_status == 403


async def test_stream_signed_with_trailing_slash_is_accepted(start_gateway) -> None:
    live = start_gateway(EchoEngine(), auth_token=TOKEN)
    signature = compute_signature(TOKEN, live.ws_url + "/")
    async with connect(live.ws_url, additional_headers={"x-twilio-signature": signature}) as ws:
        await ws.send(json.dumps({"event": "connected", "protocol": "Call", "version": "1.0.0"}))
        assert ws.protocol.state.name == "OPEN"


async def test_stream_token_is_single_use(echo_gateway, tone_wav) -> None:
    first = await simulate_call(None, tone_wav(440, 0.3), webhook=echo_gateway.webhook, tail_s=0.1)
    assert first.media_received > 0
    replay = await simulate_call(
        echo_gateway.ws_url,
        tone_wav(440, 0.3),
        custom_parameters=first.stream_parameters,
        call_sid=first.call_sid,
    )
    assert (replay.closed_by, replay.close_code, replay.media_received) == ("gateway", 1008, 0)
    assert echo_gateway.engine.opened == 1


async def test_stream_token_for_another_call_is_refused(live_gateway, tone_wav) -> None:
    _, params = await fetch_twiml(live_gateway.webhook, voice_form("CA" + "b" * 32), None)
    # Long enough that the gateway's refusal always lands before the caller would hang up by itself.
    other = await simulate_call(
        live_gateway.ws_url, tone_wav(440, 3.0), custom_parameters=params, call_sid="CA" + "c" * 32
    )
    assert (other.closed_by, other.close_code, other.media_received) == ("gateway", 1008, 0)
    assert len(live_gateway.state.prepared) == 1  # the real call can still claim its token


async def test_stream_without_token_is_primed_at_start(echo_gateway, tone_wav) -> None:
    summary = await simulate_call(echo_gateway.ws_url, tone_wav(1000, 0.6), tail_s=0.2)
    assert echo_gateway.engine.opened == 1
    assert summary.media_received > 0 and summary.violations == []
    assert dominant_hz(summary.heard[800:4800]) == pytest.approx(1000, abs=5)


async def test_malformed_messages_are_dropped_and_the_call_goes_on(live_gateway, tone_wav, caplog) -> None:
    garbage: list[str | bytes] = [
        "{not json",
        json.dumps({"event": "hangup", "streamSid": "MZ1"}),
        b"\x00\x01binary",
        json.dumps({"event": "media", "sequenceNumber": "9", "streamSid": "MZ1"}),
        json.dumps({"event": "mark", "streamSid": "MZ1"}),
        "x" * (70 * 1024),
    ]
    caplog.set_level(logging.WARNING, logger="gateway.edge.stream")
    summary = await simulate_call(
        live_gateway.ws_url, tone_wav(440, 1.0), inject=[(0.3, m) for m in garbage], tail_s=0.26
    )
    assert summary.closed_by == "carrier"  # the call lasted until the caller hung up
    replies_after = [t for t, event in summary.outbound_log if event == "media" and t > 0.5]
    assert len(replies_after) >= 5  # and agent audio kept coming after the garbage
    dropped = [
        r for r in caplog.records if "dropped" in r.getMessage() and summary.call_sid in r.getMessage()
    ]
    assert len(dropped) >= 1  # logged, at most one line a second for one stream
    store = live_gateway.app.state.control.store
    assert await live_gateway.until(lambda: summary.call_sid in store._records)
    assert store._records[summary.call_sid].counters["malformed_messages"] == len(garbage)  # each counted


async def test_two_concurrent_calls_are_isolated(echo_gateway, tone_wav) -> None:
    low, high = await asyncio.gather(
        simulate_call(echo_gateway.ws_url, tone_wav(440, 1.0), inject=[(0.4, "{broken")], tail_s=0.26),
        simulate_call(echo_gateway.ws_url, tone_wav(1200, 1.0), drop_at_s=0.6),
    )
    assert dominant_hz(low.heard[800:8000]) == pytest.approx(440, abs=5)
    assert dominant_hz(high.heard[800:4400]) == pytest.approx(1200, abs=5)
    assert low.closed_by == "carrier" and low.media_received == frames_answered(1.26)  # unhurt by the drop
    assert low.violations == [] and high.violations == []


async def test_carrier_that_disconnects_mid_call_frees_the_engine_session(echo_gateway, tone_wav) -> None:
    summary = await simulate_call(echo_gateway.ws_url, tone_wav(440, 2.0), drop_at_s=0.5)
    assert summary.closed_by == "carrier" and summary.media_received > 0
    assert await echo_gateway.until(lambda: echo_gateway.engine.active == 0 and not echo_gateway.state.calls)
    assert echo_gateway.engine.opened == 1


async def test_engine_busy_at_open_closes_the_stream(start_gateway, tone_wav, caplog) -> None:
    # A stream with no webhook before it (with one, the webhook answers the overflow: test_overflow.py)
    live = start_gateway(EchoEngine(max_sessions=0))
    caplog.set_level(logging.WARNING, logger="gateway.call.session")
    summary = await simulate_call(live.ws_url, tone_wav(440, 2.0))
    assert (summary.closed_by, summary.media_received) == ("gateway", 0)
    assert summary.media_sent < 25  # closed well before the caller's 2 s of audio ran out
    assert any(summary.call_sid in r.getMessage() and "EngineBusy" in r.getMessage() for r in caplog.records)


async def test_engine_losing_the_session_clears_the_carrier_then_closes(start_gateway, tone_wav) -> None:
    live = start_gateway(EchoEngine(session_frames_limit=6))
    summary = await simulate_call(live.ws_url, tone_wav(440, 2.0))
    assert summary.closed_by == "gateway" and summary.close_code == 1000
    assert summary.media_received == 6
    assert summary.outbound_log[-1][1] == "clear" and summary.clears_received == 1
    assert summary.marks_pending == 0  # a clear releases every pending mark
    assert await live.until(lambda: live.engine.active == 0)


async def test_stream_without_start_is_closed_after_the_start_timeout(start_gateway) -> None:
    live = start_gateway(EchoEngine(), stream_start_timeout_s=0.3)
    async with connect(live.ws_url) as ws:
        await ws.send(json.dumps({"event": "connected", "protocol": "Call", "version": "1.0.0"}))
        with pytest.raises(ConnectionClosed) as closed:
            await asyncio.wait_for(ws.recv(), 3.0)
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1008
    assert live.engine.opened == 0


async def test_prepared_call_whose_stream_never_comes_frees_its_engine_session(start_gateway) -> None:
    live = start_gateway(EchoEngine(), call_token_ttl_s=0.3)
    await fetch_twiml(live.webhook, voice_form(), None)
    assert await live.until(lambda: live.engine.opened == 1)
    assert await live.until(lambda: live.engine.active == 0 and len(live.state.prepared) == 0)


async def test_dtmf_reaches_the_call_notice_hooks(live_gateway, tone_wav) -> None:
    notices: list[CallNotice] = []
    live_gateway.state.notice_hooks.append(notices.append)
    summary = await simulate_call(live_gateway.ws_url, tone_wav(440, 0.5), dtmf=[("7", 0.2)], tail_s=0.1)
    assert [(n.call_id, n.detail) for n in notices if n.kind == "dtmf"] == [(summary.call_sid, "7")]


async def test_called_number_picks_its_agent(start_gateway, tone_wav) -> None:
    agents = {
        "front": {"voice": "NATF1", "prompt": "You answer the front desk."},
        "sales": {"voice": "NATM2", "prompt": "You sell appliances.", "seed": 7},
    }
    live = start_gateway(
        EchoEngine(), tables={"agents": agents, "numbers": {"default": "front", "+15551230000": "sales"}}
    )
    await simulate_call(None, tone_wav(440, 0.3), webhook=live.webhook, called="+15551230000", tail_s=0.1)
    await simulate_call(None, tone_wav(440, 0.3), webhook=live.webhook, called="+15559999999", tail_s=0.1)
    assert [(s.voice, s.prompt, s.seed) for s in live.engine.specs] == [
        ("NATM2", "You sell appliances.", 7),
        ("NATF1", "You answer the front desk.", None),
    ]


# --- the configuration the app runs on ----------------------------------------------------------------


def test_example_config_loads_and_routes_unknown_numbers_to_the_default_agent() -> None:
    config = load_config(env={})
    assert config.carriers["twilio"].auth_token is None
    assert config.agent_for("+19998887777").name == config.default_agent
    assert config.agent_for(None).name == config.default_agent


def test_auth_token_comes_from_the_environment_variable_named_in_the_config(tmp_path: Path) -> None:
    path = tmp_path / "gw.toml"
    path.write_text(
        '[server]\npublic_url = "https://gw.example.com"\n[twilio]\nauth_token_env = "MY_TWILIO_TOKEN"\n'
        '[agents.a]\nvoice = "NATF2"\nprompt = "p"\n'
    )
    assert load_config(path, env={"MY_TWILIO_TOKEN": "s3cret"}).carriers["twilio"].auth_token == "s3cret"


@pytest.mark.parametrize(
    "toml, names",
    [
        ('[server]\nport = "80"\n[agents.a]\nvoice = "v"\nprompt = "p"\n', ["[server]", "port", "int"]),
        ('[server]\nhots = "x"\n[agents.a]\nvoice = "v"\nprompt = "p"\n', ["[server]", "hots"]),
        ('[agents.a]\nvoice = "v"\n', ["[agents.a]", "prompt"]),
        (
            '[agents.a]\nvoice = "v"\nprompt = "p"\n[agents.a.sampling]\ntemp_text = "hot"\n',
            ["[agents.a.sampling]", "temp_text"],
        ),
        ('[agents.a]\nvoice = "v"\nprompt = "p"\n[numbers]\n"+1555" = "b"\n', ["[numbers]", "+1555", "'b'"]),
        (
            '[server]\npublic_url = "https://gw.example.com/twilio"\n[agents.a]\nvoice = "v"\nprompt = "p"\n',
            ["[server]", "public_url"],
        ),
    ],
)
def test_config_errors_name_file_section_and_key(tmp_path: Path, toml: str, names: list[str]) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(toml)
    with pytest.raises(ConfigError) as error:
        load_config(path, env={})
    for name in [str(path), *names]:
        assert name in str(error.value)


def test_auth_token_without_public_url_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "gw.toml"
    path.write_text('[agents.a]\nvoice = "v"\nprompt = "p"\n')
    with pytest.raises(ConfigError, match=r"\[server\] public_url is required"):
        load_config(path, env={"TWILIO_AUTH_TOKEN": "x"})
