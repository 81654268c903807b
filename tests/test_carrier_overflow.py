"""The answer when no agent is free (`Carrier.overflow`) on every carrier: markup that parses, speaks the
message (escaped) and hangs up or transfers, or None where the carrier's answer cannot say it; and each
simulated carrier, served that answer (or a 503) by a loopback HTTP server, raising AnsweredWithoutStream
with what the call did, which `duplexgate call` prints as its one line."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from xml.etree import ElementTree

import httpx
import orjson
import pytest

from gateway.carriers import registry
from gateway.carriers.base import AnsweredWithoutStream, Answering, Carrier
from gateway.cli import main
from gateway.config import parse_config

CARRIERS = sorted(registry())
NO_MARKUP = {"exotel", "asterisk"}  # the Voicebot URL names only a stream; Asterisk has no answer webhook
OVERFLOWING = [name for name in CARRIERS if name not in NO_MARKUP]
WEBHOOKS = [name for name in CARRIERS if registry()[name].peer.has_webhook]
MESSAGE = 'All our agents are busy <right now> & "soon" isn\'t likely'
NUMBER = "+15550003333"
PUBLIC_URL = "https://gw.example.com"
CALL = Answering("CA" + "1" * 32, "+15550001111", "+15550002222")


def carrier(name: str) -> Carrier:
    """Carrier `name` as a gateway with its signatures on builds it from its config section."""
    kind = registry()[name]
    table, env, _ = kind.peer.conformance_setup("http://127.0.0.1:9")
    raw = {
        "server": {"public_url": PUBLIC_URL},
        name: table,
        "agents": {"helper": {"voice": "demo", "prompt": "You are a helpful assistant."}},
    }
    config = parse_config(raw, source="test", env=env)
    return kind(config.carriers[name], PUBLIC_URL)


def bare(number: str) -> str:
    return number.removeprefix("+")  # Plivo and Vonage write E.164 without its '+'


def read_markup(body: str, media_type: str) -> tuple[str, list[str], list[str]]:
    """(what is said, the verbs in order, the numbers dialled) of an XML answer or an NCCO."""
    if media_type == "application/json":
        ncco = orjson.loads(body)
        said = " ".join(action["text"] for action in ncco if action["action"] == "talk")
        dialled = [
            endpoint["number"]
            for action in ncco
            if action["action"] == "connect"
            for endpoint in action["endpoint"]
            if endpoint["type"] == "phone"
        ]
        return said, [action["action"] for action in ncco], dialled
    assert media_type == "application/xml"
    root = ElementTree.fromstring(body)
    assert root.tag == "Response"
    said = " ".join(verb.text or "" for verb in root if verb.tag in ("Say", "Speak"))
    dialled = [noun.text or "" for dial in root.findall("Dial") for noun in dial if noun.tag == "Number"]
    return said, [verb.tag for verb in root], dialled


@pytest.mark.parametrize("name", OVERFLOWING)
def test_the_busy_answer_speaks_the_escaped_message_and_hangs_up(name: str) -> None:
    answer = carrier(name).overflow(CALL, MESSAGE, None)
    assert answer is not None
    body, media_type = answer
    said, verbs, dialled = read_markup(body, media_type)
    assert said == MESSAGE and dialled == []
    if media_type == "application/xml":
        assert "&lt;right now&gt; &amp;" in body  # escaped, not raw markup
        assert verbs in (["Say", "Hangup"], ["Speak", "Hangup"])
    else:  # an NCCO: the call ends with its last action
        assert verbs == ["talk"]


@pytest.mark.parametrize("name", OVERFLOWING)
def test_the_transfer_answer_speaks_then_dials_the_number(name: str) -> None:
    answer = carrier(name).overflow(CALL, MESSAGE, NUMBER)
    assert answer is not None
    said, verbs, dialled = read_markup(*answer)
    assert said == MESSAGE and [bare(number) for number in dialled] == [bare(NUMBER)]
    assert verbs in (["Say", "Dial"], ["Speak", "Dial"], ["talk", "connect"])
    if name in ("plivo", "vonage"):
        assert dialled == [bare(NUMBER)]


@pytest.mark.parametrize("name", OVERFLOWING)
def test_with_no_message_nothing_is_said(name: str) -> None:
    answer = carrier(name).overflow(CALL, "", NUMBER)
    assert answer is not None
    said, verbs, _ = read_markup(*answer)
    assert said == "" and verbs in (["Dial"], ["connect"])
    silent_hangup = carrier(name).overflow(CALL, "  ", None)
    if name == "vonage":  # an NCCO must hold an action: Vonage cannot hang up in silence
        assert silent_hangup is None
    else:
        assert silent_hangup is not None and read_markup(*silent_hangup)[1] == ["Hangup"]


@pytest.mark.parametrize("name", sorted(NO_MARKUP))
def test_a_carrier_whose_answer_cannot_say_it_gives_none(name: str) -> None:
    assert carrier(name).overflow(CALL, MESSAGE, None) is None
    assert carrier(name).overflow(CALL, MESSAGE, NUMBER) is None


def test_control_characters_never_reach_the_xml() -> None:
    body, _ = carrier("twilio").overflow(CALL, "busy\x00\x07 now", None)  # type: ignore[misc]
    assert read_markup(body, "application/xml")[0] == "busy now"


# --- the simulated carrier reading the answer ---------------------------------------------------------


class _Answers(BaseHTTPRequestHandler):
    """Answers every GET or POST with the server's `reply`: (status, body, media type), set by `serve`."""

    def _answer(self) -> None:
        self.rfile.read(int(self.headers.get("content-length") or 0))
        status, body, media_type = self.server.reply  # type: ignore[attr-defined]
        data = body.encode()
        self.send_response(status)
        self.send_header("Content-Type", media_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_POST = _answer

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def webhook_server() -> Iterator[ThreadingHTTPServer]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Answers)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def serve(server: ThreadingHTTPServer, status: int, body: str, media_type: str) -> str:
    server.reply = (status, body, media_type)  # type: ignore[attr-defined]
    return f"http://127.0.0.1:{server.server_address[1]}/voice"


async def answer(name: str, webhook: str) -> None:
    kind = registry()[name]
    secret = kind.peer.conformance_setup("http://127.0.0.1:9")[2]
    peer = kind.peer(None, "+15550001111", "+15550002222", secret)
    async with httpx.AsyncClient(timeout=5) as client:
        await peer.answer(client, webhook)


@pytest.mark.parametrize("transfer_to", [None, NUMBER])
@pytest.mark.parametrize("name", OVERFLOWING)
async def test_each_carrier_reads_the_overflow_answer_as_no_stream(
    webhook_server: ThreadingHTTPServer, name: str, transfer_to: str | None
) -> None:
    markup = carrier(name).overflow(CALL, MESSAGE, transfer_to)
    assert markup is not None
    webhook = serve(webhook_server, 200, *markup)
    with pytest.raises(AnsweredWithoutStream) as raised:
        await answer(name, webhook)
    said = str(raised.value)
    assert said.startswith(f"said '{MESSAGE}' and ")
    done = said.removeprefix(f"said '{MESSAGE}' and ")
    assert done in (
        (f"transferred to {NUMBER}", f"transferred to {bare(NUMBER)}") if transfer_to else ("hung up",)
    )


@pytest.mark.parametrize("name", WEBHOOKS)
async def test_each_carrier_reads_a_503_as_no_stream(webhook_server: ThreadingHTTPServer, name: str) -> None:
    webhook = serve(webhook_server, 503, "no agent is free", "text/plain")
    with pytest.raises(AnsweredWithoutStream, match="the gateway answered 503: no agent is free"):
        await answer(name, webhook)


async def test_a_message_of_several_lines_is_described_on_one_line(
    webhook_server: ThreadingHTTPServer,
) -> None:
    markup = carrier("twilio").overflow(CALL, "All busy.\nPlease call\r\n again.", None)
    assert markup is not None
    with pytest.raises(AnsweredWithoutStream, match="^said 'All busy. Please call again.' and hung up$"):
        await answer("twilio", serve(webhook_server, 200, *markup))
    with pytest.raises(AnsweredWithoutStream, match="^the gateway answered 503: busy now$"):
        await answer("twilio", serve(webhook_server, 503, "busy\n now\n", "text/plain"))


@pytest.mark.parametrize(
    ("status", "body"), [(404, "Not Found"), (200, "<Response><Pause/></Response>"), (200, "[]")]
)
@pytest.mark.parametrize("name", WEBHOOKS)
async def test_other_answers_without_a_stream_stay_plain_errors(
    webhook_server: ThreadingHTTPServer, name: str, status: int, body: str
) -> None:
    webhook = serve(webhook_server, status, body, "application/xml")
    with pytest.raises(RuntimeError) as raised:
        await answer(name, webhook)
    assert not isinstance(raised.value, AnsweredWithoutStream)


@pytest.mark.parametrize(
    ("name", "transfer_to", "says"),
    [
        ("twilio", None, f"said '{MESSAGE}' and hung up"),
        ("plivo", NUMBER, f"said '{MESSAGE}' and transferred to {bare(NUMBER)}"),
        ("vonage", NUMBER, f"said '{MESSAGE}' and transferred to {bare(NUMBER)}"),
        ("exotel", None, "the gateway answered 503: no agent is free"),
    ],
    ids=["twilio-hangup", "plivo-transfer", "vonage-transfer", "exotel-503"],
)
def test_duplexgate_call_says_no_stream_in_one_line_and_exits_1(
    capsys: pytest.CaptureFixture[str],
    tmp_path,
    tone_wav,
    webhook_server: ThreadingHTTPServer,
    name: str,
    transfer_to: str | None,
    says: str,
) -> None:
    markup = carrier(name).overflow(CALL, MESSAGE, transfer_to)
    reply = (200, *markup) if markup else (503, "no agent is free", "text/plain")
    webhook = serve(webhook_server, *reply)
    wav = tone_wav(440, 0.2, rate=8000)
    args = ["call", "--carrier", name, "--webhook", webhook, "--input", str(wav)]
    status = main([*args, "--output", str(tmp_path / "heard.wav")])
    out = capsys.readouterr()
    assert status == 1 and out.out == ""
    assert out.err == f"duplexgate call: no stream: {says}\n"
    assert not (tmp_path / "heard.wav").exists()
