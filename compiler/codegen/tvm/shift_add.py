"""The TVM lowering of `compiler::shiftadd_linear`: ShiftAddLLM's lookup-table matmul, for the
host.

Part of the codegen step (capture -> passes -> codegen -> compiled module). The op is a linear
layer whose weight is stored as q planes of packed signs, a factor per plane, output and group
of G inputs (a uint8 code of (1 + m / 8) * 2**k) and a scale per output
(`compiler.ops.shift_add` fixes the format and gives the algorithm in torch, `lookup_linear`).
Its point is decode (a GEMV, one row of x): a model's fp32 weights do not stay in cache, and
the packed ones are ~10x fewer bytes at 3 bits. The kernel reads them as stored and never
expands a weight to a float.

Tables in registers, outputs in lanes. The op's tables hold, per chunk of 8 inputs, the 256
signed sums T[p] = sum_j (bit j of p ? +x_j : -x_j) (`lookup_tables`). Here each is three
tables of 8 fp32 (one AVX2 register each): the signed sums of inputs 0-2, of inputs 3-5 and of
inputs 6-7 (indexed by 3 bits, the top one ignored: its entries repeat), 96 bytes a chunk, so
T[p] = T0[p & 7] + T1[(p >> 3) & 7] + T2[(p >> 6) & 3]. A vector's 8 lanes are 8 consecutive
outputs: per plane, a strided load gathers each output's next word of signs (up to 4 bytes, 4
chunks, `_word_bytes`), and per chunk j of the word three shifts (by 8j, 8j + 3, 8j + 6) and
three vpermps (`_permute`: an 8-entry table lookup per lane by the index's low 3 bits, so no
masking) give the 8 outputs' T[p] in 2 adds; one FMA adds it times the lanes' group factors:
~9 vector instructions per 8 lookups. Measured against 256-entry tables looked up one output
at a time (a byte load and an add with a memory operand per lookup, ~1 cycle each on the
host, and 1 KiB of table per chunk, which had to be blocked to stay in L1): 1.5x faster with
the weights in cache, 1.3-1.45x on a decode step's 210 weights. AVX2's gathers are no faster
than scalar loads on this host (Zen 3: ~8 cycles for 8 elements), and 16-entry nibble tables
with vpshufb would need the sign bytes of 32 outputs side by side, a transposition the format
does not give for free.

Factors and scales. The group factor is built from its code's bits, (c << 20) + (96 << 23)
(`_factor`): exact. A chunk's sums are multiplied by their group's factor, per lane (each
output its own), and added to one of two accumulators per lane block (chunks alternating, so
that consecutive FMAs do not wait on each other); the output scale multiplies the final sum.

Loops and memory. Outputs go in tiles of `_TILE` (a few lane blocks), and within a tile group
by group, so that a group's tables stay in L1 while every block of the tile reads them (a row's
tables are 18 KiB at K = 1536). A decode step streams its packed weights from memory, and a
tile's first group would wait on them line by line: each group of a tile prefetches a share of
the sign lines of the tile `_PREFETCH_TILES` ahead (`llvm.prefetch`; measured 10-15% off the
decode step's linear layers). Several rows of x (M > 1) each have their tables; a tile walks
its groups once per row, its signs then in L1/L2.

One thread. The tiles run on the calling thread. On TVM's thread pool, the 210 linear layers of
a SmolLM2 decode step ran 1.1-1.3x faster in a loop of their own, but ~6x slower than on the
calling thread next to the ATen ops of a decode step (norms, SDPA, SiLU; measured with the
256-entry-table kernel): ATen's OpenMP workers spin after each op and TVM's workers wait for a
core (as `kv_quant_attention` found).

M (every leading dim of x flattened) and q are symbolic TIR vars, so one build serves every
batch and bit count; N, K and the group count are fixed per build. The kernel reads x and
writes y in fp32: 16-bit x is widened by the runner (exact) and y rounded to x's dtype, as the
reference does.

What the kernel does not take falls back to the op's reference (expand the weight to fp32 and
matmul): at lowering time (`Unsupported`: x other than fp32/fp16/bf16, weights of other dtypes,
symbolic or inconsistent shapes, q outside 1..4, N not a multiple of 8 (the lanes), a static M
above `_MAX_ROWS` (a prefill: the kernel's time grows with M where the reference's dense matmul
barely does; its expansion of the weight is amortized over the rows), hosts without AVX2,
non-CPU tensors, targets other than `llvm`) or at run time, in the runner: M = 0 or above
`_MAX_ROWS`, tensors whose shapes, dtypes or device the build does not take (the reference
raises the op's error where they are inconsistent).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from compiler.codegen.tvm.build import BuiltFunction, as_kernel_input, build_primfunc, parse_target
from compiler.errors import Unsupported
from compiler.ops.registry import Kernel, LoweringRequest
from compiler.ops.shift_add import BITS, check_weight, shiftadd_linear

# Outputs per tile: 4 lane blocks share each group's tables while they are in L1 (64 measured
# the same).
_TILE = 32
# Rows of x up to which the kernel runs. Its time grows with the rows, the reference's
# (dominated by expanding W, 4-10 ms for SmolLM2's shapes on the 2-core host) hardly: measured on
# one core, the kernel is >= 1.8x faster than the reference up to 64 rows, 1.1-2.9x at 128 and
# slower from 256.
_MAX_ROWS = 64
# Tiles ahead whose signs a tile prefetches (2 measured a little better than 1).
_PREFETCH_TILES = 2
_ARGS = ("x", "planes", "scales", "row_scale")
# x is read as fp32 (16-bit x widened by the runner, exactly) and y rounded to x's dtype, as the
# reference does.
_X_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_LANES = 8  # fp32 lanes of an AVX2 register: outputs per vector, entries per table
_CHUNK = 8  # inputs per chunk: one byte of signs
_LINE = 64  # bytes per cache line
# Words of signs by their bytes (the TIR dtype, the torch view the runner passes). A 2-byte word
# is sign-extended to 32 bits: the bit above it only reaches the inputs-6-7 table's ignored bit.
_WORDS = {4: ("int32", torch.int32), 2: ("int16", torch.int16), 1: ("uint8", torch.uint8)}


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


def _word_bytes(shape: _Shape) -> int:
    """Bytes of signs an output's load reads: the most (up to 4, one int32 lane) that keep a word
    inside one group (each group has its own factor)."""
    return next(w for w in (4, 2, 1) if shape.group_chunks % w == 0)


def _tile(shape: _Shape) -> int:
    """Outputs per tile: `_TILE`, or fewer lane blocks where N is not a multiple of it."""
    return next(t for t in range(_TILE, 0, -_LANES) if shape.out_features % t == 0)


@shiftadd_linear.register_lowering("tvm")
def lower_shiftadd_linear(req: LoweringRequest) -> Kernel:
    """The host kernel of one call site; other targets keep the reference."""
    from tvm.target.codegen import llvm_get_cpu_features

    target = parse_target(req.target.tvm_target)
    kind = target.kind.name
    if kind != "llvm":
        raise Unsupported(f"TVM shiftadd_linear has no schedule for target kind {kind!r}")
    if "avx2" not in llvm_get_cpu_features(target):
        raise Unsupported(f"TVM shiftadd_linear needs AVX2 (vpermps); target {req.target.tvm_target!r} has none")
    shape = _shape(*req.args)
    for name, t in zip(_ARGS, req.args):
        if t.device.type != "cpu":
            raise Unsupported(f"TVM llvm kernel for shiftadd_linear on a {t.device.type} tensor ({name})")
    func = _primfunc(shape)
    source = func.script()
    note = f"tables in registers, {_LANES} outputs a vector, tiles of {_tile(shape)}, up to {_MAX_ROWS} rows of x"
    if not req.run_here:
        return Kernel(shape.name, "tvm", source, note=f"{note}; not built: the caller asked for source only")
    built = build_primfunc(func, req.target.tvm_target, shape.name)
    runner = _host_runner(shape, built)
    return Kernel(shape.name, "tvm", source, runner=runner, note=f"{note}; shared library: {built.library}")


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
    q, n, chunks = planes.shape
    if q not in BITS:
        raise Unsupported(f"{what} takes {min(BITS)} to {max(BITS)} bit planes, not {q}")
    if n % _LANES:
        raise Unsupported(f"{what} computes {_LANES} outputs a vector; N = {n} is not a multiple of {_LANES}")
    rows = 1
    for s in x.shape[:-1]:
        rows = rows * s
    if isinstance(rows, int) and rows > _MAX_ROWS:
        raise Unsupported(f"{what} has a kernel for up to {_MAX_ROWS} rows of x (decode); this site has {rows}")
    if max(planes.numel(), _MAX_ROWS * chunks * 3 * _LANES) >= 2**31:
        raise Unsupported(f"{what}: a {n} x {chunks * _CHUNK} weight needs 64-bit indices (the kernel's are int32)")
    return _Shape(n, chunks * _CHUNK, scales.shape[-1])


# The kernel ------------------------------------------------------------------------------------


def _factor(code: Any) -> Any:
    """The group factor of a uint8 scale code c = 8 k + m, (1 + m / 8) * 2**(k - 31), exactly, in
    fp32, from its bits: exponent field k - 31 + 127 and the mantissa's top three bits m, i.e.
    the bits (k + 96) << 23 | m << 20 = (c << 20) + (96 << 23) (every code a normal float)."""
    from tvm import tirx

    bits = tirx.shift_left(code.astype("int32"), 20) + tirx.const(96 << 23, "int32")
    return tirx.reinterpret("float32", bits)


def _permute(table: Any, index: Any) -> Any:
    """vpermps: lane l is table[index[l] & 7], for an 8-lane fp32 table and int32 indices."""
    from tvm import tirx

    return tirx.call_llvm_pure_intrin(f"float32x{_LANES}", "llvm.x86.avx2.permps", table, index)


def _lookup(tables: Any, row: Any, chunk: Any, words: Any, j: Any) -> Any:
    """The 8 lanes' T[p] for p their byte j of `words` (int32 lanes): the chunk's three tables
    looked up by the bits from 8j, 8j + 3 and 8j + 6 on (see the module doc)."""
    from tvm import tirx

    lanes = tirx.Ramp(0, 1, _LANES)
    parts = [
        _permute(tables[row, chunk, s, lanes], tirx.shift_right(words, tirx.Broadcast(8 * j + 3 * s, _LANES)))
        for s in range(3)
    ]
    return (parts[0] + parts[1]) + parts[2]


def _prefetch(buf: Any, index: Any) -> Any:
    """A hint to load buf[index]'s cache line into every cache level (prefetcht0)."""
    from tvm import tirx

    address = tirx.address_of(buf[index])
    read, all_levels, data = (tirx.const(v, "int32") for v in (0, 3, 1))
    return tirx.call_llvm_intrin("void", "llvm.prefetch", address, read, all_levels, data)


def _table_macro() -> Any:
    """tables[m, c, s, :] for chunk c of row m of x: the signed sums of its inputs 3s .. 3s + 2
    (s = 0, 1) or 6, 7 (s = 2), entry p taking input j's sign from bit j - 3s of p (the inputs-6-7
    table ignores bit 2: entries p and p + 4 are equal)."""
    from tvm.script import tirx as T

    def signed(p: Any, bit: int, value: Any) -> Any:
        return T.Select(T.bitwise_and(p, 1 << bit) != 0, value, -value)

    @T.macro
    def build(x, tables, m, c):
        for s in T.unroll(2):
            for p in T.vectorized(_LANES):
                tables[m, c, s, p] = (
                    signed(p, 0, x[m, c * _CHUNK + s * 3]) + signed(p, 1, x[m, c * _CHUNK + s * 3 + 1])
                ) + signed(p, 2, x[m, c * _CHUNK + s * 3 + 2])
        for p in T.vectorized(_LANES):
            tables[m, c, 2, p] = signed(p, 0, x[m, c * _CHUNK + 6]) + signed(p, 1, x[m, c * _CHUNK + 7])

    return build


def _primfunc(shape: _Shape) -> Any:
    """The PrimFunc (x [M, K], planes as words [q, N, K / 8 / W], scales, row_scale, y [M, N]);
    see the module doc."""
    from tvm import tirx
    from tvm.script import tirx as T

    N, K, NG = shape.out_features, shape.in_features, shape.groups
    C, CPG = shape.chunks, shape.group_chunks
    L, W = _LANES, _word_bytes(shape)
    WPG = CPG // W  # words per group
    R = _tile(shape)
    TILES, BLOCKS = N // R, R // L
    AHEAD = _PREFETCH_TILES
    LPP = (R * C + _LINE - 1) // _LINE  # cache lines of a tile's signs, per plane
    PG = (LPP + NG - 1) // NG  # of them prefetched per group
    word_dtype = _WORDS[W][0]
    build = _table_macro()
    factor, lookup, prefetch = _factor, _lookup, _prefetch
    V = tirx.Ramp(0, 1, L)  # a vector's lanes

    @T.prim_func
    def shiftadd_linear(
        x_h: T.handle,
        words_h: T.handle,
        scales_h: T.handle,
        row_scale: T.Buffer((N,), "float32"),
        y_h: T.handle,
    ):
        T.func_attr({"tir.noalias": True})
        m = T.int32()
        q = T.int32()
        x = T.match_buffer(x_h, (m, K), "float32")
        words = T.match_buffer(words_h, (q, N, C // W), word_dtype)
        scales = T.match_buffer(scales_h, (q, N, NG), "uint8")
        y = T.match_buffer(y_h, (m, N), "float32")
        signs = T.decl_buffer((q * N * C,), "uint8", data=words.data)  # the words' bytes, to prefetch
        tables = T.alloc_buffer((m, C, 3, L), "float32")
        for mc in range(m * C):
            build(x, tables, mc // C, mc % C)
        for t in range(TILES):
            # two accumulators per lane block (alternate chunks), the lanes' group factors, and
            # the lanes' word of signs
            acc = T.alloc_buffer((BLOCKS, 2, L), "float32")
            lane_factor = T.alloc_buffer((L,), "float32")
            lane_word = T.alloc_buffer((L,), "int32")
            for row in range(m):
                for b in range(BLOCKS):
                    for a in T.unroll(2):
                        for l in T.vectorized(L):
                            acc[b, a, l] = T.float32(0)
                for g in range(NG):
                    if row == 0 and t + AHEAD < TILES:
                        for j in range(PG):
                            for i in range(q):
                                if g * PG + j < LPP:
                                    prefetch(signs, i * N * C + (t + AHEAD) * R * C + (g * PG + j) * _LINE)
                    for b in range(BLOCKS):
                        n0: T.let = t * R + b * L
                        for i in range(q):
                            for l in T.vectorized(L):
                                lane_factor[l] = factor(scales[i, n0 + l, g])
                            for w in T.unroll(WPG):
                                for l in T.vectorized(L):
                                    lane_word[l] = T.Cast("int32", words[i, n0 + l, g * WPG + w])
                                for j in T.unroll(W):
                                    k: T.let = w * W + j  # the chunk in the group
                                    acc[b, k % 2, V] = acc[b, k % 2, V] + lookup(
                                        tables, row, g * CPG + k, lane_word[V], j
                                    ) * lane_factor[V]
                for b in range(BLOCKS):
                    n0: T.let = t * R + b * L
                    for l in T.vectorized(L):
                        y[row, n0 + l] = (acc[b, 0, l] + acc[b, 1, l]) * row_scale[n0 + l]

    return shiftadd_linear


# Running it ------------------------------------------------------------------------------------


def _host_runner(shape: _Shape, kernel: BuiltFunction) -> Callable[..., torch.Tensor]:
    """The runner. A decode step makes ~200 of these calls of tens of microseconds each, so it
    does the least torch work it can (each op costs ~1-2 us on the host) and hands the tensors
    to the compiled function as they are: tvm_ffi takes torch tensors (DLPack, no copy) for a
    fraction of `BuiltFunction`'s conversion (`to_tvm`, which also checks the alignment that
    `as_kernel_input` provides here), ~5 us a call less. The planes go as words of signs."""
    n, k = shape.out_features, shape.in_features
    word = _WORDS[_word_bytes(shape)][1]

    def run(x: torch.Tensor, planes: torch.Tensor, scales: torch.Tensor, row_scale: torch.Tensor) -> torch.Tensor:
        rows = _rows_taken(shape, x, planes, scales, row_scale)
        if not rows:
            return shiftadd_linear.reference(x, planes, scales, row_scale)
        flat = x if x.dim() == 2 else x.reshape(rows, k)
        if x.dtype != torch.float32:
            flat = flat.float()
        y = torch.empty(rows, n)
        words = as_kernel_input(planes).view(word)
        kernel.function(as_kernel_input(flat), words, as_kernel_input(scales), as_kernel_input(row_scale), y)
        if x.dim() != 2:
            y = y.view(*x.shape[:-1], n)
        return y if x.dtype == torch.float32 else y.to(x.dtype)

    return run


def _rows_taken(
    shape: _Shape, x: torch.Tensor, planes: torch.Tensor, scales: torch.Tensor, row_scale: torch.Tensor
) -> int:
    """The rows of x (M) when the kernel computes this call; 0 where the reference does (and
    raises the op's errors)."""
    weight_dtypes = (planes.dtype, scales.dtype, row_scale.dtype) == (torch.uint8, torch.uint8, torch.float32)
    if x.dtype not in _X_DTYPES or not weight_dtypes:
        return 0
    if not (x.is_cpu and planes.is_cpu and scales.is_cpu and row_scale.is_cpu):
        return 0
    if x.dim() == 0 or planes.dim() != 3:
        return 0
    n, k, q = shape.out_features, shape.in_features, planes.shape[0]
    shapes = (x.shape[-1], planes.shape, scales.shape, row_scale.shape)
    if q not in BITS or shapes != (k, (q, n, shape.chunks), (q, n, shape.groups), (n,)):
        return 0
    rows = x.numel() // k
    return rows if rows <= _MAX_ROWS else 0
