"""Tests of matmul_epilogue regions: the partitioner (`compiler.passes.fusion.partition`) forms them
on Triton targets only, and the Triton lowering (`compiler.codegen.triton.matmul`) computes them,
under Triton's CPU interpreter, as eager does.

Tolerances, and why:
- FP32: each output element is a dot product of K <= 128 terms, which the kernel sums in
  BLOCK_K chunks (numpy under the interpreter, another order on a GPU) and eager's BLAS in its
  own order. Reassociating fp32 sums moves the result by ~sqrt(K) * 2**-24 times the sum of
  |a_k * b_k|: seen up to 6e-6 on values up to ~27 (K = 45). rtol = atol = 1e-5 allows ~40x
  that at such values and is far below a wrong element (off by O(1)). The epilogue's own ops
  are exact (+, *) or a few ulps (sigmoid), well inside.
- fp16 and bf16: the product is rounded to the storage dtype where eager rounds it (the mm's
  output), then the epilogue computes in fp32 and rounds at the store. The product may round
  one ulp apart when the fp32 sums differ in their last bits, and eager rounds once more after
  each epilogue op; Triton's interpreter also truncates fp32 -> bf16 where eager rounds to
  nearest. With a well-conditioned epilogue (relu, a multiply) that is checked at 2 ulps of
  the result's dtype for fp16 (seen: 1) and 3 for bf16 (seen: 3, one per rounding that may
  differ: the sum's last bits, the product's truncation, the store's). An ill-conditioned
  epilogue would amplify the product's last-ulp difference: silu(x) at x = -13 by 14x.
"""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"  # before anything imports triton (conftest sets it too)

import copy
from collections import Counter

import pytest
import torch
import torch.nn.functional as F
from torch.fx.experimental.proxy_tensor import make_fx

import compiler
from compiler.capture import capture_export
from compiler.codegen import RegionRequest, lower_graph, region_kinds
from compiler.codegen.triton.matmul import lower_matmul_epilogue
from compiler.errors import Unsupported
from compiler.passes import FusePartition, PassContext, default_pipeline
from compiler.passes.fusion.region import fuse_nodes, regions
from compiler.targets import load_target
from models import FunctionModule, logits, tiny_llama, token_inputs

aten = torch.ops.aten

FP32 = dict(rtol=1e-5, atol=1e-5)


pytestmark = pytest.mark.usefixtures("kernel_cache_in_tmp", "quiet_interpreter")


def _randn(*shape, dtype=torch.float32, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


class Block(torch.nn.Module):
    """The matmuls of a Llama layer after attention: the output projection plus the residual,
    then the SwiGLU MLP plus the residual (no norms, so every matmul's consumer is elementwise)."""

    def __init__(self, hidden: int, ffn: int) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.o_proj = torch.nn.Linear(hidden, hidden, bias=False)
        self.gate = torch.nn.Linear(hidden, ffn, bias=False)
        self.up = torch.nn.Linear(hidden, ffn, bias=False)
        self.down = torch.nn.Linear(ffn, hidden, bias=False)

    def forward(self, attn: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        h = residual + self.o_proj(attn)
        return h + self.down(F.silu(self.gate(h)) * self.up(h))


def _partitioned(module, args, target, **options):
    gm = capture_export(module, args).gm
    result = FusePartition(**options).run(gm, PassContext(target=target))
    return gm, result


def _as_tuple(x):
    return tuple(x) if isinstance(x, (tuple, list)) else (x,)


def _ulps(got: torch.Tensor, want: torch.Tensor) -> float:
    """|got - want| in units in the last place of want's dtype at want's magnitude."""
    info = torch.finfo(want.dtype)
    ulp = torch.exp2(torch.floor(torch.log2(want.float().abs().clamp_min(info.tiny)))) * info.eps
    return ((got.float() - want.float()).abs() / ulp).max().item()


# -- the partitioner -----------------------------------------------------------------------------


def test_block_forms_linear_residual_and_swiglu_regions_on_h100_only():
    # batch 3 x 11 tokens: the linear layers' [33, N] products are viewed as [3, 11, N]
    module, args = Block(45, 70), (_randn(3, 11, 45), _randn(3, 11, 45, seed=1))
    gm, result = _partitioned(module, args, "h100")
    found = {m.label: {str(n.target) for n in m.ops()} for _, m in regions(gm)}
    assert {m.kind for _, m in regions(gm)} == {"matmul_epilogue"} and result.stats["kinds"][-1] == "matmul_epilogue"
    assert Counter(m.label for _, m in regions(gm)) == {"linear+residual": 2, "linear+swiglu": 1}
    assert found["linear+swiglu"] == {"aten.mm.default", "aten._unsafe_view.default", "aten.silu.default", "aten.mul.Tensor"}
    # The up projection's product is an input of the SwiGLU region (one matmul per region), and
    # the transposed weights stay outside: the GEMM reads them through their strides.
    top = Counter(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
    assert top["aten.mm.default"] == 1 and top["aten.t.default"] == 4
    with torch.no_grad():  # the regions run their ATen ops: bit-identical
        torch.testing.assert_close(_as_tuple(gm(*args)), _as_tuple(module(*args)), rtol=0, atol=0)

    for target in ("host", None):  # TVM has no GEMM template, and without a target nothing asks
        gm, result = _partitioned(module, args, target)
        assert "matmul_epilogue" not in result.stats["kinds"]
        assert [m.label for _, m in regions(gm)] == ["swiglu"]
        assert all(n.target not in (aten.mm.default, aten.addmm.default) for _, m in regions(gm) for n in m.ops())
    gm, _ = _partitioned(module, args, "h100", kinds=("pointwise", "reduction"))  # asked not to
    assert [m.label for _, m in regions(gm)] == ["swiglu"]


def test_backends_declare_the_region_kinds_they_lower():
    assert region_kinds("triton") == {"pointwise", "reduction", "matmul_epilogue"}
    assert region_kinds("tvm") == {"pointwise", "reduction"}
    assert region_kinds(None) == {"pointwise", "reduction"}


def test_region_price_is_the_matmul_and_its_epilogue_minus_the_intermediates():
    seq, hidden, ffn = 64, 576, 1536  # SmolLM2-135M's MLP at a 64-token prefill
    module, args = Block(hidden, ffn), (_randn(1, seq, hidden), _randn(1, seq, hidden, seed=1))
    original = capture_export(module, args).gm
    gm = copy.deepcopy(original)
    ctx = PassContext(target="h100")
    FusePartition().run(gm, ctx)
    model = ctx.cost_model
    by_name = {n.name: n for n in original.graph.nodes}
    sizes = {"linear+swiglu": seq * ffn * 4, "linear+residual": seq * hidden * 4}
    # intermediates written and read back unfused: swiglu's mm and silu, a residual's mm
    saved = {"linear+swiglu": 2 * 2, "linear+residual": 2}
    for _, region in regions(gm):
        members = [by_name[n.name] for n in region.ops()]
        before, after = model.compare(members, model.region(members)).before, model.region(members)
        assert after.flops == sum(e.flops for e in before.estimates)  # 2*M*N*K + the epilogue's
        assert after.category == "linear" and after.work.launches == 1
        assert sum(e.bytes for e in before.estimates) - after.bytes == saved[region.label] * sizes[region.label]
        assert float(after.time) < float(before.time)


def test_epilogue_never_closes_a_cycle_nor_reads_the_product_elsewhere_than_its_element():
    def fn(x, w, w2, r):
        y = x @ w
        z = torch.relu(y) + y @ w2  # the add also reads y through the second matmul
        return z, (y.t() * 2).exp(), (y + r).pow(2).mean(-1)

    args = (_randn(8, 16), _randn(16, 16, seed=1), _randn(16, 16, seed=2), _randn(8, 16, seed=3))
    gm, _ = _partitioned(FunctionModule(fn), args, "h100")
    groups = sorted(sorted(n.name for n in m.ops()) for _, m in regions(gm))
    # relu(y) + (y @ w2) with the first mm would leave through the second and come back: the add
    # joins the second mm instead. The transpose reads the product at another element: the
    # exp region reads it from memory. The pow is left to the mean as its prologue.
    assert groups == [["add", "mm_1"], ["add_1", "mm", "relu"], ["exp", "mul", "t"], ["mean", "pow_1"]], groups
    with torch.no_grad():
        for got, want in zip(gm(*args), fn(*args)):
            torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_an_in_place_write_between_matmul_and_consumer_keeps_them_apart():
    def fn(x, w, b):
        y = x @ w
        b.add_(1)  # the add below reads b after the write; y was computed before it
        return torch.relu(y + b)

    args = (_randn(8, 16), _randn(16, 16, seed=1), _randn(16, seed=2))
    gm = make_fx(fn, tracing_mode="fake")(*args)
    FusePartition().run(gm, PassContext(target="h100"))
    assert [sorted(n.name for n in m.ops()) for _, m in regions(gm)] == [["add", "relu"]]
    assert aten.mm.default in {n.target for n in gm.graph.nodes}
    got = gm(*(a.clone() for a in args))
    torch.testing.assert_close(got, fn(*(a.clone() for a in args)), rtol=0, atol=0)


# -- the kernels ---------------------------------------------------------------------------------


def _fused(fn, args, select=lambda n: True):
    """The captured graph of `fn` with its ATen ops (or those `select` picks) fused into one
    matmul_epilogue region."""
    gm = capture_export(FunctionModule(fn), args).gm
    nodes = [n for n in gm.graph.nodes if n.op == "call_function" and select(n)]
    fuse_nodes(gm, nodes, "matmul_epilogue")
    return gm


def _check(gm, fn, args, within):
    executable, report = lower_graph(gm, load_target("h100"))
    assert not report.fallbacks, report.fallbacks
    kernels = [k for k in report.kernels if k.name.startswith("triton_matmul_epilogue")]
    assert kernels and all(k.runner is not None for k in kernels)
    got, want = _as_tuple(executable(*args)), _as_tuple(fn(*args))
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.shape == w.shape and g.dtype == w.dtype and g.stride() == w.stride()
        within(g, w)
    return kernels


def _close(g, w):
    torch.testing.assert_close(g, w, **FP32)


def _not_weight_views(n):
    return n.target not in (aten.t.default, aten.permute.default, aten.transpose.int, aten.expand.default)


def test_odd_sizes_transposed_weight_and_residual():
    # M, N, K = 33, 70, 45: every dim has a tail past the interpreter's 32 x 32 x 32 tiles
    def fn(x, w, r):
        return F.linear(x, w) + r

    args = (_randn(33, 45), _randn(70, 45, seed=1), _randn(33, 70, seed=2))
    (kernel,) = _check(_fused(fn, args, _not_weight_views), fn, args, _close)
    assert "EVEN_K=45 % BLOCK_K == 0" in kernel.source  # the K tail is masked


@pytest.mark.parametrize("alpha, beta", [(1, 1), (2.0, 0.5), (1, 0)])
def test_addmm_bias_alpha_beta_and_relu(alpha, beta):
    def fn(b, x, w):
        return torch.relu(torch.addmm(b, x, w, beta=beta, alpha=alpha))

    b = _randn(70, seed=2)
    if beta == 0:
        b[3] = float("nan")  # beta = 0 ignores the bias, NaN included
    args = (b, _randn(33, 45), _randn(45, 70, seed=1))
    _check(_fused(fn, args), fn, args, _close)


def test_bmm_with_a_broadcast_scale():
    def fn(a, b, s):
        return torch.bmm(a, b) * s

    args = (_randn(3, 33, 45), _randn(3, 70, 45, seed=1).transpose(1, 2), _randn(3, 1, 70, seed=2))
    _check(_fused(fn, args, _not_weight_views), fn, args, _close)


def test_partitioned_block_runs_the_gemm_kernels_with_batch_views_silu_and_mul():
    # [33, N] products viewed as [3, 11, N]; residual adds and silu(gate) * up
    module, args = Block(45, 70), (_randn(3, 11, 45), _randn(3, 11, 45, seed=1))
    gm, _ = _partitioned(module, args, "h100")
    with torch.no_grad():
        kernels = _check(gm, module, args, _close)
    assert len(kernels) == 3


def test_gpt2_gelu_reading_the_product_view_three_times_joins_its_addmm():
    class Mlp(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.fc = torch.nn.Linear(45, 70)

        def forward(self, x: torch.Tensor) -> torch.Tensor:  # GPT-2's NewGELUActivation, written out
            h = self.fc(x)
            return 0.5 * h * (1.0 + torch.tanh(0.7978845608028654 * (h + 0.044715 * torch.pow(h, 3.0))))

    module, args = Mlp(), (_randn(3, 11, 45),)
    gm, _ = _partitioned(module, args, "h100")
    ((_, region),) = regions(gm)
    assert region.label == "linear+bias+gelu" and aten.tanh.default in {n.target for n in region.ops()}

    with torch.no_grad():  # tanh from exp in the kernel: within 1e-7 of eager's, inside FP32
        _check(gm, module, args, _close)


@pytest.mark.parametrize("dtype, ulps", [(torch.float16, 2), (torch.bfloat16, 3)])
def test_half_precision_rounds_the_product_as_eager_does(dtype, ulps):
    def fn(x, w, s):
        return F.relu(F.linear(x, w)) * s

    args = (_randn(33, 45, dtype=dtype), _randn(70, 45, dtype=dtype, seed=1), _randn(70, dtype=dtype, seed=2))

    def within(g, w):
        assert _ulps(g, w) <= ulps

    _check(_fused(fn, args, _not_weight_views), fn, args, within)


def test_reading_the_product_at_another_element_is_declined():
    def fn(x, w):
        return (x @ w).t() + 1

    args = (_randn(16, 16), _randn(16, 16, seed=1))
    gm = _fused(fn, args)
    (call,) = [n for n in gm.graph.nodes if n.op == "call_module"]
    request = RegionRequest(gm.get_submodule(str(call.target)), args, load_target("h100"), run_here=True)
    with pytest.raises(Unsupported, match="reads the product at"):
        lower_matmul_epilogue(request)
    with pytest.warns(UserWarning, match="runs in ATen"):
        executable, report = lower_graph(gm, load_target("h100"))
    assert "reads the product" in report.fallbacks[0]
    torch.testing.assert_close(_as_tuple(executable(*args)), _as_tuple(fn(*args)), rtol=0, atol=0)


def test_source_is_one_text_for_gpu_and_interpreter(monkeypatch):
    def fn(x, w, r):
        return F.linear(x, w) + r

    args = (_randn(33, 45), _randn(70, 45, seed=1), _randn(33, 70, seed=2))
    gm = _fused(fn, args, _not_weight_views)
    (call,) = [n for n in gm.graph.nodes if n.op == "call_module"]
    region = gm.get_submodule(str(call.target))
    interpreted = lower_matmul_epilogue(RegionRequest(region, args, load_target("h100"), run_here=True))
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    gpu = lower_matmul_epilogue(RegionRequest(region, args, load_target("h100"), run_here=True))
    assert gpu.runner is None and "TRITON_INTERPRET" in gpu.note
    assert gpu.source == interpreted.source and gpu.name == interpreted.name
    source = gpu.source
    assert "'BLOCK_M': 128, 'BLOCK_N': 128, 'BLOCK_K': 32, 'GROUP_M': 8, 'num_warps': 8, 'num_stages': 3" in source
    assert "'BLOCK_M': 32, 'BLOCK_N': 32, 'BLOCK_K': 32" in source
    assert 'tl.dot(a, b, acc, input_precision="ieee")' in source  # fp32 as eager computes it
    # strides are launch arguments: the transposed weight is read in place
    assert "in1.stride(0), in1.stride(1)" in source and ".contiguous()" not in source
    monkeypatch.setattr(torch, "get_float32_matmul_precision", lambda: "high")
    tf32 = lower_matmul_epilogue(RegionRequest(region, args, load_target("h100"), run_here=False))
    assert 'input_precision="tf32"' in tf32.source and tf32.name != gpu.name


# -- end to end ----------------------------------------------------------------------------------


def test_tiny_llama_compiled_for_h100_runs_matmul_epilogues_and_matches_eager():
    model, inputs = tiny_llama(), token_inputs(24)
    compiled = compiler.compile(model, inputs, target="h100")
    labels = Counter(m.label for _, m in regions(compiled.result.ir) if m.kind == "matmul_epilogue")
    assert labels == {"linear+residual": 4, "linear+swiglu": 2}  # o_proj and down, gate per layer
    codegen = compiled.result.codegen
    gemms = [k for k in codegen.kernels if k.name.startswith("triton_matmul_epilogue")]
    assert gemms and all(k.runner is not None for k in gemms)
    assert not [f for f in codegen.fallbacks if f.startswith("fused_matmul_epilogue")], codegen.fallbacks
    with torch.no_grad():
        want = logits(model(**inputs))
        got = logits(compiled(**inputs))
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)

    # The host's default pipeline keeps every matmul with the BLAS.
    captured = capture_export(model, (), inputs)
    default_pipeline().run(captured.gm, PassContext(target="host"))
    kinds = Counter(m.kind for _, m in regions(captured.gm))
    assert kinds and "matmul_epilogue" not in kinds
