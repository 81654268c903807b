"""The HTTP server the gateway runs under: uvicorn's, with a drain on SIGTERM.

The first SIGTERM (Kubernetes deleting the pod, `docker stop`) does not stop the server: it runs the
app's drain (no new calls, /readyz unready, live calls finish up to the grace, the rest end with their
records) and then the usual shutdown. A second SIGTERM, or SIGINT, stops at once.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Awaitable, Callable
from types import FrameType

import uvicorn

log = logging.getLogger(__name__)


class DrainingServer(uvicorn.Server):
    def __init__(self, drain: Callable[[], Awaitable[None]], config: uvicorn.Config) -> None:
        super().__init__(config)
        self._drain = drain
        self._draining: asyncio.Future[None] | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if sig != signal.SIGTERM or self._draining is not None or self.should_exit:
            super().handle_exit(sig, frame)
            return
        # A signal handler runs between two bytecodes of the loop's thread: start the drain from the loop.
        asyncio.get_event_loop().call_soon_threadsafe(self._start_drain)

    def _start_drain(self) -> None:
        if self._draining is None:
            self._draining = asyncio.ensure_future(self._drain())
            self._draining.add_done_callback(self._drained)

    def _drained(self, task: asyncio.Future[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.error("drain failed (%r); shutting down", task.exception())
        self.should_exit = True
