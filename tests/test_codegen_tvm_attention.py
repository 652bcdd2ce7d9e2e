"""Tests of the TVM lowering of compiler::causal_attention (compiler.codegen.tvm.attention): the
host kernels against the op's reference (prefill with its causal skip and diagonal mask, split-KV
decode, chunked prefill, GQA and MHA, sizes that blocks do not divide, key padding masks), one
build serving every length, the disk cache, the CUDA source, and what falls back to the reference.

Tolerance: the kernels sum scores, exponentials and products in another order than the reference
(register tiles, vector lanes, per-block rescaling, split-KV partials) and their exp is a
polynomial a few ulp from the correctly rounded one. Outputs are convex combinations of V rows
(|V| ~ 1 here), so this moves them by ~1e-6 at these lengths (measured <= 6e-7); 1e-5 absolute
and relative leaves room and is far below a real bug (a wrong mask or rescale moves them by 1e-2).
"""

from __future__ import annotations

import time

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv, StatelessSymbolicContext

import compiler.codegen.tvm  # noqa: F401 - registers the tvm lowering
from compiler.codegen.tvm import build
from compiler.errors import Unsupported
from compiler.ops import LoweringRequest
from compiler.ops import causal_attention as CAUSAL_ATTENTION
from compiler.targets import load_target

FP32 = dict(rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module", autouse=True)
def _shared_cache(tmp_path_factory):
    """One kernel cache for the module: each head configuration is built once."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("COMPILER_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
        yield


def _fake(t: torch.Tensor, mode: FakeTensorMode) -> torch.Tensor:
    """A FakeTensor for `t` with symbolic batch and sequence dims, as a dynamic capture gives."""
    dims = [DimDynamic.DYNAMIC, DimDynamic.STATIC, DimDynamic.DYNAMIC, DimDynamic.STATIC]
    return mode.from_tensor(t, symbolic_context=StatelessSymbolicContext(dynamic_sizes=dims))


def _lower(
    q_heads, kv_heads, d, target="host", dtype=torch.float32, device="cpu", symbolic=True, queries=5, padded=False
):
    """The kernel for a call site with these heads (and a key padding mask when `padded`);
    symbolic lengths give prefill and decode."""
    q = torch.empty(2, q_heads, queries, d, dtype=dtype, device=device)
    kv = torch.empty(2, kv_heads, 8, d, dtype=dtype, device=device)
    mask = torch.ones(2, 8, dtype=torch.bool, device=device) if padded else None
    if symbolic:
        mode = FakeTensorMode(shape_env=ShapeEnv())
        q, kv = _fake(q, mode), _fake(kv, mode)
        if padded:
            dynamic = StatelessSymbolicContext(dynamic_sizes=[DimDynamic.DYNAMIC, DimDynamic.DYNAMIC])
            mask = mode.from_tensor(mask, symbolic_context=dynamic)
    req = LoweringRequest((q, kv, kv, mask, d**-0.5), load_target(target), True)
    return CAUSAL_ATTENTION.lowerings["tvm"](req)


@pytest.fixture(scope="module")
def kernels():
    """Kernels by (Hq, Hkv, D[, padded]), built on first use and shared by the tests."""
    built = {}

    def get(q_heads, kv_heads, d, padded=False):
        key = (q_heads, kv_heads, d, padded)
        if key not in built:
            built[key] = _lower(q_heads, kv_heads, d, padded=padded)
        return built[key]

    return get


def _inputs(batch, q_heads, kv_heads, queries, keys, d, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, q_heads, queries, d, generator=gen)
    k = torch.randn(batch, kv_heads, keys, d, generator=gen)
    v = torch.randn(batch, kv_heads, keys, d, generator=gen)
    return q, k, v


def _check(kernel, q, k, v, equal_nan=False):
    scale = q.shape[-1] ** -0.5
    out = kernel.runner(q, k, v, None, scale)
    expected = CAUSAL_ATTENTION.reference(q, k, v, None, scale)
    assert out.shape == expected.shape and out.dtype == expected.dtype
    # SDPA's layout, [B, Sq, Hq, Dv] viewed as [B, Hq, Sq, Dv]: captured graphs view its transpose.
    assert out.transpose(1, 2).is_contiguous()
    torch.testing.assert_close(out, expected, equal_nan=equal_nan, **FP32)
    return out


@pytest.fixture
def reference_outside_the_runner(monkeypatch):
    """The op's reference, which the runner may no longer fall back to: the test fails if it does."""
    reference = CAUSAL_ATTENTION.reference

    def fail(*args):
        raise AssertionError("the runner fell back to the reference")

    monkeypatch.setattr(CAUSAL_ATTENTION, "reference", fail)
    return reference


# Prefill and decode against the reference ------------------------------------------------------


@pytest.mark.parametrize("length", [1, 7, 65, 130])
@pytest.mark.parametrize("heads", [(9, 3), (4, 2), (4, 4)])
def test_matches_reference_at_lengths_blocks_do_not_divide(kernels, heads, length):
    # Blocks are 64 keys and 64 (9/3), 60 (4/2) or 72 (4/4) queries: 65 and 130 end mid-block,
    # 130 runs unmasked blocks below the diagonal; length 1 is a decode step.
    d = 32 if heads == (4, 4) else 64
    q, k, v = _inputs(2, *heads, length, length, d, seed=length)
    _check(kernels(*heads, d), q, k, v)


@pytest.mark.parametrize("keys", [1, 5, 1000])
def test_decode_one_query_against_the_cache(kernels, keys):
    # 1000 keys: four split-KV chunks (the last one partial) combined.
    q, k, v = _inputs(2, 9, 3, 1, keys, 64, seed=keys)
    _check(kernels(9, 3, 64), q, k, v)


@pytest.mark.parametrize("queries, keys", [(16, 40), (70, 200), (2, 129)])
def test_chunked_prefill_aligns_queries_to_the_end_of_the_keys(kernels, queries, keys):
    q, k, v = _inputs(1, 9, 3, queries, keys, 64, seed=keys)
    _check(kernels(9, 3, 64), q, k, v)


@pytest.mark.parametrize("queries, keys", [(20, 20), (130, 130), (16, 40), (1, 5), (1, 1000)])
def test_key_padding_mask_is_applied_in_the_kernel(kernels, reference_outside_the_runner, queries, keys):
    q, k, v = _inputs(3, 9, 3, queries, keys, 64, seed=keys)
    # Left padding; a run of masked keys across key blocks (and decode chunks); and a mask longer
    # than the keys (Dynamo gives it a length of its own), whose tail the kernel must not read.
    mask = torch.ones(3, keys + 5, dtype=torch.bool)
    mask[1, : keys // 3] = False
    mask[2, keys // 4 : keys // 4 + 70] = False
    mask[:, keys:] = False
    out = kernels(9, 3, 64, padded=True).runner(q, k, v, mask, 0.125)
    torch.testing.assert_close(out, reference_outside_the_runner(q, k, v, mask, 0.125), **FP32)


def test_rows_without_a_visible_key_give_zero_like_sdpa(kernels, reference_outside_the_runner):
    q, k, v = _inputs(2, 9, 3, 24, 24, 64)
    mask = torch.ones(2, 24, dtype=torch.int64)  # an integer mask reads as its truth values
    mask[0, :10] = 0  # queries 0..9 of sequence 0 see no key
    mask[1] = 0
    out = kernels(9, 3, 64, padded=True).runner(q, k, v, mask, 0.125)
    expected = reference_outside_the_runner(q, k, v, mask, 0.125)
    assert not expected[0, :, :10].any() and not expected[1].any()
    torch.testing.assert_close(out, expected, **FP32)


def test_mask_the_kernel_cannot_read_falls_back_exactly(kernels):
    q, k, v = _inputs(2, 9, 3, 20, 20, 64)
    mask = torch.ones(1, 20, dtype=torch.bool)  # one row for both sequences: the reference broadcasts
    mask[0, :3] = False
    out = kernels(9, 3, 64, padded=True).runner(q, k, v, mask, 0.125)
    assert torch.equal(out, CAUSAL_ATTENTION.reference(q, k, v, mask, 0.125))
    # A call site without a mask has kernels without one.
    out = kernels(9, 3, 64).runner(q, k, v, torch.ones(2, 20, dtype=torch.bool), 0.125)
    assert torch.equal(out, CAUSAL_ATTENTION.reference(q, k, v, torch.ones(2, 20, dtype=torch.bool), 0.125))


def test_nan_propagates_like_the_reference(kernels):
    q, k, v = _inputs(1, 9, 3, 70, 70, 64)
    k[0, 1, 50, 3] = float("nan")  # queries from position 50 on, of KV head 1, see it
    out = _check(kernels(9, 3, 64), q, k, v, equal_nan=True)
    assert out[0, 3:6, 50:].isnan().all() and not out[0, 3:6, :50].isnan().any()


def test_more_queries_than_keys_raises_the_ops_error(kernels):
    q, k, v = _inputs(1, 9, 3, 8, 4, 64)
    with pytest.raises(ValueError, match="Sq <= Sk"):
        kernels(9, 3, 64).runner(q, k, v, None, 0.125)


def test_misaligned_and_strided_inputs(kernels):
    q, k, v = _inputs(1, 9, 3, 24, 24, 64)
    # [B, S, H, D] transposed to [B, H, S, D], as HF models give them, and one that starts 4
    # bytes into its storage: the runner copies what the kernel cannot read in place.
    qs = q.transpose(1, 2).contiguous().transpose(1, 2)
    ks = torch.cat([torch.zeros(1), k.flatten()])[1:].view(k.shape)
    _check(kernels(9, 3, 64), qs, ks, v)


# Builds, the cache, the sources ------------------------------------------------------------------


def test_one_build_serves_every_length_and_batch(monkeypatch, kernels):
    kernel = kernels(4, 2, 64)
    compiles = []
    real_compile = build._compile
    monkeypatch.setattr(build, "_compile", lambda *a: compiles.append(a) or real_compile(*a))
    assert "sq" in kernel.source and "sk" in kernel.source  # lengths are TIR vars
    for batch, queries, keys in ((1, 3, 3), (3, 100, 100), (1, 1, 77)):
        _check(kernel, *_inputs(batch, 4, 2, queries, keys, 64))
    assert not compiles


def test_second_lowering_loads_the_disk_cache(monkeypatch, kernels):
    kernel = kernels(9, 3, 64)
    assert kernel.name == "causal_attention_float32_hq9_hkv3_d64_dv64_prefill_decode"
    libraries = {path.name.split("-")[0] for path in build._BUILT}
    assert {"causal_attention_float32_hq9_hkv3_d64_dv64_prefill", "causal_attention_float32_hq9_hkv3_d64_dv64_decode"} <= libraries
    compiles = []
    real_compile = build._compile
    monkeypatch.setattr(build, "_compile", lambda *a: compiles.append(a) or real_compile(*a))
    monkeypatch.setattr(build, "_BUILT", {})  # as a new process would: only the disk cache left
    start = time.perf_counter()
    again = _lower(9, 3, 64)
    assert not compiles and time.perf_counter() - start < 5
    _check(again, *_inputs(1, 9, 3, 9, 9, 64))


def test_static_lengths_build_only_the_phase_they_need(monkeypatch, kernels):
    kernels(9, 3, 64)  # both phases built: the static call sites load them
    compiles = []
    real_compile = build._compile
    monkeypatch.setattr(build, "_compile", lambda *a: compiles.append(a) or real_compile(*a))
    prefill = _lower(9, 3, 64, symbolic=False, queries=5)
    decode = _lower(9, 3, 64, symbolic=False, queries=1)
    assert prefill.name.endswith("_prefill") and decode.name.endswith("_decode") and not compiles
    _check(prefill, *_inputs(2, 9, 3, 5, 5, 64))
    _check(decode, *_inputs(2, 9, 3, 1, 8, 64))


def test_source_only_when_not_asked_to_run(tmp_path, monkeypatch):
    monkeypatch.setenv("COMPILER_CACHE_DIR", str(tmp_path))
    q = torch.empty(1, 9, 4, 64)
    kv = torch.empty(1, 3, 4, 64)
    kernel = CAUSAL_ATTENTION.lowerings["tvm"](LoweringRequest((q, kv, kv, None, 0.125), load_target("host"), False))
    assert kernel.runner is None and "T.prim_func" in kernel.source
    assert not list(tmp_path.glob("tvm/*.so"))


@pytest.mark.parametrize("padded", [False, True])
def test_cuda_target_gives_cuda_source_and_no_runner(padded):
    kernel = _lower(9, 3, 64, target="h100", padded=padded)
    assert kernel.runner is None and kernel.note and kernel.language == "cuda"
    # Prefill, and decode's two kernels (chunks, then their combination), each declared and defined.
    assert kernel.source.count("__global__") == 6 and "__syncthreads" in kernel.source
    assert ("pad_ptr" in kernel.source) == padded  # the mask is an argument of the kernels


# What the lowering declines ----------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_is_unsupported(dtype):
    with pytest.raises(Unsupported, match="float32"):
        _lower(9, 3, 64, dtype=dtype)


def test_head_dim_off_the_vector_width_is_unsupported():
    with pytest.raises(Unsupported, match="multiples of"):
        _lower(4, 2, 9)


def test_llvm_kernel_needs_cpu_tensors():
    with pytest.raises(Unsupported, match="meta"):
        _lower(9, 3, 64, device="meta", symbolic=False)
