"""Benchmark of the in-memory call store's record keeping: the cost of one `save_record` (with the oldest
evicted once full) and of one `list_records` page, with 1,000 and with 100,000 records kept, side by side
in one run. Both should stay flat as the store fills: they run on the gateway's event loop.

Run `python bench/store.py`.
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gateway.ops.records import CallRecord  # noqa: E402
from gateway.ops.store import MemoryStore  # noqa: E402

TIMED = 2000


def record(n: int) -> CallRecord:
    return CallRecord(call_id=f"CA{n:032x}", started_at=1_700_000_000.0 + n, agent="bench")


async def timings(kept: int) -> tuple[float, float]:
    store = MemoryStore(records_kept=kept)
    for n in range(kept):  # full: every further save evicts the oldest
        await store.save_record(record(n))
    saves, lists = [], []
    for n in range(kept, kept + TIMED):
        started = time.perf_counter()
        await store.save_record(record(n))
        saves.append(time.perf_counter() - started)
        started = time.perf_counter()
        await store.list_records(limit=50, before=1_700_000_000.0 + n - kept // 2)
        lists.append(time.perf_counter() - started)
    return statistics.median(saves) * 1e6, statistics.median(lists) * 1e6


async def main() -> None:
    print(
        f"command: {' '.join(sys.argv)}; median of {TIMED} saves and page lists (50 records) on a full store"
    )
    print("records kept | save µs | list µs")
    rows = {kept: await timings(kept) for kept in (1_000, 100_000)}
    for kept, (save, page) in rows.items():
        print(f"{kept:12,d} | {save:7.1f} | {page:7.1f}")
    (small_save, small_list), (big_save, big_list) = rows[1_000], rows[100_000]
    print(f"100k / 1k: save {big_save / small_save:.2f}x, list {big_list / small_list:.2f}x")


if __name__ == "__main__":
    asyncio.run(main())
