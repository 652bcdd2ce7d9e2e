"""Tests of capture (compiler.capture): the IR invariants promised in compiler.ir on tiny Llama
and GPT-2 captured with torch.export, agreement with eager through `flatten_inputs` and
`unflatten_outputs`, the fx front end, the aot_autograd front end compared with export, and the
error for a model export cannot take."""

from __future__ import annotations

import pytest
import torch

import compiler.backend
from compiler.capture import Captured, capture_export, capture_fx, split_example_inputs
from compiler.errors import CaptureError
from compiler.ir import op_counts
from compiler.passes import default_pipeline
from models import logits, tiny_gpt2, tiny_llama, token_inputs

aten = torch.ops.aten
BUILDERS = {"llama": tiny_llama, "gpt2": tiny_gpt2}
LAYERS = 2  # both tiny models
# The device-specific SDPA kernels CompositeImplicit decomposition may pick.
SDPA_VARIANTS = {
    "aten._scaled_dot_product_flash_attention_for_cpu.default",
    "aten._scaled_dot_product_flash_attention.default",
    "aten._scaled_dot_product_efficient_attention.default",
    "aten._scaled_dot_product_cudnn_attention.default",
}


@pytest.fixture(scope="module", params=sorted(BUILDERS))
def captured_model(request) -> tuple[torch.nn.Module, dict[str, torch.Tensor], Captured]:
    model = BUILDERS[request.param]()
    inputs = token_inputs(8)
    return model, inputs, capture_export(model, (), inputs)


def test_every_op_node_carries_fake_metadata(captured_model):
    _, _, captured = captured_model

    def fake_or_symbolic(v) -> bool:
        if isinstance(v, (tuple, list)):
            return all(x is None or fake_or_symbolic(x) for x in v)
        return isinstance(v, (torch._subclasses.FakeTensor, torch.SymInt))

    for node in captured.gm.graph.nodes:
        if node.op == "call_function":
            assert "val" in node.meta, f"{node.name} has no meta['val']"
            assert fake_or_symbolic(node.meta["val"]), f"{node.name}: {type(node.meta['val'])}"


def test_weights_are_get_attr_nodes_holding_the_models_own_tensors(captured_model):
    model, _, captured = captured_model
    gm = captured.gm
    attrs = [getattr(gm, n.target) for n in gm.graph.nodes if n.op == "get_attr"]
    own = {id(t) for t in [*model.parameters(), *model.buffers()]}
    assert attrs and all(id(t) in own for t in attrs), "a get_attr holds a copy or a foreign tensor"
    # Every parameter the forward uses is there (all of them are used by these models).
    assert {id(p) for p in model.parameters()} <= {id(t) for t in attrs}


def test_placeholders_are_only_the_runtime_inputs(captured_model):
    _, inputs, captured = captured_model
    placeholders = [n for n in captured.gm.graph.nodes if n.op == "placeholder"]
    flat = captured.flatten_inputs((), inputs)
    assert len(placeholders) == len(flat)
    tensors = [n.meta["val"] for n in placeholders if isinstance(n.meta.get("val"), torch.Tensor)]
    assert [(tuple(v.shape), v.dtype) for v in tensors] == [
        (tuple(inputs[k].shape), inputs[k].dtype) for k in ("input_ids", "attention_mask")
    ]
    # The rest are the Python flags capture fixed (use_cache=False): specialized, so unused.
    others = [n for n in placeholders if not isinstance(n.meta.get("val"), torch.Tensor)]
    assert len(others) == len(captured.fixed_kwargs)
    assert all(not n.users for n in others)


def test_no_device_specific_sdpa_kernels_remain(captured_model):
    _, _, captured = captured_model
    counts = op_counts(captured.gm)
    assert not SDPA_VARIANTS & set(counts)
    assert counts["aten.scaled_dot_product_attention.default"] == LAYERS


def test_captured_graph_matches_eager(captured_model):
    model, example, captured = captured_model
    # Same ATen ops in the same order as eager, fp32: 1e-5 leaves room only for a BLAS picking
    # another blocking, nothing a wrong graph could hide in. Other tokens than the example too,
    # so nothing of the example is baked in.
    for inputs in (example, token_inputs(8, seed=5)):
        with torch.no_grad():
            expected = logits(model(**inputs))
            got = logits(captured.unflatten_outputs(captured.gm(*captured.flatten_inputs((), inputs))))
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


# -- capture_fx -----------------------------------------------------------------------------------


class MLP(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.up = torch.nn.Linear(8, 32)
        self.down = torch.nn.Linear(32, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(torch.nn.functional.gelu(self.up(x)))


def test_capture_fx_of_a_symbolically_traced_mlp_matches_eager():
    model = MLP().eval()
    traced = torch.fx.symbolic_trace(model)
    x = torch.randn(5, 8)
    captured = capture_fx(traced, (x,))
    assert captured.source == "fx"
    gm = captured.gm
    assert [n.op for n in gm.graph.nodes].count("placeholder") == 1
    assert [n.op for n in gm.graph.nodes].count("get_attr") == 4  # two weights, two biases
    assert all(isinstance(n.target, torch._ops.OpOverload) for n in gm.graph.nodes if n.op == "call_function")
    for inputs in (x, torch.randn(5, 8)):
        with torch.no_grad():
            got = captured.unflatten_outputs(gm(*captured.flatten_inputs((inputs,), {})))
            # Same ATen ops (addmm, gelu) in fp32: identical up to BLAS blocking.
            torch.testing.assert_close(got, model(inputs), rtol=1e-6, atol=1e-6)


def test_capture_fx_rejects_a_module_that_is_not_a_graph_module():
    with pytest.raises(CaptureError, match="GraphModule"):
        capture_fx(MLP(), (torch.randn(2, 8),))


# -- the aot_autograd front end, through the backend ----------------------------------------------

# Ops the aot path may hold that export does not, and why (both say the same thing):
# on the aot path SDPA arrives as the CPU flash kernel, whose CompositeImplicit decomposition
# first turns the boolean attention mask into an additive float mask, where(mask, 0.0, -inf)
# with two scalar_tensor operands; `_fold_sdpa_variants` restores the device-neutral SDPA node
# but keeps the float mask. Export keeps SDPA whole with the boolean mask.
AOT_ALLOWANCE = {"aten.where.self", "aten.scalar_tensor.default"}


def test_aot_front_end_yields_the_same_ops_as_export_for_llama():
    model = tiny_llama()
    inputs = token_inputs(8)
    exported_gm = capture_export(model, (), inputs).gm
    exported = op_counts(exported_gm)

    torch._dynamo.reset()
    # No passes, so the backend's IR is exactly what aten_graph_from_aot produced.
    backend = compiler.backend.CompilerBackend({"disable": ",".join(default_pipeline().names())})
    with torch.no_grad():
        # use_cache=False as capture_export fixes it: with a cache the graph also builds one.
        torch.compile(model, backend=backend)(**inputs, use_cache=False)
    torch._dynamo.reset()
    (result,) = backend.results
    assert all(r.status == "disabled" for r in result.records)
    ir = result.ir
    aot = op_counts(ir)

    assert set(exported) - set(aot) == set()
    assert set(aot) - set(exported) <= AOT_ALLOWANCE
    # Every other op is there as often (same model, same decompositions).
    assert {k: v for k, v in aot.items() if k not in AOT_ALLOWANCE} == exported
    # The allowance is what the comment says: masks feeding SDPA.
    for node in ir.graph.nodes:
        if node.op == "call_function" and node.target == aten.where.self:
            assert all(
                u.target == aten.scaled_dot_product_attention.default and u.kwargs.get("attn_mask") is node
                for u in node.users
            )
    # The aot IR keeps the IR's invariants too: weights frozen, inputs only at placeholders.
    placeholders = [n for n in ir.graph.nodes if n.op == "placeholder"]
    assert [tuple(n.meta["val"].shape) for n in placeholders] == [(1, 8), (1, 8)]
    assert sum(1 for n in ir.graph.nodes if n.op == "get_attr") == sum(
        1 for n in exported_gm.graph.nodes if n.op == "get_attr"
    )


# -- what export cannot capture -------------------------------------------------------------------


class DataDependent(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:
            return x + 1
        return x - 1


def test_data_dependent_control_flow_is_a_capture_error_pointing_at_the_backend():
    with pytest.raises(CaptureError) as info:
        capture_export(DataDependent(), (torch.randn(4),))
    message = str(info.value)
    assert "DataDependent" in message and "torch.compile backend" in message
    assert "\n" not in message  # one line a front door can print


def test_the_backend_the_error_points_at_handles_that_model():
    model = DataDependent()
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="compiler")
    with torch.no_grad():
        for x in (torch.ones(4), -torch.ones(4)):  # both branches
            torch.testing.assert_close(compiled(x), model(x), rtol=0, atol=0)
    torch._dynamo.reset()


@pytest.mark.parametrize(
    "example, expected",
    [
        (torch.ones(2), ((torch.ones(2),), {})),
        ((torch.ones(2), 3), ((torch.ones(2), 3), {})),
        ({"x": torch.ones(2)}, ((), {"x": torch.ones(2)})),
    ],
    ids=["tensor", "tuple", "dict"],
)
def test_split_example_inputs_follows_the_model_file_contract(example, expected):
    args, kwargs = split_example_inputs(example)
    assert len(args) == len(expected[0]) and set(kwargs) == set(expected[1])
    for got, want in zip([*args, *kwargs.values()], [*expected[0], *expected[1].values()]):
        assert torch.equal(got, want) if isinstance(want, torch.Tensor) else got == want


def test_split_example_inputs_rejects_other_types():
    with pytest.raises(CaptureError, match="example_inputs"):
        split_example_inputs("not inputs")


def test_a_cached_capture_compiles_exactly_like_a_fresh_one(tmp_path, monkeypatch):
    # capture_export(cache=True) saves the ExportedProgram and loads it on the next capture. The
    # loaded one must be the same question for everything keyed or decided on it: the same
    # graph text (planner and calibration fingerprints) and the same fusion decisions, which are
    # taken at the traced sizes (a loaded shape environment keys some hints by expressions)
    import compiler.capture as capture
    from compiler.driver import CompileOptions, compile_graph
    from compiler.ir import at_hints, copy_graph_module, fake_mode_of

    monkeypatch.setenv("COMPILER_CACHE_DIR", str(tmp_path))
    model, inputs = tiny_llama(), token_inputs(12)
    seq = torch.export.Dim("seq", min=2, max=64)
    dynamic = {"input_ids": {1: seq}, "attention_mask": {1: seq}}
    load = capture._load_export
    monkeypatch.setattr(capture, "_load_export", lambda path: None)  # exported, saved, not reloaded
    fresh = capture_export(model, (), inputs, dynamic_shapes=dynamic, cache=True)
    monkeypatch.setattr(capture, "_load_export", load)
    assert any(tmp_path.rglob("*.pt2"))
    loaded = capture_export(model, (), inputs, dynamic_shapes=dynamic, cache=True)
    assert str(loaded.gm.graph) == str(fresh.gm.graph)
    sym = next(d for d in loaded.gm.graph.find_nodes(op="placeholder")[-2].meta["val"].shape if isinstance(d, torch.SymInt))
    assert at_hints(sym.node.expr * 2, loaded.gm) == 24  # the traced 12 tokens
    assert fake_mode_of(loaded.gm).shape_env is not None

    def fused(captured):
        result = compile_graph(copy_graph_module(captured.gm), CompileOptions.make("h100", "lossless", length=4096))
        stats = next(r for r in result.records if r.name == "fuse_regions").result.stats
        return stats["regions"], float(result.cost.after.at_length(4096).time)

    regions, seconds = fused(fresh)
    assert regions > 0
    assert fused(loaded) == (regions, pytest.approx(seconds, rel=1e-12))
    flat = loaded.flatten_inputs((), inputs)
    torch.testing.assert_close(loaded.gm(*flat)[0], fresh.gm(*fresh.flatten_inputs((), inputs))[0], rtol=0, atol=0)
