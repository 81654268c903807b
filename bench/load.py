"""Load benchmark: N simulated Twilio callers in real time against one gateway process on 127.0.0.1.

The gateway runs under uvicorn (one worker) in a subprocess with the echo engine, so what is measured is
the gateway's own cost: transport, framing, resampling, mu-law, marks. For each N it reports the added
latency per 80 ms frame (simulated carrier: sending the 4th 20 ms chunk of a frame -> receiving the
reply's media) and the gateway's CPU per call while all N calls are up.

The gateway runs with its Prometheus metrics on, as it ships, and `GET /metrics` is scraped every
`--scrape-s` (1 s: far more often than Prometheus would); `--metrics off` leaves them out, and
`--metrics both` runs each N twice, off then on, so their cost shows side by side.

    python -m bench.load                      # N = 10, 50, 100, 150, 200; 10 s calls
    python -m bench.load --calls 150 --seconds 20 --procs 4
    python -m bench.load --calls 50 --seconds 6 --procs 1 --metrics both
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from gateway.cli import WS_IMPLEMENTATION

REPO = Path(__file__).resolve().parents[1]
CLK_TCK = os.sysconf("SC_CLK_TCK")
MAX_CALLS = 400  # bound: the benchmark refuses to flood the machine beyond this
MAX_SECONDS = 120
METRICS_KEY = "bench-metrics-key"  # the control key the gateway under test is given, to scrape /metrics


@dataclass
class RunResult:
    calls: int
    latencies_ms: np.ndarray
    frames_expected: int
    frames_received: int
    violations: int
    failed_calls: int
    window_s: float
    server_cpu_s: float
    carrier_cpu_s: float
    scrapes: int = 0  # successful GET /metrics while the calls ran

    @property
    def cpu_per_call_pct(self) -> float:
        """Gateway CPU per call, in percent of one core, over the window when all calls were up."""
        return 100.0 * self.server_cpu_s / self.window_s / self.calls if self.window_s > 0 else float("nan")


# --- the gateway under test -------------------------------------------------------------------------


def serve(port: int, ws: str, loop: str, metrics: bool = True) -> None:
    """Run the gateway on 127.0.0.1:port with the echo engine (the benchmark's subprocess)."""
    import uvicorn

    from engine.echo import EchoEngine
    from gateway.config import load_config
    from gateway.edge.app import create_app

    app = create_app(load_config(env={}), EchoEngine(), metrics=metrics)
    uvicorn.run(app, host="127.0.0.1", port=port, ws=ws, loop=loop, log_level="error", ws_max_size=1 << 20)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime + stime


def _wait_healthy(port: int, timeout_s: float = 30.0) -> None:
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"gateway on port {port} did not become healthy in {timeout_s} s")


# --- the simulated carrier side ---------------------------------------------------------------------


def _callers(url: str, count: int, seconds: float, stagger_s: float, offset: int, total: int) -> dict:
    """One carrier process: `count` concurrent calls, started evenly over `stagger_s`."""
    import warnings

    warnings.simplefilter("ignore", DeprecationWarning)
    from gateway.simulator.call import simulate_call

    rng = np.random.default_rng(offset)
    audio = (rng.standard_normal(int(seconds * 8000)) * 800).astype(np.int16)  # quiet noise

    async def one(i: int) -> dict:
        await asyncio.sleep(stagger_s * (offset + i) / total)
        try:
            s = await simulate_call(url, audio, tail_s=0.0, connect_timeout_s=20.0)
        except Exception as exc:  # a refused or broken call is a result, not a crash
            return {"failed": repr(exc)}
        return {
            "latencies": s.frame_latencies_ms[12:],  # skip the first second: connection warm-up
            # The reply to the last frame races the caller's stop, so it is not expected.
            "expected": (s.media_sent - 1) // 4,
            "received": min(s.media_received, (s.media_sent - 1) // 4),
            "violations": len(s.violations),
            "failed": None if s.handshake_status == 101 and s.closed_by == "carrier" else s.closed_by,
        }

    async def run() -> list[dict]:
        return await asyncio.gather(*(one(i) for i in range(count)))

    cpu0 = time.process_time()
    results = asyncio.run(run())
    return {"results": results, "cpu_s": time.process_time() - cpu0}


def _scrape(port: int, every_s: float, stop: threading.Event, counted: list[int]) -> None:
    """GET /metrics every `every_s` until `stop`; counts the answers that were 200."""
    import httpx

    headers = {"Authorization": f"Bearer {METRICS_KEY}"}
    with httpx.Client(headers=headers, timeout=5.0) as client:
        while not stop.wait(every_s):
            try:
                if client.get(f"http://127.0.0.1:{port}/metrics").status_code == 200:
                    counted[0] += 1
            except httpx.HTTPError:
                pass


def run_load(
    calls: int,
    seconds: float,
    procs: int,
    ws: str,
    loop: str,
    metrics: bool = False,
    scrape_s: float = 1.0,
) -> RunResult:
    port = _free_port()
    env = dict(os.environ, PYTHONPATH=str(REPO), DUPLEXGATE_API_KEY=METRICS_KEY)
    cmd = [sys.executable, "-m", "bench.load", "serve", "--port", str(port), "--ws", ws, "--loop", loop]
    cmd += ["--metrics", "on" if metrics else "off"]
    log = open(Path(os.environ.get("TMPDIR", "/tmp")) / f"duplexgate-load-{calls}.log", "wb")  # noqa: SIM115
    server = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    stop, scrapes = threading.Event(), [0]
    scraper = threading.Thread(target=_scrape, args=(port, scrape_s, stop, scrapes), daemon=True)
    try:
        _wait_healthy(port)
        if metrics:
            scraper.start()
        url = f"ws://127.0.0.1:{port}/twilio/media"
        stagger_s = min(1.0, seconds / 4)
        procs = max(1, min(procs, calls))
        shares = [calls // procs + (1 if i < calls % procs else 0) for i in range(procs)]
        offsets = np.cumsum([0, *shares[:-1]]).tolist()
        ctx = multiprocessing.get_context("spawn")
        with ctx.Pool(procs) as pool:
            jobs = [
                pool.apply_async(_callers, (url, n, seconds, stagger_s, off, calls))
                for n, off in zip(shares, offsets, strict=True)
            ]
            # All calls are up from the end of the stagger until the first one ends.
            time.sleep(stagger_s + 0.5)
            cpu0, t0 = _cpu_seconds(server.pid), time.monotonic()
            time.sleep(max(0.0, seconds - stagger_s - 1.0))
            cpu1, t1 = _cpu_seconds(server.pid), time.monotonic()
            outputs = [job.get(timeout=seconds + 60) for job in jobs]
    finally:
        stop.set()
        if scraper.is_alive():
            scraper.join(timeout=10)
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        log.close()
    results = [r for out in outputs for r in out["results"]]
    ok = [r for r in results if r.get("failed") is None]
    return RunResult(
        calls=calls,
        latencies_ms=np.array([x for r in ok for x in r["latencies"]]),
        frames_expected=sum(r["expected"] for r in ok),
        frames_received=sum(r["received"] for r in ok),
        violations=sum(r["violations"] for r in ok),
        failed_calls=len(results) - len(ok),
        window_s=t1 - t0,
        server_cpu_s=cpu1 - cpu0,
        carrier_cpu_s=sum(out["cpu_s"] for out in outputs),
        scrapes=scrapes[0],
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command")
    srv = sub.add_parser("serve", help="(internal) run the gateway under test")
    srv.add_argument("--port", type=int, required=True)
    srv.add_argument("--ws", default=WS_IMPLEMENTATION)
    srv.add_argument("--loop", default="auto")
    srv.add_argument("--metrics", choices=["on", "off"], default="on")
    parser.add_argument("--calls", type=int, nargs="+", default=[10, 50, 100, 150, 200])
    parser.add_argument("--seconds", type=float, default=10.0, help="length of each call")
    parser.add_argument("--procs", type=int, default=max(1, min(4, (os.cpu_count() or 2) - 1)))
    parser.add_argument("--ws", default=WS_IMPLEMENTATION, help="uvicorn WebSocket implementation")
    parser.add_argument(
        "--loop", default="auto", help="uvicorn event loop: auto (uvloop if installed), asyncio"
    )
    parser.add_argument(
        "--metrics",
        choices=["on", "off", "both"],
        default="on",
        help="the gateway's Prometheus metrics (on: /metrics scraped meanwhile); both: off then on per N",
    )
    parser.add_argument("--scrape-s", type=float, default=1.0, help="with metrics on: scrape this often")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)
    if args.command == "serve":
        serve(args.port, args.ws, args.loop, metrics=args.metrics == "on")
        return 0
    if max(args.calls) > MAX_CALLS or not 3 <= args.seconds <= MAX_SECONDS:
        parser.error(f"at most {MAX_CALLS} calls and 3..{MAX_SECONDS} s per call")

    print(
        f"echo engine, one uvicorn worker (ws={args.ws}, loop={args.loop}), {args.seconds:g} s calls, "
        f"{args.procs} carrier processes, {os.cpu_count()} CPUs on this machine, metrics {args.metrics}"
        + (f" (scraped every {args.scrape_s:g} s)" if args.metrics != "off" else "")
    )
    modes = {"off": [False], "on": [True], "both": [False, True]}[args.metrics]
    header = (
        f"{'N':>5} {'metrics':>7} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8} {'frames':>9} {'lost':>6} "
        f"{'viol':>5} {'failed':>6} {'gw CPU/call':>12} {'gw CPU':>7} {'carrier CPU':>12}"
    )
    print(header)
    rows = []
    for n, metrics in ((n, m) for n in args.calls for m in modes):
        r = run_load(n, args.seconds, args.procs, args.ws, args.loop, metrics, args.scrape_s)
        lat = r.latencies_ms
        p50, p99, pmax = (np.percentile(lat, q) for q in (50, 99, 100)) if lat.size else (np.nan,) * 3
        lost = r.frames_expected - r.frames_received
        gw_cores = r.server_cpu_s / r.window_s
        shown = f"on/{r.scrapes}" if metrics else "off"
        print(
            f"{n:>5} {shown:>7} {p50:>8.2f} {p99:>8.2f} {pmax:>8.1f} {lat.size:>9} {lost:>6} "
            f"{r.violations:>5} {r.failed_calls:>6} {r.cpu_per_call_pct:>11.2f}% {100 * gw_cores:>6.0f}% "
            f"{r.carrier_cpu_s / args.seconds * 100:>11.0f}%",
            flush=True,
        )
        rows.append(
            {
                "calls": n,
                "metrics": metrics,
                "scrapes": r.scrapes,
                "p50_ms": p50,
                "p99_ms": p99,
                "max_ms": pmax,
                "frames": int(lat.size),
                "frames_lost": lost,
                "violations": r.violations,
                "failed_calls": r.failed_calls,
                "gateway_cpu_per_call_pct": r.cpu_per_call_pct,
                "gateway_cpu_pct": 100 * gw_cores,
            }
        )
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
