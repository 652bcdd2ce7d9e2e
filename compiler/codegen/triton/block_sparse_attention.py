"""The Triton lowering of `compiler::block_sparse_attention`: FlashAttention-2 prefill over the key
blocks a per-head layout lists.

Part of the codegen step, built like the dense prefill kernel in attention.py, whose step over
one K/V block (`attention.KEY_BLOCK_SOURCE`: pointers, scores in base 2, online softmax with an
fp32 accumulator) it shares as source text: the kernel's text is that step plus the program
below, written to the artifact folder whole and imported by the runner (`runtime.load_module`).

One program per (batch * query head, query block qb); query and key blocks are both the layout's
`block_size` (BLOCK), so a listed key block is one tile. The program walks
`kv_blocks[b, h, qb, :kv_counts[b, h, qb]]` and folds each block into the online softmax. The
contract lists the blocks in increasing order and each <= qb, so the diagonal block, the only
one that needs the causal mask (and the only ragged one: the last key block is the diagonal
of the last query block), can only come last: the loop takes the listed blocks below it
unmasked, and the diagonal block, if listed, after the loop with the mask. No row of a tile
ever holds m = -inf after a step (a block below the diagonal is visible to every row; in the
diagonal block row i sees key qb * BLOCK), so the step needs no NaN guard; a query block
that lists nothing keeps acc = l = 0 and stores 0, as the contract says. GQA reads kv head
h // (Hq / Hkv), K/V never expanded. Query blocks launch last-first: causal layouts list more
blocks for later queries, so the heaviest programs should not start in the final wave.

The block size is the layout's, not a tuning choice, so the lowering takes the tiles it is
given: a power of two (Triton's tiles are) from 16 (tl.dot's smallest) to MAX_BLOCK, and
declines others (the call site keeps the reference). Numerics, int64 offsets and the
interpreter's limits (no bf16 dots) are those of attention.py.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from compiler.codegen.triton.attention import (
    KEY_BLOCK_SOURCE,
    LOG2_E,
    MIN_DOT,
    TRITON_IMPORTS,
    head_dims,
    kernel_module,
    kernel_name,
    next_power_of_2,
    why_not_loaded,
)
from compiler.codegen.triton.runtime import interpreting
from compiler.errors import Unsupported
from compiler.ops import block_sparse_attention as BLOCK_SPARSE_ATTENTION
from compiler.ops.block_sparse_attention import check_layout, num_blocks
from compiler.ops.causal_attention import effective_padding, output_like
from compiler.ops.registry import Kernel, LoweringRequest

KERNEL_NAME = "block_sparse_attention_kernel"
KERNEL_SOURCE = TRITON_IMPORTS + "\n\n" + KEY_BLOCK_SOURCE + '''

@triton.jit
def block_sparse_attention_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, blocks_ptr, counts_ptr,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_lb, stride_lh, stride_lq, stride_lj,
    stride_cb, stride_ch, stride_cq,
    n_q_heads, group, seq_len, qk_scale,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """o[b, h, i] = softmax over the keys j <= i of the key blocks listed for i's block of
    (q[b, h, i] . k[b, h // group, j]) * scale, times v; 0 for a block that lists none.

    Grid: (B * Hq, cdiv(S, BLOCK)), query blocks launched last-first.
    """
    bh = tl.program_id(0)
    q_block = tl.num_programs(1) - 1 - tl.program_id(1)
    batch = (bh // n_q_heads).to(tl.int64)
    head = bh % n_q_heads
    kv_head = (head // group).to(tl.int64)

    offs_m = tl.arange(0, BLOCK)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    first_query = q_block * BLOCK
    queries = first_query + offs_m

    q_ptrs = (q_ptr + batch * stride_qb + head.to(tl.int64) * stride_qh + first_query.to(tl.int64) * stride_qm
              + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd)
    q = tl.load(q_ptrs, mask=(queries[:, None] < seq_len) & (offs_d[None, :] < HEAD_DIM), other=0.0)

    m_i = tl.full([BLOCK], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK], dtype=tl.float32)
    acc = tl.zeros([BLOCK, BLOCK_DV], dtype=tl.float32)
    k_base = k_ptr + batch * stride_kb + kv_head * stride_kh
    v_base = v_ptr + batch * stride_vb + kv_head * stride_vh

    listed = blocks_ptr + batch * stride_lb + head.to(tl.int64) * stride_lh + q_block * stride_lq
    count = tl.load(counts_ptr + batch * stride_cb + head.to(tl.int64) * stride_ch + q_block * stride_cq)
    # Listed blocks increase and end at most at q_block: only the last can be the diagonal.
    last = tl.load(listed + (count - 1) * stride_lj, mask=count > 0, other=-1)
    has_diagonal = last == q_block
    # k_base and stride 0 stand in for the padding mask, which HAS_MASK=False never reads.
    for j in range(0, count - has_diagonal.to(tl.int32)):
        key_block = tl.load(listed + j * stride_lj)
        start_n = tl.multiple_of(key_block * BLOCK, BLOCK)
        acc, l_i, m_i = _attend_key_block(
            acc, l_i, m_i, q, queries, k_base, v_base, k_base,
            stride_kn, stride_kd, stride_vn, stride_vd, 0,
            start_n, seq_len, qk_scale,
            HEAD_DIM, HEAD_DIM_V, BLOCK_D, BLOCK_DV, BLOCK, False, False,
        )
    if has_diagonal:
        acc, l_i, m_i = _attend_key_block(
            acc, l_i, m_i, q, queries, k_base, v_base, k_base,
            stride_kn, stride_kd, stride_vn, stride_vd, 0,
            first_query, seq_len, qk_scale,
            HEAD_DIM, HEAD_DIM_V, BLOCK_D, BLOCK_DV, BLOCK, True, False,
        )

    # A block that listed nothing has acc = l = 0: its rows store 0.
    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    o_ptrs = (o_ptr + batch * stride_ob + head.to(tl.int64) * stride_oh + first_query.to(tl.int64) * stride_om
              + offs_m[:, None] * stride_om + offs_dv[None, :] * stride_od)
    o_mask = (queries[:, None] < seq_len) & (offs_dv[None, :] < HEAD_DIM_V)
    tl.store(o_ptrs, out.to(o_ptr.dtype.element_ty), mask=o_mask)
'''

# A BLOCK x BLOCK score tile and a BLOCK x Dv fp32 accumulator live in one program's registers:
# at 256 they are 4 to 5 times what the dense kernel's tiles (128 x 64 scores) hold at the same
# head dim, more than 8 warps hold without spilling.
MAX_BLOCK = 128
# fp32 values a GPU thread keeps for the score tile and the accumulator, at most: the dense
# kernel's 128 x 64 tiles at d = 64 over 4 warps hold 128 a thread.
VALUES_PER_THREAD = 128
# Shared memory for the K/V pipeline stages and the Q tile, of the H100's 227 KiB a program may
# use, leaving room for the layout conversions Triton stages through shared memory.
PIPELINE_BYTES = 160 * 1024
MAX_STAGES = 3


def launch_config(block: int, block_d: int, block_dv: int, dtype: torch.dtype, interpreted: bool) -> tuple[int, int]:
    """(num_warps, num_stages) for an H100 and the layout's block size.

    The tiles are fixed by the layout, so the warps follow the registers they need: enough that
    each thread holds at most VALUES_PER_THREAD of the fp32 score tile and accumulator (4 warps
    for 64-blocks at d = 128, 8 for 128-blocks), at most 8. The stages follow shared memory: as
    many K/V blocks in flight (up to MAX_STAGES) as fit next to the Q tile in PIPELINE_BYTES.
    Under the interpreter warps and stages mean nothing: one each.
    """
    if interpreted:
        return 1, 1
    values = block * (block + block_dv)
    num_warps = min(8, next_power_of_2(-(-values // (32 * VALUES_PER_THREAD))))
    size = dtype.itemsize
    stage_bytes = block * (block_d + block_dv) * size
    num_stages = max(1, min(MAX_STAGES, (PIPELINE_BYTES - block * block_d * size) // stage_bytes))
    return num_warps, num_stages


@BLOCK_SPARSE_ATTENTION.register_lowering("triton")
def lower_block_sparse_attention(req: LoweringRequest) -> Kernel:
    q, k, v, _kv_blocks, _kv_counts, _scale, block_size, _expected_density = req.args[:8]
    head_dim, head_dim_v = head_dims("block_sparse_attention", q, k, v)
    block = _kernel_block(block_size)
    block_d, block_dv = (max(MIN_DOT, next_power_of_2(d)) for d in (head_dim, head_dim_v))
    num_warps, num_stages = launch_config(block, block_d, block_dv, q.dtype, interpreting())
    name = f"{kernel_name(head_dim, head_dim_v, q.dtype, op='block_sparse_attention')}_b{block}"
    dims = dict(HEAD_DIM=head_dim, HEAD_DIM_V=head_dim_v, BLOCK_D=block_d, BLOCK_DV=block_dv, BLOCK=block)
    launch = ", ".join(f"{key}={value}" for key, value in dims.items())
    source = (
        f"# {name}: {KERNEL_NAME}[(B * Hq, cdiv(S, {block}))](..., {launch},"
        f" num_warps={num_warps}, num_stages={num_stages})\n{KERNEL_SOURCE}"
    )
    why_not = why_not_loaded(req, q)
    if why_not:
        return Kernel(name, "triton", source, note=why_not)
    kernel = getattr(kernel_module("block_sparse_attention", KERNEL_SOURCE), KERNEL_NAME)
    return Kernel(name, "triton", source, runner=_runner(kernel, dims, num_warps, num_stages))


def _kernel_block(block_size: Any) -> int:
    """The tile size, the layout's block size; raises Unsupported for one the kernel cannot tile."""
    if not isinstance(block_size, int) or block_size & (block_size - 1) or not MIN_DOT <= block_size <= MAX_BLOCK:
        raise Unsupported(
            f"block_sparse_attention with block_size {block_size}: the kernel tiles by it, so it must be a"
            f" power of two from {MIN_DOT} to {MAX_BLOCK}"
        )
    return block_size


def _runner(kernel: Any, dims: dict[str, int], num_warps: int, num_stages: int) -> Callable[..., torch.Tensor]:
    block = dims["BLOCK"]

    def run(
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        kv_blocks: torch.Tensor,
        kv_counts: torch.Tensor,
        scale: float,
        block_size: int,
        expected_density: float,
        key_padding_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if effective_padding(key_padding_mask, q.shape[2]) is not None:
            # padded keys: the reference (the kernel takes the common all-ones case)
            return BLOCK_SPARSE_ATTENTION.reference(q, k, v, kv_blocks, kv_counts, scale, block_size, expected_density, key_padding_mask)
        if block_size != block:
            raise ValueError(f"block_sparse_attention: kernel for {block}-blocks called with block_size {block_size}")
        check_layout(q, k, kv_blocks, kv_counts, block_size)
        batch, n_q_heads, seq_len, _ = q.shape
        # [B, S, Hq, Dv] in memory, as the op's contract says.
        out = output_like(q, v)
        if out.numel() == 0:
            return out
        grid = (batch * n_q_heads, num_blocks(seq_len, block))
        kernel[grid](
            q, k, v, out, kv_blocks, kv_counts,
            *q.stride(), *k.stride(), *v.stride(), *out.stride(), *kv_blocks.stride(), *kv_counts.stride(),
            n_q_heads, n_q_heads // k.shape[1], seq_len, float(scale) * LOG2_E, **dims,
            num_warps=num_warps, num_stages=num_stages,
        )
        return out

    return run
