"""Layer skipping: the block finder, static skipping against models edited by hand, the ways of
choosing how many units go, and SkipDecode's exit graphs against truncated eager models."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from compiler.analysis.blocks import find_blocks
from compiler.calibration import Calibration
from compiler.capture import capture_export
from compiler.errors import UserInputError
from compiler.generation import CachedLM, compile_cached
from compiler.ir import copy_graph_module
from compiler.passes.layer_skip import LayerSkip, apply_skips
from compiler.passes.layer_skip.dynamic import ExitSchedule, compile_skip_decode, exit_graph
from compiler.passes.layer_skip.static import _quality
from compiler.passes.pipeline import PassContext
from tests.models import VOCAB, tiny_gpt2, tiny_llama, token_inputs


def _deep_llama(layers: int = 6, seed: int = 0) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    return LlamaForCausalLM(config).eval()


class _ZeroAttention(torch.nn.Module):
    def forward(self, hidden_states, *args, **kwargs):
        return torch.zeros_like(hidden_states), None


class _ZeroMLP(torch.nn.Module):
    def forward(self, x):
        return torch.zeros_like(x)


def _by_hand(model: torch.nn.Module, names: list[str]) -> torch.nn.Module:
    """`model` with the named units removed in eager PyTorch: a skipped sublayer adds zero to
    the residual stream; a skipped block is deleted from the layer list."""
    ref = copy.deepcopy(model)
    gpt2 = hasattr(ref, "transformer")
    layers = ref.transformer.h if gpt2 else ref.model.layers
    dropped = []
    for name in names:
        kind, index = name.rstrip("0123456789"), int(name[len(name.rstrip("0123456789")) :])
        if kind == "attention":
            setattr(layers[index], "attn" if gpt2 else "self_attn", _ZeroAttention())
        elif kind == "mlp":
            layers[index].mlp = _ZeroMLP()
        else:
            dropped.append(index)
    kept = torch.nn.ModuleList([layer for i, layer in enumerate(layers) if i not in dropped])
    if gpt2:
        ref.transformer.h = kept
    else:
        ref.model.layers = kept
    return ref


def _captured(model: torch.nn.Module, length: int = 12):
    inputs = token_inputs(length)
    captured = capture_export(model, (), inputs)
    return captured, inputs, captured.flatten_inputs((), inputs)


def _logits(captured, gm, flat) -> torch.Tensor:
    with torch.no_grad():
        return captured.unflatten_outputs(gm(*flat)).logits


# -- the block finder ------------------------------------------------------------------------------


@pytest.mark.parametrize("builder", [tiny_llama, tiny_gpt2])
def test_finder_sees_every_block_and_sublayer(builder):
    captured, _, _ = _captured(builder())
    found = find_blocks(captured.gm)
    assert [s.name for s in found.sublayers] == ["attention0", "mlp0", "attention1", "mlp1"]
    assert [b.index for b in found.blocks] == [0, 1]
    assert all(s.attention is not None for s in found.of_kind("attention"))
    # consecutive sublayers share the stream value between them
    for a, b in zip(found.sublayers, found.sublayers[1:]):
        assert a.output is b.input


def test_finder_gives_cached_keys_and_values_to_their_attention_sublayer():
    lm = CachedLM.capture(tiny_llama())
    for gm in (lm.prefill.gm, lm.decode.gm):
        found = find_blocks(gm)
        # flat outputs: logits, keys_0, keys_1, values_0, values_1
        assert {s.name: s.side_outputs for s in found.sublayers if s.side_outputs} == {"attention0": [1, 3], "attention1": [2, 4]}


def test_finder_reports_a_post_norm_model_as_blockless():
    torch.manual_seed(0)
    lin = [torch.nn.Linear(16, 16) for _ in range(3)]
    norm = torch.nn.LayerNorm(16)

    class PostNorm(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin, self.norm = torch.nn.ModuleList(lin), norm

        def forward(self, x):
            for f in self.lin:
                x = self.norm(x + f(x))
            return x

    captured = capture_export(PostNorm(), (torch.randn(2, 5, 16),), {})
    found = find_blocks(captured.gm)
    assert found.sublayers == [] and "post-norm" in found.reason


# -- static skipping equals the model edited by hand ------------------------------------------------


def test_skipping_nothing_leaves_the_graph_and_its_output_unchanged():
    captured, _, flat = _captured(tiny_llama())
    gm = copy.deepcopy(captured.gm)
    before = _logits(captured, gm, flat)
    result = LayerSkip(kind="attention", count=0).run(gm, PassContext(target="host"))
    assert not result.changed and result.stats["predicted_speedup"] == 1.0
    assert len(gm.graph.nodes) == len(captured.gm.graph.nodes)
    assert torch.equal(_logits(captured, gm, flat), before)


@pytest.mark.parametrize("builder", [tiny_llama, tiny_gpt2])
@pytest.mark.parametrize(
    ("kind", "names"),
    [("attention", ["attention1"]), ("mlp", ["mlp0"]), ("attention", ["attention0", "attention1"]), ("block", ["block0"]), ("block", ["block1"])],
)
def test_skipped_units_equal_the_model_with_them_removed_by_hand(builder, kind, names):
    model = builder()
    captured, inputs, flat = _captured(model)
    gm = copy.deepcopy(captured.gm)
    result = LayerSkip(kind=kind, names=names).run(gm, PassContext(target="host"))
    assert result.stats["skipped"] == names
    with torch.no_grad():
        expected = _by_hand(model, names)(**inputs, use_cache=False).logits
        full = model(**inputs).logits
    got = _logits(captured, gm, flat)
    # the same ops on the same values, minus the skipped ones: equal to fp32 rounding
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert (got - full).abs().max() > 1e-3  # and the skip did change the model
    assert result.stats["predicted_speedup"] > 1.0


# -- how many and which -------------------------------------------------------------------------------


def test_block_similarity_equals_the_cosine_of_hf_hidden_states():
    model = _deep_llama()
    ids = torch.randint(0, VOCAB, (3, 1, 16), generator=torch.Generator().manual_seed(1))
    captured, _, _ = _captured(model, 16)
    calibration = Calibration(lambda window, count: [{"input_ids": i, "attention_mask": torch.ones_like(i)} for i in ids[:count]]).with_flatten(captured.flatten_example)
    gm = copy.deepcopy(captured.gm)
    result = LayerSkip(kind="block", count=1).run(gm, PassContext(target="host", calibration_data=calibration))
    sims = {u["name"]: u["similarity"] for u in result.stats["units"]}
    with torch.no_grad():
        hidden = [model(input_ids=i, output_hidden_states=True).hidden_states for i in ids]
    # HF's last hidden state is after the final norm: blocks 0..4 only
    cosines = {f"block{b}": float(torch.cat([torch.nn.functional.cosine_similarity(h[b], h[b + 1], dim=-1) for h in hidden]).mean()) for b in range(5)}
    for name, value in cosines.items():
        assert sims[name] == pytest.approx(value, abs=1e-5)
    most = max(sims, key=sims.get)
    assert result.stats["skipped"] == [most]


def test_unified_skipping_spreads_units_evenly_between_the_kept_ends():
    captured, _, _ = _captured(_deep_llama(8))
    gm = copy.deepcopy(captured.gm)
    result = LayerSkip(kind="attention", method="unified", count=3).run(gm, PassContext(target="host"))
    # middle units 1..6; the middles of three equal stretches of six are at offsets 1, 3, 5
    assert result.stats["skipped"] == ["attention2", "attention4", "attention6"]
    with pytest.raises(UserInputError, match="at most 6"):
        LayerSkip(kind="attention", method="unified", count=7).run(copy.deepcopy(captured.gm), PassContext(target="host"))


def test_speedup_mode_takes_the_fewest_units_that_reach_the_target():
    captured, _, _ = _captured(_deep_llama(8))
    ctx = PassContext(target="host")
    predicted = []
    for n in range(7):
        r = LayerSkip(kind="mlp", method="unified", count=n).run(copy.deepcopy(captured.gm), ctx)
        predicted.append(r.stats["predicted_speedup"])
    assert predicted == sorted(predicted)
    target = (predicted[3] + predicted[4]) / 2
    r = LayerSkip(kind="mlp", method="unified", speedup=target).run(copy.deepcopy(captured.gm), ctx)
    assert len(r.stats["skipped"]) == 4
    assert r.stats["predicted_speedup"] == pytest.approx(predicted[4])
    with pytest.warns(UserWarning, match="out of reach"):
        r = LayerSkip(kind="mlp", method="unified", speedup=100.0).run(copy.deepcopy(captured.gm), ctx)
    assert not r.changed


def _smollm2_calibrated(smollm2, window: int):
    """SmolLM2 captured at one calibration window: (captured, calibration, flat inputs, the
    unmodified graph's (ids, logits) per window)."""
    batches = smollm2.calibration_batches(window=window, count=1)
    captured = capture_export(smollm2.model(), (), batches[0])
    calibration = Calibration(lambda window, count: batches[:count]).with_flatten(captured.flatten_example)
    flat = [captured.flatten_example(b) for b in batches]
    with torch.no_grad():
        reference = [(f[0], captured.gm(*f)[0].float()) for f in flat]
    return captured, calibration, flat, reference


def test_budget_mode_takes_the_most_units_within_the_budget(smollm2):
    # a trained model, so that quality falls as attention goes
    captured, calibration, flat, reference = _smollm2_calibrated(smollm2, window=32)
    # the quality of every count, in the pass's own order (by similarity)
    ranked = LayerSkip(kind="attention", count=30).run(copy_graph_module(captured.gm), PassContext(target="host", calibration_data=calibration)).stats["skipped"]
    costs = []
    for n in range(31):
        gm = copy_graph_module(captured.gm)
        found = {s.name: s for s in find_blocks(gm).sublayers}
        apply_skips(gm, [found[name] for name in ranked[:n]])
        costs.append(_quality(gm, flat, reference)[0])
    # a budget that every count up to n fits and every larger count exceeds: the answer is n
    splits = [i for i in range(1, 30) if max(costs[: i + 1]) < min(costs[i + 1 :])]
    assert splits, f"no count separates the quality costs {costs}"
    n = splits[len(splits) // 2]
    limit = (max(costs[: n + 1]) + min(costs[n + 1 :])) / 2
    gm = copy_graph_module(captured.gm)
    result = LayerSkip(kind="attention").run(gm, PassContext(target="host", budget=f"ppl:+{limit * 100:.6f}%", calibration_data=calibration))
    assert result.stats["skipped"] == ranked[:n]
    assert result.stats["calibration_quality"][str(n)]["ppl_increase"] == pytest.approx(costs[n], abs=1e-9)


def test_greedy_order_is_the_argmin_of_measured_perplexity_at_each_step(smollm2):
    # the greedy method against a brute force written here: step 1 removes the single attention
    # sublayer that costs the least calibration perplexity; step 2 the one that, added to it,
    # costs the least; the budget mode stops at the first prefix that does not fit
    captured, calibration, flat, reference = _smollm2_calibrated(smollm2, window=48)

    def quality(names: list[str]) -> tuple[float, float]:
        gm = copy_graph_module(captured.gm)
        found = {s.name: s for s in find_blocks(gm).sublayers}
        apply_skips(gm, [found[n] for n in names])
        return _quality(gm, flat, reference)

    names = [s.name for s in find_blocks(captured.gm).of_kind("attention")]
    single = {n: quality([n]) for n in names}
    first = min(single, key=lambda n: single[n][0])
    pair = {n: quality([first, n]) for n in names if n != first}
    second = min(pair, key=lambda n: pair[n][0])

    # an agreement budget between the two prefixes' agreements: the pass grows its order to two
    # steps and keeps exactly the first (the perplexity of the best removals can fall below the
    # full model's on short windows, so the budget is on agreement)
    one, two = single[first][1], pair[second][1]
    assert one > two, (one, two)
    budgeted = LayerSkip(kind="attention", method="greedy", say=lambda _: None).run(
        copy_graph_module(captured.gm), PassContext(target="host", budget=f"agreement:{(one + two) / 2 * 100:.6f}%", calibration_data=calibration)
    )
    assert budgeted.stats["skipped"] == [first]
    assert budgeted.stats["method_used"] == "greedy"
    q = budgeted.stats["calibration_quality"]
    assert q["1"]["unit"] == first and q["1"]["ppl_increase"] == pytest.approx(single[first][0], abs=1e-9)
    assert q["2"]["unit"] == second and q["2"]["top1_agreement"] == pytest.approx(two, abs=1e-9)
    with pytest.raises(UserInputError, match="calibration inputs"):
        LayerSkip(method="greedy", count=1).run(copy_graph_module(captured.gm), PassContext(target="host"))


def test_bad_options_name_the_problem():
    with pytest.raises(UserInputError, match="at most one of"):
        LayerSkip(count=2, fraction=0.5)
    with pytest.raises(UserInputError, match="kind must be one of"):
        LayerSkip(kind="heads")
    captured, _, _ = _captured(tiny_llama())
    with pytest.raises(UserInputError, match="no attention unit named attention9"):
        LayerSkip(names=["attention9"]).run(copy.deepcopy(captured.gm), PassContext(target="host"))
    with pytest.raises(UserInputError, match="calibration data"):
        LayerSkip().run(copy.deepcopy(captured.gm), PassContext(target="host", budget="ppl:+5%"))


# -- explicit-cache graphs ----------------------------------------------------------------------------


def _greedy_reference(model: torch.nn.Module, prompt: torch.Tensor, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy tokens and the logits before each, by eager full-sequence forwards."""
    ids, tokens, logits = prompt, [], []
    with torch.no_grad():
        for _ in range(steps):
            out = model(input_ids=ids, use_cache=False).logits[:, -1]
            logits.append(out)
            tokens.append(out.argmax(-1))
            ids = torch.cat([ids, tokens[-1][:, None]], 1)
    return torch.stack(tokens, 1), torch.stack(logits, 1)


def test_statically_skipped_attention_drops_its_cache_and_generates_like_the_edited_model():
    model = _deep_llama(4)
    lm = CachedLM.capture(model)
    names = ["attention1", "attention2"]
    compiled = compile_cached(lm, budget="ppl:+100%", passes=[LayerSkip(kind="attention", names=names)])
    session = compiled.session()
    prompt = torch.randint(0, VOCAB, (1, 10), generator=torch.Generator().manual_seed(3))
    tokens = session.generate(prompt, 6)
    expected, _ = _greedy_reference(_by_hand(model, names), prompt, 6)
    assert torch.equal(tokens, expected)
    cache = session.cache
    assert [k.shape[2] for k in cache.keys] == [15, 0, 0, 15]  # 10 prompt + 5 decoded; skipped layers hold none
    assert cache.length == 15


def test_schedule_is_monotone_on_the_stride_grid():
    s = ExitSchedule(max_blocks=30, min_blocks=18, span=100, stride=3)
    exits = [s.blocks_at(t) for t in range(150)]
    assert exits[0] == 30 and exits[-1] == 18
    assert all(a >= b for a, b in zip(exits, exits[1:]))
    assert set(exits) == set(s.exits()) == {30, 27, 24, 21, 18}
    assert s.blocks_at(50) == 24  # exact 24.0: on the grid
    with pytest.raises(UserInputError):
        ExitSchedule(max_blocks=4, min_blocks=5, span=3)


def test_exit_graph_equals_the_truncated_model_on_the_logits():
    model = _deep_llama(4)
    lm = CachedLM.capture(model)
    prompt = torch.randint(0, VOCAB, (1, 9), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        out = model(input_ids=prompt, use_cache=True)
    keys = [layer.keys for layer in out.past_key_values.layers]
    values = [layer.values for layer in out.past_key_values.layers]
    token = out.logits[:, -1].argmax(-1, keepdim=True)
    for blocks in (1, 2, 3):
        gm = exit_graph(lm.decode.gm, blocks)
        with torch.no_grad():
            flat = gm(token, torch.full((1, 1), 9), *keys, *values)
        # reference: the first `blocks` blocks over the whole sequence, then the final norm and head
        truncated = _by_hand(model, [f"block{b}" for b in range(blocks, 4)])
        with torch.no_grad():
            expected = truncated(input_ids=torch.cat([prompt, token], 1), use_cache=False).logits[:, -1]
        torch.testing.assert_close(flat[0][:, -1], expected, rtol=1e-4, atol=1e-4)
        # every layer still returns one new key and value
        assert all(t.shape[2] == 1 for t in flat[1:])


def test_skip_decode_session_follows_the_schedule_and_fills_every_layer():
    model = _deep_llama(4)
    lm = CachedLM.capture(model)
    schedule = ExitSchedule(max_blocks=4, min_blocks=2, span=4)
    skip = compile_skip_decode(lm, schedule, compile=False)
    session = skip.session()
    prompt = torch.randint(0, VOCAB, (1, 8), generator=torch.Generator().manual_seed(5))
    tokens = session.generate(prompt, 7)
    assert session.exits == [schedule.blocks_at(t) for t in range(6)] == [4, 3, 3, 2, 2, 2]
    assert all(k.shape[2] == 8 + 6 for k in session.cache.keys)
    # the first decode step runs every block: its token equals the full model's second token
    expected, _ = _greedy_reference(model, prompt, 2)
    assert torch.equal(tokens[:, :2], expected)
    assert math.isfinite(float(session.cache.keys[3].abs().sum()))
