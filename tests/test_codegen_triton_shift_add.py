"""Tests of the Triton lowering of `compiler::shiftadd_linear` (compiler.codegen.triton.shift_add)
under Triton's CPU interpreter, against the op's reference (expand W to fp32, one fp32 matmul):
every bit count q and group size G, the lookup-table path (M <= 4) and the GEMM (M > 4), row
slabs and K splits, groups and K / 8 that are not powers of two, leading dims and strided
inputs, 16-bit inputs, every scale code, symbolic M, the source text (compiled for an
H100 by Triton's offline compiler) and the call sites that keep the reference.

Weights are random in the op's format (sign bytes, scales in [-4, 1], row scales in
[0.5, 1.5]); outputs are then of order 100. Under the interpreter the lowering takes 32 output
features and 8 chunks (64 inputs) a GEMV step and splits K in runs of 16 chunks: N = 40 leaves
a ragged last block of features and K = 256 (32 chunks) two splits over 2 programs, while
K = 64 is one split. M = 6 or 20 takes the GEMM (16 or 32 rows a tile, K steps of 32) for
G = 32, 128 and the tables in slabs of 4 rows for G = 8, which has no K step of 16 in one group.

Tolerance, and why: kernel and reference add the same q * K terms r 2**e (+-x_k) in fp32 in
different orders (the kernel sums exact +-x_k 2**e and multiplies by r last; the reference
rounds each W[n, k] = r * (a sum of a few nearby powers of two, exact) once, then each
product). Each differs from the exact sum by at most gamma_n * A, n <= qK + 2 rounding steps,
A = sum_k |x_k| r sum_i 2**e (the terms' magnitudes, computed in fp64): 2**-14 A at qK = 1024,
a bound never approached, since the roundings of a long sum mostly cancel; with overwhelming
probability each is below ~sqrt(n) u A (Higham and Mary, "A new approach to probabilistic
rounding error analysis", 2019), 32 u A here. So |kernel - reference| <= 2**-19 A (32 u A);
seen: <= 3.3 u A over these tests. A real bug is far above: one wrong sign moves an output by
2 r |x_k| 2**e, which for |x_k| >= 0.05 and e >= -4 is >= 6e-3 r, against 2**-19 A <= 3e-3 r
(A <= 1600 r here). 16-bit outputs add the rounding of each side's fp32 result: one ulp of the
output dtype, 2**-10 relative for fp16; the interpreter truncates fp32 -> bf16 where torch
rounds to nearest, two ulps, 2**-6 relative.
"""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"  # before anything imports triton (conftest sets it too)

import ast
import json
import subprocess
import sys

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv, StatelessSymbolicContext

import compiler.codegen.triton  # noqa: F401 - registers the triton lowering
from compiler.capture import capture_export
from compiler.codegen import lower_graph
from compiler.codegen.triton import shift_add as lowering
from compiler.codegen.triton.attention import num_splits
from compiler.errors import Unsupported
from compiler.ops import LoweringRequest, shift_add
from compiler.targets import load_target
from models import FunctionModule

OP = shift_add.shiftadd_linear
FP32_RELATIVE_TO_TERMS = 2**-19
OUTPUT_ULPS = {torch.float32: 0.0, torch.float16: 2**-10, torch.bfloat16: 2**-6}
N, K = 40, 256

pytestmark = pytest.mark.usefixtures("kernel_cache_in_tmp", "quiet_interpreter")


def _weight(q, group, n=N, k=K, seed=0):
    """Random planes, scales and row scales of the op's format."""
    gen = torch.Generator().manual_seed(seed)
    planes = torch.randint(0, 256, (q, n, k // 8), generator=gen, dtype=torch.uint8)
    scales = torch.randint(200, 256, (q, n, k // group), generator=gen, dtype=torch.int32).to(torch.uint8)
    row_scale = torch.rand(n, generator=gen) + 0.5
    return planes, scales, row_scale


def _x(*shape, dtype=torch.float32, seed=1):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def _lower(args, run_here=True):
    return OP.lowerings["triton"](LoweringRequest(args, load_target("h100"), run_here))


def _check(args, kernel=None):
    x, planes, scales, row_scale = args
    out = (kernel or _lower(args)).runner(*args)
    expected = OP.reference(*args)
    assert out.shape == expected.shape and out.dtype == expected.dtype
    terms = shift_add.dense_weight(torch.full_like(planes, 255), scales, row_scale.abs())
    magnitudes = x.double().abs().reshape(-1, x.shape[-1]) @ terms.double().t()
    rounding = OUTPUT_ULPS[x.dtype] * expected.double().abs().reshape(magnitudes.shape)
    bound = FP32_RELATIVE_TO_TERMS * magnitudes + rounding
    error = (out.double() - expected.double()).abs().reshape(magnitudes.shape)
    assert (error <= bound).all(), f"worst error / bound: {(error / bound).max().item():.3g}"
    return out


# Formats, paths and shapes ----------------------------------------------------------------------


def test_interpreter_config_covers_every_path():
    # What the format tests below rely on: M = 1, 3 take the tables, M = 6 the GEMM except
    # for G = 8 or 24 (slabs of 4 and 2 rows); K = 256 is two splits, K = 64 one.
    config = lowering.INTERPRETER_CONFIG
    assert lowering.GEMV_MAX_ROWS in range(3, 6) and config.slab_rows in range(3, 6)
    assert config.gemm_block_k_for(8) is None and config.gemm_block_k_for(32) == config.gemm_block_k_for(128) == 32
    programs = -(-N // config.gemv_block_n)  # at M = 1
    assert num_splits(K // 8, programs, 132, config.min_chunks_per_split) == 2
    assert num_splits(64 // 8, programs, 132, config.min_chunks_per_split) == 1


@pytest.mark.parametrize("rows", [1, 6], ids=["decode", "rows6"])
@pytest.mark.parametrize("group", [8, 32, 128])
@pytest.mark.parametrize("q", [1, 2, 3, 4])
def test_every_format_and_path(q, group, rows):
    _check((_x(rows, K, seed=q + group + rows), *_weight(q, group, seed=q * group)))


@pytest.mark.parametrize("group", [8, 32, 128])
def test_a_few_rows_take_the_tables(group):
    _check((_x(3, K, seed=group), *_weight(3, group, seed=group)))


@pytest.mark.parametrize("rows", [1, 6], ids=["decode", "rows6"])
@pytest.mark.parametrize("k, group", [(72, 24), (96, 24), (96, 48)], ids=["k72-g24", "k96-g24", "k96-g48"])
def test_groups_and_inputs_that_are_not_powers_of_two(k, group, rows):
    # 9 chunks: GEMV steps of 1 chunk; 12 chunks: steps of 4 that span groups of 3. Groups of
    # 24 take the tables at every M, groups of 48 the GEMM in K steps of 16.
    _check((_x(rows, k), *_weight(2, group, k=k)))


@pytest.mark.parametrize("rows", [1, 3])
def test_one_split_stores_the_output_itself(rows):
    _check((_x(rows, 64), *_weight(3, 32, k=64)))


@pytest.mark.parametrize("leading", [(2, 2), (4, 5)], ids=["tables", "gemm"])
def test_leading_dims_and_strided_x(leading):
    # x every other row of a wider buffer: its rows are a strided [M, K] view, read in place.
    x = _x(*leading[:-1], 2 * leading[-1], K)[:, ::2]
    assert not x.is_contiguous()
    out = _check((x, *_weight(2, 32)))
    assert out.shape == (*leading, N)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 20], ids=["tables", "gemm"])
def test_16_bit_inputs_accumulate_in_fp32(rows, dtype):
    _check((_x(rows, K, dtype=dtype), *_weight(3, 32)))


def test_every_scale_code_is_exact():
    # One plane of all-plus signs, a group of 8 inputs of 1/8: y[n] = the factor of code n,
    # (8 + m) * 2**(k - 34), which both sides compute exactly.
    scales = torch.arange(256, dtype=torch.int32).to(torch.uint8).reshape(1, 256, 1)
    planes = torch.full((1, 256, 1), 255, dtype=torch.uint8)
    args = (torch.full((1, 8), 0.125), planes, scales, torch.ones(256))
    out = _lower(args).runner(*args)
    expected = shift_add.scale_factors(scales.reshape(1, 256))
    assert torch.equal(out, expected) and torch.equal(OP.reference(*args), expected)


def test_no_rows():
    out = _check((_x(0, K), *_weight(1, 32)))
    assert out.shape == (0, N)


def test_one_kernel_serves_symbolic_rows():
    mode = FakeTensorMode(shape_env=ShapeEnv())
    # the rows symbolic, as export makes them; the weights' shapes static
    dynamic = StatelessSymbolicContext(dynamic_sizes=[DimDynamic.DYNAMIC, DimDynamic.STATIC])
    weight = _weight(2, 32)
    static = [StatelessSymbolicContext(dynamic_sizes=[DimDynamic.STATIC] * w.dim()) for w in weight]
    fakes = (
        mode.from_tensor(_x(5, K), symbolic_context=dynamic),
        *(mode.from_tensor(w, symbolic_context=s) for w, s in zip(weight, static)),
    )
    kernel = _lower(fakes)
    assert kernel.name == "shiftadd_linear_float32_q2_g32" and kernel.runner is not None
    for rows in (1, 6):
        _check((_x(rows, K), *weight), kernel=kernel)
    with pytest.raises(ValueError, match="kernel for 2 planes in groups of 32"):
        kernel.runner(_x(1, K), *_weight(3, 32))


def _call_op(*tensors):
    return torch.ops.compiler.shiftadd_linear(*tensors)


def test_lower_graph_replaces_the_op_with_the_kernel():
    args = (_x(1, K), *_weight(3, 32))
    gm = capture_export(FunctionModule(_call_op), args).gm
    executable, report = lower_graph(gm, load_target("h100"))
    assert [kernel.name for kernel in report.kernels] == ["shiftadd_linear_float32_q3_g32"] and not report.fallbacks
    torch.testing.assert_close(executable(*args)[0], OP.reference(*args), rtol=1e-5, atol=1e-3)


# Where the reference runs -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "args, match",
    [
        ((_x(1, K, dtype=torch.float64), *_weight(1, 32)), "float64"),
        ((_x(1, K), *_weight(5, 32)), "5 bit planes"),
        ((_x(1, K), _weight(1, 32)[0].to(torch.int8), *_weight(1, 32)[1:]), "planes must be uint8"),
        ((_x(1, K), *_weight(1, 32)[:2], torch.ones(N, dtype=torch.float16)), "row_scale must be float32"),
    ],
    ids=["float64-x", "five-planes", "int8-planes", "fp16-row-scale"],
)
def test_unsupported_call_sites_keep_the_reference(args, match):
    with pytest.raises(Unsupported, match=match):
        _lower(args)


def test_unsupported_call_site_runs_the_reference_in_the_graph():
    args = (_x(2, K, dtype=torch.float64), *_weight(2, 32))
    gm = capture_export(FunctionModule(_call_op), args).gm
    with pytest.warns(UserWarning, match="falls back to its reference"):
        executable, report = lower_graph(gm, load_target("h100"))
    assert not report.kernels and "float64" in report.fallbacks[0]
    assert torch.equal(executable(*args)[0], OP.reference(*args))


# Source -----------------------------------------------------------------------------------------


def test_source_is_the_module_the_runner_imports():
    kernel = _lower((_x(1, K), *_weight(3, 8)), run_here=False)
    assert kernel.runner is None and kernel.note
    header, body = kernel.source.split("import triton", 1)
    assert all(line.startswith("#") for line in header.splitlines())  # launches, as comments
    assert "import triton" + body == lowering.KERNEL_SOURCE
    defined = {node.name for node in ast.parse(kernel.source).body if isinstance(node, ast.FunctionDef)}
    for name in (lowering.TABLES_KERNEL, lowering.GEMV_KERNEL, lowering.COMBINE_KERNEL):
        assert name in defined and f"{name}[(" in header
    assert lowering.GEMM_KERNEL in defined and "no GEMM" in header  # groups of 8 have no K step of 16
    assert "BITS=3, GROUP_CHUNKS=1" in header


# Compiles kernel.py's kernels for sm_90, given on the command line (JSON) as a list of
# [kernel, constants, {pointer argument: element type}, options]. As Triton's launcher
# specializes them for contiguous tensors and shapes of multiples of 16 (N = 4096, K = 2048),
# unit strides are constants, the other integers multiples of 16 and the pointers aligned.
# Prints, per kernel, its PTX and what ptxas (Triton's own, with Triton's flags) reports: the
# registers and spills happen there, not in the PTX.
_COMPILE_FOR_H100 = """
import importlib.util, json, subprocess, sys, tempfile
import triton
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia.compiler import get_ptxas
from triton.compiler import ASTSource

spec = importlib.util.spec_from_file_location("shift_add_h100", sys.argv[1])
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
results = []
for name, constants, pointers, options in json.loads(sys.argv[2]):
    fn = getattr(module, name)
    def arg_type(arg):
        return "*" + pointers[arg] if arg in pointers else "constexpr" if arg in constants else "i32"
    signature = {arg: arg_type(arg) for arg in fn.arg_names}
    aligned = {(i,): [["tt.divisibility", 16]] for i, arg in enumerate(fn.arg_names) if signature[arg] != "constexpr"}
    compiled = triton.compile(
        ASTSource(fn, signature, {(fn.arg_names.index(k),): v for k, v in constants.items()}, aligned),
        target=GPUTarget("cuda", 90, 32), options=options,
    )
    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as ptx:
        ptx.write(compiled.asm["ptx"])
        ptx.flush()
        command = [get_ptxas(90).path, "-v", "--regAllocOptLevel=2", "--gpu-name=sm_90a", ptx.name,
                   "-o", ptx.name + ".cubin"]
        report = subprocess.run(command, capture_output=True, text=True, check=True).stderr
    results.append([compiled.asm["ptx"], report])
print(json.dumps(results))
"""


def test_source_compiles_for_an_h100(tmp_path, monkeypatch):
    """The text GPU users get, with the launch constants its header gives for an H100 (fp16 x,
    4 planes, the most registers, in groups of 128; the GEMM for fp16 and fp32 x), compiled to
    sm_90 by Triton's own compiler (which needs no GPU): no kernel spills registers, the GEMV
    loads a feature's sign bytes as one vector and the fp16 GEMM runs on the tensor cores. In
    a fresh process: compiling fails in one that has run kernels under the interpreter."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # the H100 launch constants
    example = (_x(1, K, dtype=torch.float16), *_weight(4, 128))
    source = _lower(tuple(a.to("meta") for a in example), run_here=False).source
    assert "BLOCK_T=16, num_warps=4" in source
    assert "BLOCK_N=256,\n#         BLOCK_C=min(16, largest power of 2 dividing K / 8), num_warps=8" in source
    assert "BLOCK_N=128, BLOCK_K=64, num_warps=4, num_stages=3" in source
    weight = dict(planes_ptr="u8", factor_ptr="i8", scale_ptr="fp32", out_ptr="fp16")
    gemm = dict(BITS=4, GROUP=128, BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, DOT_FP32=False, stride_xk=1, stride_on=1)
    kernels = [
        [lowering.TABLES_KERNEL, dict(BLOCK_T=16, stride_xk=1), dict(x_ptr="fp16", lut_ptr="fp32"), dict(num_warps=4)],
        [
            lowering.GEMV_KERNEL,
            dict(BITS=4, GROUP_CHUNKS=16, BLOCK_N=256, BLOCK_C=16, SINGLE_SPLIT=False, stride_on=1),
            dict(weight, lut_ptr="fp32", part_ptr="fp32"),
            dict(num_warps=8),
        ],
        [
            lowering.COMBINE_KERNEL,
            dict(BLOCK_N=256, stride_on=1),
            dict(part_ptr="fp32", scale_ptr="fp32", out_ptr="fp16"),
            {},
        ],
        [lowering.GEMM_KERNEL, gemm, dict(weight, x_ptr="fp16"), dict(num_warps=4, num_stages=3)],
        [
            lowering.GEMM_KERNEL,  # fp32 x: H100_FP32_CONFIG's tile, ieee dots
            dict(gemm, BLOCK_M=32, BLOCK_N=64, BLOCK_K=32, DOT_FP32=True),
            dict(weight, x_ptr="fp32", out_ptr="fp32"),
            dict(num_warps=4, num_stages=2),
        ],
    ]
    path = tmp_path / "kernel.py"
    path.write_text(source)
    env = dict(os.environ, TRITON_CACHE_DIR=str(tmp_path / "triton"))
    results = json.loads(
        subprocess.run(
            [sys.executable, "-c", _COMPILE_FOR_H100, str(path), json.dumps(kernels)],
            env=env, capture_output=True, text=True, check=True, timeout=300,
        ).stdout
    )
    for (name, *_), (ptx, report) in zip(kernels, results):
        assert ".target sm_90" in ptx and "0 bytes spill stores" in report, (name, report)
    assert "ld.global.v4.b32" in results[1][0]  # 16 sign bytes a thread and plane
    assert "wgmma" in results[3][0]  # the fp16 +-1 tiles go to the tensor cores
