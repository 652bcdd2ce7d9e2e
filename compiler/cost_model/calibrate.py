"""Measure the host CPU's roofline figures with micro-benchmarks, once per machine.

- matmul FLOP/s per dtype: a square GEMM sized to run ~50 ms (bf16/fp16 GEMMs are slow on many
  CPUs, so each dtype is sized from a small probe first); the vector rate is the fp32 GEMM's
  (both run on the same FMA units);
- transcendental rate: `exp` on a cache-resident vector large enough for every thread;
- cache: the last-level cache's capacity as the OS reports it (sysfs), its bandwidth a streaming
  copy whose working set (read + written) is a quarter of it; memory bandwidth the same copy over
  eight times the cache. Without sysfs, a sweep from 256 KiB to 128 MiB decides the level;
- launch overhead: the time of one call of an ATen op on a 4-element tensor, from Python, which
  is how our compiled graphs (fx GraphModules) dispatch each op.

The machine may be shared. While another process keeps a core busy, every op PyTorch runs on two
or more OpenMP threads waits a scheduler tick (~4 ms) for a thread that is not running, so a
micro-benchmark can read 10-100x slow. `Quiet` detects that state with a probe (a parallel 1 MiB
copy: tens of microseconds when the machine is free, milliseconds when not) and waits it out,
within a budget. Each figure is the best of several rounds spread over the calibration, taken
only when the probe before and after said the machine was free (interference only slows things
down). Results are cached in the compiler's SQLite store keyed by CPU model, core count, thread
count and torch version; the whole calibration takes 10-20 s.
"""

from __future__ import annotations

import hashlib
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

from compiler.cache import Store
from compiler.targets import Hardware

CALIBRATION_VERSION = 2
_NAMESPACE = "host-calibration"
ROUNDS = 5


def host_hardware(refresh: bool = False, store: Store | None = None) -> Hardware:
    """This machine's figures, from the cache or measured now (and cached)."""
    store = store or Store()
    key = machine_key()
    data = None if refresh else store.get(_NAMESPACE, key)
    if not _valid(data):
        print("calibrating host cost model (one-time, ~15 s)...", file=sys.stderr, flush=True)
        data = measure()
        store.put(_NAMESPACE, key, data)
    return hardware_from(data)


def machine_key() -> str:
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    parts = (cpu, os.cpu_count(), torch.get_num_threads(), torch.__version__, CALIBRATION_VERSION)
    return hashlib.sha256(repr(parts).encode()).hexdigest()[:16]


def hardware_from(data: dict[str, Any]) -> Hardware:
    return Hardware(
        matmul_flops=dict(data["matmul_flops"]),
        vector_flops=data["matmul_flops"]["fp32"],
        transcendentals=data["transcendentals"],
        memory_bandwidth=data["memory_bandwidth"],
        memory_bytes=data["memory_bytes"],
        launch_overhead=data["launch_overhead"],
        compute_units=data["threads"],
        achievable={"matmul": 1.0, "vector": 1.0, "memory": 1.0},
        caches=((data["cache_bytes"], data["cache_bandwidth"]),),
        measured=True,
    )


def _valid(data: Any) -> bool:
    keys = ("matmul_flops", "transcendentals", "memory_bandwidth", "memory_bytes", "launch_overhead", "threads", "cache_bytes", "cache_bandwidth")
    return isinstance(data, dict) and data.get("version") == CALIBRATION_VERSION and all(k in data for k in keys)


# -- a shared machine -----------------------------------------------------------------------


class Quiet:
    """Whether the machine is free enough for a timing to mean anything.

    `probe()` times a parallel 1 MiB copy (median of 5). It is free when within 3x of the best
    probe seen and, so that a calibration started on a busy machine does not take a stalled
    probe for its reference, within 16x of a copy of 1/8 the size that PyTorch runs on one
    thread (below its parallel grain of 32768 elements), which cannot stall that way: eight of
    those, with 2x to spare, bound the parallel copy from above. "Free" (tens of microseconds)
    and "a thread of ours is waiting for a core" (milliseconds) differ by two orders of
    magnitude. `wait()` probes until the machine is free or `budget_s` (over the object's
    life) is spent.
    """

    def __init__(self, budget_s: float = 15.0) -> None:
        self.x = torch.randn(1 << 18)
        self.y = torch.empty_like(self.x)
        self.x1, self.y1 = self.x[: 1 << 15], self.y[: 1 << 15]
        self.serial = min(min(call_times(lambda: self.y1.copy_(self.x1), 20)) for _ in range(3))
        self.best = float("inf")
        self.budget_s = budget_s
        self.waited_s = 0.0
        for _ in range(3):
            self.probe()

    def probe(self) -> float:
        t = statistics.median(call_times(lambda: self.y.copy_(self.x), 5))
        self.best = min(self.best, t)
        return t

    def free(self, t: float) -> bool:
        return t <= min(3 * self.best, 16 * self.serial)

    def wait(self) -> bool:
        """Probe until free (True) or out of budget (False)."""
        start = time.perf_counter()
        try:
            while True:
                if self.free(self.probe()):
                    return True
                if self.waited_s + time.perf_counter() - start > self.budget_s:
                    return False
                time.sleep(0.02)
        finally:
            self.waited_s += time.perf_counter() - start


def call_times(fn: Callable[[], Any], calls: int) -> list[float]:
    """Seconds of each of `calls` back-to-back calls."""
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


class _Rounds:
    """Best time per benchmark over interleaved rounds, counting only batches that the probe
    brackets as free (all batches if none was)."""

    def __init__(self, quiet: Quiet) -> None:
        self.quiet = quiet
        self.free: dict[str, list[float]] = {}
        self.any: dict[str, list[float]] = {}

    def run(self, benches: dict[str, tuple[Callable[[], Any], int, Callable[[list[float]], float]]], rounds: int) -> dict[str, float]:
        for fn, _, _ in benches.values():
            fn()  # warm-up: allocation, lazy initialization, caches
        names = list(benches)
        for r in range(rounds):
            for name in names if r % 2 == 0 else reversed(names):
                fn, calls, stat = benches[name]
                before = self.quiet.wait()
                value = stat(call_times(fn, calls))
                self.any.setdefault(name, []).append(value)
                if before and self.quiet.free(self.quiet.probe()):
                    self.free.setdefault(name, []).append(value)
        return {name: min(self.free.get(name) or self.any[name]) for name in names}


# -- the measurements -----------------------------------------------------------------------


def measure() -> dict[str, Any]:
    with torch.inference_mode():
        quiet = Quiet()
        rounds = _Rounds(quiet)
        gemms = {name: _gemm(dtype) for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16), ("fp16", torch.float16))}
        cache_bytes = llc_bytes()
        ws_cache = cache_bytes // 4 if cache_bytes else 8 << 20
        ws_memory = max(8 * cache_bytes, 256 << 20) if cache_bytes else 256 << 20
        copies = {ws: _copy(ws) for ws in (ws_cache, ws_memory)}
        x = torch.randn(1 << 18)
        out = torch.empty_like(x)
        tiny = torch.zeros(4)
        benches = {
            **{f"gemm_{name}": (fn, 2, min) for name, (fn, _) in gemms.items()},
            "exp": (lambda: torch.exp(x, out=out), 20, min),
            "cache": (copies[ws_cache], 10, min),
            "memory": (copies[ws_memory], 2, min),
            "launch": (lambda: torch.ops.aten.add.Tensor(tiny, tiny), 200, statistics.median),
        }
        best = rounds.run(benches, ROUNDS)
        data = {
            "version": CALIBRATION_VERSION,
            "matmul_flops": {name: flops / best[f"gemm_{name}"] for name, (_, flops) in gemms.items()},
            "transcendentals": x.numel() / best["exp"],
            "cache_bytes": float(cache_bytes),
            "cache_bandwidth": ws_cache / best["cache"],
            "memory_bandwidth": ws_memory / best["memory"],
            "memory_bytes": float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")),
            "launch_overhead": best["launch"],
            "threads": torch.get_num_threads(),
            "waited_s": quiet.waited_s,
            "free_rounds": {name: len(rounds.free.get(name, [])) for name in benches},
        }
        if not cache_bytes:
            data.update(_sweep(quiet))
        return data


def _gemm(dtype: torch.dtype, seconds: float = 0.05) -> tuple[Callable[[], Any], float]:
    """A square GEMM of `dtype` sized to take about `seconds` (from a quick probe), and its FLOPs."""
    n = 128
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    a @ b
    rate = 2 * n**3 / min(call_times(lambda: a @ b, 3))
    n = int(min(2048, max(128, (rate * seconds / 2) ** (1 / 3)))) // 64 * 64 or 64
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    return (lambda: a @ b), 2.0 * n**3


def _copy(working_set: int) -> Callable[[], Any]:
    """A streaming copy whose working set (source + destination) is `working_set` bytes."""
    x = torch.randn(max(1, working_set // 8))
    y = torch.empty_like(x)
    return lambda: y.copy_(x)


def llc_bytes() -> int:
    """The largest (last-level) CPU cache's size as the OS reports it; 0 if it does not."""
    sizes = []
    for path in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        try:
            text = path.read_text().strip()
            scale = {"K": 2**10, "M": 2**20, "G": 2**30}.get(text[-1:], 1)
            sizes.append(int(text.rstrip("KMG")) * scale)
        except (OSError, ValueError):
            continue
    return max(sizes, default=0)


def _sweep(quiet: Quiet) -> dict[str, float]:
    """Without sysfs: the cache is the largest working set that still streams at half the best
    rate or more."""
    sizes = [1 << shift for shift in range(19, 29)]  # 512 KiB .. 256 MiB working sets
    best = _Rounds(quiet).run({str(ws): (_copy(ws), 4, min) for ws in sizes}, 3)
    sweep = [(ws, ws / best[str(ws)]) for ws in sizes]
    top = max(bw for _, bw in sweep)
    cached = [(ws, bw) for ws, bw in sweep[:-1] if bw >= 0.5 * top] or sweep[:1]
    return {
        "cache_bytes": float(max(ws for ws, _ in cached)),
        "cache_bandwidth": max(bw for _, bw in cached),
        "memory_bandwidth": min(sweep[-1][1], max(bw for _, bw in cached)),
    }
