"""The Triton lowering of `compiler::causal_attention`: FlashAttention-2 prefill and split-KV decode.

Part of the codegen step. As in rms_norm.py, the kernels are kept here as source text, which the
lowering hands to the artifact folder and the runner imports (`runtime.load_module`). The text is
the same for every call site; head dims, block sizes and the rest are launch constants, and one
runner picks, per call and from the actual shapes, between two paths. The step over one K/V
block (`KEY_BLOCK_SOURCE`) is also part of the block-sparse kernel's text
(block_sparse_attention.py).

Prefill (`attention_prefill_kernel`), FlashAttention-2 forward. One program per (batch * query
head, block of BLOCK_M queries); it keeps its Q tile in registers and streams K/V in blocks of
BLOCK_N keys, keeping the softmax online: a running row max m, row sum l and an fp32 accumulator
rescaled by exp2(m_old - m_new) whenever the max grows, so the S x S score matrix never exists
and the division by l happens once at the end. Scores are multiplied by scale * log2(e) so that
every exponential is an exp2 (one MUFU.EX2 on NVIDIA GPUs; exp would add a multiply each).
Causality costs nothing above the diagonal: queries are aligned to the end of the keys, so
query i sits at position past + i (past = Sk - Sq), and the key loop of a query block stops at
`causal_end`, one past the last position its last query sees. It runs in two stages: key blocks
every query of the block sees in full (no causal or length masks), then the few blocks that straddle the
diagonal, where the causal and Sk boundary masks apply. Grouped-query attention reads K/V of
kv head q_head // (Hq / Hkv): K/V are never expanded. Programs are ordered heaviest query
block first (the causal work of a block grows with its index), which shortens the tail of the
last wave, and consecutive programs are neighbouring heads of one batch, so the query heads
of a GQA group run together and share their K/V blocks in L2.

Decode (`attention_decode_split_kernel` + `attention_decode_combine_kernel`), flash-decoding.
With few queries (Sq <= DECODE_MAX_QUERIES: a decode step or a short speculative chunk) the
prefill grid has B * Hq programs, too few to fill a GPU, each re-reading a long cache. Instead
one program takes all Hq / Hkv query heads of a GQA group times the Sq queries (the rows of
one BLOCK_R tile, padded to 16 for tl.dot, at most DECODE_MAX_ROWS), so each K/V block is read
once for the whole group, and the keys are split into chunks across a second grid axis. Each
program reduces its chunk to a partial output o = acc / l and its log-sum-exp (base 2,
lse = m + log2 l), written in fp32 to a scratch buffer; the combine kernel merges the splits of each row by weights
exp2(lse_s - max lse). The number of splits follows FlashAttention-2's heuristic: enough
programs for whole waves over the target's compute units, in chunks of at least
`min_keys_per_split` keys. With one split the first kernel writes the output itself.

Numerics: products are accumulated in fp32 (P is rounded to the input dtype before P @ V, as in
every FlashAttention, for tensor-core inputs); tl.dot runs with input_precision="ieee" so that
fp32 inputs get fp32 products, not TF32 (the reference, torch SDPA, does not use TF32; for
16-bit inputs the flag changes nothing). The output has q's dtype and the reference's memory
layout, [B, Sq, Hq, Dv] viewed as [B, Hq, Sq, Dv] (captured graphs rely on it, see the runner).

Key padding mask: supported in the kernels, without a host sync. A key whose mask value is 0
(the reference keeps keys where `mask.to(bool)`) gets a score of -inf; only the first Sk columns
of a [B, >= Sk] mask are read. A query that sees no key at all (left padding: a padding query
row only sees padding keys) gets an output of 0, as the reference does on CPU (torch's SDPA math
path uses a "safe" softmax that returns zeros for fully masked rows). With a mask the running max can
stay -inf, so the exponentials then use 0 as their reference point instead of -inf - -inf = NaN;
without one the prefill kernel needs no such guard: every row sees key 0, and the first key
block a row visits always holds a visible key (see the kernel).

Offsets: batch and head offsets, and the offset of a block's first key, are computed in int64
(B * H * S * D passes 2**31 for long contexts); offsets within a block stay int32.

The runner launches on CUDA tensors, or on CPU tensors under Triton's interpreter
(TRITON_INTERPRET=1), where small blocks keep the interpreted tiles fast; bf16 call sites are
not run there, since the interpreter's tl.dot multiplies bf16 bit patterns (triton-lang/triton
#11584) and those call sites keep the reference. Nothing here imports triton before a lowering
runs, so the environment can still choose the interpreter.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Callable, Optional

import torch

from compiler.codegen.triton.runtime import interpreting, load_module, why_not_runnable
from compiler.errors import Unsupported
from compiler.ops import causal_attention as CAUSAL_ATTENTION
from compiler.ops.causal_attention import output_like
from compiler.ops.registry import Kernel, LoweringRequest

TRITON_IMPORTS = "import triton\nimport triton.language as tl\n"

# Pointers to a K/V block and the online-softmax step over it: the prefill kernel folds in a
# range of key blocks, the block-sparse kernel (block_sparse_attention.py) the blocks its layout
# lists.
KEY_BLOCK_SOURCE = '''\
@triton.jit
def _kv_block_ptrs(k_base, v_base, start_n, offs_n, offs_d, offs_dv, stride_kn, stride_kd, stride_vn, stride_vd):
    """Pointers to the K block, transposed to [BLOCK_D, BLOCK_N] so that q @ k is a plain
    tl.dot, and to the V block, [BLOCK_N, BLOCK_DV], of keys start_n .. start_n + BLOCK_N."""
    k_ptrs = (k_base + start_n.to(tl.int64) * stride_kn
              + offs_n[None, :] * stride_kn + offs_d[:, None] * stride_kd)
    v_ptrs = (v_base + start_n.to(tl.int64) * stride_vn
              + offs_n[:, None] * stride_vn + offs_dv[None, :] * stride_vd)
    return k_ptrs, v_ptrs


@triton.jit
def _attend_key_block(
    acc, l_i, m_i, q, q_pos,
    k_base, v_base, mask_base,
    stride_kn, stride_kd, stride_vn, stride_vd, stride_mn,
    start_n, seq_k, qk_scale,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_N: tl.constexpr, DIAGONAL: tl.constexpr, HAS_MASK: tl.constexpr,
):
    """Fold keys start_n .. start_n + BLOCK_N into the online softmax (acc, l_i, m_i) of the
    query tile q, whose rows sit at positions q_pos.

    Scores are in base 2 (qk_scale = scale * log2(e)). A DIAGONAL block straddles the causal
    diagonal or the end of the keys and is masked; any other lies wholly below the diagonal
    and inside the keys, so it loads and scores without causal or length masks (only the head
    dims' padding is masked, and with a power-of-two head dim that mask is all true).
    """
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    keys = start_n + offs_n
    k_ptrs, v_ptrs = _kv_block_ptrs(k_base, v_base, start_n, offs_n, offs_d, offs_dv,
                                    stride_kn, stride_kd, stride_vn, stride_vd)
    k_mask = offs_d[:, None] < HEAD_DIM
    v_mask = offs_dv[None, :] < HEAD_DIM_V
    if DIAGONAL:
        k_mask = k_mask & (keys[None, :] < seq_k)
        v_mask = v_mask & (keys[:, None] < seq_k)
    k = tl.load(k_ptrs, mask=k_mask, other=0.0)
    qk = tl.dot(q, k, input_precision="ieee") * qk_scale
    if DIAGONAL:
        # q_pos <= seq_k - 1 for real rows, so this also masks the keys past seq_k.
        qk = tl.where(keys[None, :] <= q_pos[:, None], qk, float("-inf"))
    if HAS_MASK:
        if DIAGONAL:
            keep = tl.load(mask_base + keys * stride_mn, mask=keys < seq_k, other=0)
        else:
            keep = tl.load(mask_base + keys * stride_mn)
        qk = tl.where(keep[None, :] != 0, qk, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(qk, 1))
    if HAS_MASK:
        # A row with no visible key yet keeps m = -inf; exponentiate against 0 instead, so
        # that its p and alpha are 0, not NaN (-inf - -inf).
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
    else:
        m_ref = m_new
    p = tl.exp2(qk - m_ref[:, None])
    alpha = tl.exp2(m_i - m_ref)
    l_i = l_i * alpha + tl.sum(p, 1)
    v = tl.load(v_ptrs, mask=v_mask, other=0.0)
    acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision="ieee")
    return acc, l_i, m_new
'''

KERNEL_SOURCE = TRITON_IMPORTS + "\n\n" + KEY_BLOCK_SOURCE + '''

@triton.jit
def _attend_key_blocks(
    acc, l_i, m_i, q, q_pos,
    k_base, v_base, mask_base,
    stride_kn, stride_kd, stride_vn, stride_vd, stride_mn,
    start, end, seq_k, qk_scale,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_N: tl.constexpr, DIAGONAL: tl.constexpr, HAS_MASK: tl.constexpr,
):
    """Fold keys [start, end), whole key blocks, into the online softmax (acc, l_i, m_i)."""
    for start_n in range(start, end, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        acc, l_i, m_i = _attend_key_block(
            acc, l_i, m_i, q, q_pos, k_base, v_base, mask_base,
            stride_kn, stride_kd, stride_vn, stride_vd, stride_mn,
            start_n, seq_k, qk_scale,
            HEAD_DIM, HEAD_DIM_V, BLOCK_D, BLOCK_DV, BLOCK_N, DIAGONAL, HAS_MASK,
        )
    return acc, l_i, m_i


@triton.jit
def attention_prefill_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, mask_ptr,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_mb, stride_mn,
    n_q_heads, group, seq_q, seq_k, qk_scale,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_MASK: tl.constexpr,
):
    """o[b, h, i] = softmax over keys j <= past + i of (q[b, h, i] . k[b, h // group, j]) * scale,
    times v; one program per (b * n_q_heads + h, block of BLOCK_M queries).

    Grid: (B * Hq, cdiv(Sq, BLOCK_M)), query blocks launched last-first: the last block of a
    head does the most work, so it should not be the one that starts in the final wave.
    """
    bh = tl.program_id(0)
    start_m = tl.num_programs(1) - 1 - tl.program_id(1)
    batch = (bh // n_q_heads).to(tl.int64)
    head = bh % n_q_heads
    kv_head = (head // group).to(tl.int64)
    past = seq_k - seq_q

    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    first_query = start_m * BLOCK_M
    queries = first_query + offs_m
    q_pos = past + queries

    q_ptrs = (q_ptr + batch * stride_qb + head.to(tl.int64) * stride_qh + first_query.to(tl.int64) * stride_qm
              + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd)
    q = tl.load(q_ptrs, mask=(queries[:, None] < seq_q) & (offs_d[None, :] < HEAD_DIM), other=0.0)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    k_base = k_ptr + batch * stride_kb + kv_head * stride_kh
    v_base = v_ptr + batch * stride_vb + kv_head * stride_vh
    mask_base = mask_ptr + batch * stride_mb

    # The first query of the block sees keys 0..past + first_query; key blocks wholly below that
    # are visible to every row: [0, full_end) needs no mask. full_end <= past + first_query + 1
    # <= seq_k since the first query is real.
    full_end = (past + first_query + 1) // BLOCK_N * BLOCK_N
    # The last query sees keys 0..past + first_query + BLOCK_M - 1: the loop ends there, and
    # the key blocks above the diagonal are never visited.
    causal_end = tl.minimum(seq_k, past + first_query + BLOCK_M)
    acc, l_i, m_i = _attend_key_blocks(
        acc, l_i, m_i, q, q_pos, k_base, v_base, mask_base,
        stride_kn, stride_kd, stride_vn, stride_vd, stride_mn,
        0, full_end, seq_k, qk_scale,
        HEAD_DIM, HEAD_DIM_V, BLOCK_D, BLOCK_DV, BLOCK_N, False, HAS_MASK,
    )
    # The diagonal blocks. Without a padding mask no row of the tile ends up with m = -inf (so
    # no NaN guard is needed): if full_end > 0 every row has seen key 0 already, and otherwise
    # key past + first_query, which every row sees, lies in the first diagonal block.
    acc, l_i, m_i = _attend_key_blocks(
        acc, l_i, m_i, q, q_pos, k_base, v_base, mask_base,
        stride_kn, stride_kd, stride_vn, stride_vd, stride_mn,
        full_end, causal_end, seq_k, qk_scale,
        HEAD_DIM, HEAD_DIM_V, BLOCK_D, BLOCK_DV, BLOCK_N, True, HAS_MASK,
    )

    if HAS_MASK:
        # A row that saw no key has acc = l = 0: its output is 0, as in the reference.
        l_i = tl.where(l_i == 0.0, 1.0, l_i)
    out = acc / l_i[:, None]
    o_ptrs = (o_ptr + batch * stride_ob + head.to(tl.int64) * stride_oh + first_query.to(tl.int64) * stride_om
              + offs_m[:, None] * stride_om + offs_dv[None, :] * stride_od)
    tl.store(o_ptrs, out.to(o_ptr.dtype.element_ty), mask=(queries[:, None] < seq_q) & (offs_dv[None, :] < HEAD_DIM_V))


@triton.jit
def attention_decode_split_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, mask_ptr, part_o_ptr, part_lse_ptr,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_mb, stride_mn,
    n_kv_heads, group, seq_q, seq_k, keys_per_split, n_splits, qk_scale,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, HAS_MASK: tl.constexpr, SINGLE_SPLIT: tl.constexpr,
):
    """One GQA group (all `group` query heads of kv head b, hk, times seq_q queries: the rows
    r = g * seq_q + i of a BLOCK_R tile) against keys [split * keys_per_split, + keys_per_split).

    Grid: (B * Hkv, n_splits). Writes the chunk's normalized partial output and base-2
    log-sum-exp per row to part_o [rows, n_splits, HEAD_DIM_V] / part_lse [rows, n_splits]
    (fp32; rows = B * Hq * Sq, in o's (b, h, i) order), or, with a single split, the output.
    keys_per_split is a multiple of BLOCK_N, so only the last block of the cache is ragged.
    """
    bkv = tl.program_id(0)
    split = tl.program_id(1)
    batch = (bkv // n_kv_heads).to(tl.int64)
    kv_head = bkv % n_kv_heads

    offs_r = tl.arange(0, BLOCK_R)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    real_row = offs_r < group * seq_q
    head = (kv_head * group + offs_r // seq_q).to(tl.int64)
    query = offs_r % seq_q
    q_pos = seq_k - seq_q + query

    q_ptrs = (q_ptr + batch * stride_qb + head[:, None] * stride_qh
              + query[:, None] * stride_qm + offs_d[None, :] * stride_qd)
    q = tl.load(q_ptrs, mask=real_row[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)

    m_i = tl.full([BLOCK_R], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_R], dtype=tl.float32)
    acc = tl.zeros([BLOCK_R, BLOCK_DV], dtype=tl.float32)
    k_base = k_ptr + batch * stride_kb + kv_head.to(tl.int64) * stride_kh
    v_base = v_ptr + batch * stride_vb + kv_head.to(tl.int64) * stride_vh
    start = split * keys_per_split
    end = tl.minimum(start + keys_per_split, seq_k)
    for start_n in range(start, end, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        keys = start_n + offs_n
        k_ptrs, v_ptrs = _kv_block_ptrs(k_base, v_base, start_n, offs_n, offs_d, offs_dv,
                                        stride_kn, stride_kd, stride_vn, stride_vd)
        k = tl.load(k_ptrs, mask=(keys[None, :] < seq_k) & (offs_d[:, None] < HEAD_DIM), other=0.0)
        qk = tl.dot(q, k, input_precision="ieee") * qk_scale
        # Causal (with Sq > 1 the first queries do not see the last keys); q_pos < seq_k, so
        # this also masks the ragged end of the cache.
        visible = keys[None, :] <= q_pos[:, None]
        if HAS_MASK:
            keep = tl.load(mask_ptr + batch * stride_mb + keys * stride_mn, mask=keys < seq_k, other=0)
            visible = visible & (keep[None, :] != 0)
        qk = tl.where(visible, qk, float("-inf"))
        # A chunk can hide every key from a row (causal or padding): m stays -inf there, and the
        # exponentials use 0 as their reference instead of producing NaN.
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(qk - m_ref[:, None])
        alpha = tl.exp2(m_i - m_ref)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_ptrs, mask=(keys[:, None] < seq_k) & (offs_dv[None, :] < HEAD_DIM_V), other=0.0)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision="ieee")
        m_i = m_new

    seen = l_i > 0.0
    out = acc / tl.where(seen, l_i, 1.0)[:, None]
    if SINGLE_SPLIT:
        o_ptrs = (o_ptr + batch * stride_ob + head[:, None] * stride_oh
                  + query[:, None] * stride_om + offs_dv[None, :] * stride_od)
        tl.store(o_ptrs, out.to(o_ptr.dtype.element_ty), mask=real_row[:, None] & (offs_dv[None, :] < HEAD_DIM_V))
    else:
        # Rows of one group are consecutive in (b, h, i) order: the group's first row plus r.
        row = ((batch * n_kv_heads + kv_head) * group * seq_q + offs_r) * n_splits + split
        lse = tl.where(seen, m_i + tl.log2(tl.where(seen, l_i, 1.0)), float("-inf"))
        tl.store(part_lse_ptr + row, lse, mask=real_row)
        tl.store(part_o_ptr + row[:, None] * HEAD_DIM_V + offs_dv[None, :], out,
                 mask=real_row[:, None] & (offs_dv[None, :] < HEAD_DIM_V))


@triton.jit
def attention_decode_combine_kernel(
    part_o_ptr, part_lse_ptr, o_ptr,
    stride_ob, stride_oh, stride_om, stride_od,
    n_q_heads, seq_q, n_splits,
    HEAD_DIM_V: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_S: tl.constexpr,
):
    """o[row] = sum_s w_s * part_o[row, s] / sum_s w_s, w_s = exp2(lse_s - max_s lse_s).

    Grid: (B * Hq * Sq,). The split outputs are summed one at a time, so registers hold one
    head-dim row whatever the number of splits (BLOCK_S >= n_splits only sizes the lse row).
    """
    row = tl.program_id(0).to(tl.int64)
    offs_s = tl.arange(0, BLOCK_S)
    offs_dv = tl.arange(0, BLOCK_DV)
    lse = tl.load(part_lse_ptr + row * n_splits + offs_s, mask=offs_s < n_splits, other=float("-inf"))
    lse_max = tl.max(lse, 0)
    # Every split hid every key from this row (padding): its output is 0, as in the reference.
    lse_max = tl.where(lse_max == float("-inf"), 0.0, lse_max)
    total = tl.sum(tl.exp2(lse - lse_max), 0)
    acc = tl.zeros([BLOCK_DV], dtype=tl.float32)
    for s in range(0, n_splits):
        weight = tl.exp2(tl.load(part_lse_ptr + row * n_splits + s) - lse_max)
        part = tl.load(part_o_ptr + (row * n_splits + s) * HEAD_DIM_V + offs_dv, mask=offs_dv < HEAD_DIM_V, other=0.0)
        acc += weight * part
    out = acc / tl.where(total > 0.0, total, 1.0)
    batch = row // (n_q_heads * seq_q)
    head = row // seq_q % n_q_heads
    query = row % seq_q
    o_ptrs = o_ptr + batch * stride_ob + head * stride_oh + query * stride_om + offs_dv * stride_od
    tl.store(o_ptrs, out.to(o_ptr.dtype.element_ty), mask=offs_dv < HEAD_DIM_V)
'''

KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Head dims up to 256 (every current model): a BLOCK_M x 256 fp32 accumulator is already as much
# as one program's registers hold; past that the head dim itself would need tiling.
MAX_HEAD_DIM = 256
# Sq up to this takes the split-KV path, if a GQA group's Sq * Hq / Hkv rows fit one tile.
DECODE_MAX_QUERIES = 4
DECODE_MAX_ROWS = 64
# tl.dot needs every dimension of a tile to be at least 16.
MIN_DOT = 16
# FlashAttention-2's limit on the number of KV splits.
MAX_SPLITS = 128
LOG2_E = 1.4426950408889634
# Triton's interpreter (3.7) multiplies the raw uint16 bits of bf16 tl.dot operands
# (triton-lang/triton#11584, "not supported yet"): interpreted bf16 calls keep the reference.
INTERPRETER_BF16_DOT = False


@dataclass(frozen=True)
class LaunchConfig:
    """Launch constants for one head dim and dtype (the kernel text does not change)."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    decode_block_n: int
    decode_warps: int
    decode_stages: int
    # The granularity of KV splits: enough keys per split that its Q load and partial store
    # stay small next to its K/V reads.
    min_keys_per_split: int


# Under the interpreter every tile op is a numpy call: small tiles keep tests fast (warps and
# stages mean nothing there).
INTERPRETER_CONFIG = LaunchConfig(
    block_m=32, block_n=32, num_warps=1, num_stages=1,
    decode_block_n=32, decode_warps=1, decode_stages=1, min_keys_per_split=64,
)


def launch_config(block_d: int, dtype: torch.dtype, interpreted: bool) -> LaunchConfig:
    """Tiles for an H100 (228 KiB of shared memory per SM, 64K registers), by padded head dim.

    16-bit inputs use the tensor cores, with the tiles of Triton's fused-attention tutorial for
    Hopper: 128 x 64 up to d = 128 (8 warps at d = 128 for the 128 x 128 fp32 accumulator),
    64 x 64 at d = 256 where Q, K and V tiles of 32 KiB each leave room for two stages. fp32
    inputs run ieee dots on the FMA units, with half the tiles (twice the bytes per element).
    Decode tiles (a GQA group's rows, at least 16) take 64 keys a step, 32 at d = 256 or in fp32;
    the split granularity follows FlashAttention-2: 256 keys up to d = 64, 128 up to 128, then 64.
    """
    if interpreted:
        return INTERPRETER_CONFIG
    min_keys = 256 if block_d <= 64 else 128 if block_d <= 128 else 64
    if dtype == torch.float32:
        return LaunchConfig(
            block_m=64 if block_d <= 128 else 32, block_n=32, num_warps=4, num_stages=2,
            decode_block_n=32, decode_warps=4, decode_stages=2, min_keys_per_split=min_keys,
        )
    if block_d <= 128:
        return LaunchConfig(
            block_m=128, block_n=64, num_warps=4 if block_d <= 64 else 8, num_stages=3,
            decode_block_n=64, decode_warps=4, decode_stages=3, min_keys_per_split=min_keys,
        )
    return LaunchConfig(
        block_m=64, block_n=64, num_warps=8, num_stages=2,
        decode_block_n=32, decode_warps=4, decode_stages=2, min_keys_per_split=min_keys,
    )


@CAUSAL_ATTENTION.register_lowering("triton")
def lower_causal_attention(req: LoweringRequest) -> Kernel:
    q, k, v, key_padding_mask, _scale = req.args
    if key_padding_mask is not None and key_padding_mask.dim() != 2:
        raise Unsupported(f"causal_attention with a {key_padding_mask.dim()}-d key padding mask (kernels read [B, Sk])")
    head_dim, head_dim_v = head_dims("causal_attention", q, k, v)
    block_d, block_dv = (max(MIN_DOT, next_power_of_2(d)) for d in (head_dim, head_dim_v))
    config = launch_config(max(block_d, block_dv), q.dtype, interpreting())
    compute_units = _compute_units(req.target)
    name = kernel_name(head_dim, head_dim_v, q.dtype)
    source = _header(name, head_dim, head_dim_v, block_d, block_dv, config, compute_units) + KERNEL_SOURCE
    why_not = why_not_loaded(req, q)
    if why_not:
        return Kernel(name, "triton", source, note=why_not)
    shapes = _Shapes(head_dim, head_dim_v, block_d, block_dv)
    module = kernel_module("causal_attention", KERNEL_SOURCE)
    return Kernel(name, "triton", source, runner=_runner(module, shapes, config, compute_units))


def why_not_loaded(req: LoweringRequest, q: Any) -> str:
    """Empty when an attention kernel over q's dtype and device runs here, else why not: as
    `why_not_runnable`, and bf16 under the interpreter (see INTERPRETER_BF16_DOT)."""
    why_not = why_not_runnable(req, q.device.type)
    if not why_not and q.dtype == torch.bfloat16 and interpreting() and not INTERPRETER_BF16_DOT:
        why_not = "not loaded: Triton's interpreter computes bf16 tl.dot on raw bits (triton-lang/triton#11584)"
    return why_not


def kernel_name(head_dim: int, head_dim_v: int, dtype: torch.dtype, op: str = "causal_attention") -> str:
    """One name per specialization: causal_attention_float16_d64 (plus _dv<n> when V differs)."""
    dv = "" if head_dim_v == head_dim else f"_dv{head_dim_v}"
    return f"{op}_{str(dtype).removeprefix('torch.')}_d{head_dim}{dv}"


def head_dims(op: str, q: Any, k: Any, v: Any) -> tuple[int, int]:
    """(D, Dv) after checking that the call site of `op` has q, k, v the kernels handle; raises
    Unsupported, so the call site keeps the reference. Batch, heads and lengths may be
    symbolic: the runner reads them per call."""
    from torch.fx.experimental.symbolic_shapes import is_concrete_int

    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        ranks = f"{q.dim()}-d, {k.dim()}-d, {v.dim()}-d"
        raise Unsupported(f"{op} kernels take [B, H, S, D] q, k, v, not {ranks}")
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in KERNEL_DTYPES:
        raise Unsupported(f"{op} with q, k, v of dtypes {q.dtype}, {k.dtype}, {v.dtype}")
    dims = (q.shape[-1], k.shape[-1], v.shape[-1])
    if not all(is_concrete_int(d) for d in dims):
        raise Unsupported(f"{op} over symbolic head dims {dims}; the kernels fix them")
    head_dim, k_dim, head_dim_v = (int(d) for d in dims)
    if head_dim != k_dim:
        raise Unsupported(f"{op} with q head dim {head_dim} and k head dim {k_dim}")
    if not (0 < head_dim <= MAX_HEAD_DIM and 0 < head_dim_v <= MAX_HEAD_DIM):
        raise Unsupported(f"{op} kernels handle head dims 1..{MAX_HEAD_DIM}, not {head_dim} (v: {head_dim_v})")
    return head_dim, head_dim_v


def _compute_units(target: Any) -> int:
    """SMs for the split heuristic: the target's figure, without calibrating a target that has none
    (then the CUDA device's own, or 1 on a host that has none)."""
    hardware = target.hardware
    if hardware is not None:
        return int(hardware.compute_units)
    if torch.cuda.is_available():
        return torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count
    return 1


def _header(
    name: str, head_dim: int, head_dim_v: int, block_d: int, block_dv: int, config: LaunchConfig, compute_units: int
) -> str:
    dims = f"HEAD_DIM={head_dim}, HEAD_DIM_V={head_dim_v}, BLOCK_D={block_d}, BLOCK_DV={block_dv}"
    return (
        f"# {name}: per call, from the shapes (group = Hq // Hkv)\n"
        f"#   prefill, Sq > {DECODE_MAX_QUERIES} or group * Sq > {DECODE_MAX_ROWS}:\n"
        f"#     attention_prefill_kernel[(B * Hq, cdiv(Sq, {config.block_m}))](..., {dims},\n"
        f"#         BLOCK_M={config.block_m}, BLOCK_N={config.block_n},"
        f" num_warps={config.num_warps}, num_stages={config.num_stages})\n"
        f"#   decode, otherwise: splits = FlashAttention-2 heuristic over {compute_units} compute units,"
        f" chunks of {config.min_keys_per_split} keys\n"
        f"#     attention_decode_split_kernel[(B * Hkv, splits)](..., {dims},\n"
        f"#         BLOCK_R=max({MIN_DOT}, next_pow2(group * Sq)), BLOCK_N={config.decode_block_n},"
        f" num_warps={config.decode_warps}, num_stages={config.decode_stages})\n"
        f"#     then, if splits > 1: attention_decode_combine_kernel[(B * Hq * Sq,)](..., BLOCK_S=next_pow2(splits))\n"
    )


def kernel_module(prefix: str, source: str) -> ModuleType:
    """Kernel `source` as an imported module, named by `prefix` and its content."""
    digest = hashlib.sha256(source.encode()).hexdigest()[:16]
    return load_module(f"{prefix}_{digest}", source)


@dataclass(frozen=True)
class _Shapes:
    head_dim: int
    head_dim_v: int
    block_d: int
    block_dv: int


def num_splits(seq_k: int, programs: int, compute_units: int, min_keys_per_split: int) -> int:
    """KV splits for `programs` (batch x kv head) decode programs: FlashAttention-2's heuristic.

    Already ~a full wave without splitting: 1. Otherwise the fewest splits whose wave efficiency
    (programs * splits / units over its ceiling) is within 85% of the best, over split counts
    that change the chunk size (11 and 12 splits of 64 chunks are both 6 chunks a split).
    """
    if programs >= 0.8 * compute_units:
        return 1
    chunks = -(-seq_k // min_keys_per_split)
    most = min(MAX_SPLITS, compute_units, chunks)
    efficiency = {}
    for splits in range(1, most + 1):
        if splits > 1 and -(-chunks // splits) == -(-chunks // (splits - 1)):
            continue
        waves = programs * splits / compute_units
        efficiency[splits] = waves / math.ceil(waves)
    best = max(efficiency.values(), default=0.0)
    return next((s for s, e in efficiency.items() if e >= 0.85 * best), 1)


def _runner(
    module: ModuleType, shapes: _Shapes, config: LaunchConfig, compute_units: int
) -> Callable[..., torch.Tensor]:
    prefill = module.attention_prefill_kernel
    decode_split = module.attention_decode_split_kernel
    decode_combine = module.attention_decode_combine_kernel
    dims = dict(
        HEAD_DIM=shapes.head_dim, HEAD_DIM_V=shapes.head_dim_v, BLOCK_D=shapes.block_d, BLOCK_DV=shapes.block_dv
    )

    def run(
        q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_padding_mask: Optional[torch.Tensor], scale: float
    ) -> torch.Tensor:
        batch, n_q_heads, seq_q, _ = q.shape
        n_kv_heads, seq_k = k.shape[1], k.shape[2]
        if seq_q > seq_k:
            raise ValueError(
                f"causal_attention: {seq_q} queries against {seq_k} keys; queries are the last Sq of the Sk positions,"
                " so Sq <= Sk"
            )
        if n_kv_heads == 0 or n_q_heads % n_kv_heads:
            raise ValueError(f"causal_attention: {n_q_heads} query heads are not groups of {n_kv_heads} kv heads")
        group = n_q_heads // n_kv_heads
        # [B, Sq, Hq, Dv] in memory, as the op's contract (SDPA's layout) says.
        out = output_like(q, v)
        if out.numel() == 0:
            return out
        has_mask = key_padding_mask is not None
        if key_padding_mask is None:
            mask, mask_strides = q, (0, 0)  # never read: HAS_MASK=False removes the loads
        else:
            if key_padding_mask.shape[0] != batch or key_padding_mask.shape[1] < seq_k:
                shape = tuple(key_padding_mask.shape)
                raise ValueError(f"causal_attention: key padding mask {shape} for batch {batch} and {seq_k} keys")
            # Triton reads bool tensors as bytes; a same-size view costs nothing.
            mask = key_padding_mask.view(torch.uint8) if key_padding_mask.dtype == torch.bool else key_padding_mask
            mask_strides = mask.stride()
        strides = (*q.stride(), *k.stride(), *v.stride(), *out.stride(), *mask_strides)
        qk_scale = float(scale) * LOG2_E

        if seq_q <= DECODE_MAX_QUERIES and group * seq_q <= DECODE_MAX_ROWS:
            programs = batch * n_kv_heads
            splits = num_splits(seq_k, programs, compute_units, config.min_keys_per_split)
            chunk = config.min_keys_per_split
            keys_per_split = -(-seq_k // (splits * chunk)) * chunk
            # Launch no split without keys (none, for the split counts the heuristic picks).
            splits = -(-seq_k // keys_per_split)
            rows = batch * n_q_heads * seq_q
            if splits == 1:
                part_o = part_lse = out  # never written: the single split stores the output itself
            else:
                part_o = torch.empty((rows, splits, shapes.head_dim_v), dtype=torch.float32, device=q.device)
                part_lse = torch.empty((rows, splits), dtype=torch.float32, device=q.device)
            decode_split[(programs, splits)](
                q, k, v, out, mask, part_o, part_lse, *strides,
                n_kv_heads, group, seq_q, seq_k, keys_per_split, splits, qk_scale, **dims,
                BLOCK_R=max(MIN_DOT, next_power_of_2(group * seq_q)), BLOCK_N=config.decode_block_n,
                HAS_MASK=has_mask, SINGLE_SPLIT=splits == 1,
                num_warps=config.decode_warps, num_stages=config.decode_stages,
            )
            if splits > 1:
                decode_combine[(rows,)](
                    part_o, part_lse, out, *out.stride(), n_q_heads, seq_q, splits,
                    HEAD_DIM_V=shapes.head_dim_v, BLOCK_DV=shapes.block_dv, BLOCK_S=next_power_of_2(splits),
                    # one head-dim row a program: a warp per 128 values (4 a thread)
                    num_warps=max(1, shapes.block_dv // 128),
                )
            return out

        grid = (batch * n_q_heads, -(-seq_q // config.block_m))
        prefill[grid](
            q, k, v, out, mask, *strides, n_q_heads, group, seq_q, seq_k, qk_scale, **dims,
            BLOCK_M=config.block_m, BLOCK_N=config.block_n, HAS_MASK=has_mask,
            num_warps=config.num_warps, num_stages=config.num_stages,
        )
        return out

    return run


def next_power_of_2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()
