"""Tests of the Triton lowering of `compiler::quantized_kv_attention`
(compiler.codegen.triton.kv_quant_attention) under Triton's CPU interpreter, against the op's
reference (dequantize the KIVI cache, then torch SDPA): every code width and group size, GQA
and MHA, caches with no quantized or no residual tokens, split boundaries inside either part,
strided inputs, symbolic lengths, the source text (compiled for an H100 by Triton's offline
compiler) and the call sites that keep the reference.

The caches are made by kv_quant's own quantizers from random keys and values, so they are
valid KIVI caches. Under the interpreter the lowering takes key blocks of 32 (16 for key groups
of 48) and splits the Nq + Nr positions in chunks of 64 across up to 5 programs a head (the H100
target's 132 units against a few (batch, kv head) programs): 96 quantized tokens end in the
middle of the second chunk, 224 + 76 puts the quantized/residual boundary inside the fourth
chunk and the residual across the last two, and 37 residual tokens leave a ragged block.

Tolerances, and why:
- FP32: the kernel computes the scores of a key group as (q * s) . codes + q . m where the
  reference computes q . (codes * s + m): the same products grouped and summed in another
  order, a few fp32 ulps of terms of order 1. Then exp2(x log2 e) for exp(x), the online
  softmax rescaled block by block, and splits merged by their log-sum-exp: ~1e-6 relative on
  outputs of order 1 (seen: <= 8e-7 absolute over the tests below). 1e-5 relative and absolute
  is ~10x above that and far below a real bug: a missed or extra key, a wrong group's scale or
  min, or misplaced codes (one 2-bit step is a third of a group's range) move outputs by
  >1e-3.
- FP16: as for the dense kernels (tests/test_codegen_triton_attention.py), each side rounds its
  fp32 result to fp16 once and the kernel rounds P to fp16 before P @ V (about one fp16 ulp,
  2**-10 relative, between them); here the reference also rounds each dequantized key to fp16
  (2**-11 relative) where the kernel multiplies exact codes by q * s, which moves a score by at
  most 2**-11 |q| |k| / sqrt(D), ~1e-4 for these random roundings, and an output by less
  (seen: 2.4e-4 absolute, one fp16 ulp, on outputs up to 0.4). 2**-9 relative plus 2e-3
  absolute bounds both with margin.
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
from compiler.codegen.triton import kv_quant_attention
from compiler.errors import Unsupported
from compiler.ops import LoweringRequest, kv_quant
from compiler.targets import load_target
from models import FunctionModule

FP32 = dict(rtol=1e-5, atol=1e-5)
FP16 = dict(rtol=2**-9, atol=2e-3)
MHA, GQA, SMOLLM2 = (2, 2), (4, 2), (9, 3)
OP = kv_quant.quantized_kv_attention

pytestmark = pytest.mark.usefixtures("kernel_cache_in_tmp", "quiet_interpreter")


def _args(
    batch, heads, n_quant, n_res, bits=4, k_group=32, v_group=32, head_dim=64, seq_q=1, dtype=torch.float32, seed=0
):
    """The op's arguments: q for seq_q queries and a cache of n_quant quantized then n_res
    full-precision tokens, quantized from random keys and values by kv_quant itself."""
    n_q_heads, n_kv_heads = heads
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, n_q_heads, seq_q, head_dim, generator=gen).to(dtype)
    k = torch.randn(batch, n_kv_heads, n_quant + n_res, head_dim, generator=gen)
    v = torch.randn(batch, n_kv_heads, n_quant + n_res, head_dim, generator=gen)
    keys = kv_quant.quantize_keys(k[:, :, :n_quant], bits, k_group)
    values = kv_quant.quantize_values(v[:, :, :n_quant], bits, v_group)
    k_res, v_res = k[:, :, n_quant:].to(dtype), v[:, :, n_quant:].to(dtype)
    cache = (keys.codes, keys.scale, keys.min, values.codes, values.scale, values.min, k_res, v_res)
    return (q, *cache, head_dim**-0.5, bits, k_group)


def _lower(args, run_here=True):
    return OP.lowerings["triton"](LoweringRequest(args, load_target("h100"), run_here))


def _check(args, tolerance=FP32, kernel=None):
    out = (kernel or _lower(args)).runner(*args)
    expected = OP.reference(*args)
    # The strides too: the output is [B, Sq, Hq, Dv] in memory, as causal_attention's.
    assert out.shape == expected.shape and out.dtype == expected.dtype and out.stride() == expected.stride()
    torch.testing.assert_close(out, expected, **tolerance)
    return out


# Formats and lengths ----------------------------------------------------------------------------


@pytest.mark.parametrize("v_group", [32, 64])
@pytest.mark.parametrize("k_group", [32, 64])
@pytest.mark.parametrize("bits", [8, 4, 2])
def test_every_code_width_and_group_size(bits, k_group, v_group):
    # 128 quantized tokens (2 or 4 key groups, 1 or 2 value groups a token) in two 64-key splits,
    # then 5 residual tokens in a third: the SmolLM2 head counts (3 query heads a kv head).
    _check(_args(2, SMOLLM2, 128, 5, bits, k_group, v_group))


@pytest.mark.parametrize("heads", [MHA, SMOLLM2], ids=["mha", "gqa3"])
@pytest.mark.parametrize(
    "n_quant, n_res",
    [(0, 7), (96, 0), (96, 1), (64, 37), (224, 76)],
    ids=["no-quantized", "no-residual", "one-residual", "ragged-residual", "300-keys"],
)
def test_cache_lengths(n_quant, n_res, heads):
    # chunks of 64 positions: one split for 7 keys, two for 96 or 97 or 101, five for 300
    splits = kv_quant_attention.num_splits(n_quant + n_res, 2 * heads[1], 132, 64)
    assert splits == {7: 1, 96: 2, 97: 2, 101: 2, 300: 5}[n_quant + n_res]
    _check(_args(2, heads, n_quant, n_res, bits=4, k_group=32))


def test_key_groups_of_48_take_16_key_blocks():
    # 48 tokens a group: blocks of its largest power-of-two factor, 16, still one group each.
    _check(_args(2, GQA, 144, 5, bits=2, k_group=48, v_group=16))


def test_fp16_accumulates_in_fp32():
    _check(_args(2, SMOLLM2, 224, 76, bits=4, dtype=torch.float16), tolerance=FP16)


def test_strided_inputs_are_read_in_place():
    # q every other element of a wider buffer, the residual the first tokens of a longer one,
    # the value scales and minimums one [..., 2] tensor split in two.
    q, k_codes, k_scale, k_min, v_codes, v_scale, v_min, k_res, v_res, *rest = _args(2, SMOLLM2, 96, 9, bits=2)
    q = torch.stack([q, torch.randn_like(q)], -1).flatten(-2)[..., ::2]
    k_res = torch.cat([k_res, torch.randn_like(k_res)], 2)[:, :, :9]
    v_res = torch.cat([v_res, torch.randn_like(v_res)], 2)[:, :, :9]
    v_scale, v_min = torch.stack([v_scale, v_min], -1).unbind(-1)
    args = (q, k_codes, k_scale, k_min, v_codes, v_scale, v_min, k_res, v_res, *rest)
    assert not (q.is_contiguous() or k_res.is_contiguous() or v_scale.is_contiguous())
    _check(args)


def test_empty_batch():
    args = _args(0, GQA, 64, 3)
    assert _check(args).numel() == 0


# Where the kernel runs, and where the reference does --------------------------------------------


def test_several_queries_keep_the_reference():
    # A static Sq of 2 is declined at lowering; a kernel lowered for a symbolic Sq runs the
    # reference itself when called with more than one query.
    with pytest.raises(Unsupported, match="decode step"):
        _lower(_args(1, GQA, 32, 4, seq_q=2))
    kernel = _lower(_args(1, GQA, 32, 4))
    args = _args(2, GQA, 64, 5, seq_q=2)
    torch.testing.assert_close(kernel.runner(*args), OP.reference(*args), rtol=0, atol=0)


def test_one_kernel_serves_symbolic_batch_and_lengths():
    mode = FakeTensorMode(shape_env=ShapeEnv())
    # B, Sq and the token counts symbolic, as export makes them; heads, dims and groups static.
    dims = [DimDynamic.DYNAMIC, DimDynamic.STATIC, DimDynamic.DYNAMIC, DimDynamic.STATIC]
    dynamic = StatelessSymbolicContext(dynamic_sizes=dims)
    example = _args(2, GQA, 64, 5, seq_q=2)
    fakes = tuple(mode.from_tensor(a, symbolic_context=dynamic) if isinstance(a, torch.Tensor) else a for a in example)
    kernel = _lower(fakes)
    assert kernel.name == "quantized_kv_attention_float32_d64_int4_gk32_gv32" and kernel.runner is not None
    for batch, n_quant, n_res in ((1, 32, 0), (3, 96, 40)):
        _check(_args(batch, GQA, n_quant, n_res, seed=n_res), kernel=kernel)
    args = _args(2, GQA, 64, 5, seq_q=3)
    torch.testing.assert_close(kernel.runner(*args), OP.reference(*args), rtol=0, atol=0)
    with pytest.raises(ValueError, match="kernel for 4-bit codes"):
        kernel.runner(*_args(1, GQA, 32, 1, bits=2))


def test_lower_graph_replaces_the_op_with_the_kernel():
    args = _args(1, SMOLLM2, 64, 3)
    tensors, constants = args[:9], args[9:]

    def f(*tensors):
        return torch.ops.compiler.quantized_kv_attention(*tensors, *constants)

    gm = capture_export(FunctionModule(f), tensors).gm
    executable, report = lower_graph(gm, load_target("h100"))
    assert [kernel.name for kernel in report.kernels] == ["quantized_kv_attention_float32_d64_int4_gk32_gv32"]
    assert not report.fallbacks
    torch.testing.assert_close(executable(*tensors)[0], f(*tensors), **FP32)


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(k_group=8, v_group=8), "key groups of 8"),
        (dict(dtype=torch.float64), "float64"),
    ],
)
def test_unsupported_call_sites_keep_the_reference(change, match):
    with pytest.raises(Unsupported, match=match):
        _lower(_args(1, GQA, 32, 1, **change))


def test_bf16_under_the_stock_interpreter_keeps_the_reference():
    kernel = _lower(_args(1, GQA, 32, 1, dtype=torch.bfloat16))
    assert kernel.runner is None and "11584" in kernel.note and "quantized_kv_attention_split_kernel" in kernel.source


# Source -----------------------------------------------------------------------------------------


def test_source_is_the_module_the_runner_imports():
    kernel = _lower(_args(1, SMOLLM2, 32, 1, bits=2), run_here=False)
    assert kernel.runner is None and kernel.note
    header, body = kernel.source.split("import triton", 1)
    assert all(line.startswith("#") for line in header.splitlines())  # launches, as comments
    assert "import triton" + body == kv_quant_attention.KERNEL_SOURCE
    tree = ast.parse(kernel.source)
    defined = {node.name for node in tree.body if isinstance(node, ast.FunctionDef)}
    for name in ("quantized_kv_attention_split_kernel", "attention_decode_combine_kernel"):
        assert name in defined and f"{name}[(" in header
    assert "_attend_key_block" in defined and "_attend_quantized_block" in defined
    assert "BITS=2, K_GROUP=32, V_GROUP=32, KEY_PRECISION='ieee'" in header


# Compiles kernel.py's split kernel for sm_90 with the constants given on the command line (JSON).
_COMPILE_FOR_H100 = """
import importlib.util, json, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

spec = importlib.util.spec_from_file_location("kv_quant_attention_h100", sys.argv[1])
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
fn = module.quantized_kv_attention_split_kernel
constants = json.loads(sys.argv[2])
pointers = dict(q_ptr="fp16", kc_ptr="u8", ks_ptr="fp16", km_ptr="fp16", vc_ptr="u8", vs_ptr="fp16", vm_ptr="fp16",
                kr_ptr="fp16", vr_ptr="fp16", o_ptr="fp16", part_o_ptr="fp32", part_lse_ptr="fp32")
def arg_type(name):
    if name in pointers:
        return "*" + pointers[name]
    return "constexpr" if name in constants else "fp32" if name == "qk_scale" else "i32"

signature = {name: arg_type(name) for name in fn.arg_names}
compiled = triton.compile(
    ASTSource(fn, signature, {(fn.arg_names.index(k),): v for k, v in constants.items()}),
    target=GPUTarget("cuda", 90, 32), options=dict(num_warps=4, num_stages=3),
)
print(compiled.asm["ptx"])
"""


def test_source_compiles_for_an_h100(tmp_path, monkeypatch):
    """The text GPU users get, with the launch constants its header gives for an H100, compiled
    to sm_90 PTX by Triton's own compiler (which needs no GPU). In a fresh process: compiling
    fails in one that has run kernels under the interpreter."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # the H100 launch constants
    example = _args(1, SMOLLM2, 64, 1, k_group=64, dtype=torch.float16)
    source = _lower(tuple(a.to("meta") if isinstance(a, torch.Tensor) else a for a in example), run_here=False).source
    constants = dict(
        HEAD_DIM=64, HEAD_DIM_V=64, BLOCK_D=64, BLOCK_DV=64, BLOCK_N=64, BITS=4, K_GROUP=64, V_GROUP=32, KEY_PRECISION="tf32"
    )
    assert ", ".join(f"{k}={v!r}" for k, v in constants.items()) in source and "num_warps=4, num_stages=3" in source
    constants.update(BLOCK_R=16, SINGLE_SPLIT=False)  # 3 query heads a kv head; several splits
    path = tmp_path / "kernel.py"
    path.write_text(source)
    env = dict(os.environ, TRITON_CACHE_DIR=str(tmp_path / "triton"))
    ptx = subprocess.run(
        [sys.executable, "-c", _COMPILE_FOR_H100, str(path), json.dumps(constants)],
        env=env, capture_output=True, text=True, check=True, timeout=300,
    ).stdout
    assert ".target sm_90" in ptx and "mma.sync" in ptx and "ld.local" not in ptx  # tensor cores, no spills
