"""Fused regions: a group of ATen nodes that codegen turns into one kernel.

A region lives in the graph as one `call_module` node whose module is a `FusedRegion`: a
GraphModule of the group (placeholders are the region's inputs, outputs the values used outside
it), with FakeTensor metadata kept on every node. Calling the module runs the group in ATen, so
a region is always executable: that is the fallback when no backend lowers it. Multiple outputs
come back through `getitem` nodes, as fx does for submodules.

`fuse_nodes` builds a region from any convex set of nodes (no path leaves the set and comes
back, or the graph would get a cycle); the partitioner decides which sets, codegen lowers them
(`compiler.codegen.register_region_lowering`), the cost model prices them as one kernel.
"""

from __future__ import annotations

import operator
from typing import Any, Sequence

import torch
from torch import fx
from torch.fx.passes.utils.fuser_utils import erase_nodes, fuse_as_graphmodule, validate_partition

from compiler.cost_model.rules import CONSTANT_INPUT, is_constant
from compiler.errors import PassError
from compiler import ir
from compiler.ir import is_mutating

REGION_KINDS = ("pointwise", "reduction", "matmul_epilogue", "attention")


class FusedRegion(fx.GraphModule):
    """A fused group of nodes; `kind` tells codegen which template can take it."""

    def __init__(self, root: torch.nn.Module, graph: fx.Graph, kind: str, label: str = "") -> None:
        super().__init__(root, graph, class_name="FusedRegion")
        if kind not in REGION_KINDS:
            raise ValueError(f"region kind {kind!r} is not one of {REGION_KINDS}")
        self.kind = kind
        self.label = label

    def ops(self) -> list[fx.Node]:
        """The region's compute nodes, in order."""
        return [n for n in self.graph.nodes if n.op == "call_function"]

    def __deepcopy__(self, memo: dict[int, Any]) -> FusedRegion:
        copy = FusedRegion(self, _copy_graph(self.graph), self.kind, self.label)
        memo[id(self)] = copy
        return copy


def _copy_graph(graph: fx.Graph) -> fx.Graph:
    new = fx.Graph()
    out = new.graph_copy(graph, {})
    new.output(out)
    return new


def fuse_nodes(gm: fx.GraphModule, nodes: Sequence[fx.Node], kind: str, label: str = "", recompile: bool = True) -> fx.Node:
    """Replace `nodes` by one call of a FusedRegion; returns the new call_module node.

    The call goes where the last member was; outside nodes between the members that depend
    on them move after it, in their order (convexity guarantees none feeds a member). Raises
    PassError when the set is not convex, contains a node that is not a call_function, or
    spans a mutation (moving work across it could change what a member reads). Pass
    `recompile=False` when fusing many regions, and recompile once at the end.
    """
    members = set(nodes)
    nodes = [n for n in gm.graph.nodes if n in members]  # graph order
    if not nodes:
        raise PassError("fuse_nodes: no nodes to fuse")
    if any(n.op != "call_function" for n in nodes):
        raise PassError(f"fuse_nodes: only call_function nodes can be fused, got {[n.op for n in nodes if n.op != 'call_function']}")
    if not validate_partition(list(nodes)):
        raise PassError(f"fuse_nodes: {[n.name for n in nodes]} is not convex; fusing it would create a cycle")
    between = _between(nodes, members)
    if any(is_mutating(n) for n in [*nodes, *between]):
        raise PassError(f"fuse_nodes: {[n.name for n in nodes]} spans a mutation; fuse within one side of it")
    name = _free_name(gm, f"fused_{kind}")
    sub_gm, inputs, outputs = fuse_as_graphmodule(gm, list(nodes), name)
    for placeholder, source in zip([n for n in sub_gm.graph.nodes if n.op == "placeholder"], inputs):
        placeholder.meta.update({k: v for k, v in source.meta.items() if k in ("val", "tensor_meta")})
        # A weight (or a view of one) stays a constant inside the region: the cost model prices
        # its read as a cold read from memory and a matmul on it as a linear layer.
        placeholder.meta[CONSTANT_INPUT] = is_constant(source)
    region = FusedRegion(sub_gm, sub_gm.graph, kind, label or name)
    gm.add_submodule(name, region)
    moving: set[fx.Node] = set()
    anchor = nodes[-1]
    for n in between:
        if any(a in members or a in moving for a in n.all_input_nodes):
            moving.add(n)
            anchor.append(n)
            anchor = n
    with gm.graph.inserting_after(nodes[-1]):
        call = gm.graph.call_module(name, args=tuple(inputs))
    vals = [o.meta.get("val") for o in outputs]
    call.meta["val"] = vals[0] if len(outputs) == 1 else tuple(vals)
    with gm.graph.inserting_after(call):
        for i, out in enumerate(outputs):
            if len(outputs) == 1:
                out.replace_all_uses_with(call)
                continue
            item = gm.graph.call_function(operator.getitem, (call, i))
            item.meta["val"] = vals[i]
            out.replace_all_uses_with(item)
    erase_nodes(gm, list(nodes))
    if recompile:
        gm.graph.lint()
        ir.recompile(gm)
    return call


def _between(nodes: list[fx.Node], members: set[fx.Node]) -> list[fx.Node]:
    """Non-member nodes strictly between the first and last member, in graph order."""
    out, n = [], nodes[0]
    while n is not nodes[-1]:
        n = n.next
        if n not in members:
            out.append(n)
    return out


def regions(gm: fx.GraphModule) -> list[tuple[fx.Node, FusedRegion]]:
    """The region calls of a graph with their modules."""
    out = []
    for node in gm.graph.nodes:
        if node.op == "call_module":
            module = gm.get_submodule(str(node.target))
            if isinstance(module, FusedRegion):
                out.append((node, module))
    return out


def _free_name(gm: fx.GraphModule, prefix: str) -> str:
    i = 0
    while hasattr(gm, f"{prefix}_{i}"):
        i += 1
    return f"{prefix}_{i}"
