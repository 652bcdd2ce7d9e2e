"""Pattern passes: a rewrite written as two plain Python functions.

    def search(x, w, eps):  return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))
    def replace(x, w, eps): return torch.ops.compiler.rms_norm(x, w, eps)
    FUSE = PatternPass("fuse_rms_norm", search, replace, [torch.randn(8, 16), torch.randn(16)],
                       scalars={"eps": 1e-6})

Both functions are traced with make_fx to ATen graphs, like Inductor's `register_replacement`,
so the pattern is written in the same language as the model. Scalars named in `scalars` are
wildcards: the search function is traced with a sentinel value for each, which binds to whatever
literal the graph holds there, and the replacement is traced again with the values a match bound,
so it may compute with them (`x * (eps * 2)`).

Where Inductor's matcher is weakest, this one is explicit:
- no global state: a PatternPass is an ordinary pass object placed in a pipeline;
- a failed match says why (`explain(gm, node)`), naming the first node that differs;
- multi-output patterns (the search function returns a tuple) are matched as one unit;
- replacements are inserted where every input is defined and before every outside user, so
  topological order holds without reordering, and a match whose computation would have to move
  across an op that mutates memory is refused (and explained).

Commutative ATen ops (add, mul) match with their operands in either order.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
import torch.fx as fx
from torch.fx.experimental.proxy_tensor import make_fx

from compiler.ir import is_mutating, propagate_meta
from compiler.passes.base import Pass, PassResult

aten = torch.ops.aten

_COMMUTATIVE = {aten.add.Tensor, aten.mul.Tensor}
# Sentinels for scalar wildcards: values no model holds as a literal, distinct per position.
_SENTINEL_BASE = 1234.56789e-7


@dataclass
class Match:
    """One occurrence of a pattern: pattern node -> graph node, and bound scalar wildcards."""

    nodes: dict[fx.Node, fx.Node] = field(default_factory=dict)
    scalars: dict[str, Any] = field(default_factory=dict)

    def copy(self) -> Match:
        return Match(dict(self.nodes), dict(self.scalars))

    def graph_nodes(self) -> list[fx.Node]:
        """The matched graph nodes that compute something (not the inputs)."""
        return [g for p, g in self.nodes.items() if p.op == "call_function"]

    def inputs(self) -> list[fx.Node]:
        return [g for p, g in self.nodes.items() if p.op == "placeholder"]


class _NoMatch(Exception):
    """Raised inside the matcher; its message is the explanation a user sees."""


def _source(fn: Callable[..., Any]) -> str:
    """The source of `fn`, or its bytecode and constants where there is none (for cache keys)."""
    try:
        return inspect.getsource(fn)
    except (OSError, TypeError):
        code = getattr(fn, "__code__", None)
        return repr(fn) if code is None else code.co_code.hex() + repr(code.co_consts)


def _describe(node: fx.Node) -> str:
    if node.op == "call_function":
        return f"{node.target} ({node.name})"
    return f"{node.op} {node.name}"


class Pattern:
    """A traced search function and its replacement."""

    def __init__(
        self,
        search: Callable[..., Any],
        replace: Callable[..., Any],
        example_inputs: Sequence[torch.Tensor],
        *,
        scalars: dict[str, float] | None = None,
    ) -> None:
        self.search_fn, self.replace_fn = search, replace
        self.scalars = dict(scalars or {})
        # Traced from copies, so one tensor given twice still makes two pattern inputs.
        self.example_inputs = [t.clone() for t in example_inputs]
        self.sentinels = {name: _SENTINEL_BASE * (i + 1) for i, name in enumerate(self.scalars)}
        self.search_graph = self._trace(search, self.sentinels)
        self.inputs = [n for n in self.search_graph.nodes if n.op == "placeholder"]
        out = next(n for n in self.search_graph.nodes if n.op == "output").args[0]
        self.outputs: list[fx.Node] = list(out) if isinstance(out, (tuple, list)) else [out]
        self._depth = sum(1 for n in self.search_graph.nodes if n.op == "call_function")
        for o in self.outputs:
            if not isinstance(o, fx.Node) or o.op != "call_function":
                raise ValueError(f"pattern {search.__name__}: every output must be computed by an op")
        leaves: list[Any] = []
        for n in self.search_graph.nodes:
            fx.node.map_aggregate((n.args, n.kwargs), leaves.append)
        literals = {v for v in leaves if isinstance(v, float)}
        unbindable = [name for name, s in self.sentinels.items() if s not in literals]
        if unbindable:
            raise ValueError(
                f"pattern {search.__name__}: scalars {unbindable} are not passed as they are to an op, so they cannot bind"
            )
        self._replace_graphs: dict[tuple[str, ...], fx.Graph] = {}
        self.replace_graph(self.scalars)  # fails here, not at the first match, if it cannot trace

    def _trace(self, fn: Callable[..., Any], scalars: dict[str, Any]) -> fx.Graph:
        params = list(inspect.signature(fn).parameters)
        unknown = set(scalars) - set(params)
        if unknown:
            raise ValueError(f"{fn.__name__}: scalars {sorted(unknown)} are not parameters of the function")
        tensor_params = [p for p in params if p not in scalars]
        if len(tensor_params) != len(self.example_inputs):
            raise ValueError(
                f"{fn.__name__}: {len(tensor_params)} tensor parameters but {len(self.example_inputs)} example inputs"
            )

        def bound(*tensors: torch.Tensor) -> Any:
            return fn(**dict(zip(tensor_params, tensors)), **scalars)

        gm = make_fx(bound, tracing_mode="fake")(*self.example_inputs)
        gm.graph.eliminate_dead_code()
        return gm.graph

    def replace_graph(self, scalars: dict[str, Any]) -> fx.Graph:
        """The replacement traced with these scalar values (a match's, or the declared examples)."""
        values = {name: scalars[name] for name in self.scalars}
        key = tuple(repr(v) for v in values.values())  # 1 and 1.0, 0.0 and -0.0 trace differently
        if key not in self._replace_graphs:
            self._replace_graphs[key] = self._trace(self.replace_fn, values)
        return self._replace_graphs[key]

    def config(self) -> dict[str, Any]:
        """What the traced graphs depend on: both functions, the example inputs' types, the wildcards."""
        return {
            "search": _source(self.search_fn),
            "replace": _source(self.replace_fn),
            "inputs": [f"{t.dtype}{list(t.shape)}" for t in self.example_inputs],
            "scalars": sorted(self.scalars),
        }

    # -- matching --------------------------------------------------------------------------

    def match_at(self, anchor: fx.Node) -> Match:
        """Match with the first output at `anchor`; raises _NoMatch with the reason."""
        m = Match()
        first = self.outputs[0]
        m = self._match_node(first, anchor, m)
        for out in self.outputs[1:]:
            m = self._match_extra_output(out, m)
        self._check_closed(m)
        return m

    def _match_extra_output(self, out: fx.Node, m: Match) -> Match:
        if out in m.nodes:
            return m
        reasons = []
        for cand in self._forward_candidates(m, out.target):
            try:
                return self._match_node(out, cand, m.copy())
            except _NoMatch as exc:
                reasons.append(str(exc))
        detail = f": {reasons[0]}" if reasons else ""
        raise _NoMatch(f"no node computes the pattern's output {out.name} ({out.target}) next to the match{detail}")

    def _forward_candidates(self, m: Match, target: Any) -> list[fx.Node]:
        seen = set(m.nodes.values())
        frontier = list(seen)
        found = []
        for _ in range(self._depth):
            nxt = []
            for node in frontier:
                for user in node.users:
                    if user not in seen:
                        seen.add(user)
                        nxt.append(user)
                        if user.op == "call_function" and user.target == target:
                            found.append(user)
            frontier = nxt
        return found

    def _match_node(self, p: fx.Node, g: fx.Node, m: Match) -> Match:
        if p in m.nodes:
            if m.nodes[p] is not g:
                raise _NoMatch(f"pattern value {p.name} would be both {m.nodes[p].name} and {g.name}")
            return m
        if p.op == "placeholder":
            m.nodes[p] = g
            return m
        if g.op != "call_function" or g.target != p.target:
            raise _NoMatch(f"expected {p.target} but found {_describe(g)}")
        if g in m.nodes.values():
            raise _NoMatch(f"{_describe(g)} would match two pattern nodes")
        m.nodes[p] = g
        if len(p.args) != len(g.args) or set(p.kwargs) != set(g.kwargs):
            raise _NoMatch(f"{_describe(g)} is called with other arguments than the pattern's {p.target}")
        orders = [p.args]
        if p.target in _COMMUTATIVE and len(p.args) == 2:
            orders.append((p.args[1], p.args[0]))
        first_error: _NoMatch | None = None
        for args in orders:
            try:
                trial = self._match_args(list(args), list(g.args), m.copy(), g)
                return self._match_args([p.kwargs[k] for k in sorted(p.kwargs)], [g.kwargs[k] for k in sorted(g.kwargs)], trial, g)
            except _NoMatch as exc:
                first_error = first_error or exc
        assert first_error is not None
        raise first_error

    def _match_args(self, pargs: list[Any], gargs: list[Any], m: Match, owner: fx.Node) -> Match:
        for i, (pa, ga) in enumerate(zip(pargs, gargs)):
            if isinstance(pa, fx.Node):
                if not isinstance(ga, fx.Node):
                    raise _NoMatch(f"argument {i} of {_describe(owner)} is the constant {ga!r}, the pattern expects a value")
                m = self._match_node(pa, ga, m)
            elif isinstance(pa, (list, tuple)):
                if not isinstance(ga, (list, tuple)) or len(pa) != len(ga):
                    raise _NoMatch(f"argument {i} of {_describe(owner)} is {ga!r}, the pattern expects {pa!r}")
                m = self._match_args(list(pa), list(ga), m, owner)
            else:
                m = self._match_literal(pa, ga, i, owner, m)
        return m

    def _match_literal(self, pa: Any, ga: Any, i: int, owner: fx.Node, m: Match) -> Match:
        for name, sentinel in self.sentinels.items():
            if isinstance(pa, float) and pa == sentinel:
                if isinstance(ga, fx.Node) or isinstance(ga, bool) or not isinstance(ga, (int, float)):
                    raise _NoMatch(f"argument {i} of {_describe(owner)} should be the scalar {name}, found {ga!r}")
                if name in m.scalars and m.scalars[name] != ga:
                    raise _NoMatch(f"scalar {name} is {m.scalars[name]!r} in one place and {ga!r} in another")
                m.scalars[name] = ga
                return m
        if pa != ga or type(pa) is not type(ga):
            raise _NoMatch(f"argument {i} of {_describe(owner)} is {ga!r}, the pattern expects {pa!r}")
        return m

    def _check_closed(self, m: Match) -> None:
        """Interior values of a match may only be used inside the match."""
        inside = set(m.graph_nodes())
        outputs = {m.nodes[o] for o in self.outputs}
        for g in inside - outputs:
            for user in g.users:
                if user not in inside:
                    raise _NoMatch(f"{_describe(g)} is also used by {_describe(user)} outside the pattern")

    # -- rewriting -------------------------------------------------------------------------

    def insertion_point(self, gm: fx.GraphModule, m: Match) -> fx.Node:
        """The node before which the replacement goes; raises _NoMatch when there is none."""
        order = {n: i for i, n in enumerate(gm.graph.nodes)}
        matched = m.graph_nodes()
        inputs = m.inputs()
        outputs = {m.nodes[o] for o in self.outputs}
        inside = set(matched)
        outside_users = [u for o in outputs for u in o.users if u not in inside]
        first_use = min(outside_users, key=order.__getitem__) if outside_users else None
        last_input = max(inputs, key=order.__getitem__) if inputs else None
        # Put the replacement where the first output was computed, unless an input comes later.
        anchor = min(outputs, key=order.__getitem__)
        point = anchor
        if last_input is not None and order[last_input] >= order[anchor]:
            point = last_input.next
        if first_use is not None and order[point] > order[first_use]:
            raise _NoMatch(
                f"the replacement needs {_describe(last_input)} but an output is used earlier by {_describe(first_use)}"
            )
        lo = min([order[n] for n in matched] + [order[point]])
        hi = max([order[n] for n in matched] + [order[point]])
        for node in gm.graph.nodes:
            if lo < order[node] < hi and node not in inside and is_mutating(node):
                raise _NoMatch(f"the rewrite would move computation across the mutation {_describe(node)}")
        return point

    def apply(self, gm: fx.GraphModule, m: Match) -> list[fx.Node]:
        """Replace the match by the traced replacement; returns the new nodes."""
        point = self.insertion_point(gm, m)
        replace_graph = self.replace_graph(m.scalars)
        replace_inputs = [n for n in replace_graph.nodes if n.op == "placeholder"]
        env: dict[fx.Node, Any] = {r: m.nodes[p] for r, p in zip(replace_inputs, self.inputs)}
        new_nodes: list[fx.Node] = []
        replacement_outputs: list[Any] = []
        anchor_meta = m.nodes[self.outputs[0]].meta
        with gm.graph.inserting_before(point):
            for rn in replace_graph.nodes:
                if rn.op == "placeholder":
                    continue
                if rn.op == "output":
                    out = rn.args[0]
                    replacement_outputs = list(out) if isinstance(out, (tuple, list)) else [out]
                    continue
                args = fx.node.map_arg(rn.args, env.__getitem__)
                kwargs = fx.node.map_arg(rn.kwargs, env.__getitem__)
                node = gm.graph.call_function(rn.target, args, kwargs)
                for key in ("stack_trace", "nn_module_stack"):
                    if key in anchor_meta:
                        node.meta[key] = anchor_meta[key]
                env[rn] = node
                new_nodes.append(node)
        if len(replacement_outputs) != len(self.outputs):
            raise ValueError("the replacement must return as many values as the search function")
        propagate_meta(gm, new_nodes)
        for po, ro in zip(self.outputs, replacement_outputs):
            m.nodes[po].replace_all_uses_with(env[ro] if isinstance(ro, fx.Node) else ro)
        matched = set(m.graph_nodes())
        for g in reversed(list(gm.graph.nodes)):
            if g in matched and not g.users:
                gm.graph.erase_node(g)
        return new_nodes


Check = Callable[[Match], "bool | str"]


class PatternPass(Pass):
    """A pass that rewrites every match of one or more patterns.

    `check(match)` may veto a match: return True to accept, False or a reason string to refuse
    (the reason shows up in `explain`).
    """

    def __init__(
        self,
        name: str,
        search: Callable[..., Any] | None = None,
        replace: Callable[..., Any] | None = None,
        example_inputs: Sequence[torch.Tensor] = (),
        *,
        scalars: dict[str, float] | None = None,
        check: Check | None = None,
        patterns: Sequence[Pattern] = (),
        lossy: bool = False,
    ) -> None:
        self.name = name  # type: ignore[misc]
        self.lossy = lossy  # type: ignore[misc]
        self.patterns = list(patterns)
        if search is not None:
            if replace is None:
                raise ValueError(f"pattern pass {name!r}: give a replacement with the search function")
            self.patterns.append(Pattern(search, replace, example_inputs, scalars=scalars))
        if not self.patterns:
            raise ValueError(f"pattern pass {name!r} has no pattern")
        self.check = check

    def _try(self, gm: fx.GraphModule, pattern: Pattern, anchor: fx.Node) -> Match:
        m = pattern.match_at(anchor)
        if self.check is not None:
            verdict = self.check(m)
            if verdict is not True:
                reason = verdict if isinstance(verdict, str) else "the pass's check refused it"
                raise _NoMatch(reason)
        pattern.insertion_point(gm, m)
        return m

    def run(self, gm: fx.GraphModule, ctx: Any = None) -> PassResult:
        result = PassResult()
        count = 0
        for pattern in self.patterns:
            target = pattern.outputs[0].target
            for anchor in list(gm.graph.nodes):
                if anchor.graph is not gm.graph or anchor.op != "call_function" or anchor.target != target:
                    continue
                try:
                    m = self._try(gm, pattern, anchor)
                except _NoMatch:
                    continue
                pattern.apply(gm, m)
                count += 1
                result.record(f"rewrote {pattern.search_fn.__name__} at {anchor.name} -> {pattern.replace_fn.__name__}")
        gm.graph.lint()
        result.stats["matches"] = count
        return result

    def explain(self, gm: fx.GraphModule, node: fx.Node | str) -> str:
        """Why the pattern does or does not match with its output at `node`."""
        if isinstance(node, str):
            node = next(n for n in gm.graph.nodes if n.name == node)
        reasons = []
        for pattern in self.patterns:
            target = pattern.outputs[0].target
            if node.op != "call_function" or node.target != target:
                reasons.append(f"{_describe(node)} is not the pattern's output op {target}")
                continue
            try:
                self._try(gm, pattern, node)
            except _NoMatch as exc:
                reasons.append(f"no match at {node.name}: {exc}")
                continue
            return f"matches at {node.name}"
        return "; ".join(reasons)

    def config(self) -> dict[str, Any]:
        return {
            "patterns": [p.config() for p in self.patterns],
            "check": None if self.check is None else _source(self.check),
        }
