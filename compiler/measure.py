"""What `optimize` measures about the model it compiled: quality on evaluation text and, on the
host, eager against compiled prefill time. Both are stored in the compiler's SQLite store under
the graph's fingerprint, the target, the plan and the length, so a rerun reuses them
(`--remeasure` measures again).

Evaluation text comes from MODEL.py: `evaluation_sets(window, count)` (a dict of named sets,
e.g. one per text) or else `evaluation_batches(window, count)` (one set). The reference is the
captured graph run in ATen, the candidate the compiled executable: the same inputs, flattened
the same way.
"""

from __future__ import annotations

import hashlib
import inspect
import statistics
import time
from types import ModuleType
from typing import Any, Callable

import torch
import torch.fx as fx

from compiler.budget import Budget
from compiler.errors import UserInputError
from compiler.ir import graph_fingerprint, weights_fingerprint
from compiler.planner import lm_logits, nll_sum

VERSION = 1
REPEATS = 3


def run_key(gm: fx.GraphModule, target: str, plan: str, length: int) -> str:
    """Names one compiled plan of one captured model at one length."""
    graph = graph_fingerprint(gm)
    return hashlib.sha256(repr((VERSION, graph, weights_fingerprint(gm), target, plan, length)).encode()).hexdigest()


def cached(store: Any, kind: str, key: str, remeasure: bool, measure: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """The stored measurement, or a new one (stored)."""
    if not remeasure:
        stored = store.get(f"optimize_{kind}", key)
        if stored is not None:
            return {**stored, "from_cache": True}
    value = measure()
    store.put(f"optimize_{kind}", key, value)
    return {**value, "from_cache": False}


def evaluation_sets(module: ModuleType, window: int, count: int) -> dict[str, list[Any]]:
    """Named lists of model inputs of `window` tokens from MODEL.py; {} when it defines none."""
    if callable(getattr(module, "evaluation_sets", None)):
        return {name: list(batches) for name, batches in module.evaluation_sets(window=window, count=count).items()}
    make = getattr(module, "evaluation_batches", None)
    if callable(make):
        params = inspect.signature(make).parameters
        if "window" in params:
            return {"evaluation": list(make(window=window, count=count))}
    return {}


def evaluate(captured: Any, executable: Callable[..., Any], sets: dict[str, list[Any]], budget: Budget) -> dict[str, Any]:
    """Per set: perplexity of the captured and of the compiled model, the increase, top-1
    agreement, and whether the increase fits the budget."""
    texts = {}
    length = windows = 0
    for name, batches in sets.items():
        nll_ref = nll = agree = tokens = 0.0
        for batch in batches:
            flat = captured.flatten_example(batch)
            ids, ref = lm_logits(captured.gm, flat)
            _, cand = lm_logits(executable, flat)
            nll_ref += nll_sum(ref, ids)
            nll += nll_sum(cand, ids)
            agree += float((ref[0, :-1].argmax(-1) == cand[0, :-1].argmax(-1)).sum())
            tokens += ids.shape[1] - 1
            length = ids.shape[1]
            del ref, cand
        windows = len(batches)
        ppl_ref, ppl = float(torch.tensor(nll_ref / tokens).exp()), float(torch.tensor(nll / tokens).exp())
        increase, top1 = ppl / ppl_ref - 1.0, agree / tokens
        texts[name] = {"ppl_reference": ppl_ref, "ppl_candidate": ppl, "ppl_increase": increase, "top1_agreement": top1, "tokens": int(tokens), "within_budget": budget.allows(increase, top1)}
    return {"length": length, "windows": windows, "texts": texts}


def prefill_speed(model: torch.nn.Module, captured: Any, executable: Callable[..., Any], module: ModuleType, length: int, repeats: int = REPEATS) -> dict[str, Any]:
    """Eager PyTorch against the compiled executable on one prefill of `length` tokens of
    calibration text, run alternately (one warm-up each, then `repeats` pairs): medians and
    their ratio."""
    batch = _one_batch(module, length)
    flat = captured.flatten_example(batch)
    kwargs = batch if isinstance(batch, dict) else None

    def eager() -> None:
        with torch.no_grad():
            model(**kwargs) if kwargs is not None else model(*batch)

    def compiled() -> None:
        with torch.no_grad():
            executable(*flat)

    times: dict[str, list[float]] = {"eager": [], "compiled": []}
    eager(), compiled()
    for _ in range(repeats):
        for name, fn in (("eager", eager), ("compiled", compiled)):
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    e, c = statistics.median(times["eager"]), statistics.median(times["compiled"])
    return {"length": length, "repeats": repeats, "eager_s": e, "compiled_s": c, "measured_speedup": e / c, "eager_runs": times["eager"], "compiled_runs": times["compiled"]}


def _one_batch(module: ModuleType, length: int) -> Any:
    make = getattr(module, "calibration_batches", None)
    if callable(make):
        return make(length, 1)[0]
    raise UserInputError("timing a prefill needs MODEL.calibration_batches(window, count) to make an input of that length")
