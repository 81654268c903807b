"""Helpers shared by the carriers whose control messages are JSON text: reading one message into an
object (MalformedMessage saying what is wrong), its sections, strings, base64 payloads and DTMF keys, and
on the simulated carrier's side the same readings of what the gateway sends (Violation saying what is
wrong). Each takes the words its carrier's messages use, so every carrier's errors read as they always did.

Also the XML answer markup that TwiML, cXML, TeXML and Plivo XML share (a `<Response>` of verbs, the
spoken verb named by the carrier: Say or Speak), and the simulated carrier's reading of an answer that
brings no stream (the gateway's overflow, or a 503) as AnsweredWithoutStream.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar
from xml.etree import ElementTree

import httpx
import orjson

from gateway.call.events import MalformedMessage
from gateway.carriers.base import AnsweredWithoutStream, Outbound, Violation

DTMF_DIGITS = frozenset("0123456789*#ABCD")
# Characters XML 1.0 cannot carry even escaped: ElementTree would write them and the carrier refuse the page.
_NOT_XML = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]")

T = TypeVar("T")

# --- the gateway's side ---------------------------------------------------------------------------


def guarded(parse: Callable[[str | bytes], T], message: str | bytes) -> T:
    """`parse(message)`, with an error from a shape no check foresaw turned into MalformedMessage."""
    try:
        return parse(message)
    except MalformedMessage:
        raise
    except (TypeError, ValueError, KeyError, AttributeError) as exc:  # a shape no check foresaw: junk
        raise MalformedMessage(f"unreadable message ({type(exc).__name__}: {exc})") from None


def json_object(raw: str | bytes) -> dict[str, Any]:
    """`raw` as a JSON object; MalformedMessage when it is not JSON or not an object."""
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise MalformedMessage(f"not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise MalformedMessage("JSON is not an object")
    return data


def text_object(message: str | bytes, streams: str) -> dict[str, Any]:
    """A text frame as a JSON object; a binary frame is refused, saying `streams` are JSON text only."""
    if not isinstance(message, str):
        raise MalformedMessage(f"binary frame ({streams} are JSON text only)")
    return json_object(message)


def section(data: dict[str, Any], key: str, event: str | None = None) -> dict[str, Any]:
    """`data[key]` as an object, else MalformedMessage naming the message's event (`event` if it has none)."""
    value = data.get(key)
    if not isinstance(value, dict):
        raise MalformedMessage(f"{data.get('event', event)} message without a '{key}' object")
    return value


def text(part: dict[str, Any], where: str, key: str) -> str:
    """`part[key]` as a string, else MalformedMessage naming it as `where`."""
    value = part.get(key)
    if not isinstance(value, str):
        raise MalformedMessage(f"{where} missing or not a string")
    return value


def optional_text(part: dict[str, Any], key: str, limit: int | None = None) -> str | None:
    """`part[key]` when it is a non-empty string (cut to `limit` characters), else None."""
    value = part.get(key)
    return value[:limit] if isinstance(value, str) and value else None


def media_payload(media: dict[str, Any]) -> bytes:
    """`media.payload` decoded from base64; MalformedMessage when missing, not a string or not base64."""
    try:
        return base64.b64decode(text(media, "media.payload", "payload"), validate=True)
    except binascii.Error as exc:
        raise MalformedMessage(f"media.payload is not base64: {exc}") from None


def timestamp_ms(media: dict[str, Any], clip: int | None = None) -> int | None:
    """`media.timestamp` as an int (None when absent); MalformedMessage quoting it (cut to `clip`) if not."""
    timestamp = media.get("timestamp")
    try:
        return int(timestamp) if timestamp is not None else None
    except (TypeError, ValueError):
        shown = timestamp if clip is None else str(timestamp)[:clip]
        raise MalformedMessage(f"media.timestamp {shown!r} is not a number") from None


def dtmf_digit(digit: object, where: str, clip: int | None = None) -> str:
    """`digit` when it is one DTMF key; else MalformedMessage quoting it (cut to `clip`) as `where`."""
    if not isinstance(digit, str) or digit not in DTMF_DIGITS:
        shown = digit if clip is None else str(digit)[:clip]
        raise MalformedMessage(f"{where} {shown!r} is not a DTMF key")
    return digit


def compact(value: Any) -> str:
    """`value` as compact JSON text."""
    # orjson: about a fifth of the per-message cost of the codec path (bench/codec.py)
    return orjson.dumps(value).decode()


def b64(payload: bytes) -> str:
    """`payload` as base64 text."""
    return base64.b64encode(payload).decode("ascii")


# --- XML answer markup ------------------------------------------------------------------------------


def xml_document(root: ElementTree.Element) -> str:
    """`root` as an XML answer page (ElementTree escapes text and attributes)."""
    return '<?xml version="1.0" encoding="UTF-8"?>' + ElementTree.tostring(root, encoding="unicode")


def spoken(message: str, say: str) -> ElementTree.Element:
    """A `<Response>` that first speaks `message` with the verb `say` (Say, Speak); empty when it is."""
    response = ElementTree.Element("Response")
    text = _NOT_XML.sub("", message).strip()
    if text:
        ElementTree.SubElement(response, say).text = text
    return response


def hangup_markup(message: str, say: str) -> str:
    """The answer that speaks `message` (when not empty) with the verb `say`, then `<Hangup/>`."""
    response = spoken(message, say)
    ElementTree.SubElement(response, "Hangup")
    return xml_document(response)


# --- the carrier's side, for the simulator ----------------------------------------------------------


def answer_text(response: httpx.Response, what: str) -> str:
    """The body of a voice webhook's 200 answer; AnsweredWithoutStream for a 503 (no agent free and no
    overflow the carrier's markup can say), RuntimeError naming `what` for any other status."""
    if response.status_code == 503:
        raise AnsweredWithoutStream(f"the gateway answered 503: {one_line(response.text[:200])}")
    if response.status_code != 200:
        raise RuntimeError(f"{what} answered {response.status_code}: {response.text[:200]}")
    return response.text


def overflow_words(said: str, transferred_to: Sequence[str]) -> str:
    """An overflow answer in words: "said '...' and hung up", "transferred to +1555...", ..."""
    done = f"transferred to {', '.join(transferred_to)}" if transferred_to else "hung up"
    return f"said '{one_line(said)}' and {done}" if said.strip() else done


def one_line(text: str) -> str:
    """`text` with each run of whitespace (newlines too) as one space: `duplexgate call` prints one line."""
    return " ".join(text.split())


def raise_on_overflow(root: ElementTree.Element, say: str) -> None:
    """Raise AnsweredWithoutStream when `root`, an XML answer with no stream, dials or hangs up (after
    speaking with the verb `say`, maybe); return for anything else (the caller says what is wrong)."""
    if root.tag != "Response":
        return
    said = " ".join((verb.text or "").strip() for verb in root.findall(say)).strip()
    dial = root.find("Dial")
    if dial is not None:
        targets = [(noun.text or "").strip() for noun in dial] or [(dial.text or "").strip()]
        targets = [target for target in targets if target] or ["no one (an empty <Dial>)"]
        raise AnsweredWithoutStream(overflow_words(said, targets))
    if root.find("Hangup") is not None:
        raise AnsweredWithoutStream(overflow_words(said, []))


def sent_json(raw: str) -> Any:
    """A gateway -> carrier text frame's JSON value; Violation when it is not JSON."""
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise Violation(f"not JSON: {raw[:80]!r}") from None


def sent_text(message: str | bytes, binary: str) -> Any:
    """A gateway -> carrier frame's JSON value; Violation for a binary frame (`binary`: why) or no JSON."""
    if not isinstance(message, str):
        raise Violation(f"binary frame ({binary})")
    return sent_json(message)


def sent_object(message: str | bytes, binary: str) -> dict[str, Any]:
    """A gateway -> carrier frame as a JSON object; Violation as `sent_text`, or when it is no object."""
    data = sent_text(message, binary)
    if not isinstance(data, dict):
        raise Violation("JSON is not an object")
    return data


def sent_event(data: dict[str, Any], keys: Mapping[str, set[str]], id_key: str, stream_id: str) -> str:
    """The event of a gateway -> carrier message with exactly its event's `keys` and this stream's id."""
    event = data.get("event")
    fields = keys.get(event)  # type: ignore[arg-type]
    if fields is None:
        raise Violation(f"unknown event {event!r}")
    if set(data) != fields:
        raise Violation(f"{event}: fields {sorted(data)} != {sorted(fields)}")
    if data[id_key] != stream_id:
        raise Violation(f"{event}: wrong {id_key} {data[id_key]!r}")
    return str(event)


def sent_payload(data: dict[str, Any]) -> bytes:
    """The audio of a gateway -> carrier `media` message, which must be exactly {'payload': base64 str}."""
    media = data["media"]
    if not isinstance(media, dict) or set(media) != {"payload"} or not isinstance(media["payload"], str):
        raise Violation(f"media: 'media' must be exactly {{'payload': str}}, got {media!r:.80}")
    try:
        return base64.b64decode(media["payload"], validate=True)
    except binascii.Error:
        raise Violation("media: payload is not base64") from None


def sent_mark(data: dict[str, Any]) -> Outbound:
    """A gateway -> carrier `mark` message, whose 'mark' must be exactly {'name': str}."""
    mark = data["mark"]
    if not isinstance(mark, dict) or set(mark) != {"name"} or not isinstance(mark["name"], str):
        raise Violation(f"mark: 'mark' must be exactly {{'name': str}}, got {mark!r:.80}")
    return Outbound("mark", name=mark["name"])
