"""Benchmark of the engine's BatchRunner: step time versus active sessions, prompt prefill one pass versus
position by position, and the memory each session holds.

Run `python bench/engine.py` (the tiny random checkpoint that `duplexgate serve` runs as its demo, on CPU,
about a minute on one thread; `--capacity 8 --batches 1,2,4,8` is the demo engine itself) or, on a GPU,
`python bench/engine.py --device cuda --size real` (the published 7B sizes with random weights).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.api import Sampling  # noqa: E402
from engine.checkpoint import load_models, randomise, write_random_checkpoint  # noqa: E402
from engine.config import FRAME_S, FRAME_SAMPLES, ModelConfig  # noqa: E402
from engine.embedded import slot_count  # noqa: E402
from engine.loading import resolve_checkpoint  # noqa: E402
from engine.model.lm import LMModel  # noqa: E402
from engine.model.mimi import Mimi  # noqa: E402
from engine.model.quantizer import Codebook  # noqa: E402
from engine.prompt import PromptPlan, plan_from_codes  # noqa: E402
from engine.runner import AGENT_CODEBOOKS, BatchRunner, VoicePrefix  # noqa: E402
from engine.scheduler import Scheduler  # noqa: E402

FRAME_MS = 1000 * FRAME_S  # 80 ms: a step slower than this falls behind the call
VOICE_FRAMES = 52  # ~4 s of voice prompt codes, as a published voice has
ROLE_TEXT_TOKENS = 70  # a typical role prompt after the <system> wrapping
SEED = 0


# ---- models ---------------------------------------------------------------------------------------------


def tiny_models(device: torch.device, workdir: Path) -> tuple[LMModel, Mimi, ModelConfig]:
    """The random tiny checkpoint, written to disk and loaded as the engine loads any checkpoint."""
    write_random_checkpoint(workdir, seed=SEED)
    files = resolve_checkpoint(workdir)
    cfg = files.model_config()
    lm, mimi = load_models(files, cfg, device)
    return lm, mimi, cfg


def random_models(cfg: ModelConfig, device: torch.device) -> tuple[LMModel, Mimi]:
    """Models of `cfg` with deterministic random weights made on `device` (LM bf16, Mimi fp32): for the
    published sizes no 17 GB checkpoint has to exist, and a step costs the same whatever the weights."""
    with torch.device("meta"):  # allocate the 8B LM once, directly in bf16 on the device
        lm = LMModel(cfg.lm).to(torch.bfloat16)
    lm = lm.to_empty(device=device)
    with torch.device(device):
        mimi = Mimi(cfg.mimi)
    randomise(lm, SEED)
    randomise(mimi, SEED + 1)
    for module in mimi.modules():
        if isinstance(module, Codebook):
            module.refresh()  # the codebook vectors are derived from the statistics just drawn
    return lm.eval(), mimi.eval()


# ---- workload -------------------------------------------------------------------------------------------


def bench_plan(cfg: ModelConfig, generator: torch.Generator) -> PromptPlan:
    """A prompt of the usual length: 52 voice frames + 6 silence + 70 text tokens + 6 silence positions."""
    codes = torch.randint(0, cfg.lm.card, (VOICE_FRAMES, AGENT_CODEBOOKS), generator=generator)
    text_ids = torch.randint(4, cfg.lm.text_card, (ROLE_TEXT_TOKENS,), generator=generator).tolist()
    return plan_from_codes(codes, text_ids, cfg.lm)


def primed_runner(lm: LMModel, mimi: Mimi, capacity: int, plan: PromptPlan) -> BatchRunner:
    """A runner whose every slot holds a session primed with `plan` (sampling as the published server)."""
    runner = BatchRunner(lm, mimi, capacity)
    prefix: VoicePrefix | None = None
    for slot in range(capacity):
        runner.configure(slot, Sampling(), seed=SEED + slot)
        prefix = runner.prefill(slot, plan, prefix=prefix).prefix
    return runner


class Stopwatch:
    """Median time of a callable; on CUDA the queue is drained before and after each call so the figure is
    the work done, not the launch. The `cpu` clock counts this process's CPU time instead of wall time: on
    a machine shared with other jobs it leaves out the time spent waiting for a core."""

    def __init__(self, device: torch.device, clock: str = "wall") -> None:
        self.cuda = device.type == "cuda"
        self.now = time.process_time if clock == "cpu" else time.perf_counter

    def _sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def median_ms(self, work: Callable[[], object], warmup: int, repeats: int) -> float:
        for _ in range(warmup):
            work()
        times = []
        for _ in range(repeats):
            self._sync()
            start = self.now()
            work()
            self._sync()
            times.append(1000 * (self.now() - start))
        return statistics.median(times)


@dataclass
class StepTimes:
    full_ms: float  # Mimi encode + LM + Mimi decode
    lm_ms: float  # step_codes only
    graphed_ms: float | None = None  # the full step replayed as a CUDA graph (CUDA only)
    spread_ms: float | None = None  # full step with the last session in the runner's last slot
    busy_ms: float | None = None  # full step while another process keeps one CPU core busy (CPU only)

    @property
    def served_ms(self) -> float:
        """What a step costs as the engine serves it: graphed on CUDA, eager elsewhere."""
        return self.full_ms if self.graphed_ms is None else self.graphed_ms


@dataclass
class PrefillTimes:
    one_pass_ms: float
    by_position_ms: float
    cached_prefix_ms: float


@dataclass
class Results:
    shared: dict[int, StepTimes] = field(default_factory=dict)  # B -> times in the capacity-C runner
    sized: dict[int, StepTimes] = field(default_factory=dict)  # B -> times in a runner of capacity B
    prefill: dict[int, PrefillTimes] = field(default_factory=dict)  # runner capacity -> times


def step_inputs(
    runner: BatchRunner, active_count: int, device: torch.device, spread: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Caller audio, the active mask (on the host) and caller codes for a B-session step. Sessions sit in
    slots 0..B-1, as the worker packs them; `spread` moves the last one to the runner's last slot, so the
    step runs at full capacity (how a runner without step sizes always ran)."""
    generator = torch.Generator().manual_seed(SEED + active_count)
    capacity = runner.capacity
    active = torch.zeros(capacity, dtype=torch.bool)
    active[:active_count] = True
    if spread:
        active[active_count - 1], active[capacity - 1] = False, True
    pcm = (0.1 * torch.randn(capacity, FRAME_SAMPLES, generator=generator)).to(device)
    user = torch.randint(0, runner.lm.cfg.card, (capacity, AGENT_CODEBOOKS), generator=generator).to(device)
    return pcm, active, user


def time_steps(
    runner: BatchRunner, active_count: int, watch: Stopwatch, args: argparse.Namespace, device: torch.device
) -> StepTimes:
    pcm, active, user = step_inputs(runner, active_count, device)
    full = watch.median_ms(lambda: runner.step(pcm, active), args.warmup, args.steps)
    lm_only = watch.median_ms(lambda: runner.step_codes(user, active), args.warmup, args.steps)
    times = StepTimes(full, lm_only)
    if active_count < runner.capacity:
        spread_pcm, spread_active, _ = step_inputs(runner, active_count, device, spread=True)
        times.spread_ms = watch.median_ms(
            lambda: runner.step(spread_pcm, spread_active), args.warmup, args.steps
        )
    if device.type == "cpu" and args.busy_core:
        with busy_core():
            times.busy_ms = watch.median_ms(lambda: runner.step(pcm, active), args.warmup, args.steps)
    return times


@contextlib.contextmanager
def busy_core() -> Iterator[None]:
    """Another process spinning on one core meanwhile, as on a machine the engine shares."""
    hog = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.2)  # let it start spinning
        yield
    finally:
        hog.kill()
        hog.wait()


def time_graphed_steps(
    runner: BatchRunner, rows: dict[int, StepTimes], watch: Stopwatch, args: argparse.Namespace
) -> None:
    """Capture the runner's CUDA graphs and time the same steps again, next to the eager figures."""
    device = runner.lm.device
    log(f"capacity {runner.capacity}: capturing CUDA graphs for step sizes {runner.step_sizes}")
    runner.capture_graphs()
    for active_count, times in rows.items():
        pcm, active, _ = step_inputs(runner, active_count, device)
        replay = functools.partial(runner.step, pcm, active)
        times.graphed_ms = watch.median_ms(replay, args.warmup, args.steps)


def time_prefill(runner: BatchRunner, plan: PromptPlan, watch: Stopwatch, repeats: int) -> PrefillTimes:
    """Prefill slot 0 three ways; the other slots keep their sessions."""
    one_pass = watch.median_ms(lambda: runner.prefill(0, plan, one_pass=True), 1, repeats)
    by_position = watch.median_ms(lambda: runner.prefill(0, plan, one_pass=False), 1, repeats)
    prefix = runner.prefill(0, plan).prefix  # as the first session of this voice would have cached it
    cached = watch.median_ms(lambda: runner.prefill(0, plan, prefix=prefix), 1, repeats)
    return PrefillTimes(one_pass, by_position, cached)


def run_timings(
    lm: LMModel, mimi: Mimi, plan: PromptPlan, capacity: int, args: argparse.Namespace, device: torch.device
) -> Results:
    """One runner at a time (on a GPU each full-size slot holds 1.6 GB of KV): the runners sized to each
    B first, then the shared runner of `capacity` with 1..capacity slots active."""
    watch, results = Stopwatch(device, args.clock), Results()
    batches = [b for b in args.batches if b <= capacity]
    for size in [*(b for b in batches if b < capacity), capacity]:
        log(f"capacity {size}: priming {size} slot(s)")
        runner = primed_runner(lm, mimi, size, plan)
        timed: dict[int, StepTimes] = {}
        for active_count in batches if size == capacity else [size]:
            log(f"capacity {size}: stepping with {active_count} active")
            timed[active_count] = times = time_steps(runner, active_count, watch, args, device)
            if size == capacity:
                results.shared[active_count] = times
            if size == active_count:
                results.sized[active_count] = times
        if device.type == "cuda":
            time_graphed_steps(runner, timed, watch, args)
        if size in (1, capacity):
            log(f"capacity {size}: prefill")
            results.prefill[size] = time_prefill(runner, plan, watch, args.prefill_repeats)
        del runner
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return results


# ---- memory ---------------------------------------------------------------------------------------------


def nbytes(tensors: list[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def session_bytes(runner: BatchRunner) -> dict[str, int]:
    """Bytes per slot of each kind of per-session state, from the runner's own tensors."""
    kv = runner.kv
    params = [runner.text_params, runner.audio_params]
    slot_tensors = [runner.next_position, runner.pending, runner.user_delayed, runner.forced_text]
    slot_tensors += [t for p in params for t in (p.greedy, p.temperature, p.top_k, p.seed)]
    totals = {
        "LM KV ring": nbytes([kv.keys, kv.values, kv.positions]),
        "Mimi streaming state": nbytes(runner.mimi_state.tensors()),
        "tokens and sampling settings": nbytes(slot_tensors),
    }
    return {name: total // runner.capacity for name, total in totals.items()}


def meta_runner(cfg: ModelConfig) -> tuple[BatchRunner, int, int]:
    """A one-slot runner of `cfg` on the meta device (shapes only, nothing allocated), with the LM (bf16)
    and Mimi (fp32) weight bytes."""
    with torch.device("meta"):
        lm = LMModel(cfg.lm).to(torch.bfloat16)
        mimi = Mimi(cfg.mimi)
    weights = nbytes(list(lm.state_dict().values())), nbytes(list(mimi.state_dict().values()))
    return BatchRunner(lm, mimi, 1), *weights


# ---- report ---------------------------------------------------------------------------------------------


def log(message: str) -> None:
    print(f"  ... {message}", file=sys.stderr, flush=True)


def readable(n: int) -> str:
    """Bytes in the largest binary unit that keeps the figure at or above 1."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass  # not Linux: the architecture name will do
    return platform.processor() or platform.machine()


def print_header(args: argparse.Namespace, device: torch.device, cfg: ModelConfig, capacity: int) -> None:
    if device.type == "cuda":
        where = f"cuda ({torch.cuda.get_device_name(device)})"
    else:
        where = f"cpu ({cpu_model()}, {os.cpu_count()} logical cores)"
    lm = cfg.lm
    print(f"command:  {shlex.join([sys.executable, *sys.argv])}")
    print(f"torch:    {torch.__version__}    device: {where}    threads: {torch.get_num_threads()}")
    print(
        f"model:    {args.size}: LM dim {lm.dim} x {lm.num_layers} layers, context {lm.context}, "
        f"depformer {lm.depformer_dim} x {lm.depformer_num_layers} layers x {lm.dep_q} steps; "
        f"Mimi SEANet dim {cfg.mimi.seanet.dimension}"
    )
    print(
        f"timing:   {args.clock} clock, median of {args.steps} steps after {args.warmup} warm-up, prefill "
        f"median of {args.prefill_repeats}; shared runner capacity {capacity}; published sampling"
    )


def print_steps(results: Results, capacity: int) -> None:
    print(f"\n1. step time vs active sessions B (real time: a step within {FRAME_MS:.0f} ms)")
    print(f"   shared runner: one runner of capacity {capacity}, sessions in slots 0..B-1; a step runs the")
    print("                  smallest step size (1, 2, 4, ..., capacity) covering them")
    print("   spread:        the shared runner with the last session moved to slot capacity-1 (full size)")
    print("   sized runner:  a runner of capacity B with every slot active (B=1 is the capacity-1 reference)")
    if any(t.busy_ms is not None for t in results.shared.values()):
        print("   1 core busy:   the shared full step again while another process spins on one CPU core")
    graphed = any(t.graphed_ms is not None for t in results.shared.values())
    if graphed:
        print("   graphed:       the same full step replayed from its CUDA graph, as the engine serves it")
    first = min(results.shared)
    header = f"     B | shared full ms  xB={first} | shared LM ms  xB={first} | spread ms  xpacked "
    header += "| full ms/session | 1 core busy ms "
    header += "| sized full ms  xcap1 | sized LM ms  xcap1"
    if graphed:
        header += " | shared graphed ms | sized graphed ms"
    print(header)
    base, ref = results.shared[first], results.sized.get(1)
    for b, shared in sorted(results.shared.items()):
        line = (
            f"  {b:4d} | {shared.full_ms:14.2f} {shared.full_ms / base.full_ms:5.2f} "
            f"| {shared.lm_ms:12.2f} {shared.lm_ms / base.lm_ms:5.2f} "
            f"| {_ms(shared.spread_ms):>9} {_ratio(shared.spread_ms, shared.full_ms):>8} "
            f"| {shared.full_ms / b:15.2f} "
            f"| {_ms(shared.busy_ms):>14} "
        )
        sized = results.sized.get(b)
        if sized is not None and ref is not None:
            line += (
                f"| {sized.full_ms:13.2f} {sized.full_ms / ref.full_ms:5.2f} "
                f"| {sized.lm_ms:11.2f} {sized.lm_ms / ref.lm_ms:5.2f}"
            )
        else:
            line += "| " + " " * 19 + " | " + " " * 17
        if graphed:
            line += f" | {_ms(shared.graphed_ms):>17} | {_ms(sized.graphed_ms if sized else None):>16}"
        print(line)
    if ref is not None:
        print(
            f"   reference, B=1 in a capacity-1 runner: full {ref.full_ms:.2f} ms, LM only {ref.lm_ms:.2f} ms"
        )
    for label, rows in (("shared runner", results.shared), ("sized runners", results.sized)):
        fits = [b for b, t in rows.items() if t.served_ms <= FRAME_MS]
        print(f"   sessions in real time, {label}: {max(fits) if fits else 0} (of B measured)")


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _ratio(value: float | None, base: float) -> str:
    return "-" if value is None else f"{value / base:.2f}"


def print_prefill(results: Results, plan: PromptPlan) -> None:
    print(
        f"\n2. prefill of a {plan.length}-position prompt ({VOICE_FRAMES} voice frames + 6 + "
        f"{ROLE_TEXT_TOKENS} text + 6; {plan.voice_positions} voice-only positions cacheable)"
    )
    print(
        "   runner capacity | one pass ms | by position ms | by position / one pass | cached voice prefix ms"
    )
    for capacity, t in sorted(results.prefill.items()):
        print(
            f"   {capacity:15d} | {t.one_pass_ms:11.2f} | {t.by_position_ms:14.2f} "
            f"| {t.by_position_ms / t.one_pass_ms:22.1f} | {t.cached_prefix_ms:22.2f}"
        )


def print_memory(measured: BatchRunner, size: str) -> None:
    print("\n3. memory per session (bytes of the runner's per-slot tensors / capacity)")
    real, lm_weights, mimi_weights = meta_runner(ModelConfig())
    columns = [(f"{size} (measured runner)", session_bytes(measured))]
    if size != "real":
        columns.append(("real sizes (shapes only)", session_bytes(real)))
    print("   " + " " * 30 + "".join(f"| {label:>26} " for label, _ in columns))
    for kind in columns[0][1]:
        print(f"   {kind:30}" + "".join(f"| {readable(c[kind]):>26} " for _, c in columns))
    print(f"   {'total per session':30}" + "".join(f"| {readable(sum(c.values())):>26} " for _, c in columns))
    lm = ModelConfig().lm
    kv_formula = 2 * lm.num_layers * lm.context * lm.dim * 2
    print(
        f"   real LM KV ring by formula: 2 (k, v) x {lm.num_layers} layers x {lm.context} context x "
        f"{lm.dim} dim x 2 bytes (bf16) = {kv_formula / 2**30:.3f} GiB"
    )
    print(
        f"   real weights (shared by all sessions): LM bf16 {lm_weights / 2**30:.2f} GiB, Mimi fp32 "
        f"{mimi_weights / 2**20:.0f} MiB"
    )


@dataclass
class Target:
    what: str
    measured: float
    limit: float
    at_most: bool  # True: measured <= limit passes; False: measured >= limit passes

    def line(self) -> str:
        met = self.measured <= self.limit if self.at_most else self.measured >= self.limit
        sign = "<=" if self.at_most else ">="
        verdict = "met   " if met else "MISSED"
        return f"   {verdict} {self.what}: {self.measured:.2f} (target {sign} {self.limit:g})"


def targets(results: Results, device: torch.device, size: str) -> list[Target]:
    """The issue's targets that apply to this device and size."""
    found: list[Target] = []
    shared, sized, prefill = results.shared, results.sized, results.prefill
    if device.type == "cpu" and size == "tiny":
        if 1 in shared and 8 in shared:
            found.append(
                Target("B=8 / B=1 step, shared runner", shared[8].full_ms / shared[1].full_ms, 3, True)
            )
        if 1 in sized and 8 in sized:
            found.append(
                Target("B=8 / B=1 step, sized runners", sized[8].full_ms / sized[1].full_ms, 3, True)
            )
        if 2 in shared:  # the demo engine on a 2-core box holds two calls with room to spare
            found.append(Target("B=2 step ms, shared runner (<= 50% of 80 ms)", shared[2].full_ms, 40, True))
            if shared[2].busy_ms is not None:
                found.append(
                    Target("B=2 step ms, one core busy (<= admission's 64 ms)", shared[2].busy_ms, 64, True)
                )
        for capacity, t in sorted(prefill.items()):
            found.append(
                Target(
                    f"one-pass prefill speed-up, capacity {capacity}",
                    t.by_position_ms / t.one_pass_ms,
                    10,
                    False,
                )
            )
    if device.type == "cuda" and size == "real":
        if 1 in sized:
            found.append(Target("B=1 step ms, capacity-1 runner", sized[1].served_ms, 15, True))
        if 1 in shared:
            found.append(Target("B=1 step ms, shared runner", shared[1].served_ms, 15, True))
        if 32 in shared:
            found.append(Target("B=32 step ms, shared runner", shared[32].served_ms, 40, True))
        fits = [b for b, t in shared.items() if t.served_ms <= FRAME_MS]
        found.append(Target("sessions in real time, shared runner", max(fits, default=0), 32, False))
        for capacity, t in sorted(prefill.items()):
            found.append(Target(f"one-pass prefill ms, capacity {capacity}", t.one_pass_ms, 100, True))
    return found


# ---- main -----------------------------------------------------------------------------------------------


def session_counts(text: str) -> list[int]:
    """'1,2,8' -> [1, 2, 8] (sorted, duplicates dropped)."""
    try:
        return sorted({int(part) for part in text.split(",")})
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers like 1,2,4, got '{text}'"
        ) from None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    parser.add_argument(
        "--size",
        choices=("tiny", "real"),
        default="tiny",
        help="tiny: random tiny checkpoint via a temp dir; real: published sizes, random weights, GPU only",
    )
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1, comparable)")
    parser.add_argument(
        "--clock",
        choices=("wall", "cpu"),
        default="wall",
        help="wall (default) or cpu: process CPU time, steadier on a CPU shared with other jobs",
    )
    parser.add_argument("--capacity", type=int, default=32, help="slots of the shared runner (default 32)")
    parser.add_argument(
        "--batches",
        type=session_counts,
        default=[1, 2, 4, 8, 16, 32],
        help="active-session counts, comma separated (default 1,2,4,8,16,32; those above capacity dropped)",
    )
    parser.add_argument(
        "--no-busy-core",
        dest="busy_core",
        action="store_false",
        help="on a CPU, skip re-timing each shared-runner step while another process spins on one core",
    )
    parser.add_argument("--steps", type=int, default=15, help="timed steps per row (default 15)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps before each row (default 3)")
    parser.add_argument("--prefill-repeats", type=int, default=5, help="timed prefills per row (default 5)")
    parser.add_argument(
        "--churn", type=float, default=0, help="seconds of the churn scenario (0: skip; the issue's is 30)"
    )
    parser.add_argument("--churn-calls", type=int, default=4, help="live calls in the churn scenario (4)")
    args = parser.parse_args(argv)
    if args.capacity < 1 or args.steps < 1 or args.warmup < 0 or args.prefill_repeats < 1 or args.threads < 1:
        parser.error("--capacity, --steps, --prefill-repeats and --threads must be >= 1, --warmup >= 0")
    if not args.batches or args.batches[0] < 1:
        parser.error(f"--batches must be positive session counts, got {args.batches}")
    if args.clock == "cpu" and args.device.startswith("cuda"):
        parser.error("--clock cpu counts host CPU time only; use the wall clock with --device cuda")
    return args


# ---- churn: live calls stepping while new calls are primed ----------------------------------------------


@dataclass
class ChurnRun:
    intervals_ms: list[float]  # between a live call's consecutive agent frames
    delays_ms: list[float]  # a frame's arrival -> its agent frame (the step included)
    primes: int
    chunks: int


def churn_plans(cfg: ModelConfig, count: int, generator: torch.Generator) -> list[PromptPlan]:
    """New calls' prompts: a voice of the usual length and 300-1000 text tokens (the issue's churn)."""
    plans = []
    for _ in range(count):
        codes = torch.randint(0, cfg.lm.card, (VOICE_FRAMES, AGENT_CODEBOOKS), generator=generator)
        tokens = int(torch.randint(300, 1001, (1,), generator=generator))
        text_ids = torch.randint(4, cfg.lm.text_card, (tokens,), generator=generator).tolist()
        plans.append(plan_from_codes(codes, text_ids, cfg.lm))
    return plans


def run_churn(
    runner: BatchRunner,
    live: int,
    plans: list[PromptPlan],
    seconds: float,
    mode: str,
    device: torch.device,
    clock: str = "wall",
) -> ChurnRun:
    """`live` calls get a caller frame every 80 ms for `seconds`; every 2 s a new call's prime (`plans`, in
    order) starts in slot `live`. Each tick's step and prime chunk really run, timed; the clock of arrivals
    and deliveries is simulated from those times, so the figures are the engine's and not the host's
    scheduling noise (with the `cpu` clock, the time waiting for a core is left out too). mode: "none" (no
    new calls), "whole" (a prime runs in one piece before the next step, as before chunked priming),
    "chunked" (the worker's scheduler)."""
    watch = Stopwatch(device, clock)
    pcm, active, _ = step_inputs(runner, live, device)
    scheduler, frames, every = Scheduler(), round(seconds / FRAME_S), round(2.0 / FRAME_S)
    now, delivered, result = 0.0, None, ChurnRun([], [], 0, 0)
    job, queue, step_s = None, list(plans) if mode != "none" else [], None

    def timed(work: Callable[..., object], *args: object) -> tuple[object, float]:
        watch._sync()
        start = watch.now()
        value = work(*args)
        watch._sync()
        return value, watch.now() - start

    for k in range(frames):
        arrival = k * FRAME_S
        if k % every == 0 and queue and job is None:
            job = runner.begin_prefill(live, queue.pop(0))
            result.primes += 1
        if mode == "whole" and job is not None:  # the old way: the prime holds the next step back
            now = max(now, arrival) + timed(runner.prefill, live, job.plan)[1]
            job = None
        seconds_step = timed(runner.step, pcm, active)[1]
        step_s = seconds_step if step_s is None else 0.9 * step_s + 0.1 * seconds_step
        done = max(now, arrival) + seconds_step
        if delivered is not None:
            result.intervals_ms.append(1000 * (done - delivered))
        result.delays_ms.append(1000 * (done - arrival))
        delivered = now = done
        if mode == "chunked" and job is not None:
            positions = scheduler.chunk_positions(job.remaining, live, step_s)
            before = job.done
            finished, chunk_s = timed(runner.prefill_chunk, job, positions)
            scheduler.observe_chunk(job.done - before, chunk_s)
            now += chunk_s
            result.chunks += 1
            if finished:
                runner.finish_prefill(job)
                job = None
    return result


def print_churn(lm: LMModel, mimi: Mimi, cfg: ModelConfig, plan: PromptPlan, args, device) -> None:
    live = args.churn_calls
    runner = primed_runner(lm, mimi, live + 1, plan)
    plans = churn_plans(cfg, int(args.churn / 2) + 1, torch.Generator().manual_seed(SEED + 7))
    runs = {
        mode: run_churn(runner, live, plans, args.churn, mode, device)
        for mode in ("none", "whole", "chunked")
    }
    print(
        f"\n5. churn: {live} live calls stepping while a new call with a 300-1000-token prompt is primed"
        f" every 2 s for {args.churn:g} s"
    )
    print("   priming   interval p50  interval p99  interval max   delay p99   delay max   primes  chunks")
    base = statistics.quantiles(runs["none"].intervals_ms, n=100, method="inclusive")[98]
    for mode, run in runs.items():
        q = statistics.quantiles(run.intervals_ms, n=100, method="inclusive")
        d = statistics.quantiles(run.delays_ms, n=100, method="inclusive")
        median = statistics.median(run.intervals_ms)
        print(
            f"   {mode:8s} {median:12.1f} {q[98]:13.1f} {max(run.intervals_ms):13.1f}"
            f" {d[98]:11.1f} {max(run.delays_ms):11.1f} {run.primes:8d} {run.chunks:7d}   ms"
        )
    chunked = statistics.quantiles(runs["chunked"].intervals_ms, n=100, method="inclusive")[98]
    print(
        f"   chunked p99 interval / no-churn p99: {chunked / base:.2f} (target <= 1.25); chunked worst delay "
        f"{max(runs['chunked'].delays_ms):.1f} ms (target <= 80)"
    )


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit(f"bench/engine.py: --device {args.device} asked for, but this torch sees no CUDA device")
    if args.size == "real" and device.type != "cuda":
        sys.exit("bench/engine.py: --size real needs --device cuda (17 GB of weights, 1.6 GB of KV per slot)")
    with tempfile.TemporaryDirectory(prefix="bench-engine-") as workdir:
        log(f"building the {args.size} models on {device}")
        if args.size == "real":
            cfg = ModelConfig()
            lm, mimi = random_models(cfg, device)
        else:
            lm, mimi, cfg = tiny_models(device, Path(workdir))
    capacity = args.capacity
    if device.type == "cuda":
        fitting = slot_count(device, lm)
        if fitting < capacity:
            log(f"only {fitting} slots fit in free GPU memory: shared runner capacity {fitting}")
            capacity = fitting
    if args.batches[0] > capacity:
        sys.exit(
            f"bench/engine.py: every --batches count {args.batches} exceeds the runner capacity {capacity}"
        )
    plan = bench_plan(cfg, torch.Generator().manual_seed(SEED))
    print_header(args, device, cfg, capacity)
    results = run_timings(lm, mimi, plan, capacity, args, device)
    print_steps(results, capacity)
    print_prefill(results, plan)
    print_memory(BatchRunner(lm, mimi, 1), args.size)
    checks = targets(results, device, args.size)
    print("\n4. targets from the issue for this device and size")
    for check in checks:
        print(check.line())
    if not checks:
        print("   none recorded for this device and size")
    if args.churn > 0:
        print_churn(lm, mimi, cfg, plan, args, device)
    if device.type == "cuda":
        print(f"\n   peak GPU memory allocated: {torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB")


if __name__ == "__main__":
    main()
