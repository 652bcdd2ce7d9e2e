"""Tests of the fusion partitioner (`compiler.passes.fusion.partition.FusePartition`).

On tiny Llama and GPT-2 captured with torch.export (SDPA and eager attention), the pass must form
the regions an LLM has (SwiGLU, rotary embedding, residual add + norm, softmax, GELU), keep the
graph well formed and its outputs bit-identical (regions run their ATen ops, in the same order),
and make the cost model predict fewer kernels and less time. Small graphs traced with make_fx pin
down the rules: no region that would make a cycle, none across an in-place write, unknown ops and
compiler ops stay outside, and the cost model decides at SmolLM2 sizes.
"""

from __future__ import annotations

import copy
import operator
from collections import Counter

import pytest
import torch
import torch.fx as fx
from torch.fx.experimental.proxy_tensor import make_fx

import compiler.ops  # noqa: F401 - registers torch.ops.compiler.*
from compiler.capture import Captured, capture_export
from compiler.errors import PassError
from compiler.ir import is_mutating
from compiler.passes import FusePartition, PassContext, Pipeline, VerifyNumericsInstrument
from compiler.passes.fusion.partition import Planner, classify
from compiler.passes.fusion.region import regions
from compiler.passes.fusion.rms_norm import fuse_rms_norm
from models import logits, tiny_gpt2, tiny_llama, token_inputs

aten = torch.ops.aten

# (builder, attention implementation) -> labels its graph must yield. Both tiny models have two
# layers: Llama has rotary q and k per layer (k also repeats heads for GQA), a SwiGLU MLP, an
# RMSNorm on the embeddings and three residual adds feeding norms whose sum is used again (the
# last one's is not); GPT-2 has a tanh GELU and LayerNorms. Only eager attention has a softmax.
EXPECTED = {
    ("llama", "sdpa"): {"rms_norm": 2, "residual+rms_norm": 3, "rotary": 2, "rotary+repeat_kv": 2, "swiglu": 2},
    ("llama", "eager"): {"rms_norm": 2, "residual+rms_norm": 3, "rotary": 2, "rotary+repeat_kv": 2, "swiglu": 2, "softmax": 2},
    ("gpt2", "sdpa"): {"layer_norm": 2, "residual+layer_norm": 3, "gelu": 2},
    ("gpt2", "eager"): {"layer_norm": 2, "residual+layer_norm": 3, "gelu": 2, "softmax": 2},
}
BUILDERS = {"llama": tiny_llama, "gpt2": tiny_gpt2}
# The regions above, without the matmul_epilogue regions that Triton targets also form (those
# are tested in test_fusion_matmul_epilogue.py): residual adds and activations then join their
# matmuls instead of norms and pointwise regions.
ELEMENTWISE = ("pointwise", "reduction")


@pytest.fixture(scope="module", params=sorted(EXPECTED), ids=lambda p: "-".join(p))
def captured(request) -> tuple[tuple[str, str], torch.nn.Module, list[torch.Tensor], Captured]:
    name, attention = request.param
    model = BUILDERS[name]()
    model.config._attn_implementation = attention
    inputs = token_inputs(16)
    cap = capture_export(model, (), inputs)
    return request.param, model, cap.flatten_inputs((), inputs), cap


def fused(cap: Captured, target: str | None = "h100", **options) -> tuple[fx.GraphModule, PassContext, object]:
    gm = copy.deepcopy(cap.gm)
    ctx = PassContext(target=target)
    result = FusePartition(**options).run(gm, ctx)
    return gm, ctx, result


def run(gm: fx.GraphModule, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    with torch.no_grad():
        return list(gm(*inputs))


def max_error(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    assert len(a) == len(b)
    return max((x - y).abs().max().item() for x, y in zip(a, b))


# -- tiny models -------------------------------------------------------------------------------


def test_regions_and_labels_on_tiny_models(captured):
    key, _, _, cap = captured
    gm, _, result = fused(cap, kinds=ELEMENTWISE)
    labels = Counter(module.label for _, module in regions(gm))
    assert {k: labels[k] for k in EXPECTED[key]} == EXPECTED[key], labels
    kinds = {module.kind for _, module in regions(gm)}
    assert kinds == {"pointwise", "reduction"}
    assert result.stats["regions"] == len(regions(gm)) == len(result.changes)
    for line in result.changes:  # kind, label, nodes and the predicted times, per region
        assert " region fused_" in line and "[" in line and "predicted" in line and " us -> " in line
    if key[1] == "eager":  # softmax regions take the scale and the mask add as prologue
        softmax = [m for _, m in regions(gm) if m.label == "softmax"]
        assert all(m.kind == "reduction" and {aten.mul.Tensor, aten.add.Tensor} <= {n.target for n in m.ops()} for m in softmax)


def test_fused_graph_lints_and_matches_the_unfused_graph_and_eager(captured):
    _, model, inputs, cap = captured
    gm, _, _ = fused(cap)
    gm.graph.lint()
    before, after = run(cap.gm, inputs), run(gm, inputs)
    assert max_error(before, after) == 0.0  # the same ATen ops in the same order
    with torch.no_grad():
        eager = logits(model(**dict(zip(("input_ids", "attention_mask"), inputs))))
    assert (after[0] - eager).abs().max().item() <= 1e-5  # capture's own gap to eager


@pytest.mark.parametrize("target", ["h100", "host"])
def test_cost_model_predicts_fewer_kernels_and_less_time(captured, target):
    _, _, _, cap = captured
    gm, ctx, result = fused(cap, target)
    model = ctx.cost_model
    before, after = model.graph(cap.gm), model.graph(gm)
    assert after.launches < before.launches
    assert after.time < before.time
    assert model.compare(before, after).speedup > 1
    assert before.launches - after.launches == result.stats["kernels_before"] - result.stats["kernels_after"]


def test_no_region_holds_a_boundary_or_mutating_op(captured):
    _, _, _, cap = captured
    gm, _, _ = fused(cap, kinds=ELEMENTWISE)
    boundaries = {aten.mm.default, aten.addmm.default, aten.bmm.default, aten.scaled_dot_product_attention.default, aten.embedding.default, aten.index.Tensor}
    for _, module in regions(gm):
        for node in module.ops():
            assert node.target not in boundaries and not is_mutating(node), f"{node.format_node()} in {module.label}"
            assert classify(node) is not None or node.target is operator.getitem


def test_compiler_ops_are_boundaries_in_a_pipeline_after_fuse_rms_norm():
    model = tiny_llama()
    inputs = token_inputs(16)
    cap = capture_export(model, (), inputs)
    flat = cap.flatten_inputs((), inputs)
    gm = copy.deepcopy(cap.gm)
    ctx = PassContext(target="h100", sample_inputs=flat, instruments=[VerifyNumericsInstrument(atol=0, rtol=0)])
    records = Pipeline([fuse_rms_norm(), FusePartition(kinds=ELEMENTWISE)]).run(gm, ctx)
    assert [r.status for r in records] == ["ran", "ran"]
    top = [n for n in gm.graph.nodes if n.target is torch.ops.compiler.rms_norm.default]
    assert len(top) == 5  # every norm is a compiler op, outside every region
    labels = Counter(m.label for _, m in regions(gm))
    assert labels["swiglu"] == 2 and labels["rotary"] == 2 and labels["rotary+repeat_kv"] == 2
    assert not any("norm" in label for label in labels)


# -- rules on small graphs ---------------------------------------------------------------------


def trace(fn, *inputs: torch.Tensor) -> fx.GraphModule:
    return make_fx(fn, tracing_mode="fake")(*inputs)


def names_by_region(gm: fx.GraphModule) -> list[set[str]]:
    return [{n.name for n in module.ops()} for _, module in regions(gm)]


def test_fusing_across_a_matmul_path_would_make_a_cycle_and_is_not_done():
    def f(x, w):
        a = (x * 2).exp()  # a = exp_
        m = a @ w
        return (a + m).relu()  # b depends on a directly and through the matmul

    x, w = torch.randn(8, 8), torch.randn(8, 8)
    gm = trace(f, x, w)
    for group, _ in Planner(gm).plan():
        names = {n.name for n in group}
        assert not ({"exp", "add"} <= names), names
    with pytest.raises(PassError, match="cycle"):
        Planner(gm).check_acyclic([{"exp", "add"}])
    expected = f(x, w)
    result = FusePartition().run(gm, PassContext())  # no cost model: fuse any 2 launching ops
    assert sorted(map(sorted, names_by_region(gm))) == [["add", "relu"], ["exp", "mul"]]
    assert result.stats["time_before_s"] is None and "no cost model" in result.changes[0]
    torch.testing.assert_close(gm(x, w), expected, rtol=0, atol=0)


def test_an_in_place_write_splits_regions_and_keeps_reads_before_it():
    def f(x, y):
        q = (x * torch.relu(y)).exp()  # reads x before the write
        x.add_(1)
        z = (x + 1) * 2  # reads x after it
        return q + z

    x, y = torch.randn(16), torch.randn(16)
    gm = trace(f, x.clone(), y)
    write = next(n.name for n in gm.graph.nodes if is_mutating(n))
    expected = f(x.clone(), y)
    FusePartition().run(gm, PassContext())
    gm.graph.lint()
    assert [n.name for n in gm.graph.nodes if is_mutating(n)] == [write], "the write stays a top-level node"
    for _, module in regions(gm):
        assert not any(is_mutating(n) for n in module.ops())
    groups = names_by_region(gm)
    # (x + 1) * 2 and the final add after the write; x * relu(y) and its exp before it
    assert sorted(map(sorted, groups)) == [["add", "add_1", "mul_1"], ["exp", "mul", "relu"]]
    # the region reading x runs before the write, the final add after both
    order = [n.name for n in gm.graph.nodes]
    reader = next(n.name for n, m in regions(gm) if "exp" in {o.name for o in m.ops()})
    assert order.index(reader) < order.index(write)
    torch.testing.assert_close(gm(x.clone(), y), expected, rtol=0, atol=0)


def test_unknown_ops_and_compiler_ops_stay_outside_regions():
    def f(x, w):
        a = torch.cumsum(x.sin().cos(), -1)  # cumsum: not a reduction this pass knows
        b = torch.ops.compiler.rms_norm((a * 2).exp(), w, 1e-6)
        return torch.sort(b.tanh().neg(), -1).values

    x, w = torch.randn(4, 16), torch.randn(16)
    gm = trace(f, x, w)
    expected = f(x, w)
    FusePartition().run(gm, PassContext())
    top = {n.target for n in gm.graph.nodes if n.op == "call_function"}
    assert {aten.cumsum.default, torch.ops.compiler.rms_norm.default, aten.sort.default} <= top
    assert sorted(map(sorted, names_by_region(gm))) == [["cos", "sin"], ["exp", "mul"], ["neg", "tanh"]]
    torch.testing.assert_close(gm(x, w), expected, rtol=0, atol=0)


def test_views_between_fused_ops_join_and_trailing_views_stay_out():
    def f(x, y):
        a = (x * 2).view(4, 2, 8).transpose(1, 2)  # views between two fused ops
        return (a + y).neg().reshape(4, 16)  # the last view is the output

    x, y = torch.randn(4, 16), torch.randn(4, 8, 2)
    gm = trace(f, x, y)
    expected = f(x, y)
    FusePartition().run(gm, PassContext())
    (group,) = names_by_region(gm)
    # reshape of the transposed layout traces to clone (a copy: fused) + _unsafe_view (left out)
    assert group == {"mul", "view", "transpose", "add", "neg", "clone"}
    assert [n.target for n in gm.graph.nodes if n.op == "call_function"] == [aten._unsafe_view.default]
    torch.testing.assert_close(gm(x, y), expected, rtol=0, atol=0)


def test_pointwise_ops_at_different_sizes_are_not_one_region():
    def f(x, y):
        t = (x * 2).cos()  # [16, 1], used twice
        return t.exp(), (y * t).neg()  # [16, 1] and [16, 64] outputs

    x, y = torch.randn(16, 1), torch.randn(16, 64)
    gm = trace(f, x, y)
    expected = f(x, y)
    FusePartition().run(gm, PassContext())
    # y * t would give one kernel outputs of 16 and of 1024 elements: it starts a region of its own
    assert sorted(map(sorted, names_by_region(gm))) == [["cos", "exp", "mul"], ["mul_1", "neg"]]
    for got, want in zip(gm(x, y), expected):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_options_kinds_and_max_nodes(captured):
    _, _, _, cap = captured
    gm, _, _ = fused(cap, kinds=("reduction",))
    assert {m.kind for _, m in regions(gm)} == {"reduction"}
    gm, _, _ = fused(cap, max_nodes=4)
    assert regions(gm) and all(len(m.ops()) <= 4 for _, m in regions(gm))
    with pytest.raises(ValueError, match="attention"):
        FusePartition(kinds=("pointwise", "attention"))
    assert FusePartition(min_ops=3).config() == {"kinds": ["pointwise", "reduction", "matmul_epilogue"], "max_nodes": 32, "min_ops": 3}


# -- the cost model decides, at SmolLM2 sizes --------------------------------------------------

SEQ, HIDDEN, FFN = 64, 576, 1536  # SmolLM2-135M prefill of the example prompt


@pytest.mark.parametrize("target", ["h100", "host"])
def test_a_single_elementwise_op_is_not_a_region(target):
    gm = trace(lambda x, y: x + y, torch.randn(1, SEQ, HIDDEN), torch.randn(1, SEQ, HIDDEN))
    result = FusePartition().run(gm, PassContext(target=target))
    assert not regions(gm) and result.stats["rejected"] == {"min_ops": 1}
    # asked to fuse single ops, the cost model still says no: one op as a region saves nothing
    result = FusePartition(min_ops=1).run(gm, PassContext(target=target))
    assert not regions(gm) and result.stats["rejected"] == {"cost": 1}


def test_on_h100_swiglu_and_residual_norm_are_regions_that_pay():
    def block(h, r, w, gate, up):
        s = h + r
        n = w * (s * torch.rsqrt(s.pow(2).mean(-1, keepdim=True) + 1e-5))
        return s, n, torch.nn.functional.silu(gate) * up

    args = [torch.randn(1, SEQ, HIDDEN), torch.randn(1, SEQ, HIDDEN), torch.randn(HIDDEN), torch.randn(1, SEQ, FFN), torch.randn(1, SEQ, FFN)]
    gm = trace(block, *args)
    expected = block(*args)
    ctx = PassContext(target="h100")
    before = ctx.cost_model.graph(gm)
    result = FusePartition().run(gm, ctx)
    assert sorted(m.label for _, m in regions(gm)) == ["residual+rms_norm", "swiglu"]
    after = ctx.cost_model.graph(gm)
    # add, pow, mean, add, rsqrt, mul, mul | silu, mul
    assert before.launches == 9 and after.launches == 2
    assert float(before.time) > 3 * float(after.time)  # launch-bound: 9 launches -> 2
    assert result.stats["time_after_s"] < result.stats["time_before_s"]
    for got, want in zip(gm(*args), expected):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
