"""Twilio dialect: inbound messages as Twilio documents them, exact outbound shapes, request signatures
(the test vector from Twilio's security docs and the wss/trailing-slash/port variants) and TwiML."""

from __future__ import annotations

import base64
import json
from xml.etree import ElementTree

import pytest

from gateway.call.events import (
    CallerAudio,
    CallStarted,
    CallStopped,
    ClearAudio,
    DtmfPressed,
    EndStream,
    MalformedMessage,
    MarkPlayed,
    MediaFormat,
    PlaceMark,
    PlayAudio,
    StreamConnected,
)
from gateway.carriers.twilio import (
    TwilioCarrier,
    TwilioSettings,
    TwilioStream,
    compute_signature,
    connect_stream_twiml,
    signed_url_variants,
)

TOKEN = "12345"
PUBLIC = "https://gw.example.com"
STREAM_SID = "MZ18ad3ab5a668481ce02b83e7395059f0"
CALL_SID = "CA" + "1" * 32
ACCOUNT_SID = "AC" + "2" * 32


@pytest.fixture
def twilio() -> TwilioStream:
    stream = TwilioStream({}, {})
    stream.stream_id = STREAM_SID
    return stream


def TwilioDialect(token: str | None = None, public: str | None = None) -> TwilioCarrier:  # noqa: N802
    """The carrier with this auth token and public URL."""
    return TwilioCarrier(TwilioSettings(auth_token=token), public)


def _msg(**fields: object) -> str:
    return json.dumps(fields)


# --- inbound -----------------------------------------------------------------------------------------


def test_connected_becomes_stream_connected(twilio: TwilioStream) -> None:
    event = twilio.parse(_msg(event="connected", protocol="Call", version="1.0.0"))
    assert event == StreamConnected(protocol="Call", version="1.0.0")


def test_start_carries_call_stream_parameters_and_format(twilio: TwilioStream) -> None:
    start = {
        "accountSid": "AC" + "0" * 32,
        "streamSid": STREAM_SID,
        "callSid": "CA" + "1" * 32,
        "tracks": ["inbound"],
        "customParameters": {"token": "abc", "lang": "fr"},
        "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1},
    }
    event = twilio.parse(_msg(event="start", sequenceNumber="1", start=start, streamSid=STREAM_SID))
    assert isinstance(event, CallStarted)
    assert (event.call_id, event.stream_id) == ("CA" + "1" * 32, STREAM_SID)
    assert dict(event.custom_parameters) == {"token": "abc", "lang": "fr"}
    assert event.media_format == MediaFormat("mulaw", 8000, 1)


def test_start_with_uuid_stream_sid_is_accepted(twilio: TwilioStream) -> None:
    # The 2020 capture in twilio/media-streams shows a UUID streamSid: no strict format check.
    sid = "b1b7f5c4-6d8e-4c34-9b7a-0d7f6e5d4c3b"
    start = {
        "streamSid": sid,
        "callSid": CALL_SID,
        "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000},
    }
    event = twilio.parse(_msg(event="start", sequenceNumber="1", start=start, streamSid=sid))
    assert isinstance(event, CallStarted) and event.stream_id == sid


def test_media_decodes_payload_and_string_timestamp(twilio: TwilioStream) -> None:
    payload = bytes(range(160))
    media = {
        "track": "inbound",
        "chunk": "1",
        "timestamp": "52",
        "payload": base64.b64encode(payload).decode(),
    }
    event = twilio.parse(_msg(event="media", sequenceNumber="2", media=media, streamSid=STREAM_SID))
    assert event == CallerAudio(payload=payload, timestamp_ms=52)


def test_dtmf_mark_and_stop_become_their_events(twilio: TwilioStream) -> None:
    dtmf = _msg(
        event="dtmf", streamSid=STREAM_SID, sequenceNumber="5", dtmf={"track": "inbound_track", "digit": "#"}
    )
    mark = _msg(event="mark", sequenceNumber="4", streamSid=STREAM_SID, mark={"name": "agent-7"})
    stop = _msg(
        event="stop",
        sequenceNumber="9",
        stop={"accountSid": ACCOUNT_SID, "callSid": CALL_SID},
        streamSid=STREAM_SID,
    )
    assert twilio.parse(dtmf) == DtmfPressed("#")
    assert twilio.parse(mark) == MarkPlayed("agent-7")
    assert twilio.parse(stop) == CallStopped("stop")


@pytest.mark.parametrize(
    "message, complaint",
    [
        ("{not json", "not JSON"),
        ('["media"]', "not an object"),
        (_msg(event="hangup", streamSid=STREAM_SID), "unknown event"),
        (_msg(event="media", sequenceNumber="2", streamSid=STREAM_SID), "'media' object"),
        (_msg(event="media", media={"track": "inbound"}, streamSid=STREAM_SID), "media.payload"),
        (_msg(event="media", media={"payload": "***"}, streamSid=STREAM_SID), "not base64"),
        (_msg(event="media", media={"track": "outbound", "payload": ""}, streamSid=STREAM_SID), "track"),
        (_msg(event="mark", mark={}, streamSid=STREAM_SID), "mark.name"),
        (_msg(event="dtmf", dtmf={"digit": "x"}, streamSid=STREAM_SID), "not a DTMF key"),
        (_msg(event="start", start={"streamSid": STREAM_SID}), "callSid"),
        (
            _msg(
                event="start", start={"callSid": CALL_SID, "streamSid": "MZ1", "customParameters": {"a": 1}}
            ),
            "flat",
        ),
        (
            _msg(
                event="start",
                start={"callSid": CALL_SID, "streamSid": "MZ1", "mediaFormat": {"encoding": "pcm"}},
            ),
            "x-mulaw",
        ),
    ],
)
def test_malformed_message_raises_with_reason(twilio: TwilioStream, message: str, complaint: str) -> None:
    with pytest.raises(MalformedMessage, match=complaint):
        twilio.parse(message)


def test_binary_frame_is_malformed(twilio: TwilioStream) -> None:
    with pytest.raises(MalformedMessage, match="binary"):
        twilio.parse(b'{"event": "media"}')


# --- outbound ----------------------------------------------------------------------------------------


def test_outbound_media_has_exactly_the_documented_fields(twilio: TwilioStream) -> None:
    payload = bytes([0xFF]) * 640
    message = json.loads(twilio.render(PlayAudio(payload))[0])
    assert message == {
        "event": "media",
        "streamSid": STREAM_SID,
        "media": {"payload": base64.b64encode(payload).decode()},
    }


def test_outbound_mark_has_exactly_the_documented_fields(twilio: TwilioStream) -> None:
    message = json.loads(twilio.render(PlaceMark("agent-3"))[0])
    assert message == {"event": "mark", "streamSid": STREAM_SID, "mark": {"name": "agent-3"}}


def test_outbound_clear_has_exactly_the_documented_fields(twilio: TwilioStream) -> None:
    assert json.loads(twilio.render(ClearAudio())[0]) == {"event": "clear", "streamSid": STREAM_SID}


def test_end_stream_has_no_wire_message(twilio: TwilioStream) -> None:
    assert list(twilio.render(EndStream("bye"))) == []


# --- signatures --------------------------------------------------------------------------------------


def test_signature_matches_twilio_documented_vector() -> None:
    params = {
        "CallSid": "CA1234567890ABCDE",
        "Caller": "+14158675310",
        "Digits": "1234",
        "From": "+14158675310",
        "To": "+18005551212",
    }
    url = "https://example.com/myapp.php?foo=1&bar=2"
    assert compute_signature(TOKEN, url, params.items()) == "L/OH5YylLD5NRKLltdqwSvS0BnU="


def test_upgrade_signed_over_public_wss_url_is_accepted() -> None:
    twilio = TwilioDialect(TOKEN, PUBLIC)
    signature = compute_signature(TOKEN, "wss://gw.example.com/twilio/media")
    assert twilio.verify_upgrade("/twilio/media", {}, {"x-twilio-signature": signature})


def test_upgrade_signed_with_trailing_slash_is_accepted() -> None:
    twilio = TwilioDialect(TOKEN, PUBLIC)
    signature = compute_signature(TOKEN, "wss://gw.example.com/twilio/media/")
    assert twilio.verify_upgrade("/twilio/media", {}, {"x-twilio-signature": signature})


def test_upgrade_signed_with_explicit_port_is_accepted() -> None:
    twilio = TwilioDialect(TOKEN, PUBLIC)
    signature = compute_signature(TOKEN, "wss://gw.example.com:443/twilio/media")
    assert twilio.verify_upgrade("/twilio/media", {}, {"x-twilio-signature": signature})


def test_upgrade_signed_over_internal_ws_url_is_refused() -> None:
    # What a server behind a TLS proxy would reconstruct from the request: not what Twilio signed.
    twilio = TwilioDialect(TOKEN, PUBLIC)
    signature = compute_signature(TOKEN, "ws://10.0.0.5:8080/twilio/media")
    assert not twilio.verify_upgrade("/twilio/media", {}, {"x-twilio-signature": signature})


def test_upgrade_signed_with_another_token_is_refused() -> None:
    twilio = TwilioDialect(TOKEN, PUBLIC)
    signature = compute_signature("54321", "wss://gw.example.com/twilio/media")
    assert not twilio.verify_upgrade("/twilio/media", {}, {"x-twilio-signature": signature})


def test_upgrade_without_signature_is_refused_when_token_configured() -> None:
    assert not TwilioDialect(TOKEN, PUBLIC).verify_upgrade("/twilio/media", {}, {})


def test_upgrade_is_not_checked_without_token() -> None:
    assert TwilioDialect(None, PUBLIC).verify_upgrade("/twilio/media", {}, {})


def test_webhook_signature_covers_form_fields() -> None:
    twilio = TwilioDialect(TOKEN, PUBLIC)
    form = [("CallSid", "CA1"), ("From", "+15550001111"), ("To", "+15550002222")]
    signature = compute_signature(TOKEN, "https://gw.example.com/twilio/voice", form)
    assert twilio.verify_webhook("/twilio/voice", "", form, {"x-twilio-signature": signature})
    tampered = [("CallSid", "CA1"), ("From", "+15550009999"), ("To", "+15550002222")]
    assert not twilio.verify_webhook("/twilio/voice", "", tampered, {"x-twilio-signature": signature})


def test_repeated_form_names_are_signed_like_twilios_validator() -> None:
    # twilio-python's RequestValidator (2024+) signs every value of a repeated name, values sorted, none
    # dropped: a repeated pair counts twice, and a pair added to a signed form breaks the signature.
    import hashlib
    import hmac

    form = [("To", "+15550002222"), ("Tag", "b"), ("Tag", "a"), ("Tag", "b")]
    signed = "https://gw.example.com/twilio/voice" + "Taga" + "Tagb" + "Tagb" + "To+15550002222"
    expected = base64.b64encode(hmac.new(TOKEN.encode(), signed.encode(), hashlib.sha1).digest()).decode()
    assert compute_signature(TOKEN, "https://gw.example.com/twilio/voice", form) == expected
    twilio = TwilioDialect(TOKEN, PUBLIC)
    assert twilio.verify_webhook("/twilio/voice", "", form, {"x-twilio-signature": expected})
    assert not twilio.verify_webhook("/twilio/voice", "", form[:-1], {"x-twilio-signature": expected})


def test_url_variants_cover_port_and_trailing_slash() -> None:
    assert set(signed_url_variants("wss://gw.example.com/twilio/media")) == {
        "wss://gw.example.com/twilio/media",
        "wss://gw.example.com/twilio/media/",
        "wss://gw.example.com:443/twilio/media",
        "wss://gw.example.com:443/twilio/media/",
    }


def test_token_without_public_url_is_refused() -> None:
    with pytest.raises(ValueError, match="public URL"):
        TwilioDialect(TOKEN, None)


# --- TwiML -------------------------------------------------------------------------------------------


def test_twiml_connects_stream_with_escaped_parameter() -> None:
    value = "a&b<c>\"d'"
    twiml = connect_stream_twiml("wss://gw.example.com/twilio/media", {"token": value})
    root = ElementTree.fromstring(twiml)
    stream = root.find("./Connect/Stream")
    assert root.tag == "Response" and stream is not None
    assert stream.get("url") == "wss://gw.example.com/twilio/media"
    assert [(p.get("name"), p.get("value")) for p in stream.findall("Parameter")] == [("token", value)]


def test_twiml_refuses_stream_url_with_query_string() -> None:
    with pytest.raises(ValueError, match="query string"):
        connect_stream_twiml("wss://gw.example.com/twilio/media?token=abc")


def test_stream_url_turns_public_https_into_wss() -> None:
    assert TwilioDialect(TOKEN, PUBLIC + "/").stream_url() == "wss://gw.example.com/twilio/media"


@pytest.mark.parametrize(
    ("start", "named"),
    [
        ({"callSid": "CA1", "streamSid": STREAM_SID}, "callSid"),
        ({"callSid": "CA" + "1" * 31 + "*", "streamSid": STREAM_SID}, "callSid"),
        ({"callSid": "live:CA" + "1" * 32, "streamSid": STREAM_SID}, "callSid"),
        ({"callSid": CALL_SID, "streamSid": "MZ1 OR 1=1"}, "streamSid"),
        ({"callSid": CALL_SID, "streamSid": STREAM_SID, "accountSid": "AC-someone-else"}, "accountSid"),
    ],
)
def test_a_start_whose_sids_are_not_twilios_shapes_is_malformed(
    twilio: TwilioStream, start: dict, named: str
) -> None:
    with pytest.raises(MalformedMessage, match=named):
        twilio.parse(_msg(event="start", sequenceNumber="1", start=start, streamSid=STREAM_SID))


@pytest.mark.parametrize(
    "start",
    [
        {"callSid": CALL_SID, "streamSid": STREAM_SID, "mediaFormat": {"encoding": ["audio/x-mulaw"]}},
        {"callSid": CALL_SID, "streamSid": STREAM_SID, "mediaFormat": {"encoding": {"a": 1}}},
    ],
)
def test_a_start_with_an_unhashable_encoding_is_malformed_not_a_crash(
    twilio: TwilioStream, start: dict
) -> None:
    with pytest.raises(MalformedMessage):
        twilio.parse(_msg(event="start", sequenceNumber="1", start=start, streamSid=STREAM_SID))
