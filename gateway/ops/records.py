"""Call records: what a finished (or failed) call leaves behind for the business, as a plain dataclass that
round-trips through JSON so any store can keep it and the `call.ended` webhook can carry it."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from gateway.call.notices import Escalation
from gateway.call.session import TranscriptPiece

__all__ = ["CallRecord", "Escalation", "RecordFormatError"]

RECORD_VERSION = 1  # bump when a field changes meaning; readers refuse versions they do not know


class RecordFormatError(ValueError):
    """Stored record data is unreadable; the message names the call id (when known) and the key."""


@dataclass(frozen=True)
class CallRecord:
    """Everything kept about one call. Wall times are Unix seconds; `at_s` values are call-clock seconds."""

    call_id: str
    started_at: float  # when the gateway first heard of the call (voice webhook or stream start)
    stream_id: str | None = None
    caller: str | None = None
    called: str | None = None
    agent: str = ""
    prompt_sha256: str = ""  # of the rendered role prompt: proves what the model was told without storing it
    voice: str = ""
    seed: int | None = None
    answered_at: float | None = None  # first caller audio bridged to the engine
    ended_at: float | None = None
    end_reason: str | None = None
    escalations: tuple[Escalation, ...] = ()
    crm_status: str | None = None  # "found", "not_found", "error", ... or None without a CRM
    transcript: tuple[TranscriptPiece, ...] = ()
    counters: Mapping[str, int] = field(default_factory=dict)  # frames sent/dropped/heard, dtmf presses, ...
    # DuplexTimeline.summary(): both sides' speech segments and the conversation-quality measures
    # (docs/quality.md); empty for a call that never streamed, one whose timeline failed, and in records
    # written before it existed
    timeline: Mapping[str, Any] = field(default_factory=dict)
    # each time the call moved to another engine worker (its worker died): at_s, from_worker, to_worker,
    # why, gap_ms, replayed_frames
    failovers: tuple[Mapping[str, Any], ...] = ()

    @property
    def duration_s(self) -> float | None:
        if self.ended_at is None:
            return None
        return max(0.0, self.ended_at - self.started_at)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["counters"] = dict(self.counters)
        data["timeline"] = dict(self.timeline)
        data["failovers"] = [dict(item) for item in self.failovers]
        data["version"] = RECORD_VERSION
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), ensure_ascii=False, separators=(",", ":"))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> CallRecord:
        call_id = data.get("call_id")
        where = f"call record {call_id!r}" if isinstance(call_id, str) else "call record without a call_id"
        version = data.get("version", RECORD_VERSION)
        if version != RECORD_VERSION:
            raise RecordFormatError(
                f"{where}: version {version!r} is not {RECORD_VERSION}; "
                "read it with the duplexgate version that wrote it"
            )
        try:
            return cls(
                call_id=_typed(data, "call_id", str, where),
                started_at=float(_typed(data, "started_at", (int, float), where)),
                stream_id=_optional(data, "stream_id", str, where),
                caller=_optional(data, "caller", str, where),
                called=_optional(data, "called", str, where),
                agent=_optional(data, "agent", str, where) or "",
                prompt_sha256=_optional(data, "prompt_sha256", str, where) or "",
                voice=_optional(data, "voice", str, where) or "",
                seed=_optional(data, "seed", int, where),
                answered_at=_optional_time(data, "answered_at", where),
                ended_at=_optional_time(data, "ended_at", where),
                end_reason=_optional(data, "end_reason", str, where),
                escalations=tuple(
                    Escalation(
                        at_s=float(item["at_s"]),
                        trigger=str(item["trigger"]),
                        reason=str(item["reason"]),
                        actions=tuple(str(action) for action in item.get("actions", ())),
                    )
                    for item in data.get("escalations", ())
                ),
                crm_status=_optional(data, "crm_status", str, where),
                transcript=tuple(
                    TranscriptPiece(at_s=float(item["at_s"]), text=str(item["text"]))
                    for item in data.get("transcript", ())
                ),
                counters={str(name): int(value) for name, value in data.get("counters", {}).items()},
                timeline=_timeline(data, where),
                failovers=tuple(dict(item) for item in data.get("failovers", ())),
            )
        except RecordFormatError:
            raise
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise RecordFormatError(
                f"{where}: malformed escalations, transcript or counters ({exc!r})"
            ) from None

    @classmethod
    def from_json(cls, text: str | bytes) -> CallRecord:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise RecordFormatError(f"call record is not JSON: {exc}") from None
        if not isinstance(data, dict):
            raise RecordFormatError(f"call record is a JSON {type(data).__name__}, not an object")
        return cls.from_dict(data)


def _typed(data: Mapping[str, Any], key: str, kind: type | tuple[type, ...], where: str) -> Any:
    value = data.get(key)
    # bool is an int in Python, never a valid number or id here
    if not isinstance(value, kind) or isinstance(value, bool):
        raise RecordFormatError(f"{where}: {key} = {value!r} should be {_kind_name(kind)}")
    return value


def _optional(data: Mapping[str, Any], key: str, kind: type, where: str) -> Any:
    return None if data.get(key) is None else _typed(data, key, kind, where)


def _optional_time(data: Mapping[str, Any], key: str, where: str) -> float | None:
    return None if data.get(key) is None else float(_typed(data, key, (int, float), where))


def _timeline(data: Mapping[str, Any], where: str) -> dict[str, Any]:
    """The timeline summary: a JSON object (absent or null in records older than it: empty); its content is
    the timeline's own schema and is kept as written."""
    value = data.get("timeline")
    if value is None:
        return {}
    if not isinstance(value, Mapping) or not all(isinstance(key, str) for key in value):
        raise RecordFormatError(f"{where}: timeline = {value!r:.80} should be an object")
    return dict(value)


def _kind_name(kind: type | tuple[type, ...]) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join(
        {"str": "a string", "int": "an integer", "float": "a number"}[k.__name__] for k in kinds
    )
