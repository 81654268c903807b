"""The interface one carrier's media-stream dialect implements: its wire format <-> CallEvents.

A dialect knows one carrier's messages and how that carrier authenticates the WebSocket upgrade; it keeps
no per-call state (the stream id comes in with every outbound command), so one instance serves all calls.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import ClassVar

from gateway.call.events import (
    CallEvent,
    ClearAudio,
    OutboundCommand,
    PlaceMark,
    PlayAudio,
)


class CarrierDialect(ABC):
    """One carrier's media-stream protocol."""

    name: ClassVar[str]  # short carrier name, also the URL prefix of its routes ("twilio")

    @property
    def authenticates(self) -> bool:
        """Whether this dialect checks its carrier's signatures (its secret is configured)."""
        return False

    @abstractmethod
    def parse(self, message: str | bytes) -> CallEvent:
        """Turn one WebSocket message into a CallEvent; raise MalformedMessage saying what is wrong."""

    @abstractmethod
    def audio_message(self, stream_id: str, payload: bytes) -> str | bytes:
        """The message that queues `payload` (carrier encoding) for playback."""

    @abstractmethod
    def mark_message(self, stream_id: str, name: str) -> str | bytes:
        """The message asking for an echo of `name` once the audio queued before it has played."""

    @abstractmethod
    def clear_message(self, stream_id: str) -> str | bytes:
        """The message that drops all audio queued at the carrier."""

    @abstractmethod
    def verify_upgrade(self, path: str, headers: Mapping[str, str]) -> bool:
        """Whether the WebSocket upgrade request for `path` (lower-case header names) is the carrier's.

        Called before the socket is accepted, so a refusal is answered with HTTP 403.
        """

    def render(self, command: OutboundCommand, stream_id: str) -> str | bytes:
        """The wire message for an outbound command; EndStream has none (the socket is closed instead)."""
        if isinstance(command, PlayAudio):
            return self.audio_message(stream_id, command.payload)
        if isinstance(command, PlaceMark):
            return self.mark_message(stream_id, command.name)
        if isinstance(command, ClearAudio):
            return self.clear_message(stream_id)
        raise ValueError(f"{type(command).__name__} has no {self.name} wire message")
