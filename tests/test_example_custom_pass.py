"""Tests of the pass-authoring example (examples/custom_pass.py, walked through in
docs/passes.md): `fuse_gelu_tanh`, a user's PatternPass that turns GPT-2's hand-written GELU
(eight ATen ops) into `aten.gelu(approximate="tanh")`.

(a) the pass rewrites every hand-written GELU of a captured tiny GPT-2 (op counts before and
after) and keeps the outputs (elementwise, and the compiled model against eager), and its place
in `pipeline()` matters; (b) the `optimize` CLI runs it with the example as MODEL.py and with
`--pipeline FILE.py:NAME`, and plan.json/report.md/graph.txt show it; (c) torch.compile with
`backend="compiler", options={"pipeline": ...}` runs it; (d) its `check=` refuses lookalikes
(other coefficients, bfloat16) and `explain` says why.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import sys
from pathlib import Path

import pytest
import torch
import torch.fx as fx
from torch.fx.experimental.proxy_tensor import make_fx
from transformers.activations import NewGELUActivation

import compiler
import compiler.backend
from compiler.capture import capture_export, split_example_inputs
from compiler.cli import main
from compiler.ir import copy_graph_module, graph_text, op_counts
from compiler.passes import PassContext, Pipeline, PatternPass, default_pipeline

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
PASS_FILE = EXAMPLES / "custom_pass.py"
MODEL_FILE = EXAMPLES / "custom_pass_model.py"

TANH, POW, GELU = "aten.tanh.default", "aten.pow.Tensor_Scalar", "aten.gelu.default"
# Ops of one hand-written GELU (mul, pow, mul, add, mul, tanh, add, mul) that one gelu replaces.
OPS_PER_GELU = 8
LAYERS = 2
# Logits (|logits| <= ~1) of the 2-layer fp32 GPT-2, compiled vs eager. The compiled graph differs
# from eager only in evaluation order: the rewrite moves each GELU output by at most 2 ulp (see
# ELEMENTWISE_ULPS), the fused layer norms and attention kernels reduce in another order. Measured:
# 1.8e-7 (1.5 ulp of the largest logit), with or without the pass; 2e-6 allows 10x that. A wrong
# rewrite lands above it: erf-GELU in place of the tanh form (5e-4 apart per activation) moves the
# logits by 1.4e-5, a wrong coefficient or a dropped factor by far more.
MODEL_ATOL = 2e-6
# Hand-written vs aten.gelu(approximate="tanh"), elementwise in fp32: the same formula evaluated
# in another order. gelu(x) = x * s with s in [0, 1], so each side is a few roundings of values
# no larger than max(|x|, 1): measured within 1 ulp over [-12, 12]; we allow 2 ulp
# (2 * 2**-23 * max(|x|, 1)).
ELEMENTWISE_ULPS = 2


def _load(path: Path, name: str):
    """An examples/ file as a module (examples/ is not a package; custom_pass.py imports its
    sibling custom_pass_model.py, as the CLI lets it by putting the file's folder on sys.path)."""
    sys.path.insert(0, str(path.parent))
    try:
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(path.parent))
    return module


@pytest.fixture(scope="module")
def example():
    return _load(PASS_FILE, "examples_custom_pass")


@pytest.fixture(scope="module", autouse=True)
def _compiler_cache(tmp_path_factory):
    """Kernels built here go to a fresh cache folder. The host target's cost model needs this
    machine's calibration (10-30 s to measure): carry over the one already cached, if any."""
    from compiler.cost_model import calibrate

    measured = calibrate.cached()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("COMPILER_CACHE_DIR", str(tmp_path_factory.mktemp("compiler-cache")))
        if measured is not None:
            calibrate.remember(measured)
        yield


@pytest.fixture(scope="module")
def gpt2(example):
    """(model, example inputs, eager logits, captured graph, flat sample inputs)."""
    net, inputs = example.model(), example.example_inputs()
    with torch.no_grad():
        eager = net(**inputs).logits
    args, kwargs = split_example_inputs(inputs)
    captured = capture_export(net, args, kwargs)
    return net, inputs, eager, captured, captured.flatten_inputs(args, kwargs)


def calls(gm: fx.GraphModule) -> int:
    return sum(op_counts(gm).values())


def max_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


# -- (a) the rewrite: op counts, numerics, place in the pipeline -------------------------------------


def test_pass_rewrites_every_hand_written_gelu_of_gpt2(example, gpt2):
    _, _, _, captured, sample = gpt2
    gm = copy_graph_module(captured.gm)
    before = op_counts(gm)
    assert (before.get(TANH), before.get(POW), before.get(GELU)) == (LAYERS, LAYERS, None)

    result = example.fuse_gelu_tanh().run(gm)
    gm.recompile()

    after = op_counts(gm)
    assert (after.get(TANH), after.get(POW), after.get(GELU)) == (None, None, LAYERS)
    assert calls(gm) == calls(captured.gm) - LAYERS * (OPS_PER_GELU - 1)
    gelus = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is torch.ops.aten.gelu.default]
    assert all(n.kwargs.get("approximate") == "tanh" for n in gelus)
    assert all(isinstance(n.meta.get("val"), torch.Tensor) for n in gelus)  # propagate_meta ran
    assert result.changed and result.stats == {"matches": LAYERS} and len(result.changes) == LAYERS
    assert all("gelu_tanh_by_hand" in c for c in result.changes)

    with torch.no_grad():
        reference, rewritten = captured.gm(*sample), gm(*sample)
    assert max_error(rewritten[0], reference[0]) <= MODEL_ATOL


def test_rewrite_matches_hugging_face_gelu_new_within_two_ulp(example):
    """The real `gelu_new` (transformers' NewGELUActivation), traced and rewritten, against itself."""
    gen = torch.Generator().manual_seed(0)
    x = torch.cat([torch.linspace(-12, 12, 20001), 3 * torch.randn(20000, generator=gen)])
    gm = make_fx(NewGELUActivation(), tracing_mode="fake")(x)
    assert example.fuse_gelu_tanh().run(gm).stats["matches"] == 1
    gm.recompile()
    assert op_counts(gm) == {GELU: 1}

    expected = NewGELUActivation()(x)
    got = gm(x)
    bound = ELEMENTWISE_ULPS * torch.finfo(torch.float32).eps * x.abs().clamp_min(1.0)
    assert ((got - expected).abs() <= bound).all(), (got - expected).abs().max()
    # The rewrite is the tanh form, not the erf form, which would be out of bounds here.
    erf_form = torch.nn.functional.gelu(x)
    assert not ((erf_form - expected).abs() <= bound).all()


def test_compiled_model_runs_the_pass_and_matches_eager(example, gpt2):
    net, inputs, eager, _, _ = gpt2
    compiled = compiler.compile(net, inputs, target="host", pipeline=example.pipeline())
    records = {r.name: r for r in compiled.result.records}
    assert records["fuse_gelu_tanh"].status == "ran"
    assert records["fuse_gelu_tanh"].result.stats["matches"] == LAYERS
    text = graph_text(compiled.result.ir)  # the top-level graph and every fused region's body
    assert "aten.tanh.default(" not in text and text.count("aten.gelu.default(") == LAYERS
    assert max_error(compiled(**inputs).logits, eager) <= MODEL_ATOL


def test_the_pass_must_run_before_fusion(example, gpt2):
    """In `pipeline()` the pass comes before the fusion passes. Placed after `fuse_regions`, it
    finds nothing: the hand-written GELU is inside a fused region by then."""
    _, _, _, captured, _ = gpt2
    names = example.pipeline().names()
    assert names.index("fuse_gelu_tanh") < names.index("fuse_attention") < names.index("fuse_regions")
    assert [n for n in names if n != "fuse_gelu_tanh"] == default_pipeline().names()

    late = Pipeline([*default_pipeline().passes, example.fuse_gelu_tanh()], name="late")
    gm = copy_graph_module(captured.gm)
    records = {r.name: r for r in late.run(gm, PassContext(target="host"))}
    assert records["fuse_gelu_tanh"].status == "ran"
    assert records["fuse_gelu_tanh"].result.stats["matches"] == 0
    assert GELU not in op_counts(gm) and graph_text(gm).count("aten.tanh.default(") == LAYERS


# -- (b) the CLI ---------------------------------------------------------------------------------------


# A MODEL.py as a user writes it, with no pipeline(): the example's tiny GPT-2 with static shapes
# (capturing it takes a third of the time of the example's dynamic one; `--no-speed` below, since
# it defines no calibration_batches()).
GPT2_MODEL_SOURCE = '''\
import torch
from transformers import GPT2Config, GPT2LMHeadModel


def model():
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=64, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(config).eval()


def example_inputs():
    input_ids = torch.randint(0, 128, (1, 8), generator=torch.Generator().manual_seed(0))
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}
'''


def optimize(*argv: str) -> tuple[int, str]:
    """`optimize ARGV --target host` in-process, without timing a prefill or exporting ONNX
    (neither concerns the pass, and together they take longer than the compilation)."""
    stderr = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(stderr):
        code = main([*argv, "--target", "host", "--no-speed", "--no-onnx"])
    return code, stderr.getvalue()


def assert_pass_in_artifacts(out: Path) -> None:
    plan = json.loads((out / "plan.json").read_text())
    names = [p["name"] for p in plan["passes"]]
    entry = plan["passes"][names.index("fuse_gelu_tanh")]
    assert entry["status"] == "ran" and entry["lossy"] is False and entry["changed"] is True
    assert entry["stats"] == {"matches": LAYERS}
    assert len(entry["changes"]) == LAYERS and all("-> gelu_tanh" in c for c in entry["changes"])
    assert names.index("fuse_gelu_tanh") < names.index("fuse_regions")
    assert plan["check_vs_eager"]["max_abs_error"] <= MODEL_ATOL
    assert "| fuse_gelu_tanh | no | ran | 2 |" in (out / "report.md").read_text()
    graph = (out / "graph.txt").read_text()
    assert graph.count("aten.gelu.default(") == LAYERS and "aten.tanh.default(" not in graph


def test_cli_with_the_example_as_model_file(tmp_path):
    code, stderr = optimize(str(PASS_FILE), "--out", str(tmp_path))
    assert code == 0, stderr
    assert "fuse_gelu_tanh: ran, 2 change(s)" in stderr
    assert_pass_in_artifacts(tmp_path)


def test_cli_pipeline_option_adds_the_pass_to_another_model_file(tmp_path):
    model_file = tmp_path / "gpt2_model.py"
    model_file.write_text(GPT2_MODEL_SOURCE)
    code, stderr = optimize(str(model_file), "--pipeline", f"{PASS_FILE}:pipeline", "--out", str(tmp_path / "out"))
    assert code == 0, stderr
    assert_pass_in_artifacts(tmp_path / "out")


# -- (c) torch.compile -------------------------------------------------------------------------------


class RecordingBackend(compiler.backend.CompilerBackend):
    """CompilerBackend that remembers its instances (the entry point makes one per graph)."""

    instances: list[RecordingBackend] = []

    def __init__(self, options=None):
        super().__init__(options)
        RecordingBackend.instances.append(self)


def test_torch_compile_backend_runs_the_pass(example, gpt2, monkeypatch):
    net, inputs, eager, _, _ = gpt2
    torch._dynamo.reset()
    RecordingBackend.instances = []
    monkeypatch.setattr(compiler.backend, "CompilerBackend", RecordingBackend)
    try:
        model = torch.compile(net, backend="compiler", options={"target": "host", "pipeline": example.pipeline()})
        with torch.no_grad():
            out = model(**inputs).logits
    finally:
        torch._dynamo.reset()
    results = [r for backend in RecordingBackend.instances for r in backend.results]
    assert len(results) == 1  # one graph, no break
    records = {r.name: r for r in results[0].records}
    assert records["fuse_gelu_tanh"].status == "ran"
    assert records["fuse_gelu_tanh"].result.stats["matches"] == LAYERS
    assert "aten.tanh.default(" not in graph_text(results[0].ir)
    assert max_error(out, eager) <= MODEL_ATOL


# -- (d) the check= veto -----------------------------------------------------------------------------


def trace_gelu_like(k: float, c: float, dtype: torch.dtype = torch.float32) -> fx.GraphModule:
    def fn(x):
        return 0.5 * x * (1.0 + torch.tanh(c * (x + k * torch.pow(x, 3.0))))

    return make_fx(fn, tracing_mode="fake")(torch.empty(4, 16, dtype=dtype))


def output_node(gm: fx.GraphModule) -> fx.Node:
    return next(n for n in gm.graph.nodes if n.op == "output").args[0]


def test_check_refuses_other_coefficients_and_says_why(example):
    gm = trace_gelu_like(k=0.05, c=example.GELU_C)  # looks like GELU, is another function
    fuse = example.fuse_gelu_tanh()
    assert fuse.run(gm).stats["matches"] == 0
    assert op_counts(gm)[TANH] == 1 and GELU not in op_counts(gm)
    why = fuse.explain(gm, output_node(gm))
    assert why.startswith(f"no match at {output_node(gm).name}: coefficients k=0.05"), why
    assert "another function" in why

    # The pattern itself matches (the coefficients are wildcards): the check is what refused.
    unchecked = PatternPass("unchecked", example.gelu_tanh_by_hand, example.gelu_tanh, [torch.empty(8)],
                            scalars={"k": example.GELU_K, "c": example.GELU_C})
    assert unchecked.run(trace_gelu_like(k=0.05, c=example.GELU_C)).stats["matches"] == 1


def test_check_refuses_bfloat16_and_accepts_truncated_coefficients(example):
    fuse = example.fuse_gelu_tanh()
    bf16 = trace_gelu_like(example.GELU_K, example.GELU_C, torch.bfloat16)
    assert fuse.run(bf16).stats["matches"] == 0
    why = fuse.explain(bf16, output_node(bf16))
    assert "torch.bfloat16" in why and "not be lossless" in why, why

    truncated = trace_gelu_like(0.044715, 0.79788456)  # a common spelling of sqrt(2/pi)
    assert fuse.explain(truncated, output_node(truncated)) == f"matches at {output_node(truncated).name}"
    assert fuse.run(truncated).stats["matches"] == 1
