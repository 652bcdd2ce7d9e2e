"""The planner: the fastest pass configuration for a target that stays inside a quality budget.

    planner = Planner(target, budget, calibration, length=4096)
    plan = planner.plan(gm)            # gm: the captured IR (not modified)
    pipeline = plan.pipeline()         # the default pipeline with the chosen lossy passes
    plan.as_dict()                     # every candidate, predicted and measured, and why

1. **Space.** Each lossy family has settings ordered from the mildest to the harshest
   (`FAMILIES`: sparse attention's recall, how many attention sublayers layer skipping drops).
   A candidate takes at most one setting per family; the baseline takes none (the lossless
   pipeline). Families that cannot pay off on this graph are left out with the reason
   (`shift_add` is priced from shapes alone before any fitting: at prefill's rows its lookups
   lose to a dense GEMM; `kv_cache` rewrites explicit-cache decode graphs, not a forward).
2. **Screen.** Each family's mildest setting alone is built, priced and measured first; a
   family whose mildest setting fails the budget is dropped whole, its other candidates never
   built (an expensive family that cannot fit, such as shift-add on de-quantized weights, then
   costs one measurement, not one fit per combination).
3. **Predict.** Each candidate's pipeline runs on a copy of the graph (lossy passes calibrate on
   `calibration`, as they would in a compile) and the cost model prices the result on the
   target with every size symbol bound to `length`. Speedups are against the lossless
   pipeline's graph, and against the captured graph. The region partitioner is left out of
   this ranking (`RANK_WITHOUT`: slow, and alike for every candidate); the chosen plan is
   compiled with it.
4. **Measure.** From the fastest prediction down, the quality of the lossy part (the graph after
   the lossy passes, run in ATen) on calibration windows: perplexity increase and top-1
   agreement against the unmodified graph. Two prunings keep this short: a candidate slower
   than one already found within budget is not measured (it cannot be chosen), and a
   candidate holding a setting at least as harsh as one that failed alone is rejected
   unmeasured (quality falls monotonically along a family's settings).
5. **Choose** the fastest measured candidate within the budget (the baseline always is). The
   Pareto front of the measured candidates (quality cost against predicted speedup) is kept.
6. **Cache.** Predictions and measurements are stored in the compiler's SQLite store under
   the graph's and weights' fingerprint, the target, the length and the calibration windows:
   a rerun reuses them and only compiles the chosen plan.

Quality here is on calibration text only; `optimize` then measures the chosen plan on
evaluation text, which no step of the search has seen.
"""

from __future__ import annotations

import hashlib
import itertools
import math
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
import torch.fx as fx

from compiler.budget import Budget, parse_budget
from compiler.cache import Store
from compiler.calibration import Calibration
from compiler.cost_model import CostModel
from compiler.errors import UserInputError
from compiler.ir import copy_graph_module, graph_fingerprint, weights_fingerprint
from compiler.passes.base import Pass
from compiler.passes.pipeline import PassContext, PassRecord, Pipeline
from compiler.targets import Target, load_target

# Bumped when a candidate's graph or its measurement changes meaning: stored results go stale.
VERSION = 1

# Per family, settings from the mildest to the harshest (the pruning relies on that order).
FAMILIES: dict[str, tuple[dict[str, Any], ...]] = {
    "layer_skip": ({"kind": "attention", "count": 1}, {"kind": "attention", "count": 2}, {"kind": "attention", "count": 4}),
    "sparse_attention": ({"recall": 0.99}, {"recall": 0.95}, {"recall": 0.9}),
    "shift_add": ({"bits": 4, "group": 64}, {"bits": 3, "group": 64}),
}


@dataclass(frozen=True)
class Setting:
    """One family at one level of its knobs."""

    family: str
    level: int
    options: tuple[tuple[str, Any], ...]

    @property
    def label(self) -> str:
        return f"{self.family}(" + ", ".join(f"{k}={v}" for k, v in self.options) + ")"

    def make(self, length: int, say: Callable[[str], None]) -> Pass:
        options = dict(self.options)
        if self.family == "sparse_attention":
            from compiler.passes.sparse import SparseAttention

            return SparseAttention(**{"calibration_length": length, **options})
        if self.family == "layer_skip":
            from compiler.passes.layer_skip import LayerSkip

            return LayerSkip(length=length, say=say, **options)
        if self.family == "shift_add":
            from compiler.passes.shift_add import ShiftAdd

            return ShiftAdd(say=say, **options)
        raise UserInputError(f"planner: no family {self.family!r}; known: {', '.join(FAMILIES)}")


@dataclass
class Candidate:
    """A choice of settings, with what the search learned about it."""

    settings: tuple[Setting, ...]
    predicted_seconds: float | None = None
    predicted_speedup: float | None = None  # against the lossless pipeline
    quality: dict[str, float] | None = None  # ppl_increase, top1_agreement, tokens (calibration)
    status: str = "unmeasured"  # chosen | fits | over budget | unmeasured | failed | baseline
    reason: str = ""
    cached: bool = False
    stats: dict[str, Any] = field(default_factory=dict)  # per pass: what it chose (units, densities)

    @property
    def label(self) -> str:
        return " + ".join(s.label for s in self.settings) or "lossless"

    @property
    def key(self) -> str:
        return repr([(s.family, s.options) for s in self.settings])

    def as_dict(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "passes": [{"pass": s.family, **dict(s.options)} for s in self.settings],
            "predicted_seconds": self.predicted_seconds,
            "predicted_speedup": self.predicted_speedup,
            "calibration_quality": self.quality,
            "status": self.status,
            "reason": self.reason,
            "from_cache": self.cached,
            "pass_stats": self.stats,
        }


@dataclass
class Plan:
    """The planner's answer: the chosen candidate, every candidate, and what was left out."""

    target: Target
    budget: Budget
    length: int
    chosen: Candidate
    candidates: list[Candidate]
    excluded: dict[str, str]
    baseline_seconds: float
    captured_seconds: float
    calibration: dict[str, Any]
    seconds: float
    _make_pipeline: Callable[[Sequence[Setting]], Pipeline] = field(repr=False, default=None)  # type: ignore[assignment]

    def pipeline(self) -> Pipeline:
        """The pipeline that compiles the chosen plan."""
        return self._make_pipeline(self.chosen.settings)

    @property
    def pass_names(self) -> set[str]:
        """The passes to enable by name (the chosen lossy ones run whatever the budget)."""
        return {s.family for s in self.chosen.settings}

    def pareto(self) -> list[Candidate]:
        """Measured candidates that no other beats on both quality cost and predicted speed."""
        measured = [c for c in self.candidates if c.quality is not None and c.predicted_speedup is not None]
        front = []
        for c in measured:
            dominated = any(
                o is not c and o.predicted_speedup >= c.predicted_speedup and o.quality["ppl_increase"] <= c.quality["ppl_increase"]
                and (o.predicted_speedup > c.predicted_speedup or o.quality["ppl_increase"] < c.quality["ppl_increase"])
                for o in measured
            )
            if not dominated:
                front.append(c)
        return sorted(front, key=lambda c: c.predicted_speedup)

    def as_dict(self) -> dict[str, Any]:
        return {
            "target": self.target.name,
            "budget": str(self.budget),
            "length": self.length,
            "chosen": self.chosen.as_dict(),
            "predicted_speedup_vs_lossless": self.chosen.predicted_speedup,
            "predicted_speedup_vs_captured": self.captured_seconds / self.chosen.predicted_seconds if self.chosen.predicted_seconds else None,
            "baseline_predicted_seconds": self.baseline_seconds,
            "captured_predicted_seconds": self.captured_seconds,
            "calibration": self.calibration,
            "candidates": [c.as_dict() for c in self.candidates],
            "pareto": [c.label for c in self.pareto()],
            "excluded_families": self.excluded,
            "search_seconds": round(self.seconds, 3),
        }


class Planner:
    """Searches pass configurations for `target` within `budget` (see the module docstring)."""

    def __init__(
        self,
        target: str | Target,
        budget: str | Budget,
        calibration: Calibration | None,
        length: int = 4096,
        families: dict[str, Sequence[dict[str, Any]]] | None = None,
        quality_length: int | None = None,
        quality_count: int = 2,
        pipeline: Pipeline | None = None,
        store: Store | None = None,
        progress: bool = True,
        say: Callable[[str], None] | None = None,
    ) -> None:
        self.target = load_target(target)
        self.budget = parse_budget(budget)
        self.calibration = calibration
        self.length = length
        self.families = {k: tuple(v) for k, v in (families if families is not None else FAMILIES).items()}
        unknown = set(self.families) - set(FAMILIES)
        if unknown:
            raise UserInputError(f"planner: unknown families {sorted(unknown)}; known: {', '.join(FAMILIES)}")
        self.quality_length = quality_length or length
        self.quality_count = quality_count
        self.base_pipeline = pipeline
        self.store = store or Store()
        self.progress = progress
        self.say = say or (lambda msg: print(f"[planner] {msg}", file=sys.stderr, flush=True))
        self.cost_model = CostModel(self.target)
        self._reference_outputs: list[tuple[torch.Tensor, float, torch.Tensor]] | None = None

    # -- the search -------------------------------------------------------------------------------

    def plan(self, gm: fx.GraphModule) -> Plan:
        start = time.perf_counter()
        self._reference_outputs = None  # the unmodified graph's outputs: this gm's, measured once per plan
        excluded = self._excluded(gm)
        settings = {f: [Setting(f, i, tuple(sorted(o.items()))) for i, o in enumerate(levels)] for f, levels in self.families.items() if f not in excluded}
        if self.budget.lossless or not settings:
            why = "the budget is lossless" if self.budget.lossless else "no lossy family applies"
            settings = {}
        else:
            why = ""
            if self.calibration is None:
                raise UserInputError(f"planning within {self.budget} measures quality on calibration text; the model gives none (define calibration_batches(window, count) in MODEL.py) or use --budget lossless")
        candidates = [Candidate(tuple(s for s in combo if s is not None)) for combo in itertools.product(*[[None, *levels] for levels in settings.values()])]
        fingerprint = self._fingerprint(gm)
        captured_seconds = float(self.cost_model.graph(gm).at_length(self.length).time)

        dropped = self._screen(gm, candidates, settings, fingerprint) if settings else {}
        todo = [c for c in candidates if c.predicted_seconds is None and c.status == "unmeasured"]
        for c in _progress(todo, "predicting", self.progress):
            self._predict(gm, c, fingerprint)
        excluded.update(dropped)
        baseline = candidates[0]
        baseline.status, baseline.reason = "baseline", why or "the lossless pipeline: always within budget"
        for c in candidates:
            if c.predicted_seconds:
                c.predicted_speedup = baseline.predicted_seconds / c.predicted_seconds
        chosen = self._measure(gm, candidates, fingerprint)
        if chosen is not baseline:
            chosen.status, chosen.reason = "chosen", f"fastest predicted within {self.budget}" + ("" if chosen.reason == "" else f"; {chosen.reason}")
        else:
            baseline.reason += "; chosen: no lossy candidate predicted faster fits the budget" if settings else ""
        plan = Plan(
            self.target, self.budget, self.length, chosen, candidates, excluded, baseline.predicted_seconds, captured_seconds,
            {"length": self.quality_length, "windows": self.quality_count, "source": getattr(self.calibration, "name", None)},
            time.perf_counter() - start, self.pipeline_for,
        )
        self.say(f"chose {chosen.label}: predicted {chosen.predicted_speedup:.3f}x the lossless pipeline at {self.length} tokens on {self.target.name} ({plan.seconds:.0f} s)")
        return plan

    def _screen(self, gm: fx.GraphModule, candidates: list[Candidate], settings: dict[str, list[Setting]], fingerprint: str) -> dict[str, str]:
        """Each family's mildest setting alone, built once, priced and measured first. A family
        whose mildest setting fails the budget is dropped whole: its harsher settings and every
        combination holding one cannot fit either (quality falls along a family's settings and
        as lossy passes add up), so they are neither built nor measured. This is what keeps an
        expensive family that cannot fit (shift-add refits every layer per candidate) from
        costing the search more than its one measurement. Returns {family: why} for the
        dropped."""
        dropped: dict[str, str] = {}
        singles = {c.settings[0].family: c for c in candidates if len(c.settings) == 1 and c.settings[0].level == 0}
        for family, c in singles.items():
            graph = self._predict(gm, c, fingerprint, keep=True)
            if c.status == "failed":
                continue
            self._measure_one(gm, c, fingerprint, graph)
            del graph
            if c.status == "over budget":
                dropped[family] = f"its mildest setting alone ({c.settings[0].label}) is over {self.budget}: {c.reason}; its harsher settings and the combinations holding one were not built"
        for c in candidates:
            gone = [s.family for s in c.settings if s.family in dropped]
            if gone and c is not singles.get(gone[0]):
                c.status, c.reason = "over budget", f"not built: {gone[0]}'s mildest setting alone is over {self.budget}"
        return dropped

    def _measure_one(self, gm: fx.GraphModule, c: Candidate, fingerprint: str, graph: fx.GraphModule | None = None) -> bool:
        """Quality of c's lossy part on calibration windows (stored, or measured on `graph` or a
        new build); sets its quality, status and reason. True when it fits the budget."""
        key = f"{fingerprint}:{c.key}"
        stored = self.store.get("planner_quality", key)
        if stored is None:
            if self._reference_outputs is None:
                self._reference_outputs = self._reference(gm)
            if graph is None:
                graph, _ = self.build(gm, c.settings)
            stored = self._quality(graph, self._reference_outputs)
            self.store.put("planner_quality", key, stored)
        else:
            c.cached = True
        c.quality = stored
        fits = self.budget.allows(stored["ppl_increase"], stored["top1_agreement"])
        c.status = "fits" if fits else "over budget"
        c.reason = f"calibration ppl {stored['ppl_increase']:+.2%}, top-1 {stored['top1_agreement']:.3f}"
        speed = f"predicted {c.predicted_speedup:.3f}x, " if c.predicted_speedup else ""
        self.say(f"{c.label}: {speed}{c.reason} -> {c.status}")
        return fits

    def pipeline_for(self, settings: Sequence[Setting]) -> Pipeline:
        """The base pipeline (default: `default_pipeline()`) with its lossy passes replaced by
        `settings`, placed where the first lossy pass was, in FAMILY_ORDER."""
        from compiler.passes import default_pipeline

        base = self.base_pipeline or default_pipeline()
        chosen = sorted(settings, key=lambda s: FAMILY_ORDER.index(s.family))
        passes: list[Pass] = []
        inserted = False
        for p in base.passes:
            if p.lossy:
                if not inserted:
                    passes += [s.make(self.length, self.say) for s in chosen]
                    inserted = True
                continue
            passes.append(p)
        if not inserted:
            passes += [s.make(self.length, self.say) for s in chosen]
        return Pipeline(passes, name="plan:" + (" + ".join(s.label for s in chosen) or "lossless"))

    def _excluded(self, gm: fx.GraphModule) -> dict[str, str]:
        out: dict[str, str] = {}
        if "shift_add" in self.families:
            why = self._shift_add_gain(gm)
            if why:
                out["shift_add"] = why
        out["kv_cache"] = "rewrites explicit-cache decode graphs (compiler.generation.compile_cached), not a forward graph"
        if "layer_skip" in self.families:
            from compiler.analysis.blocks import find_blocks

            blocks = find_blocks(gm)
            if not blocks.sublayers:
                out["layer_skip"] = f"no transformer blocks: {blocks.reason}"
        return out

    def _shift_add_gain(self, gm: fx.GraphModule) -> str:
        """Why shift-add is left out at this length on this target ('' when it may pay off)."""
        from compiler.passes.shift_add import ShiftAdd

        options = dict(self.families["shift_add"][0]) if self.families["shift_add"] else {}
        bits = options.get("bits", 4)
        dense, lut = ShiftAdd(bits=bits, group=options.get("group", 64)).predicted_time(gm, self.cost_model, self.length)
        if dense <= 0:
            return "no linear layer with a constant weight that shift-add can take"
        if lut >= dense:
            return f"at {self.length} rows the cost model prices its {bits}-bit lookups at {lut / dense:.2f}x the dense matmuls on {self.target.name} (it pays off on decode steps, rows = 1)"
        return ""

    def _fingerprint(self, gm: fx.GraphModule) -> str:
        graph = graph_fingerprint(gm)
        source = getattr(self.calibration, "name", None)
        base = self.base_pipeline.names() if self.base_pipeline else None
        return hashlib.sha256(repr((VERSION, graph, weights_fingerprint(gm), self.target.name, self.length, self.quality_length, self.quality_count, source, base)).encode()).hexdigest()

    def _ctx(self) -> PassContext:
        return PassContext(target=self.target, budget=self.budget if not self.budget.lossless else "ppl:+100%", calibration_data=self.calibration, cost_model=self.cost_model)

    def _split(self, settings: Sequence[Setting]) -> tuple[Pipeline, Pipeline]:
        """The candidate's pipeline cut after its last lossy pass: (lossy part, lossless tail)."""
        pipeline = self.pipeline_for(settings)
        last = max((i for i, p in enumerate(pipeline.passes) if p.lossy), default=-1)
        if last < 0:  # the baseline: canonicalization before the first fusion pass, as planned
            last = next((i - 1 for i, p in enumerate(pipeline.passes) if p.name.startswith("fuse")), len(pipeline.passes) - 1)
        return Pipeline(pipeline.passes[: last + 1], "lossy part"), Pipeline(pipeline.passes[last + 1 :], "lossless tail")

    def build(self, gm: fx.GraphModule, settings: Sequence[Setting]) -> tuple[fx.GraphModule, list[PassRecord]]:
        """A copy of gm with the candidate's lossy part applied (what quality is measured on)."""
        head, _ = self._split(settings)
        copy = copy_graph_module(gm)
        ctx = self._ctx()
        ctx.enabled_only = set(head.names())  # named: opt-in passes run, lossy ones whatever the budget
        records = head.run(copy, ctx)
        return copy, records

    def _predict(self, gm: fx.GraphModule, c: Candidate, fingerprint: str, keep: bool = False) -> fx.GraphModule | None:
        """Price c on the target (stored, or built and priced). With `keep`, also return the
        graph after its lossy part (what its quality is measured on), building it if the price
        was stored and its quality is not."""
        key = f"{fingerprint}:{c.key}"
        stored = self.store.get("planner_prediction", key)
        if stored is not None:
            c.predicted_seconds, c.stats, c.cached = stored["seconds"], stored["stats"], True
            if keep and self.store.get("planner_quality", key) is None:
                return self.build(gm, c.settings)[0]
            return None
        try:
            graph, records = self.build(gm, c.settings)
            head = copy_graph_module(graph) if keep else None
            _, tail = self._split(c.settings)
            Pipeline([p for p in tail.passes if p.name not in RANK_WITHOUT], "ranking tail").run(graph, self._ctx())
            c.predicted_seconds = float(self.cost_model.graph(graph).at_length(self.length).time)
        except Exception as exc:  # noqa: BLE001 - a candidate that cannot be built is rejected, not fatal
            c.status, c.reason = "failed", f"{type(exc).__name__}: {exc}"
            self.say(f"{c.label}: {c.reason}")
            return None
        c.stats = {r.name: _summary(r) for r in records if r.lossy and r.result is not None}
        self.store.put("planner_prediction", key, {"seconds": c.predicted_seconds, "stats": c.stats})
        return head

    def _measure(self, gm: fx.GraphModule, candidates: list[Candidate], fingerprint: str) -> Candidate:
        baseline = candidates[0]
        order = sorted((c for c in candidates[1:] if c.predicted_seconds), key=lambda c: c.predicted_seconds)
        failed_alone: dict[str, int] = {}  # family -> mildest level that failed on its own
        chosen = baseline
        todo = [c for c in order if c.predicted_seconds < baseline.predicted_seconds]
        for c in order:
            if c not in todo:
                c.reason = "predicted no faster than the lossless pipeline"
        bar = _progress(todo, "measuring quality", self.progress)
        for c in bar:
            if c.quality is not None:  # measured when its family was screened
                fits = c.status == "fits"
            elif chosen is not baseline and c.predicted_seconds >= chosen.predicted_seconds:
                c.reason = f"predicted slower than {chosen.label}, already within budget"
                continue
            elif harsh := [s for s in c.settings if s.family in failed_alone and s.level >= failed_alone[s.family]]:
                c.status, c.reason = "over budget", f"{harsh[0].family} at this level or milder failed the budget alone"
                continue
            else:
                fits = self._measure_one(gm, c, fingerprint)
            if fits and chosen is not baseline and c.predicted_seconds >= chosen.predicted_seconds:
                c.reason += f"; predicted slower than {chosen.label}"
                continue
            if fits:
                chosen = c
            elif len(c.settings) == 1:
                s = c.settings[0]
                failed_alone[s.family] = min(s.level, failed_alone.get(s.family, s.level))
        return chosen

    # -- quality on calibration windows ------------------------------------------------------------

    def _windows(self) -> list[list[Any]]:
        return self.calibration.batches(self.quality_length, self.quality_count)

    def _reference(self, gm: fx.GraphModule) -> list[tuple[torch.Tensor, float, torch.Tensor]]:
        """Per window: (ids, NLL sum, argmax) of the unmodified graph; the logits themselves
        (800 MB at 4096 tokens) are not kept."""
        out = []
        for inputs in self._windows():
            ids, logits = lm_logits(gm, inputs)
            out.append((ids, nll_sum(logits, ids), logits[0, :-1].argmax(-1)))
        return out

    def _quality(self, gm: fx.GraphModule, reference: list[tuple[torch.Tensor, float, torch.Tensor]]) -> dict[str, float]:
        nll_ref = nll = agree = tokens = 0.0
        for inputs, (ids, ref_nll, ref_top) in zip(self._windows(), reference):
            _, logits = lm_logits(gm, inputs)
            nll_ref += ref_nll
            nll += nll_sum(logits, ids)
            agree += float((logits[0, :-1].argmax(-1) == ref_top).sum())
            tokens += ids.shape[1] - 1
        return {"ppl_increase": math.exp((nll - nll_ref) / tokens) - 1.0, "top1_agreement": agree / tokens, "tokens": int(tokens)}


# Sparse attention first: it calibrates on the full graph once (its stored scores then serve every
# layer-skip count, which would otherwise change the sites and recalibrate); layer skipping finds
# block-sparse attention sublayers like dense ones.
FAMILY_ORDER = ("sparse_attention", "layer_skip", "shift_add")
# Lossless passes left out when ranking: the region partitioner takes ~10-25 s on SmolLM2 per
# graph and fuses every candidate's elementwise chains alike, so ranking without it keeps the
# order; the chosen plan is compiled with it, and its report prices the fused graph.
RANK_WITHOUT = frozenset({"fuse_regions"})


def lm_logits(gm: fx.GraphModule, inputs: Sequence[Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """(token ids [1, S], logits [1, S, V]) of an LM graph on flat inputs."""
    ids = inputs[0]
    with torch.no_grad():
        out = gm(*inputs)
    logits = out[0] if isinstance(out, (list, tuple)) else out
    if not (isinstance(ids, torch.Tensor) and ids.dim() == 2 and ids.shape[0] == 1 and isinstance(logits, torch.Tensor) and logits.dim() == 3 and logits.shape[:2] == ids.shape):
        raise UserInputError("planning within a quality budget needs an LM graph: first input token ids [1, S], first output logits [1, S, V]")
    return ids, logits


def nll_sum(logits: torch.Tensor, ids: torch.Tensor, chunk: int = 1024) -> float:
    """Sum of -log p(next token) over positions 0..S-2, in float64, a chunk of rows at a time."""
    total = 0.0
    steps = ids.shape[1] - 1
    for start in range(0, steps, chunk):
        stop = min(start + chunk, steps)
        logp = torch.log_softmax(logits[0, start:stop].double(), -1)
        total -= float(logp.gather(-1, ids[0, start + 1 : stop + 1, None]).sum())
    return total


def _summary(record: PassRecord) -> dict[str, Any]:
    """What a lossy pass chose, for the plan: its scalar stats and short lists."""
    stats = record.result.stats if record.result else {}
    keep = {}
    for k, v in stats.items():
        if isinstance(v, (int, float, str, bool)) or v is None:
            keep[k] = v
        elif isinstance(v, list) and len(v) <= 64 and all(isinstance(x, (int, float, str)) for x in v):
            keep[k] = v
    keep["changes"] = len(record.result.changes) if record.result else 0
    return keep


def _progress(items: Sequence[Any], what: str, enabled: bool) -> Any:
    """A progress bar with the time left (tqdm, on stderr), or the items as they are."""
    if not enabled:
        return items
    from tqdm import tqdm

    return tqdm(items, desc=f"[planner] {what}", unit="candidate", file=sys.stderr, dynamic_ncols=True)
