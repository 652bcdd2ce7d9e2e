"""Cost-model fidelity on the host CPU: predicted vs measured time of every distinct op of SmolLM2-135M.

Inventory. The real model's ops: the prefill graph captured once by `capture_export` with a
dynamic sequence length and run at each of `--lengths` (default 128, 512, 2048), and one decode
step at position N over a static KV cache of N + 1 slots (`--decode-cache`, default N = 2048),
exported by transformers' `TorchExportableModuleForDecoderOnlyLM` and brought to the same ATen
dialect (`run_decompositions` with capture's decompositions, then capture's normalization). The
cache holds the keys and values of a real N-token prefill run eagerly through the same module
(`--random-cache`: random values instead; timings do not depend on them). Each graph runs on
real text (the start of a calibration text, SmolLM2's tokenizer) in a `torch.fx.Interpreter` that
keeps every `call_function` node the first time its key (op, tensor shapes, dtypes and strides,
non-tensor arguments) is seen, with the very arguments it got: data flows as in the model, so
indices are valid and masks real.

Timing. After a phase has run, its keys are timed in `--rounds` interleaved rounds (each round
visits every key, the order alternating), a batch of back-to-back calls per key per round (as many
as fit in `--round-ms`, at least one), under `torch.inference_mode()` with PyTorch's default
threads. Caches are as a forward leaves them: activations warm (each op's inputs were just
written), constants cold (weights and the static KV cache: a forward touches each once and they
far exceed the last-level cache). For that, a key with constant arguments cycles through clones of
them, enough that each call finds its constants evicted (`--hot` times everything hot).

The host is shared, and another job keeping a core busy makes any op PyTorch runs on two OpenMP
threads 10-100x slower (its second thread waits a scheduler tick); other jobs also share the
memory bandwidth. `calibrate.Quiet` waits for a free machine before each batch (within `--wait`
seconds in all) and rates each batch by the run-queue delay of our threads; a disturbed batch of
a short op is retried. `measured_s` is the median of the key's quietest batch: the median drops
the odd preempted call, and interference only ever slows a batch down, so the quietest batch is
the machine's own speed (the calibration takes its figures the same way). Beside it each row has
the median over all clean batches, the fastest call, every batch's median and the page faults
per call; the JSON's `clean_fraction` tells how quiet the run was, and `by_clean_median` and
`by_fastest_call` repeat the statistics against those columns.

Prediction. `CostModel("host").node(node)` for the key's first node, the graph's shape symbols
bound to the run's sizes. The host is calibrated at the start (`host_hardware(refresh=True)`) and
again after the timings (`calibrate.measure()`); each figure is kept at its best of the two
(`calibrate.best_of`: interference only makes a figure worse) and cached, so the calibration
brackets the timings in the same conditions, and `CostModel("host")` prices the ops with it. The
JSON has both calibrations (`calibrations`) and the figures used (`hardware`). Ops the model prices
as free (views, zero launches) are left out of the statistics and counted in `excluded_free`.

JSON: `spearman` (rank correlation of predicted and measured time over the distinct keys of all
phases), `median_abs_rel_error` (median of |predicted - measured| / measured), `n_ops`,
`excluded_free`, `clean_fraction`, per-phase totals (each key times how often the graph runs it),
the calibrated `hardware`, and `rows` (op, shapes, dtype, predicted_s, measured_s, bound,
category, phase, seq_len, ...), the worst first.

Run (3 minutes on the 2-core host when it is quiet, up to 12 when other jobs run; `--quick`: lengths 128 and
512, a 512-token cache, 3 rounds, about half that):

    .venv/bin/python benchmarks/cost_model_fidelity.py --json /tmp/fidelity.json
    .venv/bin/python benchmarks/cost_model_fidelity.py --quick --json /tmp/fidelity_quick.json
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import math
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.fx as fx
import torch.utils._pytree as pytree

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script: make `benchmarks` and `examples` importable
    sys.path.insert(0, str(REPO))

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from benchmarks.common import env_info, write_json  # noqa: E402
from compiler.cost_model import calibrate  # noqa: E402
from compiler.cost_model.calibrate import Quiet, call_times, llc_bytes  # noqa: E402

GOAL = {"spearman": 0.9, "median_abs_rel_error": 0.35}


def _log(msg: str) -> None:
    print(f"[fidelity] {msg}", file=sys.stderr, flush=True)


# -- keys and descriptions of op arguments ------------------------------------------------------


def _describe(value: Any) -> Any:
    """A JSON-able description of an argument: tensors by shape/dtype, other values as they are."""
    if isinstance(value, torch.Tensor):
        return {"shape": list(value.shape), "dtype": str(value.dtype).removeprefix("torch."), "strides": list(value.stride()), "contiguous": value.is_contiguous()}
    if isinstance(value, (list, tuple)):
        return [_describe(v) for v in value]
    if isinstance(value, dict):
        return {k: _describe(v) for k, v in value.items()}
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    return str(value)


def _key(target: Any, args: Any, kwargs: Any) -> str:
    """Op plus tensor shapes, dtypes and strides plus non-tensor arguments."""

    def strip(d: Any) -> Any:
        if isinstance(d, dict) and "shape" in d and "dtype" in d:
            return (tuple(d["shape"]), d["dtype"], tuple(d["strides"]))
        if isinstance(d, list):
            return tuple(strip(x) for x in d)
        if isinstance(d, dict):
            return tuple(sorted((k, strip(v)) for k, v in d.items()))
        return d

    return repr((str(target), strip(_describe(args)), strip(_describe(kwargs))))


@dataclass
class Record:
    """One distinct op key: the first node that ran it, its real arguments, how often it ran."""

    key: str
    node: fx.Node
    target: Any
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    out: Any
    out_bytes: int = 0
    cold_leaves: set[int] = field(default_factory=set)
    variants: list[Any] = field(default_factory=list)
    turn: int = 0
    count: int = 1
    batches: list[Any] = field(default_factory=list)

    def measured(self) -> dict[str, Any]:
        """The key's time: the median of its quietest batch (interference only slows a batch
        down; the median drops the odd preempted call). Beside it: the median over all clean
        batches, the fastest call, and how clean the batches were."""
        clean = [b for b in self.batches if Quiet.clean(b.disturbed)]
        samples = [t for b in clean or self.batches for t in b.times]
        quietest = min(self.batches, key=lambda b: b.median)
        return {
            "measured_s": quietest.median,
            "measured_clean_median_s": statistics.median(samples),
            "measured_min_s": min(t for b in self.batches for t in b.times),
            "batch_medians_s": [b.median for b in self.batches],
            "samples": sum(len(b.times) for b in self.batches),
            "clean": bool(clean),
            "clean_batches": len(clean),
            "faults_per_call": quietest.faults,
        }


class Recorder(fx.Interpreter):
    """Runs a graph on real inputs and keeps one Record per distinct call_function key."""

    def __init__(self, gm: fx.GraphModule, records: dict[str, Record], cold_constants: bool) -> None:
        super().__init__(gm)
        self.records = records
        self.cold_constants = cold_constants
        self.bindings: dict[str, int] = {}

    def placeholder(self, target: Any, args: Any, kwargs: Any) -> Any:
        value = super().placeholder(target, args, kwargs)
        node = self._node
        meta = node.meta.get("val")
        if isinstance(value, torch.Tensor) and isinstance(meta, torch.Tensor):
            for sym, real in zip(meta.shape, value.shape):
                if isinstance(sym, torch.SymInt) and not sym.node.expr.is_number and sym.node.expr.is_Symbol:
                    self.bindings[str(sym.node.expr)] = int(real)
        return value

    def run_node(self, n: fx.Node) -> Any:
        self._node = n
        return super().run_node(n)

    def call_function(self, target: Any, args: Any, kwargs: Any) -> Any:
        out = target(*args, **kwargs)
        if isinstance(target, torch._ops.OpOverload):
            key = _key(target, args, kwargs)
            rec = self.records.get(key)
            if rec is None:
                rec = self.records[key] = Record(key, self._node, target, args, kwargs, _describe(out))
                rec.out_bytes = sum(t.nbytes for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor))
                if self.cold_constants:
                    pairs = zip(pytree.tree_leaves((self._node.args, self._node.kwargs)), pytree.tree_leaves((args, kwargs)))
                    rec.cold_leaves = {i for i, (n, v) in enumerate(pairs) if isinstance(n, fx.Node) and isinstance(v, torch.Tensor) and _is_const(n)}
            else:
                rec.count += 1
        return out


# -- timing ---------------------------------------------------------------------------------------


GATHERS = {"aten.embedding.default", "aten.index_select.default", "aten.index.Tensor", "aten.gather.default"}


def cold_variants(rec: Record, cache_bytes: int, limit: int = 64, memory: int = 1 << 30) -> None:
    """Copies of the record's arguments whose constant tensors (weights, the static KV cache)
    are fresh clones, enough that cycling through them touches more than twice the last-level
    cache between two uses of one copy: each call then finds its constants in memory, as in a
    forward, while the activations (shared by all copies) and the code stay warm. A gather
    touches only the rows it reads (as many bytes as it writes), so it needs more copies; the
    copies stop at `limit` and at `memory` bytes in all. Constants smaller than 2 x cache /
    `limit` (a norm's weight) cannot be made cold this way; they cost little either way."""
    flat, spec = pytree.tree_flatten((rec.args, rec.kwargs))
    cold = [i for i, v in enumerate(flat) if isinstance(v, torch.Tensor) and i in rec.cold_leaves]
    size = sum(flat[i].nbytes for i in cold)
    touched = size
    if str(rec.target) in GATHERS:
        touched = min(size, rec.out_bytes)
    copies = min(limit, max(1, math.ceil(2 * cache_bytes / max(touched, 1))), max(1, memory // max(size, 1))) + 1
    rec.variants = []
    for _ in range(copies):
        leaves = list(flat)
        for i in cold:
            leaves[i] = flat[i].clone()
        rec.variants.append(pytree.tree_unflatten(leaves, spec))


def step(rec: Record) -> Callable[[], Any]:
    """One call of the record's op: on its own arguments, or on the next of its cold variants."""
    if not rec.variants:
        return functools.partial(rec.target, *rec.args, **rec.kwargs)

    def call() -> Any:
        args, kwargs = rec.variants[rec.turn % len(rec.variants)]
        rec.turn += 1
        return rec.target(*args, **kwargs)

    return call


def time_records(records: list[Record], rounds: int, round_s: float, quiet: Quiet, max_tries: int = 3) -> None:
    """Interleaved rounds over all records (the order alternating), one batch of back-to-back
    calls per record per round. `quiet` waits for a free machine before each batch and rates
    how disturbed it was (run-queue delay); a disturbed batch is retried (if the op is short
    and the wait budget lasts). Records short of clean batches get up to two extra rounds."""
    with torch.inference_mode():
        steps = {rec.key: step(rec) for rec in records}
        fastest = {rec.key: min(call_times(steps[rec.key], 2)) for rec in records}  # warm-up

        def one(rec: Record) -> None:
            calls = max(1, min(200, int(round_s / max(fastest[rec.key], 1e-7))))
            best = None
            for _ in range(max_tries if fastest[rec.key] < 0.5 and quiet.waited_s < quiet.budget_s else 1):
                faults = minor_faults()
                times, disturbed = quiet.batch(steps[rec.key], calls)
                faults = (minor_faults() - faults) / calls
                fastest[rec.key] = min(fastest[rec.key], min(times))
                if best is None or disturbed < best.disturbed:
                    best = Batch(times, disturbed, faults)
                if Quiet.clean(disturbed):
                    break
            rec.batches.append(best)

        for r in range(rounds):
            for rec in records if r % 2 == 0 else list(reversed(records)):
                one(rec)
        for extra in range(2):
            short = [rec for rec in records if sum(Quiet.clean(b.disturbed) for b in rec.batches) < min(3, rounds)]
            if not short:
                break
            _log(f"  {len(short)} ops short of clean batches: extra round {extra + 1}")
            for rec in short:
                one(rec)


@dataclass
class Batch:
    times: list[float]
    disturbed: float
    faults: float = 0.0  # minor page faults per call (fresh output pages), probes included

    @property
    def median(self) -> float:
        return statistics.median(self.times)


def minor_faults() -> int:
    try:
        with open("/proc/self/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[7])
    except (OSError, IndexError, ValueError):
        return 0


# -- graphs ---------------------------------------------------------------------------------------


def prefill_graph(model: torch.nn.Module, example_len: int = 256) -> Any:
    from torch.export import Dim

    from compiler.capture import capture_export

    ids = torch.zeros(1, example_len, dtype=torch.int64)
    seq = Dim("seq", min=2, max=8192)
    kwargs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "use_cache": False}
    shapes = {"input_ids": {1: seq}, "attention_mask": {1: seq}, "use_cache": None}
    return capture_export(model, (), kwargs, dynamic_shapes=shapes)


def decode_graph(model: torch.nn.Module, cache_len: int, fill_ids: torch.Tensor | None) -> fx.GraphModule:
    """The ATen graph of one decode step at position `cache_len` over a static cache of
    `cache_len + 1` slots; the cache is filled by an eager prefill of `fill_ids` if given."""
    from transformers.integrations.executorch import TorchExportableModuleForDecoderOnlyLM

    from compiler.capture import _cia_decompositions, _from_exported

    config = model.generation_config
    saved = config.cache_implementation
    config.cache_implementation = "static"  # what the exportable wrapper insists on
    try:
        wrapper = TorchExportableModuleForDecoderOnlyLM(model, batch_size=1, max_cache_len=cache_len + 1)
        with torch.no_grad():
            ep = wrapper.export(input_ids=torch.zeros(1, 1, dtype=torch.int64), cache_position=torch.tensor([cache_len]))
            ep = ep.run_decompositions(_cia_decompositions())
    finally:
        config.cache_implementation = saved
    gm = _from_exported(ep)  # freezes the cache buffers: the very tensors the wrapper's cache holds
    inner = wrapper.model
    with torch.no_grad():
        if fill_ids is not None:
            inner(input_ids=fill_ids, cache_position=torch.arange(cache_len))
        else:
            gen = torch.Generator().manual_seed(0)
            for layer in inner.static_cache.layers:
                layer.keys[..., :cache_len, :].copy_(torch.randn(layer.keys[..., :cache_len, :].shape, generator=gen))
                layer.values[..., :cache_len, :].copy_(torch.randn(layer.values[..., :cache_len, :].shape, generator=gen))
    return gm


def real_tokens(smollm2: Any, length: int) -> torch.Tensor:
    """The first `length` tokens of a calibration text as [1, length] int64."""
    from compiler.evaluation import load_text, token_windows

    for name in ("novel_calibration", "abstracts_calibration"):
        windows = token_windows(smollm2.tokenizer(), load_text(name), length, count=None)
        if windows:
            return windows[0]
    raise RuntimeError(f"no calibration text holds {length} tokens")


# -- predictions and statistics -------------------------------------------------------------------


def predict(cm: Any, rec: Record, bindings: dict[str, int]) -> Any:
    est = cm.node(rec.node)
    return est.at(bindings) if bindings else est


def _float(v: Any) -> float:
    return float(v)


def row(rec: Record, phase: str, seq_len: int) -> dict[str, Any]:
    """The key's description and measurements (the prediction comes later: `price`)."""
    tensor_args = [d for d in pytree.tree_leaves(_describe(rec.args), is_leaf=lambda x: isinstance(x, dict) and "shape" in x) if isinstance(d, dict)]
    return {
        "phase": phase,
        "seq_len": seq_len,
        "op": str(rec.target).removeprefix("aten."),
        "node": rec.node.name,
        "count": rec.count,
        "shapes": [d["shape"] for d in tensor_args],
        "dtype": next((d["dtype"] for d in tensor_args), None),
        "args": _describe(rec.args),
        "kwargs": _describe(rec.kwargs),
        "out": rec.out,
        "constants": [_is_const(a) for a in rec.node.args],
        "cold": bool(rec.cold_leaves),
        **rec.measured(),
    }


def price(r: dict[str, Any], est: Any, cm: Any) -> dict[str, Any]:
    """The row with the cost model's prediction: `est`'s work (shape symbols bound) priced on
    `cm`'s hardware."""
    est = cm.estimate(est.work, est.name, est.op, est.category, est.generic)
    predicted = _float(est.time)
    return {
        **r,
        "predicted_s": predicted,
        "rel_error": (predicted - r["measured_s"]) / r["measured_s"],
        "bound": est.bound,
        "category": est.category,
        "generic": est.generic,
        "flops": _float(est.flops),
        "bytes": _float(est.bytes),
        "launches": _float(est.work.launches),
        "host": {k: _float(v) for k, v in est.work.host.items()},
        "free": _float(est.work.launches) == 0,
    }


def _is_const(a: Any) -> bool | None:
    from compiler.cost_model.rules import is_constant

    return is_constant(a) if isinstance(a, fx.Node) else None


def ranks(xs: list[float]) -> list[float]:
    order = sorted(range(len(xs)), key=lambda i: xs[i])
    out = [0.0] * len(xs)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and xs[order[j + 1]] == xs[order[i]]:
            j += 1
        for k in range(i, j + 1):
            out[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return out


def spearman(a: list[float], b: list[float]) -> float:
    ra, rb = ranks(a), ranks(b)
    ma, mb = statistics.fmean(ra), statistics.fmean(rb)
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb))
    var = math.sqrt(sum((x - ma) ** 2 for x in ra) * sum((y - mb) ** 2 for y in rb))
    return cov / var if var else float("nan")


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    kept = [r for r in rows if not r["free"]]
    pred = [r["predicted_s"] for r in kept]
    meas = [r["measured_s"] for r in kept]
    errors = [abs(r["rel_error"]) for r in kept]
    log_ratio = [math.log(p / m) for p, m in zip(pred, meas) if p > 0 and m > 0]
    phases = {}
    for phase in dict.fromkeys((r["phase"], r["seq_len"]) for r in rows):
        these = [r for r in rows if (r["phase"], r["seq_len"]) == phase]
        phases[f"{phase[0]}_{phase[1]}"] = {
            "predicted_total_s": sum(r["predicted_s"] * r["count"] for r in these),
            "measured_total_s": sum(r["measured_s"] * r["count"] for r in these),
            "n_ops": sum(1 for r in these if not r["free"]),
        }

    def stats(key: str) -> dict[str, float]:
        values = [r[key] for r in kept]
        return {
            "spearman": spearman(pred, values),
            "median_abs_rel_error": statistics.median(abs(p - m) / m for p, m in zip(pred, values)) if kept else float("nan"),
        }

    return {
        "spearman": spearman(pred, meas),
        "median_abs_rel_error": statistics.median(errors) if errors else float("nan"),
        "n_ops": len(kept),
        "excluded_free": len(rows) - len(kept),
        "clean_fraction": sum(1 for r in kept if r["clean"]) / max(1, len(kept)),
        "by_clean_median": stats("measured_clean_median_s"),
        "by_fastest_call": stats("measured_min_s"),
        "geomean_pred_over_meas": math.exp(statistics.fmean(log_ratio)) if log_ratio else float("nan"),
        "within_2x": sum(1 for x in log_ratio if abs(x) <= math.log(2)) / max(1, len(log_ratio)),
        "phases": phases,
    }


# -- main -----------------------------------------------------------------------------------------


def run_phase(gm: fx.GraphModule, inputs: list[Any], phase: str, seq_len: int, cm: Any, opts: Any, quiet: Any) -> list[tuple[dict[str, Any], Any]]:
    records: dict[str, Record] = {}
    recorder = Recorder(gm, records, cold_constants=not opts.hot)
    start = time.perf_counter()
    with torch.inference_mode():
        recorder.run(*inputs)
    _log(f"{phase} {seq_len}: graph ran in {time.perf_counter() - start:.1f} s; {len(records)} distinct ops")
    start = time.perf_counter()
    recs = list(records.values())
    for rec in recs:
        if rec.cold_leaves:
            cold_variants(rec, llc_bytes() or 32 << 20)
    time_records(recs, opts.rounds, opts.round_ms / 1e3, quiet)
    for rec in recs:
        rec.variants = []
    _log(f"{phase} {seq_len}: timed in {time.perf_counter() - start:.1f} s")
    bindings = dict(recorder.bindings)
    return [(row(rec, phase, seq_len), predict(cm, rec, bindings)) for rec in recs]


def print_table(rows: list[dict[str, Any]], limit: int = 25) -> None:
    print(f"{'phase':>12} {'op':<36} {'shapes':<44} {'pred us':>10} {'meas us':>10} {'err':>7} {'bound':>8}")
    for r in rows[:limit]:
        shapes = ",".join("x".join(map(str, s)) for s in r["shapes"])[:44]
        print(f"{r['phase'] + str(r['seq_len']):>12} {r['op']:<36} {shapes:<44} {r['predicted_s'] * 1e6:>10.1f} {r['measured_s'] * 1e6:>10.1f} {r['rel_error']:>+7.2f} {r['bound']:>8}")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--lengths", default=None, help="prefill sequence lengths, comma-separated (default 128,512,2048)")
    parser.add_argument("--decode-cache", type=int, default=None, help="KV-cache length of the decode step (default 2048; 0 skips decode)")
    parser.add_argument("--random-cache", action="store_true", help="fill the decode cache with random values instead of a real prefill")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved timing rounds (default 5, --quick 3)")
    parser.add_argument("--wait", type=float, default=120.0, help="seconds the run may spend in all waiting for the machine to be free")
    parser.add_argument("--round-ms", type=float, default=20.0, help="time spent per op per round, in ms (at least one call)")
    parser.add_argument("--quick", action="store_true", help="lengths 128,512, a 512-token decode cache, 3 rounds")
    parser.add_argument("--hot", action="store_true", help="time ops with hot caches, weights included (default: weights and the static KV cache cold, activations warm, as in a forward)")
    parser.add_argument("--no-refresh", action="store_true", help="reuse the cached host calibration instead of re-measuring")
    opts = parser.parse_args(argv)
    lengths = [int(x) for x in (opts.lengths or ("128,512" if opts.quick else "128,512,2048")).split(",") if x]
    cache_len = opts.decode_cache if opts.decode_cache is not None else (512 if opts.quick else 2048)
    rounds = opts.rounds = opts.rounds or (3 if opts.quick else 5)
    t0 = time.perf_counter()

    from compiler.cost_model import CostModel
    from examples import smollm2

    _log("calibrating the host (host_hardware(refresh=True))")
    calibrate.host_hardware(refresh=not opts.no_refresh)
    before = calibrate.cached()
    cm = CostModel("host")
    model = smollm2.model()
    pending: list[tuple[dict[str, Any], Any]] = []
    timings: dict[str, float] = {}
    quiet = Quiet(budget_s=opts.wait)

    if lengths:
        start = time.perf_counter()
        captured = prefill_graph(model)
        timings["capture_prefill_s"] = time.perf_counter() - start
        _log(f"captured the prefill graph with a dynamic length in {timings['capture_prefill_s']:.0f} s")
        for length in lengths:
            ids = real_tokens(smollm2, length)
            inputs = captured.flatten_inputs((), {"input_ids": ids, "attention_mask": torch.ones_like(ids), "use_cache": False})
            pending += run_phase(captured.gm, inputs, "prefill", length, cm, opts, quiet)
        del captured
    if cache_len:
        start = time.perf_counter()
        tokens = real_tokens(smollm2, cache_len + 1)
        gm = decode_graph(model, cache_len, None if opts.random_cache else tokens[:, :cache_len])
        timings["build_decode_s"] = time.perf_counter() - start
        _log(f"exported the decode step and filled a {cache_len}-token cache in {timings['build_decode_s']:.0f} s")
        pending += run_phase(gm, [tokens[:, cache_len:], torch.tensor([cache_len])], "decode", cache_len, cm, opts, quiet)

    # Calibrate again now that the ops are timed, and keep each figure's best: the two bracket
    # the timings, and a figure taken while another job ran only reads worse.
    calibrations = {"before": before}
    if not opts.no_refresh:
        _log("calibrating the host again")
        calibrations["after"] = calibrate.measure()
        calibrate.remember(calibrate.best_of(before, calibrations["after"]))
    cm = CostModel("host")
    hw = cm.hw
    rows = [price(r, est, cm) for r, est in pending]
    rows.sort(key=lambda r: (r["free"], -abs(math.log(max(r["predicted_s"], 1e-12) / r["measured_s"]))))
    result = {
        **summarize(rows),
        "goal": GOAL,
        "meets_goal": None,
        "target": "host",
        "hardware": dataclasses.asdict(hw),
        "calibrations": calibrations,
        "settings": {"lengths": lengths, "decode_cache": cache_len, "random_cache": opts.random_cache, "rounds": rounds, "round_ms": opts.round_ms, "cold_constants": not opts.hot},
        "env": env_info(),
        "timings": {**timings, "waited_s": quiet.waited_s, "total_s": time.perf_counter() - t0},
        "rows": rows,
    }
    result["meets_goal"] = result["spearman"] >= GOAL["spearman"] and result["median_abs_rel_error"] <= GOAL["median_abs_rel_error"]
    print_table(rows)
    print(
        f"spearman {result['spearman']:.3f}  median |rel err| {result['median_abs_rel_error']:.3f}  n_ops {result['n_ops']}"
        f"  (excluded free {result['excluded_free']}; within 2x {result['within_2x']:.0%}; clean {result['clean_fraction']:.0%})  {result['timings']['total_s']:.0f} s"
    )
    if opts.json:
        write_json(opts.json, result)
        _log(f"wrote {opts.json}")
    return result


if __name__ == "__main__":
    main()
