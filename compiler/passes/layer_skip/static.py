"""The `layer_skip` pass: remove whole attention sublayers, MLP sublayers or blocks of a
transformer, chosen on calibration text or spread evenly.

Units (`kind`): attention sublayers, MLP sublayers, or whole blocks (`compiler.analysis.blocks`).
Removing a unit bypasses its residual add (the stream flows past it unchanged); dead-code
elimination then deletes its nodes. In an explicit-cache graph (`compiler.generation`) the keys
and values a skipped attention sublayer would cache become empty tensors ([B, H, 0, D]): no
later query reads them, so the cache stores nothing for that layer (`drop_cache=False` keeps
them, computed from the stream that passes the layer).

Which units (`method`):
- `similarity` (He et al., "What Matters in Transformers? Not All Attention is Needed", 2024):
  the units whose output hidden state is most similar to their input on calibration inputs
  (mean cosine over tokens, `importance.stream_similarity`) go first. Needs calibration data.
- `unified` (Unified Layer Skipping, Liu et al., 2024): input-independent, so batching and the
  KV cache keep working; the n skipped units are spread evenly over the intermediate units
  (the first `keep_first` and last `keep_last` always stay).
- `greedy`: measured, not proxied: each step skips, of the units left, the one whose removal
  (on top of those already skipped) costs the least calibration perplexity, re-measuring every
  candidate (n + (n-1) + ... evaluations: slower than `similarity`, which ranks once, but it
  sees how removals interact). Needs calibration data and an LM graph.

How many (exactly one of):
- `count` units, or `fraction` of the eligible ones (rounded);
- `speedup`: the fewest units whose predicted speedup (cost model, target of the pipeline, at
  `length` tokens) reaches it;
- none of these: the most units whose quality on calibration inputs stays within the pipeline's
  budget (`ppl:+5%` or `agreement:95%`), found by bisection over the ranked order (quality
  falls as units go; the search assumes it does so monotonically). The graph must be an LM's
  (first input token ids [B, S], first output logits [B, S, V]).
- `names`: these units by name (`attention3`, `mlp7`, `block12`).

The result records every unit's similarity and predicted time, the chosen units, and the
predicted speedup of the whole graph at `length` tokens (every free size symbol bound to it).
"""

from __future__ import annotations

import hashlib
import math
import sys
import time
import warnings
from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.fx as fx

from compiler.analysis.blocks import Blocks, Sublayer, bypass, find_blocks
from compiler.errors import UserInputError
from compiler.cache import Store
from compiler.ir import copy_graph_module, graph_fingerprint, propagate_meta, weights_fingerprint
from compiler.passes.base import Pass, PassResult
from compiler.calibration import static_length
from compiler.passes.layer_skip.importance import stream_similarity

aten = torch.ops.aten

KINDS = ("attention", "mlp", "block")
METHODS = ("similarity", "unified", "greedy")
_SIMILARITY_VERSION = 1  # bumped when stream_similarity measures something else


@dataclass
class Unit:
    """What one skip removes: a sublayer, or the sublayers of a block."""

    name: str
    sublayers: list[Sublayer]
    similarity: float | None = None


class LayerSkip(Pass):
    name = "layer_skip"
    lossy = True
    # Not in the default pipeline: how much to drop is the user's (or a planner's) choice. Like
    # every lossy pass it runs under a budget that allows loss, or when named in `passes`.

    def __init__(
        self,
        kind: str = "attention",
        method: str = "similarity",
        count: int | None = None,
        fraction: float | None = None,
        speedup: float | None = None,
        names: Sequence[str] | None = None,
        length: int = 2048,
        keep_first: int = 1,
        keep_last: int = 1,
        drop_cache: bool = True,
        calibration_length: int = 512,
        calibration_count: int = 8,
        say: Any = None,
    ) -> None:
        if kind not in KINDS:
            raise UserInputError(f"layer_skip: kind must be one of {', '.join(KINDS)}, got {kind!r}")
        if method not in METHODS:
            raise UserInputError(f"layer_skip: method must be one of {', '.join(METHODS)}, got {method!r}")
        given = [x for x in (count, fraction, speedup, names) if x is not None]
        if len(given) > 1:
            raise UserInputError("layer_skip: give at most one of count, fraction, speedup and names (none: as many as the quality budget allows)")
        if count is not None and count < 0:
            raise UserInputError(f"layer_skip: count must be >= 0, got {count}")
        if fraction is not None and not 0 <= fraction <= 1:
            raise UserInputError(f"layer_skip: fraction must be in [0, 1], got {fraction}")
        if speedup is not None and speedup < 1:
            raise UserInputError(f"layer_skip: speedup is a target >= 1, got {speedup}")
        if keep_first < 0 or keep_last < 0 or length < 1:
            raise UserInputError("layer_skip: keep_first and keep_last must be >= 0, length >= 1")
        self.kind, self.method = kind, method
        self.count, self.fraction, self.speedup = count, fraction, speedup
        self.names = tuple(names) if names is not None else None
        self.length, self.keep_first, self.keep_last, self.drop_cache = length, keep_first, keep_last, drop_cache
        self.calibration_length, self.calibration_count = calibration_length, calibration_count
        self.say = say or (lambda msg: print(f"[layer_skip] {msg}", file=sys.stderr, flush=True))

    def config(self) -> dict[str, Any]:
        return {
            "kind": self.kind, "method": self.method, "count": self.count, "fraction": self.fraction,
            "speedup": self.speedup, "names": list(self.names) if self.names is not None else None,
            "length": self.length, "keep_first": self.keep_first, "keep_last": self.keep_last, "drop_cache": self.drop_cache,
        }

    # -- the pass ---------------------------------------------------------------------------------

    def run(self, gm: fx.GraphModule, ctx: Any) -> PassResult:
        result = PassResult()
        result.stats = {**self.config(), "units": [], "skipped": [], "left": []}
        blocks = find_blocks(gm)
        if not blocks.sublayers:
            result.stats["left"].append(f"no transformer blocks: {blocks.reason}")
            return result
        units = self._units(blocks)
        if not units:
            result.stats["left"].append(f"no {self.kind} units in the graph")
            return result
        method = "named" if self.names is not None else self.method
        if method == "similarity":
            if getattr(ctx, "calibration_data", None) is None:
                warnings.warn("layer_skip: no calibration data to rank units by similarity; spreading the skipped units evenly (method='unified')", stacklevel=2)
                method = "unified"
            else:
                self._rank(gm, blocks, units, ctx)
        self._greedy = None
        if method == "greedy":
            if getattr(ctx, "calibration_data", None) is None:
                raise UserInputError("layer_skip: method='greedy' measures each removal on calibration inputs; give calibration data (or use method='unified')")
            _, batches = self._batches(gm, ctx)
            self._greedy = _Greedy(gm, units, batches, self.drop_cache, self.kind, self.say)
        times = _node_times(gm, ctx, self.length)
        total = sum(times.values())
        for u in units:
            u_time = sum(times.get(n.name, 0.0) for s in u.sublayers for n in s.nodes)
            result.stats["units"].append({"name": u.name, "similarity": u.similarity, "predicted_seconds": u_time})

        chosen = self._choose(gm, units, method, ctx, times, total, result)
        if not chosen:
            result.stats["predicted_speedup"] = 1.0
            return result
        apply_skips(gm, [s for u in chosen for s in u.sublayers], self.drop_cache)
        after = _surviving_time(gm, times)
        result.stats["skipped"] = [u.name for u in chosen]
        result.stats["predicted_speedup"] = total / after if after > 0 else math.inf
        result.stats["method_used"] = method
        for u in chosen:
            sim = f", similarity {u.similarity:.4f}" if u.similarity is not None else ""
            result.record(f"skipped {u.name} ({method}{sim})")
        result.record(f"{len(chosen)} of {len(units)} {self.kind} units skipped: predicted {result.stats['predicted_speedup']:.3f}x at {self.length} tokens on {_target_name(ctx)}")
        return result

    def _units(self, blocks: Blocks) -> list[Unit]:
        if self.kind == "block":
            return [Unit(f"block{b.index}", b.sublayers) for b in blocks.blocks if b.sublayers]
        return [Unit(s.name, [s]) for s in blocks.of_kind(self.kind)]

    def _batches(self, gm: fx.GraphModule, ctx: Any) -> tuple[int, list[list[Any]]]:
        """Calibration inputs: windows of the graph's own length when it is static."""
        length = static_length(gm) or self.calibration_length
        return length, ctx.calibration_data.batches(length, self.calibration_count)

    def _rank(self, gm: fx.GraphModule, blocks: Blocks, units: list[Unit], ctx: Any) -> None:
        per_sublayer, per_block = self._similarities(gm, blocks, ctx)
        for u in units:
            if self.kind == "block":
                u.similarity = per_block[u.sublayers[0].block]
            else:
                u.similarity = per_sublayer[u.sublayers[0].index]

    def _similarities(self, gm: fx.GraphModule, blocks: Blocks, ctx: Any) -> tuple[list[float], list[float]]:
        """Stream similarity of every sublayer and block on calibration inputs; stored under the
        graph's and weights' fingerprints, so another `kind` or count (a planner's next
        candidate) reuses it."""
        length = static_length(gm) or self.calibration_length
        graph = graph_fingerprint(gm)
        key = hashlib.sha256(repr((_SIMILARITY_VERSION, length, self.calibration_count, graph, weights_fingerprint(gm))).encode()).hexdigest()
        store = Store()
        cached = store.get("layer_skip_similarity", key)
        if cached is not None:
            return cached[0], cached[1]
        _, batches = self._batches(gm, ctx)
        start = time.perf_counter()
        per_sublayer, per_block = stream_similarity(gm, blocks, batches)
        self.say(f"measured {len(blocks.sublayers)} sublayers on {len(batches)} windows of {length} tokens ({time.perf_counter() - start:.0f} s)")
        store.put("layer_skip_similarity", key, [list(map(float, per_sublayer)), list(map(float, per_block))])
        return per_sublayer, per_block

    def _order(self, units: list[Unit], method: str, n: int) -> list[Unit]:
        """The n units to skip."""
        if n <= 0:
            return []
        if method == "similarity":
            return sorted(units, key=lambda u: -(u.similarity or 0.0))[:n]
        if method == "greedy":
            return self._greedy.prefix(n)
        middle = units[self.keep_first : len(units) - self.keep_last]
        if n > len(middle):
            raise UserInputError(f"layer_skip: unified skipping keeps the first {self.keep_first} and last {self.keep_last} units; at most {len(middle)} of {len(units)} can go, not {n}")
        # evenly spread: the unit at the middle of each of n equal stretches
        return [middle[int((j + 0.5) * len(middle) / n)] for j in range(n)]

    def _choose(self, gm: fx.GraphModule, units: list[Unit], method: str, ctx: Any, times: dict[str, float], total: float, result: PassResult) -> list[Unit]:
        if self.names is not None:
            known = {u.name: u for u in units}
            missing = [n for n in self.names if n not in known]
            if missing:
                raise UserInputError(f"layer_skip: no {self.kind} unit named {', '.join(missing)}; the graph has {', '.join(known)}")
            return [known[n] for n in self.names]
        limit = len(units) if method in ("similarity", "greedy") else max(0, len(units) - self.keep_first - self.keep_last)
        if self.count is not None or self.fraction is not None:
            n = self.count if self.count is not None else round(self.fraction * len(units))
            if n > len(units):
                raise UserInputError(f"layer_skip: {n} {self.kind} units asked for, the graph has {len(units)}")
            return self._order(units, method, n)
        if self.speedup is not None:
            for n in range(limit + 1):
                chosen = self._order(units, method, n)
                predicted = _predicted(gm, chosen, times, total, self.drop_cache)
                if predicted >= self.speedup:
                    return chosen
            result.stats["left"].append(f"a {self.speedup}x speedup is out of reach: skipping all {limit} eligible {self.kind} units gives {predicted:.3f}x")
            warnings.warn(f"layer_skip: {result.stats['left'][-1]}; nothing skipped", stacklevel=3)
            return []
        return self._within_budget(gm, units, method, ctx, limit, result)

    def _within_budget(self, gm: fx.GraphModule, units: list[Unit], method: str, ctx: Any, limit: int, result: PassResult) -> list[Unit]:
        budget = ctx.budget
        if budget.lossless:
            result.stats["left"].append("the budget is lossless: no unit may go (give count, fraction or speedup, or a budget such as ppl:+5%)")
            return []
        if getattr(ctx, "calibration_data", None) is None:
            raise UserInputError("layer_skip: choosing units within a quality budget needs calibration data (or give count, fraction or speedup)")
        if method == "greedy":  # every prefix is measured as it grows: stop at the first that does not fit
            n = 0
            while n < limit and budget.allows(*self._greedy.quality(n + 1)):
                n += 1
            result.stats["calibration_quality"] = self._greedy.report()
            return self._greedy.prefix(n)
        _, batches = self._batches(gm, ctx)
        reference = [_lm_outputs(gm, b) for b in batches]
        measured: dict[int, tuple[float, float]] = {}

        def quality(n: int) -> tuple[float, float]:
            if n not in measured:
                measured[n] = _quality(_skipped_copy(gm, self._order(units, method, n), self.drop_cache), batches, reference)
                self.say(f"{n} {self.kind} units skipped: calibration ppl {measured[n][0]:+.2%}, top-1 {measured[n][1]:.3f}")
            return measured[n]

        lo, hi = 0, limit  # lo fits the budget; find the largest n that does
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if budget.allows(*quality(mid)):
                lo = mid
            else:
                hi = mid - 1
        result.stats["calibration_quality"] = {str(n): {"ppl_increase": q[0], "top1_agreement": q[1]} for n, q in sorted(measured.items())}
        return self._order(units, method, lo)


class _Greedy:
    """The greedy order, grown on demand: step k skips, among the units left, the one whose
    removal together with the k-1 already chosen gives the lowest calibration perplexity."""

    def __init__(self, gm: fx.GraphModule, units: list[Unit], batches: list[list[Any]], drop_cache: bool, kind: str, say: Any) -> None:
        self.gm, self.units, self.batches, self.drop_cache, self.kind, self.say = gm, units, batches, drop_cache, kind, say
        self.reference = [_lm_outputs(gm, b) for b in batches]
        self.order: list[Unit] = []
        self.measured: list[tuple[float, float]] = []  # quality of each prefix, by length - 1

    def prefix(self, n: int) -> list[Unit]:
        while len(self.order) < min(n, len(self.units)):
            self._step()
        return self.order[:n]

    def quality(self, n: int) -> tuple[float, float]:
        """(ppl increase, top-1 agreement) with the first n units of the order skipped."""
        self.prefix(n)
        return self.measured[n - 1] if n > 0 else (0.0, 1.0)

    def report(self) -> dict[str, dict[str, Any]]:
        return {str(k + 1): {"unit": u.name, "ppl_increase": q[0], "top1_agreement": q[1]} for k, (u, q) in enumerate(zip(self.order, self.measured))}

    def _step(self) -> None:
        start = time.perf_counter()
        best: tuple[tuple[float, float], Unit] | None = None
        taken = {u.name for u in self.order}
        for u in self.units:
            if u.name in taken:
                continue
            q = _quality(_skipped_copy(self.gm, [*self.order, u], self.drop_cache), self.batches, self.reference)
            if best is None or q[0] < best[0][0]:
                best = (q, u)
        assert best is not None
        self.order.append(best[1])
        self.measured.append(best[0])
        self.say(f"greedy step {len(self.order)}: {best[1].name} (calibration ppl {best[0][0]:+.2%}, top-1 {best[0][1]:.3f}; {time.perf_counter() - start:.0f} s)")


# -- rewriting ------------------------------------------------------------------------------------


def apply_skips(gm: fx.GraphModule, sublayers: Sequence[Sublayer], drop_cache: bool = True) -> None:
    """Bypass `sublayers` of `gm` (found in this very graph) and delete what is dead; with
    `drop_cache`, their side outputs (cached keys and values) become empty along the sequence.

    First, every `cat([past, new], d)[..., past.size(d):]` (how an explicit-cache decode graph
    returns the new keys) becomes `new`: the same tensor, without a copy of the whole past, and
    without tying a layer's output to another layer's past length (the export reads one layer's
    size for all, and a dropped layer's past is empty)."""
    _simplify_cache_slices(gm)
    for s in sublayers:
        bypass(s)
        if drop_cache and s.side_outputs:
            _empty_side_outputs(gm, s.side_outputs)
    gm.graph.eliminate_dead_code()
    gm.graph.lint()
    gm.recompile()


def _simplify_cache_slices(gm: fx.GraphModule) -> None:
    from torch.fx.experimental.symbolic_shapes import statically_known_true

    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target != aten.slice.Tensor or len(node.args) < 3:
            continue
        cat, dim, start = node.args[:3]
        end = node.args[3] if len(node.args) > 3 else node.kwargs.get("end")
        step = node.args[4] if len(node.args) > 4 else node.kwargs.get("step", 1)
        if not (isinstance(cat, fx.Node) and cat.target == aten.cat.default and step == 1 and (end is None or (isinstance(end, int) and end >= 2**62))):
            continue
        parts = cat.args[0]
        cat_dim = cat.args[1] if len(cat.args) > 1 else cat.kwargs.get("dim", 0)
        vals = [p.meta.get("val") if isinstance(p, fx.Node) else None for p in parts] if isinstance(parts, (list, tuple)) else []
        if len(vals) != 2 or not all(isinstance(v, torch.Tensor) for v in vals):
            continue
        rank = vals[0].dim()
        if dim % rank != cat_dim % rank:
            continue
        start_val = start.meta.get("val") if isinstance(start, fx.Node) else start
        try:
            same = statically_known_true(start_val == vals[0].shape[dim % rank])
        except Exception:  # noqa: BLE001 - an expression the shape env cannot decide
            same = False
        if same:
            node.replace_all_uses_with(parts[1])


def _empty_side_outputs(gm: fx.GraphModule, indices: list[int]) -> None:
    """Replace the flat graph outputs at `indices` by zero-length tensors of their shape with the
    sequence dim (2: [B, H, S, D]) empty, where every other size is static; others stay."""
    output = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
    flat = list(output.args[0]) if isinstance(output.args[0], (list, tuple)) else [output.args[0]]
    for i in indices:
        node = flat[i]
        val = node.meta.get("val") if isinstance(node, fx.Node) else None
        if not isinstance(val, torch.Tensor) or val.dim() != 4:
            continue
        size = [0 if d == 2 else s for d, s in enumerate(val.shape)]
        if not all(isinstance(s, int) for s in size):
            continue
        with gm.graph.inserting_before(output):
            empty = gm.graph.call_function(aten.zeros.default, (size,), {"dtype": val.dtype, "device": val.device})
        propagate_meta(gm, [empty])
        flat[i] = empty
    output.args = (type(output.args[0])(flat) if isinstance(output.args[0], (list, tuple)) else flat[0],)


def _skipped_copy(gm: fx.GraphModule, units: Sequence[Unit], drop_cache: bool) -> fx.GraphModule:
    """A copy of `gm` with `units` (found in gm) skipped; gm stays as it is."""
    copy = copy_graph_module(gm)
    found = find_blocks(copy).sublayers  # the same sublayers, by index along the stream
    apply_skips(copy, [found[s.index] for u in units for s in u.sublayers], drop_cache)
    return copy


# -- prediction -----------------------------------------------------------------------------------


def _node_times(gm: fx.GraphModule, ctx: Any, length: int) -> dict[str, float]:
    """Predicted seconds per node name, every free size symbol bound to `length`."""
    model = getattr(ctx, "cost_model", None)
    if model is None:
        from compiler.cost_model import CostModel

        model = CostModel("host")
    estimate = model.graph(gm)
    estimate = estimate.at_length(length)
    return {e.name: float(e.time) for e in estimate.estimates}


def _surviving_time(gm: fx.GraphModule, times: dict[str, float]) -> float:
    return sum(times.get(n.name, 0.0) for n in gm.graph.nodes)


def _predicted(gm: fx.GraphModule, chosen: list[Unit], times: dict[str, float], total: float, drop_cache: bool) -> float:
    """The cost model's speedup of `gm` with `chosen` skipped (measured on a copy)."""
    if not chosen:
        return 1.0
    after = _surviving_time(_skipped_copy(gm, chosen, drop_cache), times)
    return total / after if after > 0 else math.inf


def _target_name(ctx: Any) -> str:
    target = getattr(ctx, "target", None)
    return getattr(target, "name", None) or "host"


# -- quality on calibration inputs ----------------------------------------------------------------


def _lm_outputs(gm: fx.GraphModule, inputs: Sequence[Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """(token ids [B, S], logits [B, S, V]) of an LM graph on flat inputs."""
    ids = inputs[0]
    with torch.no_grad():
        out = gm(*inputs)
    logits = out[0] if isinstance(out, (list, tuple)) else out
    if not (isinstance(ids, torch.Tensor) and ids.dim() == 2 and not ids.dtype.is_floating_point and isinstance(logits, torch.Tensor) and logits.dim() == 3 and logits.shape[:2] == ids.shape):
        raise UserInputError("layer_skip: a quality budget needs an LM graph (first input token ids [B, S], first output logits [B, S, V]); give count, fraction or speedup instead")
    return ids, logits.float()


def _quality(gm: fx.GraphModule, batches: Sequence[Sequence[Any]], reference: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[float, float]:
    """(relative ppl increase, top-1 agreement) of `gm` against the reference outputs."""
    nll_ref = nll = agree = tokens = 0.0
    for inputs, (ids, ref) in zip(batches, reference):
        _, logits = _lm_outputs(gm, inputs)
        target = ids[:, 1:]
        nll_ref += float(torch.nn.functional.cross_entropy(ref[:, :-1].flatten(0, 1), target.flatten(), reduction="sum"))
        nll += float(torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), target.flatten(), reduction="sum"))
        agree += float((logits[:, :-1].argmax(-1) == ref[:, :-1].argmax(-1)).sum())
        tokens += target.numel()
    return math.exp((nll - nll_ref) / tokens) - 1.0, agree / tokens
