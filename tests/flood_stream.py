"""A hostile media stream, run as its own process (as a remote peer would be): it starts a Twilio stream
and sends 20 ms caller-audio messages TIMES faster than real time for SECONDS, reading what comes back.

python tests/flood_stream.py WS_URL SECONDS TIMES [CHUNK_MS]  -> prints how many messages it sent
(CHUNK_MS: audio per message, 20 as Twilio sends; larger chunks cost a gateway that decodes them more)
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import sys

from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

CALL_SID = "CA" + "f" * 32
STREAM_SID = "MZ" + "f" * 32


def start_message(call_sid: str = CALL_SID, stream_sid: str = STREAM_SID) -> str:
    """A Twilio `start` for a tokenless mu-law stream."""
    start = {
        "callSid": call_sid,
        "streamSid": stream_sid,
        "accountSid": "AC" + "0" * 32,
        "customParameters": {},
        "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1},
    }
    return json.dumps({"event": "start", "sequenceNumber": "1", "start": start, "streamSid": stream_sid})


async def flood(url: str, seconds: float, times_real_time: float, chunk_ms: int = 20) -> int:
    loop = asyncio.get_running_loop()
    payload = base64.b64encode(b"\x00" * (8 * chunk_ms)).decode()  # mu-law at full scale (never "silent")
    media = {"track": "inbound", "chunk": "1", "timestamp": "0", "payload": payload}
    message = json.dumps({"event": "media", "sequenceNumber": "2", "media": media, "streamSid": STREAM_SID})
    sent = 0
    async with connect(url, max_size=2**20) as ws:

        async def drain() -> None:
            with contextlib.suppress(ConnectionClosed):
                async for _ in ws:
                    pass

        reader = asyncio.create_task(drain())
        await ws.send(json.dumps({"event": "connected", "protocol": "Call", "version": "1.0.0"}))
        await ws.send(start_message())
        started = loop.time()
        with contextlib.suppress(ConnectionClosed):
            while loop.time() - started < seconds:
                for _ in range(10):
                    await ws.send(message)
                sent += 10
                delay = started + sent * chunk_ms / 1000 / times_real_time - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
        reader.cancel()
    return sent


if __name__ == "__main__":
    chunk_ms = int(sys.argv[4]) if len(sys.argv) > 4 else 20
    print(asyncio.run(flood(sys.argv[1], float(sys.argv[2]), float(sys.argv[3]), chunk_ms)))
