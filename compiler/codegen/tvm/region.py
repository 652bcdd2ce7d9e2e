"""The TVM lowering of fused regions: a region's ATen subgraph as one TE program, one kernel.

Part of the codegen step (capture -> passes -> codegen -> compiled module). `lower_region` takes
a `FusedRegion` of kind "pointwise" or "reduction" and translates its nodes, in graph order, into
tensor expressions:

- a pointwise op or a view is not a stage of its own: its value is a function from an output
  index to a TIR expression (`_Value.load`), so the whole chain of ops and views inlines into the
  expression of the stage that reads it. Each op computes in fp32 ("opmath", as ATen does) and
  rounds to its own dtype, so a bf16 chain rounds where eager rounds;
- a reduction over the last dim (sum, mean, amax, amin, var; softmax, log_softmax and
  native_layer_norm as their few reductions) is a TE stage over the leading dims ("rows");
- an expensive intermediate (exp, tanh, ...) that a reduction and another consumer both read is
  materialized as a row-local stage, so softmax computes exp(x - max) once;
- every region output is one stage, written to a buffer the runner allocates.

Numerics follow eager: exp, tanh and erf (and sigmoid, silu, gelu on them) are inlined
polynomial forms a few ulp from the correctly rounded result (LLVM would call libm once per
lane), max/min/clamp/relu propagate NaN, and bf16 is converted on its bits (TVM's own bf16 casts
are legalized wrongly inside the Let bindings these forms use).

Schedules:

- `llvm` (the host): pointwise outputs are flattened, vectorized by the host's fp32 lanes and
  parallel; outputs of one shape share one loop (`merge`), so inputs are read once. A reduction
  region runs row by row: the loops of the outputs over the rows (or over a view of them) are
  merged into one parallel row loop, the reductions and materialized stages are computed inside
  it (`compute_at`) while the row is in cache, reductions as `lanes` vectorized partial results
  (rfactor), epilogues vectorized; an output not over the rows (a weight's transpose) keeps its
  own loop. A region whose reductions do not share rows falls back to one loop nest per stage;
- `cuda`: dlight's default GPU rules (thread binding, cross-thread reductions), else a manual
  binding; CUDA C is generated for reading (Triton runs CUDA targets), never run.

Symbolic sizes (SymInt leading dims from a dynamic capture) become TIR vars bound from the
input buffers' shapes, so one build serves every length. Inputs are read in place through DLPack
(`as_kernel_input` copies only what a kernel cannot read). What the translator does not cover
raises `Unsupported` with the node and the reason; the region then runs in ATen.

Kernels are named from the region's structure (ops, argument wiring, input shapes and dtypes),
and built with `build_primfunc`, which caches the shared library on disk by content hash.
"""

from __future__ import annotations

import hashlib
import math
import operator
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
from torch import fx

from compiler.codegen import RegionRequest, register_region_lowering
from compiler.codegen.tvm.build import as_kernel_input, build_primfunc, device_source, host_fp32_lanes, parse_target
from compiler.errors import Unsupported
from compiler.ops.registry import Kernel

aten = torch.ops.aten
prims = torch.ops.prims

_DTYPES = {
    torch.float32: "float32",
    torch.float16: "float16",
    torch.bfloat16: "bfloat16",
    torch.float64: "float64",
    torch.bool: "bool",
}
# Dtypes computed in fp32 (ATen's opmath); float64 computes in float64.
_FLOATS = (torch.float32, torch.float16, torch.bfloat16)
_TAKES = "float32, float16, bfloat16, float64 and bool tensors"
# Which regions run on TVM's thread pool. Waking the pool costs more than a small region, and
# between ATen ops the pool competes with ATen's OpenMP threads, which spin after each op.
# Measured on the 2-core host (benchmarks/fusion.py, SmolLM2 regions at 2048 tokens): with every
# region over 16K elements parallel, RMSNorm, rotary and add+norm ran 1.2-1.5x eager; on the
# calling thread alone, 1.4-2.1x (one core streams what they move). SwiGLU's exp is compute:
# 0.65x eager on one thread, 1.1x on two. So only regions with a transcendental and at least
# this many elements go parallel (and symbolic ones, whose size is unknown here).
_PARALLEL_MIN_ELEMENTS = 1 << 21
# Threads per block of the manual CUDA schedule.
_CUDA_THREADS = 256
_NOT_RUN = "TVM CUDA kernels are for reading only; the triton backend runs CUDA targets"


@register_region_lowering("tvm")
def lower_region(req: RegionRequest) -> Kernel:
    """The TVM kernel of a pointwise or reduction region; raises `Unsupported` for one it does
    not take, and for one TVM fails on (with TVM's message), so the region runs in ATen."""
    try:
        return _lower_region(req)
    except Unsupported:
        raise
    except Exception as exc:  # noqa: BLE001 - a TVM failure must not fail the whole compile
        message = str(exc).strip()
        last = message.splitlines()[-1] if message else ""
        raise Unsupported(f"TVM failed on the region ({type(exc).__name__}: {last[:300]})") from exc


def _lower_region(req: RegionRequest) -> Kernel:
    region = req.region
    if region.kind not in ("pointwise", "reduction"):
        raise Unsupported(f"TVM region lowering takes pointwise and reduction regions, not {region.kind}")
    target = parse_target(req.target.tvm_target)
    kind = target.kind.name
    if kind not in ("llvm", "cuda"):
        raise Unsupported(f"TVM region lowering has no schedule for target kind {kind!r}")
    if kind == "llvm":
        for a in req.args:
            if isinstance(a, torch.Tensor) and a.device.type != "cpu":
                raise Unsupported(f"TVM llvm kernel for a region with a {a.device.type} input")
    program = _Builder(region, req.args).build()
    if kind == "cuda":
        return _lower_for_cuda(program, req.target.tvm_target, target)
    lanes = host_fp32_lanes(target)
    scheduled, how = _schedule_host(program, lanes)
    source = _header(program) + scheduled.script()
    name = program.name
    if not req.run_here:
        return Kernel(name, "tvm", source, note=f"{how} schedule; not built: the caller asked for source only")
    built = build_primfunc(scheduled, req.target.tvm_target, name)
    runner = _host_runner(program, built)
    return Kernel(name, "tvm", source, runner=runner, note=f"{how} schedule; shared library: {built.library}")


# Translation ------------------------------------------------------------------------------------


@dataclass
class _Value:
    """A tensor of the region as a function of its index: `load(idx)` is the TIR expression of
    the element at `idx` (one TIR expr per dim), in the tensor's dtype. `meta` is the shape in
    torch terms (ints, SymInts); `dims` the same sizes as TIR (ints, vars, expressions).
    `expensive` says whether an element costs a transcendental to recompute."""

    meta: tuple[Any, ...]
    dims: tuple[Any, ...]
    dtype: torch.dtype
    load: Callable[[Sequence[Any]], Any]
    expensive: bool = False


@dataclass
class _Stage:
    """A TE stage of the program: a reduction over the last dim (`meta` its row dims, `n` the
    reduced length when static), a materialized intermediate or an output (`meta` its shape)."""

    name: str
    role: str  # "reduction", "materialized", "output"
    meta: tuple[Any, ...]
    n: int | None = None


@dataclass
class _Program:
    """The translated region: TE tensors and what the schedule and the runner need to know."""

    name: str
    region: fx.GraphModule
    func: Any  # unscheduled PrimFunc
    stages: list[_Stage]
    tensor_inputs: list[int]  # region input positions passed as buffers, in parameter order
    scalar_inputs: list[int]  # region input positions passed as scalars, after the outputs
    symbols: dict[str, tuple[int, int]]  # TIR var name -> (input position, dim) that binds it
    scalar_symbols: dict[str, int]  # TIR var name -> position of the scalar input that binds it
    outputs: list[tuple[list[Callable[[dict[str, int]], int]], torch.dtype]]
    tuple_output: bool
    lead: tuple[Any, ...] | None = None  # row dims of the reductions (meta), when there are any
    ops: list[str] = field(default_factory=list)
    transcendental: bool = False  # some element costs an exp, tanh, erf, pow...


def _is_one(d: Any) -> bool:
    return isinstance(d, int) and d == 1


def _same_dim(a: Any, b: Any) -> bool:
    if isinstance(a, int) and isinstance(b, int):
        return a == b
    if isinstance(a, int) or isinstance(b, int):
        return False
    return a.node.expr == b.node.expr


def _same_shape(a: Sequence[Any], b: Sequence[Any]) -> bool:
    return len(a) == len(b) and all(_same_dim(x, y) for x, y in zip(a, b))


def _static_numel(meta: Sequence[Any]) -> int | None:
    return math.prod(meta) if all(isinstance(d, int) for d in meta) else None


def _trailing_static(meta: Sequence[Any]) -> int:
    """The product of the static dims at the end of a shape (up to the last symbolic one)."""
    p = 1
    for d in reversed(meta):
        if not isinstance(d, int):
            break
        p *= d
    return p


def _opmath(dtype: torch.dtype) -> str:
    return "float32" if dtype in _FLOATS else _DTYPES[dtype]


def _dtype(expr: Any) -> str:
    """The dtype of a TIR expression, as a string."""
    return str(expr.ty)


def _cast(expr: Any, dtype: str) -> Any:
    """`expr` converted to `dtype`. bf16 conversions are written on the bits: TVM 0.27 legalizes
    its own bf16 casts wrongly inside a Let (a cast of a bf16 load in a Let value loses the
    shift; a cast to bf16 repeats its operand, Let and all), and the fast transcendentals bind
    their operands with Let."""
    source = _dtype(expr)
    if source == dtype:
        return expr
    if source == "bfloat16":
        return _cast(_bfloat16_to_float32(expr), dtype)
    if dtype == "bfloat16":
        return _round_to_bfloat16(_cast(expr, "float32"))
    return expr.astype(dtype)


def _bfloat16_to_float32(x: Any) -> Any:
    """bf16 -> fp32, exact: the bf16 bits are the high half of the fp32 ones."""
    tirx = _tir()
    bits = tirx.reinterpret("uint16", x).astype("uint32")
    return tirx.reinterpret("float32", tirx.shift_left(bits, tirx.const(16, "uint32")))


def _round_to_bfloat16(x: Any) -> Any:
    """fp32 -> bf16 rounded to nearest even, as torch does, reading `x` once."""
    tirx = _tir()

    def rounded(bits: Any) -> Any:
        lsb = tirx.bitwise_and(tirx.shift_right(bits, tirx.const(16, "uint32")), tirx.const(1, "uint32"))
        top = tirx.shift_right(bits + tirx.const(0x7FFF, "uint32") + lsb, tirx.const(16, "uint32"))
        # NaN stays a (quiet) NaN: rounding its payload could carry into the sign.
        is_nan = tirx.bitwise_and(bits, tirx.const(0x7FFFFFFF, "uint32")) > tirx.const(0x7F800000, "uint32")
        return tirx.Select(is_nan, tirx.const(0x7FC0, "uint16"), top.astype("uint16"))

    return tirx.reinterpret("bfloat16", _let("bits", tirx.reinterpret("uint32", x), rounded))


def _normalize_dim(d: int, rank: int) -> int:
    return d + rank if d < 0 else d


def _sym_to(expr: Any, leaf: Callable[[Any], Any], what: str) -> Any:
    """A sympy size expression rebuilt with `leaf` for its symbols (TIR, or runtime ints)."""
    import sympy
    from torch.utils._sympy.functions import FloorDiv, Mod

    if expr.is_Integer:
        return int(expr)
    if expr.is_Symbol:
        return leaf(expr)
    parts = [_sym_to(a, leaf, what) for a in expr.args]
    if isinstance(expr, sympy.Add):
        out = parts[0]
        for p in parts[1:]:
            out = out + p
        return out
    if isinstance(expr, sympy.Mul):
        out = parts[0]
        for p in parts[1:]:
            out = out * p
        return out
    if isinstance(expr, FloorDiv) and what == "runtime":
        return parts[0] // parts[1]
    if isinstance(expr, Mod) and what == "runtime":
        return parts[0] % parts[1]
    if isinstance(expr, FloorDiv):
        from tvm import tirx

        return tirx.floordiv(parts[0], parts[1])
    if isinstance(expr, Mod):
        from tvm import tirx

        return tirx.floormod(parts[0], parts[1])
    raise Unsupported(f"symbolic size {expr} ({type(expr).__name__}) has no TIR form")


class _Builder:
    """Translates one region into a `_Program`, node by node (see the module docstring)."""

    def __init__(self, region: fx.GraphModule, args: Sequence[Any]) -> None:
        self.region = region
        self.args = list(args)
        self.values: dict[fx.Node, Any] = {}
        self.vars: dict[Any, Any] = {}  # sympy Symbol -> tirx.Var
        self.symbols: dict[str, tuple[int, int]] = {}
        self.scalar_symbols: dict[str, int] = {}  # TIR var name -> scalar input position
        self.stages: list[_Stage] = []
        self.lead: tuple[Any, ...] | None = None
        self.counter = 0
        nodes = list(region.graph.nodes)
        self.has_reductions = any(n.op == "call_function" and n.target in _REDUCTIONS for n in nodes)

    # sizes

    def dim(self, d: Any) -> Any:
        if isinstance(d, int):
            # With symbolic sizes every index is int64: a loop fused from an int32 and an int64
            # one binds through a cast, which compute_at cannot see through.
            return _tir().const(d, "int64") if self.vars else d
        if isinstance(d, torch.SymInt):
            return _sym_to(d.node.expr, self._var, "tir")
        raise Unsupported(f"size {d!r} of type {type(d).__name__}")

    def dims(self, meta: Sequence[Any]) -> tuple[Any, ...]:
        return tuple(self.dim(d) for d in meta)

    def _var(self, symbol: Any) -> Any:
        if symbol not in self.vars:
            raise Unsupported(f"symbolic size {symbol} is not a dimension of any region input")
        return self.vars[symbol]

    def fresh(self, op: str) -> str:
        self.counter += 1
        return f"t{self.counter}_{op.strip('_')}"

    # building

    def build(self) -> _Program:
        from tvm import te, tirx

        placeholders = [n for n in self.region.graph.nodes if n.op == "placeholder"]
        if len(placeholders) != len(self.args):
            raise Unsupported(f"region has {len(placeholders)} inputs but the call passes {len(self.args)}")
        # Bind every plain symbol to the first input dim that has it.
        for pos, a in enumerate(self.args):
            if isinstance(a, torch.Tensor):
                for d, size in enumerate(a.shape):
                    expr = size.node.expr if isinstance(size, torch.SymInt) else None
                    if expr is not None and expr.is_Symbol and expr not in self.vars:
                        name = f"n{len(self.vars)}"
                        self.vars[expr] = tirx.Var(name, "int64")
                        self.symbols[name] = (pos, d)
        tensors, scalars, params = [], [], []
        for pos, (node, a) in enumerate(zip(placeholders, self.args)):
            if isinstance(a, torch.Tensor):
                if a.dtype not in _DTYPES:
                    raise Unsupported(f"region input {node.name} is {a.dtype}; TVM regions take {_TAKES}")
                t = te.placeholder(self.dims(a.shape), _DTYPES[a.dtype], name=f"in{len(tensors)}")
                tensors.append(pos)
                params.append(t)
                self.values[node] = _Value(tuple(a.shape), tuple(t.shape), a.dtype, lambda idx, t=t: t(*idx))
            elif isinstance(a, (torch.SymInt, int)) and not isinstance(a, bool):
                expr = a.node.expr if isinstance(a, torch.SymInt) else None
                if expr is not None and expr.is_Symbol and expr not in self.vars:
                    var = tirx.Var(f"n{len(self.vars)}", "int64")
                    self.vars[expr] = var
                    scalars.append(pos)
                    self.scalar_symbols[var.name] = pos
                    self.values[node] = var
                elif expr is not None:
                    self.values[node] = self.dim(a)  # bound by an input's shape: no parameter
                else:
                    var = tirx.Var(f"p{len(scalars)}", "int64")
                    scalars.append(pos)
                    self.values[node] = var
            elif isinstance(a, (float, torch.SymFloat)):
                var = tirx.Var(f"p{len(scalars)}", "float64")
                scalars.append(pos)
                self.values[node] = var
            else:
                raise Unsupported(f"region input {node.name} is a {type(a).__name__}")
        ops = []
        for node in self.region.graph.nodes:
            if node.op == "call_function":
                self.values[node] = self.translate(node)
                if node.target is not operator.getitem:
                    ops.append(_op_name(node.target))
            elif node.op == "get_attr":
                raise Unsupported(f"region reads attribute {node.target}")
        output = next(n for n in self.region.graph.nodes if n.op == "output")
        result = output.args[0]
        tuple_output = isinstance(result, (tuple, list))
        out_nodes = list(result) if tuple_output else [result]
        outputs, runtime_shapes = [], []
        for i, out in enumerate(out_nodes):
            v = self.values.get(out) if isinstance(out, fx.Node) else None
            if not isinstance(v, _Value):
                raise Unsupported(f"region output {i} ({out}) is not a tensor")
            if v.dtype not in _DTYPES:
                raise Unsupported(f"region output {i} is {v.dtype}")
            dtype = _DTYPES[v.dtype]
            name = f"out{i}"
            outputs.append(te.compute(v.dims, _element_fn(v, dtype), name=name))
            self.stages.append(_Stage(name, "output", v.meta))
            runtime_shapes.append(([self._runtime_dim(d) for d in v.meta], v.dtype))
        scalar_vars = [self.values[placeholders[pos]] for pos in scalars]
        func = te.create_prim_func([*params, *outputs, *scalar_vars])
        return _Program(
            name=_kernel_name(self.region, self.args, ops),
            region=self.region,
            func=func,
            stages=self.stages,
            tensor_inputs=tensors,
            scalar_inputs=scalars,
            symbols=self.symbols,
            scalar_symbols=self.scalar_symbols,
            outputs=runtime_shapes,
            tuple_output=tuple_output,
            lead=self.lead,
            ops=ops,
            transcendental=any(isinstance(v, _Value) and v.expensive for v in self.values.values()),
        )

    def _runtime_dim(self, d: Any) -> Callable[[dict[str, int]], int]:
        if isinstance(d, int):
            return lambda env, d=d: d
        expr = d.node.expr
        names = {s: self._var(s).name for s in expr.free_symbols}
        return lambda env, expr=expr, names=names: _sym_to(expr, lambda s: env[names[s]], "runtime")

    def translate(self, node: fx.Node) -> Any:
        meta = node.meta.get("val")
        if node.target is operator.getitem:
            seq, i = self.values[node.args[0]], node.args[1]
            if not isinstance(seq, (tuple, list)):
                raise Unsupported(f"{node.name}: getitem of a {type(seq).__name__}")
            value = seq[i]
            if value is None:
                raise Unsupported(f"{node.name}: output {i} of {node.args[0].name} is not translated")
            return value
        if isinstance(meta, (torch.SymInt, int)) and not isinstance(meta, bool):
            return self.dim(meta)  # a size computed in the region: its value is known from shapes
        handler = _HANDLERS.get(node.target)
        if handler is None:
            raise Unsupported(f"{node.name}: {_op_label(node.target)} has no TVM translation")
        for m in meta if isinstance(meta, (tuple, list)) else [meta]:
            if isinstance(m, torch.Tensor) and m.dtype not in _DTYPES:
                label = _op_label(node.target)
                raise Unsupported(f"{node.name}: {label} makes a {m.dtype} tensor; TVM regions take {_TAKES}")
        args, kwargs = fx.node.map_arg((node.args, node.kwargs), lambda n: self.values[n])
        value = handler(self, node, *args, **kwargs)
        if (
            isinstance(value, _Value)
            and value.expensive
            and self.has_reductions
            and len(node.users) > 1
            and len(value.dims) > 0
            and (self.lead is None or _row_prefix(value.meta, self.lead) is not None)
        ):
            value = self.materialize(value, node.name)
        return value

    # helpers for the handlers

    def out(self, node: fx.Node, index: int | None = None) -> torch.Tensor:
        meta = node.meta["val"]
        return meta[index] if index is not None else meta

    def operand(self, x: Any, out_meta: Sequence[Any], dtype: str) -> Callable[[Sequence[Any]], Any]:
        """A loader of `x` (a tensor value or a scalar) broadcast to `out_meta`, cast to `dtype`."""
        if isinstance(x, _Value):
            load = _broadcast(x, out_meta)
            return lambda idx: _cast(load(idx), dtype)
        c = _scalar(x, dtype)
        return lambda idx: c

    def elementwise(
        self,
        node: fx.Node,
        fn: Callable[..., Any],
        *operands: Any,
        compute: str | None = None,
        expensive: bool = False,
        out_meta: torch.Tensor | None = None,
    ) -> _Value:
        """The value of `fn` applied to the operands' elements: computed in `compute` (the opmath
        of the node's dtype unless given), rounded to the node's dtype."""
        meta = out_meta if out_meta is not None else self.out(node)
        out_dtype = _DTYPES[meta.dtype]
        compute = compute or _opmath(meta.dtype)
        loads = [self.operand(x, meta.shape, compute) for x in operands]

        def load(idx: Sequence[Any]) -> Any:
            return _cast(fn(*[ld(idx) for ld in loads]), out_dtype)

        costly = expensive or any(isinstance(x, _Value) and x.expensive for x in operands)
        return _Value(tuple(meta.shape), self.dims(meta.shape), meta.dtype, load, costly)

    def view(
        self, node: fx.Node, x: _Value, index_map: Callable[[list[Any]], Sequence[Any]], meta: Any = None
    ) -> _Value:
        """A value that reads `x` at `index_map(idx)`: views cost nothing, they rewrite indices."""
        meta = meta if meta is not None else self.out(node)
        if meta.dtype != x.dtype:
            raise Unsupported(f"{node.name}: {_op_label(node.target)} changes the dtype")

        def load(idx: Sequence[Any]) -> Any:
            return x.load(index_map(list(idx)))

        return _Value(tuple(meta.shape), self.dims(meta.shape), x.dtype, load, x.expensive)

    def materialize(self, value: _Value, label: str) -> _Value:
        """`value` as a TE stage of its own, computed once per element and then read."""
        from tvm import te

        name = self.fresh(label)
        t = te.compute(value.dims, lambda *idx: value.load(list(idx)), name=name)
        self.stages.append(_Stage(name, "materialized", value.meta))
        return _Value(value.meta, value.dims, value.dtype, lambda idx: t(*idx))

    def reduce(
        self,
        node: fx.Node,
        x: _Value,
        kind: str,
        acc: str,
        label: str,
        prologue: Callable[[Any, list[Any]], Any] | None = None,
    ) -> Any:
        """A TE stage reducing the last dim of `x` (its elements cast to `acc`, then passed through
        `prologue(element, row index)` if given) with `kind` in sum/max/min; returns the stage, a
        tensor over the row dims."""
        from tvm import te

        if not x.dims:
            raise Unsupported(f"{node.name}: {_op_label(node.target)} of a 0-dim tensor")
        lead_meta, n_meta = x.meta[:-1], x.meta[-1]
        if self.lead is None:
            self.lead = lead_meta
        n = x.dims[-1]
        name = self.fresh(label)
        k = te.reduce_axis((0, n), name=f"k{self.counter}")
        reducer = {"sum": te.sum, "max": te.max, "min": te.min}[kind]

        def body(*i: Any) -> Any:
            element = _cast(x.load([*i, k]), acc)
            if prologue is not None:
                element = prologue(element, list(i))
            return reducer(element, axis=k)

        stage = te.compute(x.dims[:-1], body, name=name)
        static_n = n_meta if isinstance(n_meta, int) else None
        self.stages.append(_Stage(name, "reduction", lead_meta, static_n))
        return stage

    def row_value(self, meta: Any, x: _Value, fn: Callable[[list[Any]], Any]) -> _Value:
        """A value of shape `meta` (x's rows, with or without the kept last dim) computed from the
        row index by `fn` (which returns an expression in opmath); rounded to meta's dtype."""
        lead = len(x.dims) - 1
        out_dtype = _DTYPES[meta.dtype]

        def load(idx: Sequence[Any]) -> Any:
            return _cast(fn(list(idx)[:lead]), out_dtype)

        return _Value(tuple(meta.shape), self.dims(meta.shape), meta.dtype, load)


def _element_fn(v: _Value, dtype: str) -> Callable[..., Any]:
    """The fcompute of a stage that stores `v` as `dtype` (TE takes only positional indices)."""

    def element(*idx: Any) -> Any:
        return _cast(v.load(list(idx)), dtype)

    return element


def _broadcast(x: _Value, out_meta: Sequence[Any]) -> Callable[[Sequence[Any]], Any]:
    """A loader of `x` at the index of a tensor of shape `out_meta` it broadcasts to (numpy
    rules: dims aligned from the right, size-1 dims read at 0)."""
    rank, out_rank = len(x.meta), len(out_meta)
    if rank > out_rank:
        raise Unsupported(f"cannot broadcast a rank-{rank} tensor to rank {out_rank}")
    offset = out_rank - rank
    keep = [not (_is_one(x.meta[d]) and not _is_one(out_meta[offset + d])) for d in range(rank)]
    if offset == 0 and all(keep):
        return x.load
    return lambda idx: x.load([idx[offset + d] if keep[d] else 0 for d in range(rank)])


def _scalar(x: Any, dtype: str) -> Any:
    from tvm import tirx

    if isinstance(x, (bool, int, float)):
        if dtype == "bool":
            return tirx.const(bool(x), "bool")
        if dtype == "bfloat16":
            return _cast(tirx.const(float(x), "float32"), dtype)
        return tirx.const(float(x) if dtype.startswith("float") else int(x), dtype)
    if hasattr(x, "ty"):  # a TIR scalar: a size, or a scalar input
        return _cast(x, dtype)
    raise Unsupported(f"scalar argument {x!r} of type {type(x).__name__}")


def _op_name(target: Any) -> str:
    if isinstance(target, torch._ops.OpOverload):
        return target._schema.name.split("::")[1]
    return getattr(target, "__name__", str(target))


def _op_label(target: Any) -> str:
    return str(target) if isinstance(target, torch._ops.OpOverload) else _op_name(target)


# Ops too common to say anything in a kernel name.
_UNNAMED_OPS = (
    "view", "unsafe_view", "unsqueeze", "expand", "to_copy", "convert_element_type", "clone", "alias",
    "detach", "lift_fresh_copy", "sym_size",
)


def _kernel_name(region: fx.GraphModule, args: Sequence[Any], ops: list[str]) -> str:
    """A name from the region's structure: ops, wiring, input shapes and dtypes, sizes. Equal
    regions captured twice (other node names, other symbol numbering) get the same name."""
    symbols: dict[str, str] = {}

    def canon(v: Any) -> str:
        if isinstance(v, fx.Node):
            return f"%{index[v]}"
        if isinstance(v, torch.SymInt):
            expr = v.node.expr
            for s in sorted(expr.free_symbols, key=str):
                symbols.setdefault(str(s), f"n{len(symbols)}")
            renamed = expr.xreplace({s: type(s)(symbols[str(s)]) for s in expr.free_symbols})
            return f"sym({renamed})"
        if isinstance(v, torch.Tensor):
            return f"{v.dtype}[{','.join(canon(d) for d in v.shape)}]"
        if isinstance(v, (list, tuple)):
            return "(" + ",".join(canon(a) for a in v) + ")"
        if isinstance(v, dict):
            return "{" + ",".join(f"{k}={canon(a)}" for k, a in sorted(v.items())) + "}"
        return repr(v)

    nodes = list(region.graph.nodes)
    index = {n: i for i, n in enumerate(nodes)}
    lines = [f"kind={getattr(region, 'kind', '')}", "inputs=" + canon(list(args))]
    for n in nodes:
        if n.op == "placeholder":
            continue
        target = _op_label(n.target) if n.op == "call_function" else n.op
        lines.append(f"{n.op} {target} {canon(n.args)} {canon(dict(n.kwargs))}")
    digest = hashlib.sha256("\n".join(lines).encode()).hexdigest()[:10]
    summary = []
    for op in ops:
        op = op.strip("_").replace(".", "_")
        if op not in summary and op not in _UNNAMED_OPS:
            summary.append(op)
    readable = "_".join(summary[:4]) or "copy"
    return f"region_{readable}_{digest}"


# Op handlers ------------------------------------------------------------------------------------

_HANDLERS: dict[Any, Callable[..., Any]] = {}


def _handles(*targets: Any) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
        for t in targets:
            _HANDLERS[t] = fn
        return fn

    return decorate


def _tir() -> Any:
    from tvm import tirx

    return tirx


# Fast, vectorizable transcendentals: LLVM turns exp/tanh/erf into one libm call per lane, which
# costs several times ATen's vectorized (Sleef) versions. These are the polynomial forms TVM's topi
# uses (Cephes expf; Eigen's rational tanh and erf), written as expressions so they inline into
# the fused stage: a few ulp from the correctly rounded result (measured < 5e-7 relative).


def _let(name: str, value: Any, body: Callable[[Any], Any]) -> Any:
    """`body(v)` with `v` bound to `value` once (a TIR Let), so a polynomial in v neither
    recomputes nor reprints the expression it is applied to."""
    tirx = _tir()
    var = tirx.Var(name, _dtype(value))
    return tirx.Let(var, value, body(var))


def _polynomial(v: Any, coefficients: Sequence[float]) -> Any:
    """Horner's rule, highest coefficient first."""
    tirx = _tir()
    c = _dtype(v)
    p = tirx.const(coefficients[0], c)
    for coef in coefficients[1:]:
        p = p * v + tirx.const(coef, c)
    return p


# exp overflows above ln(FLT_MAX) (Cephes MAXLOGF); below _EXP_LO the result is under FLT_MIN
# (1.2e-38) and is flushed to 0 (ATen gives a denormal).
_EXP_HI, _EXP_LO = 88.72283905206835, -87.6
# exp(r) = 1 + r + r**2 * P(r) on [-ln2/2, ln2/2] (Cephes expf).
_EXP_P = (1.9875691500e-4, 1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2, 1.6666665459e-1, 5.0000001201e-1)
# tanh(v) = v * P(v**2) / Q(v**2) on [-9, 9], erf(v) likewise on [-4, 4] (Eigen's rational forms).
_TANH_P = (
    -2.76076847742355e-16, 2.00018790482477e-13, -8.60467152213735e-11, 5.12229709037114e-08,
    1.48572235717979e-05, 6.37261928875436e-04, 4.89352455891786e-03,
)
_TANH_Q = (1.19825839466702e-06, 1.18534705686654e-04, 2.26843463243900e-03, 4.89352518554385e-03)
_ERF_P = (
    -2.72614225801306e-10, 2.77068142495902e-08, -2.10102402082508e-06, -5.69250639462346e-05,
    -7.34990630326855e-04, -2.95459980854025e-03, -1.60960333262415e-02,
)
_ERF_Q = (
    -1.45660718464996e-05, -2.13374055278905e-04, -1.68282697438203e-03, -7.37332916720468e-03,
    -1.42647390514189e-02,
)


def exp_in_range(v: Any) -> Any:
    """exp(v) in fp32 for v already clamped to [_EXP_LO, _EXP_HI] (or NaN), as Cephes' expf
    computes it: exp(v) = 2**n * exp(r), r = v - n*ln2 in [-ln2/2, ln2/2] with ln2 in two parts,
    exp(r) a polynomial. Callers clamp and handle what lies outside."""
    tirx = _tir()
    c = "float32"

    def power(n: Any) -> Any:
        r = v - n * tirx.const(0.693359375, c) + n * tirx.const(2.12194440e-4, c)
        p = _let("r", r, lambda r: _polynomial(r, _EXP_P) * (r * r) + r + tirx.const(1.0, c))
        # 2**n as 2**(n-1) * 2 from the exponent bits, so that n = 128 (just below overflow) is
        # representable; n = -126 (v at _EXP_LO) gives exponent bits 0, so exactly 0.
        half_scale = tirx.reinterpret(c, tirx.shift_left(n.astype("int32") + 126, 23))
        return p * half_scale * tirx.const(2.0, c)

    return _let("n", tirx.floor(v * tirx.const(1.44269504088896341, c) + tirx.const(0.5, c)), power)


def _exp(x: Any) -> Any:
    tirx = _tir()
    c = _dtype(x)
    if c != "float32":
        return tirx.exp(x)

    def at(x: Any) -> Any:
        y = _let("v", tirx.max(tirx.min(x, tirx.const(_EXP_HI, c)), tirx.const(_EXP_LO, c)), exp_in_range)
        # The clamp keeps 2**n representable; give back what exp gives above it and for NaN.
        y = tirx.Select(x > tirx.const(_EXP_HI, c), tirx.infinity(c), y)
        return tirx.Select(tirx.isnan(x), x, y)

    return _let("x", x, at)


def _odd_rational(x: Any, p: Any, q: Any, bound: float, exact: Callable[[Any], Any], identity_below: float = 0.0) -> Any:
    """x * P(x^2) / Q(x^2) on x clamped to [-bound, bound] (where the function has saturated in
    fp32), NaN passed through, and x itself below `identity_below` in magnitude; other dtypes
    use TVM's `exact` intrinsic."""
    tirx = _tir()
    c = _dtype(x)
    if c != "float32":
        return exact(x)

    def rational(v: Any) -> Any:
        v2 = v * v
        return _polynomial(v2, p) * v / _polynomial(v2, q)

    def at(x: Any) -> Any:
        y = _let("v", tirx.max(tirx.min(x, tirx.const(bound, c)), tirx.const(-bound, c)), rational)
        keep = tirx.isnan(x)
        if identity_below:
            keep = tirx.Or(tirx.abs(x) < tirx.const(identity_below, c), keep)
        return tirx.Select(keep, x, y)

    return _let("x", x, at)


def _tanh(x: Any) -> Any:
    # Below 4e-4, tanh(x) rounds to x; the rational form would be a few ulp off there.
    return _odd_rational(x, _TANH_P, _TANH_Q, 9.0, _tir().tanh, identity_below=0.0004)


def _erf(x: Any) -> Any:
    return _odd_rational(x, _ERF_P, _ERF_Q, 4.0, _tir().erf)


def _nan_or(x: Any, y: Any) -> Any:
    """x where x is NaN, else y: ATen's max/min/clamp/relu propagate NaN, TIR's max/min need
    not."""
    if not _dtype(x).startswith(("float", "bfloat")):
        return y
    return _tir().Select(_tir().isnan(x), x, y)


def _one(x: Any) -> Any:
    return _tir().const(1.0, _dtype(x))


def _unary(fn: Callable[[Any], Any], expensive: bool = False) -> Callable[..., Any]:
    def handler(b: _Builder, node: fx.Node, x: Any) -> _Value:
        return b.elementwise(node, fn, x, expensive=expensive)

    return handler


def _sigmoid(x: Any) -> Any:
    return _one(x) / (_one(x) + _exp(-x))


_SQRT1_2 = 0.7071067811865476
_GELU_BETA = math.sqrt(2.0 / math.pi)

_UNARY = {
    aten.neg.default: (lambda x: -x, False),
    aten.exp.default: (_exp, True),
    aten.log.default: (lambda x: _tir().log(x), True),
    aten.log1p.default: (lambda x: _tir().log1p(x), True),
    aten.sqrt.default: (lambda x: _tir().sqrt(x), False),
    aten.rsqrt.default: (lambda x: _one(x) / _tir().sqrt(x), False),
    aten.reciprocal.default: (lambda x: _one(x) / x, False),
    aten.abs.default: (lambda x: _tir().abs(x), False),
    aten.relu.default: (lambda x: _nan_or(x, _tir().max(x, _tir().const(0.0, _dtype(x)))), False),
    aten.sigmoid.default: (_sigmoid, True),
    aten.silu.default: (lambda x: x / (_one(x) + _exp(-x)), True),
    aten.tanh.default: (_tanh, True),
    aten.erf.default: (_erf, True),
    aten.sin.default: (lambda x: _tir().sin(x), True),
    aten.cos.default: (lambda x: _tir().cos(x), True),
}
for _target, (_fn, _expensive) in _UNARY.items():
    _HANDLERS[_target] = _unary(_fn, _expensive)


@_handles(aten.gelu.default)
def _gelu(b: _Builder, node: fx.Node, x: _Value, approximate: str = "none") -> _Value:
    tirx = _tir()

    def erf_form(v: Any) -> Any:
        half = tirx.const(0.5, _dtype(v))
        return half * v * (_one(v) + _erf(v * tirx.const(_SQRT1_2, _dtype(v))))

    def tanh_form(v: Any) -> Any:
        half = tirx.const(0.5, _dtype(v))
        inner = tirx.const(_GELU_BETA, _dtype(v)) * (v + tirx.const(0.044715, _dtype(v)) * v * v * v)
        return half * v * (_one(v) + _tanh(inner))

    if approximate not in ("none", "tanh"):
        raise Unsupported(f"{node.name}: gelu approximate={approximate!r}")
    return b.elementwise(node, tanh_form if approximate == "tanh" else erf_form, x, expensive=True)


def _with_alpha(alpha: Any) -> Callable[[Any], Any]:
    if alpha is None or (isinstance(alpha, (int, float)) and alpha == 1):
        return lambda y: y
    return lambda y: y * _scalar(alpha, _dtype(y))


@_handles(aten.add.Tensor, aten.add.Scalar)
def _add(b: _Builder, node: fx.Node, x: Any, y: Any, alpha: Any = 1) -> _Value:
    scale = _with_alpha(alpha)
    return b.elementwise(node, lambda p, q: p + scale(q), x, y)


@_handles(aten.sub.Tensor, aten.sub.Scalar)
def _sub(b: _Builder, node: fx.Node, x: Any, y: Any, alpha: Any = 1) -> _Value:
    scale = _with_alpha(alpha)
    return b.elementwise(node, lambda p, q: p - scale(q), x, y)


@_handles(aten.rsub.Tensor, aten.rsub.Scalar)
def _rsub(b: _Builder, node: fx.Node, x: Any, y: Any, alpha: Any = 1) -> _Value:
    scale = _with_alpha(alpha)
    return b.elementwise(node, lambda p, q: q - scale(p), x, y)


@_handles(aten.mul.Tensor, aten.mul.Scalar)
def _mul(b: _Builder, node: fx.Node, x: Any, y: Any) -> _Value:
    if b.out(node).dtype == torch.bool:
        return b.elementwise(node, lambda p, q: _tir().And(p, q), x, y, compute="bool")
    return b.elementwise(node, lambda p, q: p * q, x, y)


@_handles(aten.div.Tensor, aten.div.Scalar, aten.div.Tensor_mode)
def _div(b: _Builder, node: fx.Node, x: Any, y: Any, rounding_mode: str | None = None) -> _Value:
    if rounding_mode is not None:
        raise Unsupported(f"{node.name}: div with rounding_mode={rounding_mode!r}")
    return b.elementwise(node, lambda p, q: p / q, x, y)


def _int_power(v: Any, e: int) -> Any:
    out = v
    for _ in range(abs(e) - 1):
        out = out * v
    return _one(v) / out if e < 0 else out


@_handles(aten.pow.Tensor_Scalar)
def _pow_scalar(b: _Builder, node: fx.Node, x: Any, e: Any) -> _Value:
    tirx = _tir()
    if isinstance(e, (int, float)) and not isinstance(e, bool):
        if e == 0:
            return b.elementwise(node, _one, x)
        if e == 0.5:
            return b.elementwise(node, tirx.sqrt, x)
        if e == -0.5:
            return b.elementwise(node, lambda v: _one(v) / tirx.sqrt(v), x)
        if float(e).is_integer() and abs(e) <= 4:
            return b.elementwise(node, lambda v: _int_power(v, int(e)), x)
    return b.elementwise(node, lambda v, p: tirx.pow(v, p), x, e, expensive=True)


@_handles(aten.pow.Tensor_Tensor, aten.pow.Scalar)
def _pow(b: _Builder, node: fx.Node, x: Any, e: Any) -> _Value:
    return b.elementwise(node, lambda v, p: _tir().pow(v, p), x, e, expensive=True)


@_handles(aten.maximum.default, aten.minimum.default)
def _max_min(b: _Builder, node: fx.Node, x: Any, y: Any) -> _Value:
    pick = _tir().max if node.target is aten.maximum.default else _tir().min

    def fn(p: Any, q: Any) -> Any:
        return _nan_or(p, _nan_or(q, pick(p, q)))

    return b.elementwise(node, fn, x, y, compute="bool" if b.out(node).dtype == torch.bool else None)


@_handles(aten.clamp.default, aten.clamp.Tensor, aten.clamp_min.default, aten.clamp_max.default, aten.hardtanh.default)
def _clamp(b: _Builder, node: fx.Node, x: Any, lo: Any = None, hi: Any = None) -> _Value:
    tirx = _tir()
    if node.target is aten.clamp_max.default:
        lo, hi = None, lo
    if node.target is aten.hardtanh.default:
        lo = -1.0 if lo is None else lo
        hi = 1.0 if hi is None else hi
    bounds = [v for v in (lo, hi) if v is not None]

    def fn(v: Any, *limits: Any) -> Any:
        limits = list(limits)
        out = v
        if lo is not None:
            out = tirx.max(out, limits.pop(0))
        if hi is not None:
            out = tirx.min(out, limits.pop(0))
        return _nan_or(v, out)

    return b.elementwise(node, fn, x, *bounds)


def _common_compute(*operands: Any) -> str:
    """The opmath dtype of the operands' promoted dtype (ATen's rules: 0-dim tensors and
    Python scalars count less than dimensioned tensors)."""
    probes = []
    for x in operands:
        if isinstance(x, _Value):
            probes.append(torch.empty([1] * len(x.meta), dtype=x.dtype, device="meta"))
        elif isinstance(x, (bool, int, float)):
            probes.append(x)
        else:
            probes.append(0.0 if _dtype(x).startswith("float") else 0)
    if len(probes) == 1:
        return _opmath(probes[0].dtype) if isinstance(probes[0], torch.Tensor) else "float32"
    dtype = torch.result_type(*probes[:2])
    return _opmath(dtype) if dtype in _DTYPES else "float32"


_COMPARISONS = {
    "gt": operator.gt,
    "lt": operator.lt,
    "ge": operator.ge,
    "le": operator.le,
}


def _compare_handler(name: str) -> Callable[..., Any]:
    def handler(b: _Builder, node: fx.Node, x: Any, y: Any) -> _Value:
        tirx = _tir()
        compute = _common_compute(x, y)
        if name == "eq":
            fn = lambda p, q: tirx.EQ(p, q)  # noqa: E731
        elif name == "ne":
            fn = lambda p, q: tirx.NE(p, q)  # noqa: E731
        else:
            fn = _COMPARISONS[name]
        return b.elementwise(node, fn, x, y, compute=compute)

    return handler


for _name in ("gt", "lt", "ge", "le", "eq", "ne"):
    for _overload in ("Tensor", "Scalar"):
        _HANDLERS[getattr(getattr(aten, _name), _overload)] = _compare_handler(_name)


@_handles(aten.logical_not.default, aten.bitwise_not.default)
def _logical_not(b: _Builder, node: fx.Node, x: _Value) -> _Value:
    if x.dtype != torch.bool:
        raise Unsupported(f"{node.name}: {_op_label(node.target)} of a {x.dtype} tensor")
    return b.elementwise(node, lambda v: _tir().Not(v), x, compute="bool")


@_handles(aten.logical_and.default, aten.logical_or.default, aten.bitwise_and.Tensor, aten.bitwise_or.Tensor)
def _logical_binary(b: _Builder, node: fx.Node, x: Any, y: Any) -> _Value:
    if any(isinstance(v, _Value) and v.dtype != torch.bool for v in (x, y)):
        raise Unsupported(f"{node.name}: {_op_label(node.target)} of non-bool tensors")
    is_and = node.target in (aten.logical_and.default, aten.bitwise_and.Tensor)
    fn = (lambda p, q: _tir().And(p, q)) if is_and else (lambda p, q: _tir().Or(p, q))
    return b.elementwise(node, fn, x, y, compute="bool")


@_handles(aten.where.self, aten.where.ScalarSelf, aten.where.ScalarOther, aten.where.Scalar)
def _where(b: _Builder, node: fx.Node, cond: Any, x: Any, y: Any) -> _Value:
    meta = b.out(node)
    c = b.operand(cond, meta.shape, "bool")
    dtype = _DTYPES[meta.dtype]
    xs, ys = b.operand(x, meta.shape, dtype), b.operand(y, meta.shape, dtype)
    costly = any(isinstance(v, _Value) and v.expensive for v in (cond, x, y))

    def load(idx: Sequence[Any]) -> Any:
        return _tir().Select(c(idx), xs(idx), ys(idx))

    return _Value(tuple(meta.shape), b.dims(meta.shape), meta.dtype, load, costly)


@_handles(aten.masked_fill.Scalar, aten.masked_fill.Tensor)
def _masked_fill(b: _Builder, node: fx.Node, x: _Value, mask: Any, value: Any) -> _Value:
    return _where(b, node, mask, value, x)


@_handles(aten._to_copy.default, prims.convert_element_type.default)
def _to_copy(b: _Builder, node: fx.Node, x: _Value, dtype: torch.dtype | None = None, **kwargs: Any) -> _Value:
    meta = b.out(node)
    source = node.args[0].meta.get("val") if isinstance(node.args[0], fx.Node) else None
    if isinstance(source, torch.Tensor) and meta.device != source.device:
        raise Unsupported(f"{node.name}: {_op_label(node.target)} moves the tensor to {meta.device}")
    out_dtype = _DTYPES[meta.dtype]

    def load(idx: Sequence[Any]) -> Any:
        return _cast(x.load(idx), out_dtype)

    return _Value(tuple(meta.shape), b.dims(meta.shape), meta.dtype, load, x.expensive)


@_handles(aten.clone.default, aten.alias.default, aten.lift_fresh_copy.default, aten.detach.default)
def _identity(b: _Builder, node: fx.Node, x: _Value, **kwargs: Any) -> _Value:
    return x


@_handles(aten.scalar_tensor.default, aten.full.default)
def _full(b: _Builder, node: fx.Node, *args: Any, **kwargs: Any) -> _Value:
    value = args[0] if node.target is aten.scalar_tensor.default else args[1]
    meta = b.out(node)
    c = _scalar(value, _DTYPES[meta.dtype])
    return _Value(tuple(meta.shape), b.dims(meta.shape), meta.dtype, lambda idx: c)


@_handles(aten.full_like.default, aten.zeros_like.default, aten.ones_like.default)
def _full_like(b: _Builder, node: fx.Node, x: Any, *args: Any, **kwargs: Any) -> _Value:
    value = {aten.zeros_like.default: 0, aten.ones_like.default: 1}.get(node.target)
    if value is None:
        value = args[0]
    meta = b.out(node)
    c = _scalar(value, _DTYPES[meta.dtype])
    return _Value(tuple(meta.shape), b.dims(meta.shape), meta.dtype, lambda idx: c)


# Views: index rewrites.


@_handles(aten.view.default, aten._unsafe_view.default, aten.reshape.default)
def _view(b: _Builder, node: fx.Node, x: _Value, _shape: Any) -> _Value:
    meta = b.out(node)
    return b.view(node, x, _reshape_map(b, x, tuple(meta.shape)))


def _reshape_map(b: _Builder, x: _Value, out_meta: tuple[Any, ...]) -> Callable[[Sequence[Any]], list[Any]]:
    """The index map of a row-major reshape from x's shape to `out_meta`: dims are matched in
    groups of equal products (size-1 dims dropped); a group merging input dims splits the output
    index with div/mod, one splitting an input dim combines output indices linearly."""
    import sympy
    from tvm import tirx

    def expr(d: Any) -> Any:
        return sympy.Integer(d) if isinstance(d, int) else d.node.expr

    ins = [d for d in range(len(x.meta)) if not _is_one(x.meta[d])]
    outs = [d for d in range(len(out_meta)) if not _is_one(out_meta[d])]
    groups: list[tuple[list[int], list[int]]] = []
    i = j = 0
    mismatch = Unsupported(f"view from {list(x.meta)} to {list(out_meta)}: the sizes do not group")
    while i < len(ins) and j < len(outs):
        gi, go = [ins[i]], [outs[j]]
        pi, po = expr(x.meta[ins[i]]), expr(out_meta[outs[j]])
        i, j = i + 1, j + 1
        while not _equal(pi, po):
            if _less(pi, po):
                if i == len(ins):
                    raise mismatch
                gi.append(ins[i])
                pi *= expr(x.meta[ins[i]])
                i += 1
            else:
                if j == len(outs):
                    raise mismatch
                go.append(outs[j])
                po *= expr(out_meta[outs[j]])
                j += 1
        groups.append((gi, go))
    if i < len(ins) or j < len(outs):
        raise mismatch
    out_dims = b.dims(out_meta)
    in_dims = x.dims

    def index_map(idx: Sequence[Any]) -> list[Any]:
        result: list[Any] = [0] * len(x.meta)
        for gi, go in groups:
            if len(gi) == 1 and len(go) == 1:
                result[gi[0]] = idx[go[0]]
                continue
            linear = idx[go[0]]
            for d in go[1:]:
                linear = linear * out_dims[d] + idx[d]
            for d in reversed(gi[1:]):
                result[d] = tirx.floormod(linear, in_dims[d])
                linear = tirx.floordiv(linear, in_dims[d])
            result[gi[0]] = linear
        return result

    return index_map


def _equal(a: Any, b: Any) -> bool:
    import sympy

    return bool(a == b) or sympy.simplify(a - b) == 0


def _less(a: Any, b: Any) -> bool:
    """a < b for positive size products; a symbolic factor counts as larger than any constant
    (export assumes sizes of at least 2, and a view that needs more is declined)."""
    import sympy

    ratio = sympy.simplify(b / a)
    if ratio.is_number:
        return bool(ratio > 1)
    num, den = sympy.fraction(ratio)
    if num.free_symbols and not den.free_symbols:
        return True
    if den.free_symbols and not num.free_symbols:
        return False
    raise Unsupported(f"view between sizes {a} and {b}: cannot order them")


@_handles(aten.unsqueeze.default)
def _unsqueeze(b: _Builder, node: fx.Node, x: _Value, dim: int) -> _Value:
    d = _normalize_dim(dim, len(x.meta) + 1)
    return b.view(node, x, lambda idx: idx[:d] + idx[d + 1 :])


@_handles(aten.squeeze.dim, aten.squeeze.dims, aten.squeeze.default)
def _squeeze(b: _Builder, node: fx.Node, x: _Value, dims: Any = None) -> _Value:
    rank = len(x.meta)
    if dims is None:
        dims = list(range(rank))
    dims = [dims] if isinstance(dims, int) else list(dims)
    removed = {_normalize_dim(d, rank) for d in dims if _is_one(x.meta[_normalize_dim(d, rank)])}

    def index_map(idx: Sequence[Any]) -> list[Any]:
        it = iter(idx)
        return [0 if d in removed else next(it) for d in range(rank)]

    return b.view(node, x, index_map)


@_handles(aten.expand.default)
def _expand(b: _Builder, node: fx.Node, x: _Value, _sizes: Any, implicit: bool = False) -> _Value:
    meta = b.out(node)
    load = _broadcast(x, tuple(meta.shape))
    return _Value(tuple(meta.shape), b.dims(meta.shape), x.dtype, load, x.expensive)


@_handles(aten.permute.default)
def _permute(b: _Builder, node: fx.Node, x: _Value, perm: Sequence[int]) -> _Value:
    rank = len(x.meta)
    perm = [_normalize_dim(p, rank) for p in perm]

    def index_map(idx: Sequence[Any]) -> list[Any]:
        result: list[Any] = [0] * rank
        for d, p in enumerate(perm):
            result[p] = idx[d]
        return result

    return b.view(node, x, index_map)


@_handles(aten.transpose.int)
def _transpose(b: _Builder, node: fx.Node, x: _Value, d0: int, d1: int) -> _Value:
    rank = len(x.meta)
    d0, d1 = _normalize_dim(d0, rank), _normalize_dim(d1, rank)

    def index_map(idx: Sequence[Any]) -> list[Any]:
        idx = list(idx)
        idx[d0], idx[d1] = idx[d1], idx[d0]
        return idx

    return b.view(node, x, index_map)


@_handles(aten.t.default)
def _t(b: _Builder, node: fx.Node, x: _Value) -> _Value:
    if len(x.meta) < 2:
        return x
    return b.view(node, x, lambda idx: [idx[1], idx[0]])


def _start(b: _Builder, x: _Value, dim: int, start: Any) -> Any:
    """A slice start or select index as TIR: negative ones count from the end, clamped as
    Python slices are when the size is static."""
    start = 0 if start is None else start
    if not isinstance(start, int):
        return b.dim(start) if isinstance(start, torch.SymInt) else start
    size = x.meta[dim]
    if isinstance(size, int):
        return range(size)[start:].start if start >= -size else 0
    return start if start >= 0 else b.dims([size])[0] + start


@_handles(aten.slice.Tensor)
def _slice(
    b: _Builder, node: fx.Node, x: _Value, dim: int = 0, start: Any = None, end: Any = None, step: int = 1
) -> _Value:
    d = _normalize_dim(dim, len(x.meta))
    if not isinstance(step, int) or step < 1:
        raise Unsupported(f"{node.name}: slice with step {step}")
    offset = _start(b, x, d, start)

    def index_map(idx: Sequence[Any]) -> list[Any]:
        idx = list(idx)
        idx[d] = idx[d] * step + offset if step != 1 else idx[d] + offset
        return idx

    return b.view(node, x, index_map)


@_handles(aten.select.int)
def _select(b: _Builder, node: fx.Node, x: _Value, dim: int, index: Any) -> _Value:
    d = _normalize_dim(dim, len(x.meta))
    i = _start(b, x, d, index)
    return b.view(node, x, lambda idx: list(idx[:d]) + [i] + list(idx[d:]))


@_handles(aten.split.Tensor, aten.split_with_sizes.default)
def _split(b: _Builder, node: fx.Node, x: _Value, sizes: Any, dim: int = 0) -> list[_Value]:
    d = _normalize_dim(dim, len(x.meta))
    metas = b.out(node)
    parts, offset = [], 0
    for meta in metas:
        off = offset

        def index_map(idx: Sequence[Any], off: Any = off) -> list[Any]:
            idx = list(idx)
            idx[d] = idx[d] + off
            return idx

        parts.append(b.view(node, x, index_map, meta=meta))
        offset = offset + b.dim(meta.shape[d])
    return parts


@_handles(aten.cat.default)
def _cat(b: _Builder, node: fx.Node, tensors: Sequence[Any], dim: int = 0) -> _Value:
    tirx = _tir()
    meta = b.out(node)
    rank = len(meta.shape)
    d = _normalize_dim(dim, rank)
    if not all(isinstance(t, _Value) for t in tensors):
        raise Unsupported(f"{node.name}: cat of non-tensors")
    # ATen lets a 1-d empty tensor join a cat of any rank; it contributes nothing.
    parts = [t for t in tensors if not (len(t.meta) == 1 and t.meta[0] == 0)]
    if any(len(t.meta) != rank for t in parts):
        raise Unsupported(f"{node.name}: cat of tensors of different ranks")
    if any(t.dtype != meta.dtype for t in parts):
        raise Unsupported(f"{node.name}: cat of mixed dtypes")
    offsets, offset = [], 0
    for t in parts:
        offsets.append(offset)
        offset = offset + t.dims[d]

    def load(idx: Sequence[Any]) -> Any:
        idx = list(idx)
        # The last part needs no test; each earlier one is taken below its end. if_then_else
        # evaluates only the branch it takes, so no part is read out of its bounds.
        value = parts[-1].load(idx[:d] + [idx[d] - offsets[-1]] + idx[d + 1 :])
        for t, off in zip(reversed(parts[:-1]), reversed(offsets[:-1])):
            inner = t.load(idx[:d] + [idx[d] - off] + idx[d + 1 :])
            value = tirx.if_then_else(idx[d] < off + t.dims[d], inner, value)
        return value

    return _Value(tuple(meta.shape), b.dims(meta.shape), meta.dtype, load, any(t.expensive for t in parts))


# Reductions over the last dim.


def _reduced_dims(node: fx.Node, x: _Value, dims: Any) -> None:
    rank = len(x.meta)
    if dims is None or (isinstance(dims, (list, tuple)) and len(dims) == 0):
        dims = list(range(rank))
    dims = [dims] if isinstance(dims, int) else list(dims)
    normalized = sorted({_normalize_dim(d, rank) for d in dims})
    if rank == 0 or normalized != [rank - 1]:
        raise Unsupported(
            f"{node.name}: {_op_label(node.target)} reduces dims {list(dims)} of a rank-{rank} tensor; "
            "TVM regions reduce the last dim only"
        )


@_handles(aten.sum.dim_IntList, aten.mean.dim, aten.amax.default, aten.amin.default)
def _sum_like(
    b: _Builder, node: fx.Node, x: _Value, dims: Any = None, keepdim: bool = False, dtype: Any = None
) -> _Value:
    _reduced_dims(node, x, dims)
    meta = b.out(node)
    kind = {aten.amax.default: "max", aten.amin.default: "min"}.get(node.target, "sum")
    acc = _opmath(meta.dtype)  # max/min are exact in fp32 too
    stage = b.reduce(node, x, kind, acc, _op_name(node.target))
    if node.target is aten.mean.dim:
        n = _size_as(x.dims[-1], acc)
        return b.row_value(meta, x, lambda i: stage(*i) / n)
    return b.row_value(meta, x, lambda i: stage(*i))


def _mean_stage(b: _Builder, node: fx.Node, x: _Value, acc: str) -> Callable[[Sequence[Any]], Any]:
    stage = b.reduce(node, x, "sum", acc, "sum")
    n = _size_as(x.dims[-1], acc)
    return lambda i: stage(*i) / n


def _size_as(n: Any, dtype: str) -> Any:
    """A size (int or TIR) as a `dtype` scalar."""
    return _tir().const(float(n), dtype) if isinstance(n, int) else _cast(n, dtype)


def _variance(b: _Builder, node: fx.Node, x: _Value, correction: Any, acc: str) -> tuple[Callable[..., Any], ...]:
    """(var(row), mean(row)) by two passes over the row: the mean, then the squared deviations."""
    mean = _mean_stage(b, node, x, acc)
    m2 = b.reduce(node, x, "sum", acc, "m2", prologue=lambda v, i: (v - mean(i)) * (v - mean(i)))
    n = x.dims[-1]
    c = 1 if correction is None else correction
    tirx = _tir()
    if isinstance(n, int):
        denom = tirx.const(float(max(n - c, 0)), acc)
    else:
        denom = tirx.max(n - int(c), 0).astype(acc)
    return (lambda i: m2(*i) / denom), mean


@_handles(aten.var.correction, aten.var_mean.correction, aten.std.correction)
def _var(
    b: _Builder, node: fx.Node, x: _Value, dims: Any = None, *, correction: Any = None, keepdim: bool = False
) -> Any:
    _reduced_dims(node, x, dims)
    if not isinstance(correction, (int, float, type(None))):
        raise Unsupported(f"{node.name}: symbolic correction")
    var_meta = b.out(node, 0) if node.target is aten.var_mean.correction else b.out(node)
    acc = _opmath(x.dtype)
    var, mean = _variance(b, node, x, correction, acc)
    if node.target is aten.std.correction:
        return b.row_value(var_meta, x, lambda i: _tir().sqrt(var(i)))
    out = b.row_value(var_meta, x, var)
    if node.target is aten.var_mean.correction:
        return (out, b.row_value(b.out(node, 1), x, mean))
    return out


@_handles(aten._softmax.default, aten._log_softmax.default)
def _softmax(b: _Builder, node: fx.Node, x: _Value, dim: int, half_to_float: bool) -> _Value:
    """softmax = exp(x - max) / sum, with exp(x - max) a row-local stage computed once (read by
    the sum and the output); log_softmax = x - max - log(sum(exp(x - max)))."""
    _reduced_dims(node, x, [dim])
    meta = b.out(node)
    out_dtype = _DTYPES[meta.dtype]
    acc = _opmath(x.dtype)
    if x.expensive:  # read twice (max, exp): compute it once
        x = b.materialize(x, "softmax_in")
    row_max = b.reduce(node, x, "max", acc, "amax")
    lead = len(x.dims) - 1

    def shifted(idx: Sequence[Any]) -> Any:
        return _cast(x.load(idx), acc) - row_max(*list(idx)[:lead])

    if node.target is aten._log_softmax.default:
        total = b.reduce(node, x, "sum", acc, "sumexp", prologue=lambda v, i: _exp(v - row_max(*i)))

        def log_softmax(idx: Sequence[Any]) -> Any:
            return _cast(shifted(idx) - _tir().log(total(*list(idx)[:lead])), out_dtype)

        return _Value(tuple(meta.shape), b.dims(meta.shape), meta.dtype, log_softmax, True)
    acc_dtype = torch.float64 if acc == "float64" else torch.float32
    exps = b.materialize(_Value(x.meta, x.dims, acc_dtype, lambda idx: _exp(shifted(idx)), True), "exp")
    total = b.reduce(node, exps, "sum", acc, "sumexp")

    def softmax(idx: Sequence[Any]) -> Any:
        # As ATen's CPU kernel: one reciprocal per row, a product per element.
        row_total = total(*list(idx)[:lead])
        return _cast(exps.load(idx) * (_one(row_total) / row_total), out_dtype)

    return _Value(tuple(meta.shape), b.dims(meta.shape), meta.dtype, softmax)


@_handles(aten.native_layer_norm.default)
def _layer_norm(
    b: _Builder, node: fx.Node, x: _Value, shape: Sequence[Any], weight: Any, bias: Any, eps: Any
) -> tuple[_Value, ...]:
    if len(shape) != 1:
        raise Unsupported(f"{node.name}: layer norm over {len(shape)} dims; TVM regions normalize the last dim only")
    out_meta, mean_meta, rstd_meta = b.out(node)
    acc = _opmath(x.dtype)
    tirx = _tir()
    var, mean = _variance(b, node, x, 0, acc)
    lead = len(x.dims) - 1
    eps_expr = _scalar(eps, acc)

    def rstd(i: Sequence[Any]) -> Any:
        return _one(var(i)) / tirx.sqrt(var(i) + eps_expr)

    w = b.operand(weight, x.meta, acc) if weight is not None else None
    bb = b.operand(bias, x.meta, acc) if bias is not None else None

    def normalized(idx: Sequence[Any]) -> Any:
        i = list(idx)[:lead]
        y = (_cast(x.load(idx), acc) - mean(i)) * rstd(i)
        if w is not None:
            y = y * w(idx)
        if bb is not None:
            y = y + bb(idx)
        return _cast(y, _DTYPES[out_meta.dtype])

    out = _Value(tuple(out_meta.shape), b.dims(out_meta.shape), out_meta.dtype, normalized)
    return (out, b.row_value(mean_meta, x, mean), b.row_value(rstd_meta, x, rstd))


_REDUCTIONS = {
    aten.sum.dim_IntList,
    aten.mean.dim,
    aten.amax.default,
    aten.amin.default,
    aten.var.correction,
    aten.var_mean.correction,
    aten.std.correction,
    aten._softmax.default,
    aten._log_softmax.default,
    aten.native_layer_norm.default,
}


# Host schedule ----------------------------------------------------------------------------------


def _vector_lanes(meta: Sequence[Any], lanes: int) -> int:
    """Lanes for the innermost (flattened) loop of a stage of shape `meta`: a power of two that
    divides its static trailing extent, so that no vector loop needs a tail."""
    return math.gcd(_trailing_static(meta), lanes) if meta else 1


def _worth_parallel(meta: Sequence[Any], program: _Program) -> bool:
    numel = _static_numel(meta)
    return numel is None or (program.transcendental and numel >= _PARALLEL_MIN_ELEMENTS)


def _schedule_host(program: _Program, lanes: int) -> tuple[Any, str]:
    """The scheduled PrimFunc and which schedule it got: "row" (reductions fused per row),
    "pointwise" (outputs of a shape share a loop) or "flat" (each stage its own loop nest, for
    regions the others do not fit)."""
    from tvm.s_tir import ScheduleError

    try:
        if program.lead is not None:
            return _schedule_host_rows(program, lanes), "row"
        return _schedule_host_pointwise(program, lanes), "pointwise"
    except (ScheduleError, _NoRowSchedule):
        return _schedule_host_flat(program, lanes), "flat"


class _NoRowSchedule(Exception):
    """The stages do not share one row loop; schedule each on its own."""


def _flatten_and_split(sch: Any, block: Any, meta: Sequence[Any], lanes: int, skip: int = 0) -> tuple[Any, Any] | None:
    """Fuse the loops of `block` after the first `skip` (they cover the dims `meta`) and split
    the fused loop by its vector lanes: (outer, inner), inner None when there are no lanes or
    the loop is exactly one vector (then the fused loop is the vector); None without loops."""
    loops = sch.get_loops(block)[skip:]
    if not loops:
        return None
    loop = sch.fuse(*loops) if len(loops) > 1 else loops[0]
    vec = _vector_lanes(meta, lanes)
    if vec > 1 and _static_numel(meta) != vec:
        outer, inner = sch.split(loop, [None, vec])
        return outer, inner
    return loop, None


def _vectorize_flat(sch: Any, outer: Any, inner: Any, meta: Sequence[Any], lanes: int) -> None:
    """Vectorize what `_flatten_and_split` made of a stage of shape `meta`."""
    if inner is not None:
        sch.vectorize(inner)
    elif _static_numel(meta) == _vector_lanes(meta, lanes) > 1:
        sch.vectorize(outer)


def _schedule_host_pointwise(program: _Program, lanes: int) -> Any:
    from tvm import s_tir

    sch = s_tir.Schedule(program.func)
    groups: list[list[_Stage]] = []
    for stage in program.stages:
        for group in groups:
            if _same_shape(group[0].meta, stage.meta):
                group.append(stage)
                break
        else:
            groups.append([stage])
    for group in groups:
        meta = group[0].meta
        split = [_flatten_and_split(sch, sch.get_sblock(stage.name), meta, lanes) for stage in group]
        if any(loops is None for loops in split):
            continue  # 0-dim outputs: one element each
        # One loop for all outputs of this shape: each element's inputs are read once. The
        # outputs' loops are split alike, so the outer ones have one extent.
        outer = sch.merge(*[o for o, _ in split]) if len(split) > 1 else split[0][0]
        if split[0][1] is None:
            _vectorize_flat(sch, outer, None, meta, lanes)
        else:
            for stage in group:
                sch.vectorize(sch.get_loops(sch.get_sblock(stage.name))[-1])
        if _worth_parallel(meta, program):
            sch.parallel(outer)
    return sch.mod["main"]


def _schedule_host_rows(program: _Program, lanes: int) -> Any:
    from tvm import s_tir

    sch = s_tir.Schedule(program.func)
    lead = program.lead
    n_lead = len(lead)
    # How many leading dims of each stage make up the rows (the rows may be viewed: [b, s, n]
    # rows of [b, s] are the rows of its [b*s, n] view too).
    prefix = {s.name: _row_prefix(s.meta, lead) for s in program.stages}
    # Outputs over the rows run in the row loop; others (a weight's transpose fused along) keep
    # a loop nest of their own, which works as long as they read no row stage.
    outputs = [s for s in program.stages if s.role == "output" and prefix[s.name] is not None]
    others = [s for s in program.stages if s.role == "output" and prefix[s.name] is None]
    inner = [s for s in program.stages if s.role != "output"]
    if not outputs or any(prefix[s.name] is None for s in inner):
        raise _NoRowSchedule()
    if any(not _same_shape(s.meta, lead) for s in inner if s.role == "reduction"):
        raise _NoRowSchedule()
    # Reductions as `lanes` partial results side by side (one vector register), then combined.
    partials: dict[str, tuple[Any, bool]] = {}
    for s in inner:
        if s.role != "reduction" or s.n is None:
            continue
        vec = math.gcd(s.n, lanes)
        if vec <= 1:
            continue
        k = sch.get_loops(sch.get_sblock(s.name))[-1]
        split = s.n > vec
        k_lane = sch.split(k, [None, vec])[1] if split else k
        partials[s.name] = (sch.rfactor(k_lane, factor_axis=0), split)
    if n_lead == 0:
        row = None
    else:
        rows = []
        for s in outputs:
            loops = sch.get_loops(sch.get_sblock(s.name))[: prefix[s.name]]
            rows.append(sch.fuse(*loops) if len(loops) > 1 else loops[0])
        row = sch.merge(*rows) if len(rows) > 1 else rows[0]
        # Producers move into the row loop consumers first, so each finds its consumers there.
        for s in reversed(inner):
            sch.compute_at(sch.get_sblock(s.name), row)
            if s.name in partials:
                sch.compute_at(partials[s.name][0], row)
    skip = 1 if n_lead else 0
    for name, (partial, split) in partials.items():
        loops = sch.get_loops(partial)[skip:]
        if split:
            k_lane, k_outer = loops[-2], loops[-1]
            sch.reorder(k_outer, k_lane)
        else:
            k_lane = loops[-1]
        sch.vectorize(k_lane)
    for s in program.stages:
        if s.role == "reduction" or s in others:
            continue
        rest = s.meta[prefix[s.name]:]
        loops = _flatten_and_split(sch, sch.get_sblock(s.name), rest, lanes, skip=skip) if rest else None
        if loops is not None:
            _vectorize_flat(sch, *loops, rest, lanes)
    if row is not None and _worth_parallel(outputs[0].meta, program):
        sch.parallel(row)
    for s in others:
        loops = _flatten_and_split(sch, sch.get_sblock(s.name), s.meta, lanes)
        if loops is not None:
            _vectorize_flat(sch, *loops, s.meta, lanes)
            if _worth_parallel(s.meta, program):
                sch.parallel(loops[0])
    return sch.mod["main"]


def _row_prefix(meta: Sequence[Any], lead: Sequence[Any]) -> int | None:
    """The number k >= 1 of leading dims of `meta` whose product is the row count of `lead`
    (the first such k), or None; 0 for `lead` = () (no rows)."""
    import sympy

    if not lead:
        return 0

    def expr(d: Any) -> Any:
        return sympy.Integer(d) if isinstance(d, int) else d.node.expr

    rows = math.prod((expr(d) for d in lead), start=sympy.Integer(1))
    product = sympy.Integer(1)
    for k, d in enumerate(meta, start=1):
        product *= expr(d)
        if _equal(product, rows):
            return k
    return None


def _schedule_host_flat(program: _Program, lanes: int) -> Any:
    """Every stage its own loop nest at the root: parallel over its (fused) spatial loops,
    spatial stages vectorized. Slower (intermediates round-trip through memory) but takes any
    region."""
    from tvm import s_tir

    sch = s_tir.Schedule(program.func)
    for s in program.stages:
        block = sch.get_sblock(s.name)
        if s.role == "reduction":
            loops = sch.get_loops(block)[:-1]
            if loops:
                row = sch.fuse(*loops) if len(loops) > 1 else loops[0]
                if _worth_parallel(s.meta, program):
                    sch.parallel(row)
            continue
        loops = _flatten_and_split(sch, block, s.meta, lanes)
        if loops is None:
            continue
        _vectorize_flat(sch, *loops, s.meta, lanes)
        if _worth_parallel(s.meta, program):
            sch.parallel(loops[0])
    return sch.mod["main"]


def _header(program: _Program, comment: str = "#") -> str:
    """The region's ATen code as a comment, for a kernel source read on its own."""
    code = program.region.code.strip().splitlines()
    lines = [f"{comment} TVM kernel {program.name} for a {getattr(program.region, 'kind', '')} region:"]
    lines += [f"{comment}   {line}" for line in code if line.strip()]
    return "\n".join(lines) + "\n"


def _host_runner(program: _Program, built: Callable[..., Any]) -> Callable[..., Any]:
    tensor_inputs, scalar_inputs = program.tensor_inputs, program.scalar_inputs
    symbols = list(program.symbols.items())
    outputs = program.outputs
    tuple_output = program.tuple_output
    scalar_symbols = list(program.scalar_symbols.items())
    static_shapes = None if symbols or scalar_symbols else [[fn({}) for fn in shape] for shape, _ in outputs]

    def run(*args: Any) -> Any:
        tensors = [as_kernel_input(args[i]) for i in tensor_inputs]
        if static_shapes is not None:
            shapes = static_shapes
        else:
            env = {name: int(args[pos].shape[d]) for name, (pos, d) in symbols}
            env.update((name, int(args[pos])) for name, pos in scalar_symbols)
            shapes = [[fn(env) for fn in shape] for shape, _ in outputs]
        outs = [torch.empty(shape, dtype=dtype) for shape, (_, dtype) in zip(shapes, outputs)]
        built(*tensors, *outs, *(_scalar_arg(args[i]) for i in scalar_inputs))
        for i, order in layouts:
            outs[i] = torch.empty_permuted(outs[i].shape, order, dtype=outs[i].dtype).copy_(outs[i])
        return tuple(outs) if tuple_output else outs[0]

    layouts = [(i, order) for i, order in enumerate(_eager_layouts(program.region)) if order is not None]
    return run


def _eager_layouts(region: Any) -> list[tuple[int, ...] | None]:
    """Per region output, the dim order (outermost first) of the layout eager gives it when
    that is a dense permutation other than contiguous (e.g. rotary q kept transposed), else
    None. Later ops were traced against those strides (a `view` may depend on them), so the
    runner hands outputs back in them; the kernel itself writes contiguously."""
    out = region.graph.output_node().args[0]
    nodes = out if isinstance(out, (tuple, list)) else [out]
    return [_dim_order(n.meta.get("val") if isinstance(n, torch.fx.Node) else None) for n in nodes]


def _dim_order(val: Any) -> tuple[int, ...] | None:
    if not isinstance(val, torch.Tensor) or val.dim() < 2:
        return None
    from torch.fx.experimental.symbolic_shapes import optimization_hint

    # The order of a dense layout comes from the ops, not the sizes, so the traced sizes (hints)
    # tell it for every size; `int()` of a SymInt would instead guard on (specialize) the size.
    try:
        sizes = [optimization_hint(d) for d in val.shape]
        strides = [optimization_hint(d) for d in val.stride()]
    except (TypeError, ValueError, AssertionError):  # an unbacked size has no hint
        return None
    if strides == list(torch.empty(sizes, device="meta").stride()):
        return None
    order = tuple(sorted(range(len(sizes)), key=lambda d: -strides[d]))
    probe = torch.empty_permuted(sizes, order, device="meta")
    same = all(a == b or n == 1 for a, b, n in zip(probe.stride(), strides, sizes))
    return order if same else None


def _scalar_arg(v: Any) -> Any:
    return float(v) if isinstance(v, float) else int(v)


# CUDA -------------------------------------------------------------------------------------------


def _lower_for_cuda(program: _Program, tvm_target: str, target: Any) -> Kernel:
    """CUDA C of the first GPU schedule TVM generates code for (dlight's rules, then a manual
    binding), headed by the region's ATen code; the TVMScript when neither goes through."""
    failures = []
    scheduled = None
    for how, schedule in (("dlight", _schedule_cuda_dlight), ("manual thread binding", _schedule_cuda_manual)):
        try:
            scheduled = schedule(program, target)
            source = device_source(scheduled, tvm_target, program.name)
        except Exception as exc:  # noqa: BLE001 - a declined rule or a toolchain failure: next
            message = str(exc).strip()
            failures.append(f"{how}: {message.splitlines()[-1] if message else type(exc).__name__}")
            continue
        source = _header(program, "//") + source
        return Kernel(program.name, "tvm", source, note=f"{_NOT_RUN}; scheduled by {how}", language="cuda")
    text = _header(program) + (scheduled if scheduled is not None else program.func).script()
    return Kernel(program.name, "tvm", text, note=f"{_NOT_RUN}; CUDA codegen failed here ({'; '.join(failures)})")


def _schedule_cuda_dlight(program: _Program, target: Any) -> Any:
    """dlight's default GPU rules: thread binding for spatial stages, cross-thread reductions
    with the row in shared memory for softmax/norm-like ones."""
    import tvm
    from tvm.s_tir import dlight as dl

    mod = tvm.IRModule({"main": program.func})
    with target:
        rules = dl.ApplyDefaultSchedule(dl.gpu.Reduction(), dl.gpu.GeneralReduction(), dl.gpu.Fallback())
        mod = rules(mod)
    return mod["main"]


def _schedule_cuda_manual(program: _Program, target: Any = None) -> Any:
    """Every stage its own kernel: spatial stages flattened over blocks of `_CUDA_THREADS`
    threads, reductions one block per row with the reduced dim across the block's threads."""
    from tvm import s_tir

    sch = s_tir.Schedule(program.func)
    for s in program.stages:
        block = sch.get_sblock(s.name)
        loops = sch.get_loops(block)
        if s.role == "reduction":
            spatial, k = loops[:-1], loops[-1]
            if spatial:
                row = sch.fuse(*spatial) if len(spatial) > 1 else spatial[0]
                sch.bind(row, "blockIdx.x")
            _, k_thread = sch.split(k, [None, _CUDA_THREADS])
            sch.bind(k_thread, "threadIdx.x")
            continue
        if not loops:
            loops = [sch.add_unit_loop(block)]
        loop = sch.fuse(*loops) if len(loops) > 1 else loops[0]
        outer, inner = sch.split(loop, [None, _CUDA_THREADS])
        sch.bind(outer, "blockIdx.x")
        sch.bind(inner, "threadIdx.x")
    return sch.mod["main"]
