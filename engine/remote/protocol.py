"""What crosses the wire between a gateway and an engine worker.

A gateway asks a worker for a session with `POST /sessions` (a `SessionSpec` as JSON); the worker takes a
slot, primes it and answers with a `Ticket`, which names the session and holds what the gateway needs to
follow its position and to re-create it elsewhere. Any gateway holding the ticket then attaches to the
session once over `WS /sessions/<id>`:

- gateway -> worker, binary: one 80 ms caller frame, FRAME_SAMPLES float32 little-endian samples. Float32
  rather than 16-bit keeps the remote engine bit-identical to the embedded one (96 KB/s each way, nothing
  on a data-centre network).
- worker -> gateway, binary: one agent frame, a header (`<iH`: text token, byte length of the text piece),
  the UTF-8 text piece, then the PCM as above.
- either way, text: a JSON control message, `{"op": "say", "text": ...}`, `{"op": "reprime", "prompt":
  ...}` and the worker's `{"op": "reprimed", "positions": {...}}` or `{"op": "error", "message": ...}`.

Every request carries the workers' shared key as a bearer token.
"""

from __future__ import annotations

import json
import struct
from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np

from engine.api import FRAME_SAMPLES, Sampling, SessionSpec

FRAME_BYTES = FRAME_SAMPLES * 4
_AGENT_HEADER = struct.Struct("<iH")
MAX_SPEC_BYTES = 256 * 1024  # a session request: the role prompt is at most a few thousand tokens


class ProtocolError(ValueError):
    """A message that is not what the protocol allows (bad length, bad JSON, missing field)."""


def encode_caller(pcm: np.ndarray) -> bytes:
    frame = np.ascontiguousarray(pcm, dtype="<f4").reshape(-1)
    if frame.shape[0] != FRAME_SAMPLES:
        raise ProtocolError(f"a caller frame is {FRAME_SAMPLES} samples, got {frame.shape[0]}")
    return frame.tobytes()


def decode_caller(data: bytes) -> np.ndarray:
    if len(data) != FRAME_BYTES:
        raise ProtocolError(f"a caller frame is {FRAME_BYTES} bytes, got {len(data)}")
    return np.frombuffer(data, dtype="<f4").astype(np.float32)


def encode_agent(token: int, text: str, pcm: np.ndarray) -> bytes:
    piece = text.encode()
    return _AGENT_HEADER.pack(token, len(piece)) + piece + np.ascontiguousarray(pcm, dtype="<f4").tobytes()


def decode_agent(data: bytes) -> tuple[int, str, np.ndarray]:
    """(token, text piece, pcm) of an agent frame."""
    if len(data) < _AGENT_HEADER.size:
        raise ProtocolError(f"an agent frame of {len(data)} bytes has no header")
    token, text_bytes = _AGENT_HEADER.unpack_from(data)
    start = _AGENT_HEADER.size + text_bytes
    if len(data) - start != FRAME_BYTES:
        raise ProtocolError(f"an agent frame carries {len(data) - start} bytes of audio, not {FRAME_BYTES}")
    text = data[_AGENT_HEADER.size : start].decode(errors="replace")
    return token, text, np.frombuffer(data, dtype="<f4", offset=start).astype(np.float32)


def spec_to_dict(spec: SessionSpec) -> dict[str, Any]:
    return {"voice": spec.voice, "prompt": spec.prompt, "seed": spec.seed, "sampling": asdict(spec.sampling)}


def spec_from_dict(data: Any) -> SessionSpec:
    """The spec a gateway sent; raises ProtocolError (or the Sampling's ValueError) when it is malformed."""
    if not isinstance(data, dict):
        raise ProtocolError("a session request is a JSON object")
    voice, prompt, seed = data.get("voice"), data.get("prompt", ""), data.get("seed")
    if not isinstance(voice, str) or not voice or not isinstance(prompt, str):
        raise ProtocolError("a session request needs a voice (string) and a prompt (string)")
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool) or seed < 0):
        raise ProtocolError(f"seed must be a non-negative integer or null, got {seed!r}")
    sampling = data.get("sampling") or {}
    known = {f.name for f in fields(Sampling)}
    if not isinstance(sampling, dict) or set(sampling) - known:
        raise ProtocolError(f"sampling takes only {sorted(known)}")
    return SessionSpec(voice=voice, prompt=prompt, seed=seed, sampling=Sampling(**sampling))


@dataclass(frozen=True)
class Positions:
    """Where a session stands in the model's window, as the worker's session reports it."""

    prompt_positions: int  # positions the prompt took (live frame i runs at prompt_positions + i)
    text_start: int  # position of the role prompt's first token
    prompt_overhead: int  # prompt positions that are not role-prompt tokens
    context: int  # positions the model attends to


@dataclass(frozen=True)
class Ticket:
    """A primed session on a worker, waiting for (or held by) one gateway's connection."""

    worker: str  # the worker's id in the registry
    url: str  # the worker's base URL, http://host:port
    session: str  # the session's id on that worker
    seed: int
    positions: Positions
    spec: SessionSpec  # what it was primed with (the role prompt included), to re-create it elsewhere

    def to_json(self) -> str:
        data = {
            "worker": self.worker,
            "url": self.url,
            "session": self.session,
            "seed": self.seed,
            "positions": asdict(self.positions),
            "spec": spec_to_dict(self.spec),
        }
        return json.dumps(data, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str | bytes) -> Ticket:
        try:
            data = json.loads(text)
            return cls(
                worker=str(data["worker"]),
                url=str(data["url"]),
                session=str(data["session"]),
                seed=int(data["seed"]),
                positions=Positions(**{k: int(v) for k, v in data["positions"].items()}),
                spec=spec_from_dict(data["spec"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ProtocolError(f"malformed session ticket: {exc!r}") from None


def control(op: str, **values: Any) -> str:
    return json.dumps({"op": op, **values}, separators=(",", ":"))


def read_control(text: str) -> dict[str, Any]:
    try:
        message = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ProtocolError(f"a control message is not JSON: {exc}") from None
    if not isinstance(message, dict) or not isinstance(message.get("op"), str):
        raise ProtocolError("a control message is a JSON object with an 'op'")
    return message
