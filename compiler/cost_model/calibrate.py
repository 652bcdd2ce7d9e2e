"""Measure the host CPU's roofline figures with micro-benchmarks, once per machine.

- matmul FLOP/s per dtype: a square GEMM of ~20 ms (at most 1024: past the size where a CPU GEMM
  peaks; bf16/fp16 GEMMs are slow on many CPUs, so each dtype is sized from a small probe); the
  vector rate is the fp32 GEMM's (both run on the same FMA units);
- transcendental rate: `exp` over 2^18 floats (1 MiB: cache-resident, every thread busy);
- cache: the last-level cache's capacity as the OS reports it (sysfs), its bandwidth a streaming
  copy whose working set (read + written) is a quarter of it. Without sysfs, a sweep of copies
  from 512 KiB to 256 MiB finds the level;
- memory bandwidth: a read-only stream (`sum`) over eight times the cache (at least 256 MiB).
  What reaches memory in inference is mostly reads of constants: weights, the KV cache (a GEMV
  over a cold weight streams at this rate; a copy's figure, which counts the written half too,
  reads higher than any read reaches);
- launch overhead: one call of a plain ATen op (`add`) on 4-element tensors, from Python, which
  is how our compiled graphs (fx GraphModules) dispatch each op;
- `dispatch`, the host-only costs of `compiler.cost_model.work.Work.host`: per event, the extra
  time of a call that wraps a Python number (`add(t, 0.5)`), reduces (`sum`), indexes
  (`index` with one index tensor), concatenates (`cat`) or builds a tensor from options (`full`)
  over a plain `add`; per element, the extra time of `sin` over `exp`, the time of a comparison
  with a broadcast operand (`le(row, col)`, a scalar loop), and of a loop row (copying 8192 rows
  of 32 floats into a narrowed slice, less the same copy done contiguously); and per parallel
  region, the extra time of an `add` (or a `sum`) over GRAIN_SIZE + 1 elements, which PyTorch
  splits across threads, over one over GRAIN_SIZE, which it runs on one; per byte of a weight
  that a matrix-vector product (`mm` of one row) streams from memory, the extra time over the
  read-only stream (BLAS runs it on one thread here).

The machine may be shared. While another process keeps a core busy, every op PyTorch runs on two
or more OpenMP threads waits a scheduler tick (~4 ms) for a thread that is not running, so a
micro-benchmark can read 10-100x slow; other processes also take memory bandwidth. `Quiet` waits
for a free machine before each batch and rates the batch by its threads' run-queue delay. Every
benchmark runs in interleaved rounds, each a batch of calls (its statistic: the fastest call for
throughputs, the median for per-call costs), and a figure is the best batch over the rounds:
interference only slows things down. Benchmarks without a clean batch get extra rounds. Results
are cached in the compiler's SQLite store keyed by CPU model, core count, thread count and torch
version; a calibration takes 10-30 s, depending on how busy the machine is.
"""

from __future__ import annotations

import hashlib
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from compiler.cache import Store
from compiler.targets import Hardware

CALIBRATION_VERSION = 2
GRAIN_SIZE = 32768  # at::internal::GRAIN_SIZE
_NAMESPACE = "host-calibration"
ROUNDS = 7


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


def best_of(*measurements: dict[str, Any]) -> dict[str, Any]:
    """Several calibrations of this machine as one: each figure at its best (the highest rates,
    the lowest fixed costs), since interference only ever makes a figure worse."""
    first = measurements[0]
    out = dict(first)
    out["matmul_flops"] = {d: max(m["matmul_flops"][d] for m in measurements) for d in first["matmul_flops"]}
    for key in ("transcendentals", "cache_bandwidth", "memory_bandwidth"):
        out[key] = max(m[key] for m in measurements)
    out["launch_overhead"] = min(m["launch_overhead"] for m in measurements)
    out["dispatch"] = {k: min(m["dispatch"][k] for m in measurements) for k in first["dispatch"]}
    out["waited_s"] = sum(m.get("waited_s", 0.0) for m in measurements)
    return out


def remember(data: dict[str, Any], store: Store | None = None) -> Hardware:
    """Cache `data` as this machine's calibration (what `host_hardware` returns from now on)."""
    (store or Store()).put(_NAMESPACE, machine_key(), data)
    return hardware_from(data)


def cached(store: Store | None = None) -> dict[str, Any] | None:
    """This machine's cached calibration, if a valid one is stored."""
    data = (store or Store()).get(_NAMESPACE, machine_key())
    return data if _valid(data) else None


def machine_key() -> str:
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    parts = (cpu, os.cpu_count(), torch.get_num_threads(), torch.__version__, CALIBRATION_VERSION)
    return hashlib.sha256(repr(parts).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class HostHardware(Hardware):
    """The host's figures, plus the framework costs that only a CPU host pays per op call
    (seconds per event, by kind; see `compiler.cost_model.work.Work.host`)."""

    dispatch: dict[str, float] = field(default_factory=dict)


def hardware_from(data: dict[str, Any]) -> Hardware:
    return HostHardware(
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
        dispatch=dict(data["dispatch"]),
    )


def _valid(data: Any) -> bool:
    keys = ("matmul_flops", "transcendentals", "memory_bandwidth", "memory_bytes", "launch_overhead", "threads", "cache_bytes", "cache_bandwidth", "dispatch")
    return isinstance(data, dict) and data.get("version") == CALIBRATION_VERSION and all(k in data for k in keys)


# -- a shared machine -----------------------------------------------------------------------


class Quiet:
    """Whether the machine was free while something was timed.

    Two signals, both cheap:

    - run-queue delay: the kernel counts, per thread, the time it was runnable but waiting for
      a CPU (`/proc/self/task/*/schedstat`, second field). A batch of calls is clean when our
      threads waited less than 5% of its duration (plus 20 us for waking the thread pool).
    - a probe: a parallel 1 MiB copy (median of 5). It is free when within 3x of the best probe
      seen and within 16x of a copy of 1/8 the size that PyTorch runs on one thread (below its
      parallel grain of 32768 elements): eight of those, with 2x to spare, bound the parallel
      copy from above, so a calibration started on a busy machine does not take a stalled probe
      for its reference. Free (tens of microseconds) and "a thread is waiting for a core"
      (milliseconds) differ by two orders of magnitude. Used to wait for a free machine before
      a batch, where the schedstat file is missing, too.

    `wait()` probes until the machine is free or `budget_s` (over the object's life) is spent.
    """

    def __init__(self, budget_s: float = 15.0) -> None:
        self.x = torch.randn(1 << 18)
        self.y = torch.empty_like(self.x)
        self.x1, self.y1 = self.x[: 1 << 15], self.y[: 1 << 15]
        self.serial = min(min(call_times(lambda: self.y1.copy_(self.x1), 20)) for _ in range(3))
        self.best = float("inf")
        self.budget_s = budget_s
        self.waited_s = 0.0
        self.has_schedstat = run_delay() is not None
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

    def batch(self, fn: Callable[[], Any], calls: int) -> tuple[list[float], float]:
        """Times of `calls` calls, and how disturbed they were: the run-queue delay of our
        threads over the batch's duration (0 when clean; inf when the probes say busy)."""
        free = self.wait()
        before = run_delay()
        times = call_times(fn, calls)
        after = run_delay()
        if not free or not self.free(self.probe()):
            return times, float("inf")
        if before is None or after is None:
            return times, 0.0
        return times, max(0.0, after - before - 20e-6) / max(sum(times), 1e-9)

    @staticmethod
    def clean(disturbed: float) -> bool:
        return disturbed <= 0.05


def run_delay() -> float | None:
    """Seconds this process's threads have spent runnable but not running, or None."""
    total = 0
    try:
        for path in Path("/proc/self/task").iterdir():
            try:
                total += int((path / "schedstat").read_text().split()[1])
            except (OSError, IndexError, ValueError):
                continue
    except OSError:
        return None
    return total / 1e9


def call_times(fn: Callable[[], Any], calls: int) -> list[float]:
    """Seconds of each of `calls` back-to-back calls."""
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


class _Rounds:
    """Best batch per benchmark over interleaved rounds; benchmarks without a clean batch get up
    to as many rounds again."""

    def __init__(self, quiet: Quiet) -> None:
        self.quiet = quiet
        self.batches: dict[str, list[tuple[float, float]]] = {}

    def run(self, benches: dict[str, tuple[Callable[[], Any], int, Callable[[list[float]], float]]], rounds: int) -> dict[str, float]:
        for fn, _, _ in benches.values():
            fn()  # warm-up: allocation, lazy initialization, caches
        names = list(benches)
        for r in range(2 * rounds):
            todo = names if r < rounds else [n for n in names if self.clean_counts()[n] == 0]
            for name in todo if r % 2 == 0 else reversed(todo):
                fn, calls, stat = benches[name]
                times, disturbed = self.quiet.batch(fn, calls)
                self.batches.setdefault(name, []).append((disturbed, stat(times)))
        return {name: self.best(name) for name in names}

    def best(self, name: str) -> float:
        return min(value for _, value in self.batches[name])

    def clean_counts(self) -> dict[str, int]:
        return {name: sum(Quiet.clean(d) for d, _ in b) for name, b in self.batches.items()}


# -- the measurements -----------------------------------------------------------------------


def measure() -> dict[str, Any]:
    with torch.inference_mode():
        quiet = Quiet()
        rounds = _Rounds(quiet)
        gemms = {name: _gemm(dtype) for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16), ("fp16", torch.float16))}
        cache_bytes = llc_bytes()
        ws_cache = cache_bytes // 4 if cache_bytes else 8 << 20
        ws_memory = max(8 * cache_bytes, 256 << 20) if cache_bytes else 256 << 20
        cache_copy = _copy(ws_cache)
        stream = torch.randn(ws_memory // 4)
        matrix, vector = stream.view(-1, 1024), torch.randn(1, 1024)  # a weight of the same size
        x = torch.randn(1 << 18)
        out = torch.empty_like(x)
        row, col = torch.arange(512).view(1, 512), torch.arange(512).view(512, 1)
        mask = torch.empty(512, 512, dtype=torch.bool)
        rows_src, rows_dst = torch.randn(8192, 32), torch.empty(8192, 32)
        narrow = torch.empty(8192, 64)[:, :32]
        below, above = torch.randn(GRAIN_SIZE), torch.randn(GRAIN_SIZE + 1)  # one thread; all threads
        below_out, above_out = torch.empty_like(below), torch.empty_like(above)
        benches = {
            **{f"gemm_{name}": (fn, 3, min) for name, (fn, _) in gemms.items()},
            "exp": (lambda: torch.exp(x, out=out), 20, min),
            "sin": (lambda: torch.sin(x, out=out), 20, min),
            "scalar_loop": (lambda: torch.le(row, col, out=mask), 10, min),
            "rows_strided": (lambda: narrow.copy_(rows_src), 10, min),
            "serial_add": (lambda: torch.add(below, below, out=below_out), 100, statistics.median),
            "parallel_add": (lambda: torch.add(above, above, out=above_out), 100, statistics.median),
            "serial_sum": (lambda: torch.sum(below), 100, statistics.median),
            "parallel_sum": (lambda: torch.sum(above), 100, statistics.median),
            "rows_contiguous": (lambda: rows_dst.copy_(rows_src), 10, min),
            "cache": (cache_copy, 10, min),
            "memory": (lambda: torch.sum(stream), 3, min),
            "gemv": (lambda: torch.mm(vector, matrix.t()), 3, min),
            **{f"dispatch_{kind}": (fn, 200, statistics.median) for kind, fn in _dispatch_calls().items()},
        }
        best = rounds.run(benches, ROUNDS)
        launch = best["dispatch_launch"]
        data = {
            "version": CALIBRATION_VERSION,
            "matmul_flops": {name: flops / best[f"gemm_{name}"] for name, (_, flops) in gemms.items()},
            "transcendentals": x.numel() / best["exp"],
            "cache_bytes": float(cache_bytes),
            "cache_bandwidth": ws_cache / best["cache"],
            "memory_bandwidth": ws_memory / best["memory"],
            "memory_bytes": float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")),
            "launch_overhead": launch,
            "dispatch": {
                "op": launch,
                **{kind: max(0.0, best[f"dispatch_{kind}"] - launch) for kind in _dispatch_calls() if kind != "launch"},
                "trig": max(0.0, (best["sin"] - best["exp"]) / x.numel()),
                "scalar_loop": best["scalar_loop"] / mask.numel(),
                "rows": max(0.0, (best["rows_strided"] - best["rows_contiguous"]) / rows_src.shape[0]),
                "parallel": max(0.0, best["parallel_add"] - best["serial_add"]),
                "parallel_reduction": max(0.0, best["parallel_sum"] - best["serial_sum"]),
                "gemv_bytes": max(0.0, best["gemv"] / matrix.nbytes - best["memory"] / stream.nbytes),
            },
            "threads": torch.get_num_threads(),
            "waited_s": quiet.waited_s,
            "clean_rounds": rounds.clean_counts(),
        }
        if not cache_bytes:
            data.update(_sweep(quiet))
        return data


def _dispatch_calls() -> dict[str, Callable[[], Any]]:
    """One call of each kind of op on tiny tensors, as a compiled graph makes it (the ATen
    overload, from Python): `launch` is a plain pointwise op; each other kind's extra cost is its
    time less a launch's (`full`'s kernel, the fill, is its launch)."""
    aten = torch.ops.aten
    t, i = torch.zeros(4), torch.tensor([0, 2])
    cpu = torch.device("cpu")
    return {
        "launch": lambda: aten.add.Tensor(t, t),
        "scalar": lambda: aten.add.Tensor(t, 0.5),
        "reduction": lambda: aten.sum.dim_IntList(t, [-1], True),
        "factory": lambda: aten.full.default([4], 1.0, device=cpu, pin_memory=False),
        "index": lambda: aten.index.Tensor(t, [i]),
        "concat": lambda: aten.cat.default([t, t], -1),
    }


def _gemm(dtype: torch.dtype, seconds: float = 0.02) -> tuple[Callable[[], Any], float]:
    """A square GEMM of `dtype` sized to take about `seconds` (from a quick probe; at most
    1024, which is past the size where a CPU GEMM reaches its peak), and its FLOPs. Short
    GEMMs, many of them, so that some run while the machine is free."""
    n = 128
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    a @ b
    rate = 2 * n**3 / min(call_times(lambda: a @ b, 3))
    n = int(min(1024, max(128, (rate * seconds / 2) ** (1 / 3)))) // 64 * 64 or 64
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
