"""Tests of the cost model (compiler.cost_model): per-op work against exact formulas and
PyTorch's own FLOP counter, fused regions, launch overhead, symbolic estimates against static
ones, and the crossover search against brute force.

GPU targets are used where exact numbers matter, since their figures are fixed in the TOML;
the host's are measured (and covered by tests/test_targets.py).
"""

from __future__ import annotations

import math

import pytest
import sympy
import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from compiler.capture import capture_export, capture_fx
from compiler.cost_model import CostModel, TensorInfo, Work, attention_work
from compiler.cost_model.rules import causal_pairs
from compiler.cost_model.symbolic import L, SMOLLM2, attention_crossover, block_sparse_attention, crossover, dense_attention
from models import FunctionModule, tiny_llama, token_inputs

H100 = CostModel("h100")


def _graph(fn, *inputs: torch.Tensor):
    """An ATen graph of `fn` (a module or function) with FakeTensor metadata."""
    module = fn if isinstance(fn, torch.nn.Module) else FunctionModule(fn)
    return capture_export(module, inputs).gm



def _calls(gm: torch.fx.GraphModule, name: str) -> list[torch.fx.Node]:
    return [n for n in gm.graph.nodes if n.op == "call_function" and name in str(n.target)]


# -- per-op work -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "fn, shapes",
    [
        (lambda a, b: a @ b, [(64, 96), (96, 32)]),
        (lambda a, b: torch.bmm(a, b), [(3, 16, 24), (3, 24, 40)]),
        (lambda a, b, c: torch.addmm(c, a, b), [(8, 16), (16, 4), (8, 4)]),
    ],
)
def test_matmul_flops_match_pytorch_flop_counter(fn, shapes):
    inputs = [torch.randn(s) for s in shapes]
    with FlopCounterMode(display=False) as counter:
        fn(*inputs)
    est = H100.graph(_graph(fn, *inputs))
    matmul = sum(sum(e.work.matmul_flops.values()) for e in est.estimates)
    assert matmul == counter.get_total_flops() > 0


def test_sdpa_flops_match_pytorch_formula():
    # FlopCounterMode does not see the CPU flash kernel, so compare with its formula directly
    shapes = [(1, 4, 32, 16), (1, 4, 48, 16), (1, 4, 48, 16)]
    gm = _graph(lambda q, k, v: torch.nn.functional.scaled_dot_product_attention(q, k, v), *[torch.randn(s) for s in shapes])
    (sdpa,) = [e for e in H100.graph(gm).estimates if e.work.launches]
    assert sdpa.category == "attention"
    assert sdpa.work.matmul_flops["fp32"] == sdpa_flop_count(*shapes)


@pytest.mark.parametrize("sq, skv", [(1, 1), (5, 5), (7, 3), (3, 9), (64, 64), (1, 100)])
def test_causal_pairs_count_the_top_left_causal_mask(sq, skv):
    assert causal_pairs(sq, skv) == torch.ones(sq, skv).tril().sum().item()
    n = sympy.Symbol("n", positive=True, integer=True)
    assert int(causal_pairs(n, n).subs(n, sq)) == torch.ones(sq, sq).tril().sum().item()


def test_gqa_attention_reads_kv_at_their_own_head_count():
    q = TensorInfo((1, 9, 128, 64), torch.float32)
    kv = TensorInfo((1, 3, 128, 64), torch.float32)
    repeated = TensorInfo((1, 9, 128, 64), torch.float32)
    gqa, mha = attention_work(q, kv, kv, [q], causal=True), attention_work(q, repeated, repeated, [q], causal=True)
    assert gqa.matmul_flops == mha.matmul_flops
    assert mha.bytes_read - gqa.bytes_read == 2 * (9 - 3) * 128 * 64 * 4


def test_causal_sdpa_does_half_the_work_of_an_explicit_mask():
    q = TensorInfo((1, 4, 256, 32), torch.float32)
    mask = TensorInfo((1, 1, 256, 256), torch.bool)
    causal, masked = attention_work(q, q, q, [q], causal=True), attention_work(q, q, q, [q], causal=False, mask=mask)
    assert causal.matmul_flops["fp32"] / masked.matmul_flops["fp32"] == pytest.approx((256 + 1) / (2 * 256))
    assert masked.bytes_read - causal.bytes_read == 256 * 256


def test_elementwise_bytes_count_each_input_at_its_own_size():
    x, row = torch.randn(32, 64), torch.randn(64)
    gm = _graph(lambda a, b: a + b, x, row)
    (add,) = _calls(gm, "add")
    est = H100.node(add)
    assert est.work.bytes_read == (32 * 64 + 64) * 4
    assert est.work.bytes_written == 32 * 64 * 4
    assert est.category == "elementwise" and est.work.launches == 1


def test_transcendentals_are_counted_for_exp_class_ops_only():
    x = torch.randn(8, 16)
    gm = _graph(lambda a: torch.exp(a) * torch.sigmoid(a) + a.pow(2), x)
    by_op = {str(n.target): H100.node(n).work.transcendentals for n in gm.graph.nodes if n.op == "call_function"}
    assert by_op["aten.exp.default"] == 128 and by_op["aten.sigmoid.default"] == 128
    assert by_op["aten.pow.Tensor_Scalar"] == 0 and by_op["aten.mul.Tensor"] == 0


def test_views_are_free():
    x = torch.randn(4, 6, 8)
    gm = _graph(lambda a: a.view(24, 8).t().unsqueeze(0).expand(3, 8, 24), x)
    est = H100.graph(gm)
    assert est.launches == 0 and est.time == 0


def test_linear_is_recognised_by_its_constant_weight():
    layer = torch.nn.Linear(32, 16)
    est = H100.graph(_graph(layer, torch.randn(4, 32)))
    kernels = [e for e in est.estimates if e.work.launches]
    assert [e.category for e in kernels] == ["linear"]
    assert kernels[0].work.matmul_flops["fp32"] == 2 * 4 * 32 * 16


def test_compiler_ops_declare_their_cost():
    from compiler.passes import default_pipeline
    from compiler.passes.pipeline import PassContext

    gm = capture_export(tiny_llama(), (), token_inputs(16)).gm
    default_pipeline().run(gm, PassContext(target="h100", disabled={"fuse_regions"}))
    norms = [n for n in gm.graph.nodes if n.target is torch.ops.compiler.rms_norm.default]
    attention = [n for n in gm.graph.nodes if "scaled_dot_product" in str(n.target) or "causal_attention" in str(n.target)]
    assert len(norms) == 5 and attention
    est = H100.node(norms[0])
    assert est.category == "norm" and not est.generic
    assert est.work.bytes == (16 * 64 * 2 + 64) * 4
    assert H100.graph(gm).generic_ops() == {}


# -- roofline ----------------------------------------------------------------------------------


def test_roofline_bounds_and_time_formula():
    hw = H100.hw
    gemm = Work({"bf16": 2 * 8192**3}, bytes_read=2 * 8192 * 8192 * 2, bytes_written=8192 * 8192 * 2)
    stream = Work(vector_flops=1 << 28, bytes_read=8 << 28, bytes_written=4 << 28)
    tiny = Work(vector_flops=64, bytes_read=512, bytes_written=256)
    assert [H100.estimate(w).bound for w in (gemm, stream, tiny)] == ["compute", "memory", "overhead"]
    expected = hw.launch_overhead + 2 * 8192**3 / (hw.matmul_flops["bf16"] * hw.achievable["matmul"])
    assert H100.estimate(gemm).time == pytest.approx(expected, rel=1e-12)
    expected = hw.launch_overhead + (12 << 28) / (hw.memory_bandwidth * hw.achievable["memory"])
    assert H100.estimate(stream).time == pytest.approx(expected, rel=1e-12)


def test_fused_region_costs_only_its_inputs_and_outputs_and_one_launch():
    x = torch.randn(256, 1024)
    gm = _graph(lambda a: torch.relu(a * 2.0 + 1.0).neg(), x)
    nodes = [n for n in gm.graph.nodes if n.op == "call_function"]
    region = H100.region(nodes)
    unfused = H100.compare(nodes, region)
    assert region.work.bytes == 2 * x.numel() * 4 and region.work.launches == 1
    assert sum(H100.node(n).work.bytes for n in nodes) == 4 * 2 * x.numel() * 4
    assert region.flops == sum(H100.node(n).flops for n in nodes)
    # four launches become one: at least three launch overheads saved
    assert unfused.saved >= 3 * H100.hw.launch_overhead
    assert unfused.speedup > 1


def test_region_with_a_value_used_outside_writes_it():
    x = torch.randn(64, 64)
    gm = _graph(lambda a: (lambda e: (e + 1.0, e * 3.0))(torch.exp(a)), x)
    nodes = [n for n in gm.graph.nodes if n.op == "call_function"]
    exp = next(n for n in nodes if "exp" in str(n.target))
    add = next(n for n in nodes if "add" in str(n.target))
    region = H100.region([exp, add])  # exp also feeds the mul outside the region
    assert region.work.bytes_written == 2 * x.numel() * 4
    assert region.work.bytes_read == x.numel() * 4


# -- symbolic ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def llama_graphs():
    model = tiny_llama()
    seq = torch.export.Dim("seq", min=4, max=128)
    dynamic = capture_export(model, (), token_inputs(16), dynamic_shapes={"input_ids": {1: seq}, "attention_mask": {1: seq}})
    static = {n: capture_export(model, (), token_inputs(n)).gm for n in (24, 100)}
    return dynamic.gm, static


def test_symbolic_estimate_equals_static_estimates_at_each_length(llama_graphs):
    dynamic, static = llama_graphs
    est = H100.graph(dynamic)
    assert len(est.symbols) == 1
    for n, gm in static.items():
        bound = est.at({"input_ids.size(1)": n})
        assert float(bound.time) == pytest.approx(float(H100.graph(gm).time), rel=1e-12)
        assert {k: float(v) for k, v in bound.by_category().items()} == pytest.approx(
            {k: float(v) for k, v in H100.graph(gm).by_category().items()}, rel=1e-12
        )


def test_summary_by_phase_and_category(llama_graphs):
    dynamic, _ = llama_graphs
    summary = H100.summary({"short": (dynamic, {"input_ids.size(1)": 8}), "long": (dynamic, {"input_ids.size(1)": 128})})
    for phase in summary.values():
        assert phase["total"] == pytest.approx(sum(v for k, v in phase.items() if k != "total"))
    assert summary["long"]["attention"] > summary["short"]["attention"] > 0
    assert summary["long"]["linear"] > 0 and summary["long"]["elementwise"] > 0


def _brute_force_crossover(dense, sparse, hi: int) -> int | None:
    f = sympy.lambdify(L, sparse - dense, modules="math")
    wins = [n for n in range(1, hi + 1) if f(n) < 0]
    if not wins:
        return None
    assert wins == list(range(wins[0], hi + 1)), "the candidate wins, then loses again"
    return wins[0]


@pytest.mark.parametrize("target", ["h100", "a100", "host"])
@pytest.mark.parametrize("density", [0.05, 0.2])
def test_attention_crossover_matches_brute_force(target, density):
    model = CostModel(target)
    dense = model.estimate(dense_attention(SMOLLM2)).time
    sparse = model.estimate(block_sparse_attention(SMOLLM2, density)).time
    found = attention_crossover(target, density=density)
    assert found is not None and 1 < found < 8192
    assert found == _brute_force_crossover(dense, sparse, hi=8192)
    assert crossover(dense, sparse, hi=8192) == found


def test_crossover_edge_cases():
    n = sympy.Symbol("n", positive=True, integer=True)
    assert crossover(sympy.Integer(100), n, symbol=n) is None  # n < 100 only below 100
    assert crossover(n + 100, n, symbol=n) == 1  # always cheaper
    assert crossover(n * n, 10 * n + 5, symbol=n) == 11  # 10n + 5 < n^2 from n = 11
    assert crossover(n, n + 1, symbol=n) is None
    # wins on 21..40, loses on 41..60, wins from 61 on: the threshold is 61
    assert crossover(sympy.Integer(0), -(n - 20.5) * (n - 40.5) * (n - 60.5), symbol=n, hi=1000) == 61
    # wins briefly around 100 only: no threshold
    assert crossover(sympy.Integer(50), (n - 100) ** 2, symbol=n, hi=1000) is None


def test_fx_capture_is_estimated_too():
    gm = torch.fx.symbolic_trace(torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU()))
    captured = capture_fx(gm, (torch.randn(2, 8),))
    est = H100.graph(captured.gm)
    assert est.launches >= 2 and math.isfinite(float(est.time))
