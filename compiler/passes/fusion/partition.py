"""FusePartition: group elementwise ops, last-dim reductions, and matmuls with the elementwise ops
that consume their result, of the ATen graph into fused regions (`compiler.passes.fusion.region`),
one kernel each, where the cost model says it pays.

Kinds: "pointwise" and "reduction" regions, and "matmul_epilogue" regions: one `mm`, `addmm` or
`bmm` with its epilogue (a bias, a residual add, an activation, SwiGLU's `silu(x @ Wg) * up`),
computed on the accumulator of a tiled GEMM before its one store. A kind is formed only when the
target's backend has a lowering that takes it (`compiler.codegen.region_kinds`): on Triton
targets all three; on the host (TVM) matmuls stay with the BLAS, boundaries as before; without
a target, the kinds every backend takes.

Algorithm
---------
1. Classify every node as
   - *pointwise*: ATen ops tagged pointwise (broadcasting and scalar arguments included), dtype
     casts (`_to_copy` within a device), `clone`, `copy` and `cat`;
   - *reduction*: `mean`/`sum`/`amax`/`amin`/`prod`/`var`/`var_mean`/`logsumexp`, `_softmax`,
     `_log_softmax` and `native_layer_norm`, over the last dim only;
   - *view*: ops whose output aliases their input (view, reshape, unsqueeze, expand, permute,
     transpose, slice, select, `_unsafe_view`), which the cost model prices at zero;
   - *matmul*: `mm`, `addmm` and `bmm` of fp32, fp16 or bf16 tensors, when matmul_epilogue
     regions are formed;
   - a boundary: anything else: matmuls otherwise, SDPA, `compiler::*` ops, embeddings and
     indexing, factories, random ops, mutating ops, and ops this pass does not know.
2. Mutation: every mutating op (`compiler.ir.is_mutating`) starts a new epoch; a region holds
   nodes of one epoch only, so fusing never moves a read across a write.
3. Merge along edges in topological order (union of groups, convex by construction). Each
   pointwise or reduction node starts a group and tries to join the group of each of its
   producers, reached directly or through a chain of views (which join with it). A matmul
   starts a group and joins none (no prologue: the GEMM reads its operands from memory); its
   consumers join it, and those that read the product through a view with several users (GELU
   reads x three times) join it after the walk, once they are one group. The union is kept
   when it
   - has at most `max_nodes` nodes, all in one epoch, and no view with a user outside it;
   - has one iteration space: a pointwise region's outputs have equal element counts; a
     reduction region's reductions all reduce the same (rows, N) and its outputs have rows*N or
     rows elements (what a row kernel writes); a matmul region holds one matmul, no reduction
     and none of the matmul's operands, and every member computed from the product, and every
     output, has the product's element count, the product reaching them through reshapes only
     (view, `_unsafe_view`, unsqueeze, squeeze: the [M, N] -> [B, S, N] of a linear layer). So
     each output element is the function of the product's element at the same flat position,
     which the GEMM's tile holds (other operands broadcast or have that shape);
   - keeps the graph of groups acyclic: a search from the union's outside users, which enters
     and leaves every other group as one node, must not come back into the union. Nodes are
     visited in topological order, so every grouped node lies before a high-water mark and the
     search stops at ungrouped nodes past it.
   Every group is therefore convex and contracting all of them leaves a DAG; networkx checks
   that once more on the quotient graph before anything is rewritten.
4. Leading views whose users all lie in one group join it: the region then reads the buffer
   the views alias, once. The views a matmul reads as an operand stay out (a transposed
   weight, `t(w)`): the GEMM reads the view itself, through its strides. A matmul with no
   launching op fused after it is no candidate: alone it is the BLAS's job.
5. Gate: a group needs `min_ops` launching ops and, when the context has a cost model, a
   predicted speedup above 1 (`cost_model.compare(nodes, cost_model.region(nodes))`).
6. Label the LLM patterns a group holds (swiglu, rotary, softmax, log_softmax, rms_norm,
   layer_norm, residual+norm, gelu, repeat_kv; a matmul region is "linear" or "bmm" with its
   epilogue's bias, residual and patterns, e.g. "linear+swiglu", "linear+bias+gelu", or
   "matmul_epilogue" when none is known), replace each group by `fuse_nodes`, and put the
   nodes back in their original order (a stable topological sort: `fuse_nodes` moves the
   users of early region outputs after the region call).

The cost model prices a matmul region as one kernel doing the matmul's FLOPs and its epilogue's,
reading the operands and the epilogue's other inputs and writing the outputs: the product's
write and read back, and each epilogue op's intermediate, are what fusing saves.
"""

from __future__ import annotations

import heapq
import math
import operator
from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterable, Sequence

import networkx as nx
import sympy
import torch
from torch import fx

from compiler.cost_model.rules import as_expr, frozen_graph, node_cost
from compiler.errors import PassError
from compiler.ir import at_hints, is_mutating, is_view, recompile
from compiler.passes.base import Pass, PassResult
from compiler.passes.fusion.region import REGION_KINDS, fuse_nodes
from compiler.targets import load_target

if TYPE_CHECKING:
    from compiler.passes.pipeline import PassContext

aten = torch.ops.aten

POINTWISE, REDUCTION, VIEW, MATMUL = "pointwise", "reduction", "view", "matmul"
MATMUL_EPILOGUE = "matmul_epilogue"
FORMED_KINDS = (POINTWISE, REDUCTION, MATMUL_EPILOGUE)

MATMULS = {aten.mm.default, aten.addmm.default, aten.bmm.default}
_GEMM_DTYPES = {torch.float32, torch.float16, torch.bfloat16}
# Views that keep the elements' row-major order: an epilogue reads the product through these
# only (codegen relies on it: compiler.codegen.triton.matmul).
RESHAPES = {
    aten.view.default, aten._unsafe_view.default, aten.reshape.default, aten.unsqueeze.default,
    aten.squeeze.default, aten.squeeze.dim, aten.squeeze.dims,
}

_COPIES = {aten._to_copy.default, aten.clone.default, aten.copy.default, aten.cat.default}
# Reductions with a `dim` argument (second positional); None or [] means every dim.
_DIM_REDUCTIONS = {
    aten.mean.dim, aten.sum.dim_IntList, aten.amax.default, aten.amin.default, aten.prod.dim_int,
    aten.var.correction, aten.var_mean.correction, aten.logsumexp.default,
}
_SOFTMAXES = {aten._softmax.default, aten._log_softmax.default}
_NORMS = {aten.native_layer_norm.default}


class FusePartition(Pass):
    """Form pointwise, reduction and matmul_epilogue regions (see the module docstring for the
    algorithm).

    Options: `kinds`, the region kinds to form (a subset of "pointwise", "reduction",
    "matmul_epilogue", of which only those the target's backend lowers are formed; pointwise
    ops still join reduction and matmul regions as prologue and epilogue when only those are
    asked for); `max_nodes`, the most nodes (views included) in one region; `min_ops`, the
    fewest launching ops (kernels of the unfused graph) worth a region.
    """

    name = "fuse_regions"
    lossy = False

    def __init__(self, kinds: Sequence[str] = FORMED_KINDS, max_nodes: int = 32, min_ops: int = 2) -> None:
        unknown = [k for k in kinds if k not in REGION_KINDS]
        if unknown:
            raise ValueError(f"unknown region kind(s) {unknown}; kinds are {list(REGION_KINDS)}")
        later = [k for k in kinds if k not in FORMED_KINDS]
        if later:
            raise ValueError(f"FusePartition does not form {later} regions yet; it forms {list(FORMED_KINDS)}")
        if max_nodes < 2 or min_ops < 1:
            raise ValueError(f"need max_nodes >= 2 and min_ops >= 1, got max_nodes={max_nodes}, min_ops={min_ops}")
        self.kinds = tuple(kinds)
        self.max_nodes = max_nodes
        self.min_ops = min_ops

    def config(self) -> dict[str, Any]:
        return {"kinds": list(self.kinds), "max_nodes": self.max_nodes, "min_ops": self.min_ops}

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        result = PassResult()
        model = ctx.cost_model
        kinds = self.formed_kinds(ctx)
        planner = Planner(gm, kinds, self.max_nodes)
        groups = planner.plan()
        rejected: Counter[str] = Counter()
        chosen: list[_Region] = []
        with frozen_graph():  # pricing only; the graph changes in _fuse below
            for nodes, kind in groups:
                if kind not in kinds:
                    rejected["kind"] += 1
                    continue
                launching = sum(1 for n in nodes if launches(n))
                if launching < self.min_ops:
                    rejected["min_ops"] += 1
                    continue
                before: Any = None
                after: Any = None
                if model is not None:
                    cmp = model.compare(nodes, model.region(nodes))
                    before, after = cmp.before.time, cmp.after.time
                    if not _exceeds_one(cmp.speedup, gm):
                        rejected["cost"] += 1
                        continue
                chosen.append(_Region([n.name for n in nodes], kind, label(nodes) or kind, launching, before, after))
        planner.check_acyclic([set(r.names) for r in chosen])
        self._fuse(gm, chosen, result)
        result.stats = {"kinds": list(kinds), **_stats(chosen, rejected)}
        return result

    def formed_kinds(self, ctx: PassContext) -> tuple[str, ...]:
        """The asked-for kinds that the target's backend lowers; without a target, those that
        every backend lowers."""
        # Imported here: compiler.codegen imports the region module of this package.
        from compiler.codegen import region_kinds

        backend = load_target(ctx.target).codegen if ctx.target is not None else None
        lowered = region_kinds(backend)
        return tuple(k for k in self.kinds if k in lowered)

    def _fuse(self, gm: fx.GraphModule, chosen: list[_Region], result: PassResult) -> None:
        if not chosen:
            return
        key: dict[str, tuple[float, int]] = {n.name: (float(i), 0) for i, n in enumerate(gm.graph.nodes)}
        for region in chosen:
            by_name = {n.name: n for n in gm.graph.nodes}
            place = max(key[name] for name in region.names)
            call = fuse_nodes(gm, [by_name[name] for name in region.names], region.kind, region.label, recompile=False)
            key[call.name] = place
            items = [u for u in call.users if u.target is operator.getitem]  # multiple outputs
            for i, item in enumerate(sorted(items, key=lambda u: u.args[1])):
                key[item.name] = (place[0], i + 1)
            result.record(
                f"{region.kind} region {call.target} [{region.label}]: {len(region.names)} nodes, "
                f"{region.launching} kernels -> 1 ({', '.join(region.names)}); "
                f"predicted {_fmt(region.before)} -> {_fmt(region.after)}"
            )
        _restore_order(gm, key)


@dataclass
class _Region:
    names: list[str]
    kind: str
    label: str
    launching: int
    before: Any
    after: Any


@dataclass(eq=False)
class _Group:
    nodes: set[fx.Node]
    epoch: int


class Planner:
    """Chooses the candidate groups of one graph (steps 1-4 of the module docstring); reads
    the graph and does not change it."""

    def __init__(self, gm: fx.GraphModule, kinds: Sequence[str] = FORMED_KINDS, max_nodes: int = 32) -> None:
        self.gm = gm
        self.max_nodes = max_nodes
        self.nodes = list(gm.graph.nodes)
        self.order = {n: i for i, n in enumerate(self.nodes)}
        self.dag = nx.DiGraph()
        self.dag.add_nodes_from(self.nodes)
        self.dag.add_edges_from((a, n) for n in self.nodes for a in n.all_input_nodes)
        self.kind = {n: classify(n) for n in self.nodes}
        if REDUCTION not in kinds:
            self.kind = {n: (None if k == REDUCTION else k) for n, k in self.kind.items()}
        if MATMUL_EPILOGUE not in kinds:
            self.kind = {n: (None if k == MATMUL else k) for n, k in self.kind.items()}
        self.epoch: dict[fx.Node, int] = {}
        writes = 0
        for n in self.nodes:
            self.epoch[n] = writes
            writes += is_mutating(n)
        self.group_of: dict[fx.Node, _Group] = {}
        self.high = -1  # every grouped node lies at or before this position

    def plan(self) -> list[tuple[list[fx.Node], str]]:
        """The groups (nodes in graph order) with their kinds, first group first."""
        for n in self.nodes:
            if self.kind[n] not in (POINTWISE, REDUCTION, MATMUL) or n in self.group_of:
                continue
            unit = {n, *(u for u in n.users if u.target is operator.getitem)}
            group = _Group(unit, self.epoch[n])
            for m in unit:
                self.group_of[m] = group
            self.high = max(self.high, *(self.order[m] for m in unit))
            if self.kind[n] == MATMUL:
                continue  # no prologue: its consumers join it
            for a in dict.fromkeys(n.all_input_nodes):
                chain, producer = self._view_chain(a)
                if producer is not None and producer in self.group_of and self.group_of[producer] is not self.group_of[n]:
                    self._try_merge(self.group_of[n], self.group_of[producer], chain)
        for n in self.nodes:
            if self.kind[n] == MATMUL:
                self._join_shared_view_consumers(n)
        groups = list({id(g): g for g in self.group_of.values()}.values())
        for g in groups:
            self._absorb_leading_views(g)
        out = []
        for g in sorted(groups, key=lambda g: min(self.order[m] for m in g.nodes)):
            kind = self._space(g.nodes)  # a singleton unit always has one; merges kept theirs
            if kind == MATMUL_EPILOGUE and not any(launches(m) for m in g.nodes if self.kind[m] != MATMUL):
                continue  # a matmul alone: nothing to fuse
            if kind is not None:
                out.append((sorted(g.nodes, key=self.order.__getitem__), kind))
        return out

    def _view_chain(self, a: fx.Node) -> tuple[list[fx.Node], fx.Node | None]:
        """Views from `a` up to the first non-view (or already grouped) node."""
        chain = []
        while self.kind[a] == VIEW and a not in self.group_of:
            chain.append(a)
            if not a.args or not isinstance(a.args[0], fx.Node):
                return chain, None
            a = a.args[0]
        return chain, a

    def _try_merge(self, a: _Group, b: _Group, chain: list[fx.Node]) -> bool:
        members = a.nodes | b.nodes | set(chain)
        if len(members) > self.max_nodes or a.epoch != b.epoch or any(self.epoch[v] != a.epoch for v in chain):
            return False
        if any(u not in members for v in chain for u in v.users):
            return False  # a view used outside would become a region output that aliases
        if self._space(members) is None or self._reenters(members):
            return False
        merged = _Group(members, a.epoch)
        for m in members:
            self.group_of[m] = merged
        return True

    def _join_shared_view_consumers(self, mm: fx.Node) -> None:
        """Merge into the matmul's group the group that reads the product through a view with
        several users (GELU reads x three times). While the walk met those users they were
        separate groups, and a view with users outside a union cannot join it; by now they may
        be one group."""
        for v in list(mm.users):
            chain = []
            while self.kind[v] == VIEW and v not in self.group_of:
                chain.append(v)
                if len(v.users) != 1:
                    break
                v = next(iter(v.users))
            consumers = {self.group_of.get(u) for u in chain[-1].users} if chain else set()
            if len(consumers) == 1 and None not in consumers:
                (group,) = consumers
                if group is not self.group_of[mm]:
                    self._try_merge(group, self.group_of[mm], chain)

    def _space(self, members: set[fx.Node]) -> str | None:
        """The kind of kernel that can compute `members` in one iteration space, or None."""
        outputs = [m for m in members if any(u not in members for u in m.users)]
        numels = {_numel(m) for m in outputs}
        reductions = [m for m in members if self.kind[m] == REDUCTION]
        matmuls = [m for m in members if self.kind[m] == MATMUL]
        if matmuls:
            return MATMUL_EPILOGUE if not reductions and self._is_epilogue(matmuls, members, outputs) else None
        if not reductions:
            return POINTWISE if len(numels) <= 1 else None
        signatures = {row_signature(r) for r in reductions}
        if len(signatures) != 1:
            return None
        rows, n = signatures.pop()
        return REDUCTION if numels <= {rows * n, rows} else None

    def _is_epilogue(self, matmuls: list[fx.Node], members: set[fx.Node], outputs: list[fx.Node]) -> bool:
        """Whether `members` are one matmul and ops that a GEMM computes on its output tile:
        none of the matmul's operands, and the product's elements reach every output, and every
        member computed from them, through reshapes and elementwise ops only. A member read
        only by reductions is left to them as their prologue (the `x**2` of an RMSNorm after a
        residual add): here it would be one more output, which the reduction's region computes
        from what it reads anyway."""
        if len(matmuls) != 1:
            return False
        (mm,) = matmuls
        if any(a in members for a in gemm_operands(mm)):
            return False
        if any(m.users and all(u not in members and self.kind[u] == REDUCTION for u in m.users) for m in members):
            return False
        size = _numel(mm)
        if any(not _same(_numel(o), size) for o in outputs):
            return False
        return all(
            _same(_numel(m), size) and (self.kind[m] != VIEW or m.target in RESHAPES)
            for m in _computed_from(mm, members)
        )

    def _reenters(self, members: set[fx.Node]) -> bool:
        """True when a path leaves `members` and comes back, other groups counting as one node."""
        bound = max(self.high, *(self.order[m] for m in members))
        stack = [u for m in members for u in self.dag.successors(m) if u not in members]
        seen: set[fx.Node] = set()
        while stack:
            x = stack.pop()
            if x in members:
                return True
            if x in seen:
                continue
            group = self.group_of.get(x)
            if group is None and self.order[x] > bound:
                continue  # ungrouped and past every grouped node: nothing after it is grouped
            block = group.nodes if group is not None else {x}
            seen |= block
            stack.extend(z for y in block for z in self.dag.successors(y) if z not in seen)
        return False

    def _absorb_leading_views(self, g: _Group) -> None:
        grew = True
        while grew:
            grew = False
            for m in list(g.nodes):
                for v in m.all_input_nodes:
                    if (
                        self.kind[v] == VIEW and v not in self.group_of and self.epoch[v] == g.epoch
                        and len(g.nodes) < self.max_nodes and all(u in g.nodes for u in v.users)
                        and not any(self.kind[u] == MATMUL and v in gemm_operands(u) for u in v.users)
                    ):
                        g.nodes.add(v)
                        self.group_of[v] = g
                        grew = True

    def check_acyclic(self, groups: Iterable[set[str]]) -> None:
        """Contracting `groups` (node names) must leave a DAG; PassError otherwise."""
        group_of = {name: f"#group{i}" for i, names in enumerate(groups) for name in names}
        rep = {n: group_of.get(n.name, n.name) for n in self.nodes}
        quotient = nx.DiGraph()
        quotient.add_nodes_from(set(rep.values()))
        quotient.add_edges_from((rep[a], rep[b]) for a, b in self.dag.edges if rep[a] != rep[b])
        if not nx.is_directed_acyclic_graph(quotient):
            raise PassError(f"fuse_regions: fusing would create the cycle {nx.find_cycle(quotient)}")


# -- classification ---------------------------------------------------------------------------


def classify(node: fx.Node) -> str | None:
    """"pointwise", "reduction", "view", "matmul", or None for a region boundary."""
    target = node.target
    if node.op != "call_function" or not isinstance(target, torch._ops.OpOverload) or target.namespace != "aten":
        return None
    if is_mutating(node) or torch.Tag.nondeterministic_seeded in target.tags:
        return None
    val = node.meta.get("val")
    if target in MATMULS:
        tensors = [*_input_tensors(node), val]
        ok = isinstance(val, torch.Tensor) and all(t.layout == torch.strided and t.dtype in _GEMM_DTYPES for t in tensors)
        return MATMUL if ok and len({(t.dtype, t.device) for t in tensors}) == 1 else None
    if _is_view(target):
        return VIEW if isinstance(val, torch.Tensor) and node.args and isinstance(node.args[0], fx.Node) else None
    if target in _DIM_REDUCTIONS or target in _SOFTMAXES or target in _NORMS:
        if isinstance(val, (tuple, list)) and any(u.target is not operator.getitem for u in node.users):
            return None
        return REDUCTION if reduced_dims(node) == "last" else None
    if not isinstance(val, torch.Tensor) or val.layout != torch.strided:
        return None
    if target is aten.cat.default and any(isinstance(p, fx.Node) and p.op == "placeholder" for p in node.args[0]):
        # Appending to a graph input (an explicit KV cache: cat(past, new)) is a bulk copy of
        # the input; ATen's cat copies at memcpy speed, a region's generic indexing over a
        # symbolic length did not (SmolLM2 decode at 2048 cached tokens: 2.6 ms per layer in a
        # region, 0.25 ms in ATen).
        return None
    if target in _COPIES or torch.Tag.pointwise in target.tags:
        devices = {t.device for t in _input_tensors(node)} | {val.device}
        return POINTWISE if len(devices) == 1 else None
    return None


def _is_view(target: torch._ops.OpOverload) -> bool:
    """A view with one Tensor output (multi-output views such as split stay boundaries)."""
    returns = target._schema.returns
    return is_view(target) and len(returns) == 1 and str(returns[0].type) == "Tensor"


def gemm_operands(node: fx.Node) -> tuple[Any, ...]:
    """The two matrices a matmul multiplies (addmm's first argument is the bias)."""
    return tuple(node.args[1:3]) if node.target is aten.addmm.default else tuple(node.args[:2])


def _computed_from(source: fx.Node, members: set[fx.Node]) -> set[fx.Node]:
    """The members that `source`'s value reaches through members."""
    found: set[fx.Node] = set()
    stack = [source]
    while stack:
        for u in stack.pop().users:
            if u in members and u not in found:
                found.add(u)
                stack.append(u)
    return found


def _same(a: Any, b: Any) -> bool:
    """Equal sizes, proven for every value of the shape symbols."""
    return a is not None and b is not None and sympy.expand(sympy.sympify(a) - b) == 0


def _input_tensors(node: fx.Node) -> list[torch.Tensor]:
    vals = [a.meta.get("val") for a in node.all_input_nodes]
    return [v for v in vals if isinstance(v, torch.Tensor)]


def _arg(node: fx.Node, i: int, name: str, default: Any = None) -> Any:
    return node.args[i] if len(node.args) > i else node.kwargs.get(name, default)


def reduced_dims(node: fx.Node) -> str | None:
    """"last" when a reduction reduces exactly the last dim of its input, else None."""
    x = node.args[0].meta.get("val") if node.args and isinstance(node.args[0], fx.Node) else None
    if not isinstance(x, torch.Tensor) or x.dim() == 0:
        return None
    ndim = x.dim()
    if node.target in _SOFTMAXES:
        dims: Any = [_arg(node, 1, "dim")]
    elif node.target in _NORMS:
        dims = list(range(ndim - len(_arg(node, 1, "normalized_shape")), ndim))
    else:
        dims = _arg(node, 1, "dim")
        dims = list(range(ndim)) if dims is None or dims == [] else [dims] if isinstance(dims, int) else list(dims)
    return "last" if {d % ndim for d in dims} == {ndim - 1} else None


def row_signature(node: fx.Node) -> tuple[Any, Any]:
    """(rows, N) of a last-dim reduction: its input is rows x N elements."""
    shape = [as_expr(s) for s in node.args[0].meta["val"].shape]
    return math.prod(shape[:-1]), shape[-1]


def _numel(node: fx.Node) -> Any:
    val = node.meta.get("val")
    return math.prod(as_expr(s) for s in val.shape) if isinstance(val, torch.Tensor) else None


def launches(node: fx.Node) -> bool:
    """True when the op launches a kernel of its own in the unfused graph (views do not)."""
    count = node_cost(node).work.launches
    return bool(count != 0)


# -- labels -----------------------------------------------------------------------------------


def label(nodes: Sequence[fx.Node]) -> str:
    """The LLM patterns a group holds, joined by "+" (e.g. "residual+rms_norm"); a matmul region's
    starts with "linear" or "bmm" (e.g. "linear+swiglu") and is "matmul_epilogue" when no
    pattern is known; otherwise "" when none is."""
    inside = set(nodes)
    gemms = [n for n in nodes if n.target in MATMULS]
    if gemms:
        parts = [*_epilogue_parts(gemms[0], inside), *filter(None, _patterns(nodes, inside).split("+"))]
        return "+".join(["bmm" if gemms[0].target is aten.bmm.default else "linear", *parts]) if parts else MATMUL_EPILOGUE
    return _patterns(nodes, inside)


def _epilogue_parts(mm: fx.Node, inside: set[fx.Node]) -> list[str]:
    """"bias" (addmm, or an add of a vector along the product's rows) and "residual" (an add of
    a tensor of the product's size) in a matmul's epilogue."""
    computed = _computed_from(mm, inside)
    size, cols = _numel(mm), mm.meta["val"].shape[-1]
    bias, residual = mm.target is aten.addmm.default, False
    for add in (n for n in computed if n.target is aten.add.Tensor):
        for other in add.args[:2]:
            if not isinstance(other, fx.Node) or other in computed or not isinstance(other.meta.get("val"), torch.Tensor):
                continue
            if _same(_numel(other), size):
                residual = True
            elif _same(_numel(other), cols) and _same(as_expr(other.meta["val"].shape[-1]), as_expr(cols)):
                bias = True
    return [name for name, found in (("bias", bias), ("residual", residual)) if found]


def _patterns(nodes: Sequence[fx.Node], inside: set[fx.Node]) -> str:
    """The elementwise and normalization patterns of `label`."""

    def of(*targets: Any) -> list[fx.Node]:
        return [n for n in nodes if n.target in targets]

    outputs = {n for n in nodes if any(u not in inside for u in n.users)}
    parts: list[str] = []
    norm_inputs: list[Any] = []
    if lns := of(aten.native_layer_norm.default):
        parts.append("layer_norm")
        norm_inputs += [n.args[0] for n in lns]
    squares = [m for m in of(aten.mean.dim) if _is_square(_source(m.args[0]))]
    if squares and of(aten.rsqrt.default):
        parts.append("rms_norm")
        norm_inputs += [_source(m.args[0]).args[0] for m in squares]
    if norm_inputs and any(a in outputs and _reaches(a, norm_inputs, inside) for a in of(aten.add.Tensor)):
        parts[0] = "residual+" + parts[0]
    if of(aten._softmax.default) or (of(aten.amax.default) and of(aten.exp.default) and of(aten.sum.dim_IntList)):
        parts.append("softmax")
    if of(aten._log_softmax.default):
        parts.append("log_softmax")
    silus = set(of(aten.silu.default))
    if any(any(_source(a) in silus for a in m.args if isinstance(a, fx.Node)) for m in of(aten.mul.Tensor)):
        parts.append("swiglu")
    if of(aten.gelu.default) or of(aten.erf.default) or (of(aten.tanh.default) and any(_arg(p, 1, "exponent") == 3 for p in of(aten.pow.Tensor_Scalar))):
        parts.append("gelu")
    if any(_is_rotary(c, inside) for c in of(aten.cat.default)):
        parts.append("rotary")
    if any(_source_view(c.args[0], aten.expand.default) for c in of(aten.clone.default) if isinstance(c.args[0], fx.Node)):
        parts.append("repeat_kv")
    return "+".join(parts)


def _source(n: Any) -> Any:
    """The value behind views and dtype casts."""
    while isinstance(n, fx.Node) and (classify(n) == VIEW or n.target is aten._to_copy.default):
        n = n.args[0]
    return n


def _source_view(n: fx.Node, target: Any) -> bool:
    while classify(n) == VIEW:
        if n.target is target:
            return True
        n = n.args[0]
    return False


def _is_square(n: Any) -> bool:
    if not isinstance(n, fx.Node):
        return False
    if n.target is aten.pow.Tensor_Scalar:
        return _arg(n, 1, "exponent") == 2
    return n.target is aten.mul.Tensor and len(n.args) == 2 and n.args[0] is n.args[1]


def _reaches(a: fx.Node, targets: list[Any], inside: set[fx.Node]) -> bool:
    """True when `a` is, or feeds within the group, one of `targets`."""
    stack, seen = [a], set()
    while stack:
        x = stack.pop()
        if x in targets:
            return True
        seen.add(x)
        stack.extend(u for u in x.users if u in inside and u not in seen)
    return False


def _is_rotary(cat: fx.Node, inside: set[fx.Node]) -> bool:
    """cat([-x[..., h:], x[..., :h]]) (HF `rotate_half`) scaled by a mul that an add sums:
    the q or k half of `apply_rotary_pos_emb`."""
    parts = cat.args[0]
    if not isinstance(parts, (list, tuple)) or len(parts) != 2:
        return False
    neg, low = parts
    if not (isinstance(neg, fx.Node) and neg.target is aten.neg.default and isinstance(low, fx.Node)):
        return False
    high = neg.args[0]
    halves = isinstance(high, fx.Node) and all(s.target is aten.slice.Tensor for s in (high, low)) and high.args[0] is low.args[0]
    muls = [u for u in cat.users if u in inside and u.target is aten.mul.Tensor]
    return halves and any(v in inside and v.target is aten.add.Tensor for m in muls for v in m.users)


# -- decisions, order, report -----------------------------------------------------------------


def _exceeds_one(speedup: Any, gm: fx.GraphModule) -> bool:
    """`speedup > 1`; a formula in shape symbols is decided at the sizes the graph was captured
    with (the shape environment's hints); one that cannot be decided does not fuse."""
    value = at_hints(speedup, gm)
    return value is not None and bool(value > 1)


def _restore_order(gm: fx.GraphModule, key: dict[str, tuple[float, int]]) -> None:
    """Stable topological sort: among ready nodes, the one that came first originally (a region
    call sits where its last member was). The order of reads and writes is kept because no
    region spans a write."""
    graph = gm.graph
    output = next(n for n in graph.nodes if n.op == "output")
    body = [n for n in graph.nodes if n is not output]
    position = {n: i for i, n in enumerate(body)}
    pending = {n: len(set(n.all_input_nodes)) for n in body}
    ready = [(key.get(n.name, (math.inf, 0)), position[n], n) for n in body if pending[n] == 0]
    heapq.heapify(ready)
    ordered = []
    while ready:
        _, _, n = heapq.heappop(ready)
        ordered.append(n)
        for u in n.users:
            if u is output:
                continue
            pending[u] -= 1
            if pending[u] == 0:
                heapq.heappush(ready, (key.get(u.name, (math.inf, 0)), position[u], u))
    if len(ordered) != len(body):
        raise PassError("fuse_regions: the graph has a cycle after fusion")
    for n in ordered:
        output.prepend(n)
    graph.lint()
    recompile(gm)


def _fmt(t: Any) -> str:
    if t is None:
        return "? (no cost model)"
    if isinstance(t, sympy.Basic) and not t.is_number:
        return f"{t} s"
    return f"{float(t) * 1e6:.3g} us"


def _stats(chosen: list[_Region], rejected: Counter[str]) -> dict[str, Any]:
    def total(values: list[Any]) -> Any:
        if any(v is None for v in values):
            return None
        s = sum(values, sympy.Integer(0)) if any(isinstance(v, sympy.Basic) for v in values) else sum(values, 0.0)
        return float(s) if not isinstance(s, sympy.Basic) or s.is_number else str(s)

    return {
        "regions": len(chosen),
        "by_kind": dict(Counter(r.kind for r in chosen)),
        "by_label": dict(Counter(r.label for r in chosen)),
        "nodes_fused": sum(len(r.names) for r in chosen),
        "kernels_before": sum(r.launching for r in chosen),
        "kernels_after": len(chosen),
        "time_before_s": total([r.before for r in chosen]),
        "time_after_s": total([r.after for r in chosen]),
        "rejected": dict(rejected),
    }
