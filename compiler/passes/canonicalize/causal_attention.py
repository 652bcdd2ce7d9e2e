"""CanonicalizeCausalAttention: recognize an explicit causal mask and restore causal SDPA.

Under torch.compile and torch.export, HF's mask code cannot take its data-dependent shortcut
(`find_packed_sequence_indices`, the all-ones check), so the captured graph builds an explicit
[B, 1, S, S] boolean mask from `arange`s and the `attention_mask` input, and repeats K/V to
every query head before SDPA. Measured on SmolLM2 at 2048 tokens on the 2-core host, attention
then takes 2.3 s instead of 1.33 s.

The pass proves the mask causal from its structure, for every sequence length (it does not
evaluate it at one size, which would wrongly accept, say, a sliding window wider than the
example): the mask must be an AND of

- `kv_idx <= q_idx`, both `arange(S) + c` with the same S and c, broadcast along the key
  and query dimensions;
- optionally `pad[batch_idx, kv_idx]`, a gather from a boolean view of a graph input [B, S];
- all-true tensors;

under any unsqueeze/expand. With no padding term the SDPA becomes `is_causal=True` on the
unrepeated K/V (`enable_gqa`); with one, `compiler::causal_attention`, which takes the causal
path whenever the padding mask is all ones at run time and builds the same mask otherwise.
Anything else (sliding windows, additive float masks, cache offsets) is left alone, and the
pass result says why.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
from torch.fx.experimental.symbolic_shapes import statically_known_true

from compiler.ir import propagate_meta
from compiler.passes.base import Pass, PassResult

aten = torch.ops.aten

_AND = {aten.bitwise_and.Tensor, aten.logical_and.default, aten.__and__.Tensor, aten.mul.Tensor}
_BROADCAST = {aten.unsqueeze.default, aten.expand.default, aten.view.default, aten._unsafe_view.default}
_ONES = {aten.new_ones.default, aten.ones.default, aten.ones_like.default}


class _NotCausal(Exception):
    pass


def _val(x: Any) -> Any:
    return x.meta.get("val") if isinstance(x, fx.Node) else x


def _same(a: Any, b: Any) -> bool:
    """Equal for every value of the shape symbols (ints, SymInts, or nodes carrying them)."""
    va, vb = _val(a), _val(b)
    try:
        return bool(statically_known_true(va == vb))
    except Exception:  # an unrelated type (e.g. a tensor) is not a proven-equal scalar
        return False


def _same_shape(a: Any, b: Any) -> bool:
    return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))


def _is_full_slice(node: fx.Node) -> bool:
    """`x[..., 0:INT_MAX]`, which Dynamo's graphs hold for HF's `[:, :, cache_position]`."""
    return (
        node.target is aten.slice.Tensor
        and (node.args[2] if len(node.args) > 2 else 0) in (0, None)
        and (node.args[4] if len(node.args) > 4 else 1) == 1
        and _same_shape(_val(node).shape, _val(node.args[0]).shape)
    )


def _strip_broadcast(node: Any) -> Any:
    while isinstance(node, fx.Node) and (node.target in _BROADCAST or _is_full_slice(node)):
        node = node.args[0]
    return node


@dataclass
class _Index:
    """`arange(length) + offset` laid along one dimension (counted from the end)."""

    length: Any
    offset: Any
    dim: int | None

    def along(self, dim: int) -> bool:
        return self.dim is None or self.dim == dim


def _index(node: Any) -> _Index:
    val = _val(node)
    if not isinstance(val, torch.Tensor) or val.dtype not in (torch.int64, torch.int32):
        raise _NotCausal(f"{node} is not an integer index")
    long_dims = [d for d, s in enumerate(val.shape) if not statically_known_true(s == 1)]
    if len(long_dims) > 1:
        raise _NotCausal(f"{node} varies along {len(long_dims)} dimensions, not one")
    # A length-1 index (batch 1, or one query) lies along every dimension at once.
    dim = long_dims[0] - val.dim() if long_dims else None
    base = _strip_broadcast(node)
    offset: Any = 0
    if isinstance(base, fx.Node) and base.target is aten.add.Tensor:
        base, offset = base.args
    if not isinstance(base, fx.Node) or base.target is not aten.arange.default or len(base.args) != 1:
        raise _NotCausal(f"{base} is not arange(n) + c")
    return _Index(base.args[0], offset, dim)


@dataclass
class _MaskTerms:
    causal: bool = False
    padding: fx.Node | None = None  # the graph input holding the [B, S] padding mask


def _padding_input(node: fx.Node) -> fx.Node:
    """`pad[b_idx, kv_idx]`: the placeholder `pad` comes from, checking both indices."""
    source, indices = node.args
    if len(indices) != 2 or any(i is None for i in indices):
        raise _NotCausal("the gather does not index [batch, key]")
    batch, key = _index(indices[0]), _index(indices[1])
    if not batch.along(-4) or not key.along(-1) or not _same(batch.offset, 0) or not _same(key.offset, 0):
        raise _NotCausal("the gather does not index [batch, key] from position 0")
    if isinstance(source, fx.Node) and source.target is aten._to_copy.default:
        if source.kwargs.get("dtype") is not torch.bool:
            raise _NotCausal("the padding mask is not converted to bool")
        source = source.args[0]
    elif _val(source).dtype is not torch.bool:
        raise _NotCausal("the padding mask is not boolean")
    while (
        isinstance(source, fx.Node)
        and source.target in (aten.view.default, aten.reshape.default)
        and _same_shape(_val(source).shape, _val(source.args[0]).shape)
    ):
        source = source.args[0]  # GPT-2 views the mask as [B, -1]: a no-op
    if not isinstance(source, fx.Node) or source.op != "placeholder":
        raise _NotCausal("the padding mask is not a graph input")
    # The gather reads pad[:, :S]; compiler::causal_attention slices the same way, so the
    # mask's own length need not be provably S (Dynamo gives it a symbol of its own).
    shape = _val(source).shape
    if len(shape) != 2 or not _same(shape[0], batch.length):
        raise _NotCausal("the padding mask's shape does not match the indices")
    return source


def _collect(node: Any, terms: _MaskTerms) -> None:
    node = _strip_broadcast(node)
    if not isinstance(node, fx.Node):
        raise _NotCausal(f"constant {node!r} in the mask")
    if node.target in _AND:
        for arg in node.args:
            _collect(arg, terms)
    elif node.target in _ONES:
        if _val(node).dtype is not torch.bool:
            raise _NotCausal(f"{node.name} is not boolean")
    elif node.target in (aten.le.Tensor, aten.ge.Tensor):
        kv, q = node.args if node.target is aten.le.Tensor else node.args[::-1]
        kv_i, q_i = _index(kv), _index(q)
        if not kv_i.along(-1) or not q_i.along(-2):
            raise _NotCausal(f"{node.name} does not compare key positions with query positions")
        if not (_same(kv_i.length, q_i.length) and _same(kv_i.offset, q_i.offset)):
            raise _NotCausal(f"{node.name}: queries and keys are not the same positions (cache offset?)")
        terms.causal = True
    elif node.target is aten.index.Tensor:
        pad = _padding_input(node)
        if terms.padding is not None and terms.padding is not pad:
            raise _NotCausal("two different padding masks")
        terms.padding = pad
    else:
        raise _NotCausal(f"{node.target} ({node.name}) is not part of a causal mask")


def _scalar(node: Any) -> Any:
    if isinstance(node, fx.Node) and node.target is aten.scalar_tensor.default:
        return node.args[0]
    return node


def _boolean_mask(mask: fx.Node) -> fx.Node:
    """SDPA's CPU decomposition turns a boolean mask into `where(m, 0, -inf)`: the same mask."""
    if mask.target is aten.where.self and _scalar(mask.args[1]) == 0.0 and _scalar(mask.args[2]) == float("-inf"):
        return mask.args[0]
    return mask


def _unrepeated(node: fx.Node) -> fx.Node:
    """K or V before HF's `repeat_kv` (unsqueeze, expand, clone, reshape), else itself."""
    chain = node
    if chain.target in (aten._unsafe_view.default, aten.view.default, aten.reshape.default):
        chain = chain.args[0]
        if chain.target is aten.clone.default:
            chain = chain.args[0]
        if chain.target is aten.expand.default and chain.args[0].target is aten.unsqueeze.default:
            unsq = chain.args[0]
            if unsq.args[1] == 2 and len(_val(unsq).shape) == 5:
                return unsq.args[0]
    return node


class CanonicalizeCausalAttention(Pass):
    """Explicit causal masks on SDPA become `is_causal` (or `compiler::causal_attention`)."""

    name = "canonicalize_causal_attention"

    def run(self, gm: fx.GraphModule, ctx: Any = None) -> PassResult:
        result = PassResult()
        left = []
        for node in list(gm.graph.nodes):
            if node.target is not aten.scaled_dot_product_attention.default:
                continue
            mask = node.args[3] if len(node.args) > 3 else node.kwargs.get("attn_mask")
            if not isinstance(mask, fx.Node):
                continue
            terms = _MaskTerms()
            try:
                extra = {**dict(zip(("dropout_p", "is_causal"), node.args[4:])), **node.kwargs}
                if extra.get("dropout_p", 0.0) != 0.0 or extra.get("is_causal") or extra.get("enable_gqa"):
                    raise _NotCausal("SDPA has dropout, is_causal or enable_gqa set")
                _collect(_boolean_mask(mask), terms)
                if not terms.causal:
                    raise _NotCausal("no key <= query term")
            except _NotCausal as exc:
                left.append(f"{node.name}: {exc}")
                continue
            self._rewrite(gm, node, terms)
            kind = "compiler::causal_attention (padding mask kept)" if terms.padding is not None else "is_causal SDPA"
            result.record(f"{node.name}: explicit causal mask -> {kind} on unrepeated K/V")
        gm.graph.eliminate_dead_code()
        result.stats["rewritten"] = len(result.changes)
        result.stats["left"] = left
        return result

    def _rewrite(self, gm: fx.GraphModule, node: fx.Node, terms: _MaskTerms) -> None:
        q, k, v = node.args[:3]
        k, v = _unrepeated(k), _unrepeated(v)
        heads_q, heads_kv = _val(q).shape[1], _val(k).shape[1]
        scale = node.kwargs.get("scale")
        if scale is None:
            scale = float(_val(q).shape[-1]) ** -0.5
        with gm.graph.inserting_before(node):
            if terms.padding is None:
                kwargs: dict[str, Any] = {"is_causal": True, "scale": scale}
                if not _same(heads_q, heads_kv):
                    kwargs["enable_gqa"] = True
                new = gm.graph.call_function(aten.scaled_dot_product_attention.default, (q, k, v), kwargs)
            else:
                new = gm.graph.call_function(torch.ops.compiler.causal_attention.default, (q, k, v, terms.padding, scale))
        new.meta.update({key: node.meta[key] for key in ("stack_trace", "nn_module_stack") if key in node.meta})
        propagate_meta(gm, [new])
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
