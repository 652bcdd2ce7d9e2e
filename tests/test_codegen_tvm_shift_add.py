"""Tests of the TVM lowering of `compiler::shiftadd_linear` (compiler.codegen.tvm.shift_add): the
host lookup-table kernel against the op's reference (expand W to fp32, one fp32 matmul) for
q = 1..4 bit planes, groups of 8 to 576 inputs, SmolLM2's decode shapes (N x K = 576 x 576,
192 x 576, 1536 x 576, 576 x 1536) and small ones, signs read 1, 2 or 4 bytes at a time, one
row of x (decode) and a few; leading dims, strided and 16-bit x; every scale code;
one build serving every q and row count; and the call sites that keep the reference.

Weights are random in the op's format (sign bytes, scale codes for factors in [2**-8, 1.875],
row scales in [0.5, 1.5]), x is randn.

Tolerance, and why: kernel and reference add the same q * K terms r f (+-x_k) (f a group's
factor, four significant bits) in fp32, in different orders: the kernel as signed sums of 3, 3
and 2 inputs in its tables, added per chunk, each chunk's sum times f into one of two
accumulators (chunks alternating); the reference after rounding each W[n, k] = r sum_i f_i (+-1)
once (the sum is exact: a few factors within 2**8 of each other), as its BLAS GEMV does. Each
differs from the exact sum by at most gamma_n * A, n = qK + 2 rounding steps,
A = sum_k |x_k| r sum_i f_i (the terms' magnitudes, in fp64): ~2**-11 A at qK = 6144, a bound
never approached, since the roundings of a long sum mostly cancel; with overwhelming
probability each is below ~sqrt(n) u A (Higham and Mary, "A new approach to probabilistic
rounding error analysis", 2019). So |kernel - reference| <= 2 sqrt(qK + 2) u A: 2**-16.7 A at
the largest qK here (4 x 1536), 2**-19.7 A at the smallest (1 x 96); seen: <= 2.3 u A. A real
bug is far above: a byte looked up in another chunk's table, or a group scaled by another
group's factor, moves an output by about a table entry (~sqrt(8) |x|) times f, ~0.5 r on
average, against 2**-16.7 A ~ 1e-2 r at the largest shape (A ~ 1e3 r).
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv, StatelessSymbolicContext

import compiler.codegen.tvm  # noqa: F401 - registers the tvm lowering
from compiler.codegen.tvm import build
from compiler.codegen.tvm import shift_add as lowering
from compiler.errors import Unsupported
from compiler.ops import LoweringRequest, shift_add
from compiler.targets import load_target

OP = shift_add.shiftadd_linear
UNIT = 2.0**-24
# Builds the tests share, by name: (N, K, G). SmolLM2's decode shapes (K = 576 has no group of
# 128: 4.5 of them), with groups from one chunk (signs read a byte at a time) to all of K (4
# bytes at a time); "halves" reads 2 bytes at a time (sign-extended); "small" has 3 chunks a
# group (bytes) and tiles of one lane block (N = 40 is no multiple of 16).
BUILDS = {
    "q_o": (576, 576, 8),
    "k_v": (192, 576, 576),
    "gate_up": (1536, 576, 32),
    "down": (576, 1536, 128),
    "halves": (64, 128, 16),
    "small": (40, 96, 24),
}


@pytest.fixture(scope="module", autouse=True)
def _shared_cache(tmp_path_factory):
    """One kernel cache for the module: each build is compiled once."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("COMPILER_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
        yield


def _weight(q, n, k, group, seed=0):
    """Random planes, scales and row scales of the op's format."""
    gen = torch.Generator().manual_seed(seed)
    planes = torch.randint(0, 256, (q, n, k // 8), generator=gen, dtype=torch.uint8)
    # codes 8 k + m with k in [23, 31]: factors (1 + m / 8) * 2**(k - 31) in [2**-8, 1.875]
    scales = torch.randint(184, 256, (q, n, k // group), generator=gen, dtype=torch.int32).to(torch.uint8)
    row_scale = torch.rand(n, generator=gen) + 0.5
    return planes, scales, row_scale


def _x(*shape, dtype=torch.float32, seed=1):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def _args(name, q, rows=1, seed=0):
    n, k, group = BUILDS[name]
    return (_x(rows, k, seed=seed + 1), *_weight(q, n, k, group, seed=seed))


def _lower(args, symbolic=True, run_here=True, target="host"):
    """The kernel of a call site; `symbolic`: the rows of x are a SymInt, as a dynamic capture
    gives them (the weights' shapes stay static)."""
    if symbolic:
        mode = FakeTensorMode(shape_env=ShapeEnv())

        def fake(t, dynamic_rows):
            dims = [DimDynamic.DYNAMIC if dynamic_rows and d < t.dim() - 1 else DimDynamic.STATIC for d in range(t.dim())]
            return mode.from_tensor(t, symbolic_context=StatelessSymbolicContext(dynamic_sizes=dims))

        args = (fake(args[0], True), *(fake(t, False) for t in args[1:]))
    return OP.lowerings["tvm"](LoweringRequest(args, load_target(target), run_here))


@pytest.fixture(scope="module")
def kernels():
    """Kernels by build name, built on first use and shared by the tests."""
    built = {}

    def get(name):
        if name not in built:
            built[name] = _lower(_args(name, 3))
        return built[name]

    return get


@pytest.fixture
def reference_outside_the_runner(monkeypatch):
    """The op's reference, which the runner may no longer fall back to: the test fails if it does."""
    reference = OP.reference

    def fail(*args):
        raise AssertionError("the runner fell back to the reference")

    monkeypatch.setattr(OP, "reference", fail)
    return reference


def _check(kernel, reference, args):
    x, planes, scales, row_scale = args
    out = kernel.runner(*args)
    expected = reference(*args)
    assert out.shape == expected.shape and out.dtype == expected.dtype
    # A: the terms' magnitudes, sum_k |x_k| r sum_i 2**e (all signs +, in fp64)
    terms = shift_add.dense_weight(torch.full_like(planes, 255), scales, row_scale.abs())
    magnitudes = x.double().abs().reshape(-1, x.shape[-1]) @ terms.double().t()
    bound = 2 * math.sqrt(planes.shape[0] * x.shape[-1] + 2) * UNIT * magnitudes
    error = (out.double() - expected.double()).abs().reshape(magnitudes.shape)
    assert (error <= bound).all(), f"worst error / bound: {(error / bound).max().item():.3g}"
    return out


# The kernel against the reference ---------------------------------------------------------------


@pytest.mark.parametrize("rows", [1, 3])
@pytest.mark.parametrize("q", [1, 2, 3, 4])
@pytest.mark.parametrize("name", list(BUILDS))
def test_matches_reference(kernels, reference_outside_the_runner, name, q, rows):
    _check(kernels(name), reference_outside_the_runner, _args(name, q, rows, seed=q + rows))


def test_builds_cover_every_word_and_tile():
    # what BUILDS above claim: signs read 1, 2 and 4 bytes at a time, tiles of 1 and 4 lane blocks
    shapes = [lowering._Shape(n, k, k // g) for n, k, g in BUILDS.values()]
    assert {lowering._word_bytes(s) for s in shapes} == {1, 2, 4}
    assert {lowering._tile(s) for s in shapes} == {8, lowering._TILE}


def test_leading_dims_strided_x_and_the_most_rows(kernels, reference_outside_the_runner):
    # x every other token of a wider buffer: the runner copies what the kernel cannot read in place
    n, k, group = BUILDS["q_o"]
    rows = lowering._MAX_ROWS
    x = _x(2, rows, k)[:, ::2]
    assert not x.is_contiguous()
    out = _check(kernels("q_o"), reference_outside_the_runner, (x, *_weight(2, n, k, group)))
    assert out.shape == (2, rows // 2, n)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_16_bit_x_is_widened_and_the_output_rounded(kernels, dtype):
    # The reference rounds its fp32 result to x's dtype, as the runner does: they agree to the
    # fp32 bound above plus one rounding of the output each (two ulps of the dtype).
    args = _args("down", 3, rows=2)
    x = args[0].to(dtype)
    out = kernels("down").runner(x, *args[1:])
    expected = OP.reference(x, *args[1:])
    assert out.dtype == dtype
    ulp = torch.finfo(dtype).eps  # relative
    torch.testing.assert_close(out.float(), expected.float(), rtol=2 * ulp, atol=1e-2)


def test_every_scale_code_is_exact(reference_outside_the_runner):
    # One plane of all-plus signs, a group of 8 inputs of 1/8: y[n] = the factor of code n, from
    # 2**-31 to 1.875; the three table entries add up to exactly 1 and the kernel's factor, made
    # from its bits, is exact.
    scales = torch.arange(256, dtype=torch.int32).to(torch.uint8).reshape(1, 256, 1)
    planes = torch.full((1, 256, 1), 255, dtype=torch.uint8)
    args = (torch.full((1, 8), 0.125), planes, scales, torch.ones(256))
    out = _lower(args).runner(*args)
    expected = shift_add.scale_factors(scales.reshape(1, 256))
    assert torch.equal(out, expected) and torch.equal(reference_outside_the_runner(*args), expected)


def test_one_build_serves_every_q_and_row_count(monkeypatch, kernels, reference_outside_the_runner):
    kernel = kernels("small")
    compiles = []
    real_compile = build._compile
    monkeypatch.setattr(build, "_compile", lambda *a: compiles.append(a) or real_compile(*a))
    for q, rows in ((1, 2), (4, 7), (2, 1)):
        _check(kernel, reference_outside_the_runner, _args("small", q, rows, seed=q))
    assert not compiles


def test_static_single_row_call_site(reference_outside_the_runner):
    args = _args("small", 2)
    _check(_lower(args, symbolic=False), reference_outside_the_runner, args)


# What falls back to the reference ---------------------------------------------------------------


def test_more_rows_than_the_kernel_takes_fall_back_exactly(kernels):
    # A symbolic row count builds the kernel; a prefill's rows run the reference at run time.
    args = _args("small", 3, rows=lowering._MAX_ROWS + 1)
    assert torch.equal(kernels("small").runner(*args), OP.reference(*args))


def test_other_weight_shapes_fall_back_exactly(kernels):
    # Another group count, another N, 5 planes: not what the build fixes (or not the format).
    n, k, group = BUILDS["small"]
    x = _x(1, k)
    for weight in (_weight(2, n, k, 8), _weight(2, n + 1, k, group), _weight(5, n, k, group)):
        assert torch.equal(kernels("small").runner(x, *weight), OP.reference(x, *weight))


def test_float64_x_falls_back_exactly(kernels):
    args = list(_args("small", 2))
    args[0] = args[0].double()
    out = kernels("small").runner(*args)
    assert out.dtype == torch.float64 and torch.equal(out, OP.reference(*args))


def test_no_rows(kernels):
    args = _args("small", 2, rows=0)
    out = kernels("small").runner(*args)
    assert out.shape == (0, BUILDS["small"][0])


def test_inconsistent_weights_raise_the_ops_error(kernels):
    x, planes, scales, row_scale = _args("small", 2)
    with pytest.raises(ValueError, match="row_scale must be float32"):
        kernels("small").runner(x, planes, scales, row_scale.half())


def test_prefill_call_site_is_unsupported():
    with pytest.raises(Unsupported, match="up to .* rows of x"):
        _lower(_args("small", 3, rows=lowering._MAX_ROWS + 1), symbolic=False)


@pytest.mark.parametrize(
    "change, match",
    [
        (lambda a: (a[0].double(), *a[1:]), "float64"),
        (lambda a: (a[0], a[1].repeat(3, 1, 1)[:5], a[2].repeat(3, 1, 1)[:5], a[3]), "bit planes, not 5"),
        (lambda a: (a[0], a[1].to(torch.int8), *a[2:]), "planes must be uint8"),
        (lambda a: (*a[:3], a[3].half()), "row_scale must be float32"),
        (lambda a: (a[0][:, :-8], *a[1:]), "input features"),
    ],
    ids=["float64-x", "five-planes", "int8-planes", "fp16-row-scale", "x-too-short"],
)
def test_unsupported_call_sites_keep_the_reference(change, match):
    with pytest.raises(Unsupported, match=match):
        _lower(change(_args("small", 2)))


def test_outputs_off_the_lanes_are_unsupported():
    args = (_x(1, 96), *_weight(2, 36, 96, 24))
    with pytest.raises(Unsupported, match="not a multiple of 8"):
        _lower(args)


def test_target_without_avx2_is_unsupported():
    target = dataclasses.replace(load_target("host"), tvm_target="llvm -mcpu=x86-64")
    with pytest.raises(Unsupported, match="AVX2"):
        OP.lowerings["tvm"](LoweringRequest(_args("small", 2), target, True))


def test_llvm_kernel_needs_cpu_tensors():
    args = tuple(t.to("meta") for t in _args("small", 2))
    with pytest.raises(Unsupported, match="meta"):
        _lower(args, symbolic=False)


def test_cuda_target_is_unsupported():
    with pytest.raises(Unsupported, match="target kind 'cuda'"):
        _lower(_args("small", 2), target="h100")


def test_source_only_when_not_asked_to_run(tmp_path, monkeypatch):
    monkeypatch.setenv("COMPILER_CACHE_DIR", str(tmp_path))
    kernel = _lower(_args("small", 2), symbolic=False, run_here=False)
    assert kernel.runner is None and "T.prim_func" in kernel.source
    assert not list(tmp_path.glob("tvm/*.so"))
