"""Tests of the pattern API (compiler.passes.pattern): `PatternPass`, `Pattern` and `explain`.

Graphs come from `compiler.capture.capture_export` (the RMSNorm model) or, for small
hand-written dataflow, from `make_fx` in fake mode, which yields the same IR form (ATen ops,
FakeTensor `meta["val"]`) in milliseconds. Every rewrite is checked structurally (op counts,
who uses what, topological order) and numerically against the eager function.
"""

from __future__ import annotations

import pytest
import torch
import torch.fx as fx
from torch.fx.experimental.proxy_tensor import make_fx

import compiler.ops  # noqa: F401 - registers torch.ops.compiler.*
from compiler.capture import capture_export
from compiler.ir import op_counts
from compiler.passes import Pattern, PatternPass
from compiler.passes.fusion.rms_norm import fuse_rms_norm

aten = torch.ops.aten

# fp32 elementwise rewrites (a*b+c vs addcmul): the two sides differ by at most one rounding of
# the result, i.e. |error| <= 2**-24 * max(|x*y|, |z|, |result|). With randn inputs of 16
# elements every magnitude is below ~20, so 1e-5 absolute (and 1e-6 relative) is 4-5x above the
# worst one-rounding gap yet far below any real mistake (a wrong sign or operand is O(1)).
ELEMENTWISE = dict(rtol=1e-6, atol=1e-5)
# fp32 RMSNorm: compiler::rms_norm's reference runs the same ATen ops as the decomposed norm, so
# results should be identical; a reduction summed in another order moves the mean of 16 squares
# by ~sqrt(16) * 2**-24 ~ 2.4e-7 relative, halved by the rsqrt, plus an ulp from each product:
# 1e-5 relative is 10x that, while a lost mean, a swapped operand or a dropped weight is O(1).
RMS = dict(rtol=1e-5, atol=1e-6)


def trace(fn, *inputs: torch.Tensor) -> fx.GraphModule:
    """The ATen graph of `fn` with FakeTensor metadata (the IR form, without capture_export)."""
    return make_fx(fn, tracing_mode="fake")(*inputs)


def node(gm: fx.GraphModule, name: str) -> fx.Node:
    return next(n for n in gm.graph.nodes if n.name == name)


def nodes_with(gm: fx.GraphModule, target) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target == target]


def graph_outputs(gm: fx.GraphModule) -> list[fx.Node]:
    out = next(n for n in gm.graph.nodes if n.op == "output").args[0]
    return list(out) if isinstance(out, (tuple, list)) else [out]


def assert_topological(gm: fx.GraphModule) -> None:
    """Every node's inputs are defined before it (and fx's own invariants hold)."""
    gm.graph.lint()
    seen: set[fx.Node] = set()
    for n in gm.graph.nodes:
        for inp in n.all_input_nodes:
            assert inp in seen, f"{n.name} uses {inp.name} before it is defined"
        seen.add(n)


def run_pass(p: PatternPass, gm: fx.GraphModule):
    """Run a pattern pass directly and regenerate the module's code (the pipeline does that)."""
    result = p.run(gm)
    gm.recompile()
    return result


def randn(*shape: int, n: int = 1, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=gen) for _ in range(n)]


# -- (a) a match: FuseRMSNorm on a captured graph -------------------------------------------------


class RMSNorm(torch.nn.Module):
    """HF's LlamaRMSNorm, written out (the weight is random so its place in the product counts)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.to(torch.float32)
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class NormLinearNorm(torch.nn.Module):
    def __init__(self, dim: int = 16) -> None:
        super().__init__()
        self.norm1 = RMSNorm(dim, 1e-6)
        self.linear = torch.nn.Linear(dim, dim)
        self.norm2 = RMSNorm(dim, 1e-5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm2(self.linear(self.norm1(x)))


_NORM_OPS = {"aten.pow.Tensor_Scalar", "aten.mean.dim", "aten.add.Tensor", "aten.rsqrt.default", "aten.mul.Tensor"}


def test_fuse_rms_norm_rewrites_both_norms_of_a_captured_graph_and_matches_eager():
    torch.manual_seed(0)
    model = NormLinearNorm().eval()
    # Inputs far from unit variance, so eps matters less than the norm itself but a swapped
    # weight/input or a lost mean would be O(1) wrong.
    x = 3.0 * torch.randn(2, 5, 16)
    captured = capture_export(model, (x,))
    gm = captured.gm
    before = op_counts(gm)
    assert before["aten.rsqrt.default"] == 2 and before["aten.pow.Tensor_Scalar"] == 2

    result = run_pass(fuse_rms_norm(), gm)

    after = op_counts(gm)
    assert result.stats["matches"] == 2
    assert after["compiler.rms_norm.default"] == 2
    assert not set(after) & _NORM_OPS, f"decomposed RMSNorm ops left: {after}"
    # The Linear between the norms is untouched.
    assert {k: v for k, v in after.items() if k != "compiler.rms_norm.default"} == {
        k: v for k, v in before.items() if k not in _NORM_OPS
    }
    # Each norm keeps its own eps: the wildcard binds per match.
    assert [n.args[2] for n in nodes_with(gm, torch.ops.compiler.rms_norm.default)] == [1e-6, 1e-5]
    assert_topological(gm)
    with torch.no_grad():
        expected = model(x)
        got = captured.unflatten_outputs(gm(*captured.flatten_inputs((x,), {})))
    got = got[0] if isinstance(got, (tuple, list)) else got
    torch.testing.assert_close(got, expected, **RMS)


def _norm_eps(x, w, eps):
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def _norm(x, w):
    return _norm_eps(x, w, 1e-6)


def test_explain_says_matches_where_the_pattern_matches():
    gm = trace(_norm, *randn(2, 16), *randn(16, seed=1))
    anchor = graph_outputs(gm)[0]
    p = fuse_rms_norm()
    assert p.explain(gm, anchor) == f"matches at {anchor.name}"
    assert p.explain(gm, anchor.name) == f"matches at {anchor.name}"


# -- (b) non-matches and their explanations -------------------------------------------------------


def _norm_sqrt_div(x, w):
    return w * (x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))


def _norm_reciprocal(x, w):
    return w * (x * torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6).reciprocal())


def _norm_cube(x, w):
    return w * (x * torch.rsqrt(x.pow(3).mean(-1, keepdim=True) + 1e-6))


@pytest.mark.parametrize(
    "fn, expected_words",
    [
        # x / sqrt(...) : the pattern's x * rsqrt(...) product is a division here.
        (_norm_sqrt_div, ["aten.mul.Tensor", "aten.div.Tensor"]),
        # x * sqrt(...).reciprocal(): the product is there, its right operand is not an rsqrt.
        (_norm_reciprocal, ["aten.rsqrt.default", "aten.reciprocal.default"]),
        # x.pow(3): same op, other exponent.
        (_norm_cube, ["aten.pow.Tensor_Scalar", "is 3", "expects 2"]),
    ],
    ids=["sqrt-div", "reciprocal", "pow3"],
)
def test_near_miss_is_not_rewritten_and_explain_names_the_differing_op(fn, expected_words):
    x, w = randn(2, 16, seed=2)[0], randn(16, seed=3)[0]
    gm = trace(fn, x, w)
    anchor = graph_outputs(gm)[0]
    p = fuse_rms_norm()
    why = p.explain(gm, anchor)
    assert why.startswith(f"no match at {anchor.name}")
    for word in expected_words:
        assert word in why, f"{word!r} not in explanation: {why}"
    before = op_counts(gm)
    assert run_pass(p, gm).stats["matches"] == 0
    assert op_counts(gm) == before
    # x.pow(3) has negative means, so both sides hold the same NaNs from rsqrt.
    torch.testing.assert_close(gm(x, w), fn(x, w), rtol=0, atol=0, equal_nan=True)


def test_explain_at_a_node_of_another_op():
    gm = trace(_norm, *randn(2, 16), *randn(16, seed=1))
    pow_node = nodes_with(gm, aten.pow.Tensor_Scalar)[0]
    why = fuse_rms_norm().explain(gm, pow_node)
    assert "is not the pattern's output op" in why and "aten.mul.Tensor" in why


def _norm_with_escaping_rsqrt(x, w):
    r = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
    return w * (x * r), r + 1


def test_interior_value_used_outside_is_refused_and_explained():
    x, w = randn(2, 16, seed=4)[0], randn(16, seed=5)[0]
    gm = trace(_norm_with_escaping_rsqrt, x, w)
    anchor = graph_outputs(gm)[0]
    outside_user = graph_outputs(gm)[1]
    p = fuse_rms_norm()
    why = p.explain(gm, anchor)
    assert "also used by" in why
    assert "aten.rsqrt.default" in why and outside_user.name in why
    before = op_counts(gm)
    assert run_pass(p, gm).stats["matches"] == 0
    assert op_counts(gm) == before
    for got, want in zip(gm(x, w), _norm_with_escaping_rsqrt(x, w)):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def _affine_search(x, s):
    return (x + s) * s


def _affine_replace(x, s):
    # Other ops than the search (a full_like operand), so a rewrite is visible in the op counts.
    return torch.ops.aten.mul.Tensor(x + s, torch.full_like(x, s))


def _affine_pass() -> PatternPass:
    return PatternPass("affine", _affine_search, _affine_replace, [torch.empty(4)], scalars={"s": 1.0})


def test_scalar_wildcard_binds_to_the_graphs_literal():
    x = randn(8, seed=6)[0]
    gm = trace(lambda t: (t + 0.75) * 0.75, x)
    p = _affine_pass()
    assert p.explain(gm, graph_outputs(gm)[0]).startswith("matches")
    assert run_pass(p, gm).stats["matches"] == 1
    full = nodes_with(gm, aten.full_like.default)
    assert len(full) == 1 and full[0].args[1] == 0.75
    assert nodes_with(gm, aten.add.Tensor)[0].args[1] == 0.75
    # (x + 0.75) * 0.75 is computed with the same two roundings either way: bitwise equal.
    torch.testing.assert_close(gm(x), (x + 0.75) * 0.75, rtol=0, atol=0)


def test_scalar_wildcard_bound_inconsistently_is_refused_and_explained():
    x = randn(8, seed=6)[0]
    gm = trace(lambda t: (t + 0.5) * 0.25, x)
    p = _affine_pass()
    why = p.explain(gm, graph_outputs(gm)[0])
    assert "scalar s" in why and "0.5" in why and "0.25" in why
    assert run_pass(p, gm).stats["matches"] == 0
    assert nodes_with(gm, aten.full_like.default) == []


def _scale_pass() -> PatternPass:
    def search(x, s):
        return x * s

    def replace(x, s):
        return x / (1 / s)

    return PatternPass("scale", search, replace, [torch.empty(4)], scalars={"s": 1.0})


def test_replacement_computing_with_a_scalar_wildcard_uses_the_bound_value():
    x = randn(8, seed=7)[0]
    gm = trace(lambda t: t * 0.5, x)
    assert run_pass(_scale_pass(), gm).stats["matches"] == 1
    (div,) = nodes_with(gm, aten.div.Tensor)
    assert div.args[1] == 2.0 and nodes_with(gm, aten.mul.Tensor) == []
    # x / (1 / 0.5) == x * 0.5 up to one rounding of each operation.
    torch.testing.assert_close(gm(x), x * 0.5, rtol=1e-6, atol=1e-7)


def test_replacement_is_traced_per_bound_value():
    """Two matches binding different values each compute with their own."""
    x = randn(8, seed=8)[0]
    gm = trace(lambda t: (t * 0.5) * 0.25, x)
    assert run_pass(_scale_pass(), gm).stats["matches"] == 2
    assert sorted(n.args[1] for n in nodes_with(gm, aten.div.Tensor)) == [2.0, 4.0]
    torch.testing.assert_close(gm(x), (x * 0.5) * 0.25, rtol=1e-6, atol=1e-7)


def test_search_computing_with_a_scalar_wildcard_is_rejected():
    """`x * (s * 2)` holds the literal 2s, which no graph literal could bind s to."""
    with pytest.raises(ValueError, match=r"scalars \['s'\].*cannot bind"):
        Pattern(lambda x, s: x * (s * 2), lambda x, s: x * s * 2, [torch.empty(4)], scalars={"s": 1.0})


# -- (c) multi-output patterns --------------------------------------------------------------------


def _two_out_search(x, y, z):
    a = x * y
    return a + z, a - z


def _two_out_replace(x, y, z):
    # z + x*y and (-z) + x*y: the same values through other ops (addcmul, neg).
    return torch.addcmul(z, x, y), torch.addcmul(-z, x, y)


def _two_out_pass() -> PatternPass:
    return PatternPass("two_out", _two_out_search, _two_out_replace, [torch.empty(4) for _ in range(3)])


def _uses_both(x, y, z):
    a = x * y
    p = a + z
    q = a - z
    return p.relu(), q * 2, p + q


def _uses_both_reversed(x, y, z):
    a = x * y
    q = a - z  # the second output first in graph order
    p = a + z
    return p.relu(), q * 2, p + q


@pytest.mark.parametrize("fn", [_uses_both, _uses_both_reversed], ids=["in-order", "outputs-reversed"])
def test_multi_output_pattern_rewires_users_of_both_outputs(fn):
    inputs = randn(16, n=3, seed=8)
    gm = trace(fn, *inputs)
    relu, times_two, total = (node(gm, "relu"), graph_outputs(gm)[1], graph_outputs(gm)[2])
    p = _two_out_pass()
    assert run_pass(p, gm).stats["matches"] == 1
    assert op_counts(gm) == {
        "aten.addcmul.default": 2,
        "aten.neg.default": 1,
        "aten.relu.default": 1,
        "aten.mul.Tensor": 1,  # q * 2
        "aten.add.Tensor": 1,  # p + q
    }
    plus, minus = nodes_with(gm, aten.addcmul.default)
    assert nodes_with(gm, aten.neg.default)[0] is minus.args[0]
    # Users of the first output now read the first addcmul, users of the second the other one.
    assert relu.args[0] is plus
    assert times_two.args[0] is minus
    assert total.args[:2] == (plus, minus)
    assert_topological(gm)
    for got, want in zip(gm(*inputs), fn(*inputs)):
        torch.testing.assert_close(got, want, **ELEMENTWISE)


# -- (d) topological order after a rewrite --------------------------------------------------------


def _late_search(x, y, z, u):
    a = x * y
    return a + z, a - u


def _late_replace(x, y, z, u):
    return torch.addcmul(z, x, y), torch.addcmul(-u, x, y)


def _late_pass() -> PatternPass:
    return PatternPass("late", _late_search, _late_replace, [torch.empty(4) for _ in range(4)])


def _late_input(x, y, z, w):
    a = x * y
    p = a + z
    u = torch.sin(w)  # the second output's input, defined after the first output
    q = a - u
    return p * 2, q


def test_replacement_is_inserted_after_a_late_input():
    inputs = randn(16, n=4, seed=9)
    gm = trace(_late_input, *inputs)
    sin = nodes_with(gm, aten.sin.default)[0]
    assert run_pass(_late_pass(), gm).stats["matches"] == 1
    assert nodes_with(gm, aten.sub.Tensor) == [] and len(nodes_with(gm, aten.addcmul.default)) == 2
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    assert all(order[n] > order[sin] for n in nodes_with(gm, aten.addcmul.default))
    assert_topological(gm)
    for got, want in zip(gm(*inputs), _late_input(*inputs)):
        torch.testing.assert_close(got, want, **ELEMENTWISE)


def _late_input_used_early(x, y, z, w):
    a = x * y
    p = a + z
    r = p * 2  # uses the first output before the second output's input exists
    u = torch.sin(w)
    q = a - u
    return r, q


def test_no_insertion_point_is_refused_and_explained():
    inputs = randn(16, n=4, seed=10)
    gm = trace(_late_input_used_early, *inputs)
    anchor = nodes_with(gm, aten.add.Tensor)[0]
    p = _late_pass()
    why = p.explain(gm, anchor)
    assert "aten.sin.default" in why and "used earlier" in why
    before = op_counts(gm)
    assert run_pass(p, gm).stats["matches"] == 0
    assert op_counts(gm) == before
    assert_topological(gm)


def test_every_rms_norm_rewrite_of_a_real_graph_keeps_order():
    """A Llama-style graph with norms feeding matmuls and residual adds."""

    def block(x, w1, w2, proj):
        h = x + _norm_eps(x, w1, 1e-6) @ proj
        return h + _norm_eps(h, w2, 1e-5) @ proj.t()

    inputs = [*randn(3, 16, seed=11), *randn(16, n=2, seed=12), *randn(16, 16, seed=13)]
    gm = trace(block, *inputs)
    assert run_pass(fuse_rms_norm(), gm).stats["matches"] == 2
    assert op_counts(gm).get("aten.rsqrt.default", 0) == 0
    assert_topological(gm)
    # Two matmuls of 16 terms around the norms: the norms are identical computations, so any
    # difference is reduction order inside rms_norm (~1e-6 relative), amplified by |proj| ~ 4.
    torch.testing.assert_close(gm(*inputs), block(*inputs), rtol=1e-5, atol=1e-5)


# -- (e) no rewrite across a mutation -------------------------------------------------------------


def _fma_search(x, y, z):
    return x * y + z


def _fma_replace(x, y, z):
    return torch.addcmul(z, x, y)


def _fma_pass() -> PatternPass:
    return PatternPass("fma", _fma_search, _fma_replace, [torch.empty(4) for _ in range(3)])


def _mutate_add(x, y, z, w):
    a = x * y
    x.add_(1)  # moving x * y below this would read the updated x
    return a + z


def _mutate_copy(x, y, z, w):
    a = x * y
    x.copy_(w)
    return a + z


def _no_mutation(x, y, z, w):
    a = x * y
    return a + z


def _mutation_before(x, y, z, w):
    x.add_(1)  # before the whole match: nothing moves across it
    a = x * y
    return a + z


@pytest.mark.parametrize(
    "fn, mutation",
    [(_mutate_add, aten.add_.Tensor), (_mutate_copy, aten.copy_.default)],
    ids=["add_", "copy_"],
)
def test_match_across_a_mutation_is_refused_and_explained(fn, mutation):
    inputs = randn(16, n=4, seed=12)
    gm = trace(fn, *[t.clone() for t in inputs])
    (mutating,) = nodes_with(gm, mutation)
    anchor = graph_outputs(gm)[0]
    p = _fma_pass()
    why = p.explain(gm, anchor)
    assert "mutation" in why and str(mutation) in why and mutating.name in why
    before = op_counts(gm)
    assert run_pass(p, gm).stats["matches"] == 0
    assert op_counts(gm) == before
    got = gm(*[t.clone() for t in inputs])
    want = fn(*[t.clone() for t in inputs])
    torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("fn", [_no_mutation, _mutation_before], ids=["no-mutation", "mutation-before"])
def test_same_pattern_is_rewritten_when_no_mutation_lies_inside(fn):
    inputs = randn(16, n=4, seed=12)
    gm = trace(fn, *[t.clone() for t in inputs])
    assert run_pass(_fma_pass(), gm).stats["matches"] == 1
    assert len(nodes_with(gm, aten.addcmul.default)) == 1
    assert_topological(gm)
    torch.testing.assert_close(gm(*[t.clone() for t in inputs]), fn(*[t.clone() for t in inputs]), **ELEMENTWISE)


def test_mutation_in_a_hand_built_graph_is_refused():
    """The same refusal on a graph built with fx.Graph: a = x*y; copy_(x, w); out = a + z."""
    x, y, z, w = randn(16, n=4, seed=13)
    traced = trace(_no_mutation, x, y, z, w)  # for FakeTensor metadata of the same shapes
    g = fx.Graph()
    ph = {name: g.placeholder(name) for name in "xyzw"}
    a = g.call_function(aten.mul.Tensor, (ph["x"], ph["y"]))
    cp = g.call_function(aten.copy_.default, (ph["x"], ph["w"]))
    out = g.call_function(aten.add.Tensor, (a, ph["z"]))
    g.output(out)
    val = next(n for n in traced.graph.nodes if n.op == "placeholder").meta["val"]
    for n in g.nodes:
        if n.op != "output":
            n.meta["val"] = val  # every value here is a float32[16]
    gm = fx.GraphModule(torch.nn.Module(), g)
    p = _fma_pass()
    why = p.explain(gm, out)
    assert "mutation" in why and "aten.copy_.default" in why and cp.name in why
    assert run_pass(p, gm).stats["matches"] == 0
    assert nodes_with(gm, aten.addcmul.default) == []
    xc = x.clone()
    torch.testing.assert_close(gm(xc, y, z, w), x * y + z, rtol=0, atol=0)
    torch.testing.assert_close(xc, w, rtol=0, atol=0)  # the copy_ still happens


# -- (f) commutative operands ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "fn",
    [
        lambda x, w: w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)),
        lambda x, w: (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)) * w,
        lambda x, w: w * (torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * x),
        lambda x, w: (torch.rsqrt(1e-6 + x.pow(2).mean(-1, keepdim=True)) * x) * w,
    ],
    ids=["w*(x*r)", "(x*r)*w", "w*(r*x)", "(r*x)*w,eps+mean"],
)
def test_commutative_operands_match_in_either_order(fn):
    x, w = randn(3, 16, seed=14)[0], randn(16, seed=15)[0]
    gm = trace(fn, x, w)
    p = fuse_rms_norm()
    assert p.explain(gm, graph_outputs(gm)[0]).startswith("matches")
    assert run_pass(p, gm).stats["matches"] == 1
    (fused,) = nodes_with(gm, torch.ops.compiler.rms_norm.default)
    # Operands bound by role, not position: x (the 2-D input) first, then the weight.
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    assert fused.args[:2] == tuple(placeholders) and fused.args[2] == 1e-6
    torch.testing.assert_close(gm(x, w), fn(x, w), **RMS)


def test_commutative_operands_of_a_custom_pattern():
    inputs = randn(16, n=3, seed=16)
    for fn in (lambda x, y, z: x * y + z, lambda x, y, z: z + y * x):
        gm = trace(fn, *inputs)
        assert run_pass(_fma_pass(), gm).stats["matches"] == 1
        (fused,) = nodes_with(gm, aten.addcmul.default)
        x, y, z = [n for n in gm.graph.nodes if n.op == "placeholder"]
        assert fused.args[0] is z and set(fused.args[1:]) == {x, y}
        torch.testing.assert_close(gm(*inputs), fn(*inputs), **ELEMENTWISE)


def test_a_non_commutative_op_does_not_match_swapped():
    """sub is not commutative: x*y - z must not match z - x*y."""

    def search(x, y, z):
        return x * y - z

    def replace(x, y, z):
        return torch.addcmul(-z, x, y)

    p = PatternPass("fms", search, replace, [torch.empty(4) for _ in range(3)])
    inputs = randn(16, n=3, seed=17)
    gm = trace(lambda x, y, z: z - x * y, *inputs)
    assert run_pass(p, gm).stats["matches"] == 0
    assert nodes_with(gm, aten.addcmul.default) == []


def test_pattern_construction_errors():
    with pytest.raises(ValueError, match="scalars"):
        Pattern(_affine_search, _affine_replace, [torch.empty(4)], scalars={"nope": 1.0})
    with pytest.raises(ValueError, match="example inputs"):
        Pattern(_fma_search, _fma_replace, [torch.empty(4)])
    with pytest.raises(ValueError, match="replacement"):
        PatternPass("p", _fma_search, None, [torch.empty(4) for _ in range(3)])
    with pytest.raises(ValueError, match="no pattern"):
        PatternPass("p")


def test_pattern_traced_from_one_example_tensor_repeated_still_has_distinct_inputs():
    example = torch.empty(4)
    p = PatternPass("fma", _fma_search, _fma_replace, [example] * 3)
    inputs = randn(16, n=3, seed=18)
    gm = trace(lambda x, y, z: x * y + z, *inputs)
    assert run_pass(p, gm).stats["matches"] == 1
    torch.testing.assert_close(gm(*inputs), inputs[0] * inputs[1] + inputs[2], **ELEMENTWISE)
