"""`duplexgate call` as a user meets it: one line and a non-zero exit for every bad input or refused call,
exit 0 only for a call that ran its whole input; against a real gateway on loopback."""

from __future__ import annotations

import json
import struct
import wave
from pathlib import Path

import numpy as np
import pytest

from engine.echo import EchoEngine
from gateway.cli import main


def run_call(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    status = main(["call", *args])
    out = capsys.readouterr()
    return status, out.out, out.err


@pytest.fixture
def caller_wav(tone_wav) -> Path:
    return tone_wav(440, 0.6, rate=8000)


def float_wav(path: Path) -> Path:
    samples = np.zeros(800, "<f4").tobytes()
    header = struct.pack("<IHHIIHH", 16, 3, 1, 8000, 32000, 4, 32)  # format 3: IEEE float
    path.write_bytes(b"RIFF" + struct.pack("<I", 36 + len(samples)) + b"WAVEfmt " + header + b"data")
    with path.open("ab") as fh:
        fh.write(struct.pack("<I", len(samples)) + samples)
    return path


@pytest.mark.parametrize(
    ("make_args", "says"),
    [
        (
            lambda d, wav: ["--input", str(d / "missing.wav"), "--url", "ws://127.0.0.1:9/twilio/media"],
            "no such file",
        ),
        (
            lambda d, wav: ["--input", str(d / "text.wav"), "--url", "ws://127.0.0.1:9/x"],
            "not a 16-bit PCM wav",
        ),
        (
            lambda d, wav: ["--input", str(float_wav(d / "f.wav")), "--url", "ws://127.0.0.1:9/x"],
            "unknown format: 3",
        ),
        (
            lambda d, wav: ["--input", str(wav), "--url", "http://127.0.0.1:9/twilio/media"],
            "starts with ws://",
        ),
        (
            lambda d, wav: ["--input", str(wav), "--webhook", "127.0.0.1:9/twilio/voice"],
            "starts with http://",
        ),
        (lambda d, wav: ["--input", str(wav)], "give --url, --webhook, or both"),
        (
            lambda d, wav: ["--input", str(wav), "--url", "ws://127.0.0.1:9/x", "--dtmf", "12@x"],
            "DIGIT@SECONDS",
        ),
        (
            lambda d, wav: ["--input", str(wav), "--url", "ws://127.0.0.1:9/x", "--settle", "-1"],
            "--settle -1.0: seconds cannot be negative",
        ),
    ],
)
def test_a_bad_argument_is_one_line_and_exit_2(capsys, tmp_path, caller_wav, make_args, says):
    (tmp_path / "text.wav").write_text("not audio")
    status, out, err = run_call(capsys, *make_args(tmp_path, caller_wav), "--output", str(tmp_path / "o.wav"))
    assert status == 2 and says in err
    assert err.count("\n") == 1 and out == ""


def test_an_unreachable_gateway_is_one_line_and_exit_1(capsys, tmp_path, caller_wav):
    for target in (
        ["--url", "ws://127.0.0.1:9/twilio/media"],
        ["--webhook", "http://127.0.0.1:9/twilio/voice"],
    ):
        status, _, err = run_call(
            capsys, "--input", str(caller_wav), "--output", str(tmp_path / "o.wav"), *target
        )
        assert status == 1 and err.count("\n") == 1 and "127.0.0.1:9" in err


def test_a_wrong_stream_path_is_reported_as_not_found(capsys, tmp_path, caller_wav, echo_gateway):
    url = echo_gateway.base_url.replace("http://", "ws://") + "/twilio/stream"
    status, _, err = run_call(
        capsys, "--input", str(caller_wav), "--output", str(tmp_path / "o.wav"), "--url", url
    )
    assert status == 1 and "no media stream at" in err and "HTTP 404" in err


def test_a_webhook_that_answers_404_is_one_line(capsys, tmp_path, caller_wav, echo_gateway):
    webhook = echo_gateway.base_url + "/voice"
    status, _, err = run_call(
        capsys, "--input", str(caller_wav), "--output", str(tmp_path / "o.wav"), "--webhook", webhook
    )
    assert status == 1 and "answered 404" in err and err.count("\n") == 1


def test_a_refused_call_exits_1_with_the_gateways_close_code_and_reason(
    capsys, tmp_path, caller_wav, start_gateway
):
    live = start_gateway(EchoEngine(max_sessions=0))
    output = tmp_path / "agent.wav"
    # Straight to the stream: the engine refuses when the stream opens it
    status, out, err = run_call(
        capsys, "--input", str(caller_wav), "--output", str(output), "--url", live.ws_url
    )
    assert status == 1
    assert "the gateway ended the call after" in err and "close code 1000" in err
    assert "EngineBusy: echo engine full" in err
    assert json.loads(out)["closed_by"] == "gateway"


def test_a_full_gateway_answers_the_overflow_and_the_call_exits_1(
    capsys, tmp_path, caller_wav, start_gateway
):
    live = start_gateway(EchoEngine(max_sessions=0), overflow_message="We are full, call back later.")
    status, out, err = run_call(
        capsys, "--input", str(caller_wav), "--output", str(tmp_path / "agent.wav"), "--webhook", live.webhook
    )
    assert status == 1 and out == ""
    assert "no stream: said 'We are full, call back later.' and hung up" in err


def test_a_served_call_exits_0_and_writes_what_the_caller_heard(capsys, tmp_path, caller_wav, echo_gateway):
    output = tmp_path / "agent.wav"
    status, out, err = run_call(
        capsys,
        "--input",
        str(caller_wav),
        "--output",
        str(output),
        "--webhook",
        echo_gateway.webhook,
        "--tail",
        "0.2",
    )
    assert status == 0, err
    summary = json.loads(out)
    assert summary["closed_by"] == "carrier" and summary["audio_received_s"] >= 0.8 * 0.6
    with wave.open(str(output)) as wav:
        assert wav.getframerate() == 24000 and wav.getnframes() >= 0.6 * 24000


def test_a_settling_caller_hears_the_answer_to_every_frame(
    capsys, tmp_path, caller_wav, start_gateway, engine
):
    """With --settle the caller stays on the line after its audio until the real engine has answered every
    whole 80 ms frame it sent (hanging up as its audio ends, it would leave the last ones unheard)."""
    live = start_gateway(engine)
    status, out, err = run_call(
        capsys,
        *("--input", str(caller_wav), "--output", str(tmp_path / "o.wav"), "--webhook", live.webhook),
        *("--tail", "0.2", "--settle", "5"),
    )
    assert status == 0, err
    summary = json.loads(out)
    assert summary["closed_by"] == "carrier"
    assert round(summary["audio_received_s"] / 0.08) == summary["media_sent"] * 20 // 80, summary
