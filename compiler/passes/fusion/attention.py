"""FuseAttention: causal SDPA becomes `compiler::causal_attention`, lowered to a fused
flash-attention kernel by the target's backend.

`aten.scaled_dot_product_attention(q, k, v, is_causal=True)` with no mask, no dropout and as
many queries as keys (what `canonicalize_causal_attention` leaves for HF models, and what
models calling SDPA themselves produce) means exactly `compiler::causal_attention(q, k, v,
None, scale)`: the op aligns queries to the end of the keys, which for Sq == Sk is SDPA's
top-left alignment, and takes GQA K/V at their own head count. The op's reference calls that
same SDPA, so a call site no kernel takes runs exactly what it ran before; where the backend
has a kernel (Triton flash-attention on GPU targets, TVM on the host), the kernel runs.

A site is rewritten when
- the target's codegen backend has a lowering for the op (otherwise the rewrite buys nothing);
- Sq == Sk holds for every value of the shape symbols (a top-left-aligned mask with Sq != Sk
  is a different mask);
- the cost model does not predict the op slower than the SDPA it replaces. Both are priced as
  the same attention work over the causal half, K/V read at their own head count, so today
  this gate only refuses when a future kernel-specific rule says otherwise; the predicted times
  go into the pass result.
Sites left alone are listed with the reason.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx
from torch.fx.experimental.symbolic_shapes import statically_known_true

from compiler.ir import at_hints, propagate_meta
from compiler.ops import causal_attention as CAUSAL_ATTENTION
from compiler.passes.base import Pass, PassResult

aten = torch.ops.aten


def _options(node: fx.Node) -> dict[str, Any]:
    """The SDPA call's arguments after q, k, v, by name, however they were passed."""
    return dict(zip(("attn_mask", "dropout_p", "is_causal", "scale"), node.args[3:]), **node.kwargs)


def _why_not(node: fx.Node) -> str | None:
    """None when the SDPA call is causal attention with nothing else, else why not."""
    q, k, v = (a.meta.get("val") for a in node.args[:3])
    extra = _options(node)
    if extra.get("attn_mask") is not None:
        return "has an explicit mask"
    if not extra.get("is_causal", False):
        return "not is_causal"
    if extra.get("dropout_p", 0.0) != 0.0:
        return "dropout"
    if any(not isinstance(t, torch.Tensor) or t.dim() != 4 for t in (q, k, v)):
        return "q, k, v are not [B, H, S, D]"
    if not statically_known_true(q.shape[-2] == k.shape[-2]):
        return "queries and keys differ in length (SDPA's causal mask is then top-left aligned)"
    if not statically_known_true(q.shape[1] % k.shape[1] == 0):
        return "query heads are not a multiple of KV heads"
    return None


class FuseAttention(Pass):
    """Replace causal SDPA by `compiler::causal_attention` where the backend has its kernel."""

    name = "fuse_attention"
    lossy = False

    def run(self, gm: fx.GraphModule, ctx: Any) -> PassResult:
        result = PassResult()
        backend = getattr(ctx.target, "codegen", None) if ctx.target is not None else None
        left: list[str] = []
        sites = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is aten.scaled_dot_product_attention.default]
        if sites and backend not in CAUSAL_ATTENTION.lowerings:
            result.stats = {"rewritten": 0, "left": [f"{n.name}: no {backend} kernel for compiler::causal_attention" for n in sites]}
            return result
        for node in sites:
            why = _why_not(node)
            if why is None:
                new, why = self._rewrite(gm, node, ctx.cost_model)
                if new is not None:
                    result.record(f"{node.name} -> {new.name}: causal SDPA -> compiler::causal_attention ({why})")
                    continue
            left.append(f"{node.name}: {why}")
        gm.graph.eliminate_dead_code()
        result.stats = {"rewritten": len(result.changes), "left": left}
        return result

    def _rewrite(self, gm: fx.GraphModule, node: fx.Node, cost_model: Any) -> tuple[fx.Node | None, str]:
        q, k, v = node.args[:3]
        scale = _options(node).get("scale")
        if scale is None:
            scale = float(q.meta["val"].shape[-1]) ** -0.5
        with gm.graph.inserting_before(node):
            new = gm.graph.call_function(CAUSAL_ATTENTION.overload, (q, k, v, None, scale))
        new.meta.update({key: node.meta[key] for key in ("stack_trace", "nn_module_stack") if key in node.meta})
        propagate_meta(gm, [new])
        predicted = ""
        if cost_model is not None:
            before, after = cost_model.node(node).time, cost_model.node(new).time
            excess = at_hints(after - before, gm)  # a formula in shape symbols: at the traced sizes
            if excess is None or excess > 0:
                gm.graph.erase_node(new)
                return None, f"the cost model predicts the kernel slower ({after} s vs {before} s)"
            predicted = f"predicted {before} s -> {after} s"
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
        return new, predicted or "no cost model"
