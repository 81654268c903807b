"""An Engine that answers every caller frame with that same frame: the model-free stand-in used by the
load benchmark and by gateway tests, so transport and call bookkeeping can be measured without a model.

It keeps the engine contract of `engine/api.py` (one agent frame per pushed frame, in order; slots freed
on close) and can be told to be slow to prime, to run out of slots, to fail, or to lose sessions.
"""

from __future__ import annotations

import asyncio
import itertools
import random
from collections.abc import AsyncIterator

import numpy as np

from engine.api import (
    FRAME_SAMPLES,
    Admission,
    AgentFrame,
    EngineBusy,
    EngineError,
    SessionClosed,
    SessionSpec,
)

PAD_TOKEN = 3
WORD_TOKEN = 4  # any non-pad id; the echo has no vocabulary


class EchoSession:
    """One echo conversation: the frames pushed come back out, one agent frame each."""

    def __init__(self, engine: EchoEngine, session_id: str, seed: int) -> None:
        self.id = session_id
        self.seed = seed
        self._engine = engine
        self._queue: asyncio.Queue[np.ndarray | None] = asyncio.Queue()
        self._closed = False
        self._produced = 0

    @property
    def closed(self) -> bool:
        return self._closed

    def push(self, pcm: np.ndarray) -> None:
        if self._closed:
            raise SessionClosed(f"echo session {self.id} is closed")
        if pcm.shape != (FRAME_SAMPLES,):
            raise ValueError(f"echo session {self.id}: frame shape {pcm.shape}, expected ({FRAME_SAMPLES},)")
        self._queue.put_nowait(np.asarray(pcm, dtype=np.float32).copy())

    async def frames(self) -> AsyncIterator[AgentFrame]:
        while True:
            pcm = await self._queue.get()
            if pcm is None:
                return
            index = self._produced
            self._produced += 1
            every = self._engine.text_every
            text = f" echo{index}" if every and index % every == 0 else ""
            yield AgentFrame(index=index, pcm=pcm, text=text, token=WORD_TOKEN if text else PAD_TOKEN)
            limit = self._engine.session_frames_limit
            if limit is not None and self._produced >= limit:
                await self.close()  # the engine "loses" the session, as a dead worker would

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._queue.put_nowait(None)
        self._engine._release(self)


class EchoEngine:
    """Serves echo sessions; `active` counts sessions holding a slot (priming or live)."""

    def __init__(
        self,
        *,
        open_delay_s: float = 0.0,
        max_sessions: int | None = None,
        fail_open: str | None = None,
        text_every: int = 0,
        session_frames_limit: int | None = None,
    ) -> None:
        self.open_delay_s = open_delay_s  # simulated priming time
        self.max_sessions = max_sessions  # EngineBusy beyond this many
        self.fail_open = fail_open  # when set, every open raises EngineError with this message
        self.text_every = text_every  # emit a text piece every this many frames (0: never)
        self.session_frames_limit = session_frames_limit  # sessions end by themselves after this many
        self.active = 0
        self.opened = 0
        self.specs: list[SessionSpec] = []
        self._live: set[EchoSession] = set()
        self._ids = itertools.count(1)

    async def admission(self) -> Admission:
        if self.max_sessions is not None and self.active >= self.max_sessions:
            return Admission(False, f"echo engine full ({self.max_sessions} sessions)")
        return Admission(True)

    async def open(self, spec: SessionSpec) -> EchoSession:
        if self.fail_open is not None:
            raise EngineError(self.fail_open)
        admission = await self.admission()
        if not admission.ready:
            raise EngineBusy(admission.reason)
        self.active += 1  # the slot is held while priming, as a real engine's would be
        try:
            if self.open_delay_s:
                await asyncio.sleep(self.open_delay_s)
        except BaseException:
            self.active -= 1
            raise
        self.opened += 1
        self.specs.append(spec)
        seed = spec.seed if spec.seed is not None else random.randrange(2**31)
        session = EchoSession(self, f"echo-{next(self._ids)}", seed)
        self._live.add(session)
        return session

    def count_prompt_tokens(self, prompt: str) -> int:
        return len(prompt.split())

    async def aclose(self) -> None:
        for session in list(self._live):
            await session.close()

    def _release(self, session: EchoSession) -> None:
        if session in self._live:
            self._live.discard(session)
            self.active -= 1
