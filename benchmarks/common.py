"""Shared benchmark helpers: interleaved timing (median of repeats), environment info, JSON output."""

from __future__ import annotations

import importlib.util
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import torch


def time_interleaved(fns: dict[str, Callable[[], Any]], repeats: int, warmup: int = 1) -> dict[str, list[float]]:
    """Seconds per call of each function (`repeats` samples), timed in interleaved rounds.

    Each round calls every function once (the order reversed on alternate rounds), so drift in
    machine load lands on all of them alike. `warmup` untimed rounds come first.
    """
    names = list(fns)
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(warmup + repeats):
        for name in names if r % 2 == 0 else reversed(names):
            start = time.perf_counter()
            fns[name]()
            elapsed = time.perf_counter() - start
            if r >= warmup:
                times[name].append(elapsed)
    return times


def summarize(samples: list[float]) -> dict[str, float]:
    """Median (the figure to quote) and min (least disturbed by other load) of timing samples."""
    return {"median": statistics.median(samples), "min": min(samples)}


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def env_info() -> dict[str, Any]:
    """What the numbers depend on: torch version, thread count, CPU, Python, current load."""
    return {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "cpu": _cpu_name(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "loadavg_1_5_15": os.getloadavg(),  # other work on the machine skews every timing
    }


def finish(payload: dict[str, Any], goals: Callable[[dict[str, Any]], dict[str, Any]], start: float, path: str | None) -> None:
    """Every benchmark's last step: its goals and run time into the payload, the JSON written
    where asked, and the goals printed."""
    payload["goals"] = goals(payload)
    payload["seconds"] = time.perf_counter() - start
    if path:
        write_json(path, payload)
    print(json.dumps(payload["goals"], indent=2))


def write_json(path: str | Path, payload: dict[str, Any]) -> Path:
    """Write `payload` as indented JSON, creating parent folders."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    return out


REPO = Path(__file__).resolve().parents[1]


def load_smollm2() -> ModuleType:
    """`examples/smollm2.py` as a module (its `model()`, `tokenizer()`, batches)."""
    spec = importlib.util.spec_from_file_location("smollm2_example", REPO / "examples" / "smollm2.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def capture_lm_forward(model: Any, last_only: bool) -> Any:
    """A causal LM's forward captured with a symbolic sequence length (2..8192 tokens), input
    `input_ids` alone (one unpadded sequence); all logits, or the last position's
    (`logits_to_keep=1`, as a prefill runs)."""
    from compiler.capture import capture_export

    seq = torch.export.Dim("seq", min=2, max=8192)
    kwargs: dict[str, Any] = {"input_ids": torch.zeros(1, 256, dtype=torch.int64)}
    dynamic: dict[str, Any] = {"input_ids": {1: seq}}
    if last_only:
        kwargs["logits_to_keep"], dynamic["logits_to_keep"] = 1, None
    return capture_export(model, (), kwargs, dynamic_shapes=dynamic)

