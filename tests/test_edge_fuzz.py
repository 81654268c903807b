"""Fuzzing the media-stream edge: over 10,000 random and mutated Twilio messages (bad JSON, wrong types,
huge fields, binary frames, events out of order) across many connections, while a real call goes on. The
process survives, the call is served to its end, nothing is left behind and memory stays bounded. The
fuzzers run as a process of their own, as remote peers would: in the test's own event loop they would
starve the simulated carrier of the call under test, whose late mark echoes the gateway rightly answers by
dropping frames.

python tests/test_edge_fuzz.py WS_URL  -> fuzzes WS_URL, prints how many messages it sent"""

from __future__ import annotations

import asyncio
import base64
import json
import random
import sys

import httpx
from callaudio import speech_like
from test_edge_limits import rss_bytes
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from gateway.simulator.call import simulate_call

CONNECTIONS = 20
MESSAGES_EACH = 520


def valid_messages(rng: random.Random) -> list[dict]:
    sid, stream = f"CA{rng.getrandbits(128):032x}", f"MZ{rng.getrandbits(128):032x}"
    start = {
        "callSid": sid,
        "streamSid": stream,
        "accountSid": "AC" + "0" * 32,
        "customParameters": {"limit_max_duration": "5"},
        "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1},
    }
    media = {
        "track": "inbound",
        "chunk": "1",
        "timestamp": "0",
        "payload": base64.b64encode(b"\xff" * 160).decode(),
    }
    return [
        {"event": "connected", "protocol": "Call", "version": "1.0.0"},
        {"event": "start", "sequenceNumber": "1", "start": start, "streamSid": stream},
        {"event": "media", "sequenceNumber": "2", "media": media, "streamSid": stream},
        {"event": "mark", "sequenceNumber": "3", "mark": {"name": "m"}, "streamSid": stream},
        {"event": "dtmf", "sequenceNumber": "4", "dtmf": {"digit": "5"}, "streamSid": stream},
        {"event": "stop", "sequenceNumber": "5", "stop": {"callSid": sid}, "streamSid": stream},
    ]


JUNK = [
    None,
    0,
    -1,
    2**70,
    1.5,
    float("1e308"),
    True,
    "",
    "x" * 40_000,
    [],
    [1, [2, [3]]],
    {},
    {"a": {"b": {}}},
]


def mutate(rng: random.Random, value: object, depth: int = 0) -> object:
    """A copy of a JSON value with some fields replaced, dropped or added."""
    if isinstance(value, dict):
        out = {}
        for key, item in value.items():
            roll = rng.random()
            if roll < 0.1:
                continue  # dropped
            out[key] = rng.choice(JUNK) if roll < 0.25 else mutate(rng, item, depth + 1)
        if rng.random() < 0.1:
            out[rng.choice(["event", "extra", "media", "start"])] = rng.choice(JUNK)
        return out
    if isinstance(value, str) and rng.random() < 0.2:
        return rng.choice([value[::-1], value * 3, "\u0000" + value, str(rng.random()), ""])
    return value


def fuzz_message(rng: random.Random) -> str | bytes:
    roll = rng.random()
    if roll < 0.05:
        return rng.randbytes(rng.randrange(1, 2000))  # a binary frame
    if roll < 0.10:
        return json.dumps(rng.choice(valid_messages(rng)))[: rng.randrange(1, 60)]  # truncated JSON
    if roll < 0.15:
        return json.dumps(rng.choice(JUNK))  # JSON that is not an object
    if roll < 0.17:
        return "{" * rng.randrange(1, 5000)  # deep nesting
    message = rng.choice(valid_messages(rng))  # in any order, maybe as it is
    return json.dumps(mutate(rng, message) if rng.random() < 0.7 else message, default=str)


async def fuzz_connection(url: str, seed: int) -> int:
    rng, sent = random.Random(seed), 0
    while sent < MESSAGES_EACH:
        try:
            async with connect(url, max_size=2**20, open_timeout=5, close_timeout=1) as ws:
                while sent < MESSAGES_EACH:
                    await ws.send(fuzz_message(rng))
                    sent += 1
                    if sent % 50 == 0:
                        await asyncio.sleep(0.01)
        except (ConnectionClosed, InvalidStatus, OSError, TimeoutError):
            sent += 1  # the gateway closed on us: count the message that did it, and come back
    return sent


async def fuzz_all(url: str) -> int:
    return sum(await asyncio.gather(*(fuzz_connection(url, seed) for seed in range(CONNECTIONS))))


async def test_ten_thousand_hostile_messages_leave_the_gateway_and_a_live_call_unharmed(echo_gateway) -> None:
    live = echo_gateway
    before = rss_bytes()
    call = asyncio.create_task(simulate_call(live.ws_url, speech_like(5.0), tail_s=0.2))
    fuzzer = await asyncio.create_subprocess_exec(
        sys.executable, __file__, live.ws_url, stdout=asyncio.subprocess.PIPE
    )
    out, _ = await fuzzer.communicate()
    summary = await call
    assert fuzzer.returncode == 0 and int(out) >= 10_000
    assert summary.closed_by == "carrier" and summary.violations == []  # served to its end
    # Most of its agent audio was played; frames over the carrier buffer are dropped, never queued.
    assert summary.media_received >= 0.7 * (summary.media_sent // 4)
    async with httpx.AsyncClient() as client:
        assert (await client.get(live.base_url + "/healthz")).status_code == 200
    # Every fuzzed call ends (limit_max_duration 5 s, idle 10 s at the latest): nothing is left behind.
    assert await live.until(lambda: not live.state.calls and live.engine.active == 0, timeout_s=15)
    assert rss_bytes() - before < 64 << 20


if __name__ == "__main__":
    print(asyncio.run(fuzz_all(sys.argv[1])))
