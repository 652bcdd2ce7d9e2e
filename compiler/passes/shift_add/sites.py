"""Linear layers in the ATen IR: matmuls of an activation by a constant weight matrix.

Capture leaves a linear layer as `mm(x, t(W))` (no bias), `addmm(b, x, t(W))` (bias),
`linear(x, W, b)`, or, for GPT-2's Conv1D whose weight is stored [in, out],
`mm(x, W)` / `addmm(b, x, W)`; x is [M, K] (a view of [B, S, K]). A `LinearSite` names the
pieces; `linear_sites` finds them and says, for every other matmul, why it is not one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx

aten = torch.ops.aten
_VIEWS = {aten.view.default, aten._unsafe_view.default, aten.reshape.default}
_FLOATS = (torch.float32, torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class LinearSite:
    node: fx.Node  # the matmul
    x: fx.Node  # the activation [M, K]
    weight: fx.Node  # the get_attr of the stored weight
    bias: fx.Node | None
    transposed: bool  # the weight is stored [K, N] (Conv1D) rather than [N, K]
    name: str  # the weight's name in the model (state-dict key) where capture kept it

    def matrix(self, gm: fx.GraphModule) -> torch.Tensor:
        """The weight as [N, K] (out x in)."""
        w = getattr(gm, str(self.weight.target)).detach()
        return w.t() if self.transposed else w

    @property
    def source(self) -> fx.Node:
        """The tensor x views with its rows regrouped (same last dim): sites reading the same
        source share calibration inputs (q, k and v; gate and up)."""
        x = self.x
        k = x.meta["val"].shape[-1]
        while x.op == "call_function" and x.target in _VIEWS and x.args[0].meta["val"].shape[-1] == k:
            x = x.args[0]
        return x


def _constant_matrix(node: fx.Node) -> bool:
    val = node.meta.get("val")
    return node.op == "get_attr" and isinstance(val, torch.Tensor) and val.dim() == 2 and val.dtype in _FLOATS


def _parse(node: fx.Node) -> tuple[fx.Node, fx.Node, fx.Node | None] | None:
    """(x, the weight operand as the matmul reads it, bias) of a matmul node."""
    if node.target is aten.mm.default:
        return node.args[0], node.args[1], None
    if node.target is aten.addmm.default and not node.kwargs:
        return node.args[1], node.args[2], node.args[0]
    if node.target is aten.linear.default:
        return node.args[0], node.args[1], node.args[2] if len(node.args) > 2 else None
    return None


def linear_sites(gm: fx.GraphModule) -> tuple[list[LinearSite], list[tuple[fx.Node, str]]]:
    """The linear layers of the graph, and (matmul, why not) for the other matmuls."""
    sites, others = [], []
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        parsed = _parse(node)
        if parsed is None:
            continue
        x, w, bias = parsed
        linear = node.target is aten.linear.default
        if not linear and w.op == "call_function" and w.target is aten.t.default and _constant_matrix(w.args[0]):
            weight, transposed = w.args[0], False  # mm(x, t(W)): W stored [N, K]
        elif _constant_matrix(w):
            weight, transposed = w, not linear  # linear(x, W): [N, K]; mm(x, W): [K, N]
        else:
            others.append((node, "its weight operand is not a constant matrix (an activation, or computed in the graph)"))
            continue
        name = weight.meta.get("weight_name", str(weight.target))
        sites.append(LinearSite(node, x, weight, bias, transposed, name))
    return sites, others
