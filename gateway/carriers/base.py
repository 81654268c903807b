"""The carrier interface: everything one carrier's calls need, implemented entirely by that carrier's file.

A `Carrier` answers its voice webhook (authenticated, in its own markup, with the stream URL and the
call's single-use token where that carrier preserves it), authenticates media-stream upgrades, opens one
`CarrierStream` per WebSocket (its wire dialect both ways, text or binary, with whatever per-stream state
the dialect needs), and controls live calls through its REST API. A `CarrierPeer` is the same protocol from
the carrier's side: `duplexgate call --carrier X` and the conformance tests drive the gateway with it.

The edge, the switchboard and the config know carriers only through this module and the registry
(`gateway/carriers/__init__.py`); `CallSession` knows none.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import httpx

from gateway.call.events import (
    CallEvent,
    CallStarted,
    ClearAudio,
    EndStream,
    MediaFormat,
    OutboundCommand,
    PlaceMark,
    PlayAudio,
)

log = logging.getLogger(__name__)

TOKEN_PARAMETER = "token"  # the per-call token's name wherever a carrier carries it
REST_ATTEMPTS = 3  # a REST call that fails with 5xx, 429 or a network error is tried this often in all
REST_BACKOFF_S = 0.25  # before the second attempt; doubled each time


class WebhookRefused(Exception):
    """A voice webhook the gateway will not answer: `status` is the HTTP answer; `auth_failed` counts it
    against the sender's failed-authentication allowance."""

    def __init__(self, status: int, message: str, auth_failed: bool = False) -> None:
        super().__init__(message)
        self.status, self.auth_failed = status, auth_failed


class CallControlError(RuntimeError):
    """The carrier's REST API refused or never answered a call update."""


class AnsweredWithoutStream(RuntimeError):
    """A voice webhook answered the simulated carrier with no stream: the gateway's overflow (a message and
    a hang-up, or a transfer) or a 503. The message says what the call did, e.g. "transferred to +1555..."."""


@dataclass(frozen=True)
class Answering:
    """What a voice webhook says about the call being answered."""

    call_id: str
    caller: str | None = None
    called: str | None = None
    fields: Mapping[str, str] = field(default_factory=dict)  # everything the carrier sent, for templates


@dataclass(frozen=True)
class CarrierSettings:
    """Settings every carrier section has. A carrier's own settings subclass this; `secrets` maps each
    secret field (never in the file, hidden from reprs) to the field naming its environment variable."""

    # Without the carrier's secret nothing checks who is calling. Serving unsigned traffic beyond this
    # machine needs this switch and `duplexgate serve --confirm-unsigned`.
    allow_unsigned: bool = False
    secrets: ClassVar[Mapping[str, str]] = {}

    def problems(self, public_url: str) -> list[str]:
        """What is wrong with these settings beyond their types (a carrier may add its own checks)."""
        return []

    def signing_variables(self) -> list[str]:
        """The environment variables that turn this carrier's signature checks on."""
        return [str(getattr(self, variable)) for variable in self.secrets.values()]


class CarrierStream(ABC):
    """One media stream's wire dialect: carrier messages -> CallEvents, outbound commands -> messages."""

    def __init__(self, query: Mapping[str, str], headers: Mapping[str, str]) -> None:
        self.query, self.headers = query, headers  # of the upgrade request (lower-case header names)
        self.stream_id = ""  # set from the carrier's start message

    @abstractmethod
    def parse(self, message: str | bytes) -> CallEvent | None:
        """One WebSocket message as a CallEvent (None: a message with nothing for the call, such as an
        acknowledgement); raise MalformedMessage saying what is wrong."""

    @abstractmethod
    def audio(self, payload: bytes) -> Sequence[str | bytes]:
        """The messages that queue `payload` (carrier encoding, 80 ms) for playback."""

    @abstractmethod
    def mark(self, name: str) -> Sequence[str | bytes]:
        """The messages asking for `name` back once the audio queued before it has played."""

    @abstractmethod
    def clear(self) -> Sequence[str | bytes]:
        """The messages that drop all audio queued at the carrier."""

    def end(self, reason: str) -> Sequence[str | bytes]:
        """Messages sent before the gateway closes the socket to end the call (most carriers: none)."""
        return ()

    def render(self, command: OutboundCommand) -> Sequence[str | bytes]:
        if isinstance(command, PlayAudio):
            return self.audio(command.payload)
        if isinstance(command, PlaceMark):
            return self.mark(command.name)
        if isinstance(command, ClearAudio):
            return self.clear()
        if isinstance(command, EndStream):
            return self.end(command.reason)
        raise ValueError(f"{type(command).__name__} has no wire message")


class Carrier(ABC):
    """One carrier: its answer webhook, stream authentication, wire dialect and call control."""

    name: ClassVar[str]  # also the prefix of its routes: /<name>/voice, /<name>/media
    settings_type: ClassVar[type[CarrierSettings]]
    voice_methods: ClassVar[tuple[str, ...]] = ("POST",)
    # False for a carrier that opens streams with no answer webhook (a PBX dialling us): its upgrade check
    # alone vouches for a stream, which then needs no per-call token.
    prepares_calls: ClassVar[bool] = True
    # True for a carrier whose own flow (the next applet, the dialplan) takes the call on once our stream
    # ends: a transfer then ends the stream at once instead of waiting for the carrier to stop it.
    transfer_ends_stream: ClassVar[bool] = False
    peer: ClassVar[type[CarrierPeer]]  # the carrier's side, for the simulator
    console: ClassVar[str] = ""  # one line for `serve`'s start-up: where to point the carrier

    def __init__(self, settings: CarrierSettings, public_url: str | None) -> None:
        self.settings = settings
        self.public_url = public_url.rstrip("/") if public_url else None

    @property
    def voice_path(self) -> str:
        return f"/{self.name}/voice"

    @property
    def media_path(self) -> str:
        return f"/{self.name}/media"

    @property
    @abstractmethod
    def authenticates(self) -> bool:
        """Whether this carrier's webhooks and streams are checked (its secret is configured)."""

    def stream_url(self, request_base: str | None = None) -> str:
        """The media-stream URL to hand the carrier: the public base with https -> wss (http -> ws, for
        tests). `request_base` is used only when no public URL is configured (nothing is then signed)."""
        base = self.public_url or (request_base or "").rstrip("/")
        scheme, _, rest = base.partition("://")
        ws_scheme = {"https": "wss", "http": "ws", "wss": "wss", "ws": "ws"}.get(scheme.lower())
        if ws_scheme is None or not rest:
            raise ValueError(f"public URL {base!r} must start with https:// or http://")
        return f"{ws_scheme}://{rest}{self.media_path}"

    # --- answer webhook ------------------------------------------------------------------------------

    @abstractmethod
    def read_answer(
        self, method: str, path: str, query: str, body: bytes, headers: Mapping[str, str]
    ) -> Answering:
        """Authenticate and read a voice webhook; raise WebhookRefused when it is not to be answered."""

    @abstractmethod
    def answer(self, call: Answering, stream_url: str, token: str) -> tuple[str, str]:
        """(body, media type) that connects `call` to `stream_url`, carrying `token` where this carrier
        hands it back on the stream."""

    def overflow(self, call: Answering, message: str, transfer_to: str | None) -> tuple[str, str] | None:
        """(body, media type) that answers `call` when no agent is free: says `message` (when not empty),
        then transfers the call to `transfer_to` (a number or sip: URI) or, without one, hangs up. None
        when this carrier's answer cannot say so (no answer webhook, or one that can only name a stream):
        the webhook then answers 503 and the carrier's own fallback takes the call."""
        return None

    # --- media stream --------------------------------------------------------------------------------

    @abstractmethod
    def verify_upgrade(self, path: str, query: Mapping[str, str], headers: Mapping[str, str]) -> bool:
        """Whether a WebSocket upgrade is the carrier's; checked before the socket is accepted."""

    @abstractmethod
    def open_stream(self, query: Mapping[str, str], headers: Mapping[str, str]) -> CarrierStream:
        """The dialect state for one accepted media stream."""

    def routes(self) -> Sequence[CarrierRoute]:
        """HTTP routes the carrier needs besides its voice webhook (e.g. a URL its API fetches markup
        from during a transfer); mounted under /<name>/."""
        return ()

    # --- call control --------------------------------------------------------------------------------

    @abstractmethod
    async def transfer(self, call: CallStarted, target: str) -> None:
        """Move the live call to `target` (E.164 number or sip: URI) through the carrier's API."""


@dataclass(frozen=True)
class CarrierRoute:
    """An extra HTTP route of a carrier: `path` (under /<carrier>/) answered by `handle(method, path,
    query, body, headers) -> (status, body, media type)`; the body was capped before it was read. A
    request it refuses raises WebhookRefused (failed authentications count against the sender)."""

    path: str
    methods: tuple[str, ...]
    handle: Callable[[str, str, str, bytes, Mapping[str, str]], Awaitable[tuple[int, str, str]]]


async def rest_request(
    method: str,
    url: str,
    *,
    what: str,
    ok: Sequence[int] = (),
    timeout_s: float = 5.0,
    **request: Any,
) -> httpx.Response:
    """One REST call to a carrier, retried on 5xx, 429 and network errors. `ok` lists statuses besides
    2xx that mean success (a hang-up of a call already over). Raises CallControlError naming `what`."""
    delay, last = REST_BACKOFF_S, ""
    async with httpx.AsyncClient(timeout=timeout_s) as client:
        for attempt in range(1, REST_ATTEMPTS + 1):
            try:
                reply = await client.request(method, url, **request)
            except httpx.HTTPError as exc:
                last = f"{type(exc).__name__}: {exc}"
            else:
                if 200 <= reply.status_code < 300 or reply.status_code in ok:
                    return reply
                last = f"HTTP {reply.status_code} {reply.text[:200]}"
                if reply.status_code < 500 and reply.status_code != 429:
                    break  # the carrier said no; asking again would not change its mind
            if attempt < REST_ATTEMPTS:
                log.info("%s: attempt %d failed (%s); retrying", what, attempt, last)
                await asyncio.sleep(delay)
                delay *= 2
    raise CallControlError(f"{what}: {last}")


def basic_credentials(headers: Mapping[str, str]) -> tuple[str, str] | None:
    """(user, password) of an `Authorization: Basic` header, or None."""
    scheme, _, value = headers.get("authorization", "").partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        user, sep, password = base64.b64decode(value.strip(), validate=True).decode().partition(":")
    except (binascii.Error, UnicodeDecodeError):
        return None
    return (user, password) if sep else None


def basic_header(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode("ascii")


# --- the carrier's side, for the simulator ----------------------------------------------------------


@dataclass(frozen=True)
class StreamTarget:
    """Where and how a carrier opens the media stream after answering: the URL (query included), the
    upgrade's headers, and what the answer markup asked to be carried into the stream."""

    url: str
    headers: Mapping[str, str] = field(default_factory=dict)
    parameters: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Outbound:
    """One gateway -> carrier message as the carrier understood it."""

    kind: str  # "media", "mark", "clear" or "other" (a message with no effect on playback)
    payload: bytes = b""  # media: the audio in the wire format
    name: str = ""  # mark: its name


class Violation(ValueError):
    """A gateway -> carrier message this carrier would reject or misplay."""


class CarrierPeer(ABC):
    """A carrier's side of the protocol: places a call as the carrier would (answer webhook, upgrade, start
    message), sends caller audio and keys, reads the gateway's messages and acknowledges playback.

    One instance per simulated call; `secret` is the carrier credential a signed request needs."""

    wire: MediaFormat = MediaFormat()  # the call's wire format; a peer whose answer chooses it sets its own
    chunk_s: ClassVar[float] = 0.02  # caller audio per media message
    echoes_marks_on_clear: ClassVar[bool] = True  # after a clear, pending marks come back at once
    has_webhook: ClassVar[bool] = True  # False: the carrier opens the stream with no answer webhook
    ws_user_agent: ClassVar[str] = "duplexgate-sim"  # the User-Agent of the carrier's WebSocket upgrade
    transfers_over_rest: ClassVar[bool] = True  # False: a transfer ends the stream and the carrier's
    # own flow (the next applet, the dialplan) takes the call on; no REST request is made

    def __init__(self, call_id: str | None, caller: str, called: str, secret: Any = None) -> None:
        self.call_id = call_id or self.new_call_id()
        self.caller, self.called, self.secret = caller, called, secret
        self.stream_id = ""

    @staticmethod
    @abstractmethod
    def new_call_id() -> str:
        """A fresh call id in this carrier's format."""

    @abstractmethod
    async def answer(self, client: httpx.AsyncClient, webhook: str) -> StreamTarget:
        """Request the voice webhook as the carrier does (signed when `secret` is set), read the markup."""

    def target(self, url: str, parameters: Mapping[str, str]) -> StreamTarget:
        """How the carrier connects to a stream URL given directly (no webhook), with `parameters`."""
        return StreamTarget(url, {}, dict(parameters))

    def upgrade_headers(self, target: StreamTarget) -> dict[str, str]:
        """Headers on the WebSocket upgrade (signatures, tokens)."""
        return dict(target.headers)

    @abstractmethod
    def opening(self, target: StreamTarget) -> list[str | bytes]:
        """The messages that start the stream (connected, start, ...)."""

    @abstractmethod
    def media(self, payload: bytes, n: int) -> str | bytes:
        """Caller audio chunk `n` (0-based) in the wire format."""

    @abstractmethod
    def dtmf(self, digit: str) -> str | bytes:
        """A key press."""

    def stop(self) -> str | bytes | None:
        """The message that ends the stream from the carrier's side (None: just close)."""
        return None

    @abstractmethod
    def read(self, message: str | bytes) -> Outbound:
        """One gateway message; raise Violation for one the carrier would reject."""

    @abstractmethod
    def played(self, name: str) -> str | bytes:
        """The acknowledgement that the audio before mark `name` has played."""

    def cleared(self) -> str | bytes | None:
        """The acknowledgement of a clear, when the carrier sends one."""
        return None

    @classmethod
    @abstractmethod
    def conformance_setup(cls, api_base: str) -> tuple[dict[str, Any], dict[str, str], Any]:
        """For the conformance tests: (this carrier's config table, environment, the peer's `secret`) of
        a gateway that checks this carrier's signatures and sends its REST calls to `api_base`."""

    @classmethod
    def forged_secret(cls) -> Any:
        """A credential of the right shape that is not the configured one (for the forged-request tests)."""
        return "forged-secret-0123456789abcdef"

    def check_transfer(self, request: Mapping[str, Any], target: str) -> list[str]:
        """Problems with a recorded REST request as this carrier's API would judge a transfer of this call
        to `target` (`request`: method, path, headers, body)."""
        return ["this carrier's transfers are not checked"]
