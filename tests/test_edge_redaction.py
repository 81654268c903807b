"""What the gateway writes to its logs and reprs: no secret, no caller number in full at INFO unless the
operator asks, no request URL from the HTTP client, and a peer sending junk cannot flood the log."""

from __future__ import annotations

import json
import logging

import pytest
from callaudio import speech_like
from conftest import TEST_AUTH_TOKEN, gateway_config

from gateway.call.incoming import masked_number
from gateway.cli import main
from gateway.simulator.call import simulate_call

CALLER = "+15550001111"


def test_a_number_is_masked_to_its_ends() -> None:
    assert masked_number(CALLER) == "+1********11"
    assert masked_number(None) == "-" and masked_number("123") == "***"


async def test_a_webhook_call_logs_no_caller_number_in_full(echo_gateway, caplog) -> None:
    caplog.set_level(logging.INFO)
    await simulate_call(None, speech_like(0.3), webhook=echo_gateway.webhook, caller=CALLER, tail_s=0)
    lines = [record.getMessage() for record in caplog.records]
    assert any("+1********11" in line for line in lines)
    assert not any(CALLER in line for line in lines)


async def test_full_numbers_are_logged_when_the_operator_asks(start_gateway, caplog) -> None:
    from engine.echo import EchoEngine

    live = start_gateway(EchoEngine(), log_numbers=True)
    caplog.set_level(logging.INFO)
    await simulate_call(None, speech_like(0.3), webhook=live.webhook, caller=CALLER, tail_s=0)
    assert any(CALLER in record.getMessage() for record in caplog.records)


def test_secrets_stay_out_of_the_configs_repr() -> None:
    config = gateway_config(
        "https://gw.example.com",
        auth_token=TEST_AUTH_TOKEN,
        tables={"webhooks": {"url": "https://crm.example.com/hooks"}},
        env={"DUPLEXGATE_WEBHOOK_SECRET": "webhook-secret-0123456789"},
    )
    assert config.carriers["twilio"].auth_token == TEST_AUTH_TOKEN  # held, but never shown
    assert TEST_AUTH_TOKEN not in repr(config) and "webhook-secret-0123456789" not in repr(config)


def test_the_http_client_does_not_log_request_urls(tmp_path, capsys) -> None:
    main(
        ["call", "--input", str(tmp_path / "missing.wav"), "--url", "ws://127.0.0.1:9/x", "--output", "o.wav"]
    )
    for name in ("httpx", "httpcore"):
        assert not logging.getLogger(name).isEnabledFor(logging.INFO)


async def test_a_stream_of_junk_is_logged_at_most_about_once_a_second(echo_gateway, caplog) -> None:
    caplog.set_level(logging.WARNING, logger="gateway.edge.stream")
    junk = [(0.05 + i * 0.001, json.dumps({"event": "media", "media": {"payload": "!"}})) for i in range(500)]
    summary = await simulate_call(echo_gateway.ws_url, speech_like(1.2), inject=junk)
    assert summary.closed_by == "carrier"  # the call went on
    warnings = [r for r in caplog.records if "dropped malformed message" in r.getMessage()]
    assert 1 <= len(warnings) <= 3
    assert any("more since the last warning" in r.getMessage() for r in warnings[1:]) or len(warnings) == 1


@pytest.mark.parametrize("number", ["+442071838750", "sip:alice@example.com"])
def test_masking_keeps_the_shape_not_the_number(number: str) -> None:
    masked = masked_number(number)
    assert len(masked) == len(number) and masked[:2] == number[:2] and number[2:-2] not in masked
