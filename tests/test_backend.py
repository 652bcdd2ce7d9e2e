"""Tests of the torch.compile backend (`backend="compiler"`, compiler.backend) and of the Python
front door `compiler.compile`: agreement with eager on tiny Llama and GPT-2, dynamic sequence
lengths, options, errors, graph breaks and the grad-mode fallback."""

from __future__ import annotations

import pytest
import torch

import compiler
import compiler.backend
import compiler.driver
from compiler.errors import UserInputError
from compiler.ir import op_counts
from compiler.passes import VerifyNumericsInstrument, default_pipeline
from compiler.passes.fusion.region import FusedRegion
from models import logits, tiny_gpt2, tiny_llama, token_inputs

# Full models in fp32: the compiled graph runs the same ATen ops as eager except where a pass
# fused them (RMSNorm, attention), which changes reduction order at most: ~1e-6 relative per
# layer on O(1) activations, and logits of a 2-layer model stay within 1e-4 absolute.
MODEL_ATOL = 1e-4
LENGTHS = (8, 12, 16, 20, 33)


class RecordingBackend(compiler.backend.CompilerBackend):
    """CompilerBackend that remembers every instance (one per compiled graph via the entry point)."""

    instances: list[RecordingBackend] = []

    def __init__(self, options=None):
        super().__init__(options)
        RecordingBackend.instances.append(self)


def compiled_graphs() -> list[compiler.CompileResult]:
    return [r for backend in RecordingBackend.instances for r in backend.results]


@pytest.fixture(scope="module", autouse=True)
def _shared_kernel_cache(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("COMPILER_CACHE_DIR", str(tmp_path_factory.mktemp("compiler-cache")))
        yield


@pytest.fixture
def recording(monkeypatch):
    """Route `backend="compiler"` (the entry point) through RecordingBackend, with fresh Dynamo state."""
    torch._dynamo.reset()
    RecordingBackend.instances = []
    monkeypatch.setattr(compiler.backend, "CompilerBackend", RecordingBackend)
    yield RecordingBackend.instances
    torch._dynamo.reset()


def max_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


# -- tiny Llama: agreement and dynamic lengths (one compiled model, several lengths) ---------------


@pytest.fixture(scope="module")
def llama_runs():
    torch._dynamo.reset()
    RecordingBackend.instances = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(compiler.backend, "CompilerBackend", RecordingBackend)
        model = tiny_llama()
        compiled = torch.compile(model, backend="compiler")
        errors, graphs_after = {}, {}
        with torch.no_grad():
            for length in LENGTHS:
                inputs = token_inputs(length, seed=length)
                errors[length] = max_error(logits(compiled(**inputs)), logits(model(**inputs)))
                graphs_after[length] = len(compiled_graphs())
        results = compiled_graphs()
    torch._dynamo.reset()
    return {"errors": errors, "graphs_after": graphs_after, "results": results}


def test_llama_through_the_backend_entry_point_matches_eager(llama_runs):
    for length, error in llama_runs["errors"].items():
        assert error <= MODEL_ATOL, f"length {length}: max abs error {error}"


def _symbolic(result: compiler.CompileResult) -> bool:
    vals = [n.meta.get("val") for n in result.ir.graph.nodes if n.op == "placeholder"]
    shapes = [v.shape for v in vals if isinstance(v, torch.Tensor)]
    return any(isinstance(d, torch.SymInt) for s in shapes for d in s) or any(isinstance(v, torch.SymInt) for v in vals)


def test_dynamic_lengths_compile_one_static_then_one_dynamic_graph(llama_runs):
    results = llama_runs["results"]
    assert len(results) == 2, f"{len(results)} graphs compiled for lengths {LENGTHS}"
    assert llama_runs["graphs_after"] == {8: 1, 12: 2, 16: 2, 20: 2, 33: 2}
    assert not _symbolic(results[0]) and _symbolic(results[1])
    # The passes ran on both: the same regions fused in the static and the dynamic graph.
    regions = [sorted(m.label for m in r.ir.modules() if isinstance(m, FusedRegion)) for r in results]
    assert regions[0] == regions[1] and regions[0].count("rms_norm") + regions[0].count("residual+rms_norm") == 5


def test_gpt2_through_the_backend_entry_point_matches_eager(recording):
    model = tiny_gpt2()
    compiled = torch.compile(model, backend="compiler")
    with torch.no_grad():
        for seed in (0, 1):  # a second call runs the compiled graph again, with other tokens
            inputs = token_inputs(8, seed=seed)
            assert max_error(logits(compiled(**inputs)), logits(model(**inputs))) <= MODEL_ATOL
    assert len(compiled_graphs()) == 1


# -- options --------------------------------------------------------------------------------------


class NormLinear(torch.nn.Module):
    def __init__(self, dim: int = 32) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.weight = torch.nn.Parameter(torch.randn(dim))
        self.linear = torch.nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(torch.float32)
        h = self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))
        return self.linear(h)


@pytest.mark.parametrize("disable", [None, "fuse_rms_norm"])
def test_options_dict_reaches_the_backend(recording, tmp_path, disable):
    # Without the partitioner, so that the norm is fuse_rms_norm's to take.
    options = {"target": "host", "dump_dir": str(tmp_path), "disable": ",".join(filter(None, ["fuse_regions", disable]))}
    model = NormLinear()
    x = torch.randn(3, 32)
    with torch.no_grad():
        got = torch.compile(model, backend="compiler", options=options)(x)
        expected = model(x)
    (backend,) = recording
    assert backend.options.target.name == "host"
    assert backend.options.disable == {"fuse_regions"} | ({disable} if disable else set())
    fused = op_counts(backend.results[-1].ir).get("compiler.rms_norm.default", 0)
    assert fused == (0 if disable else 1)
    dumped = sorted(p.name for p in tmp_path.iterdir())
    assert dumped, "dump_dir was not used"
    assert any("fuse_rms_norm" in name for name in dumped) == (disable is None)
    # One 32-term dot product per output after an RMSNorm computed the same way (the TVM
    # kernel sums squares in another order: ~1e-7 relative): 1e-5 is far above that noise on
    # O(1) values and far below any real error.
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def _with_eps(model: torch.nn.Module, eps: float) -> torch.nn.Module:
    for module in model.modules():
        if hasattr(module, "variance_epsilon"):
            module.variance_epsilon = eps
    return model


@pytest.mark.xfail(
    strict=True,
    reason="library limitation: Dynamo (specialize_float=False) keeps a float attribute constant "
    "only until it sees another value at the same source; then automatic dynamic makes it a "
    "float64 graph input. A second Llama whose rms_norm eps differs (SmolLM2's 1e-5 after a "
    "1e-6 model, in one process) so gets `mean + convert_element_type(eps_input)`, and "
    "compiler::rms_norm takes eps as a Python float: fuse_rms_norm leaves those norms unfused "
    "(baking the traced value would ignore later changes of eps, which Dynamo does not guard)",
)
def test_norms_fuse_when_dynamo_makes_eps_a_graph_input(recording):
    inputs = token_inputs(8)
    with torch.no_grad():
        for eps in (1e-6, 1e-5):
            model = _with_eps(tiny_llama(), eps)
            got = torch.compile(model, backend="compiler", options={"disable": "fuse_regions"})(**inputs)
            assert max_error(logits(got), logits(model(**inputs))) <= MODEL_ATOL
    assert [op_counts(r.ir).get("compiler.rms_norm.default", 0) for r in compiled_graphs()] == [5, 5]


def test_host_target_compiles_a_narrow_rms_norm():
    model = NormLinear(dim=4)
    x = torch.randn(3, 4)
    compiled = compiler.compile(model, (x,), target="host", passes="fuse_rms_norm")
    assert op_counts(compiled.result.ir).get("compiler.rms_norm.default") == 1
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-5)


def _exception_chain(exc: BaseException) -> list[BaseException]:
    chain = []
    while exc is not None and exc not in chain:
        chain.append(exc)
        exc = exc.__cause__ or exc.__context__ or getattr(exc, "inner_exception", None)
    return chain


@pytest.mark.parametrize(
    "options, message",
    [
        ({"bogus_option": 1}, "unknown backend option(s) ['bogus_option']"),
        ({"target": "no_such_target"}, "unknown target 'no_such_target'; known targets: "),
    ],
    ids=["unknown-key", "unknown-target"],
)
def test_bad_options_raise_user_input_error(recording, options, message):
    model = torch.nn.Linear(4, 4)
    with pytest.raises(Exception) as info, torch.no_grad():
        torch.compile(model, backend="compiler", options=options)(torch.randn(2, 4))
    assert message in str(info.value)
    assert any(isinstance(e, UserInputError) for e in _exception_chain(info.value))
    if "target" in options:
        assert "host" in str(info.value)  # the known targets are listed


# -- graph breaks ---------------------------------------------------------------------------------


class TwoLinears(torch.nn.Module):
    def __init__(self, breaker) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.first = torch.nn.Linear(8, 8)
        self.second = torch.nn.Linear(8, 8)
        self.breaker = breaker

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.first(x))
        self.breaker()
        return self.second(h)


@pytest.mark.parametrize(
    "breaker",
    [torch._dynamo.graph_break, lambda: print("between the linears")],
    ids=["graph_break", "print"],
)
def test_graph_break_compiles_both_sides_and_matches_eager(recording, capsys, breaker):
    model = TwoLinears(breaker)
    x = torch.randn(3, 8)
    with torch.no_grad():
        got = torch.compile(model, backend="compiler")(x)
        expected = model(x)
    assert len(compiled_graphs()) == 2  # one graph before the break, one after
    # Same ATen ops as eager (addmm, relu): identical up to BLAS blocking, ~1e-7 on O(1) values.
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
    if breaker is not torch._dynamo.graph_break:
        assert capsys.readouterr().out.count("between the linears") == 2  # compiled and eager


# -- grad mode ------------------------------------------------------------------------------------


def test_graph_needing_gradients_warns_and_runs_eagerly(recording):
    model = TwoLinears(lambda: None)
    x = torch.randn(3, 8)
    with pytest.warns(UserWarning, match="inference graphs"):
        got = torch.compile(model, backend="compiler")(x)
    assert compiled_graphs() == []  # nothing went through the pipeline
    expected = model(x)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    # It really is the eager graph: gradients flow as they would without compilation.
    got.sum().backward()
    grad_compiled = model.first.weight.grad.clone()
    model.zero_grad()
    expected.sum().backward()
    torch.testing.assert_close(grad_compiled, model.first.weight.grad, rtol=0, atol=0)


# -- compiler.compile -----------------------------------------------------------------------------


class RecordingVerify(VerifyNumericsInstrument):
    made: list[RecordingVerify] = []

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        RecordingVerify.made.append(self)


@pytest.mark.parametrize("build, verify", [(tiny_llama, True), (tiny_gpt2, False)], ids=["llama-verify", "gpt2"])
def test_compile_api_matches_eager(monkeypatch, build, verify):
    RecordingVerify.made = []
    monkeypatch.setattr(compiler.driver, "VerifyNumericsInstrument", RecordingVerify)
    model = build()
    example = token_inputs(8)
    compiled = compiler.compile(model, example, verify=verify)
    with torch.no_grad():
        for seed in (0, 3):
            inputs = token_inputs(8, seed=seed)
            assert max_error(logits(compiled(**inputs)), logits(model(**inputs))) <= MODEL_ATOL
    ran = [r.name for r in compiled.result.records if r.status == "ran"]
    lossy = {p.name for p in default_pipeline().passes if p.lossy}
    assert ran == [name for name in default_pipeline().names() if name not in lossy]  # the budget is lossless
    if verify:
        (inst,) = RecordingVerify.made
        # Every pass that ran was verified on the example inputs, within the lossless bound.
        assert set(inst.errors) == set(ran)
        assert all(err <= inst.atol for err in inst.errors.values())
    else:
        assert RecordingVerify.made == []


def test_backend_is_registered_under_its_name():
    """The `torch_dynamo_backends` entry point, not an import side effect, provides the name."""
    from torch._dynamo.backends.registry import lookup_backend

    assert "compiler" in torch._dynamo.list_backends(exclude_tags=())
    assert lookup_backend("compiler") is compiler.backend.compiler_backend
