"""Failed-authentication throttling: an address that keeps presenting bad signatures or keys is refused
(HTTP 429) for the rest of its window without its credentials being checked, so guessing costs the guesser
time and costs us nothing.

Addresses are the peer's as uvicorn reports it; behind a proxy, uvicorn's `--forwarded-allow-ips` decides
whether that is the proxy or the client from `X-Forwarded-For`. The table is bounded: when it is full the
address seen longest ago is forgotten.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable

from starlette.requests import HTTPConnection

MAX_ADDRESSES = 10_000  # addresses remembered at once (one small entry each)


def client_address(connection: HTTPConnection) -> str:
    """The peer address a request or WebSocket is counted under."""
    return connection.client.host if connection.client else "?"


class AuthThrottle:
    """Counts authentication failures per address in fixed windows of `window_s`."""

    def __init__(
        self,
        failures_allowed: int,
        window_s: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
        max_addresses: int = MAX_ADDRESSES,
    ) -> None:
        self.failures_allowed = failures_allowed
        self.window_s = window_s
        self._clock = clock
        self._max = max_addresses
        self._failures: OrderedDict[str, tuple[float, int]] = OrderedDict()  # address -> (window start, n)
        self.refused = 0  # requests turned away without a check, for the operator's eye

    def blocked(self, address: str) -> float:
        """Seconds until `address` may try again (0 when it may try now). Counts the refusal."""
        entry = self._failures.get(address)
        if entry is None:
            return 0.0
        start, count = entry
        left = start + self.window_s - self._clock()
        if left <= 0:
            del self._failures[address]
            return 0.0
        if count < self.failures_allowed:
            return 0.0
        self.refused += 1
        return left

    def retry_after(self, address: str) -> dict[str, str] | None:
        """The `Retry-After` header for an address over its allowance (the refusal is counted), or None
        when it may try now."""
        wait_s = self.blocked(address)
        return {"Retry-After": str(max(1, round(wait_s)))} if wait_s else None

    def failed(self, address: str) -> None:
        """Record one failed authentication from `address`."""
        now = self._clock()
        start, count = self._failures.pop(address, (now, 0))
        if start + self.window_s <= now:
            start, count = now, 0
        self._failures[address] = (start, count + 1)
        while len(self._failures) > self._max:
            self._failures.popitem(last=False)

    def __len__(self) -> int:
        return len(self._failures)
