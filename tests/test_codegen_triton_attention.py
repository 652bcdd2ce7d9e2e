"""Tests of the Triton lowering of `compiler::causal_attention` (compiler.codegen.triton.attention)
under Triton's CPU interpreter, against the op's reference (torch SDPA with an explicit mask):
the FlashAttention-2 prefill kernel, the split-KV decode kernels, GQA, padded head dims, strided
inputs, key padding masks, and the source text and launch constants made for an H100.

Under the interpreter the lowering uses 32 x 32 tiles, and splits the KV cache in chunks of 64
keys, so small shapes cross every boundary: Sq = 33 and 70 leave ragged query and key blocks,
70 needs three query blocks with one or two diagonal key blocks each, and a decode step against
300 keys takes five splits and the combine kernel.

Tolerances, and why:
- FP32: the kernels compute exp2(x * log2 e) where the reference computes exp(x), and sum the
  softmax online, block by block with rescaling, where the reference sums a whole row: a few
  ulps per term, ~1e-6 relative on outputs of order 1 (seen: <= 1e-6 absolute). 1e-5 relative
  is ~10x above that and far below a real bug (a missed or extra key moves outputs by >1e-2).
- FP16: each of the kernel and the reference rounds its fp32 result to fp16 once (half an ulp,
  2**-11 relative), and the kernel also rounds P to fp16 before P @ V as every FlashAttention
  does (2**-11 relative per weight, averaging out over the keys): outputs differ by about one
  fp16 ulp, 2**-10 relative; 2**-9 relative plus 2e-3 absolute (outputs near 0 are sums with
  cancellation) bounds that with margin.
- BF16: the same argument with bf16 ulps (2**-7), except that Triton's interpreter rounds fp32
  to bf16 by truncation where a GPU rounds to nearest: each of the kernel's two roundings may
  be a whole ulp off, hence 2**-6 relative.
"""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"  # before anything imports triton (conftest sets it too)


import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv, StatelessSymbolicContext

import compiler.codegen.triton  # noqa: F401 - registers the triton lowering
from compiler.capture import capture_export
from compiler.codegen import lower_graph
from compiler.codegen.triton import attention
from compiler.errors import Unsupported
from compiler.ops import LoweringRequest
from compiler.ops import causal_attention as CAUSAL_ATTENTION
from compiler.targets import load_target
from models import FunctionModule

FP32 = dict(rtol=1e-5, atol=1e-5)
FP16 = dict(rtol=2**-9, atol=2e-3)
BF16_INTERPRETED = dict(rtol=2**-6, atol=2e-2)
MHA, GQA2, GQA3 = (2, 2), (4, 2), (6, 3)


pytestmark = pytest.mark.usefixtures("kernel_cache_in_tmp", "quiet_interpreter")


def _inputs(batch, heads, seq_q, seq_k, head_dim, head_dim_v=None, dtype=torch.float32, seed=0):
    n_q_heads, n_kv_heads = heads
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, n_q_heads, seq_q, head_dim, generator=gen).to(dtype)
    k = torch.randn(batch, n_kv_heads, seq_k, head_dim, generator=gen).to(dtype)
    v = torch.randn(batch, n_kv_heads, seq_k, head_dim_v or head_dim, generator=gen).to(dtype)
    return q, k, v


def _lower(q, k, v, mask=None, run_here=True):
    scale = q.shape[-1] ** -0.5
    return CAUSAL_ATTENTION.lowerings["triton"](LoweringRequest((q, k, v, mask, scale), load_target("h100"), run_here))


def _check(q, k, v, mask=None, tolerance=FP32, kernel=None):
    kernel = kernel or _lower(q, k, v, mask)
    scale = q.shape[-1] ** -0.5
    out = kernel.runner(q, k, v, mask, scale)
    expected = CAUSAL_ATTENTION.reference(q, k, v, mask, scale)
    # The strides too: captured graphs view the transposed output without a copy.
    assert out.shape == expected.shape and out.dtype == expected.dtype and out.stride() == expected.stride()
    torch.testing.assert_close(out, expected, **tolerance)


# Prefill ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("heads", [MHA, GQA2, GQA3], ids=["mha", "gqa2", "gqa3"])
@pytest.mark.parametrize("seq", [1, 5, 33, 70])
def test_matches_reference_fp32(seq, heads):
    # seq 1 is a decode step (split kernel); the others run the prefill kernel.
    _check(*_inputs(2, heads, seq, seq, 64))


@pytest.mark.parametrize("head_dim, head_dim_v", [(48, 48), (80, 80), (48, 24)])
def test_head_dims_padded_to_a_power_of_two(head_dim, head_dim_v):
    for seq_q in (33, 1):  # prefill, decode
        _check(*_inputs(2, GQA2, seq_q, 33, head_dim, head_dim_v))


def test_chunked_prefill_sees_the_cache_and_its_own_prefix():
    # 9 new queries after 31 cached keys: query i sees keys 0..31 + i.
    _check(*_inputs(2, GQA3, 9, 40, 64))


# Decode -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("seq_k", [1, 7, 300])
@pytest.mark.parametrize("heads", [MHA, GQA3], ids=["mha", "gqa3"])
def test_decode_step_matches_reference(seq_k, heads):
    # 300 keys: 5 splits merged by the combine kernel; 1 and 7 keys: one split stores directly.
    splits = attention.num_splits(seq_k, 2 * heads[1], 132, attention.INTERPRETER_CONFIG.min_keys_per_split)
    assert splits == (5 if seq_k == 300 else 1)
    _check(*_inputs(2, heads, 1, seq_k, 64))


@pytest.mark.parametrize("seq_q, seq_k", [(3, 40), (4, 300)])
def test_decode_of_a_few_queries_is_causal_within_the_chunk(seq_q, seq_k):
    # Several queries per GQA row tile; with 300 keys the last split holds keys the first
    # queries must not see.
    _check(*_inputs(2, GQA2, seq_q, seq_k, 64))


def test_decode_split_count_follows_the_wave_heuristic():
    # 2 x 2 programs on 132 SMs: as many 64-key chunks as there are (300 keys -> 5 splits).
    assert attention.num_splits(300, 4, 132, 64) == 5
    # A full wave of programs already: no split.
    assert attention.num_splits(300_000, 128, 132, 256) == 1
    # One program, 4096 chunks: the best eligible count is 128 splits of 32 chunks (128/132 of a
    # wave); the fewest within 85% of that is 111 splits of 37 chunks (109 and 110 also give 38).
    assert attention.num_splits(1 << 20, 1, 132, 256) == 111
    # 64 chunks, 12 units: 12 splits would fill them but give 6 chunks a split, as 11 do, so 12
    # is not eligible; the best is then 11 (11/12 of a wave) and the fewest within 85% of it 10.
    assert attention.num_splits(64 * 64, 1, 12, 64) == 10


# Dtypes -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("seq_q, seq_k", [(33, 33), (1, 300)])
def test_fp16_accumulates_in_fp32(seq_q, seq_k):
    _check(*_inputs(2, GQA2, seq_q, seq_k, 64, dtype=torch.float16), tolerance=FP16)


@pytest.fixture
def interpreter_bf16_dot(monkeypatch):
    """Triton's interpreter with bf16 tl.dot fixed (triton-lang/triton#11584): the operands are
    converted to fp32, exact for bf16 values, as a GPU's tensor cores multiply them."""
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter

    real_dot = interpreter.InterpreterBuilder.create_dot

    def as_fp32(handle):
        if handle.dtype != tl.bfloat16:
            return handle
        data = interpreter._convert_float(handle.data, tl.bfloat16, tl.float32, None).view(np.float32)
        return interpreter.TensorHandle(data, tl.float32)

    def create_dot(self, a, b, d, *rest):
        return real_dot(self, as_fp32(a), as_fp32(b), d, *rest)

    monkeypatch.setattr(interpreter.InterpreterBuilder, "create_dot", create_dot)
    monkeypatch.setattr(attention, "INTERPRETER_BF16_DOT", True)


@pytest.mark.parametrize("seq_q, seq_k", [(33, 33), (1, 300)])
def test_bf16_accumulates_in_fp32(interpreter_bf16_dot, seq_q, seq_k):
    _check(*_inputs(2, GQA2, seq_q, seq_k, 64, dtype=torch.bfloat16), tolerance=BF16_INTERPRETED)


def test_bf16_under_the_stock_interpreter_keeps_the_reference():
    kernel = _lower(*_inputs(1, MHA, 4, 4, 64, dtype=torch.bfloat16))
    assert kernel.runner is None and "11584" in kernel.note and "attention_prefill_kernel" in kernel.source


# Layouts ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("seq_q", [33, 1])
def test_strided_inputs_are_read_in_place(seq_q):
    # q as models make it, [B, S, H, D] transposed to [B, H, S, D], and every other element of
    # its head dim; k and v the first 33 positions of a longer cache, V's head dim last-but-one
    # in memory.
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(2, seq_q, 4, 96, generator=gen)[..., ::2].transpose(1, 2)
    k = torch.randn(2, 2, 64, 48, generator=gen)[:, :, :33]
    v = torch.randn(2, 2, 48, 64, generator=gen).transpose(2, 3)[:, :, :33]
    assert not (q.is_contiguous() or k.is_contiguous() or v.is_contiguous())
    _check(q, k, v)


def test_empty_batch_and_too_many_queries():
    q, k, v = _inputs(0, GQA2, 5, 5, 64)
    _check(q, k, v)
    q, k, v = _inputs(1, GQA2, 6, 5, 64)
    with pytest.raises(ValueError, match="Sq <= Sk"):
        _lower(q, k, v).runner(q, k, v, None, 0.125)


# Key padding mask -------------------------------------------------------------------------------


def _left_padded(batch, length, padding, dtype=torch.int64):
    """HF's attention_mask for left-padded prompts: row b starts with padding[b] zeros."""
    mask = torch.ones(batch, length, dtype=dtype)
    for row, pad in enumerate(padding):
        mask[row, :pad] = 0
    return mask


@pytest.mark.parametrize("seq_q", [70, 9, 1])
def test_padding_mask_in_kernel(seq_q):
    # Row 0: the first 40 keys are padding, so in prefill its first queries see no key at all
    # (output 0, as in the reference) and whole 32-key blocks are masked; row 1 has a hole.
    q, k, v = _inputs(2, GQA2, seq_q, 70, 64)
    mask = _left_padded(2, 80, [40, 0])  # longer than Sk: only the first 70 columns count
    mask[1, 50:60] = 0
    _check(q, k, v, mask)
    _check(q, k, v, mask.bool())


def test_padding_mask_hides_whole_decode_splits():
    # 300 keys in five 64-key splits: row 0 masks the first two splits entirely, row 1 all keys.
    q, k, v = _inputs(2, GQA3, 2, 300, 64)
    mask = _left_padded(2, 300, [128, 300])
    out = _lower(q, k, v, mask).runner(q, k, v, mask, 0.125)
    assert torch.all(out[1] == 0)
    _check(q, k, v, mask)


def test_all_ones_mask_equals_no_mask():
    q, k, v = _inputs(2, GQA2, 33, 33, 64)
    kernel = _lower(q, k, v)
    mask = torch.ones(2, 33, dtype=torch.bool)
    torch.testing.assert_close(kernel.runner(q, k, v, mask, 0.125), kernel.runner(q, k, v, None, 0.125), rtol=0, atol=0)


# Lowering: call sites, source, where it runs ----------------------------------------------------


def test_one_kernel_serves_symbolic_batch_and_lengths():
    mode = FakeTensorMode(shape_env=ShapeEnv())
    # B and the lengths symbolic, as export makes them; heads and head dims static.
    dims = [DimDynamic.DYNAMIC, DimDynamic.STATIC, DimDynamic.DYNAMIC, DimDynamic.STATIC]
    dynamic = StatelessSymbolicContext(dynamic_sizes=dims)
    fakes = [mode.from_tensor(t, symbolic_context=dynamic) for t in _inputs(2, GQA2, 8, 8, 64)]
    kernel = _lower(*fakes)
    assert kernel.name == "causal_attention_float32_d64"
    for seq_q, seq_k in ((1, 20), (21, 21)):
        _check(*_inputs(3, GQA2, seq_q, seq_k, 64, seed=seq_k), kernel=kernel)


def test_lower_graph_replaces_the_op_with_the_kernel():
    q, k, v = _inputs(1, GQA2, 6, 6, 64)
    mask = _left_padded(1, 6, [2])

    def f(q, k, v, mask):
        return torch.ops.compiler.causal_attention(q, k, v, mask, 0.125)

    gm = capture_export(FunctionModule(f), (q, k, v, mask)).gm
    executable, report = lower_graph(gm, load_target("h100"))
    assert [kernel.name for kernel in report.kernels] == ["causal_attention_float32_d64"]
    assert not report.fallbacks
    torch.testing.assert_close(executable(q, k, v, mask)[0], f(q, k, v, mask), **FP32)


def test_source_is_flash_attention_with_a_causal_loop_bound():
    kernel = _lower(*_inputs(1, GQA2, 4, 4, 64), run_here=False)
    source = kernel.source
    header = source.split("import triton")[0]  # the launch of each kernel, as comments
    for name in ("attention_prefill_kernel", "attention_decode_split_kernel", "attention_decode_combine_kernel"):
        assert f"def {name}(" in source and f"{name}[(" in header
    assert source.count("tl.dot(") == 4 and "tl.exp2(" in source and "tl.exp(" not in source
    # The prefill key loop ends at the last key its last query sees: the diagonal, not Sk.
    assert "causal_end = tl.minimum(seq_k, past + first_query + BLOCK_M)" in source
    assert "full_end, causal_end, seq_k" in source
    assert "kv_head = (head // group)" in source  # GQA: K/V indexed, never repeated


def test_h100_launch_constants_when_not_interpreting(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    q, k, v = (t.to("meta") for t in _inputs(1, GQA2, 4, 4, 64, dtype=torch.float16))
    kernel = _lower(q, k, v)
    assert kernel.runner is None and "TRITON_INTERPRET" in kernel.note
    header = kernel.source.split("import triton")[0]
    assert kernel.name == "causal_attention_float16_d64" and kernel.name in header
    assert "BLOCK_M=128, BLOCK_N=64, num_warps=4, num_stages=3" in header
    assert "132 compute units, chunks of 256 keys" in header
    assert attention.launch_config(128, torch.bfloat16, interpreted=False).num_warps == 8


def test_source_only_when_not_asked_to_run():
    kernel = _lower(*_inputs(1, GQA2, 4, 4, 64), run_here=False)
    assert kernel.runner is None and kernel.note and "BLOCK_M=32, BLOCK_N=32" in kernel.source


@pytest.mark.parametrize(
    "shapes, dtype, match",
    [
        (((1, 2, 4, 512), (1, 2, 4, 512), (1, 2, 4, 512)), torch.float32, "head dims"),
        (((1, 2, 4, 64), (1, 2, 4, 64), (1, 2, 4, 64)), torch.float64, "float64"),
        (((1, 2, 4, 64), (1, 2, 4, 32), (1, 2, 4, 64)), torch.float32, "k head dim 32"),
        (((2, 4, 64), (2, 4, 64), (2, 4, 64)), torch.float32, r"\[B, H, S, D\]"),
    ],
)
def test_unsupported_call_sites_keep_the_reference(shapes, dtype, match):
    q, k, v = (torch.empty(shape, dtype=dtype, device="meta") for shape in shapes)
    with pytest.raises(Unsupported, match=match):
        _lower(q, k, v)
