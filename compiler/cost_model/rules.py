"""Per-op cost rules: the `Work` of one ATen (or compiler) op from its argument shapes.

A rule sees `TensorInfo` stand-ins (shape with ints or sympy expressions, dtype) for tensor
arguments and plain values for the rest. Ops are grouped the way their kernels behave:

- matmul family (`mm`, `addmm`, `bmm`, `baddbmm`, `matmul`, `linear`): 2·M·K·N matmul FLOPs;
- attention (SDPA and its device variants): QKᵀ and PV over the attended (query, key) pairs,
  half of them when causal, GQA K/V read once at their own head count;
- softmax, norms, reductions, pointwise ops (tagged `pointwise` by ATen; exp-class ones also
  count transcendentals), indexing and copies: bytes in plus bytes out;
- views (schema says the output aliases an input) and symbolic-size queries: free, no launch.

An op without a rule costs its bytes with one FLOP per output element and is reported as
`generic`, so the report can list what the model does not understand. Compiler ops declare
their own cost on the op (`compiler_op(..., cost=...)`).
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import sympy
import torch
from torch import fx

from compiler.cost_model.work import DTYPE_NAMES, FREE, Expr, Work

aten = torch.ops.aten

CATEGORIES = ("attention", "linear", "norm", "elementwise", "other")


@dataclass(frozen=True)
class TensorInfo:
    """What a cost rule may know about a tensor: its shape (ints or sympy) and dtype, and
    whether it is a constant (a weight) rather than an activation."""

    shape: tuple[Expr, ...]
    dtype: torch.dtype
    constant: bool = False

    @property
    def numel(self) -> Expr:
        return math.prod(self.shape) if self.shape else 1

    @property
    def nbytes(self) -> Expr:
        return self.numel * self.dtype.itemsize

    @property
    def dtype_name(self) -> str:
        return DTYPE_NAMES.get(self.dtype, "fp32")


@dataclass(frozen=True)
class OpCost:
    work: Work
    category: str
    generic: bool = False


Rule = Callable[[Sequence[Any], dict[str, Any], list[TensorInfo]], OpCost]
_RULES: dict[Any, Rule] = {}


def rule(*ops: Any) -> Callable[[Rule], Rule]:
    def register(fn: Rule) -> Rule:
        for op in ops:
            _RULES[op] = fn
        return fn

    return register


def tensors(values: Any) -> list[TensorInfo]:
    """The TensorInfo stand-ins among (possibly nested) argument values."""
    flat, _ = torch.utils._pytree.tree_flatten(values)
    return [v for v in flat if isinstance(v, TensorInfo)]


def io_bytes(inputs: Sequence[TensorInfo], outputs: Sequence[TensorInfo]) -> tuple[Expr, Expr]:
    return sum((t.nbytes for t in inputs), 0), sum((t.nbytes for t in outputs), 0)


def streaming(args: Sequence[Any], kwargs: dict[str, Any], out: list[TensorInfo], category: str, vector: Expr = 0, transcendental: Expr = 0) -> OpCost:
    read, written = io_bytes(tensors((args, kwargs)), out)
    return OpCost(Work(vector_flops=vector, transcendentals=transcendental, bytes_read=read, bytes_written=written), category)


def _numel(out: list[TensorInfo]) -> Expr:
    return sum((t.numel for t in out), 0)


# -- matmul family -------------------------------------------------------------------------


def _matmul(a: TensorInfo, b: TensorInfo, out: list[TensorInfo], extra_read: Sequence[TensorInfo] = (), epilogue: Expr = 0) -> OpCost:
    k = a.shape[-1]
    flops = 2 * out[0].numel * k
    read, written = io_bytes([a, b, *extra_read], out)
    category = "linear" if a.constant or b.constant else "attention"
    work = Work({a.dtype_name: flops}, vector_flops=epilogue, bytes_read=read, bytes_written=written)
    return OpCost(work, category)


@rule(aten.mm.default, aten.bmm.default, aten.matmul.default)
def _mm(args, kwargs, out):
    return _matmul(args[0], args[1], out)


@rule(aten.addmm.default, aten.baddbmm.default)
def _addmm(args, kwargs, out):
    return _matmul(args[1], args[2], out, extra_read=[args[0]], epilogue=out[0].numel)


@rule(aten.linear.default)
def _linear(args, kwargs, out):
    bias = [args[2]] if len(args) > 2 and isinstance(args[2], TensorInfo) else []
    return _matmul(args[0], args[1], out, extra_read=bias, epilogue=out[0].numel if bias else 0)


# -- attention -----------------------------------------------------------------------------


def causal_pairs(sq: Expr, skv: Expr) -> Expr:
    """Attended (query, key) pairs of a causal mask aligned at the top left, as SDPA's
    `is_causal` does: sum over queries i < Sq of min(i + 1, Skv)."""
    over = sympy.Max(sq - skv, 0) if isinstance(sq - skv, sympy.Basic) else max(sq - skv, 0)
    return sq * (sq + 1) / 2 - over * (over + 1) / 2


def attention_work(q: TensorInfo, k: TensorInfo, v: TensorInfo, out: Sequence[TensorInfo], causal: bool, mask: TensorInfo | None = None, density: Expr = 1) -> Work:
    """Work of softmax(QKᵀ·scale + mask)·V over the attended pairs; `density` scales the pairs
    for block-sparse layouts. GQA K/V are read at their own head count."""
    *batch, sq, d = q.shape
    skv, dv = k.shape[-2], v.shape[-1]
    heads = math.prod(batch)
    pairs = (causal_pairs(sq, skv) if causal else sq * skv) * density
    extra = [mask] if mask is not None else []
    read, written = io_bytes([q, k, v, *extra], out)
    return Work(
        {q.dtype_name: 2 * heads * pairs * (d + dv)},
        vector_flops=4 * heads * pairs,  # scale, running max, subtract, sum
        transcendentals=heads * pairs,  # exp
        bytes_read=read,
        bytes_written=written,
    )


_SDPA_OPS = [
    aten.scaled_dot_product_attention.default,
    aten._scaled_dot_product_flash_attention_for_cpu.default,
    aten._scaled_dot_product_flash_attention.default,
    aten._scaled_dot_product_efficient_attention.default,
    aten._scaled_dot_product_cudnn_attention.default,
]


@rule(*_SDPA_OPS)
def _sdpa(args, kwargs, out):
    q, k, v = args[:3]
    names = ("attn_mask", "dropout_p", "is_causal")
    extra = dict(zip(names, args[3:6]), **{n: kwargs[n] for n in names if n in kwargs})
    mask = extra.get("attn_mask") if isinstance(extra.get("attn_mask"), TensorInfo) else None
    causal = bool(extra.get("is_causal", False))
    return OpCost(attention_work(q, k, v, out[:1], causal, mask), "attention")


# -- normalization, softmax, reductions ----------------------------------------------------


@rule(aten._softmax.default, aten.softmax.int, aten._log_softmax.default, aten._safe_softmax.default)
def _softmax(args, kwargs, out):
    n = _numel(out)
    return streaming(args[:1], {}, out, "attention", vector=4 * n, transcendental=n)


@rule(aten.native_layer_norm.default, aten.layer_norm.default, aten.rms_norm.default, aten._fused_rms_norm.default, aten.native_group_norm.default, aten.native_batch_norm.default, aten._native_batch_norm_legit_no_training.default)
def _norm(args, kwargs, out):
    return streaming(args, kwargs, out, "norm", vector=6 * out[0].numel)


REDUCTIONS = {aten.sum, aten.mean, aten.amax, aten.amin, aten.max, aten.min, aten.argmax, aten.argmin, aten.prod, aten.var, aten.std, aten.var_mean, aten.any, aten.all, aten.cumsum, aten.logsumexp, aten.norm, aten.linalg_vector_norm}

# -- pointwise -----------------------------------------------------------------------------

TRANSCENDENTAL = {aten.exp, aten.exp2, aten.expm1, aten.log, aten.log2, aten.log1p, aten.log10, aten.sigmoid, aten.silu, aten.tanh, aten.gelu, aten.erf, aten.sin, aten.cos, aten.tan, aten.softplus, aten.mish, aten.atan, aten.asin, aten.acos, aten.pow}


def _pointwise(packet: Any, args: Sequence[Any], kwargs: dict[str, Any], out: list[TensorInfo]) -> OpCost:
    n = _numel(out)
    transcendental = n if packet in TRANSCENDENTAL and not _integer_power(packet, args) else 0
    return streaming(args, kwargs, out, "elementwise", vector=n, transcendental=transcendental)


def _integer_power(packet: Any, args: Sequence[Any]) -> bool:
    return packet is aten.pow and len(args) > 1 and isinstance(args[1], (int, float)) and float(args[1]).is_integer()


# -- indexing, copies, factories -----------------------------------------------------------


@rule(aten.embedding.default, aten.index.Tensor, aten.index_select.default, aten.gather.default)
def _gather(args, kwargs, out):
    # reads only the gathered rows (as many bytes as it writes) plus the indices
    index = tensors((args[1:], kwargs))
    read, written = io_bytes(index, out)
    return OpCost(Work(bytes_read=read + written, bytes_written=written), "other")


@rule(aten.index_copy_.default, aten.index_put_.default, aten.scatter_.src, aten.copy_.default)
def _scatter_inplace(args, kwargs, out):
    # writes the source (the last tensor argument) into place; reads it and the indices
    ins = tensors((args[1:], kwargs))
    read, _ = io_bytes(ins, [])
    return OpCost(Work(bytes_read=read, bytes_written=ins[-1].nbytes if ins else 0), "other")


@rule(aten.index_copy.default, aten.index_put.default, aten.scatter.src, aten.slice_scatter.default, aten.select_scatter.default)
def _scatter(args, kwargs, out):
    return streaming(args, kwargs, out, "other")


FACTORIES = {aten.full, aten.zeros, aten.ones, aten.empty, aten.arange, aten.scalar_tensor, aten.new_full, aten.new_zeros, aten.new_ones, aten.new_empty, aten.empty_strided, aten.full_like, aten.zeros_like, aten.ones_like, aten.empty_like}
COPIES = {aten.clone, aten._to_copy, aten.cat, aten.stack, aten.contiguous, aten.repeat, aten.constant_pad_nd, aten.copy, aten.tril, aten.triu, aten.flip, aten.roll}


def op_cost(target: Any, args: Sequence[Any], kwargs: dict[str, Any], out: list[TensorInfo]) -> OpCost:
    """The cost of one call of `target` (an OpOverload or a Python callable in the graph)."""
    from compiler.ops.registry import op_for_target

    if target in (operator.getitem,) or not isinstance(target, torch._ops.OpOverload):
        return OpCost(FREE, "other")
    if target in _RULES:
        return _RULES[target](args, kwargs, out)
    compiler_op = op_for_target(target)
    if compiler_op is not None:
        if compiler_op.cost is None:
            return _generic(args, kwargs, out)
        return compiler_op.cost(*args, **kwargs)
    if not out or _is_view(target):
        return OpCost(FREE, "other")
    packet = target.overloadpacket
    if packet in FACTORIES:
        return OpCost(Work(bytes_written=sum((t.nbytes for t in out), 0)), "other")
    if packet in REDUCTIONS or torch.Tag.reduction in target.tags:
        n = sum((t.numel for t in tensors(args[:1])), 0)
        return streaming(args[:1], {}, out, "other", vector=n)
    if packet in COPIES:
        return streaming(args, kwargs, out, "elementwise")
    if torch.Tag.pointwise in target.tags or packet in TRANSCENDENTAL:
        return _pointwise(packet, args, kwargs, out)
    return _generic(args, kwargs, out)


def _generic(args: Sequence[Any], kwargs: dict[str, Any], out: list[TensorInfo]) -> OpCost:
    cost = streaming(args, kwargs, out, "other", vector=_numel(out))
    return OpCost(cost.work, "other", generic=True)


def _is_view(target: torch._ops.OpOverload) -> bool:
    if target.overloadpacket in (aten._unsafe_view, aten.detach, aten.lift_fresh, aten.sym_size, aten.sym_numel, aten.sym_stride, aten._assert_tensor_metadata):
        return True
    returns = target._schema.returns
    return bool(returns) and all(r.alias_info is not None and not r.alias_info.is_write for r in returns)


# -- from fx nodes -------------------------------------------------------------------------


def as_expr(size: Any) -> Expr:
    if isinstance(size, torch.SymInt):
        expr = size.node.expr
        return int(expr) if expr.is_number else expr
    return int(size)


def describe(value: Any, constant: bool = False) -> Any:
    """TensorInfo stand-ins for the tensors (real or fake) in a value, other values unchanged."""
    def one(v: Any) -> Any:
        if isinstance(v, torch.Tensor):
            return TensorInfo(tuple(as_expr(s) for s in v.shape), v.dtype, constant)
        if isinstance(v, torch.SymInt):
            return as_expr(v)
        return v

    return torch.utils._pytree.tree_map(one, value)


def node_value(node: fx.Node) -> Any:
    """A node's value as TensorInfo stand-ins: its FakeTensor metadata, or the constant it loads.
    Values computed from constants only (a transposed weight) are constants too."""
    if node.op == "get_attr":
        obj: Any = node.graph.owning_module
        for part in str(node.target).split("."):
            obj = getattr(obj, part)
        return describe(obj, constant=True)
    return describe(node.meta.get("val"), constant=is_constant(node))


def is_constant(node: fx.Node) -> bool:
    """True for get_attr nodes and for ops whose inputs are all constants (no placeholder
    among the ancestors); stops at the first placeholder found."""
    stack, seen = [node], {node}
    while stack:
        n = stack.pop()
        if n.op == "get_attr":
            continue
        if n.op != "call_function" or not n.all_input_nodes:
            return False
        for i in n.all_input_nodes:
            if i not in seen:
                seen.add(i)
                stack.append(i)
    return True


def node_cost(node: fx.Node) -> OpCost:
    if node.op != "call_function":
        return OpCost(FREE, "other")
    args, kwargs = fx.node.map_arg((node.args, node.kwargs), node_value)
    out = tensors(node_value(node))
    return op_cost(node.target, args, kwargs, out)
