"""ShiftAddLLM reparameterization: the storage format, the quantizers, the bit allocation and
the `shift_add` pass on tiny models, against exact references."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

import compiler
from compiler.errors import UserInputError
from compiler.ops import shift_add as ops
from compiler.passes.shift_add import allocate, linear_sites, rtn_quantize, shift_add_quantize
from compiler.passes.shift_add import quantize as Q
from compiler.passes.shift_add.quantize import relative_output_error
from tests.models import FunctionModule, logits, tiny_gpt2, tiny_llama, token_inputs

# -- format -----------------------------------------------------------------------------------


def test_signs_pack_and_unpack_round_trip_in_the_documented_bit_order() -> None:
    signs = torch.randn(3, 5, 24) > 0
    packed = ops.pack_signs(signs)
    assert packed.shape == (3, 5, 3) and packed.dtype == torch.uint8
    assert torch.equal(ops.unpack_signs(packed), signs.float() * 2 - 1)
    # element 8c + j is bit j of byte c
    one = torch.zeros(16, dtype=torch.bool)
    one[10] = True
    assert ops.pack_signs(one).tolist() == [0, 1 << 2]


def test_every_scale_code_round_trips_and_encoding_is_nearest() -> None:
    codes = torch.arange(256).to(torch.uint8)
    factors = ops.scale_factors(codes)
    assert torch.equal(ops.encode_scales(factors), codes)
    assert bool((factors[1:] > factors[:-1]).all())  # one code per value, increasing
    x = torch.rand(20000) * 1.8 + 2.0 ** -20
    got = ops.scale_factors(ops.encode_scales(x))
    # nearest on the grid: no representable factor is closer to x than the encoded one
    dist = (factors[None, :] - x[:, None]).abs().min(-1).values
    assert torch.allclose((got - x).abs(), dist)
    # a three-bit mantissa: relative error at most half a step, 1/16
    assert float(((got - x) / x).abs().max()) <= 1 / 16 + 1e-6


def _random_weight(q: int, n: int, k: int, group: int, seed: int = 0) -> ops.ShiftAddWeight:
    gen = torch.Generator().manual_seed(seed)
    planes = torch.randint(0, 256, (q, n, k // 8), generator=gen, dtype=torch.int32).to(torch.uint8)
    scales = torch.randint(200, 256, (q, n, k // group), generator=gen, dtype=torch.int32).to(torch.uint8)
    return ops.ShiftAddWeight(planes, scales, torch.rand(n, generator=gen) + 0.5)


@pytest.mark.parametrize("q,group", [(1, 8), (3, 16), (4, 32)])
def test_lookup_table_algorithm_equals_the_dense_reference(q: int, group: int) -> None:
    w = _random_weight(q, 24, 64, group)
    x = torch.randn(5, 64)
    ref = ops.shiftadd_linear(x, w.planes, w.scales, w.row_scale)
    dense = x @ w.dense().t()
    assert torch.allclose(ref, dense, rtol=1e-5, atol=1e-5)
    # the kernels' algorithm (tables of 8-element signed sums): the same sum in another
    # order, so fp32 rounding of K terms of magnitude |x| * max|W|: 1e-5 relative is ample
    lut = ops.lookup_linear(x, w.planes, w.scales, w.row_scale)
    assert torch.allclose(lut, ref, rtol=1e-5, atol=1e-4 * float(ref.abs().max()))


def test_the_op_names_an_inconsistent_weight() -> None:
    w = _random_weight(2, 8, 32, 16)
    with pytest.raises(ValueError, match="scales must be uint8"):
        ops.shiftadd_linear(torch.randn(1, 32), w.planes, w.scales.to(torch.int8), w.row_scale)
    with pytest.raises(ValueError, match="input features"):
        ops.shiftadd_linear(torch.randn(1, 40), w.planes, w.scales, w.row_scale)


# -- quantizers -------------------------------------------------------------------------------


def test_one_bit_binary_coding_is_the_closed_form_optimum() -> None:
    w = torch.randn(50, 64)
    alpha, signs = Q.fit_bcq(w, 1)
    assert torch.equal(signs[..., 0], torch.where(w >= 0, 1.0, -1.0))
    assert torch.allclose(alpha[:, 0], w.abs().mean(-1), rtol=1e-5)


def test_alternating_fit_beats_the_greedy_start_and_brute_force_signs_are_optimal() -> None:
    torch.manual_seed(0)
    w = torch.randn(200, 32)
    alpha, signs = Q.fit_bcq(w, 3, iterations=0)  # the better start, no refinement
    refined_alpha, refined = Q.fit_bcq(w, 3)
    assert float(Q._error(w, refined, refined_alpha).sum()) <= float(Q._error(w, signs, alpha).sum())
    # given alphas, nearest() is the exhaustive optimum over the 8 sign patterns per weight
    combos = torch.tensor(list(itertools.product((-1.0, 1.0), repeat=3)))
    values = refined_alpha @ combos.t()  # [R, 8]
    best = (w[:, :, None] - values[:, None, :]).abs().min(-1).values
    got = (w - (Q.nearest(w, refined_alpha) * refined_alpha[:, None, :]).sum(-1)).abs()
    assert torch.allclose(got, best, atol=1e-6)


def _correlated_inputs(k: int, n: int = 2048, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    mix = torch.eye(k) + 0.5 * torch.randn(k, k, generator=gen) / math.sqrt(k)
    return torch.randn(n, k, generator=gen) @ mix * torch.linspace(0.2, 3.0, k)  # uneven channel scales


@pytest.mark.parametrize("bits", [2, 3])
def test_output_error_compensation_beats_weight_only_and_round_to_nearest(bits: int) -> None:
    torch.manual_seed(1)
    w = torch.randn(64, 128) * 0.05
    x = _correlated_inputs(128)
    h = x.t() @ x
    plain = shift_add_quantize(w, bits, 32)
    compensated = shift_add_quantize(w, bits, 32, h)
    rtn = rtn_quantize(w, bits, 32)
    # the recorded error is the relative output error on the calibration inputs
    out_err = float(((x @ (compensated.weight.dense() - w).t()).pow(2).sum() / (x @ w.t()).pow(2).sum()))
    assert compensated.output_error == pytest.approx(out_err, rel=1e-3)
    assert compensated.output_error < relative_output_error(w, plain.weight.dense(), h)
    assert compensated.output_error < relative_output_error(w, rtn.dense, h)


def test_packed_bytes_are_q_bits_per_weight_plus_a_byte_per_group_and_plane() -> None:
    q = shift_add_quantize(torch.randn(96, 192), 3, 64)
    assert q.weight.planes.shape == (3, 96, 24) and q.weight.scales.shape == (3, 96, 3)
    assert q.weight.nbytes == 96 * 192 * 3 // 8 + 3 * 96 * 3 + 4 * 96
    assert rtn_quantize(torch.randn(96, 192), 3, 64).nbytes == 96 * 192 * 3 // 8 + 96 * 3 * 4


def test_allocation_spends_the_budget_where_error_drops_most() -> None:
    errors = {0: {2: 1.0, 3: 0.2, 4: 0.1}, 1: {2: 0.1, 3: 0.09, 4: 0.08}, 2: {2: 0.5, 3: 0.2, 4: 0.05}}
    sizes = {0: 100, 1: 100, 2: 100}
    assert allocate(errors, sizes, 2.0) == {0: 2, 1: 2, 2: 2}
    assert allocate(errors, sizes, 4.0) == {0: 4, 1: 4, 2: 4}
    chosen = allocate(errors, sizes, 3.0)
    assert sum(chosen[i] * sizes[i] for i in chosen) <= 3.0 * 300
    # brute force over all 27 allocations within the budget: greedy finds the optimum here
    best = min(
        (dict(zip(errors, bits)) for bits in itertools.product((2, 3, 4), repeat=3) if sum(bits) * 100 <= 900),
        key=lambda a: sum(errors[i][b] for i, b in a.items()),
    )
    assert chosen == best


# -- the pass ---------------------------------------------------------------------------------


def _calibration(window: int, count: int) -> list[dict[str, torch.Tensor]]:
    return [{"input_ids": token_inputs(window, seed=300 + i)["input_ids"]} for i in range(count)]


def _compile(model: torch.nn.Module, inputs: dict, **options: object) -> compiler.CompiledModule:
    from compiler.passes import default_pipeline
    from compiler.passes.shift_add import ShiftAdd

    pipeline = default_pipeline()
    pipeline.passes[pipeline.names().index("shift_add")] = ShiftAdd(calibration_length=32, calibration_count=4, say=lambda msg: None, **options)
    return compiler.compile(model, inputs, target="host", budget="ppl:+50%", pipeline=pipeline, calibration=_calibration, passes="shift_add")


def _record(compiled: compiler.CompiledModule) -> object:
    return next(r for r in compiled.result.records if r.name == "shift_add")


@pytest.mark.parametrize("build", [tiny_llama, tiny_gpt2])
def test_pass_rewrites_every_linear_layer_and_equals_the_dense_reconstruction(build, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("COMPILER_CACHE_DIR", str(tmp_path))
    model = build()
    inputs = {"input_ids": token_inputs(16)["input_ids"]}
    compiled = _compile(model, inputs, bits=3, group=32)
    record = _record(compiled)
    assert record.status == "ran"
    layers = record.result.stats["layers"]
    # every linear layer: Llama 7 per block plus its own LM head; GPT-2 4 per block, and not
    # the LM head tied to the embedding (its fp copy would stay)
    assert len(layers) == (15 if build is tiny_llama else 8)
    assert any("tied" in str(left["why"]) for left in record.result.stats["left"]) == (build is tiny_gpt2)
    # reference: the eager model with every reparameterized weight replaced by its dense form
    reference = build()
    state = reference.state_dict()
    for layer in layers:
        planes, scales, rows = (getattr(compiled.result.ir, f"_shift_add_{layer['index']}_{p}") for p in ("planes", "scales", "row_scale"))
        dense = ops.dense_weight(planes, scales, rows)
        stored = state[layer["layer"]]
        state[layer["layer"]] = dense.t().contiguous() if layer["transposed"] else dense
        assert state[layer["layer"]].shape == stored.shape
    reference.load_state_dict(state)
    with torch.no_grad():
        expected = logits(reference(**inputs))
        got = logits(compiled(**inputs))
    # the same products summed in another order (fp32): tolerance of a few ulps of the logits
    assert torch.allclose(got, expected, rtol=1e-4, atol=1e-4)
    # the stats: packed bytes against fp16, as the formula of the format says
    stats = record.result.stats
    assert stats["ratio_vs_fp16"] == pytest.approx(stats["fp16_bytes"] / stats["weight_bytes"], rel=1e-3)
    expected_bytes = sum(n * k * 3 // 8 + 3 * n * (k // 32) + 4 * n for n, k in (row["shape"] for row in layers))
    assert stats["weight_bytes"] == expected_bytes
    assert stats["fp16_bytes"] == sum(2 * n * k for n, k in (row["shape"] for row in layers))


def test_pass_reuses_cached_weights(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("COMPILER_CACHE_DIR", str(tmp_path))
    inputs = {"input_ids": token_inputs(16)["input_ids"]}
    first = _compile(tiny_llama(), inputs, bits=2, group=32)
    cached = len(list((tmp_path / "shift_add").glob("*.safetensors")))
    assert cached == 9  # per shared input: (q, k, v), o, (gate, up), down in 2 blocks, and the head
    second = _compile(tiny_llama(), inputs, bits=2, group=32)
    assert len(list((tmp_path / "shift_add").glob("*.safetensors"))) == cached
    a = [row["output_error"] for row in _record(first).result.stats["layers"]]
    assert a == [row["output_error"] for row in _record(second).result.stats["layers"]]


def test_allocation_mode_meets_the_average_bits(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("COMPILER_CACHE_DIR", str(tmp_path))
    compiled = _compile(tiny_llama(), {"input_ids": token_inputs(16)["input_ids"]}, avg_bits=3.0, group=32)
    stats = _record(compiled).result.stats
    assert {row["bits"] for row in stats["layers"]} <= {2, 3, 4}
    assert stats["average_bits"] <= 3.0 + 1e-9


def test_pass_refuses_a_selected_matmul_whose_weight_is_not_constant() -> None:
    model = FunctionModule(lambda a, b: a @ b)
    with pytest.raises(UserInputError, match="not a constant"):
        from compiler.passes import default_pipeline
        from compiler.passes.shift_add import ShiftAdd

        pipeline = default_pipeline()
        pipeline.passes[pipeline.names().index("shift_add")] = ShiftAdd(only=("mm",), say=lambda msg: None)
        compiler.compile(model, (torch.randn(4, 16), torch.randn(16, 8)), target="host", pipeline=pipeline, passes="shift_add")


def test_linear_sites_find_llama_and_gpt2_layouts() -> None:
    from compiler.capture import capture_export

    for build, count in ((tiny_llama, 15), (tiny_gpt2, 9)):
        gm = capture_export(build(), (), {"input_ids": token_inputs(8)["input_ids"]}).gm
        sites, _ = linear_sites(gm)
        assert len(sites) == count  # the blocks' layers plus the LM head
        for site in sites:
            w = site.matrix(gm)
            assert w.shape[1] == site.x.meta["val"].shape[-1]  # [N, K] whatever the storage
