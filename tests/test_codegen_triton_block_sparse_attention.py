"""Tests of the Triton lowering of `compiler::block_sparse_attention`
(compiler.codegen.triton.block_sparse_attention) under Triton's CPU interpreter, against the op's
reference (torch SDPA with the layout expanded to a dense mask): random per-head layouts, the
diagonal block's causal mask, ragged last blocks, query blocks that list nothing, GQA, padded head
dims, strided inputs, the source text, and block sizes the kernel declines.

Layouts use 32-position blocks, the kernel's tile: S = 100 leaves a ragged last block (4 positions)
that only the last query block lists, and 160 gives five blocks, enough for layouts that skip
blocks below the diagonal, skip the diagonal itself, or list nothing.

Tolerances, and why (as for the dense kernel, tests/test_codegen_triton_attention.py):
- FP32: the kernel computes exp2(x * log2 e) where the reference computes exp(x), and sums the
  softmax online, block by block with rescaling: a few ulps per term, ~1e-6 on outputs of order
  1. 1e-5 relative is ~10x above that and far below a real bug (a missed or extra key block moves
  outputs by >1e-2).
- FP16: kernel and reference each round their fp32 result to fp16 once (half an ulp, 2**-11
  relative), and the kernel also rounds P to fp16 before P @ V, as every FlashAttention does
  (2**-11 relative per weight, averaging out over the keys): outputs differ by about one fp16 ulp,
  2**-10 relative; 2**-9 relative plus 2e-3 absolute (outputs near 0 are sums with cancellation)
  bounds that with margin.
"""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"  # before anything imports triton (conftest sets it too)

import pytest
import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv, StatelessSymbolicContext

import compiler.codegen.triton  # noqa: F401 - registers the triton lowering
from compiler.capture import capture_export
from compiler.codegen import lower_graph
from compiler.codegen.triton import block_sparse_attention
from compiler.errors import Unsupported
from compiler.ops import LoweringRequest
from compiler.ops import block_sparse_attention as BLOCK_SPARSE_ATTENTION
from compiler.targets import load_target
from models import FunctionModule

FP32 = dict(rtol=1e-5, atol=1e-5)
FP16 = dict(rtol=2**-9, atol=2e-3)
MHA, GQA = (2, 2), (4, 2)
BLOCK = 32

pytestmark = pytest.mark.usefixtures("kernel_cache_in_tmp", "quiet_interpreter")


def _inputs(batch, heads, seq, head_dim, head_dim_v=None, dtype=torch.float32, seed=0):
    n_q_heads, n_kv_heads = heads
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, n_q_heads, seq, head_dim, generator=gen).to(dtype)
    k = torch.randn(batch, n_kv_heads, seq, head_dim, generator=gen).to(dtype)
    v = torch.randn(batch, n_kv_heads, seq, head_dim_v or head_dim, generator=gen).to(dtype)
    return q, k, v


def _layout(lists, n_blocks):
    """kv_blocks [B, H, NB, NB] and kv_counts [B, H, NB] from lists[b][h][qb], the key blocks of
    each query block. Entries past a count repeat a block the row does not list: the reference
    (block_mask's scatter) lets a padding entry that repeats a listed block unlist it."""
    batch, heads = len(lists), len(lists[0])
    kv_blocks = torch.zeros(batch, heads, n_blocks, n_blocks, dtype=torch.int32)
    kv_counts = torch.zeros(batch, heads, n_blocks, dtype=torch.int32)
    for b, per_head in enumerate(lists):
        for h, per_block in enumerate(per_head):
            for qb, listed in enumerate(per_block):
                unlisted = [j for j in range(n_blocks) if j not in listed][:1]
                kv_blocks[b, h, qb] = torch.tensor(listed + unlisted * (n_blocks - len(listed)))
                kv_counts[b, h, qb] = len(listed)
    return kv_blocks, kv_counts


def _random_layout(batch, n_q_heads, seq, density, seed):
    """Each causal block listed with probability `density`, per (batch, head, query block)."""
    n_blocks = -(-seq // BLOCK)
    gen = torch.Generator().manual_seed(seed)
    lists = [
        [
            [[j for j in range(qb + 1) if torch.rand((), generator=gen) < density] for qb in range(n_blocks)]
            for _ in range(n_q_heads)
        ]
        for _ in range(batch)
    ]
    return _layout(lists, n_blocks)


def _full_layout(batch, n_q_heads, seq):
    n_blocks = -(-seq // BLOCK)
    return _layout([[[list(range(qb + 1)) for qb in range(n_blocks)]] * n_q_heads] * batch, n_blocks)


def _meta_layout(batch, heads, n_blocks):
    """A layout without data, for lowerings that only look at shapes."""
    kv_blocks = torch.empty(batch, heads, n_blocks, n_blocks, dtype=torch.int32, device="meta")
    return kv_blocks, torch.empty(batch, heads, n_blocks, dtype=torch.int32, device="meta")


def _args(q, k, v, layout, block_size=BLOCK):
    return (q, k, v, *layout, q.shape[-1] ** -0.5, block_size, 0.5)


def _lower(args, run_here=True):
    return BLOCK_SPARSE_ATTENTION.lowerings["triton"](LoweringRequest(args, load_target("h100"), run_here))


def _check(args, tolerance=FP32, kernel=None):
    out = (kernel or _lower(args)).runner(*args)
    expected = BLOCK_SPARSE_ATTENTION.reference(*args)
    # The strides too: the output is [B, S, Hq, Dv] in memory, as causal_attention's.
    assert out.shape == expected.shape and out.dtype == expected.dtype and out.stride() == expected.stride()
    torch.testing.assert_close(out, expected, **tolerance)
    return out


# Layouts ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("heads", [MHA, GQA], ids=["mha", "gqa"])
@pytest.mark.parametrize("seq", [100, 160])
def test_random_layouts_match_reference(seq, heads):
    q, k, v = _inputs(2, heads, seq, 64)
    layout = _random_layout(2, heads[0], seq, density=0.5, seed=seq)
    # Each batch entry and head has its own layout.
    assert not torch.equal(layout[0][0], layout[0][1]) and not torch.equal(layout[0][0, 0], layout[0][0, 1])
    _check(_args(q, k, v, layout))


def test_full_layout_is_dense_causal_attention():
    q, k, v = _inputs(2, GQA, 100, 64)
    out = _check(_args(q, k, v, _full_layout(2, GQA[0], 100)))
    dense = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=64**-0.5, enable_gqa=True)
    torch.testing.assert_close(out, dense, **FP32)


def test_query_blocks_that_list_nothing_give_zero():
    # Per head: block 0 lists nothing; block 2 lists nothing, or only its diagonal, or only blocks
    # below it; the last (ragged) block lists a far block and its diagonal.
    q, k, v = _inputs(1, MHA, 100, 64)
    lists = [[[[], [0, 1], [], [0, 3]], [[], [1], [0, 1], [3]]]]
    out = _check(_args(q, k, v, _layout(lists, 4)))
    assert torch.all(out[0, :, :BLOCK] == 0) and torch.all(out[0, 0, 2 * BLOCK : 3 * BLOCK] == 0)
    assert torch.all(out[0, 1, 2 * BLOCK : 3 * BLOCK] != 0)


def test_entries_past_the_count_are_never_read():
    q, k, v = _inputs(1, GQA, 100, 64)
    kv_blocks, kv_counts = _random_layout(1, GQA[0], 100, density=0.5, seed=1)
    kernel = _lower(_args(q, k, v, (kv_blocks, kv_counts)))
    junk = kv_blocks.clone()
    past = torch.arange(junk.shape[-1]) >= kv_counts[..., None]
    junk[past] = 1_000_000  # out of range: a read would fault on a GPU or change the output
    assert past.any()
    clean = kernel.runner(*_args(q, k, v, (kv_blocks, kv_counts)))
    torch.testing.assert_close(kernel.runner(*_args(q, k, v, (junk, kv_counts))), clean, rtol=0, atol=0)


def test_strided_inputs_and_layout_are_read_in_place():
    # q as models make it, [B, S, H, D] transposed, every other element of a wider head dim; k
    # the first 100 positions of a longer cache; V's head dim last-but-one in memory; the layout
    # a column slice of a wider tensor and the counts a slice along the block axis.
    gen = torch.Generator().manual_seed(2)
    q = torch.randn(2, 100, 4, 96, generator=gen)[..., ::2].transpose(1, 2)
    k = torch.randn(2, 2, 128, 48, generator=gen)[:, :, :100]
    v = torch.randn(2, 2, 48, 100, generator=gen).transpose(2, 3)
    kv_blocks, kv_counts = _random_layout(2, 4, 100, density=0.6, seed=2)
    wide_blocks = torch.zeros(2, 4, 4, 8, dtype=torch.int32)
    wide_blocks[..., ::2] = kv_blocks
    wide_counts = torch.zeros(2, 4, 8, dtype=torch.int32)
    wide_counts[..., 1::2] = kv_counts
    layout = (wide_blocks[..., ::2], wide_counts[..., 1::2])
    assert not any(t.is_contiguous() for t in (q, k, v, *layout))
    _check(_args(q, k, v, layout))


# Head dims and dtypes ---------------------------------------------------------------------------


@pytest.mark.parametrize("head_dim, head_dim_v", [(48, 48), (80, 24)])
def test_head_dims_padded_to_a_power_of_two(head_dim, head_dim_v):
    q, k, v = _inputs(2, GQA, 100, head_dim, head_dim_v)
    _check(_args(q, k, v, _random_layout(2, GQA[0], 100, density=0.6, seed=head_dim)))


def test_fp16_accumulates_in_fp32():
    q, k, v = _inputs(2, GQA, 100, 64, dtype=torch.float16)
    _check(_args(q, k, v, _random_layout(2, GQA[0], 100, density=0.6, seed=3)), tolerance=FP16)


def test_bf16_under_the_stock_interpreter_keeps_the_reference():
    q, k, v = _inputs(1, MHA, 40, 64, dtype=torch.bfloat16)
    kernel = _lower(_args(q, k, v, _full_layout(1, MHA[0], 40)))
    assert kernel.runner is None and "11584" in kernel.note


# Lowering: call sites, source, where it runs ----------------------------------------------------


def test_one_kernel_serves_symbolic_batch_and_length():
    mode = FakeTensorMode(shape_env=ShapeEnv())
    # B and S symbolic, as export makes them; heads and head dims static.
    dims = [DimDynamic.DYNAMIC, DimDynamic.STATIC, DimDynamic.DYNAMIC, DimDynamic.STATIC]
    dynamic = StatelessSymbolicContext(dynamic_sizes=dims)
    q, k, v = (mode.from_tensor(t, symbolic_context=dynamic) for t in _inputs(2, GQA, 64, 64))
    layout = tuple(mode.from_tensor(t) for t in _full_layout(2, GQA[0], 64))
    kernel = _lower(_args(q, k, v, layout))
    assert kernel.name == "block_sparse_attention_float32_d64_b32"
    for batch, seq in ((1, 40), (2, 70)):
        q, k, v = _inputs(batch, GQA, seq, 64, seed=seq)
        _check(_args(q, k, v, _random_layout(batch, GQA[0], seq, density=0.6, seed=seq)), kernel=kernel)


def _graph(block_size):
    def f(q, k, v, kv_blocks, kv_counts):
        return torch.ops.compiler.block_sparse_attention(q, k, v, kv_blocks, kv_counts, 0.125, block_size, 0.5)

    return f


def test_lower_graph_replaces_the_op_with_the_kernel():
    q, k, v = _inputs(1, GQA, 70, 64)
    inputs = (q, k, v, *_random_layout(1, GQA[0], 70, density=0.6, seed=4))
    f = _graph(BLOCK)
    executable, report = lower_graph(capture_export(FunctionModule(f), inputs).gm, load_target("h100"))
    assert [kernel.name for kernel in report.kernels] == ["block_sparse_attention_float32_d64_b32"]
    assert not report.fallbacks
    torch.testing.assert_close(executable(*inputs)[0], f(*inputs), **FP32)


def test_a_declined_block_size_falls_back_with_its_reason():
    # 24-position blocks: no power-of-two tile covers a block, so the call site runs its reference.
    q, k, v = _inputs(1, GQA, 70, 64)
    inputs = (q, k, v, *_layout([[[list(range(qb + 1)) for qb in range(3)]] * GQA[0]], 3))
    f = _graph(24)
    gm = capture_export(FunctionModule(f), inputs).gm
    with pytest.warns(UserWarning, match="block_size 24"):
        executable, report = lower_graph(gm, load_target("h100"))
    assert not report.kernels
    assert len(report.fallbacks) == 1 and "power of two from 16 to 128" in report.fallbacks[0]
    torch.testing.assert_close(executable(*inputs)[0], f(*inputs), rtol=0, atol=0)


@pytest.mark.parametrize("block_size", [8, 48, 256])
def test_block_sizes_the_kernel_cannot_tile_are_declined(block_size):
    q, k, v = (torch.empty(1, 2, 64, 64, device="meta") for _ in range(3))
    layout = _meta_layout(1, 2, 1)
    with pytest.raises(Unsupported, match=f"block_size {block_size}"):
        _lower(_args(q, k, v, layout, block_size))


def test_source_is_readable_and_launches_one_kernel():
    q, k, v = _inputs(1, GQA, 40, 64)
    kernel = _lower(_args(q, k, v, _full_layout(1, GQA[0], 40)), run_here=False)
    assert kernel.runner is None and kernel.note
    source = kernel.source
    header = source.split("import triton")[0]
    assert kernel.name in header and "block_sparse_attention_kernel[(B * Hq, cdiv(S, 32))]" in header
    assert "BLOCK=32, num_warps=1, num_stages=1" in header
    assert "def block_sparse_attention_kernel(" in source and "def _attend_key_block(" in source
    # No template left unfilled, and the one source text the runner imports.
    assert not any(marker in source for marker in ("{", "}", "'''", "KEY_BLOCK_SOURCE"))
    assert source.endswith(block_sparse_attention.KERNEL_SOURCE)
    assert "tl.exp2(" in source and "tl.exp(" not in source
    assert "kv_head = (head // group)" in source  # GQA: K/V indexed, never repeated


def test_h100_launch_constants_when_not_interpreting(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    q, k, v = (torch.empty(1, 4, 256, 128, dtype=torch.float16, device="meta") for _ in range(3))
    layout = _meta_layout(1, 4, 4)
    kernel = _lower(_args(q, k, v, layout, 64))
    assert kernel.runner is None and "TRITON_INTERPRET" in kernel.note
    assert kernel.name == "block_sparse_attention_float16_d128_b64"
    # 64 x (64 + 128) fp32 values over 4 warps: 96 a thread; 32 KiB of K/V a stage, three fit.
    assert "BLOCK=64, num_warps=4, num_stages=3" in kernel.source.split("import triton")[0]
    # 128-blocks: 8 warps; 64 KiB a stage, two fit next to the 32 KiB Q tile.
    assert block_sparse_attention.launch_config(128, 128, 128, torch.bfloat16, interpreted=False) == (8, 2)
    assert block_sparse_attention.launch_config(16, 64, 64, torch.float32, interpreted=False) == (1, 3)
