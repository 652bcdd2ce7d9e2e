"""ONNX export of the optimized IR (compiler.export_onnx): compiler ops as functions of the
`ai.ml_compiler` domain with bodies built from their references, run in onnxruntime against
the compiled model, eager, and each op's reference; and the refusals.

Tolerances. Everything is fp32. onnxruntime and torch compute the same ops in different
orders (MLAS matmuls, fused softmax), so each value differs by the rounding of sums of at most
a few hundred terms: ~1e-7 relative per op, ~1e-6 after two layers on logits of magnitude ~1.
The model-level bound, 1e-4, is the one the other end-to-end tests use; a function on its own
is held to 1e-5. A wrong body (a missing mask, a wrong scale) is off by 1e-1 or more.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from torch.export import Dim

import compiler
from compiler.capture import capture_export
from compiler.errors import CompilerError, UserInputError
from compiler.export_onnx import DOMAIN, TRACEABLE_REFERENCES, check_onnx, export_onnx, op_call_model, run_onnx
from compiler.ops import compiler_ops, op_for_target
from compiler.ops.kv_quant import quantize_keys, quantize_values
from compiler.ops.sparse_layout import HeadPattern, Spec
from compiler.passes import PassContext, default_pipeline
from compiler.passes.fusion.region import regions
from compiler.passes.shift_add import ShiftAdd
from tests.models import FunctionModule, logits, tiny_llama, token_inputs

FUNCTION_TOL = 1e-5
MODEL_TOL = 1e-4


def _ir_op_calls(gm: torch.fx.GraphModule) -> dict[str, int]:
    """Call sites per compiler op in the IR (fused regions hold ATen only)."""
    counts: dict[str, int] = {}
    for node in gm.graph.nodes:
        op = op_for_target(node.target) if node.op == "call_function" else None
        if op is not None:
            counts[op.name] = counts.get(op.name, 0) + 1
    return counts


def _check_structure(path, export, gm) -> onnx.ModelProto:
    """The file holds one custom node per compiler-op call of the IR, a function for each
    custom op_type, and imports the domain; the checker accepts it (full_check infers types
    through the function bodies)."""
    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)
    calls = _ir_op_calls(gm)
    assert calls, "the graph should contain compiler ops"
    assert {f.op for f in export.functions} == set(calls)
    for name, n in calls.items():
        assert sum(f.calls for f in export.functions if f.op == name) == n
    functions = {f.name for f in model.functions if f.domain == DOMAIN}
    custom_nodes = [n for n in model.graph.node if n.domain == DOMAIN]
    assert {n.op_type for n in custom_nodes} == functions == {f.op_type for f in export.functions}
    assert len(custom_nodes) == sum(calls.values())
    assert {imp.domain: imp.version for imp in model.opset_import}[DOMAIN] == 1
    return model


def _functions_alone(path, export, length: int, seed: int = 0) -> dict[str, float]:
    """Each function of the file on its own, on fresh random inputs (symbolic dims at `length`),
    against the op's reference: {op_type: max abs error}."""
    model = onnx.load(str(path))
    gen = torch.Generator().manual_seed(seed)
    errors = {}
    for f in export.functions:
        op = compiler_ops()[f.op]
        tensors = [_random(dtype, [length if d is None else d for d in dims], gen) for dtype, dims in f.inputs]
        it = iter(tensors)
        args = [f.constants[a.name] if a.name in f.constants else next(it) for a in op.overload._schema.arguments]
        want = op.reference(*args)
        got = run_onnx(_one_node_model(model, f.op_type, tensors, want), tensors)[0]
        assert got.shape == tuple(want.shape)
        torch.testing.assert_close(torch.from_numpy(got), want, rtol=FUNCTION_TOL, atol=FUNCTION_TOL)
        errors[f.op_type] = float((torch.from_numpy(got) - want).abs().max())
    return errors


def _random(dtype: str, shape: list[int], gen: torch.Generator) -> torch.Tensor:
    if dtype.startswith("float"):
        return torch.randn(shape, generator=gen, dtype=getattr(torch, dtype))
    if dtype == "uint8":  # packed sign planes, scale codes
        return torch.randint(0, 256, shape, generator=gen, dtype=torch.int32).to(torch.uint8)
    return torch.randint(0, 2, shape, generator=gen).to(getattr(torch, dtype))  # padding masks


def _one_node_model(model: onnx.ModelProto, op_type: str, tensors: list[torch.Tensor], output: torch.Tensor) -> onnx.ModelProto:
    """A model calling the function `op_type` of `model` once, with every function of `model`."""
    from onnx import helper
    from onnx_ir.tensor_adapters import from_torch_dtype

    ins = [helper.make_tensor_value_info(f"x{i}", int(from_torch_dtype(t.dtype)), list(t.shape)) for i, t in enumerate(tensors)]
    out = helper.make_tensor_value_info("y", int(from_torch_dtype(output.dtype)), list(output.shape))
    node = helper.make_node(op_type, [i.name for i in ins], ["y"], domain=DOMAIN)
    graph = helper.make_graph([node], op_type, ins, [out])
    return helper.make_model(graph, opset_imports=list(model.opset_import), functions=list(model.functions), ir_version=model.ir_version)


# -- the default pipeline ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def llama_default(tmp_path_factory):
    """Tiny Llama through the default pipeline on host: fused regions and causal_attention."""
    model, inputs = tiny_llama(), token_inputs(16)
    compiled = compiler.compile(model, inputs, target="host")
    flat = compiled.captured.flatten_inputs((), inputs)
    path = tmp_path_factory.mktemp("onnx") / "llama.onnx"
    return model, inputs, compiled, flat, path, export_onnx(compiled.result.ir, flat, path)


def test_default_pipeline_llama_matches_the_compiled_model_and_eager(llama_default) -> None:
    model, inputs, compiled, flat, path, export = llama_default
    ir = compiled.result.ir
    assert regions(ir) and export.regions_inlined == len(regions(ir))
    _check_structure(path, export, ir)
    assert export.function_calls() == {"causal_attention": 2}  # one signature, one per layer
    assert [i.split(":")[0] for i in export.inputs] == ["input_ids", "attention_mask"]  # use_cache baked in
    with torch.no_grad():
        expected = compiled.executable(*flat)
        eager = logits(model(**inputs))
    report = check_onnx(path, flat, expected, rtol=MODEL_TOL, atol=MODEL_TOL)
    assert report["ok"], report
    got = run_onnx(path, [x for x in flat if isinstance(x, torch.Tensor)])[0]
    torch.testing.assert_close(torch.from_numpy(got), eager, rtol=MODEL_TOL, atol=MODEL_TOL)
    # checked at export: each function against its reference on the sample's own call, the
    # model against the IR
    assert all(f.max_abs_error is not None and f.max_abs_error <= FUNCTION_TOL for f in export.functions)
    assert export.max_abs_error is not None and export.max_abs_error <= MODEL_TOL


def test_default_pipeline_functions_alone_equal_the_references(llama_default) -> None:
    *_, path, export = llama_default
    _functions_alone(path, export, length=16)


def test_check_onnx_reports_a_mismatch(llama_default) -> None:
    _, _, compiled, flat, path, _ = llama_default
    with torch.no_grad():
        wrong = [y + 1e-2 for y in compiled.executable(*flat)]
    report = check_onnx(path, flat, wrong, rtol=MODEL_TOL, atol=MODEL_TOL)
    assert not report["ok"] and report["max_abs_error"] == pytest.approx(1e-2, rel=1e-2)
    with pytest.raises(CompilerError, match="differs from the expected outputs"):
        check_onnx(path, flat, wrong, raise_on_mismatch=True)


# -- shift-add, RMSNorm, dynamic sequence length -------------------------------------------------


@pytest.fixture(scope="module")
def llama_shift_add(tmp_path_factory):
    """Tiny Llama, sequence length symbolic, with shift-add linear layers, RMSNorm and
    attention ops (no partitioner, so the norms stay ops). The passes only: what is compared
    is the rewritten IR, which runs its ops' references."""
    inputs = token_inputs(16)
    seq = Dim("seq", min=2, max=64)
    captured = capture_export(tiny_llama(), (), inputs, dynamic_shapes={"input_ids": {1: seq}, "attention_mask": {1: seq}})
    pipeline = default_pipeline()
    pipeline.passes[pipeline.names().index("shift_add")] = ShiftAdd(bits=3, group=32, say=lambda msg: None)
    only = {"canonicalize_causal_attention", "shift_add", "fuse_attention", "fuse_rms_norm"}
    pipeline.run(captured.gm, PassContext(target="host", budget="ppl:+50%", enabled_only=only))
    path = tmp_path_factory.mktemp("onnx") / "llama_shift_add.onnx"
    flat = captured.flatten_inputs((), inputs)
    return captured, path, export_onnx(captured.gm, flat, path, dynamic=True)


def test_shift_add_llama_exports_with_a_symbolic_sequence_and_matches_the_ir(llama_shift_add) -> None:
    captured, path, export = llama_shift_add
    _check_structure(path, export, captured.gm)
    assert {f.op for f in export.functions} == {"shiftadd_linear", "rms_norm", "causal_attention"}
    # 15 linear layers in 4 weight shapes [N, K]: q and o [64, 64], k and v [32, 64], gate, up
    # and the LM head [128, 64], down [64, 128]; one body per shape
    assert sorted(f.calls for f in export.functions if f.op == "shiftadd_linear") == [2, 4, 4, 5]
    assert export.dynamic
    model = onnx.load(str(path))
    seq_dims = {d.dim_param for i in model.graph.input for d in i.type.tensor_type.shape.dim if d.dim_param}
    assert len(seq_dims) == 1  # input_ids and attention_mask share the symbolic length
    # other lengths than the sample's, with padding at the end
    for length in (16, 9, 23):
        inputs = token_inputs(length, seed=length)
        inputs["attention_mask"][0, -3:] = 0
        flat = captured.flatten_inputs((), inputs)
        with torch.no_grad():
            expected = captured.gm(*flat)
        report = check_onnx(path, flat, expected, rtol=MODEL_TOL, atol=MODEL_TOL)
        assert report["ok"], (length, report)


def test_shift_add_functions_alone_equal_the_references(llama_shift_add) -> None:
    _, path, export = llama_shift_add
    assert all(f.max_abs_error is not None and f.max_abs_error <= FUNCTION_TOL for f in export.functions)
    errors = _functions_alone(path, export, length=11, seed=1)
    assert set(errors) == {f.op_type for f in export.functions}


# -- every compiler op's function, on inputs that take each branch of its reference ---------------


def _op_cases() -> dict[str, tuple]:
    gen = torch.Generator().manual_seed(0)

    def r(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen)

    # decode-like: 6 queries at the end of 9 keys, GQA 4:2; keys 0-3 padded, so query 0
    # (which sees keys 0..3) sees none: the reference gives 0 there
    padded = torch.ones(2, 9, dtype=torch.int64)
    padded[1, :4] = 0
    q, k, v = r(1, 4, 40, 8), r(1, 2, 40, 8), r(1, 2, 40, 8)
    spec = Spec((HeadPattern("streaming", window=2), HeadPattern("block_topk", gamma=0.6), HeadPattern("vertical_slash", gamma=0.8), HeadPattern("dense")), 8)
    blocks, counts = compiler_ops()["sparse_attention_layout"].reference(q, k, spec.to_json())
    keys, values = quantize_keys(r(1, 2, 32, 8), 4, 16), quantize_values(r(1, 2, 32, 8), 4, 4)
    return {
        "causal_attention/padded": ("causal_attention", (r(2, 4, 6, 8), r(2, 2, 9, 8), r(2, 2, 9, 8), padded, 0.3)),
        "causal_attention/no_mask": ("causal_attention", (r(1, 4, 7, 8), r(1, 2, 7, 8), r(1, 2, 7, 8), None, 0.3)),
        "block_sparse_attention/sparse": ("block_sparse_attention", (q, k, v, blocks, counts, 0.35, 8, 0.5, None)),
        "sparse_attention_layout": ("sparse_attention_layout", (q, k, spec.to_json())),
        "attention_key_scores": ("attention_key_scores", (r(1, 4, 6, 8), r(1, 2, 10, 8), 0.3, 4)),
        "quantized_kv_attention": (
            "quantized_kv_attention",
            (r(1, 4, 3, 8), keys.codes, keys.scale, keys.min, values.codes, values.scale, values.min, r(1, 2, 5, 8), r(1, 2, 5, 8), 0.35, 4, 16),
        ),
    }


@pytest.mark.parametrize("case", list(_op_cases()))
def test_op_function_equals_its_reference(case: str) -> None:
    name, args = _op_cases()[case]
    model = op_call_model(name, args)
    onnx.checker.check_model(model, full_check=True)
    assert [(n.domain, n.op_type) for n in model.graph.node] == [(DOMAIN, name)]
    want = compiler_ops()[name].reference(*args)
    got = run_onnx(model, [a for a in args if isinstance(a, torch.Tensor)])
    for g, w in zip(got, [want] if isinstance(want, torch.Tensor) else want):
        assert np.isfinite(g).all() if g.dtype.kind == "f" else True
        torch.testing.assert_close(torch.from_numpy(g), w, rtol=FUNCTION_TOL, atol=FUNCTION_TOL)


def test_traceable_forms_equal_the_references_where_the_fast_path_applies() -> None:
    """The all-ones mask and the full layout take the references' fast paths; the traceable
    forms (used for the bodies) must give the same there too, in eager."""
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, h, 16, 8, generator=gen) for h in (4, 2, 2))
    ones = torch.ones(1, 16, dtype=torch.int64)
    ref = compiler_ops()["causal_attention"].reference
    torch.testing.assert_close(TRACEABLE_REFERENCES["causal_attention"](q, k, v, ones, 0.3), ref(q, k, v, ones, 0.3), rtol=FUNCTION_TOL, atol=FUNCTION_TOL)
    full = torch.arange(4, dtype=torch.int32).expand(1, 4, 4, 4).contiguous()
    counts = (torch.arange(4, dtype=torch.int32) + 1).expand(1, 4, 4).contiguous()
    ref = compiler_ops()["block_sparse_attention"].reference
    args = (q, k, v, full, counts, 0.3, 4, 1.0, None)
    torch.testing.assert_close(TRACEABLE_REFERENCES["block_sparse_attention"](*args), ref(*args), rtol=FUNCTION_TOL, atol=FUNCTION_TOL)


# -- refusals ----------------------------------------------------------------------------------


@torch.library.custom_op("onnx_export_test::opaque", mutates_args=())
def _opaque(x: torch.Tensor) -> torch.Tensor:
    return x * 2


@_opaque.register_fake
def _(x: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x)


def test_a_custom_op_without_a_reference_is_refused_and_nothing_is_written(tmp_path) -> None:
    x = torch.randn(2, 8)
    gm = capture_export(FunctionModule(lambda x: torch.ops.onnx_export_test.opaque(x) + 1), (x,)).gm
    path = tmp_path / "m.onnx"
    with pytest.raises(UserInputError, match="onnx_export_test::opaque.*no reference"):
        export_onnx(gm, [x], path)
    assert not path.exists()


def test_a_reference_that_branches_on_values_without_a_traceable_form_is_refused(monkeypatch) -> None:
    monkeypatch.delitem(TRACEABLE_REFERENCES, "causal_attention")
    q, k = torch.randn(1, 2, 4, 8), torch.randn(1, 2, 4, 8)
    with pytest.raises(UserInputError, match=r"compiler::causal_attention.*data-dependent.*TRACEABLE_REFERENCES"):
        op_call_model("causal_attention", (q, k, k, torch.ones(1, 4, dtype=torch.int64), 0.3))


def test_a_body_that_differs_from_the_reference_is_refused_and_nothing_is_written(tmp_path, monkeypatch) -> None:
    x, w = torch.randn(2, 3, 16), torch.randn(16)
    gm = capture_export(FunctionModule(lambda x, w: torch.ops.compiler.rms_norm(x, w, 1e-6) * 2), (x, w)).gm
    good = tmp_path / "good.onnx"
    export = export_onnx(gm, [x, w], good)
    assert export.function_calls() == {"rms_norm": 1}
    assert check_onnx(good, [x, w], gm(x, w), rtol=MODEL_TOL, atol=MODEL_TOL)["ok"]
    monkeypatch.setitem(TRACEABLE_REFERENCES, "rms_norm", lambda x, w, eps: x * w)  # no normalization
    bad = tmp_path / "bad.onnx"
    with pytest.raises(CompilerError, match="rms_norm differs from the reference"):
        export_onnx(gm, [x, w], bad)
    assert not bad.exists()
