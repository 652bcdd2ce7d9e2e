"""The attention finder: every attention computation in a graph, with what a pass needs to know.

Passes that rewrite attention (causal canonicalization, kernel fusion, sparsification) and the
reports that explain them ask the same questions of each site: which nodes are Q, K and V (K/V
before any grouped-query repeat, so a kernel can read them at their own head count), how many
heads of each, the scale, and whether the masking is provably causal. The IR holds attention in
three forms, all answered here:

- SDPA: `aten.scaled_dot_product_attention` and the device kernels (`_scaled_dot_product_*`),
  arguments read by name through the op's schema however they were passed;
- the compiler's own ops, `compiler::causal_attention` and `compiler::block_sparse_attention`;
- decomposed attention, as eager HF models and hand-written modules capture:
  `softmax(scale * (q @ kᵀ) [+ mask]) @ v`, with the matmuls as `bmm`/`mm`/`matmul` plus the
  expand/view plumbing `aten.matmul` decomposes into, the scale a constant `mul`/`div` on the
  scores or on q or k, the mask added (`+ where(keep, 0, -inf)`) or filled
  (`where(keep, scores, -inf)`, `masked_fill`), the softmax `aten._softmax` or its
  decomposition, and clones, dtype casts or dropout between the softmax and the second matmul.
  kᵀ must be a transpose of the last two dimensions of some K; anything else (e.g. a permute
  straight from [B, S, H, D]) has no [B, H, S, D] node to report, and is not a site.

HF's `repeat_kv` (unsqueeze, expand, clone, reshape) is looked through, so K/V are reported
unrepeated. "Causal" is a structural proof valid for every sequence length, shared with
`compiler.passes.canonicalize.causal_attention`; the graph is never evaluated, because a mask
that equals the causal one at the traced length (a wide sliding window) need not be causal.
An additive mask `where(keep, 0, fill)` counts as the boolean `keep` when the fill is -inf or
the dtype's lowest value (HF's choice): a causal mask keeps the diagonal, so no row is fully
masked and the two give the same softmax.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from typing import Any, Union

import torch
import torch.fx as fx
from torch.fx.experimental.symbolic_shapes import statically_known_true

from compiler.ir import propagate_meta
from compiler.passes.canonicalize.causal_attention import NotCausal, causal_mask_terms, strip_broadcast, unrepeated_kv

aten = torch.ops.aten

Size = Union[int, torch.SymInt]

_SDPA = {
    aten.scaled_dot_product_attention.default,
    aten._scaled_dot_product_attention_math.default,
    aten._scaled_dot_product_flash_attention.default,
    aten._scaled_dot_product_flash_attention_for_cpu.default,
    aten._scaled_dot_product_efficient_attention.default,
    aten._scaled_dot_product_cudnn_attention.default,
    aten._scaled_dot_product_fused_attention_overrideable.default,
}
_MATMUL = {aten.bmm.default, aten.mm.default, aten.matmul.default}
_VIEW = {aten.view.default, aten.reshape.default, aten._unsafe_view.default}
_CAST = {aten._to_copy.default}
_NEGATE = {aten.logical_not.default, aten.bitwise_not.default}
_FILLED = {aten.full.default: 1, aten.scalar_tensor.default: 0}


@dataclass
class AttentionSite:
    """One attention computation: output = softmax(scale * q @ kᵀ, masked) @ v.

    `q` is [B, Hq, Sq, D]; `k` and `v` are [B, Hkv, Sk, D] and [B, Hkv, Sk, Dv], before any
    repeat to Hq heads (query head h reads KV head h // (Hq // Hkv), as SDPA's `enable_gqa`);
    `output` is [B, Hq, Sq, Dv]. Sizes are as the metadata holds them (SymInts for dynamic
    dimensions). `nodes`, in graph order, are those on a path from q, k or v (excluded) to
    the output (included): what a rewrite of the site replaces (for an op, the op, its
    `getitem` if it returns a tuple, and the K/V repeats when K/V are reported unrepeated).
    `scale` is None when it is not a constant. `causal` holds only when proven; `mask` is the
    mask node unless the masking is proven purely causal; `key_padding_mask` is the graph
    input a causal mask gathers its padding from; `reason` says what the masking is, or why
    it was not proven causal.
    """

    index: int
    kind: str
    nodes: list[fx.Node]
    output: fx.Node
    q: fx.Node
    k: fx.Node
    v: fx.Node
    q_heads: Size
    kv_heads: Size
    head_dim: Size
    value_dim: Size
    scale: float | None
    causal: bool
    mask: fx.Node | None
    key_padding_mask: fx.Node | None
    reason: str


@dataclass
class _Masking:
    causal: bool
    mask: fx.Node | None
    key_padding_mask: fx.Node | None
    reason: str


def _unmasked() -> _Masking:
    return _Masking(False, None, None, "no mask: every query sees every key")


@dataclass
class _Found:
    """A site as a recognizer sees it, before it is numbered and measured."""

    kind: str
    output: fx.Node
    q: fx.Node
    k: fx.Node
    v: fx.Node
    scale: float | None
    masking: _Masking


def find_attention(gm: fx.GraphModule) -> list[AttentionSite]:
    """Every attention site of `gm`, in graph order of their outputs."""
    order = {node: i for i, node in enumerate(gm.graph.nodes)}
    found: list[_Found] = []
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        if node.target in _SDPA:
            found.append(_sdpa(node))
        elif node.target is torch.ops.compiler.causal_attention.default:
            found.append(_causal_attention(node))
        elif node.target is torch.ops.compiler.block_sparse_attention.default:
            found.append(_block_sparse_attention(node))
        else:
            site = _decomposed(node)
            if site is not None:
                found.append(site)
    found.sort(key=lambda f: order[f.output])
    return [
        AttentionSite(
            index=index,
            kind=f.kind,
            nodes=_between((f.q, f.k, f.v), f.output, order),
            output=f.output,
            q=f.q,
            k=f.k,
            v=f.v,
            q_heads=_heads(f.q),
            kv_heads=_heads(f.k),
            head_dim=_val(f.q).shape[-1],
            value_dim=_val(f.v).shape[-1],
            scale=f.scale,
            causal=f.masking.causal,
            mask=f.masking.mask,
            key_padding_mask=f.masking.key_padding_mask,
            reason=f.masking.reason,
        )
        for index, f in enumerate(found)
    ]


def replace_site(gm: fx.GraphModule, site: AttentionSite, build: Any) -> fx.Node:
    """Replace a site's output by what `build(graph)` inserts before it (a list of new nodes,
    the last one the attention output in `output_like`'s layout): source info is copied, meta
    propagated, every user rewired. A decomposed site's users may view its output as a
    matmul's contiguous [B, H, S, D], so the new output is made contiguous there."""
    graph = gm.graph
    with graph.inserting_before(site.output):
        added = list(build(graph))
        if site.kind == "decomposed":
            added.append(graph.call_function(aten.clone.default, (added[-1],), {"memory_format": torch.contiguous_format}))
    for node in added:
        node.meta.update({key: site.output.meta[key] for key in ("stack_trace", "nn_module_stack") if key in site.output.meta})
    propagate_meta(gm, added)
    site.output.replace_all_uses_with(added[-1])
    return added[-1]


def summary(sites: list[AttentionSite]) -> list[dict[str, Any]]:
    """One JSON-able row per site, for reports."""
    return [
        {
            "index": site.index,
            "kind": site.kind,
            "q_heads": _plain(site.q_heads),
            "kv_heads": _plain(site.kv_heads),
            "head_dim": _plain(site.head_dim),
            "value_dim": _plain(site.value_dim),
            "scale": site.scale,
            "causal": site.causal,
            "mask": _describe_mask(site),
            "output": site.output.name,
            "reason": site.reason,
        }
        for site in sites
    ]


def _describe_mask(site: AttentionSite) -> str:
    if site.key_padding_mask is not None:
        return f"causal + key padding ({site.key_padding_mask.name})"
    if site.mask is not None:
        return f"{site.mask.name} ({'on top of causal' if site.causal else 'not proven causal'})"
    return "causal" if site.causal else "none"


def _plain(size: Size) -> int | str:
    return size if isinstance(size, int) else str(size)


# --- ops ---------------------------------------------------------------------------------


def _bound(node: fx.Node) -> dict[str, Any]:
    """The op's arguments by schema name, defaults filled in: the SDPA kernels take the same
    options at different positions (and call the mask `attn_mask` or `attn_bias`)."""
    bound = {}
    for i, arg in enumerate(node.target._schema.arguments):
        if i < len(node.args):
            bound[arg.name] = node.args[i]
        elif arg.name in node.kwargs:
            bound[arg.name] = node.kwargs[arg.name]
        elif arg.has_default_value():
            bound[arg.name] = arg.default_value
    return bound


def _sdpa(node: fx.Node) -> _Found:
    args = _bound(node)
    q, k, v = args["query"], unrepeated_kv(args["key"]), unrepeated_kv(args["value"])
    output = node
    if not isinstance(_val(node), torch.Tensor):  # the kernels return (out, logsumexp, ...)
        output = next((u for u in node.users if u.target is operator.getitem and u.args[1] == 0), node)
    scale = args.get("scale")
    if scale is None:
        head_dim = _val(q).shape[-1]
        scale = 1.0 / math.sqrt(head_dim) if isinstance(head_dim, int) else None
    elif not isinstance(scale, (int, float)):
        scale = None
    mask = args.get("attn_mask", args.get("attn_bias"))
    if args.get("is_causal"):
        masking = _Masking(True, None, None, "is_causal")
    elif isinstance(mask, fx.Node):
        keep = mask if _val(mask).dtype is torch.bool else _additive_keep(mask)
        masking = _masking(mask, keep)
    else:
        masking = _unmasked()
    if args.get("dropout_p", 0.0) != 0.0:
        masking.reason += f"; dropout p={args['dropout_p']}"
    return _Found("sdpa", output, q, k, v, float(scale) if scale is not None else None, masking)


def _causal_attention(node: fx.Node) -> _Found:
    args = _bound(node)
    q, k, v, padding, scale = (args[name] for name in ("q", "k", "v", "key_padding_mask", "scale"))
    reason = "compiler::causal_attention" + (f" with key padding from {padding.name}" if padding is not None else "")
    return _Found("causal_attention", node, q, k, v, float(scale), _Masking(True, None, padding, reason))


def _block_sparse_attention(node: fx.Node) -> _Found:
    args = _bound(node)
    names = ("q", "k", "v", "kv_blocks", "kv_counts", "scale", "key_padding_mask")
    q, k, v, kv_blocks, kv_counts, scale, padding = (args[name] for name in names)
    # causal within the listed blocks only: the layout is a mask beyond the causal one
    reason = f"causal, restricted to the key blocks {kv_blocks.name}/{kv_counts.name} list"
    if padding is not None:
        reason += f", with key padding from {padding.name}"
    return _Found("block_sparse_attention", node, q, k, v, float(scale), _Masking(True, kv_blocks, padding, reason))


# --- masks -------------------------------------------------------------------------------


def _masking(mask: fx.Node, keep: fx.Node | None) -> _Masking:
    """What the mask `mask` means, given the boolean keep-mask it stands for (None: none)."""
    if keep is None:
        return _Masking(False, mask, None, "additive float mask not built from a boolean mask")
    try:
        terms = causal_mask_terms(keep)
    except NotCausal as exc:
        return _Masking(False, mask, None, f"mask not proven causal: {exc}")
    if terms.padding is None:
        return _Masking(True, None, None, "mask proven causal")
    return _Masking(True, mask, terms.padding, f"causal mask with key padding from {terms.padding.name}")


def _additive_keep(mask: fx.Node) -> fx.Node | None:
    """`keep` when the float mask is `where(keep, 0, -inf or the dtype's lowest value)`."""
    base = strip_broadcast(mask)
    if isinstance(base, fx.Node) and base.target is aten.where.self:
        keep, zero, fill = base.args
        if _constant(zero) == 0.0 and _is_minus_inf(fill, _val(base).dtype):
            return keep
    return None


def _negated(mask: Any) -> fx.Node | None:
    """The keep-mask of a mask that is True where keys are dropped, when it is `~keep`."""
    if isinstance(mask, fx.Node) and mask.target in _NEGATE:
        return mask.args[0]
    return None


def _constant(x: Any) -> float | None:
    """The value of a Python number or a constant-filled tensor, else None."""
    if isinstance(x, (int, float)) and not isinstance(x, bool):
        return float(x)
    if isinstance(x, fx.Node):
        if x.target in _FILLED and isinstance(x.args[_FILLED[x.target]], (int, float)):
            return float(x.args[_FILLED[x.target]])
        if x.target is aten.zeros.default:
            return 0.0
    return None


def _is_minus_inf(x: Any, dtype: torch.dtype) -> bool:
    value = _constant(x)
    return value is not None and dtype.is_floating_point and value <= torch.finfo(dtype).min


# --- decomposed attention ----------------------------------------------------------------


@dataclass
class _Scores:
    """The path from q @ kᵀ to the softmax: the matmul, the constant factor, the mask."""

    matmul: fx.Node
    factor: float | None = 1.0
    mask: fx.Node | None = None
    keep: fx.Node | None = None


def _decomposed(softmax: fx.Node) -> _Found | None:
    """The attention site whose softmax is `softmax`, or None when it is not one."""
    x = _softmax_input(softmax)
    scores = _scores(x) if x is not None else None
    if scores is None:
        return None
    pv, dropout = _probabilities_matmul(softmax)
    if pv is None:
        return None
    q = _operand(scores.matmul.args[0], transposed=False)
    k = _operand(scores.matmul.args[1], transposed=True)
    v = _operand(pv.args[1], transposed=False)
    if q is None or k is None or v is None:
        return None
    output = _unflattened(pv)
    if not _consistent(q[0], k[0], v[0], output):
        return None
    factors = (scores.factor, q[1], k[1])
    scale = None if None in factors else math.prod(factors)  # type: ignore[arg-type]
    masking = _masking(scores.mask, scores.keep) if scores.mask is not None else _unmasked()
    if dropout:
        masking.reason += "; dropout"
    return _Found("decomposed", output, q[0], k[0], v[0], scale, masking)


def _softmax_input(node: fx.Node) -> fx.Node | None:
    """x when `node` is a softmax of x over its last dimension (whole or decomposed)."""
    if node.target in (aten._softmax.default, aten._safe_softmax.default):
        x, dim = node.args[:2]
        return x if _is_last(dim, _val(x)) else None
    # torch's decomposition: exp(x - amax(x, d, True)) / sum(exp(...), d, True)
    if node.target is not aten.div.Tensor or not all(isinstance(a, fx.Node) for a in node.args):
        return None
    exp, total = node.args
    if exp.target is not aten.exp.default or total.target is not aten.sum.dim_IntList or total.args[0] is not exp:
        return None
    shifted = exp.args[0]
    if shifted.target is not aten.sub.Tensor or not isinstance(shifted.args[1], fx.Node):
        return None
    x, peak = shifted.args
    if peak.target is not aten.amax.default or peak.args[0] is not x:
        return None
    reduced = [peak.args[1], total.args[1]]
    if not all(len(dims) == 1 and _is_last(dims[0], _val(x)) for dims in reduced):
        return None
    keepdims = [peak.args[2] if len(peak.args) > 2 else False, total.args[2] if len(total.args) > 2 else False]
    return x if all(keepdims) else None


def _scores(x: Any) -> _Scores | None:
    """Walk back from the softmax input to the q @ kᵀ matmul through scale, mask and plumbing."""
    if not isinstance(x, fx.Node) or x.op != "call_function" or not isinstance(_val(x), torch.Tensor):
        return None
    if x.target in _MATMUL:
        return _Scores(x)
    if _is_plumbing(x) or (x.target in _CAST and set(x.kwargs) <= {"dtype"}):
        return _scores(x.args[0])
    step = _scale_step(x)
    if step is not None:
        found = _scores(step[0])
        if found is not None:
            found.factor = None if found.factor is None or step[1] is None else found.factor * step[1]
        return found
    dtype = _val(x).dtype
    if x.target is aten.add.Tensor and not x.kwargs and all(isinstance(a, fx.Node) for a in x.args):
        for scores, mask in (x.args, x.args[::-1]):
            found = _scores(scores)
            if found is not None:
                return _masked(found, mask, _additive_keep(mask))
        return None
    if x.target is aten.where.self:
        cond, kept, dropped = x.args
        if _is_minus_inf(dropped, dtype):
            return _masked(_scores(kept), cond, cond)
        if _is_minus_inf(kept, dtype):
            return _masked(_scores(dropped), cond, _negated(cond))
        return None
    if x.target in (aten.masked_fill.Scalar, aten.masked_fill.Tensor) and _is_minus_inf(x.args[2], dtype):
        return _masked(_scores(x.args[0]), x.args[1], _negated(x.args[1]))
    return None


def _masked(found: _Scores | None, mask: fx.Node, keep: fx.Node | None) -> _Scores | None:
    """Record the mask on the scores path; a second mask is not a form the finder knows."""
    if found is None or found.mask is not None:
        return None
    found.mask, found.keep = mask, keep
    return found


def _scale_step(node: fx.Node) -> tuple[fx.Node, float | None] | None:
    """(x, c) when `node` is x * c or x / c for a scalar c (None when c is not a constant)."""
    if node.target not in (aten.mul.Tensor, aten.mul.Scalar, aten.div.Tensor, aten.div.Scalar) or node.kwargs:
        return None
    pairs = [node.args] if node.target in (aten.div.Tensor, aten.div.Scalar) else [node.args, node.args[::-1]]
    for x, c in pairs:
        if isinstance(x, fx.Node) and _is_scalar(c):
            value = _constant(c)
            if value is not None and node.target in (aten.div.Tensor, aten.div.Scalar):
                value = 1.0 / value if value else None
            return x, value
    return None


def _is_scalar(x: Any) -> bool:
    if isinstance(x, fx.Node):
        val = _val(x)
        return isinstance(val, torch.Tensor) and val.dim() == 0
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _probabilities_matmul(softmax: fx.Node) -> tuple[fx.Node | None, bool]:
    """The matmul taking the softmax (through casts, clones, views, dropout) as its left
    operand, and whether dropout lies on the way."""
    stack, dropout = [softmax], False
    while stack:
        node = stack.pop()
        for user in node.users:
            if user.target in _MATMUL and user.args[0] is node:
                return user, dropout
            if user.target is aten.native_dropout.default:
                dropout = True
                stack.extend(u for u in user.users if u.target is operator.getitem and u.args[1] == 0)
            elif user.target is aten.dropout.default:
                dropout = True
                stack.append(user)
            elif _is_plumbing(user) or user.target in _CAST:
                stack.append(user)
    return None, False


def _operand(node: Any, transposed: bool) -> tuple[fx.Node, float | None] | None:
    """The [B, H, S, D] node a matmul operand comes from, and the constant factor on the way.

    Looks through the flattening views and broadcasts of `aten.matmul`'s decomposition, HF's
    `repeat_kv`, constant scales and (for kᵀ, which must have one) the transpose.
    """
    factor: float | None = 1.0
    while isinstance(node, fx.Node) and node.op == "call_function":
        base = unrepeated_kv(node)
        if base is not node:
            node = base
        elif transposed and _swaps_last_two(node):
            node, transposed = node.args[0], False
        elif _is_plumbing(node) and (node.target not in _VIEW or _val(node).dim() < _val(node.args[0]).dim()):
            node = node.args[0]
        elif (step := _scale_step(node)) is not None:
            node, value = step
            factor = None if factor is None or value is None else factor * value
        else:
            break
    if transposed or not isinstance(node, fx.Node) or node.op == "get_attr" or not isinstance(_val(node), torch.Tensor):
        return None  # weights are not attention operands (a softmax over a linear layer's logits)
    return node, factor


def _unflattened(pv: fx.Node) -> fx.Node:
    """The matmul's [B, H, Sq, Dv] view when the matmul ran on [B*H, Sq, Dv]."""
    users = list(pv.users)
    if len(users) == 1 and _is_plumbing(users[0]) and users[0].target in _VIEW and _val(users[0]).dim() > _val(pv).dim():
        return users[0]
    return pv


def _consistent(q: fx.Node, k: fx.Node, v: fx.Node, output: fx.Node) -> bool:
    """Shapes of a real attention: q·k over D, keys shared by k and v, output [.., Sq, Dv],
    and (4-D) query heads a multiple of the KV heads."""
    qs, ks, vs, os = (_val(n).shape for n in (q, k, v, output))
    if not len(qs) == len(ks) == len(vs) == len(os) >= 2:
        return False
    pairs = [(qs[-1], ks[-1]), (ks[-2], vs[-2]), (os[-1], vs[-1]), *zip(os[:-1], qs[:-1]), *zip(ks[:-2], vs[:-2])]
    if not all(_equal(a, b) for a, b in pairs):
        return False
    return len(qs) != 4 or statically_known_true(qs[1] % ks[1] == 0)


# --- helpers -----------------------------------------------------------------------------


def _is_plumbing(node: fx.Node) -> bool:
    """Ops that move no values across the last two dimensions: clones, no-op expands, and
    views that only split or merge the leading (batch and head) dimensions."""
    if node.target is aten.clone.default:
        return True
    if node.target is aten.expand.default:
        return _same_shape(_val(node).shape, _val(node.args[0]).shape)
    if node.target in _VIEW:
        out, src = _val(node).shape, _val(node.args[0]).shape
        return len(out) >= 2 and len(src) >= 2 and _same_shape(out[-2:], src[-2:])
    return False


def _swaps_last_two(node: fx.Node) -> bool:
    val = _val(node)
    if not isinstance(val, torch.Tensor) or val.dim() < 2:
        return False
    rank = val.dim()
    if node.target is aten.t.default:
        return True
    if node.target is aten.transpose.int:
        return {node.args[1] % rank, node.args[2] % rank} == {rank - 2, rank - 1}
    if node.target is aten.permute.default:
        return [d % rank for d in node.args[1]] == [*range(rank - 2), rank - 1, rank - 2]
    return False


def _is_last(dim: Any, val: torch.Tensor) -> bool:
    return isinstance(dim, int) and dim % val.dim() == val.dim() - 1


def _heads(node: fx.Node) -> Size:
    """Dimension 1 of a [B, H, S, D] tensor; lower-rank attention has one head per batch entry."""
    shape = _val(node).shape
    return shape[1] if len(shape) == 4 else 1


def _between(inputs: tuple[fx.Node, ...], output: fx.Node, order: dict[fx.Node, int]) -> list[fx.Node]:
    """The nodes on some path from one of `inputs` to `output` (output included)."""
    limit = order[output]
    downstream: set[fx.Node] = set()
    stack = list(inputs)
    while stack:
        for user in stack.pop().users:
            if user not in downstream and order[user] <= limit:
                downstream.add(user)
                stack.append(user)
    site: set[fx.Node] = set()
    stack = [output]
    while stack:
        node = stack.pop()
        if node in downstream and node not in site:
            site.add(node)
            stack.extend(node.all_input_nodes)
    return sorted(site, key=order.__getitem__)


def _val(node: Any) -> Any:
    return node.meta.get("val") if isinstance(node, fx.Node) else node


def _equal(a: Any, b: Any) -> bool:
    """Equal for every value of the shape symbols."""
    return bool(statically_known_true(a == b))


def _same_shape(a: Any, b: Any) -> bool:
    return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
