"""The cost model API that passes, the planner and reports use.

    model = CostModel("h100")
    model.node(n)                      # one ATen/compiler op: Estimate
    model.region([a, b, c])            # a fused kernel: inputs and outputs only, one launch
    model.graph(gm)                    # every node: GraphEstimate (total, by category, table)
    model.compare(gm_before, gm_after) # predicted speedup of a rewrite
    model.summary({"prefill": (gm, {"s0": 2048}), "decode": (gm_decode, {...})})

Estimates keep shape symbols (from a dynamically captured graph, or put there by a pass) as
sympy expressions; `.at(bindings)` substitutes numbers, with symbols named by string or Symbol.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence, Union

import sympy
from torch import fx

from compiler.cost_model.rules import CATEGORIES, OpCost, frozen_graph, node_cost, node_value, tensors
from compiler.cost_model.work import Expr, Roofline, Work, roofline
from compiler.targets import Target, load_target

Bindings = Mapping[Union[str, sympy.Symbol], Any]


@dataclass(frozen=True)
class Estimate:
    """Predicted cost of one kernel (an op or a fused region) on one target."""

    name: str
    op: str
    category: str
    work: Work
    roofline: Roofline
    generic: bool = False

    @property
    def time(self) -> Expr:
        return self.roofline.time

    @property
    def bound(self) -> str:
        return self.roofline.bound

    @property
    def flops(self) -> Expr:
        return self.work.flops

    @property
    def bytes(self) -> Expr:
        return self.work.bytes

    @property
    def intensity(self) -> Expr:
        """Arithmetic intensity, FLOPs per byte moved (0 for free ops)."""
        return self.flops / self.bytes if _nonzero(self.bytes) else 0

    def at(self, bindings: Bindings) -> Estimate:
        subs = resolve(bindings, _free(self.time) | _free(self.bytes) | _free(self.flops))
        return Estimate(self.name, self.op, self.category, self.work.subs(subs), self.roofline.subs(subs), self.generic)

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "op": self.op,
            "category": self.category,
            "flops": as_json(self.flops),
            "bytes": as_json(self.bytes),
            "intensity": as_json(self.intensity),
            "time_s": as_json(self.time),
            "bound": self.bound,
            "launches": as_json(self.work.launches),
            **({"generic": True} if self.generic else {}),
        }


@dataclass(frozen=True)
class GraphEstimate:
    """Estimates of every kernel of a graph (free ops included, at zero cost)."""

    target: str
    estimates: tuple[Estimate, ...]
    sources: Mapping[str, sympy.Symbol] = field(default_factory=dict)

    @property
    def time(self) -> Expr:
        return _sum(e.time for e in self.estimates)

    @property
    def launches(self) -> Expr:
        return _sum(e.work.launches for e in self.estimates)

    @property
    def symbols(self) -> set[sympy.Symbol]:
        return _free(self.time)

    def by_category(self) -> dict[str, Expr]:
        return {c: _sum(e.time for e in self.estimates if e.category == c) for c in CATEGORIES}

    def generic_ops(self) -> dict[str, int]:
        """Ops the model has no rule for (priced generically), with their counts."""
        counts: dict[str, int] = {}
        for e in self.estimates:
            if e.generic:
                counts[e.op] = counts.get(e.op, 0) + 1
        return counts

    def at(self, bindings: Bindings) -> GraphEstimate:
        """Numbers for symbols, named by Symbol, by name ("s53") or by the input size they
        stand for ("input_ids.size(1)", see `shape_symbols`)."""
        named = {self.sources[k] if isinstance(k, str) and k in self.sources else k: v for k, v in bindings.items()}
        return GraphEstimate(self.target, tuple(e.at(named) for e in self.estimates), self.sources)

    def at_length(self, length: int) -> GraphEstimate:
        """Every free size symbol bound to `length`: the estimate of a graph symbolic in the
        sequence length alone (a prefill at `length` tokens, a decode step at that cache)."""
        return self.at({s: length for s in self.symbols})

    def kernels(self) -> list[Estimate]:
        """Estimates that launch something, most expensive first (numeric graphs only)."""
        launched = [e for e in self.estimates if _nonzero(e.work.launches)]
        return sorted(launched, key=lambda e: -float(e.time))


@dataclass(frozen=True)
class Comparison:
    before: GraphEstimate
    after: GraphEstimate

    @property
    def speedup(self) -> Expr:
        return _simplify(self.before.time / self.after.time)

    @property
    def saved(self) -> Expr:
        return _simplify(self.before.time - self.after.time)

    def by_category(self) -> dict[str, tuple[Expr, Expr]]:
        before, after = self.before.by_category(), self.after.by_category()
        return {c: (before[c], after[c]) for c in CATEGORIES}


@dataclass
class CostModel:
    """Roofline estimates for one target (its hardware figures from `targets/<name>.toml`)."""

    target: Target

    def __init__(self, target: str | Target) -> None:
        self.target = load_target(target)

    @property
    def hw(self):
        return self.target.hw

    def estimate(self, work: Work, name: str = "", op: str = "", category: str = "other", generic: bool = False) -> Estimate:
        """Price raw work (for formulas a pass builds itself, such as a kernel it may emit)."""
        return Estimate(name, op, category, work, roofline(work, self.hw), generic)

    def node(self, node: fx.Node) -> Estimate:
        region = _fused_region(node)
        if region is not None:
            # A region holding a norm (alone or after a residual add) counts as one, as
            # compiler::rms_norm does; others take the category of their heaviest member.
            norm = any(part.endswith("norm") for part in region.label.split("+"))
            return self.region(region.ops(), name=node.name, category="norm" if norm else None)
        cost = self._cost(node)
        return self.estimate(cost.work, node.name, op_name(node), cost.category, cost.generic)

    def region(self, nodes: Iterable[fx.Node], name: str | None = None, category: str | None = None) -> Estimate:
        """One fused kernel computing `nodes`: their arithmetic, but only the bytes of the
        region's external inputs (each read once) and of the values used outside it."""
        nodes = list(nodes)
        inside = set(nodes)
        costs = [self._cost(n) for n in nodes]
        compute = Work(launches=0)
        for c in costs:
            compute += Work(c.work.matmul_flops, c.work.vector_flops, c.work.transcendentals, launches=0)
        inputs = {a for n in nodes for a in n.all_input_nodes if a not in inside}
        read = _sum(t.nbytes for a in inputs for t in tensors(node_value(a)))
        written = _sum(t.nbytes for n in nodes if any(u not in inside for u in n.users) for t in tensors(node_value(n)))
        launches = 1 if any(_nonzero(c.work.launches) for c in costs) else 0
        work = Work(compute.matmul_flops, compute.vector_flops, compute.transcendentals, read, written, launches)
        if category is None:
            category = next((c for c in CATEGORIES if any(x.category == c and _nonzero(x.work.launches) for x in costs)), "other")
        label = name or (f"region({nodes[0].name}..{nodes[-1].name})" if nodes else "region()")
        return self.estimate(work, label, "fused", category)

    def graph(self, gm: fx.GraphModule) -> GraphEstimate:
        with frozen_graph():
            nodes = tuple(self.node(n) for n in gm.graph.nodes if n.op in ("call_function", "call_module"))
        return GraphEstimate(self.target.name, nodes, shape_symbols(gm))

    def compare(self, before: Any, after: Any, bindings: Bindings | None = None) -> Comparison:
        """Before vs after a rewrite; each side a GraphModule, a GraphEstimate, an Estimate, or
        a list of nodes (unfused)."""
        sides = [self._as_graph(x) for x in (before, after)]
        if bindings:
            sides = [s.at(bindings) for s in sides]
        return Comparison(*sides)

    def summary(self, phases: Mapping[str, tuple[Any, Bindings | None]]) -> dict[str, dict[str, Expr]]:
        """Time by category per phase, e.g. {"prefill": (gm, {"s0": 2048}), "decode": (...)}."""
        out = {}
        for phase, (graph, bindings) in phases.items():
            est = self._as_graph(graph)
            est = est.at(bindings) if bindings else est
            out[phase] = {**est.by_category(), "total": est.time}
        return out

    def _as_graph(self, x: Any) -> GraphEstimate:
        if isinstance(x, GraphEstimate):
            return x
        if isinstance(x, fx.GraphModule):
            return self.graph(x)
        if isinstance(x, Estimate):
            return GraphEstimate(self.target.name, (x,))
        return GraphEstimate(self.target.name, tuple(self.node(n) for n in x))

    def _cost(self, node: fx.Node) -> OpCost:
        # not cached: passes rewrite nodes in place, and a stale cost would mislead them
        return node_cost(node)


def _fused_region(node: fx.Node) -> Any:
    if node.op != "call_module":
        return None
    from compiler.passes.fusion.region import FusedRegion

    module = node.graph.owning_module.get_submodule(str(node.target))
    return module if isinstance(module, FusedRegion) else None


def op_name(node: fx.Node) -> str:
    target = node.target
    name = getattr(target, "name", None)
    if callable(name):
        return name().replace("::", ".")
    return getattr(target, "__name__", str(target))


def resolve(bindings: Bindings, free: set[sympy.Symbol]) -> dict[sympy.Symbol, Any]:
    """Bindings keyed by the expression's own Symbols (names match; assumptions may differ)."""
    by_name = {s.name: s for s in free}
    out = {}
    for key, value in bindings.items():
        name = key.name if isinstance(key, sympy.Symbol) else str(key)
        if name in by_name:
            out[by_name[name]] = value
    return out


def shape_symbols(gm: fx.GraphModule) -> dict[str, sympy.Symbol]:
    """The graph's shape symbols by the input size they stand for, e.g.
    {"input_ids.size(1)": s53}; sizes the capture proved equal share one symbol."""
    from compiler.ir import fake_mode_of

    try:
        env = fake_mode_of(gm).shape_env
    except Exception:  # a static graph has no shape environment
        return {}
    if env is None:
        return {}
    out = {}
    for sym, sources in getattr(env, "var_to_sources", {}).items():
        for source in sources:
            name = source.name() if callable(source.name) else source.name
            expr = env.replace(sym)
            if isinstance(expr, sympy.Symbol):
                out[re.sub(r"L\['(\w+)'\]\.size\(\)\[(\d+)\]", r"\1.size(\2)", name)] = expr
    return out


def as_json(v: Expr) -> float | str:
    if isinstance(v, sympy.Basic):
        return float(v) if v.is_number else str(v)
    return float(v)


def _nonzero(v: Expr) -> bool:
    return bool(v != 0) if not isinstance(v, sympy.Basic) else not v.is_zero


def _free(v: Expr) -> set[sympy.Symbol]:
    return set(v.free_symbols) if isinstance(v, sympy.Basic) else set()


def _sum(values: Iterable[Expr]) -> Expr:
    """Sum in floats while every value is a number (fast), in sympy once one is symbolic."""
    total: Expr = 0.0
    for v in values:
        if isinstance(v, sympy.Basic) and not v.is_number:
            total = total + v
        else:
            total = total + float(v)
    return _simplify(total)


def _simplify(v: Expr) -> Expr:
    if isinstance(v, sympy.Basic) and v.is_number:
        return float(v)
    return v


__all__: Sequence[str] = ("CostModel", "Estimate", "GraphEstimate", "Comparison", "shape_symbols", "resolve")
