"""What the gateway knows of a call before it is answered (numbers, the voice webhook's fields, the
carrier's custom parameters), and the one rule phone numbers are compared by."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

# Where the lookup key of a call can come from: a fixed attribute, or a named webhook field/custom parameter.
KEY_SOURCES = ("caller", "called", "call_id", "fields.<name>", "params.<name>")
_NUMBER_PUNCTUATION = str.maketrans("", "", " -().")


def masked_number(number: str | None) -> str:
    """A phone number fit for a log line: its first two and last two characters, the rest starred
    ("+15550001111" -> "+1********11"); logs outlive calls and travel further than call records."""
    if not number:
        return "-"
    if len(number) <= 4:
        return "*" * len(number)
    return number[:2] + "*" * (len(number) - 4) + number[-2:]


def normalise_number(number: str) -> str:
    """Drop the punctuation people write in numbers, so "+1 (555) 123-0000" matches "+15551230000"."""
    return number.strip().translate(_NUMBER_PUNCTUATION)


@dataclass(frozen=True)
class IncomingCall:
    """What a call carries before it is answered: numbers, the voice webhook's form fields and the carrier's
    custom parameters (Twilio `<Parameter>`)."""

    call_id: str
    caller: str | None = None  # From
    called: str | None = None  # To
    fields: Mapping[str, str] = field(default_factory=dict)  # the voice webhook's form: From, To, CallSid...
    params: Mapping[str, str] = field(default_factory=dict)  # custom parameters of the media stream

    def key_value(self, spec: str) -> str | None:
        """The value `spec` (one of KEY_SOURCES) picks from this call; None if the call does not carry it."""
        source, _, name = spec.partition(".")
        if source == "fields":
            value = self.fields.get(name)
        elif source == "params":
            value = self.params.get(name)
        else:
            value = {"caller": self.caller, "called": self.called, "call_id": self.call_id}.get(spec)
        value = (value or "").strip()
        return value or None
