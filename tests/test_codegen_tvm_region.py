"""Tests of the TVM lowering of fused regions (compiler.codegen.tvm.region): regions fused from
graphs captured off small functions, lowered by `lower_graph` for the host and compared with
eager; the schedules, kernel names, symbolic lengths, the disk cache, CUDA source, and the
regions that decline (they run in ATen with a warning).

Tolerances:
- FP32: pointwise ops without transcendentals are single IEEE operations in eager's order, so
  results agree to the last bit or so; 1e-6 is the brief's "exact-ish".
- TRANSCENDENTAL: exp/tanh/erf (and sigmoid, silu, gelu built on them) are polynomial
  approximations measured within 3e-7 relative of the correctly rounded result (eager's Sleef
  versions are within ~1e-7): a few ulp, inside 1e-5 with room for the arguments' own rounding.
- REDUCTION: sums accumulate in vector lanes (partial sums, then combined) where ATen uses a
  cascade; the relative error of either is ~sqrt(N) * 2**-24 ~ 1e-6 for N ~ 1000, so 1e-5.
- BF16: every op rounds to bf16 as eager does, but a last-bit fp32 difference before a rounding
  can flip it: one or two bf16 ulps (2**-8 each), hence 2**-7 relative.
"""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"

import time
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import fx
from torch.export import Dim
from torch._subclasses.fake_tensor import FakeTensorMode

from compiler.capture import capture_export
from compiler.codegen import RegionRequest, lower_graph
from compiler.codegen.tvm import build
from compiler.codegen.tvm.region import lower_region
from compiler.errors import Unsupported
from compiler.passes.fusion.region import FusedRegion, fuse_nodes
from compiler.targets import load_target
from models import FunctionModule

aten = torch.ops.aten

FP32 = dict(rtol=1e-6, atol=1e-6)
TRANSCENDENTAL = dict(rtol=1e-5, atol=1e-5)
REDUCTION = dict(rtol=1e-5, atol=1e-6)
BF16 = dict(rtol=2**-7, atol=1e-2)


@pytest.fixture(scope="module", autouse=True)
def _shared_cache(tmp_path_factory):
    """One kernel cache for the module: tests that build the same kernel load it."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("COMPILER_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
        yield



def _fused(fn, args, kind, dynamic=None):
    """The captured graph of `fn` with all its ops fused into one region; returns (captured,
    region call node)."""
    captured = capture_export(FunctionModule(fn), args, dynamic_shapes=None if dynamic is None else (tuple(dynamic),))
    nodes = [n for n in captured.gm.graph.nodes if n.op == "call_function"]
    return captured, fuse_nodes(captured.gm, nodes, kind)


def _lower(fn, args, kind="pointwise", dynamic=None):
    """(captured, executable graph, report, warnings) of `fn` lowered for the host."""
    captured, _ = _fused(fn, args, kind, dynamic)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        executable, report = lower_graph(captured.gm, load_target("host"))
    return captured, executable, report, [str(w.message) for w in caught]


def _run(captured, executable, args):
    return captured.unflatten_outputs(executable(*captured.flatten_inputs(args, {})))


def _check(fn, args, tolerance, kind="pointwise", dynamic=None, more=()):
    """Lower `fn` as one region, check that a TVM kernel took it, compare with eager on `args`
    and on each of `more`; returns the kernel."""
    captured, executable, report, caught = _lower(fn, args, kind, dynamic)
    assert not caught and not report.fallbacks, (caught, report.fallbacks)
    assert len(report.kernels) == 1 and report.kernels[0].runner is not None
    for case in (args, *more):
        out, expected = _run(captured, executable, case), fn(*case)
        torch.testing.assert_close(out, expected, **tolerance)
    return report.kernels[0]


def _randn(*shape, dtype=torch.float32, seed=0, scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=gen) * scale).to(dtype)


# Pointwise ---------------------------------------------------------------------------------------


def _arithmetic(x, y, row, s):
    a = torch.add(x, y, alpha=0.5) - torch.sub(x, row, alpha=2) * 3.0 + 1.5
    b = torch.where(x > y, torch.maximum(x, y), torch.minimum(x, row)) / (y.abs() + 1)
    c = torch.clamp(x, -0.5, 0.5) + torch.relu(y) + torch.reciprocal(y.abs() + 1) - x.neg()
    d = torch.sqrt(y.abs()) + torch.rsqrt(x.abs() + 1) + x.pow(2) + y.pow(3) - x.pow(-1)
    e = (x >= 0.1).float() + (x < y).float() + (y <= row).float() + (x == x).float() + (x != y).float()
    return a + b * s + c + d + e + 1 / (x * x + 1)


@pytest.mark.parametrize("shape", [(7, 13), (1, 1), (3, 1000)])
def test_pointwise_arithmetic_with_broadcasting_and_scalars(shape):
    rows, n = shape
    x, y = _randn(rows, n), _randn(n, seed=1)  # y broadcasts over rows
    row, s = _randn(rows, 1, seed=2), torch.tensor(0.75)  # a column and a 0-dim tensor
    kernel = _check(_arithmetic, (x, y, row, s), FP32)
    assert kernel.name.startswith("region_add_") and "T.prim_func" in kernel.source


def _transcendental(x):
    return (
        torch.exp(x) + torch.log(x.abs() + 1) + torch.tanh(x) + torch.sigmoid(x) + F.silu(x)
        + F.gelu(x) + F.gelu(x, approximate="tanh") + x.abs().pow(1.7) + torch.erf(x)
    )


def test_pointwise_transcendentals():
    x = _randn(3, 1000, scale=3.0)
    kernel = _check(_transcendental, (x,), TRANSCENDENTAL)
    assert "T.vectorized" in kernel.source and "T.parallel" not in kernel.source  # 3000 elements: one thread


def test_exp_and_tanh_keep_their_edge_values():
    special = torch.tensor([[float("inf"), float("-inf"), float("nan"), 0.0, 88.5, -88.0, -100.0, 1e-6]])
    fn = lambda x: (torch.exp(x), torch.tanh(x), torch.sigmoid(x))  # noqa: E731
    captured, executable, report, caught = _lower(fn, (special,))
    assert not caught
    for out, expected in zip(_run(captured, executable, (special,)), fn(special)):
        torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-37, equal_nan=True)


def test_max_min_clamp_and_relu_propagate_nan_like_aten():
    nan = float("nan")
    x = torch.tensor([[nan, 1.0, -1.0, nan, 0.5, 2.0, -3.0, nan]])
    y = torch.tensor([[0.0, nan, 2.0, nan, 0.1, 1.0, 5.0, 1.0]])
    fn = lambda a, b: (torch.maximum(a, b), torch.minimum(a, b), torch.relu(a), torch.clamp(a, -0.5, 0.5))  # noqa: E731
    captured, executable, _, caught = _lower(fn, (x, y))
    assert not caught
    for out, expected in zip(_run(captured, executable, (x, y)), fn(x, y)):
        torch.testing.assert_close(out, expected, equal_nan=True, rtol=0, atol=0)


def _swiglu(gate, up):
    return F.silu(gate) * up


def test_swiglu_region():
    gate, up = _randn(2, 7, 64), _randn(2, 7, 64, seed=1)
    _check(_swiglu, (gate, up), TRANSCENDENTAL)


def test_bf16_inputs_round_like_eager():
    # HF style: silu in bf16 (computed in fp32, rounded), the product rounded again.
    gate, up = _randn(7, 13, dtype=torch.bfloat16), _randn(7, 13, dtype=torch.bfloat16, seed=1)
    _check(lambda g, u: F.silu(g) * u + 1, (gate, up), BF16)


def test_dtype_casts_between_fp32_bf16_fp16():
    x = _randn(4, 24, dtype=torch.bfloat16)

    def casts(x):
        y = x.float() * 3.0 + 0.1
        return y.to(torch.bfloat16), y.half() * 2, (y.to(torch.bfloat16).float() - y)

    kernel = _check(casts, (x,), FP32)
    assert "float16" in kernel.source and "bfloat16" in kernel.source


def test_multiple_outputs_of_one_shape_share_one_loop(monkeypatch):
    import compiler.codegen.tvm.region as tvm_region

    # 32K elements with an exp: parallel once the threshold is below them (by default regions
    # that small run on the calling thread).
    monkeypatch.setattr(tvm_region, "_PARALLEL_MIN_ELEMENTS", 1 << 14)
    x, y = _randn(64, 512), _randn(64, 512, seed=1)
    kernel = _check(lambda a, b: (a + b, torch.exp(a + b) * 2, a - b), (x, y), TRANSCENDENTAL)
    # Merged: one parallel loop writes all three outputs (each vectorized inside it).
    assert kernel.source.count("T.parallel") == 1 and kernel.source.count("T.vectorized") == 3


def test_outputs_of_different_shapes():
    x, y = _randn(5, 6), _randn(6, seed=1)
    _check(lambda a, b: (a * b, b + 1), (x, y), FP32)


def test_views_inside_the_region():
    x = _randn(12, 5)

    def views(a):
        b = a.view(3, 4, 5).permute(2, 0, 1).unsqueeze(0).expand(2, 5, 3, 4)
        c = b.transpose(1, 3)[:, 1:3]  # (2, 2, 3, 5)
        flat = a.t().reshape(-1)[::2]  # a reshape that must read across a transpose, every other
        left, right = a.split([2, 3], dim=-1)
        return c * 2, a[2] + 1, a[:, 3:4].squeeze(-1) * 3, flat - 1, a.view(60)[4:10].unsqueeze(0) + a[:1, :1], left * right[:, 1:]

    _check(views, (x,), FP32)


def test_rotary_half_rotation_with_cat():
    x, cos, sin = _randn(2, 3, 5, 8), _randn(5, 8, seed=1), _randn(5, 8, seed=2)

    def rotary(x, cos, sin):
        rotated = torch.cat([-x[..., 4:], x[..., :4]], dim=-1)
        return x * cos + rotated * sin

    _check(rotary, (x, cos, sin), FP32)


def test_misaligned_and_strided_inputs_are_read_correctly():
    x = _randn(6, 10)
    captured, executable, _, _ = _lower(lambda a: a * 2 + 1, (x,))
    for view in (_randn(10, 6).t(), _randn(61)[1:].view(6, 10)):
        torch.testing.assert_close(_run(captured, executable, (view,)), view * 2 + 1, **FP32)


# Reductions --------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(7, 13), (3, 1000), (1, 1)])
def test_softmax(shape):
    kernel = _check(lambda x: torch.softmax(x, -1), (_randn(*shape, scale=3.0),), REDUCTION, "reduction")
    assert "row schedule" in kernel.note


def test_softmax_reads_exp_once_per_element():
    kernel = _check(lambda x: torch.softmax(x, -1), (_randn(3, 1000, scale=3.0),), REDUCTION, "reduction")
    # exp(x - max) is a row-local stage read by the sum and the output, not recomputed.
    assert kernel.source.count('T.sblock("t2_exp")') == 1
    assert kernel.source.count("T.reinterpret") == 1  # the 2**n of one inlined exp


def test_decomposed_softmax_and_log_softmax():
    x = _randn(3, 1000, scale=3.0)

    def decomposed(x):
        e = torch.exp(x - x.amax(-1, keepdim=True))
        return e / e.sum(-1, keepdim=True)

    _check(decomposed, (x,), REDUCTION, "reduction")
    _check(lambda x: torch.log_softmax(x, -1), (x,), REDUCTION, "reduction")


def test_bf16_softmax():
    _check(lambda x: torch.softmax(x, -1), (_randn(7, 13, dtype=torch.bfloat16, scale=3.0),), BF16, "reduction")


def _rms_norm(x, w):
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))


def _rms_norm_hf(x, w):
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)
    return w * h.to(x.dtype)


def test_rms_norm_region():
    x, w = _randn(2, 5, 64, scale=3.0), torch.rand(64) + 0.5
    kernel = _check(_rms_norm, (x, w), REDUCTION, "reduction")
    assert "row schedule" in kernel.note and "_rf" in kernel.source  # vectorized partial sums


def test_rms_norm_region_bf16_hf_style():
    x, w = _randn(2, 5, 64, dtype=torch.bfloat16, scale=3.0), (torch.rand(64) + 0.5).to(torch.bfloat16)
    _check(_rms_norm_hf, (x, w), BF16, "reduction")


def test_rms_norm_with_eps_as_a_float64_graph_input():
    # As Dynamo captures a norm whose eps changed between models: a 0-dim float64 input, cast.
    def rms_norm(x, w, eps):
        return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps.to(torch.float32)))

    x, w = _randn(2, 5, 64, scale=3.0), torch.rand(64) + 0.5
    _check(rms_norm, (x, w, torch.tensor(1e-5, dtype=torch.float64)), REDUCTION, "reduction")


@pytest.mark.parametrize("affine", [True, False])
def test_layer_norm_region(affine):
    x, w, b = _randn(3, 7, 48, scale=2.0), torch.rand(48) + 0.5, _randn(48, seed=1)
    if affine:
        _check(lambda x, w, b: F.layer_norm(x, (48,), w, b), (x, w, b), REDUCTION, "reduction")
    else:
        _check(lambda x: F.layer_norm(x, (48,)), (x,), REDUCTION, "reduction")


def test_native_layer_norm_mean_and_rstd_outputs():
    x, w, b = _randn(3, 48, scale=2.0), torch.rand(48) + 0.5, _randn(48, seed=1)
    _check(lambda x, w, b: torch.native_layer_norm(x, (48,), w, b, 1e-5), (x, w, b), REDUCTION, "reduction")


def test_decomposed_layer_norm_region():
    x, w, b = _randn(3, 48, scale=2.0), torch.rand(48) + 0.5, _randn(48, seed=1)

    def layer_norm(x, w, b):
        centered = x - x.mean(-1, keepdim=True)
        return centered * torch.rsqrt(centered.pow(2).mean(-1, keepdim=True) + 1e-5) * w + b

    _check(layer_norm, (x, w, b), REDUCTION, "reduction")


def test_var_std_sum_amin_amax_and_var_mean():
    x = _randn(5, 33, scale=2.0)

    def stats(x):
        var, mean = torch.var_mean(x, -1, correction=1)
        return x.var(-1, keepdim=True), x.var(-1, correction=0), x.std(-1), x.amin(-1), x.amax(-1), x.sum(-1), var, mean

    _check(stats, (x,), REDUCTION, "reduction")


def test_one_dimensional_reduction():
    _check(lambda x: torch.softmax(x, -1), (_randn(100, scale=3.0),), REDUCTION, "reduction")


def test_row_schedule_takes_viewed_rows_and_leaves_other_outputs_alone():
    # As a residual + RMSNorm region next to a linear: the normalized rows also leave as a
    # [rows, n] view, and a weight's transpose rides along in a loop nest of its own.
    x, r, w, weight = _randn(2, 5, 64), _randn(2, 5, 64, seed=1), torch.rand(64) + 0.5, _randn(32, 64, seed=2)

    def region(x, r, w, weight):
        h = x + r
        y = _rms_norm(h, w)
        return h, y, y.view(10, 64), weight.t()

    kernel = _check(region, (x, r, w, weight), REDUCTION, "reduction")
    assert "row schedule" in kernel.note


def test_reductions_over_different_rows_get_one_loop_nest_per_stage():
    kernel = _check(lambda x: (x.sum(-1).sum(-1), x * 2), (_randn(2, 3, 8),), REDUCTION, "reduction")
    assert "flat schedule" in kernel.note


# Symbolic lengths --------------------------------------------------------------------------------

SEQ = Dim("seq", min=2, max=4096)


def test_dynamic_length_rms_norm_one_build_serves_all_lengths():
    x, w = _randn(2, 5, 64), torch.rand(64) + 0.5
    more = [(_randn(2, n, 64, seed=n), w) for n in (9, 300, 1)]
    kernel = _check(_rms_norm, (x, w), REDUCTION, "reduction", dynamic=({1: SEQ}, None), more=more)
    assert "n0" in kernel.source and "row schedule" in kernel.note


def test_dynamic_length_pointwise_and_views():
    more = [(_randn(17, 24, seed=1), _randn(17, 24, seed=2))]
    _check(_swiglu, (_randn(5, 24), _randn(5, 24, seed=1)), TRANSCENDENTAL, dynamic=({0: SEQ}, {0: SEQ}), more=more)
    more = [(_randn(17, 24, seed=1),), (_randn(0, 24),)]
    _check(lambda a: torch.softmax(a.view(a.shape[0], 4, 6), -1), (_randn(5, 24),), REDUCTION, "reduction", dynamic=({0: SEQ},), more=more)


# What declines -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "fn, kind, reason",
    [
        (lambda x: torch.cumsum(x, -1) * 2, "pointwise", "aten.cumsum.default has no TVM translation"),
        (lambda x: x.sum(0) * 2, "reduction", "reduces dims [0]"),
        (lambda x: x.long() + 1, "pointwise", "torch.int64"),
    ],
)
def test_unsupported_region_warns_and_runs_in_aten(fn, kind, reason):
    x = _randn(6, 10)
    captured, executable, report, caught = _lower(fn, (x,), kind)
    assert not report.kernels and len(caught) == 1 and reason in caught[0] and "runs in ATen" in caught[0]
    assert reason in report.fallbacks[0]
    torch.testing.assert_close(_run(captured, executable, (x,)), fn(x))


def test_a_tvm_failure_declines_the_region(monkeypatch):
    import compiler.codegen.tvm.region as tvm_region

    def fail(*args):
        raise RuntimeError("LLVM ERROR: something TVM could not do")

    monkeypatch.setattr(tvm_region, "build_primfunc", fail)
    x = _randn(6, 10)
    captured, executable, report, caught = _lower(lambda a: a * 3, (x,))
    assert len(caught) == 1 and "TVM failed on the region (RuntimeError: LLVM ERROR" in caught[0]
    torch.testing.assert_close(_run(captured, executable, (x,)), x * 3)


def test_matmul_regions_are_not_taken():
    captured, call = _fused(lambda a, b: (a @ b) * 2, (_randn(4, 8), _randn(8, 3)), "matmul_epilogue")
    region = captured.gm.get_submodule(call.target)
    args = tuple(a.meta["val"] for a in call.args)
    with pytest.raises(Unsupported, match="matmul_epilogue"):
        lower_region(RegionRequest(region, args, load_target("host"), True))


# Names, sources, cache, CUDA ---------------------------------------------------------------------


def _request(fn, args, kind="pointwise", target="host", run_here=False, dynamic=None):
    captured, call = _fused(fn, args, kind, dynamic)
    region = captured.gm.get_submodule(call.target)
    return RegionRequest(region, tuple(a.meta["val"] for a in call.args), load_target(target), run_here)


def test_kernel_names_follow_the_structure_not_the_capture():
    x = _randn(4, 96)
    first = lower_region(_request(_swiglu, (x, x)))
    again = lower_region(_request(lambda g, u: F.silu(g) * u, (x, x)))  # another capture, same structure
    other_shape = lower_region(_request(_swiglu, (_randn(4, 97), _randn(4, 97))))
    other_ops = lower_region(_request(lambda g, u: F.silu(g) + u, (x, x)))
    assert first.name == again.name and first.name.startswith("region_silu_mul_")
    assert len({first.name, other_shape.name, other_ops.name}) == 3
    assert first.runner is None and "not built" in first.note
    assert "aten.silu.default" in first.source and "T.prim_func" in first.source  # region code + TVMScript


def test_second_compile_loads_the_cached_library(tmp_path, monkeypatch):
    monkeypatch.setenv("COMPILER_CACHE_DIR", str(tmp_path))
    compiles = []
    real_compile = build._compile
    monkeypatch.setattr(build, "_compile", lambda *a: compiles.append(a) or real_compile(*a))
    x, w = _randn(3, 5, 48), torch.rand(48) + 0.5
    request = _request(_rms_norm, (x, w), "reduction", run_here=True)
    start = time.perf_counter()
    first = lower_region(request)
    first_time = time.perf_counter() - start
    libraries = list((tmp_path / "tvm").glob(f"{first.name}-*.so"))
    assert len(compiles) == 1 and len(libraries) == 1 and str(libraries[0]) in first.note
    stamp = libraries[0].stat().st_mtime_ns

    monkeypatch.setattr(build, "_BUILT", {})  # as a new process would: only the disk cache left
    start = time.perf_counter()
    again = lower_region(request)
    again_time = time.perf_counter() - start
    assert len(compiles) == 1 and again.note == first.note
    assert libraries[0].stat().st_mtime_ns == stamp
    # Translation and scheduling are left (tens of ms); LLVM's compile (~1 s) is not.
    assert again_time < first_time / 2, (first_time, again_time)
    torch.testing.assert_close(again.runner(x, w), _rms_norm(x, w), **REDUCTION)


def test_scalar_region_inputs_are_kernel_parameters():
    # A float input (eps passed into the graph, as Dynamo does) is a kernel argument, not a constant.
    mode = FakeTensorMode()
    fake = mode.from_tensor(torch.empty(4, 8))
    graph = fx.Graph()
    x, eps = graph.placeholder("x"), graph.placeholder("eps")
    x.meta["val"], eps.meta["val"] = fake, 1e-6
    out = graph.call_function(aten.add.Tensor, (x, eps))
    with mode:
        out.meta["val"] = aten.add.Tensor(fake, 1e-6)
    graph.output(out)
    region = FusedRegion(torch.nn.Module(), graph, "pointwise")
    kernel = lower_region(RegionRequest(region, (fake, 1e-6), load_target("host"), True))
    t = _randn(4, 8)
    torch.testing.assert_close(kernel.runner(t, 0.25), t + 0.25, **FP32)


@pytest.mark.parametrize(
    "fn, args, kind",
    [
        (_swiglu, (_randn(64, 96), _randn(64, 96)), "pointwise"),
        (lambda x: torch.softmax(x, -1), (_randn(6, 100),), "reduction"),
    ],
    ids=["swiglu", "softmax"],
)
def test_cuda_target_gets_cuda_source_with_bound_threads(fn, args, kind):
    target = load_target("h100")
    assert target.tvm_target.startswith("cuda") and target.codegen == "triton"
    kernel = lower_region(_request(fn, args, kind, target="h100", run_here=True))
    assert kernel.runner is None and "reading only" in kernel.note
    assert kernel.language == "cuda" and f"{kernel.name}_kernel" in kernel.source
    assert "__global__" in kernel.source and "threadIdx.x" in kernel.source
    if kind == "reduction":
        assert "__shfl_down_sync" in kernel.source  # a cross-thread reduction per row


def test_cuda_source_for_a_symbolic_length():
    kernel = lower_region(_request(_rms_norm, (_randn(2, 5, 64), torch.rand(64)), "reduction", "h100", True, dynamic=({1: SEQ}, None)))
    assert kernel.language == "cuda" and "__global__" in kernel.source


def test_cuda_falls_back_to_manual_binding_then_to_tvmscript(monkeypatch):
    import compiler.codegen.tvm.region as tvm_region

    def decline(*args):
        raise RuntimeError("no rule applies")

    request = _request(lambda x: torch.softmax(x, -1), (_randn(6, 100),), "reduction", "h100", True)
    monkeypatch.setattr(tvm_region, "_schedule_cuda_dlight", decline)
    kernel = lower_region(request)
    assert kernel.language == "cuda" and "manual thread binding" in kernel.note
    assert "__shfl_down_sync" in kernel.source and "aten._softmax" in kernel.source  # the region, as a comment

    monkeypatch.setattr(tvm_region, "device_source", lambda *args: decline())
    kernel = lower_region(request)
    assert kernel.runner is None and kernel.language == "python" and "no rule applies" in kernel.note
    assert "T.thread_binding" in kernel.source
