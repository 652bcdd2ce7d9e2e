"""Per-op cost rules: the `Work` of one ATen (or compiler) op from its argument shapes.

A rule sees `TensorInfo` stand-ins (shape with ints or sympy expressions, dtype, strides, and
whether the tensor is a constant) for tensor arguments and plain values for the rest. Rules know
nothing about hardware: they count, and `work.roofline` prices the counts on a target. Ops are
grouped the way their kernels behave:

- matmul family (`mm`, `addmm`, `bmm`, `baddbmm`, `matmul`, `linear`): 2·M·K·N matmul FLOPs;
- attention (SDPA and its device variants): QKᵀ and PV over the attended (query, key) pairs,
  half of them when causal, GQA K/V read once at their own head count. A boolean mask is first
  turned into an additive one of the query's dtype (`convert_boolean_attn_mask`, one more kernel
  over the mask), which the attention then reads;
- softmax, norms, reductions, pointwise ops (tagged `pointwise` by ATen; exp-class ones also
  count transcendentals), indexing and copies: bytes in plus bytes out;
- views (schema says the output aliases an input) and symbolic-size queries: free, no launch.

Where the bytes come from: inputs that are constants (weights, frozen buffers such as a static
KV cache) are `bytes_cold`, read from memory whatever the op's working set (a forward touches
each once; together they exceed any cache); a write into a constant first brings its lines in.
A gather (`embedding`) reads only the rows it returns.

What only a CPU host pays (`Work.host`, priced by a calibrated host, zero on GPU targets), each
from how ATen's CPU kernels are written:

- dispatch events: a Python number passed for a Tensor argument is wrapped into a 0-d tensor;
  reductions set up their iteration; factories build tensors from options (`_to_copy` included);
  advanced indexing prepares each index tensor; `cat` walks its tensor list; CPU `mean` is
  `sum` then `div_` (ReduceOps.cpp), one more op;
- loops: TensorIterator runs elementwise kernels and copies as rows of a coalesced iteration
  space (`loop_rows`, from the operands' strides), and opens an OpenMP parallel region only for
  more than GRAIN_SIZE (32768) elements (`parallel`); CPU `cat` copies each input into its slice
  of the output unless the output is small and every input contiguous (its serial fast path);
- a matmul of one row against a weight (decode) is a BLAS matrix-vector product, which streams
  the weight at its own, lower rate;
- per element: sin/cos/tan cost more than the exp that the transcendental rate is measured with;
  comparison and logical kernels are scalar lambdas that run one element at a time when an
  operand is broadcast along the inner loop.

An op without a rule costs its bytes with one FLOP per output element and is reported as
`generic`, so the report can list what the model does not understand. Compiler ops declare
their own cost on the op (`compiler_op(..., cost=...)`).
"""

from __future__ import annotations

import contextlib
import math
import operator
from dataclasses import dataclass, replace
from typing import Any, Callable, Iterator, Sequence

import sympy
import torch
from torch import fx

from compiler.cost_model.work import DTYPE_NAMES, FREE, Expr, Work
from compiler.ir import is_view

aten = torch.ops.aten

CATEGORIES = ("attention", "linear", "norm", "elementwise", "other")
GRAIN_SIZE = 32768  # at::internal::GRAIN_SIZE: CPU loops over more elements run on all threads


@dataclass(frozen=True)
class TensorInfo:
    """What a cost rule may know about a tensor: its shape (ints or sympy) and dtype, whether
    it is a constant (a weight) rather than an activation, and its strides (None: contiguous)."""

    shape: tuple[Expr, ...]
    dtype: torch.dtype
    constant: bool = False
    strides: tuple[Expr, ...] | None = None

    @property
    def layout(self) -> tuple[Expr, ...]:
        """The strides, contiguous ones if unknown."""
        if self.strides is not None:
            return self.strides
        out, step = [], 1
        for size in reversed(self.shape):
            out.append(step)
            step = step * size
        return tuple(reversed(out))

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


def cold_bytes(inputs: Sequence[TensorInfo]) -> Expr:
    """Bytes of the constants (weights, frozen buffers) among `inputs`: read from memory."""
    return sum((t.nbytes for t in inputs if t.constant), 0)


def streaming(args: Sequence[Any], kwargs: dict[str, Any], out: list[TensorInfo], category: str, vector: Expr = 0, transcendental: Expr = 0) -> OpCost:
    inputs = tensors((args, kwargs))
    read, written = io_bytes(inputs, out)
    return OpCost(Work(vector_flops=vector, transcendentals=transcendental, bytes_read=read, bytes_written=written, bytes_cold=cold_bytes(inputs)), category)


def _numel(out: list[TensorInfo]) -> Expr:
    return sum((t.numel for t in out), 0)


# -- loop structure (CPU) --------------------------------------------------------------------


def loop_rows(inputs: Sequence[TensorInfo], out: TensorInfo) -> Expr:
    """Rows of the 2-D loop a CPU TensorIterator kernel runs for `out` from `inputs`.

    TensorIterator orders the dimensions by the output's strides and coalesces neighbours as
    long as every operand steps through them as one (a broadcast operand steps by 0); the
    coalesced innermost extent is one vectorized row, the rest are rows. A contiguous op is one
    row; `x.transpose(1, 2) * cos` over [1, H, S, 64] is H*S rows of 64; copying into a
    narrowed slice (how CPU `cat` fills its output) is a row per slice row.
    """
    nd = len(out.shape)
    dims = [i for i in range(nd) if not _is_one(out.shape[i])]
    if len(dims) <= 1:
        return 1
    operands = [list(out.layout)] + [_broadcast_strides(t, out.shape) for t in inputs]
    dims.sort(key=lambda i: (_magnitude(operands[0][i]), -i))  # innermost first
    inner = dims[0]
    extent = out.shape[inner]
    for d in dims[1:]:
        if not all(_same(op[d], extent * op[inner]) for op in operands):
            break
        extent = extent * out.shape[d]
    return out.numel / extent


def _broadcast_strides(t: TensorInfo, shape: Sequence[Expr]) -> list[Expr]:
    pad = len(shape) - len(t.shape)
    layout = t.layout
    return [0 if i < pad or (_is_one(t.shape[i - pad]) and not _is_one(shape[i])) else layout[i - pad] for i in range(len(shape))]


def _same(a: Expr, b: Expr) -> bool:
    if isinstance(a, sympy.Basic) or isinstance(b, sympy.Basic):
        return sympy.expand(a - b) == 0
    return a == b


def _magnitude(v: Expr) -> float:
    """A number to order strides by (shape symbols read as 4096)."""
    if isinstance(v, sympy.Basic):
        return float(v.subs({x: 4096 for x in v.free_symbols}))
    return float(v)


def parallel(iterations: Expr) -> Expr:
    """1 if a CPU kernel over `iterations` elements opens an OpenMP parallel region (PyTorch
    splits loops of more than GRAIN_SIZE elements across threads), else 0."""
    if isinstance(iterations, sympy.Basic) and not iterations.is_number:
        return sympy.Piecewise((1, iterations > GRAIN_SIZE), (0, True))
    return 1 if iterations > GRAIN_SIZE else 0


def _loop(cost: OpCost, rows: Expr, iterations: Expr) -> OpCost:
    """`cost` plus a TensorIterator loop's host costs: its rows beyond the first, and its
    parallel region if it has more than GRAIN_SIZE elements."""
    host = dict(cost.work.host)
    if not (isinstance(rows, (int, float)) and rows <= 1):
        host["rows"] = host.get("rows", 0) + rows - 1
    regions = parallel(iterations)
    if not (isinstance(regions, int) and regions == 0):
        host["parallel"] = host.get("parallel", 0) + regions
    return replace(cost, work=replace(cost.work, host=host)) if host != cost.work.host else cost


# -- matmul family -------------------------------------------------------------------------


def _matmul(a: TensorInfo, b: TensorInfo, out: list[TensorInfo], extra_read: Sequence[TensorInfo] = (), epilogue: Expr = 0) -> OpCost:
    k = a.shape[-1]
    flops = 2 * out[0].numel * k
    read, written = io_bytes([a, b, *extra_read], out)
    category = "linear" if a.constant or b.constant else "attention"
    work = Work({a.dtype_name: flops}, vector_flops=epilogue, bytes_read=read, bytes_written=written, bytes_cold=cold_bytes([a, b, *extra_read]))
    if len(a.shape) >= 2 and _is_one(a.shape[-2]) and b.constant:
        # one row against a weight: BLAS runs a matrix-vector product, streaming the weight
        work = replace(work, host={"gemv_bytes": b.nbytes})
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


def causal_pairs_end_aligned(sq: Expr, skv: Expr) -> Expr:
    """Attended pairs when the Sq queries are the last Sq of Skv positions (query i sees keys
    up to Skv - Sq + i), as in a decode step or flash-attn's causal: Sq·Skv - Sq(Sq-1)/2."""
    return sq * skv - sq * (sq - 1) / 2


def attention_work(q: TensorInfo, k: TensorInfo, v: TensorInfo, out: Sequence[TensorInfo], causal: bool, mask: TensorInfo | None = None, density: Expr = 1, end_aligned: bool = False) -> Work:
    """Work of softmax(QKᵀ·scale + mask)·V over the attended pairs; `density` scales the pairs
    for block-sparse layouts. GQA K/V are read at their own head count. A causal mask is
    aligned at the top left (SDPA's `is_causal`) unless `end_aligned`."""
    *batch, sq, d = q.shape
    skv, dv = k.shape[-2], v.shape[-1]
    heads = math.prod(batch)
    if causal:
        pairs = causal_pairs_end_aligned(sq, skv) if end_aligned else causal_pairs(sq, skv)
    else:
        pairs = sq * skv
    pairs = pairs * density
    extra = [mask] if mask is not None else []
    read, written = io_bytes([q, k, v, *extra], out)
    return Work(
        {q.dtype_name: 2 * heads * pairs * (d + dv)},
        vector_flops=4 * heads * pairs,  # scale, running max, subtract, sum
        transcendentals=heads * pairs,  # exp
        bytes_read=read,
        bytes_written=written,
        bytes_cold=cold_bytes([q, k, v, *extra]),
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
    if mask is not None and mask.dtype == torch.bool:
        # SDPA first turns a boolean mask into an additive one of the query's dtype
        # (`convert_boolean_attn_mask`: at::where(mask, 0, -inf)), one more kernel; the
        # attention kernel then reads that float mask.
        converted = TensorInfo(mask.shape, q.dtype, mask.constant)
        conversion = Work(vector_flops=mask.numel, bytes_read=mask.nbytes, bytes_written=converted.nbytes, bytes_cold=cold_bytes([mask]))
        return OpCost(attention_work(q, k, v, out[:1], causal, converted) + conversion, "attention")
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


TRIG = {aten.sin, aten.cos, aten.tan}
# Comparisons and logical ops whose CPU kernels are scalar lambdas (`cpu_kernel`, no explicit
# SIMD): the compiler vectorizes them only when every operand is contiguous along the loop.
SCALAR_KERNELS = {aten.eq, aten.ne, aten.lt, aten.le, aten.gt, aten.ge, aten.logical_and, aten.logical_or, aten.logical_xor, aten.logical_not, aten.bitwise_and, aten.bitwise_or, aten.bitwise_xor, aten.bitwise_not, aten.where}


def _pointwise(packet: Any, args: Sequence[Any], kwargs: dict[str, Any], out: list[TensorInfo]) -> OpCost:
    n = _numel(out)
    transcendental = n if packet in TRANSCENDENTAL and not _integer_power(packet, args) else 0
    cost = streaming(args, kwargs, out, "elementwise", vector=n, transcendental=transcendental)
    host = {}
    if packet in TRIG:
        host["trig"] = n  # sin/cos/tan: range reduction and a longer polynomial than exp
    if packet in SCALAR_KERNELS and out and _broadcast_inner(tensors((args, kwargs)), out[0]):
        host["scalar_loop"] = n
    cost = replace(cost, work=replace(cost.work, host=host)) if host else cost
    return _loop(cost, loop_rows(tensors((args, kwargs)), out[0]), out[0].numel) if out else cost


def _broadcast_inner(inputs: Sequence[TensorInfo], out: TensorInfo) -> bool:
    """An input broadcast along the output's innermost dimension (a 0-d tensor, or a size-1
    last dim against a longer one): the loop then has a stride-0 operand."""
    if not out.shape or _is_one(out.shape[-1]):
        return False
    return any(not t.shape or _is_one(t.shape[-1]) for t in inputs)


def _is_one(size: Expr) -> bool:
    return isinstance(size, (int, float)) and size == 1 or (isinstance(size, sympy.Basic) and size == 1)


def _integer_power(packet: Any, args: Sequence[Any]) -> bool:
    return packet is aten.pow and len(args) > 1 and isinstance(args[1], (int, float)) and float(args[1]).is_integer()


# -- indexing, copies, factories -----------------------------------------------------------


@rule(aten.embedding.default, aten.index.Tensor, aten.index_select.default, aten.gather.default)
def _gather(args, kwargs, out):
    # reads only the gathered rows (as many bytes as it writes) plus the indices
    index = tensors((args[1:], kwargs))
    read, written = io_bytes(index, out)
    table = args[0] if isinstance(args[0], TensorInfo) else None
    cold = (written if table is not None and table.constant else 0) + cold_bytes(index)
    return OpCost(Work(bytes_read=read + written, bytes_written=written, bytes_cold=cold), "other")


@rule(aten.index_copy_.default, aten.index_put_.default, aten.scatter_.src, aten.copy_.default)
def _scatter_inplace(args, kwargs, out):
    # writes the source (the last tensor argument) into place; reads it and the indices. Writing
    # into a constant (a static KV cache) first brings its lines from memory.
    ins = tensors((args[1:], kwargs))
    read, _ = io_bytes(ins, [])
    written = ins[-1].nbytes if ins else 0
    into = args[0] if isinstance(args[0], TensorInfo) else None
    cold = cold_bytes(ins) + (written if into is not None and into.constant else 0)
    cost = OpCost(Work(bytes_read=read, bytes_written=written, bytes_cold=cold), "other")
    return _loop(cost, loop_rows(ins[-1:], into), ins[-1].numel) if into is not None and ins else cost


@rule(aten.cat.default)
def _cat(args, kwargs, out):
    # CPU cat (TensorShape.cpp, cat_out_cpu): an output under GRAIN_SIZE elements from contiguous
    # floating inputs takes a serial fast path; otherwise each input is copied into its narrowed
    # slice of the output, a TensorIterator copy whose rows are the slice's rows.
    cost = streaming(args, kwargs, out, "elementwise")
    inputs, result = tensors(args[:1]), out[0]
    copies = [(loop_rows([t], TensorInfo(t.shape, result.dtype, strides=result.layout)), t.numel) for t in inputs]
    rows, regions = sum((r - 1 for r, _ in copies), 0), sum((parallel(n) for _, n in copies), 0)
    if all(_is_contiguous(t) for t in inputs) and result.dtype.is_floating_point:
        small = result.numel < GRAIN_SIZE
        if isinstance(small, bool) or small in (sympy.true, sympy.false):
            rows, regions = (0, 0) if bool(small) else (rows, regions)
        else:
            rows, regions = sympy.Piecewise((0, small), (rows, True)), sympy.Piecewise((0, small), (regions, True))
    host = dict(cost.work.host)
    for kind, n in (("rows", rows), ("parallel", regions)):
        if not (isinstance(n, (int, float)) and n == 0):
            host[kind] = n
    return replace(cost, work=replace(cost.work, host=host))


def _is_contiguous(t: TensorInfo) -> bool:
    return t.strides is None or all(_same(a, b) or _is_one(size) for a, b, size in zip(t.strides, TensorInfo(t.shape, t.dtype).layout, t.shape))


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
    compiler_op = op_for_target(target) if target not in _RULES else None
    if compiler_op is not None:
        if compiler_op.cost is None:
            return _generic(args, kwargs, out)
        return compiler_op.cost(*args, **kwargs)
    cost = _aten_cost(target, args, kwargs, out)
    if isinstance(cost.work.launches, (int, float)) and cost.work.launches == 0:
        return cost
    events = host_events(target, args, kwargs)
    if not events:
        return cost
    return replace(cost, work=cost.work + Work(launches=0, host=events))


def _aten_cost(target: torch._ops.OpOverload, args: Sequence[Any], kwargs: dict[str, Any], out: list[TensorInfo]) -> OpCost:
    if target in _RULES:
        return _RULES[target](args, kwargs, out)
    if not out or _is_view(target):
        return OpCost(FREE, "other")
    packet = target.overloadpacket
    if packet in FACTORIES:
        return OpCost(Work(bytes_written=sum((t.nbytes for t in out), 0)), "other")
    if packet in REDUCTIONS or torch.Tag.reduction in target.tags:
        n = sum((t.numel for t in tensors(args[:1])), 0)
        return streaming(args[:1], {}, out, "other", vector=n)
    if packet in COPIES:
        cost = streaming(args, kwargs, out, "elementwise")
        return _loop(cost, loop_rows(tensors(args[:1]), out[0]), out[0].numel)
    if torch.Tag.pointwise in target.tags or packet in TRANSCENDENTAL:
        return _pointwise(packet, args, kwargs, out)
    return _generic(args, kwargs, out)


# -- host (framework) events ---------------------------------------------------------------

INDEXING = {aten.index, aten.index_put, aten.index_put_, aten._unsafe_index, aten._unsafe_index_put, aten.embedding, aten.index_select}


def host_events(target: torch._ops.OpOverload, args: Sequence[Any], kwargs: dict[str, Any]) -> dict[str, Expr]:
    """The framework work one call makes on the host beyond a plain op dispatch, by kind (see
    `compiler.cost_model.work`): numbers passed for Tensor arguments, reduction setup,
    tensor factories, advanced indexing (per index tensor), concatenation, and the division
    that CPU `mean` runs after its sum."""
    packet = target.overloadpacket
    events: dict[str, Expr] = {}
    scalars = _wrapped_scalars(target, args, kwargs)
    if scalars:
        events["scalar"] = scalars
    if packet in REDUCTIONS or torch.Tag.reduction in target.tags:
        events["reduction"] = 1
        regions = parallel(sum((t.numel for t in tensors(args[:1])), 0))
        if not (isinstance(regions, int) and regions == 0):
            events["parallel_reduction"] = regions
        if packet is aten.mean:
            events["op"] = 1  # at::sum_out(...).div_(n) on CPU (ReduceOps.cpp, mean_out)
    if packet in FACTORIES or packet is aten._to_copy:
        events["factory"] = 1
    if packet in INDEXING:
        index = [t for t in tensors((args[1:], kwargs)) if t.dtype in (torch.int64, torch.int32, torch.bool)]
        events["index"] = max(1, len(index))
    if packet in (aten.cat, aten.stack):
        events["concat"] = 1
    return events


def _wrapped_scalars(target: torch._ops.OpOverload, args: Sequence[Any], kwargs: dict[str, Any]) -> int:
    """How many Python numbers the call passes where the schema takes a Tensor."""
    count = 0
    for i, param in enumerate(target._schema.arguments):
        value = args[i] if i < len(args) and not param.kwarg_only else kwargs.get(param.name)
        if isinstance(param.type, torch.TensorType) and isinstance(value, (int, float, sympy.Basic)) and not isinstance(value, TensorInfo):
            count += 1
    return count


def _generic(args: Sequence[Any], kwargs: dict[str, Any], out: list[TensorInfo]) -> OpCost:
    cost = streaming(args, kwargs, out, "other", vector=_numel(out))
    return OpCost(cost.work, "other", generic=True)


def _is_view(target: torch._ops.OpOverload) -> bool:
    """Views, and ops that launch nothing: size queries, detach, metadata asserts."""
    free = (aten.detach, aten.lift_fresh, aten.sym_size, aten.sym_numel, aten.sym_stride, aten._assert_tensor_metadata)
    return target.overloadpacket in free or is_view(target)


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
            strides = None if v.layout != torch.strided else tuple(as_expr(s) for s in v.stride())
            return TensorInfo(tuple(as_expr(s) for s in v.shape), v.dtype, constant, strides)
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


# Meta key of a fused region's placeholder whose outside value is a constant (a weight).
CONSTANT_INPUT = "compiler.constant_input"


def is_constant(node: fx.Node) -> bool:
    """True for get_attr nodes, for a fused region's inputs fed by constants, and for ops
    whose inputs are all constants (no other placeholder among the ancestors)."""
    if _constant_memo is not None:
        return _constant_with_memo(node, _constant_memo)
    stack, seen = [node], {node}
    while stack:  # stops at the first input that is not constant
        n = stack.pop()
        if _leaf_constant(n):
            continue
        if n.op != "call_function" or not n.all_input_nodes:
            return False
        for i in n.all_input_nodes:
            if i not in seen:
                seen.add(i)
                stack.append(i)
    return True


def _leaf_constant(n: fx.Node) -> bool:
    return n.op == "get_attr" or (n.op == "placeholder" and n.meta.get(CONSTANT_INPUT, False))


def _constant_with_memo(node: fx.Node, memo: dict[fx.Node, bool]) -> bool:
    """`is_constant` over a graph that does not change meanwhile: each node is decided once
    (without the memo, asking every node of a deep graph walks back to its inputs: quadratic)."""
    stack = [node]
    while stack:
        n = stack[-1]
        if n in memo:
            stack.pop()
            continue
        if _leaf_constant(n) or n.op != "call_function" or not n.all_input_nodes:
            memo[n] = _leaf_constant(n)
            stack.pop()
            continue
        pending = [i for i in n.all_input_nodes if i not in memo]
        if pending:
            stack.extend(pending)
            continue
        memo[n] = all(memo[i] for i in n.all_input_nodes)
        stack.pop()
    return memo[node]


_constant_memo: dict[fx.Node, bool] | None = None


@contextlib.contextmanager
def frozen_graph() -> Iterator[None]:
    """Within this block the graphs being priced do not change, so constness is memoized."""
    global _constant_memo
    outer = _constant_memo
    if outer is None:
        _constant_memo = {}
    try:
        yield
    finally:
        _constant_memo = outer


def node_cost(node: fx.Node) -> OpCost:
    if node.op != "call_function":
        return OpCost(FREE, "other")
    args, kwargs = fx.node.map_arg((node.args, node.kwargs), node_value)
    out = tensors(node_value(node))
    return op_cost(node.target, args, kwargs, out)
