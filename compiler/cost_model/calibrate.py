"""Measure the host CPU's roofline figures with micro-benchmarks, once per machine.

- matmul FLOP/s per dtype: a square GEMM sized to run ~50 ms (bf16/fp16 GEMMs are slow on many
  CPUs, so each dtype is sized from a small probe first);
- transcendental rate: `exp` on a cache-resident vector;
- bandwidth: a streaming copy swept from 256 KiB to 128 MiB; the cache level is the largest
  working set that still streams at half the best rate or more, memory is the largest size;
- launch overhead: the per-node time of an fx GraphModule of tiny adds, which is how our
  compiled graphs dispatch each ATen op.

Peaks are the best of several repeats (the machine is shared; interference only slows things
down). Results are cached in the compiler's SQLite store keyed by CPU model, core count,
thread count and torch version; the whole calibration takes about 10 s.
"""

from __future__ import annotations

import hashlib
import os
import platform
import sys
import time
from typing import Any, Callable

import torch

from compiler.cache import Store
from compiler.targets import Hardware

CALIBRATION_VERSION = 1
_NAMESPACE = "host-calibration"


def host_hardware(refresh: bool = False, store: Store | None = None) -> Hardware:
    """This machine's figures, from the cache or measured now (and cached)."""
    store = store or Store()
    key = machine_key()
    data = None if refresh else store.get(_NAMESPACE, key)
    if not _valid(data):
        print("calibrating host cost model (one-time, ~10 s)...", file=sys.stderr, flush=True)
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


def _best_time(fn: Callable[[], Any], repeats: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def measure() -> dict[str, Any]:
    with torch.inference_mode():
        return {
            "version": CALIBRATION_VERSION,
            "matmul_flops": {name: _gemm_rate(dtype) for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16), ("fp16", torch.float16))},
            "transcendentals": _exp_rate(),
            **_bandwidths(),
            "memory_bytes": float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")),
            "launch_overhead": _dispatch_overhead(),
            "threads": torch.get_num_threads(),
        }


def _gemm_rate(dtype: torch.dtype, seconds: float = 0.05) -> float:
    n = 128
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    rate = 2 * n**3 / _best_time(lambda: a @ b, 3)
    n = int(min(2048, max(128, (rate * seconds / 2) ** (1 / 3))))
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    return 2 * n**3 / _best_time(lambda: a @ b, 5)


def _exp_rate() -> float:
    x = torch.randn(1 << 18)
    out = torch.empty_like(x)
    return x.numel() / _best_time(lambda: torch.exp(x, out=out), 20)


def _bandwidths() -> dict[str, float]:
    sweep = []
    for shift in range(16, 26):  # 256 KiB .. 128 MiB per buffer (fp32)
        x = torch.randn(1 << shift)
        y = torch.empty_like(x)
        moved = 2 * x.numel() * 4
        sweep.append((moved, moved / _best_time(lambda: y.copy_(x), 10 if shift < 22 else 4)))
    best = max(bw for _, bw in sweep)
    in_cache = [(ws, bw) for ws, bw in sweep if bw >= 0.5 * best]
    cache_bytes = max(ws for ws, _ in in_cache)
    cached = sorted(bw for _, bw in in_cache)
    return {
        "cache_bytes": float(cache_bytes),
        "cache_bandwidth": cached[len(cached) // 2],
        "memory_bandwidth": sweep[-1][1],
    }


def _dispatch_overhead(nodes: int = 200) -> float:
    graph = torch.fx.Graph()
    x = graph.placeholder("x")
    for _ in range(nodes):
        x = graph.call_function(torch.ops.aten.add.Tensor, (x, 1.0))
    graph.output(x)
    gm = torch.fx.GraphModule(torch.nn.Module(), graph)
    tiny = torch.zeros(4)
    return _best_time(lambda: gm(tiny), 20) / nodes
