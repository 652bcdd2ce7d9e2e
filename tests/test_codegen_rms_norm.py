"""Tests of the rms_norm kernels (compiler.codegen.triton, compiler.codegen.tvm) against the op's
reference: Triton under its CPU interpreter, TVM built for the host; the kernel cache, the
symbolic row count, the CUDA variants and the cases that fall back."""

from __future__ import annotations

import os

# Triton picks the interpreter when the kernel module is loaded, so set it before anything of
# the compiler is imported (tests/conftest.py sets it too; this keeps the module runnable alone).
os.environ["TRITON_INTERPRET"] = "1"

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv, StatelessSymbolicContext

import compiler.codegen.triton  # noqa: F401 - registers the triton lowering
import compiler.codegen.tvm  # noqa: F401 - registers the tvm lowering
from compiler.codegen.tvm import build
from compiler.errors import Unsupported
from compiler.ops import LoweringRequest
from compiler.ops import rms_norm as RMS_NORM
from compiler.targets import load_target

REPO = Path(__file__).resolve().parents[1]
EPS = 1e-6
# fp32: the kernels and the reference sum N <= 1024 squares in fp32 in different orders (vector
# lanes, tree reductions); the sum's relative error is then ~sqrt(N) * 2**-24 ~ 1e-6 typically,
# halved by the rsqrt, plus an ulp or two from rsqrt and the products: 1e-5 relative is ~10x
# above what is seen and far below any real bug (a wrong mean moves results by >1e-3).
FP32 = dict(rtol=1e-5, atol=1e-6)
# fp16/bf16: the normalized row and the product are each rounded to the output dtype, so a tiny
# fp32 difference can flip a rounding: one ulp, 2**-10 (fp16) or 2**-7 (bf16) relative.
FP16 = dict(rtol=2**-10, atol=1e-3)
BF16 = dict(rtol=2**-7, atol=1e-2)
# Triton's interpreter truncates fp32 -> bf16 (a GPU rounds to nearest), so each of the two
# roundings may be one ulp off: two ulps.
BF16_INTERPRETED = dict(rtol=2**-6, atol=2e-2)
SHAPES = [(4, 64), (3, 576), (2, 7, 576)]


@pytest.fixture(autouse=True)
def _cache_in_tmp(tmp_path, monkeypatch):
    monkeypatch.setenv("COMPILER_CACHE_DIR", str(tmp_path))


def _fake(t: torch.Tensor, mode: FakeTensorMode, dynamic_leading: bool = True) -> torch.Tensor:
    """A FakeTensor for `t` whose leading dims are symbolic (as export makes them) and N static."""
    leading = DimDynamic.DYNAMIC if dynamic_leading else DimDynamic.STATIC
    dims = [leading] * (t.dim() - 1) + [DimDynamic.STATIC]
    return mode.from_tensor(t, symbolic_context=StatelessSymbolicContext(dynamic_sizes=dims))


def _lower(backend, x, weight, target="host", run_here=True):
    """The kernel `backend` generates for rms_norm(x, weight) at a call site seen through fakes."""
    mode = FakeTensorMode(shape_env=ShapeEnv())
    args = (_fake(x, mode), _fake(weight, mode, dynamic_leading=False), EPS)
    req = LoweringRequest(args, load_target(target), run_here)
    return RMS_NORM.lowerings[backend](req)


def _inputs(shape, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(*shape, generator=gen) * 3).to(dtype)
    weight = (torch.rand(shape[-1], generator=gen) + 0.5).to(dtype)
    return x, weight


def _check(kernel, x, weight, tolerance):
    y = kernel.runner(x, weight, EPS)
    expected = RMS_NORM.reference(x, weight, EPS)
    assert y.shape == expected.shape and y.dtype == expected.dtype
    torch.testing.assert_close(y, expected, **tolerance)


def test_importing_the_backends_imports_neither_triton_nor_tvm():
    # A fresh interpreter: this one has imported both by now.
    code = (
        "import sys, compiler.codegen.triton, compiler.codegen.tvm\n"
        "assert 'triton' not in sys.modules and 'tvm' not in sys.modules, sorted(sys.modules)\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)


# Triton -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES)
def test_triton_matches_reference_fp32(shape):
    x, weight = _inputs(shape)
    kernel = _lower("triton", x, weight, target="h100")
    _check(kernel, x, weight, FP32)


@pytest.mark.parametrize(
    "dtype, tolerance", [(torch.float16, FP16), (torch.bfloat16, BF16_INTERPRETED)]
)
def test_triton_matches_reference_half(dtype, tolerance):
    x, weight = _inputs((2, 7, 576), dtype)
    _check(_lower("triton", x, weight, target="h100"), x, weight, tolerance)


def test_triton_mixed_dtypes_promote_like_the_reference():
    # A bf16 x with an fp32 weight gives fp32, after one rounding of the normalized row to bf16.
    x, _ = _inputs((5, 576), torch.bfloat16)
    weight = torch.rand(576) + 0.5
    _check(_lower("triton", x, weight, target="h100"), x, weight, BF16)


def test_triton_kernel_runs_for_any_row_count_including_none():
    x, weight = _inputs((3, 576))
    kernel = _lower("triton", x, weight, target="h100")
    for rows in (1, 17, 0):
        x, weight = _inputs((rows, 576), seed=rows)
        _check(kernel, x, weight, FP32)


def test_triton_without_gpu_or_interpreter_gives_source_and_says_why(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    x, weight = _inputs((3, 576))
    kernel = _lower("triton", x.to("meta"), weight.to("meta"), target="h100")
    assert kernel.runner is None
    assert "TRITON_INTERPRET" in kernel.note
    assert kernel.name in kernel.source and "def rms_norm_kernel" in kernel.source
    assert "BLOCK_N=1024" in kernel.source  # next power of two of 576


def test_triton_source_only_when_not_asked_to_run():
    x, weight = _inputs((3, 576))
    kernel = _lower("triton", x, weight, target="h100", run_here=False)
    assert kernel.runner is None and kernel.note


# TVM --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES)
def test_tvm_matches_reference_fp32(shape):
    x, weight = _inputs(shape)
    _check(_lower("tvm", x, weight), x, weight, FP32)


@pytest.mark.parametrize("dtype, tolerance", [(torch.float16, FP16), (torch.bfloat16, BF16)])
def test_tvm_matches_reference_half(dtype, tolerance):
    x, weight = _inputs((2, 7, 576), dtype)
    _check(_lower("tvm", x, weight), x, weight, tolerance)


def test_tvm_n_without_vector_lanes():
    # N odd: no power of two divides it, so the schedule keeps scalar loops.
    x, weight = _inputs((3, 77))
    _check(_lower("tvm", x, weight), x, weight, FP32)


@pytest.mark.parametrize("n", [2, 4, 8, 16])
def test_tvm_narrow_rows(n):
    # N at most the host's fp32 lanes: the row is one vector (lanes = N), or split when wider.
    x, weight = _inputs((5, n))
    _check(_lower("tvm", x, weight), x, weight, FP32)


@pytest.mark.parametrize("n, lanes", [(4, 4), (16, 16), (32, 8)])
def test_tvm_host_schedule_vectorizes_rows_of_any_lane_multiple(n, lanes):
    """Whatever this host's vectors: a row of one vector or of several, reduction and scaling vectorized."""
    from compiler.codegen.tvm.rms_norm import _rms_norm_primfunc, _schedule_host

    func = _schedule_host(_rms_norm_primfunc(n, "float32", "float32", "float32"), n, lanes)
    assert func.script().count(f"T.vectorized({lanes})") == 2


def test_tvm_builds_once_and_reuses_memory_then_disk(tmp_path, monkeypatch):
    compiles = []
    real_compile = build._compile
    monkeypatch.setattr(build, "_compile", lambda *a: compiles.append(a) or real_compile(*a))
    x, weight = _inputs((3, 576))

    first = _lower("tvm", x, weight)
    libraries = list((tmp_path / "tvm").glob("rms_norm_float32_n576-*.so"))
    assert len(compiles) == 1 and len(libraries) == 1
    assert str(libraries[0]) in first.note

    _lower("tvm", x, weight)  # in-process memo
    monkeypatch.setattr(build, "_BUILT", {})  # as a new process would: only the disk cache left
    again = _lower("tvm", x, weight)
    assert len(compiles) == 1
    _check(again, x, weight, FP32)


def test_tvm_one_build_serves_every_row_count(monkeypatch):
    compiles = []
    real_compile = build._compile
    monkeypatch.setattr(build, "_compile", lambda *a: compiles.append(a) or real_compile(*a))
    x, weight = _inputs((2, 5, 576))
    kernel = _lower("tvm", x, weight)
    assert "rows" in kernel.source  # the row count is a TIR var, not a constant
    for shape in ((1, 576), (4, 9, 576), (1000, 576)):
        x, _ = _inputs(shape, seed=shape[0])
        _check(kernel, x, weight, FP32)
    assert len(compiles) == 1


def test_tvm_reads_misaligned_and_strided_inputs():
    x, weight = _inputs((5, 577))
    kernel = _lower("tvm", x[:, 1:], weight[1:])
    for view in (x[:, 1:], torch.randn(5 * 576 + 1)[1:].view(5, 576)):
        _check(kernel, view, weight[1:], FP32)


def test_tvm_source_only_when_not_asked_to_run(tmp_path):
    x, weight = _inputs((3, 576))
    kernel = _lower("tvm", x, weight, run_here=False)
    assert kernel.runner is None and "T.prim_func" in kernel.source
    assert not list(tmp_path.glob("tvm/*.so"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_tvm_cuda_target_gives_cuda_source_and_no_runner(dtype):
    x, weight = _inputs((3, 576), dtype)
    kernel = _lower("tvm", x, weight, target="h100")
    # TVM 0.27 emits CUDA C without a GPU or nvcc; the kernel is named after the Kernel.
    assert kernel.runner is None and kernel.note
    assert kernel.language == "cuda" and f"{kernel.name}_kernel" in kernel.source
    assert "__global__" in kernel.source and "__shfl_down_sync" in kernel.source


def test_tvm_cuda_codegen_failure_leaves_the_tir_to_read(monkeypatch):
    import compiler.codegen.tvm.rms_norm as tvm_rms_norm

    def fail(*args):
        raise RuntimeError("no CUDA toolchain")

    monkeypatch.setattr(tvm_rms_norm, "device_source", fail)
    x, weight = _inputs((3, 576))
    kernel = _lower("tvm", x, weight, target="h100")
    assert kernel.runner is None and "no CUDA toolchain" in kernel.note
    assert kernel.language == "python" and "T.thread_binding" in kernel.source


# Both backends: what falls back ------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["triton", "tvm"])
def test_symbolic_n_is_unsupported(backend):
    mode = FakeTensorMode(shape_env=ShapeEnv())
    x, weight = _inputs((3, 576))
    dynamic = StatelessSymbolicContext(dynamic_sizes=[DimDynamic.DYNAMIC, DimDynamic.DYNAMIC])
    args = (mode.from_tensor(x, symbolic_context=dynamic), weight, EPS)
    req = LoweringRequest(args, load_target("host"), True)
    with pytest.raises(Unsupported, match="symbolic"):
        RMS_NORM.lowerings[backend](req)


@pytest.mark.parametrize("backend", ["triton", "tvm"])
def test_float64_is_unsupported(backend):
    x, weight = _inputs((3, 64), torch.float64)
    with pytest.raises(Unsupported, match="float64"):
        _lower(backend, x, weight)


def test_tvm_llvm_kernel_needs_cpu_tensors():
    x, weight = _inputs((3, 64))
    with pytest.raises(Unsupported, match="meta"):
        _lower("tvm", x.to("meta"), weight.to("meta"))


# build.py plumbing -------------------------------------------------------------------------------


def test_tensor_exchange_is_zero_copy():
    t = torch.arange(64, dtype=torch.float32)
    back = build.from_tvm(build.to_tvm(t))
    assert back.data_ptr() == t.data_ptr()
    back[0] = 42.0
    assert t[0] == 42.0


def test_as_kernel_input_copies_only_what_a_kernel_cannot_read():
    t = torch.randn(8, 16)
    assert build.as_kernel_input(t) is t
    for unreadable in (t.t(), t.flatten()[1:]):
        fixed = build.as_kernel_input(unreadable)
        assert fixed.is_contiguous() and fixed.data_ptr() % 64 == 0
        assert torch.equal(fixed, unreadable)


def test_parse_target_reads_cli_and_json_forms():
    cuda = build.parse_target("cuda -arch=sm_90")
    assert cuda.kind.name == "cuda" and cuda.attrs["arch"] == "sm_90"
    assert build.parse_target('{"kind": "cuda", "arch": "sm_80"}').attrs["arch"] == "sm_80"
    host = build.parse_target("llvm")
    assert host.kind.name == "llvm" and host.attrs["mcpu"]
