"""Tests of the Triton lowering of fused regions (compiler.codegen.triton.region) under Triton's CPU
interpreter: small functions are captured, their ATen nodes fused into one region with
`fuse_nodes`, the graph lowered with `lower_graph` for the h100 target (codegen "triton"), and
the executable compared with eager.

Tolerances, and why:
- EXACT (fp32 + - * /, casts, views, selects): the kernel does the same IEEE fp32 operations in
  the same order as eager, so results are bit-identical here; rtol 1e-6 (~8 ulps) leaves room
  for a GPU contracting a*b+c into one FMA.
- TRANSCENDENTAL (exp, log, tanh, erf, pow, sigmoid, ...): numpy (interpreter) and ATen use
  different fp32 implementations, and tanh is built from exp (no libdevice in the interpreter);
  seen errors are ~2e-7 relative, 1e-5 is ~40x above them and far below any real bug.
- REDUCTION (softmax, norms): fp32 sums of <= 100 terms in a different order (tree vs
  vectorized), ~sqrt(N) * 2**-24 relative, then a division or rsqrt: 1e-5 relative, and an
  absolute 1e-6 for values near zero after subtracting the mean.
- bf16 outputs are checked in bf16 ulps of the eager result: the kernel computes in fp32 and
  rounds once per explicit cast and once at the store, and Triton's interpreter rounds fp32 ->
  bf16 by truncation (a GPU rounds to nearest even), so each kernel rounding may be 1 ulp off;
  eager rounds every intermediate to bf16 (1/2 ulp each). The bound per test is the sum.
"""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"  # before anything imports triton (conftest sets it too)

import ast

import pytest
import torch
import torch.nn.functional as F

from compiler.capture import capture_export
from compiler.codegen import RegionRequest, lower_graph
from compiler.codegen.triton.region import MAX_ROW, lower_region
from compiler.errors import Unsupported
from compiler.passes.fusion.region import fuse_nodes, regions
from compiler.targets import load_target
from models import FunctionModule

aten = torch.ops.aten

EXACT = dict(rtol=1e-6, atol=1e-6)
TRANSCENDENTAL = dict(rtol=1e-5, atol=1e-6)
REDUCTION = dict(rtol=1e-5, atol=1e-6)


pytestmark = pytest.mark.usefixtures("kernel_cache_in_tmp", "quiet_interpreter")



def _fused(fn, args, kind, select=None, dynamic_shapes=None):
    """The captured graph of `fn` with its ATen ops (or those `select` picks) fused into one region."""
    # forward(*args): export wants the per-argument specs wrapped once more.
    spec = None if dynamic_shapes is None else (tuple(dynamic_shapes),)
    gm = capture_export(FunctionModule(fn), args, dynamic_shapes=spec).gm
    nodes = [
        n for n in gm.graph.nodes
        if n.op == "call_function" and n.target is not aten.sym_size.int and (select is None or select(n))
    ]
    fuse_nodes(gm, nodes, kind)
    return gm


def _lower(fn, args, kind, select=None, dynamic_shapes=None):
    """The executable and the one kernel made for the region; fails if the region fell back."""
    gm = _fused(fn, args, kind, select, dynamic_shapes)
    executable, report = lower_graph(gm, load_target("h100"))
    assert not report.fallbacks, report.fallbacks
    (kernel,) = report.kernels
    assert kernel.runner is not None and kernel.backend == "triton" and kernel.language == "python"
    return executable, kernel


def _as_tuple(x):
    return tuple(x) if isinstance(x, (tuple, list)) else (x,)


def _compare(executable, fn, args, tolerance):
    got, want = _as_tuple(executable(*args)), _as_tuple(fn(*args))
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.shape == w.shape and g.dtype == w.dtype, (g.shape, w.shape, g.dtype, w.dtype)
        torch.testing.assert_close(g, w, **tolerance)


def _check(fn, args, kind, tolerance, **kw):
    executable, kernel = _lower(fn, args, kind, **kw)
    _compare(executable, fn, args, tolerance)
    return kernel


def _bf16_ulps(got, want):
    """|got - want| in units of the last place of bf16 at want's magnitude (8 significant bits)."""
    want, got = want.float(), got.float()
    ulp = torch.exp2(torch.floor(torch.log2(want.abs().clamp_min(2.0**-126))) - 7)
    return ((got - want).abs() / ulp).max().item()


def _randn(*shape, dtype=torch.float32, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


# Pointwise ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(7, 13), (1, 1), (3, 100)])
def test_arithmetic_with_scalars_and_alpha(shape):
    def fn(a, b):
        return (a + b * 2 - 3) / (b.abs() + 1) - torch.sub(a, b, alpha=2) + torch.add(a, b, alpha=0.5) + (1 - a) * 2.5

    _check(fn, (_randn(*shape), _randn(*shape, seed=1)), "pointwise", EXACT)


def test_transcendentals():
    def fn(a):
        return (
            torch.exp(a) + torch.log(a.abs() + 1) + torch.sqrt(a.abs()) + torch.rsqrt(a.abs() + 0.1)
            + torch.sigmoid(a) + F.silu(a) + torch.tanh(a) + F.gelu(a) + F.gelu(a, approximate="tanh")
            + torch.relu(a) + torch.erf(a) + (-a).exp2()
        )

    _check(fn, (_randn(7, 13) * 3,), "pointwise", TRANSCENDENTAL)


def test_powers_integer_as_multiplies_fractional_through_exp2():
    def fn(a):
        return a.pow(3) + a.pow(2) + a.abs().pow(0.5) + a.abs().pow(2.5) + (a.abs() + 1).pow(-2) + a.reciprocal()

    kernel = _check(fn, (_randn(7, 13),), "pointwise", TRANSCENDENTAL)
    assert "tl.exp2(2.5 * tl.log2(" in kernel.source  # x**2.5
    assert "tl.sqrt(" in kernel.source  # x**0.5


def test_comparisons_where_clamp_min_max():
    def fn(a, b):
        return (
            torch.where(a > b, a, b) + torch.maximum(a, b) - torch.minimum(a, 0.5 * b) + a.clamp(-0.5, 0.5)
            + a.clamp(min=0.1) + (a <= 0.3).float() + (a == b).to(torch.float32) + torch.where(a != 0, 1.0, 0.0)
        )

    _check(fn, (_randn(7, 13), _randn(7, 13, seed=1)), "pointwise", EXACT)


def test_nan_propagates_through_relu_clamp_and_maximum_as_in_eager():
    a = torch.tensor([[float("nan"), -1.0, 2.0, 0.5]])
    b = torch.tensor([[1.0, float("nan"), 0.0, 3.0]])
    _check(lambda a, b: (torch.relu(a), a.clamp(-0.5, 0.5), torch.maximum(a, b)), (a, b), "pointwise", dict(EXACT, equal_nan=True))


def test_broadcasting_inputs_and_zero_dim_tensor():
    args = (_randn(7, 13), _randn(13, seed=1), _randn(7, 1, seed=2), torch.tensor(2.0))
    kernel = _check(lambda a, b, c, d: a + b * c - d, args, "pointwise", EXACT)
    # The [7, 1] input is read at row i0 only, the 0-dim one at its pointer.
    assert "in2_stride0" in kernel.source and "in2_stride1 " not in kernel.source


def test_non_contiguous_and_expanded_inputs_read_through_strides():
    executable, kernel = _lower(lambda a, b: a * 2 + b, (_randn(7, 13), _randn(7, 13)), "pointwise")
    transposed = _randn(13, 7).t()
    expanded = _randn(13, seed=1).expand(7, 13)  # stride 0 along rows
    assert not transposed.is_contiguous() and expanded.stride(0) == 0
    _compare(executable, lambda a, b: a * 2 + b, (transposed, expanded), EXACT)
    assert "if IN0_LIKE_OUT0:" in kernel.source  # an input laid out as the output is read at offs


def test_outputs_keep_eager_strides_for_the_views_after_the_region():
    # Eager keeps q's transposed layout for q * cos, and the graph's final `view` is only valid
    # in that layout: the region's output must have the same strides, not contiguous ones.
    def fn(x, cos):
        q = x.view(1, 12, 4, 16).transpose(1, 2)
        return (q * cos).transpose(1, 2).view(1, 12, 64)

    args = (_randn(1, 12, 64), _randn(12, 16, seed=1))
    executable, kernel = _lower(fn, args, "pointwise", select=lambda n: n.target is aten.mul.Tensor)
    _compare(executable, fn, args, EXACT)
    assert "torch.empty_strided((1, 4, 12, 16), (768, 16, 64, 1)" in kernel.source
    # Walked in memory order: stores at the flat offset, the index of dim 2 (12) varies slower than dim 1 (4).
    assert "tl.store(out0_ptr + offs," in kernel.source and "i2 = offs // 64" in kernel.source


def test_bf16_swiglu_fuses_only_the_pointwise_part():
    def fn(x, w1, w3):
        return F.silu(x @ w1) * (x @ w3)

    args = (_randn(5, 16, dtype=torch.bfloat16), _randn(16, 24, dtype=torch.bfloat16, seed=1), _randn(16, 24, dtype=torch.bfloat16, seed=2))
    executable, kernel = _lower(fn, args, "pointwise", select=lambda n: n.target in (aten.silu.default, aten.mul.Tensor))
    assert "v0.to(tl.bfloat16)" not in kernel.source  # silu is not rounded to bf16 before the product
    (got,), want = executable(*args), fn(*args)
    assert got.dtype == torch.bfloat16
    # Kernel: one rounding at the store (1 ulp truncated); eager: silu and the product (1/2 each).
    assert _bf16_ulps(got, want) <= 2


def test_dtype_casts_round_where_the_program_does():
    def fn(a):
        return a.to(torch.bfloat16).float() * 3 + a.to(torch.int32) + a.half().float(), (a * 2).to(torch.bfloat16)

    args = (_randn(7, 13) * 10,)
    executable, kernel = _lower(fn, args, "pointwise")
    assert ".to(tl.bfloat16).to(tl.float32)" in kernel.source and ".to(tl.float16).to(tl.float32)" in kernel.source
    (mixed, rounded), (want_mixed, want_rounded) = executable(*args), fn(*args)
    # fp16 rounds to nearest in the interpreter too; the bf16 round trip may be one bf16 ulp off
    # (truncation), times 3: at |a| <= 40 that is 3 * 2**-2.
    torch.testing.assert_close(mixed, want_mixed, rtol=0, atol=0.75)
    assert (mixed - want_mixed).abs().gt(1e-4).float().mean() < 0.75  # only where bf16 rounding differs
    assert _bf16_ulps(rounded, want_rounded) <= 1


def test_bool_and_integer_inputs_and_outputs():
    def fn(a, m, p):
        return torch.where(m, a, -a), a > 0, m.logical_not() & (a < 1), ~m | (a > 1), p * 2 + 1, p.float() / 3

    args = (_randn(5, 6), _randn(5, 6, seed=1) > 0, torch.arange(30).view(5, 6))
    _check(fn, args, "pointwise", EXACT)


def test_multiple_outputs():
    def fn(a, b):
        return a + b, a * b, (a - b).to(torch.bfloat16)

    args = (_randn(7, 13), _randn(7, 13, seed=1))
    executable, _ = _lower(fn, args, "pointwise")
    got, want = executable(*args), fn(*args)
    torch.testing.assert_close(got[0], want[0], **EXACT)
    torch.testing.assert_close(got[1], want[1], **EXACT)
    assert got[2].dtype == torch.bfloat16 and _bf16_ulps(got[2], want[2]) <= 1


def test_views_inside_the_region_become_index_math():
    def fn(a, b, c):
        return (a.view(3, 4, 5).permute(2, 0, 1) * b.unsqueeze(0)).exp() + c.t().reshape(5, 1, 12).view(5, 3, 4)

    args = (_randn(12, 5), _randn(3, 4, seed=1), _randn(12, 5, seed=2))
    kernel = _check(fn, args, "pointwise", TRANSCENDENTAL)
    assert "//" in kernel.source and "%" in kernel.source


def test_squeeze_expand_select():
    def fn(a, b):
        return a.squeeze(1) + b.t() + a[:, 0, :] * b.expand(2, 6, 5)[1].t()

    _check(fn, (_randn(5, 1, 6), _randn(6, 5, seed=1)), "pointwise", EXACT)


def test_rotary_embedding_with_slices_and_cat():
    def rotate_half(x):
        return torch.cat((-x[..., 4:], x[..., :4]), dim=-1)

    def fn(q, cos, sin):
        return q * cos + rotate_half(q) * sin

    args = (_randn(2, 3, 5, 8), _randn(5, 8, seed=1), _randn(5, 8, seed=2))
    kernel = _check(fn, args, "pointwise", EXACT)
    assert "tl.where(i3 < 4" in kernel.source


def test_pointwise_output_larger_than_one_block():
    _check(lambda a, b: a * b + 1, (_randn(3, 1000), _randn(1000, seed=1)), "pointwise", EXACT)


def test_symbolic_leading_dim_is_a_kernel_argument():
    batch = torch.export.Dim("batch", min=2)
    fn = lambda a, b: a.view(a.shape[0], 2, 50) * b.view(2, 50) + 1  # noqa: E731
    args = (_randn(3, 100), _randn(100, seed=1))
    executable, kernel = _lower(fn, args, "pointwise", dynamic_shapes=({0: batch}, None))
    assert "mask = offs < (100 * s" in kernel.source  # numel from the symbol, bound by launch
    for rows in (2, 9):
        _compare(executable, fn, (_randn(rows, 100, seed=rows), args[1]), EXACT)


def test_empty_output_launches_nothing():
    executable, _ = _lower(lambda a: a * 2, (torch.randn(0, 5),), "pointwise")
    assert executable(torch.randn(0, 5))[0].shape == (0, 5)


# Reductions --------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(3, 100), (7, 13), (1, 1)])
def test_softmax(shape):
    kernel = _check(lambda a: torch.softmax(a, -1), (_randn(*shape) * 4,), "reduction", REDUCTION)
    assert f"BLOCK_N={max(1, 1 << (shape[-1] - 1).bit_length())}" in kernel.source


def test_softmax_bf16_and_log_softmax_3d():
    x = _randn(7, 13, dtype=torch.bfloat16)
    executable, _ = _lower(lambda a: torch.softmax(a, -1), (x,), "reduction")
    # One rounding at the store: 1 ulp (truncated) against eager's 1/2.
    assert _bf16_ulps(executable(x)[0], torch.softmax(x, -1)) <= 1
    _check(lambda a: torch.log_softmax(a * 2, -1), (_randn(2, 3, 33),), "reduction", REDUCTION)


def test_softmax_over_a_symbolic_number_of_rows_and_strided_input():
    batch = torch.export.Dim("batch", min=2)
    executable, kernel = _lower(lambda a: torch.softmax(a, -1), (_randn(3, 4, 40),), "reduction", dynamic_shapes=({0: batch},))
    assert "BLOCK_N=64" in kernel.source and "i0 = row // 4" in kernel.source
    for batch_size in (2, 5):
        _compare(executable, lambda a: torch.softmax(a, -1), (_randn(batch_size, 4, 40, seed=batch_size),), REDUCTION)
    strided = _randn(2, 40, 4).transpose(1, 2)  # rows are not contiguous: the stride branch
    _compare(executable, lambda a: torch.softmax(a, -1), (strided,), REDUCTION)


def _rms_norm(x, weight):
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)
    return weight * h.to(x.dtype)


def test_rms_norm_decomposed_fp32():
    _check(_rms_norm, (_randn(3, 100), _randn(100, seed=1)), "reduction", REDUCTION)


def test_rms_norm_decomposed_bf16():
    args = (_randn(3, 100, dtype=torch.bfloat16), _randn(100, dtype=torch.bfloat16, seed=1))
    executable, kernel = _lower(_rms_norm, args, "reduction")
    assert "tl.sum(" in kernel.source and "tl.rsqrt(" in kernel.source
    (got,), want = executable(*args), _rms_norm(*args)
    # Kernel: two roundings (the cast to bf16, the store), 1 ulp each; eager: 1/2 each.
    assert got.dtype == torch.bfloat16 and _bf16_ulps(got, want) <= 3


def test_layer_norm_native():
    args = (_randn(3, 100), _randn(100, seed=1), _randn(100, seed=2))
    fn = lambda a, w, b: F.layer_norm(a, (100,), w, b)  # noqa: E731
    kernel = _check(fn, args, "reduction", REDUCTION)
    assert "native_layer_norm" in kernel.name
    bf16 = tuple(a.to(torch.bfloat16) for a in args)
    executable, _ = _lower(fn, bf16, "reduction")
    assert _bf16_ulps(executable(*bf16)[0], fn(*bf16)) <= 1


def test_layer_norm_decomposed_and_row_statistics_as_outputs():
    def layer_norm(x):
        mean = x.mean(-1, keepdim=True)
        var = ((x - mean) ** 2).mean(-1, keepdim=True)
        return (x - mean) / torch.sqrt(var + 1e-5)

    _check(layer_norm, (_randn(7, 13),), "reduction", REDUCTION)

    def stats(a):
        var, mean = torch.var_mean(a, -1, keepdim=True)
        return var, mean, a.sum(-1), a.amax(-1, keepdim=True), a.amin(-1), a / a.sum(-1).unsqueeze(-1)

    _check(stats, (_randn(3, 4, 10) + 3,), "reduction", REDUCTION)


# Declining -----------------------------------------------------------------------------------------


def test_unsupported_op_declines_with_a_warning_and_matches_eager():
    fn = lambda a: torch.cumsum(a, -1) + 1  # noqa: E731
    gm = _fused(fn, (_randn(7, 13),), "pointwise")
    with pytest.warns(UserWarning, match=r"runs in ATen: .*aten\.cumsum\.default has no Triton translation"):
        executable, report = lower_graph(gm, load_target("h100"))
    assert not report.kernels and "cumsum" in report.fallbacks[0]
    x = _randn(7, 13)
    torch.testing.assert_close(executable(x)[0], fn(x), rtol=0, atol=0)


def _request(fn, args, kind, select=None):
    gm = _fused(fn, args, kind, select)
    (call, region), = regions(gm)
    fakes = tuple(a.meta["val"] for a in call.args)
    return RegionRequest(region, fakes, load_target("h100"), run_here=True)


@pytest.mark.parametrize(
    "fn, shape, kind, reason",
    [
        (lambda a: a.sum(0), (4, 8), "reduction", r"over dims \[0\].*only the last dim"),
        (lambda a: torch.softmax(a, -1), (2, MAX_ROW + 1), "reduction", r"row length 16385 > 16384 needs a looped"),
        (lambda a: a * a.sum(-1, keepdim=True), (4, 8), "pointwise", r"reduction in a pointwise region"),
        (lambda a: (a + 1, a.sum(-1)), (4, 8), "pointwise", r"reduction in a pointwise region"),
        (lambda a: a.to(torch.float64) * 2, (4, 8), "pointwise", r"float64"),
        (lambda a: torch.softmax(a, -1).t() + 1, (4, 8), "reduction", r"neither a row"),
    ],
)
def test_declines_with_a_precise_reason(fn, shape, kind, reason):
    with pytest.raises(Unsupported, match=reason):
        lower_region(_request(fn, (torch.randn(*shape),), kind))


def test_matmul_epilogue_regions_are_not_this_lowerings():
    req = _request(lambda a, b: (a @ b).relu(), (torch.randn(4, 8), torch.randn(8, 4)), "matmul_epilogue")
    with pytest.raises(Unsupported, match="pointwise and reduction regions, not matmul_epilogue"):
        lower_region(req)


def test_without_gpu_or_interpreter_gives_source_and_says_why(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    fn = lambda a: torch.softmax(a, -1)  # noqa: E731
    kernel = lower_region(_request(fn, (torch.randn(3, 100),), "reduction"))
    assert kernel.runner is None and "TRITON_INTERPRET=1" in kernel.note
    assert f"def {kernel.name}(" in kernel.source
    # lower_graph keeps the region in ATen and says why.
    executable, report = lower_graph(_fused(fn, (torch.randn(3, 100),), "reduction"), load_target("h100"))
    assert report.kernels[0].runner is None and "TRITON_INTERPRET" in report.fallbacks[0]
    x = torch.randn(3, 100)
    torch.testing.assert_close(executable(x)[0], fn(x))


# The generated text ------------------------------------------------------------------------------


def test_source_is_python_with_a_jit_kernel_and_a_launcher():
    kernel_request = _request(lambda a, b: F.silu(a) * b, (torch.randn(7, 13), torch.randn(7, 13)), "pointwise")
    kernel = lower_region(kernel_request)
    tree = ast.parse(kernel.source)
    functions = {f.name: f for f in tree.body if isinstance(f, ast.FunctionDef)}
    assert "@triton.jit" in kernel.source
    assert [ast.unparse(d) for d in functions[kernel.name].decorator_list] == ["triton.jit"]
    assert "launch" in functions and "triton.cdiv(91, 128)" in kernel.source
    source_only = lower_region(RegionRequest(kernel_request.region, kernel_request.args, kernel_request.target, run_here=False))
    assert source_only.runner is None and source_only.note and source_only.source == kernel.source


def test_kernel_name_is_deterministic_and_the_source_cached_by_it(tmp_path):
    def fn(a, b):
        return torch.where(a > 0, a, b) * 2

    args = (torch.randn(4, 8), torch.randn(4, 8))
    first = lower_region(_request(fn, args, "pointwise"))
    # The same structure in another graph with other node names: the same kernel.
    other = lower_region(_request(lambda x, y: torch.sub(x, 1) + torch.where(x > 0, x, y) * 2, args, "pointwise",
                                  select=lambda n: n.target is not aten.sub.Tensor and n.target is not aten.add.Tensor))
    assert first.name == other.name and first.name.startswith("triton_pointwise_gt_where_mul_")
    assert (tmp_path / "triton" / f"{first.name}.py").is_file()
    # Another dtype: another kernel.
    half = lower_region(_request(fn, tuple(a.half() for a in args), "pointwise"))
    assert half.name != first.name
