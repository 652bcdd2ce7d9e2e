"""The Triton lowering of `compiler::shiftadd_linear`: ShiftAddLLM's lookup-table matmul.

Part of the codegen step, built like attention.py and kv_quant_attention.py: the kernels are
kept here as source text, which the lowering hands to the artifact folder and the runner
imports (`runtime.load_module`); the text is the same for every call site, and the weight
format (bits q, group size G) and the tiles are launch constants. The weight format is
compiler/ops/shift_add.py's: sign planes uint8 [q, N, K / 8] (bit j of byte c is the sign of
input 8c + j), uint8 scale codes [q, N, K / G], fp32 row scales [N]; y = x @ W.T with
W[n, k] = r[n] * sum_i f[i, n, k // G] * (+-1), f = (8 + m) * 2**(k - 34) for a code 8k + m. The weights are never expanded to floats in
memory: both paths read the packed bytes and turn them into numbers in registers. The runner
picks the path per call from M, the rows of x (batch times tokens, symbolic at export).

Lookup tables (M <= GEMV_MAX_ROWS, a decode step), as `shift_add.lookup_linear` in torch:
1. `shiftadd_tables_kernel` writes, for every row m of x and chunk c of 8 inputs, the 256
   signed sums LUT[m, c, p] = sum_j (bit j of p ? +x : -x)[m, 8c + j] in fp32 ([M, K / 8, 256]:
   1 KiB a chunk, 192 KiB a row at K = 1536, so an L2-resident scratch).
2. `shiftadd_lut_gemv_kernel`: one program per row of x, block of BLOCK_N output features and
   split of the chunks. It walks its chunks BLOCK_C at a time; per plane it loads the
   [BLOCK_N, BLOCK_C] sign bytes (a feature's bytes are contiguous: one vector load a thread),
   gathers the table entries they name (`lut + c * 256 + byte`: one lookup stands for 8
   multiply-adds), scales them by the factor of their chunk's group and adds them into a BLOCK_N
   fp32 accumulator. The factor is built exactly from its code (`_factor`: a power of two from
   its float bits times 8 + m); scaling the terms of a group instead of their sum rounds each
   product once more, within the fp32 tolerance the tests derive; a chunk's group is c // (G / 8), so any G that is a
   multiple of 8 works and a step may span groups. Every program reads its chunks' tables
   whole, so BLOCK_N is wide (256 on an H100): the tables then cross from L2 about as many
   bytes as the packed weights from memory. The rows of a few-row call run side by side and
   read the same bytes, from L2.
3. Decode has few programs (N / BLOCK_N): the chunks are split across a third grid axis with
   FlashAttention-2's wave heuristic (`attention.num_splits`) when that leaves SMs idle; each
   split writes fp32 partial sums and `shiftadd_combine_kernel` adds them. With one split the
   GEMV applies the row scale and stores the output itself.
Tables for all M rows at once would not stay small, so the runner runs these kernels on slabs
of `slab_rows` rows (one slab for decode).

Tiled GEMM (M > GEMV_MAX_ROWS, a prefill), `shiftadd_gemm_kernel`, when G has a power-of-two
factor of at least 16 (`tl.dot`'s smallest K): a BLOCK_M x BLOCK_N output tile per program, K
in steps of BLOCK_K that lie in one group. Per step and plane it unpacks the [BLOCK_K / 8,
BLOCK_N] sign bytes to a +-1 tile in x's dtype (exact in every dtype), multiplies x's tile by
it on the tensor cores (fp32 accumulation), and adds the product times the group's factor, one
per output column. That is q dots per step where a dense GEMM does one (prefill is compute
bound: ~q times the MMA work of fp16 cuBLAS, against q / 16 of its weight bytes); folding the
planes into one fp16 weight tile first would round sums of powers of two that fp16 cannot
hold. Other group sizes (8, 24, ...) take the lookup tables at every M.

Numerics: fp32 throughout. x is read in its dtype and widened (exact), tables and
accumulators are fp32, tl.dot multiplies fp32 tiles as "ieee" (no TF32) and 16-bit tiles by
+-1 exactly; only the final row-scaled sum is rounded to x's dtype. The reference expands W in
fp32 and runs one fp32 matmul: both are the same sum of products in another order, so they
differ by fp32 summation error (see the tests). bf16 dots under Triton's interpreter multiply
raw bits (triton-lang/triton#11584); there the GEMM widens its tiles to fp32 first (exact).

What keeps the reference: x of a dtype other than fp32/fp16/bf16; weights not in the format
(not uint8/uint8/fp32, q outside 1..4, G not a multiple of 8 dividing K, shapes that disagree);
symbolic K, q or group counts (the weights are constants: their shapes are static; M and N
are read per call). Offsets of rows and planes are int64.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Callable

import torch

from compiler.codegen.triton import attention
from compiler.codegen.triton.attention import MIN_DOT, TRITON_IMPORTS, kernel_module, next_power_of_2, num_splits
from compiler.codegen.triton.runtime import interpreting, why_not_runnable
from compiler.errors import Unsupported
from compiler.ops import shift_add
from compiler.ops.registry import Kernel, LoweringRequest
from compiler.ops.shift_add import shiftadd_linear

OP = "shiftadd_linear"
TABLES_KERNEL = "shiftadd_tables_kernel"
GEMV_KERNEL = "shiftadd_lut_gemv_kernel"
COMBINE_KERNEL = "shiftadd_combine_kernel"
GEMM_KERNEL = "shiftadd_gemm_kernel"

KERNEL_SOURCE = TRITON_IMPORTS + '''

@triton.jit
def _factor(code):
    """The group factor of a uint8 scale code c = 8 k + m: (8 + m) * 2**(k - 34), exactly, in
    fp32 (the power of two built from its exponent bits; k - 34 is always a normal exponent)."""
    c = code.to(tl.int32)
    power = (((c >> 3) - 34 + 127) << 23).to(tl.float32, bitcast=True)
    return (8 + (c & 7)).to(tl.float32) * power


@triton.jit
def _store_scaled(y, scale_ptr, out_ptr, offs_m, offs_n, rows, n_out, stride_om, stride_on):
    """out[m, n] = y[m, n] * row_scale[n] in out's dtype, for the tile's real rows and columns."""
    col_real = offs_n < n_out
    r = tl.load(scale_ptr + offs_n, mask=col_real, other=0.0)
    ptrs = out_ptr + offs_m.to(tl.int64)[:, None] * stride_om + offs_n[None, :] * stride_on
    mask = (offs_m[:, None] < rows) & col_real[None, :]
    tl.store(ptrs, (y * r[None, :]).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def shiftadd_tables_kernel(x_ptr, lut_ptr, n_chunks, stride_xm, stride_xk, BLOCK_T: tl.constexpr):
    """lut[m, c, p] = sum_j (+x[m, 8c + j] if bit j of p else -x[m, 8c + j]) in fp32, for row m
    and chunks c of one block of BLOCK_T. Grid: (rows, cdiv(n_chunks, BLOCK_T))."""
    row = tl.program_id(0).to(tl.int64)
    chunks = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    patterns = tl.arange(0, 256)
    real = chunks < n_chunks
    table = tl.zeros([BLOCK_T, 256], dtype=tl.float32)
    for j in tl.static_range(8):
        xj = tl.load(x_ptr + row * stride_xm + (chunks * 8 + j) * stride_xk, mask=real, other=0.0)
        sign = ((patterns >> j) & 1).to(tl.float32) * 2 - 1
        table += xj.to(tl.float32)[:, None] * sign[None, :]
    ptrs = lut_ptr + row * n_chunks * 256 + chunks[:, None] * 256 + patterns[None, :]
    tl.store(ptrs, table, mask=real[:, None])


@triton.jit
def shiftadd_lut_gemv_kernel(
    lut_ptr, planes_ptr, factor_ptr, scale_ptr, out_ptr, part_ptr,
    rows, n_out, n_chunks, chunks_per_split, stride_om, stride_on,
    BITS: tl.constexpr, GROUP_CHUNKS: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, SINGLE_SPLIT: tl.constexpr,
):
    """y[m, n] = sum over planes i and chunks c of the split of f[i, n, c // GROUP_CHUNKS] *
    lut[m, c, planes[i, n, c]], for row m and a block of BLOCK_N outputs.

    Grid: (cdiv(n_out, BLOCK_N), rows, splits); split s takes chunks [s * chunks_per_split,
    + chunks_per_split), and BLOCK_C divides both chunks_per_split and n_chunks, so every step
    is whole: no chunk mask, which lets each thread load a feature's BLOCK_C bytes as one
    vector. Features past n_out read feature n % n_out (in bounds) and are not stored. With one split it
    stores y * row_scale to out, otherwise y to part [splits, rows, n_out] (fp32).
    """
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row = tl.program_id(1) + tl.zeros([1], dtype=tl.int32)  # a one-row tile
    split = tl.program_id(2)
    offs_c = tl.arange(0, BLOCK_C)
    n_groups = n_chunks // GROUP_CHUNKS
    lut_row = lut_ptr + row.to(tl.int64)[:, None] * n_chunks * 256
    start = split * chunks_per_split
    end = tl.minimum(start + chunks_per_split, n_chunks)

    acc = tl.zeros([1, BLOCK_N], dtype=tl.float32)
    for c0 in range(start, end, BLOCK_C):
        chunks = tl.multiple_of(c0, BLOCK_C) + offs_c
        for i in range(BITS):  # a loop, not unrolled: see the GEMM
            plane = i * n_out + (offs_n % n_out).to(tl.int64)
            signs = tl.load(planes_ptr + plane[:, None] * n_chunks + chunks[None, :])
            e = tl.load(factor_ptr + plane[:, None] * n_groups + chunks[None, :] // GROUP_CHUNKS)
            looked = tl.load(lut_row + chunks[None, :] * 256 + signs.to(tl.int32))
            acc += tl.sum(looked * _factor(e), 1)[None, :]

    if SINGLE_SPLIT:
        _store_scaled(acc, scale_ptr, out_ptr, row, offs_n, rows, n_out, stride_om, stride_on)
    else:
        ptrs = part_ptr + (split * rows + row.to(tl.int64))[:, None] * n_out + offs_n[None, :]
        tl.store(ptrs, acc, mask=offs_n[None, :] < n_out)


@triton.jit
def shiftadd_combine_kernel(part_ptr, scale_ptr, out_ptr, rows, n_out, n_splits, stride_om, stride_on,
                            BLOCK_N: tl.constexpr):
    """out[m, n] = row_scale[n] * sum over splits of part[s, m, n], for row m and a block of
    BLOCK_N outputs. Grid: (rows, cdiv(n_out, BLOCK_N))."""
    row = tl.program_id(0) + tl.zeros([1], dtype=tl.int32)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    y = tl.zeros([1, BLOCK_N], dtype=tl.float32)
    for s in range(n_splits):
        ptrs = part_ptr + (s * rows + row.to(tl.int64))[:, None] * n_out + offs_n[None, :]
        y += tl.load(ptrs, mask=offs_n[None, :] < n_out, other=0.0)
    _store_scaled(y, scale_ptr, out_ptr, row, offs_n, rows, n_out, stride_om, stride_on)


@triton.jit
def shiftadd_gemm_kernel(
    x_ptr, planes_ptr, factor_ptr, scale_ptr, out_ptr,
    rows, n_out, n_chunks, stride_xm, stride_xk, stride_om, stride_on,
    BITS: tl.constexpr, GROUP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, DOT_FP32: tl.constexpr,
):
    """out = (x @ W.T) * row_scale for a BLOCK_M x BLOCK_N tile: per K step (BLOCK_K divides
    GROUP: one group) and plane, x's tile times the plane's +-1 tile, scaled by its factor per column.

    Grid: (cdiv(rows, BLOCK_M), cdiv(n_out, BLOCK_N)). Rows and columns past the matrix are
    wrapped into it (as in matmul.py), so no load needs a mask; K is whole steps.
    """
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = (offs_m % rows).to(tl.int64)
    rn = (offs_n % n_out).to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K)
    offs_b = tl.arange(0, BLOCK_K // 8)
    bit = tl.arange(0, 8)
    n_groups = n_chunks * 8 // GROUP
    x_ptrs = x_ptr + rm[:, None] * stride_xm + offs_k[None, :] * stride_xk

    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, n_chunks * 8, BLOCK_K):
        k0 = tl.multiple_of(k0, BLOCK_K)
        x = tl.load(x_ptrs + k0 * stride_xk)
        if DOT_FP32:
            x = x.to(tl.float32)
        # A loop, not unrolled: unrolled, every plane's decoded tile and dot result are live at
        # once, and q = 4 spills on an H100.
        for i in range(BITS):
            plane = i * n_out + rn
            packed = tl.load(planes_ptr + plane[None, :] * n_chunks + (k0 // 8 + offs_b)[:, None])
            # [BLOCK_K / 8, 8, BLOCK_N] -> [BLOCK_K, BLOCK_N]: row 8c + j is bit j of byte c
            bits = (packed.to(tl.int32)[:, None, :] >> bit[None, :, None]) & 1
            signs = tl.reshape(bits * 2 - 1, [BLOCK_K, BLOCK_N]).to(x.dtype)
            e = tl.load(factor_ptr + plane * n_groups + k0 // GROUP)
            acc += tl.dot(x, signs, input_precision="ieee") * _factor(e)[None, :]
    _store_scaled(acc, scale_ptr, out_ptr, offs_m, offs_n, rows, n_out, stride_om, stride_on)
'''

KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Rows up to this take the lookup tables (decode, a short speculative chunk); more, the GEMM.
# Per plane and 8 weights the tables cost a lookup and ~10 lane operations for each row, the
# GEMM ~40 to unpack the signs once for all its rows (the MMAs on the tensor cores are cheap
# next to that at small M): the paths cross near M = 4.
GEMV_MAX_ROWS = 4


@dataclass(frozen=True)
class LaunchConfig:
    """Launch constants (the kernel text does not change)."""

    table_block: int  # chunks per tables-kernel program ([table_block, 256] fp32 tile)
    table_warps: int
    gemv_block_n: int
    gemv_block_c: int  # at most: BLOCK_C also divides K / 8 (`gemv_block_c_for`)
    gemv_warps: int
    # The granularity of K splits, a multiple of every BLOCK_C: enough chunks a split that its
    # partial store stays small next to its byte reads.
    min_chunks_per_split: int
    slab_rows: int  # rows whose tables exist at once
    combine_block: int
    gemm_block_m: int
    gemm_block_n: int
    gemm_block_k: int
    gemm_warps: int
    gemm_stages: int

    def gemv_block_c_for(self, n_chunks: int) -> int:
        """BLOCK_C for K / 8 = n_chunks: its largest power-of-two factor, at most gemv_block_c
        (whole steps: no chunk mask)."""
        return min(self.gemv_block_c, n_chunks & -n_chunks)

    def gemm_block_k_for(self, group: int) -> int | None:
        """BLOCK_K for groups of `group` inputs: its largest power-of-two factor, at most
        gemm_block_k; None when that is under tl.dot's 16 (the GEMM does not apply)."""
        block_k = min(self.gemm_block_k, group & -group)
        return block_k if block_k >= MIN_DOT else None


# H100 (132 SMs, 64K registers and 256 KiB of L1 each). GEMV: every program reads the tables
# of its chunks whole (its rows' bytes hit most of each 1 KiB table), so the tables cross from
# L2 (N / BLOCK_N) times: 1024 / (q BLOCK_N) times the packed bytes a row of x, 1.3 at q = 3
# with 256 output features a program. A thread holds one feature's 16 chunks a step (one
# 16-byte load a plane; the 32 lanes of a warp then look up in the same chunk's table), 8
# warps; splitting K in runs of 16 chunks brings the programs to ~132 for N up to 4096 at
# K >= 2048. GEMM: 64 x 128 tiles, K steps of 64, one warpgroup (wgmma); fp32's ieee dots
# (FMA units) take 32 x 64 x 32. Registers a thread (ptxas, sm_90, q = 4): GEMV 32, GEMM 168
# (fp32: 209), no spills; 128 x 128 GEMM tiles reach 252.
H100_CONFIG = LaunchConfig(
    table_block=16, table_warps=4, gemv_block_n=256, gemv_block_c=16, gemv_warps=8,
    min_chunks_per_split=16, slab_rows=64, combine_block=256,
    gemm_block_m=64, gemm_block_n=128, gemm_block_k=64, gemm_warps=4, gemm_stages=3,
)
H100_FP32_CONFIG = dataclasses.replace(
    H100_CONFIG, gemm_block_m=32, gemm_block_n=64, gemm_block_k=32, gemm_warps=4, gemm_stages=2
)
# Under the interpreter every tile op is a numpy call: small tiles keep tests fast and put
# small sizes across tile, split and slab edges (warps and stages mean nothing there).
INTERPRETER_CONFIG = LaunchConfig(
    table_block=32, table_warps=1, gemv_block_n=32, gemv_block_c=8, gemv_warps=1,
    min_chunks_per_split=16, slab_rows=4, combine_block=32,
    gemm_block_m=32, gemm_block_n=32, gemm_block_k=32, gemm_warps=1, gemm_stages=1,
)


def launch_config(dtype: torch.dtype, interpreted: bool) -> LaunchConfig:
    if interpreted:
        return INTERPRETER_CONFIG
    return H100_FP32_CONFIG if dtype == torch.float32 else H100_CONFIG


@shiftadd_linear.register_lowering("triton")
def lower_shiftadd_linear(req: LoweringRequest) -> Kernel:
    x, planes, scales, row_scale = req.args
    bits, group = _weight_format(x, planes, scales, row_scale)
    config = launch_config(x.dtype, interpreting())
    compute_units = attention._compute_units(req.target)
    name = f"{OP}_{str(x.dtype).removeprefix('torch.')}_q{bits}_g{group}"
    source = _header(name, bits, group, config, compute_units) + KERNEL_SOURCE
    why_not = why_not_runnable(req, x.device.type)
    if why_not:
        return Kernel(name, "triton", source, note=why_not)
    runner = _runner(kernel_module(OP, KERNEL_SOURCE), bits, group, config, compute_units)
    return Kernel(name, "triton", source, runner=runner)


def _weight_format(x: Any, planes: Any, scales: Any, row_scale: Any) -> tuple[int, int]:
    """(q, G) of a call site the kernels take; raises Unsupported (the call site keeps the
    reference) otherwise. M may be symbolic: the runner reads it per call."""
    from torch.fx.experimental.symbolic_shapes import is_concrete_int

    if x.dtype not in KERNEL_DTYPES:
        raise Unsupported(f"{OP} with x of dtype {x.dtype} (kernels take fp32, fp16, bf16)")
    if planes.dim() != 3 or scales.dim() != 3 or x.dim() < 1:
        raise Unsupported(f"{OP} with planes, scales, x of ranks {planes.dim()}, {scales.dim()}, {x.dim()}")
    dims = (planes.shape[0], planes.shape[2], scales.shape[2], x.shape[-1])
    if not all(is_concrete_int(d) for d in dims):
        raise Unsupported(f"{OP} over symbolic bits, input features or groups {dims}; the kernels fix q and G")
    try:
        shift_add.check_weight(x, planes, scales, row_scale)
    except ValueError as exc:
        raise Unsupported(str(exc)) from exc
    bits = int(planes.shape[0])
    if bits not in shift_add.BITS:
        raise Unsupported(f"{OP} with {bits} bit planes (kernels take {shift_add.BITS})")
    return bits, shift_add.group_size(planes, scales)


def _header(name: str, bits: int, group: int, config: LaunchConfig, compute_units: int) -> str:
    fmt = f"BITS={bits}, GROUP_CHUNKS={group // 8}"
    block_k = config.gemm_block_k_for(group)
    gemm = (
        f"#   M > {GEMV_MAX_ROWS}: {GEMM_KERNEL}[(cdiv(M, BLOCK_M), cdiv(N, {config.gemm_block_n}))](...,"
        f" BITS={bits}, GROUP={group},\n"
        f"#       BLOCK_M=max({MIN_DOT}, min({config.gemm_block_m}, next_pow2(M))), BLOCK_N={config.gemm_block_n},"
        f" BLOCK_K={block_k}, num_warps={config.gemm_warps}, num_stages={config.gemm_stages})\n"
        if block_k
        else f"#   (no GEMM: groups of {group} have no power-of-two factor of {MIN_DOT}; every M takes the tables)\n"
    )
    return (
        f"# {name}: per call, from M (rows of x), N and K\n"
        f"#   M <= {GEMV_MAX_ROWS}, or any M with no GEMM below: lookup tables, per slab of up to"
        f" {config.slab_rows} rows\n"
        f"#     {TABLES_KERNEL}[(rows, cdiv(K / 8, {config.table_block}))](..., BLOCK_T={config.table_block},"
        f" num_warps={config.table_warps})\n"
        f"#     {GEMV_KERNEL}[(cdiv(N, {config.gemv_block_n}), rows, splits)](..., {fmt},"
        f" BLOCK_N={config.gemv_block_n},\n"
        f"#         BLOCK_C=min({config.gemv_block_c}, largest power of 2 dividing K / 8),"
        f" num_warps={config.gemv_warps})\n"
        f"#       splits = FlashAttention-2 heuristic over {compute_units} compute units,"
        f" chunks of {config.min_chunks_per_split}\n"
        f"#     then, if splits > 1: {COMBINE_KERNEL}[(rows, cdiv(N, {config.combine_block}))](...)\n"
        + gemm
    )


def _runner(
    module: ModuleType, bits: int, group: int, config: LaunchConfig, compute_units: int
) -> Callable[..., torch.Tensor]:
    tables_kernel = getattr(module, TABLES_KERNEL)
    gemv_kernel = getattr(module, GEMV_KERNEL)
    combine_kernel = getattr(module, COMBINE_KERNEL)
    gemm_kernel = getattr(module, GEMM_KERNEL)
    gemm_block_k = config.gemm_block_k_for(group)

    def lookup(x: torch.Tensor, planes: torch.Tensor, scales: torch.Tensor, row_scale: torch.Tensor,
               out: torch.Tensor) -> None:
        """out = x @ W.T by the lookup tables, slab by slab."""
        m, k = x.shape
        n, n_chunks = out.shape[1], k // 8
        slab = min(m, config.slab_rows)
        lut = torch.empty((slab, n_chunks, 256), dtype=torch.float32, device=x.device)
        blocks_n = -(-n // config.gemv_block_n)
        chunk = config.min_chunks_per_split
        splits = num_splits(n_chunks, blocks_n * slab, compute_units, chunk)
        chunks_per_split = -(-n_chunks // (splits * chunk)) * chunk
        splits = -(-n_chunks // chunks_per_split)  # no split without chunks
        part = torch.empty((splits, slab, n), dtype=torch.float32, device=x.device) if splits > 1 else out
        for start in range(0, m, slab):
            xs, outs = x[start : start + slab], out[start : start + slab]
            rows = xs.shape[0]
            tables_kernel[(rows, -(-n_chunks // config.table_block))](
                xs, lut, n_chunks, *xs.stride(), BLOCK_T=config.table_block, num_warps=config.table_warps
            )
            gemv_kernel[(blocks_n, rows, splits)](
                lut, planes, scales, row_scale, outs, part, rows, n, n_chunks, chunks_per_split, *outs.stride(),
                BITS=bits, GROUP_CHUNKS=group // 8, BLOCK_N=config.gemv_block_n,
                BLOCK_C=config.gemv_block_c_for(n_chunks), SINGLE_SPLIT=splits == 1, num_warps=config.gemv_warps,
            )
            if splits > 1:
                combine_kernel[(rows, -(-n // config.combine_block))](
                    part, row_scale, outs, rows, n, splits, *outs.stride(), BLOCK_N=config.combine_block
                )

    def gemm(x: torch.Tensor, planes: torch.Tensor, scales: torch.Tensor, row_scale: torch.Tensor,
             out: torch.Tensor) -> None:
        m, k = x.shape
        n = out.shape[1]
        block_m = max(MIN_DOT, min(config.gemm_block_m, next_power_of_2(m)))
        grid = (-(-m // block_m), -(-n // config.gemm_block_n))
        gemm_kernel[grid](
            x, planes, scales, row_scale, out, m, n, k // 8, *x.stride(), *out.stride(),
            BITS=bits, GROUP=group, BLOCK_M=block_m, BLOCK_N=config.gemm_block_n, BLOCK_K=gemm_block_k,
            DOT_FP32=x.dtype == torch.float32 or (x.dtype == torch.bfloat16 and interpreting()),
            num_warps=config.gemm_warps, num_stages=config.gemm_stages,
        )

    def run(x: torch.Tensor, planes: torch.Tensor, scales: torch.Tensor, row_scale: torch.Tensor) -> torch.Tensor:
        shift_add.check_weight(x, planes, scales, row_scale)
        if (planes.shape[0], shift_add.group_size(planes, scales)) != (bits, group):
            called = f"{planes.shape[0]} planes, groups of {shift_add.group_size(planes, scales)}"
            raise ValueError(f"{OP}: kernel for {bits} planes in groups of {group} called with {called}")
        n, k = planes.shape[1], planes.shape[2] * 8
        rows = x.reshape(-1, k)
        out = torch.empty((rows.shape[0], n), dtype=x.dtype, device=x.device)
        if out.numel():
            weight = (planes.contiguous(), scales.contiguous(), row_scale.contiguous())
            path = gemm if rows.shape[0] > GEMV_MAX_ROWS and gemm_block_k else lookup
            path(rows, *weight, out)
        return out.reshape(*x.shape[:-1], n)

    return run
