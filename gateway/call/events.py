"""Typed call events: the only currency between a carrier transport and a CallSession.

Inbound events say what the carrier reported (stream up, caller audio, a key press, a played mark, stream
down); outbound commands say what the call wants the carrier to do (play, mark, clear, end the stream).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType


class MalformedMessage(ValueError):
    """A carrier message that cannot be turned into a CallEvent; the call drops it and goes on."""


@dataclass(frozen=True)
class MediaFormat:
    """How the caller's audio is encoded on the wire, with carrier spellings already normalised."""

    encoding: str = "mulaw"  # "mulaw" or "l16" (16-bit little-endian)
    sample_rate: int = 8000
    channels: int = 1

    def __post_init__(self) -> None:
        # What the audio path converts; a carrier's start naming anything else is malformed, not a call.
        if self.encoding not in ("mulaw", "l16") or self.sample_rate not in (8000, 16000, 24000):
            raise ValueError(f"unsupported media format {self.encoding} at {self.sample_rate} Hz")
        if self.channels != 1:
            raise ValueError(f"{self.channels} channels; carriers stream mono")

    @property
    def bytes_per_second(self) -> int:
        return self.sample_rate * self.channels * (1 if self.encoding == "mulaw" else 2)


# --- inbound: carrier -> call ---------------------------------------------------------------------


@dataclass(frozen=True)
class StreamConnected:
    """The carrier opened the media stream; no call details yet."""

    protocol: str = ""
    version: str = ""


@dataclass(frozen=True)
class CallStarted:
    """The stream now carries one call; the carrier told us who it is."""

    call_id: str  # the carrier's call id (Twilio's CallSid, Telnyx's call_control_id, ...)
    stream_id: str  # the carrier's stream id, needed on every outbound message
    caller: str | None = None  # From, when the carrier says it on the stream
    called: str | None = None  # To, likewise
    custom_parameters: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    media_format: MediaFormat = MediaFormat()
    account_id: str | None = None  # the carrier account the stream named (informational)
    carrier: str = ""  # which carrier the stream came from (the edge fills it in), for call control
    control_id: str | None = None  # the id the carrier's REST API names the call by, when not `call_id`


@dataclass(frozen=True)
class CallerAudio:
    """One chunk of the caller's audio, still in the carrier's encoding."""

    payload: bytes
    timestamp_ms: int | None = None  # stream-relative presentation time, when the carrier gives one


@dataclass(frozen=True)
class DtmfPressed:
    """The caller pressed a key."""

    digit: str


@dataclass(frozen=True)
class MarkPlayed:
    """The carrier echoed a mark: the audio before it has played, or was discarded by a clear."""

    name: str


@dataclass(frozen=True)
class CallStopped:
    """The stream ended on the carrier's side (hang-up, transfer, or the carrier stopped it)."""

    reason: str = "stop"


CallEvent = StreamConnected | CallStarted | CallerAudio | DtmfPressed | MarkPlayed | CallStopped


# --- outbound: call -> carrier --------------------------------------------------------------------


@dataclass(frozen=True)
class PlayAudio:
    """Queue agent audio at the carrier, already in the carrier's encoding."""

    payload: bytes


@dataclass(frozen=True)
class PlaceMark:
    """Ask the carrier to echo `name` once everything queued before it has played."""

    name: str


@dataclass(frozen=True)
class ClearAudio:
    """Drop everything queued at the carrier (barge-in, hang-up, hand-off)."""


@dataclass(frozen=True)
class EndStream:
    """Close the media stream; with a plain <Connect><Stream> this ends the phone call."""

    reason: str


OutboundCommand = PlayAudio | PlaceMark | ClearAudio | EndStream
