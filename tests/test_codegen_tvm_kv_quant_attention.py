"""Tests of the TVM lowering of compiler::quantized_kv_attention
(compiler.codegen.tvm.kv_quant_attention): the host decode kernel against the op's reference
(dequantize to fp32, then SDPA) for 8/4/2-bit codes, key groups of 32/64/128 tokens, value
groups of 32/64 channels, codes read as bytes and as words, GQA and MHA, batch 2, and cache
lengths the chunks do not divide (no quantized token, no residual token, one residual token,
4096 + 37 tokens); one build serving every length; and what falls back to the reference.

Tolerance: the kernel computes the reference's sums in another order and rounding, all in fp32
(scores in vector lanes, outputs over chunks of 256 keys combined at the end, exp a polynomial a
few ulp from the correctly rounded one). It also folds each key group's scales into the query
and its minimums into one constant (q . k = sum_d (q_d s_d) code_d + sum_d q_d m_d) and each
value's scale into its softmax weight (out = sum_t (p_t s_t) code_t + sum_t p_t m_t). The two
sums of an output are each about |min| ~ 2 for randn data while the output, an average of value
rows, is ~0.1 over a few hundred keys, so their fp32 rounding (~1e-7 relative, accumulated over
up to N = 4133 keys) moves it by ~1e-6; scores move by ~1e-7 relative, which the softmax passes
on as ~1e-6 relative. Measured: <= 2e-6 from the reference (<= 1.6e-6 from an fp64 evaluation,
which the reference is within 4e-7 of). 2e-5 absolute and relative leaves room and is far below
a real bug: one token's codes read 6% off moves outputs by 7e-4 among 4133 keys, 2e-2 among 129.
"""

from __future__ import annotations

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv, StatelessSymbolicContext

import compiler.codegen.tvm  # noqa: F401 - registers the tvm lowering
from compiler.codegen.tvm import build
from compiler.errors import Unsupported
from compiler.ops import LoweringRequest
from compiler.ops import kv_quant
from compiler.ops import quantized_kv_attention as QUANTIZED_KV_ATTENTION
from compiler.targets import load_target

FP32 = dict(rtol=2e-5, atol=2e-5)
# Builds the tests share, by name: (Hq, Hkv, D, Dv, bits, Gk, Gv). The first reads 4-bit codes as
# words (a row of 64 channels is one vector of 8 words), the MHA ones at D = 32 as bytes; 2-bit
# keys at D = 128 are words, their values (groups of 64 channels) bytes.
BUILDS = {
    "int4": (9, 3, 64, 64, 4, 128, 64),
    "int2": (9, 3, 64, 64, 2, 32, 32),
    "int8": (9, 3, 64, 64, 8, 64, 32),
    "int4_mha": (4, 4, 32, 32, 4, 32, 32),
    "int2_mha_d128": (2, 2, 128, 128, 2, 64, 64),
}


@pytest.fixture(scope="module", autouse=True)
def _shared_cache(tmp_path_factory):
    """One kernel cache for the module: each build is compiled once."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("COMPILER_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
        yield


def _example(q_heads, kv_heads, d, dv, bits, k_group, v_group, queries=1, dtype=torch.float32, device="cpu"):
    """Arguments of a call site (tensors of 2 quantized groups and 3 residual tokens)."""
    per = 8 // bits
    nq, nr = 2 * k_group, 3
    codes = dict(dtype=torch.uint8, device=device)
    scales = dict(dtype=torch.float16, device=device)
    return (
        torch.empty(2, q_heads, queries, d, dtype=dtype, device=device),
        torch.empty(2, kv_heads, nq, d // per, **codes),
        torch.empty(2, kv_heads, 2, d, **scales),
        torch.empty(2, kv_heads, 2, d, **scales),
        torch.empty(2, kv_heads, nq, dv // per, **codes),
        torch.empty(2, kv_heads, nq, dv // v_group, **scales),
        torch.empty(2, kv_heads, nq, dv // v_group, **scales),
        torch.empty(2, kv_heads, nr, d, dtype=dtype, device=device),
        torch.empty(2, kv_heads, nr, dv, dtype=dtype, device=device),
        d**-0.5,
        bits,
        k_group,
    )


def _lower(config, symbolic=True, run_here=True, **example):
    """The kernel of a call site; `symbolic`: batch, queries and cache lengths are SymInts, as a
    dynamic capture gives them."""
    args = _example(*config, **example)
    if symbolic:
        mode = FakeTensorMode(shape_env=ShapeEnv())
        dynamic = StatelessSymbolicContext(
            dynamic_sizes=[DimDynamic.DYNAMIC, DimDynamic.STATIC, DimDynamic.DYNAMIC, DimDynamic.STATIC]
        )
        args = tuple(mode.from_tensor(a, symbolic_context=dynamic) if isinstance(a, torch.Tensor) else a for a in args)
    return QUANTIZED_KV_ATTENTION.lowerings["tvm"](LoweringRequest(args, load_target("host"), run_here))


@pytest.fixture(scope="module")
def kernels():
    """Kernels by build name, built on first use and shared by the tests."""
    built = {}

    def get(name):
        if name not in built:
            built[name] = _lower(BUILDS[name])
        return built[name]

    return get


def _cache(config, batch, nq, nr, queries=1, seed=0):
    """A call's arguments: random q, K, V, the first nq tokens quantized, the rest residual."""
    q_heads, kv_heads, d, dv, bits, k_group, v_group = config
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, q_heads, queries, d, generator=gen)
    k = torch.randn(batch, kv_heads, nq + nr, d, generator=gen)
    v = torch.randn(batch, kv_heads, nq + nr, dv, generator=gen)
    keys = kv_quant.quantize_keys(k[:, :, :nq].contiguous(), bits, k_group)
    values = kv_quant.quantize_values(v[:, :, :nq].contiguous(), bits, v_group)
    return (
        q, keys.codes, keys.scale, keys.min, values.codes, values.scale, values.min,
        k[:, :, nq:].contiguous(), v[:, :, nq:].contiguous(), d**-0.5, bits, k_group,
    )


@pytest.fixture
def reference_outside_the_runner(monkeypatch):
    """The op's reference, which the runner may no longer fall back to: the test fails if it does."""
    reference = QUANTIZED_KV_ATTENTION.reference

    def fail(*args):
        raise AssertionError("the runner fell back to the reference")

    monkeypatch.setattr(QUANTIZED_KV_ATTENTION, "reference", fail)
    return reference


def _check(kernel, reference, args):
    out = kernel.runner(*args)
    expected = reference(*args)
    assert out.shape == expected.shape and out.dtype == expected.dtype
    # SDPA's layout, [B, Sq, Hq, Dv] viewed as [B, Hq, Sq, Dv]: captured graphs view its transpose.
    assert out.transpose(1, 2).is_contiguous()
    torch.testing.assert_close(out, expected, **FP32)
    return out


# The kernel against the reference --------------------------------------------------------------


@pytest.mark.parametrize(
    "name, nq, nr",
    [
        ("int4", 4096, 37),  # 16 chunks of codes and one of the residual
        ("int4", 3968, 128),
        ("int4", 4096, 0),  # no residual
        ("int4", 0, 5),  # no quantized token
        ("int4", 128, 1),  # one residual token
        ("int2", 96, 7),  # 3 key groups of 32: one chunk, not a whole one
        ("int2", 0, 1),
        ("int2", 544, 0),
        ("int8", 320, 3),
        ("int4_mha", 96, 5),
        ("int2_mha_d128", 192, 2),
    ],
)
@pytest.mark.parametrize("pool", [False, True], ids=["calling_thread", "thread_pool"])
def test_matches_reference(monkeypatch, kernels, reference_outside_the_runner, name, nq, nr, pool):
    # the runner takes the thread-pool build from a cache length on; 0 forces it, a huge one the
    # calling-thread build
    import compiler.codegen.tvm.kv_quant_attention as lowering

    monkeypatch.setattr(lowering, "_PARALLEL_FROM", 0 if pool else 1 << 30)
    args = _cache(BUILDS[name], 2, nq, nr, seed=nq + nr)
    _check(kernels(name), reference_outside_the_runner, args)


def test_batch_of_one_and_heads_read_the_right_cache(kernels, reference_outside_the_runner):
    # KV head 1's cache scaled up: a query head reading another KV head's keys or values would
    # differ by far more than the tolerance.
    config = BUILDS["int4"]
    args = list(_cache(config, 1, 256, 9, seed=3))
    for i in (2, 3, 5, 6):  # scales and minimums of keys and values
        args[i] = args[i].clone()
        args[i][:, 1] *= 4
    args[7] = args[7].clone()
    args[7][:, 1] *= 4
    _check(kernels("int4"), reference_outside_the_runner, args)


def test_cache_views_into_a_larger_buffer(kernels, reference_outside_the_runner):
    # A cache preallocated for more tokens and sliced to those filled: the codes and scales are
    # not contiguous, and the runner copies what the kernel cannot read in place.
    args = list(_cache(BUILDS["int4"], 2, 256, 4))
    for i in range(1, 7):
        t = args[i]
        room = torch.zeros(*t.shape[:2], t.shape[2] * 2, t.shape[3], dtype=t.dtype)
        room[:, :, : t.shape[2]] = t
        args[i] = room[:, :, : t.shape[2]]
    assert not args[1].is_contiguous()
    _check(kernels("int4"), reference_outside_the_runner, args)


def test_one_build_serves_every_length_and_batch(monkeypatch, kernels, reference_outside_the_runner):
    kernel = kernels("int4_mha")
    compiles = []
    real_compile = build._compile
    monkeypatch.setattr(build, "_compile", lambda *a: compiles.append(a) or real_compile(*a))
    assert all(n in kernel.source for n in ("nq", "ng", "nr"))  # lengths are TIR vars
    for batch, nq, nr in ((1, 32, 0), (3, 288, 31), (1, 0, 300)):
        _check(kernel, reference_outside_the_runner, _cache(BUILDS["int4_mha"], batch, nq, nr))
    assert not compiles


# What falls back to the reference ----------------------------------------------------------------


def test_more_than_one_query_falls_back_exactly(kernels):
    # A symbolic query count builds the decode kernel; two queries (a chunked prefill against the
    # cache) run the reference at run time.
    args = _cache(BUILDS["int4"], 2, 128, 6, queries=2)
    assert torch.equal(kernels("int4").runner(*args), QUANTIZED_KV_ATTENTION.reference(*args))


def test_float64_falls_back_exactly(kernels):
    args = list(_cache(BUILDS["int4"], 1, 128, 3))
    for i in (0, 7, 8):
        args[i] = args[i].double()
    out = kernels("int4").runner(*args)
    assert out.dtype == torch.float64 and torch.equal(out, QUANTIZED_KV_ATTENTION.reference(*args))


def test_other_bits_or_key_group_fall_back_exactly(kernels):
    # The same shapes at another Gk (the build fixes it): 128 tokens are 2 groups of 64.
    args = list(_cache(BUILDS["int4"], 1, 128, 3))
    k = kv_quant.quantize_keys(torch.randn(1, 3, 128, 64), 4, 64)
    args[1:4] = [k.codes, k.scale, k.min]
    args[11] = 64
    assert torch.equal(kernels("int4").runner(*args), QUANTIZED_KV_ATTENTION.reference(*args))


def test_empty_cache_raises_the_ops_error(kernels):
    args = _cache(BUILDS["int4"], 1, 0, 0)
    with pytest.raises(ValueError, match="1 queries against 0 cached keys"):
        kernels("int4").runner(*args)


def test_prefill_call_site_is_unsupported():
    with pytest.raises(Unsupported, match="decode kernel only"):
        _lower(BUILDS["int4"], symbolic=False, queries=3)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16])
def test_other_dtypes_are_unsupported(dtype):
    with pytest.raises(Unsupported, match="float32"):
        _lower(BUILDS["int4"], dtype=dtype)


def test_head_dim_off_the_vector_width_is_unsupported():
    with pytest.raises(Unsupported, match="multiples of"):
        _lower((4, 2, 12, 12, 8, 32, 12))


def test_llvm_kernel_needs_cpu_tensors():
    with pytest.raises(Unsupported, match="meta"):
        _lower(BUILDS["int4"], symbolic=False, device="meta")


def test_source_only_when_not_asked_to_run(tmp_path, monkeypatch):
    monkeypatch.setenv("COMPILER_CACHE_DIR", str(tmp_path))
    kernel = _lower(BUILDS["int4"], symbolic=False, run_here=False)
    assert kernel.runner is None and "T.prim_func" in kernel.source
    assert not list(tmp_path.glob("tvm/*.so"))
