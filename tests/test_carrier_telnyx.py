"""Telnyx's carrier on its own: its dialect both ways (snake_case, call_control_id, one codec both ways),
its TeXML answer, its Ed25519 webhook signatures (tampering, wrong keys and stale timestamps refused), its
Call Control transfer against a loopback stand-in, and one call placed with
`python -m gateway.cli call --carrier telnyx` against a real gateway on loopback."""

from __future__ import annotations

import base64
import json
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlencode
from xml.etree import ElementTree

import numpy as np
import orjson
import pytest
from carrier_api import CarrierApi
from carrier_cli import cli_call, placed_call, sine, voiced_seconds, write_wav
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from engine.echo import EchoEngine
from gateway.call.events import (
    CallerAudio,
    CallStarted,
    CallStopped,
    DtmfPressed,
    MalformedMessage,
    MarkPlayed,
    MediaFormat,
    StreamConnected,
)
from gateway.carriers.base import Answering, WebhookRefused
from gateway.carriers.telnyx import (
    TelnyxCarrier,
    TelnyxPeer,
    TelnyxSettings,
    private_key_text,
    public_key_text,
    sign,
)

PUBLIC = "https://gw.example.com"
PRIVATE = Ed25519PrivateKey.generate()
CALL_SID = "v3:9X2vxPDFY2RHSJ1EdMS0RHRksMTg7ldNxdjWbVr9zBjbGjGsSe-aiQ"
CONTROL = "v3:MdI91X4lWFEs7IgbBEOT9M4AigoY08M0WWZFISt1Yw2axZ_IiE4pqg"
STREAM = "32de0dea-53cb-4b21-89a4-9e6d2f7e4c11"


def carrier(**settings: Any) -> TelnyxCarrier:
    return TelnyxCarrier(
        TelnyxSettings(public_key=public_key_text(PRIVATE), api_key="KEYtest", **settings), PUBLIC
    )


def start_message(
    encoding: str = "PCMU", rate: int = 8000, params: dict[str, Any] | None = None, **start: Any
) -> str:
    body = {
        "user_id": "3e6f995f-85f7-4705-9741-53b116d28237",
        "call_control_id": CONTROL,
        "call_session_id": "ff55a038-5a8b-11ee-8b1a-02420a0d7e68",
        "from": "+13122010094",
        "to": "+13122123456",
        "tags": ["TAG1"],
        "client_state": "aGF2ZSBhIG5pY2UgZGF5ID1d",
        "custom_parameters": {"token": "t0k", "call_id": CALL_SID} if params is None else params,
        "media_format": {"encoding": encoding, "sample_rate": rate, "channels": 1},
        **start,
    }
    return json.dumps({"event": "start", "sequence_number": "1", "stream_id": STREAM, "start": body})


def started_stream(**settings: Any) -> Any:
    stream = carrier(**settings).open_stream({}, {})
    stream.parse(start_message())
    return stream


# --- the dialect --------------------------------------------------------------------------------------


def test_a_start_keys_the_call_by_the_webhooks_call_sid_and_keeps_the_control_id() -> None:
    stream = carrier().open_stream({}, {})
    event = stream.parse(start_message())
    assert isinstance(event, CallStarted)
    assert (event.call_id, event.control_id, event.stream_id) == (CALL_SID, CONTROL, STREAM)
    assert (event.caller, event.called) == ("+13122010094", "+13122123456")
    assert event.media_format == MediaFormat("mulaw", 8000) and event.custom_parameters["token"] == "t0k"
    assert stream.stream_id == STREAM


def test_a_start_without_our_call_parameter_is_keyed_by_its_call_control_id() -> None:
    event = carrier().open_stream({}, {}).parse(start_message(params={}))
    assert isinstance(event, CallStarted) and event.call_id == event.control_id == CONTROL


def test_a_24k_l16_stream_starts_when_that_codec_is_set() -> None:
    event = carrier(codec="L16@24000").open_stream({}, {}).parse(start_message("L16", 24000))
    assert isinstance(event, CallStarted) and event.media_format == MediaFormat("l16", 24000)


def test_inbound_events_as_documented() -> None:
    stream = started_stream()
    payload = bytes(range(160))
    media = {
        "track": "inbound",
        "chunk": "2",
        "timestamp": "5",
        "payload": base64.b64encode(payload).decode(),
    }
    message = {"event": "media", "sequence_number": "4", "stream_id": STREAM, "media": media}
    assert stream.parse(json.dumps(message)) == CallerAudio(payload, 5)
    dtmf = {"event": "dtmf", "sequence_number": "5", "stream_id": STREAM, "dtmf": {"digit": "1"}}
    assert stream.parse(json.dumps(dtmf)) == DtmfPressed("1")
    mark = {"event": "mark", "sequence_number": "6", "stream_id": STREAM, "mark": {"name": "agent-2"}}
    assert stream.parse(json.dumps(mark)) == MarkPlayed("agent-2")
    assert stream.parse(json.dumps({"event": "stop", "stream_id": STREAM, "stop": {}})) == CallStopped("stop")
    assert stream.parse('{"event": "connected", "version": "1.0.0"}') == StreamConnected("", "1.0.0")
    error = {"event": "error", "stream_id": STREAM, "payload": {"code": 100003, "title": "Malformed frame"}}
    assert stream.parse(json.dumps(error)) is None  # logged; nothing for the call


def test_outbound_messages_have_exactly_the_documented_shape() -> None:
    stream = started_stream()
    payload = b"\xff" * 640
    assert [orjson.loads(m) for m in stream.audio(payload)] == [
        {"event": "media", "media": {"payload": base64.b64encode(payload).decode()}}
    ]
    assert [orjson.loads(m) for m in stream.mark("agent-1")] == [
        {"event": "mark", "stream_id": STREAM, "mark": {"name": "agent-1"}}
    ]
    assert [orjson.loads(m) for m in stream.clear()] == [{"event": "clear"}]


@pytest.mark.parametrize(
    ("message", "reason"),
    [
        (start_message("L16", 24000), "not the PCMU@8000 mono asked for"),
        (start_message("PCMA", 8000), "not the PCMU@8000"),
        (start_message(call_control_id="v3:../../etc"), "not a call control id"),
        (start_message(call_control_id=None), "call_control_id missing"),
        (start_message(params={"call_id": "a/b?c"}), "not a call id"),
        (start_message(params={"token": 7}), "custom_parameters"),
        (start_message(media_format="PCMU"), "without a 'media_format' object"),
        (json.dumps({"event": "start", "start": json.loads(start_message())["start"]}), "stream_id"),
        (b"\x00\x01", "binary frame"),
        ("{", "not JSON"),
        ("[]", "not an object"),
        ('{"event": 7}', "unknown event"),
        ('{"event": "media"}', "without a 'media' object"),
        ('{"event": "media", "media": {"payload": "***"}}', "not base64"),
        ('{"event": "media", "media": {"track": "outbound", "payload": ""}}', "not the caller's"),
        ('{"event": "media", "media": {"payload": "", "timestamp": "soon"}}', "not a number"),
        ('{"event": "dtmf", "dtmf": {"digit": "x"}}', "not a DTMF key"),
        ('{"event": "mark", "mark": {}}', "mark.name"),
    ],
)
def test_malformed_messages_raise_with_a_reason(message: str | bytes, reason: str) -> None:
    with pytest.raises(MalformedMessage, match=reason):
        carrier().open_stream({}, {}).parse(message)


# --- the answer and the signatures ---------------------------------------------------------------------


def answer_stream(telnyx: TelnyxCarrier) -> ElementTree.Element:
    body, media_type = telnyx.answer(Answering(CALL_SID), telnyx.stream_url(), "tok123")
    assert media_type == "application/xml"
    stream = ElementTree.fromstring(body).find("./Connect/Stream")
    assert stream is not None
    return stream


def test_the_answer_asks_for_a_bidirectional_rtp_stream_carrying_token_and_call_sid() -> None:
    stream = answer_stream(carrier())
    assert stream.attrib == {
        "url": "wss://gw.example.com/telnyx/media",
        "bidirectionalMode": "rtp",
        "bidirectionalCodec": "PCMU",
        "bidirectionalSamplingRate": "8000",
        "codec": "PCMU",
    }
    params = {p.get("name"): p.get("value") for p in stream.findall("Parameter")}
    assert params == {"token": "tok123", "call_id": CALL_SID}


def test_the_codec_is_a_setting() -> None:
    stream = answer_stream(carrier(codec="L16@24000"))
    assert (stream.get("bidirectionalCodec"), stream.get("bidirectionalSamplingRate")) == ("L16", "24000")
    assert stream.get("codec") is None  # Telnyx transcodes the caller's leg only between PCMU and PCMA


FORM = {"AccountSid": "f5586561", "CallSid": CALL_SID, "From": "+35319605860", "To": "+13129457420"}
BODY = urlencode(FORM).encode()


def signed(body: bytes = BODY, key: Ed25519PrivateKey = PRIVATE, at: float | None = None) -> dict[str, str]:
    timestamp = str(int(time.time() if at is None else at))
    return {"telnyx-timestamp": timestamp, "telnyx-signature-ed25519": sign(key, timestamp, body)}


def test_a_signed_webhook_is_answered() -> None:
    answering = carrier().read_answer("POST", "/telnyx/voice", "", BODY, signed())
    assert (answering.call_id, answering.caller, answering.called) == (
        CALL_SID,
        "+35319605860",
        "+13129457420",
    )
    assert answering.fields["AccountSid"] == "f5586561"


@pytest.mark.parametrize(
    "headers",
    [
        pytest.param({**signed(), "x": "tampered"}, id="tampered-body"),  # body swapped below
        pytest.param(signed(key=Ed25519PrivateKey.generate()), id="wrong-key"),
        pytest.param(signed(at=time.time() - 301), id="stale"),
        pytest.param(signed(at=time.time() + 400), id="from-the-future"),
        pytest.param({"telnyx-timestamp": str(int(time.time()))}, id="unsigned"),
        pytest.param({**signed(), "telnyx-timestamp": "soon"}, id="bad-timestamp"),
        pytest.param({**signed(), "telnyx-signature-ed25519": "not base64!"}, id="bad-signature"),
        pytest.param({**signed(), "telnyx-signature-ed25519": "AAAA"}, id="short-signature"),
    ],
)
def test_a_tampered_wrongly_signed_or_stale_webhook_is_refused(headers: dict[str, str]) -> None:
    body = BODY.replace(b"13129457420", b"19005550000") if "x" in headers else BODY
    with pytest.raises(WebhookRefused) as refused:
        carrier().read_answer("POST", "/telnyx/voice", "", body, headers)
    assert refused.value.status == 403 and refused.value.auth_failed


def test_the_tolerance_is_a_setting_and_the_key_is_checked_when_read() -> None:
    headers = signed(at=time.time() - 100)
    with pytest.raises(WebhookRefused):
        carrier(signature_tolerance_s=60).read_answer("POST", "/telnyx/voice", "", BODY, headers)
    assert carrier().read_answer("POST", "/telnyx/voice", "", BODY, headers).call_id == CALL_SID
    assert any("TELNYX_PUBLIC_KEY" in p for p in TelnyxSettings(public_key="c2hvcnQ=").problems(""))
    assert any("base64" in p for p in TelnyxSettings(public_key="***").problems(""))
    assert TelnyxSettings(public_key=public_key_text(PRIVATE)).problems("") == []


def test_without_a_public_key_nothing_is_checked() -> None:
    telnyx = TelnyxCarrier(TelnyxSettings(), None)
    assert not telnyx.authenticates and telnyx.read_answer("POST", "/telnyx/voice", "", BODY, {}).call_id


# --- call control --------------------------------------------------------------------------------------


async def test_transfer_posts_to_call_control_with_the_control_id() -> None:
    api = CarrierApi()
    try:
        telnyx = carrier(api_base=api.url)
        call = CallStarted(call_id=CALL_SID, stream_id=STREAM, control_id=CONTROL)
        await telnyx.transfer(call, "sip:agent@example.com")
    finally:
        api.close()
    [request] = api.requests
    assert (request["method"], request["path"]) == ("POST", f"/v2/calls/{CONTROL}/actions/transfer")
    assert request["headers"]["authorization"] == "Bearer KEYtest"
    assert json.loads(request["body"]) == {"to": "sip:agent@example.com"}


async def test_transfer_without_an_api_key_says_which_variable() -> None:
    telnyx = TelnyxCarrier(TelnyxSettings(), None)
    with pytest.raises(RuntimeError, match="TELNYX_API_KEY"):
        await telnyx.transfer(CallStarted(call_id=CALL_SID, stream_id=STREAM), "+15550001111")


# --- a whole call through the CLI ----------------------------------------------------------------------


def test_the_cli_places_a_signed_call_and_hears_the_agent(start_gateway, tmp_path: Path) -> None:
    table, env, secret = TelnyxPeer.conformance_setup("http://127.0.0.1:9")
    tables = {
        "telnyx": table,
        "agents": {"helper": {"voice": "demo", "prompt": "You are a helpful assistant."}},
        "numbers": {"default": "helper"},
    }
    live = start_gateway(EchoEngine(), tables=tables, env=env)
    seconds = 2.0
    caller = write_wav(tmp_path / "in.wav", sine(seconds, 8000))
    out = tmp_path / "out.wav"
    options = ["--webhook", live.base_url + "/telnyx/voice", "--auth-token", secret]
    summary = placed_call("telnyx", *options, "--input", str(caller), "--output", str(out), "--tail", "0.5")
    assert summary["handshake_status"] == 101
    assert summary["audio_received_s"] >= 0.8 * seconds
    assert summary["call_sid"].startswith("v3:")
    rate, voiced_s = voiced_seconds(out)
    assert rate == 24000 and voiced_s >= 0.8 * seconds, voiced_s


def test_a_forged_key_on_the_cli_is_refused(start_gateway, tmp_path: Path) -> None:
    table, env, _ = TelnyxPeer.conformance_setup("http://127.0.0.1:9")
    tables = {"telnyx": table, "agents": {"helper": {"voice": "demo", "prompt": "Hi."}}, "numbers": {}}
    live = start_gateway(EchoEngine(), tables=tables, env=env)
    caller = write_wav(tmp_path / "in.wav", np.zeros(1600))
    options = ["--webhook", live.base_url + "/telnyx/voice", "--auth-token", TelnyxPeer.forged_secret()]
    done = cli_call("telnyx", *options, "--input", str(caller), "--output", str(tmp_path / "out.wav"))
    assert done.returncode == 1 and "403" in done.stderr and live.engine.opened == 0
    assert private_key_text(PRIVATE) != TelnyxPeer.forged_secret()
