"""The TVM lowering of `compiler::shiftadd_linear`: ShiftAddLLM's lookup-table matmul, for the
host.

Part of the codegen step (capture -> passes -> codegen -> compiled module). The op is a linear
layer whose weight is stored as q planes of packed signs, a factor per plane, row and group of
G inputs (a uint8 code of (1 + m / 8) * 2**k) and a scale per row (`compiler.ops.shift_add`
fixes the format and gives the algorithm in torch, `lookup_linear`). Its point is decode (a
GEMV, one row of x): a model's fp32 weights do not stay in cache, and the packed ones are ~10x
fewer bytes at 3 bits. The kernel reads them as stored and never expands a weight to a float:

- tables: for each row of x and each chunk of 8 inputs, the 256 signed sums
  T[p] = sum_j (bit j of p ? +x_j : -x_j) in fp32 (`lookup_tables`). Entries 0..7 are
  2 (the set bits' x among x0..x2) - sum(x), one vector; then, for j = 3..7, entries
  2**j .. 2**(j+1) - 1 are the first 2**j plus 2 x_j: one vector add per 8 entries;
- lookups: output n is, per plane i and group g, the sum over the group's chunks c of
  T_c[planes[i, n, c]] (a byte load and an add with a memory operand: LLVM's code is those two
  instructions per lookup, ~1 cycle on the host), times the group's factor, summed over planes
  and groups, times row_scale[n]. The factor is built from its code's bits, (c << 20) + (96 << 23)
  (`_factor`): exact, one integer add and shift, and one FMA per group. A group's chunks go to
  `_PARTIALS` independent sums, as a scalar FP add chain would otherwise wait on its latency;
- blocking: a table is 1 KiB per chunk (72 KiB at K = 576, 192 KiB at K = 1536), past the
  32 KiB L1, and a lookup then costs an L2 line: an early version that walked each output's
  whole row ran at ~2-3 cycles a lookup. The lookups go group by group for a tile of `_ROWS`
  outputs instead: one group's tables (16 KiB at G = 128) are read from L1 by the tile's
  outputs x planes x chunks lookups before the next group's are touched, and the tile's
  accumulators stay on the stack.

The tiles are the work items; the runner runs them on the calling thread, or on TVM's thread
pool from `_PARALLEL_FROM` lookups a call: a decode step's linear layers sit between ATen ops
whose OpenMP workers spin after each op, and TVM's pool then waits for cores it does not get
(as `kv_quant_attention` found). The tables are built first, on the calling thread (~1% of the
lookups' time), and shared by every tile. With several rows of x (M > 1),
each row has its tables and a tile walks its groups once per row (its packed bytes stay in
L1/L2 meanwhile).

M (every leading dim of x flattened) and q are symbolic TIR vars, so one build serves every
batch and bit count; N, K and the group count are fixed per build. The kernel reads x and
writes y in fp32: 16-bit x is widened by the runner (exact) and y rounded to x's dtype, as the
reference does. The plane loop is not unrolled on purpose: with the planes of a build unrolled,
the output loop becomes innermost and LLVM's loop vectorizer turns it into 8-lane "gathers" of
scalar loads and inserts, ~4x slower.

What the kernel does not take falls back to the op's reference (expand the weight to fp32 and
matmul): at lowering time (`Unsupported`: x other than fp32/fp16/bf16, weights of other dtypes,
symbolic or inconsistent shapes, q outside 1..4, a static M above `_MAX_ROWS` (a prefill: the
kernel's time grows with M where the reference's dense matmul barely does; its expansion of the
weight is amortized over the rows), non-CPU tensors, targets other than `llvm`) or at run time,
in the runner: M = 0 or above `_MAX_ROWS`, tensors whose shapes, dtypes or device the build does
not take (the reference raises the op's error where they are inconsistent).
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any, Callable

import torch

from compiler.codegen.tvm.attention import _lanes
from compiler.codegen.tvm.build import BuiltFunction, as_kernel_input, build_primfunc, parse_target
from compiler.errors import Unsupported
from compiler.ops.registry import Kernel, LoweringRequest
from compiler.ops.shift_add import BITS, check_weight, shiftadd_linear

# Output rows per work item: a group's tables are read from L1 by this many rows' lookups
# before the next group's are loaded (fewer rows: more of each table line per lookup; more:
# fewer items than threads at N = 192).
_ROWS = 32
# Independent partial sums per (row, plane, group): the lookups of one chain wait on the FP add
# latency (3 cycles) where loads allow ~1.5 lookups per cycle.
_PARTIALS = 4
# Rows of x up to which the kernel runs (tables of 1 KiB per chunk for each). Its time grows
# with the rows, the reference's (dominated by expanding W, 4-20 ms for SmolLM2's shapes on the
# 2-core host) hardly: measured on one core, the kernel is >= 1.6x faster up to 32 rows and
# about as fast or slower at 64.
_MAX_ROWS = 32
# Lookups (M * q * N * K / 8) from which the tiles go to TVM's thread pool; below, the calling
# thread runs them (see the module doc). Above any decode call of SmolLM2 (1.2M lookups at most:
# 576 x 1536 at 4 bits): on the shared 2-core host the pool made a decode step's 210 linear
# layers 2x slower than the calling thread (0.8x fp32 F.linear against 1.6x), while a few rows of
# x are ~1 ms of lookups a call, where the pool's fork-join is small and its share of the cores
# decides.
_PARALLEL_FROM = 1 << 21
_ARGS = ("x", "planes", "scales", "row_scale")
# x is read as fp32 (16-bit x widened by the runner, exactly) and y rounded to x's dtype, as the
# reference does.
_X_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_TABLE = 256  # entries per chunk: one per byte of signs
_CHUNK = 8  # inputs per chunk: one byte of signs


@dataclass(frozen=True)
class _Shape:
    """What a build fixes: N, K and the number of input groups (the planes' count q is read
    from the planes, so one build serves every q)."""

    out_features: int  # N
    in_features: int  # K
    groups: int

    @property
    def chunks(self) -> int:
        return self.in_features // _CHUNK

    @property
    def group_chunks(self) -> int:
        return self.chunks // self.groups

    @property
    def name(self) -> str:
        group = self.in_features // self.groups
        return f"shiftadd_linear_float32_n{self.out_features}_k{self.in_features}_g{group}"


@shiftadd_linear.register_lowering("tvm")
def lower_shiftadd_linear(req: LoweringRequest) -> Kernel:
    """The host kernel of one call site; other targets keep the reference."""
    target = parse_target(req.target.tvm_target)
    kind = target.kind.name
    if kind != "llvm":
        raise Unsupported(f"TVM shiftadd_linear has no schedule for target kind {kind!r}")
    shape = _shape(*req.args)
    for name, t in zip(_ARGS, req.args):
        if t.device.type != "cpu":
            raise Unsupported(f"TVM llvm kernel for shiftadd_linear on a {t.device.type} tensor ({name})")
    func = _primfunc(shape)
    source = func.script()
    note = f"lookup tables, tiles of {_ROWS} output features, up to {_MAX_ROWS} rows of x"
    if not req.run_here:
        return Kernel(shape.name, "tvm", source, note=f"{note}; not built: the caller asked for source only")
    built = build_primfunc(func, req.target.tvm_target, shape.name)
    serial = build_primfunc(_primfunc(shape, parallel=False), req.target.tvm_target, f"{shape.name}_serial")
    note += f"; on the calling thread below {_PARALLEL_FROM} lookups"
    return Kernel(shape.name, "tvm", source, runner=_host_runner(shape, built, serial), note=f"{note}; shared library: {built.library}")


def _shape(x: torch.Tensor, planes: torch.Tensor, scales: torch.Tensor, row_scale: torch.Tensor) -> _Shape:
    what = "TVM shiftadd_linear"
    if x.dtype not in _X_DTYPES:
        raise Unsupported(f"{what} takes x in {', '.join(map(str, _X_DTYPES))}, not {x.dtype}")
    if x.dim() == 0:
        raise Unsupported(f"{what} takes x [..., K], not a scalar")
    dims = (x.shape[-1], *planes.shape, *scales.shape, *row_scale.shape)
    if not all(isinstance(d, int) for d in dims):
        raise Unsupported(f"{what} needs static weight shapes and input features (the weights are constants)")
    try:
        check_weight(x, planes, scales, row_scale)
    except ValueError as exc:
        raise Unsupported(f"{what}: {exc}") from exc
    if planes.shape[0] not in BITS:
        raise Unsupported(f"{what} takes {min(BITS)} to {max(BITS)} bit planes, not {planes.shape[0]}")
    rows = 1
    for s in x.shape[:-1]:
        rows = rows * s
    if isinstance(rows, int) and rows > _MAX_ROWS:
        raise Unsupported(f"{what} has a kernel for up to {_MAX_ROWS} rows of x (decode); this call site has {rows}")
    q, n, chunks = planes.shape
    if max(planes.numel(), _MAX_ROWS * chunks * _TABLE) >= 2**31:
        raise Unsupported(f"{what}: a weight of {n} x {chunks * _CHUNK} needs 64-bit indices (the kernel's are int32)")
    return _Shape(n, chunks * _CHUNK, scales.shape[-1])


# The kernel ------------------------------------------------------------------------------------


def _factor(code: Any) -> Any:
    """The group factor of a uint8 scale code c = 8 k + m, (1 + m / 8) * 2**(k - 31), exactly, in
    fp32, from its bits: exponent field k - 31 + 127 and the mantissa's top three bits m, i.e.
    the bits (k + 96) << 23 | m << 20 = (c << 20) + (96 << 23) (every code a normal float)."""
    from tvm import tirx

    bits = tirx.shift_left(code.astype("int32"), 20) + tirx.const(96 << 23, "int32")
    return tirx.reinterpret("float32", bits)


def _table_macro() -> Any:
    """table[m, c, :] = the 256 signed sums of x[m, 8c : 8c + 8] (see the module doc)."""
    from tvm.script import tirx as T

    # Entries 0..7 (the signs of x0..x2) as one vector from the chunk's total, then each next bit
    # j = 3..7 doubles the table: entries 2**j + b are entries b plus 2 x_j, 8 at a time.
    @T.macro
    def build(x, table, m, c):
        total = T.alloc_buffer((1,), "float32")
        total[0] = T.float32(0)
        for j in range(_CHUNK):
            total[0] = total[0] + x[m, c * _CHUNK + j]
        for p in T.vectorized(8):
            table[m, c, p] = (
                x[m, c * _CHUNK] * T.Cast("float32", T.bitwise_and(p, 1))
                + x[m, c * _CHUNK + 1] * T.Cast("float32", T.bitwise_and(T.shift_right(p, 1), 1))
                + x[m, c * _CHUNK + 2] * T.Cast("float32", T.bitwise_and(T.shift_right(p, 2), 1))
            ) * T.float32(2) - total[0]
        for j in T.unroll(5):
            for b in range(T.shift_left(1, j)):
                for p in T.vectorized(8):
                    table[m, c, (T.shift_left(1, j) + b) * 8 + p] = table[m, c, b * 8 + p] + x[m, c * _CHUNK + 3 + j] * T.float32(2)

    return build


def _primfunc(shape: _Shape, parallel: bool = True) -> Any:
    """The PrimFunc (x [M, K], planes, scales, row_scale, y [M, N]); see the module doc.
    `parallel=False` runs the tiles on the calling thread (the tables always are: ~1% of the
    lookups' time, less than a second fork-join of the pool)."""
    from tvm.script import tirx as T

    loop = T.parallel if parallel else T.serial
    N, K, NG = shape.out_features, shape.in_features, shape.groups
    C, CPG = shape.chunks, shape.group_chunks
    R = _ROWS
    TILES = (N + R - 1) // R
    U = min(_PARTIALS, CPG)
    build = _table_macro()
    factor = _factor
    lane_sum = _lanes
    add = operator.add

    @T.prim_func
    def shiftadd_linear(
        x_h: T.handle,
        planes_h: T.handle,
        scales_h: T.handle,
        row_scale: T.Buffer((N,), "float32"),
        y_h: T.handle,
    ):
        T.func_attr({"tir.noalias": True})
        m = T.int32()
        q = T.int32()
        x = T.match_buffer(x_h, (m, K), "float32")
        planes = T.match_buffer(planes_h, (q, N, C), "uint8")
        scales = T.match_buffer(scales_h, (q, N, NG), "uint8")
        y = T.match_buffer(y_h, (m, N), "float32")
        table = T.alloc_buffer((m, C, _TABLE), "float32")
        for mc in range(m * C):
            build(x, table, mc // C, mc % C)
        for t in loop(TILES):
            # accumulators of the tile's outputs, and the partial sums of one plane and group
            acc = T.alloc_buffer((R,), "float32")
            part = T.alloc_buffer((U,), "float32")
            outputs: T.let = T.min(R, N - t * R)
            for row in range(m):
                for r in range(outputs):
                    acc[r] = T.float32(0)
                for g in range(NG):
                    for r in range(outputs):
                        n: T.let = t * R + r
                        for i in range(q):
                            for u in T.unroll(U):
                                part[u] = T.float32(0)
                            for k in T.unroll(CPG):
                                c: T.let = g * CPG + k
                                part[k % U] = part[k % U] + table[row, c, planes[i, n, c]]
                            acc[r] = acc[r] + lane_sum(add, part) * factor(scales[i, n, g])
                for r in range(outputs):
                    y[row, t * R + r] = acc[r] * row_scale[t * R + r]

    return shiftadd_linear


# Running it ------------------------------------------------------------------------------------


def _host_runner(shape: _Shape, kernel: BuiltFunction, serial: BuiltFunction) -> Callable[..., torch.Tensor]:
    """The runner. A decode step makes ~200 of these calls of tens of microseconds each, so it
    does the least torch work it can (each op costs ~1-2 us on the host) and hands the tensors
    to the compiled functions as they are: tvm_ffi takes torch tensors (DLPack, no copy) for a
    fraction of `BuiltFunction`'s conversion (`to_tvm`, which also checks the alignment that
    `as_kernel_input` provides here), ~5 us a call less."""
    n, k = shape.out_features, shape.in_features

    def run(x: torch.Tensor, planes: torch.Tensor, scales: torch.Tensor, row_scale: torch.Tensor) -> torch.Tensor:
        rows = _rows_taken(shape, x, planes, scales, row_scale)
        if not rows:
            return shiftadd_linear.reference(x, planes, scales, row_scale)
        flat = x if x.dim() == 2 else x.reshape(rows, k)
        if x.dtype != torch.float32:
            flat = flat.float()
        y = torch.empty(rows, n)
        run = kernel if rows * planes.shape[0] * n * shape.chunks >= _PARALLEL_FROM else serial
        run.function(as_kernel_input(flat), as_kernel_input(planes), as_kernel_input(scales), as_kernel_input(row_scale), y)
        if x.dim() != 2:
            y = y.view(*x.shape[:-1], n)
        return y if x.dtype == torch.float32 else y.to(x.dtype)

    return run


def _rows_taken(shape: _Shape, x: torch.Tensor, planes: torch.Tensor, scales: torch.Tensor, row_scale: torch.Tensor) -> int:
    """The rows of x (M) when the kernel computes this call; 0 where the reference does (and
    raises the op's errors)."""
    dtypes = (x.dtype in _X_DTYPES, planes.dtype == torch.uint8, scales.dtype == torch.uint8, row_scale.dtype == torch.float32)
    if not all(dtypes) or not (x.is_cpu and planes.is_cpu and scales.is_cpu and row_scale.is_cpu):
        return 0
    if x.dim() == 0 or planes.dim() != 3:
        return 0
    n, k, q = shape.out_features, shape.in_features, planes.shape[0]
    shapes = (x.shape[-1], planes.shape, scales.shape, row_scale.shape)
    if q not in BITS or shapes != (k, (q, n, shape.chunks), (q, n, shape.groups), (n,)):
        return 0
    rows = x.numel() // k
    return rows if rows <= _MAX_ROWS else 0
