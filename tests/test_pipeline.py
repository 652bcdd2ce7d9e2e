"""Tests of `Pipeline`, `PassContext` and the instruments (compiler.passes.pipeline), and of
`as_inductor_pass` (compiler.passes.inductor): order, enabling and disabling by name, pass
requirements, timing, graph dumps, numeric verification, isolation between pipelines, and a
pass running inside Inductor."""

from __future__ import annotations

import re
import time

import pytest
import torch
import torch.fx as fx
from torch.fx.experimental.proxy_tensor import make_fx

import compiler.ops  # noqa: F401 - registers torch.ops.compiler.*
from compiler.errors import PassError, UserInputError
from compiler.ir import graph_text, op_counts
from compiler.passes import (
    DumpGraphInstrument,
    Pass,
    PassContext,
    PassResult,
    PatternPass,
    Pipeline,
    TimingInstrument,
    VerifyNumericsInstrument,
    as_inductor_pass,
    default_pipeline,
)
from compiler.passes.fusion.rms_norm import fuse_rms_norm, rms_norm_replace, rms_norm_search

aten = torch.ops.aten


class LogPass(Pass):
    """Appends its name to a shared log when it runs; changes nothing."""

    def __init__(self, name: str, log: list[str], requires: tuple[str, ...] = (), sleep: float = 0.0) -> None:
        self.name = name  # type: ignore[misc]
        self.requires = requires  # type: ignore[misc]
        self.log = log
        self.sleep = sleep

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        if self.sleep:
            time.sleep(self.sleep)
        self.log.append(self.name)
        return PassResult()


class _RewriteAdds(Pass):
    """A broken 'lossless' pass: `rewrite` changes every aten.add.Tensor node."""

    def rewrite(self, node: fx.Node) -> str:
        raise NotImplementedError

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        result = PassResult()
        for node in gm.graph.nodes:
            if node.op == "call_function" and node.target == aten.add.Tensor:
                result.record(self.rewrite(node))
        return result


class AddToSub(_RewriteAdds):
    """Every aten.add.Tensor becomes aten.sub.Tensor."""

    name = "add_to_sub"

    def rewrite(self, node: fx.Node) -> str:
        node.target = aten.sub.Tensor
        return f"{node.name}: add -> sub"


class LossyAddToSub(AddToSub):
    name = "lossy_add_to_sub"
    lossy = True


def small_graph() -> tuple[fx.GraphModule, list[torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(4, 8, generator=gen), torch.randn(4, 8, generator=gen)
    gm = make_fx(lambda a, b: (a + b) * 2, tracing_mode="fake")(x, y)
    return gm, [x, y]


def norm_graph() -> tuple[fx.GraphModule, list[torch.Tensor]]:
    """An RMSNorm (the FuseRMSNorm pattern) feeding a matmul."""

    def f(x, w, m):
        return (w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))) @ m

    gen = torch.Generator().manual_seed(1)
    inputs = [torch.randn(3, 16, generator=gen), torch.randn(16, generator=gen), torch.randn(16, 8, generator=gen)]
    return make_fx(f, tracing_mode="fake")(*inputs), inputs


def statuses(records) -> list[tuple[str, str]]:
    return [(r.name, r.status) for r in records]


# -- order, enable/disable, names ----------------------------------------------------------------


def test_passes_run_in_pipeline_order():
    log: list[str] = []
    pipeline = Pipeline([LogPass(n, log) for n in ("c", "a", "b")])
    records = pipeline.run(small_graph()[0], PassContext())
    assert log == ["c", "a", "b"]
    assert statuses(records) == [("c", "ran"), ("a", "ran"), ("b", "ran")]
    assert pipeline.names() == ["c", "a", "b"]


def test_enabled_only_runs_just_those_passes():
    log: list[str] = []
    pipeline = Pipeline([LogPass(n, log) for n in ("c", "a", "b")])
    records = pipeline.run(small_graph()[0], PassContext(enabled_only={"a", "b"}))
    assert log == ["a", "b"]
    assert statuses(records) == [("c", "disabled"), ("a", "ran"), ("b", "ran")]


def test_disabled_passes_are_skipped_by_name():
    log: list[str] = []
    pipeline = Pipeline([LogPass(n, log) for n in ("c", "a", "b")])
    records = pipeline.run(small_graph()[0], PassContext(disabled={"a"}))
    assert log == ["c", "b"]
    assert statuses(records) == [("c", "ran"), ("a", "disabled"), ("b", "ran")]


@pytest.mark.parametrize("field", ["disabled", "enabled_only"])
def test_unknown_pass_names_raise_user_input_error_listing_known_ones(field):
    log: list[str] = []
    pipeline = Pipeline([LogPass(n, log) for n in ("first", "second")], name="mine")
    ctx = PassContext(**{field: {"nonexistent_pass"}})
    with pytest.raises(UserInputError) as info:
        pipeline.run(small_graph()[0], ctx)
    message = str(info.value)
    assert "nonexistent_pass" in message and "first" in message and "second" in message
    assert log == []  # checked before any pass runs


def test_duplicate_pass_names_are_rejected():
    with pytest.raises(ValueError, match="duplicate pass names.*'twice'"):
        Pipeline([LogPass("twice", []), LogPass("once", []), LogPass("twice", [])])


def test_a_pass_without_a_name_is_rejected():
    class Nameless(Pass):
        pass

    with pytest.raises(ValueError, match="Nameless has no name"):
        Pipeline([Nameless()])


# -- requirements ---------------------------------------------------------------------------------


def test_pass_requiring_a_disabled_pass_is_skipped_with_a_reason():
    log: list[str] = []
    pipeline = Pipeline([LogPass("base", log), LogPass("dependent", log, requires=("base",))])
    records = pipeline.run(small_graph()[0], PassContext(disabled={"base"}))
    assert log == []
    assert statuses(records) == [("base", "disabled"), ("dependent", "skipped")]
    assert "base" in records[1].reason
    # The same pipeline with the requirement met runs both.
    log.clear()
    records = pipeline.run(small_graph()[0], PassContext())
    assert log == ["base", "dependent"]


def test_pass_requiring_a_later_pass_is_skipped():
    log: list[str] = []
    pipeline = Pipeline([LogPass("dependent", log, requires=("base",)), LogPass("base", log)])
    records = pipeline.run(small_graph()[0], PassContext())
    assert log == ["base"]
    assert statuses(records) == [("dependent", "skipped"), ("base", "ran")]


def test_pass_requiring_calibration_data_is_skipped_without_it():
    log: list[str] = []
    pipeline = Pipeline([LogPass("calibrated", log, requires=("calibration_data",)), LogPass("plain", log)])
    records = pipeline.run(small_graph()[0], PassContext())
    assert statuses(records) == [("calibrated", "skipped"), ("plain", "ran")]
    assert "calibration_data" in records[0].reason
    assert log == ["plain"]
    log.clear()
    records = pipeline.run(small_graph()[0], PassContext(calibration_data=[torch.zeros(1)]))
    assert log == ["calibrated", "plain"]


# -- instruments ----------------------------------------------------------------------------------


def test_timing_instrument_records_every_pass_that_ran():
    log: list[str] = []
    pipeline = Pipeline([LogPass("slow", log, sleep=0.05), LogPass("off", log), LogPass("fast", log)])
    timing = TimingInstrument()
    start = time.perf_counter()
    records = pipeline.run(small_graph()[0], PassContext(disabled={"off"}, instruments=[timing]))
    wall = time.perf_counter() - start
    assert set(timing.seconds) == {"slow", "fast"} == {r.name for r in records if r.status == "ran"}
    assert timing.seconds["slow"] >= 0.05  # it slept that long inside the timed region
    assert 0 <= timing.seconds["fast"] < timing.seconds["slow"]
    assert sum(timing.seconds.values()) <= wall


def test_dump_graph_instrument_files_differ_exactly_where_the_pass_changed_the_graph(tmp_path):
    gm, _ = norm_graph()
    norm_names = {n.name for n in gm.graph.nodes if n.op == "call_function" and n.target != aten.mm.default}
    anchor = next(n for n in gm.graph.nodes if n.target == aten.mm.default).args[0]
    users = {u.name for u in anchor.users}
    before_text = graph_text(gm)

    pipeline = Pipeline([fuse_rms_norm(), LogPass("noop", [])])
    pipeline.run(gm, PassContext(instruments=[DumpGraphInstrument(tmp_path)]))

    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "01_fuse_rms_norm.after.txt",
        "01_fuse_rms_norm.before.txt",
        "02_noop.after.txt",
        "02_noop.before.txt",
    ]
    before = (tmp_path / "01_fuse_rms_norm.before.txt").read_text()
    after = (tmp_path / "01_fuse_rms_norm.after.txt").read_text()
    assert before == before_text and after == graph_text(gm)
    (fused,) = [n for n in gm.graph.nodes if n.target == torch.ops.compiler.rms_norm.default]

    def name(line: str) -> str:
        return line.split(" = ")[0]

    before_lines, after_lines = before.splitlines(), after.splitlines()
    removed = [line for line in before_lines if line not in after_lines]
    added = [line for line in after_lines if line not in before_lines]
    # Gone: the decomposed norm; changed: the lines that read its output; new: the fused op.
    assert {name(line) for line in removed} == norm_names | users
    assert {name(line) for line in added} == {fused.name} | users
    for line in removed:
        if name(line) in users:
            assert re.sub(rf"\b{anchor.name}\b", fused.name, line) in added
    # A pass that changes nothing dumps identical files.
    noop_before = (tmp_path / "02_noop.before.txt").read_text()
    assert noop_before == (tmp_path / "02_noop.after.txt").read_text() == after


def test_verify_numerics_raises_for_a_wrong_lossless_pass():
    gm, inputs = small_graph()
    log: list[str] = []
    pipeline = Pipeline([AddToSub(), LogPass("after", log)])
    with pytest.raises(PassError, match="add_to_sub"):
        pipeline.run(gm, PassContext(instruments=[VerifyNumericsInstrument(inputs)]))
    assert log == []  # the run stops at the broken pass


def test_verify_numerics_only_records_for_a_lossy_pass():
    gm, (x, y) = small_graph()
    inst = VerifyNumericsInstrument()
    records = Pipeline([LossyAddToSub()]).run(gm, PassContext(sample_inputs=[x, y], instruments=[inst], budget="ppl:+1%"))
    assert statuses(records) == [("lossy_add_to_sub", "ran")]
    reference, changed = (x + y) * 2, (x - y) * 2
    # The documented measure: how far |new - ref| exceeds rtol * |ref| at worst.
    expected = ((changed - reference).abs() - inst.rtol * reference.abs()).max().item()
    assert expected > inst.atol
    assert inst.errors["lossy_add_to_sub"] == pytest.approx(expected, rel=1e-6)
    torch.testing.assert_close(gm(x, y), changed, rtol=0, atol=0)


def test_verify_numerics_accepts_a_correct_pass():
    gm, inputs = norm_graph()
    inst = VerifyNumericsInstrument(inputs)
    records = Pipeline([fuse_rms_norm()]).run(gm, PassContext(instruments=[inst]))
    assert records[0].result.stats["matches"] == 1
    # compiler::rms_norm's reference is the same ATen computation: at most reduction-order noise.
    assert inst.errors["fuse_rms_norm"] <= inst.atol


def test_verify_numerics_needs_sample_inputs():
    gm, _ = small_graph()
    with pytest.raises(UserInputError, match="sample inputs"):
        Pipeline([LogPass("p", [])]).run(gm, PassContext(instruments=[VerifyNumericsInstrument()]))


class NaNPass(_RewriteAdds):
    """x + y becomes x + value (NaN by default, or an infinity)."""

    name = "nan_pass"

    def __init__(self, value: float = float("nan")) -> None:
        self.value = value

    def rewrite(self, node: fx.Node) -> str:
        node.args = (node.args[0], self.value)
        return "poisoned"


class DropFirstAddend(_RewriteAdds):
    """x + y becomes y + y: wrong, and it hides any NaN or inf that x carries."""

    name = "drop_first_addend"

    def rewrite(self, node: fx.Node) -> str:
        node.args = (node.args[1], node.args[1])
        return "dropped x"


class SwapAddends(_RewriteAdds):
    """x + y becomes y + x: exact, NaN and inf included."""

    name = "swap_addends"

    def rewrite(self, node: fx.Node) -> str:
        node.args = (node.args[1], node.args[0])
        return "swapped"


def with_non_finite(x: torch.Tensor) -> torch.Tensor:
    x = x.clone()
    x[0, 0], x[1, 1], x[2, 2] = float("nan"), float("inf"), float("-inf")
    return x


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_verify_numerics_raises_for_a_pass_that_produces_nan_or_inf(value):
    gm, inputs = small_graph()
    inst = VerifyNumericsInstrument(inputs)
    with pytest.raises(PassError, match="nan_pass"):
        Pipeline([NaNPass(value)]).run(gm, PassContext(instruments=[inst]))


def test_verify_numerics_raises_for_a_pass_that_loses_the_references_nan_and_inf():
    gm, (x, y) = small_graph()
    inst = VerifyNumericsInstrument([with_non_finite(x), y])
    with pytest.raises(PassError, match="drop_first_addend"):
        Pipeline([DropFirstAddend()]).run(gm, PassContext(instruments=[inst]))


def test_verify_numerics_accepts_nan_and_inf_where_the_reference_has_them():
    gm, (x, y) = small_graph()
    inst = VerifyNumericsInstrument([with_non_finite(x), y])
    records = Pipeline([SwapAddends()]).run(gm, PassContext(instruments=[inst]))
    assert statuses(records) == [("swap_addends", "ran")]
    assert inst.errors["swap_addends"] == 0.0


# -- no shared state ------------------------------------------------------------------------------


def test_two_pipelines_do_not_share_state():
    first, second = default_pipeline(), default_pipeline()
    assert first.names() == second.names()
    assert all(a is not b for a, b in zip(first.passes, second.passes))
    first.passes.append(LogPass("extra", []))
    assert "extra" not in second.names() and "extra" not in default_pipeline().names()
    assert PassContext().disabled is not PassContext().disabled

    gm_a, inputs = norm_graph()
    gm_b, _ = norm_graph()
    timing_a = TimingInstrument()
    first.run(gm_a, PassContext(disabled={"fuse_regions", "fuse_rms_norm"}, instruments=[timing_a]))
    second.run(gm_b, PassContext(disabled={"fuse_regions"}))
    assert "fuse_rms_norm" not in timing_a.seconds
    assert "compiler.rms_norm.default" not in op_counts(gm_a)
    assert op_counts(gm_b)["compiler.rms_norm.default"] == 1
    # Both are still the same function.
    torch.testing.assert_close(gm_a(*inputs), gm_b(*inputs), rtol=1e-5, atol=1e-5)


# -- Inductor adapter -----------------------------------------------------------------------------


def test_inductor_pass_uuid_is_stable_and_depends_on_the_pass():
    a, b = as_inductor_pass(fuse_rms_norm()), as_inductor_pass(fuse_rms_norm())
    assert a.uuid() == b.uuid()
    assert re.fullmatch(r"[0-9a-f]{64}", a.uuid())

    def other_search(x, weight, eps):
        return weight * (x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps))

    same_name_other_pattern = PatternPass(
        "fuse_rms_norm", other_search, rms_norm_replace, [torch.empty(2, 8), torch.empty(8)], scalars={"eps": 1e-6}
    )
    assert as_inductor_pass(same_name_other_pattern).uuid() != a.uuid()
    assert as_inductor_pass(LogPass("fuse_rms_norm", [])).uuid() != a.uuid()
    assert as_inductor_pass(AddToSub()).uuid() != as_inductor_pass(LossyAddToSub()).uuid()


def test_inductor_pass_uuid_differs_when_a_check_vetoes_matches():
    patterns = fuse_rms_norm().patterns
    plain = PatternPass("fuse_rms_norm", patterns=patterns)
    vetoing = PatternPass("fuse_rms_norm", patterns=patterns, check=lambda m: "never")
    gm_plain, _ = norm_graph()
    gm_veto, _ = norm_graph()
    assert plain.run(gm_plain).stats["matches"] == 1 and vetoing.run(gm_veto).stats["matches"] == 0
    assert as_inductor_pass(plain).uuid() != as_inductor_pass(vetoing).uuid()


def test_inductor_pass_uuid_differs_by_the_dtypes_a_pattern_was_traced_at():
    def uuid(dtype: torch.dtype) -> str:
        example = [torch.empty(2, 8, dtype=dtype), torch.empty(8, dtype=dtype)]
        p = PatternPass("fuse_rms_norm", rms_norm_search, rms_norm_replace, example, scalars={"eps": 1e-6})
        return as_inductor_pass(p).uuid()

    assert uuid(torch.float32) == uuid(torch.float32) != uuid(torch.bfloat16)


def test_inductor_pass_uuid_hashes_a_check_without_source_by_its_code():
    def check_from_exec(body: str):
        namespace: dict = {}
        exec(f"def check(m):\n    return {body}", namespace)  # no file: inspect.getsource fails
        return PatternPass("fuse_rms_norm", patterns=fuse_rms_norm().patterns, check=namespace["check"])

    def uuid(body: str) -> str:
        return as_inductor_pass(check_from_exec(body)).uuid()

    assert uuid("True") == uuid("True") != uuid("'refused'")


class NormThenLinear(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(16))
        self.linear = torch.nn.Linear(16, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))
        return self.linear(h)


def test_pass_runs_inside_inductor_and_matches_eager():
    """Slow-ish (~5-20 s): a real Inductor CPU compile, C++ codegen included."""
    torch.manual_seed(0)
    model = NormThenLinear().eval()
    x = torch.randn(2, 4, 16)
    wrapped = as_inductor_pass(fuse_rms_norm())
    torch._dynamo.reset()
    # fx_graph_cache off: a cache hit (from an earlier run on this machine) would skip the
    # post-grad passes, and this test is about the pass running.
    with torch._inductor.config.patch(post_grad_custom_post_pass=wrapped, fx_graph_cache=False), torch.no_grad():
        compiled = torch.compile(model)
        got = compiled(x)
        expected = model(x)
    torch._dynamo.reset()
    assert wrapped.last_result is not None and wrapped.last_result.stats["matches"] == 1
    # Inductor may reorder the 16-term reductions (mean, the linear's dot products): ~1e-6
    # relative per value, outputs are O(1-10): 1e-5 relative and absolute.
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_lossy_pass_runs_only_when_the_budget_allows_or_it_is_named():
    gm, (x, y) = small_graph()
    skipped = Pipeline([LossyAddToSub()]).run(gm, PassContext())
    assert statuses(skipped) == [("lossy_add_to_sub", "skipped")] and "lossless" in skipped[0].reason
    named = Pipeline([LossyAddToSub()]).run(gm, PassContext(enabled_only={"lossy_add_to_sub"}))
    assert statuses(named) == [("lossy_add_to_sub", "ran")]
