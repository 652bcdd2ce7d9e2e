"""Explicit-cache decoding and the KIVI cache on a tiny Llama: the prefill/decode graphs
reproduce the model's own forward token by token, and the `kv_quantize` pass's graph reads
exactly the cache that `KIVICache` holds."""

from __future__ import annotations

import pytest
import torch

from compiler.driver import CompileOptions, compile_graph
from compiler.generation import CachedLM, Session
from compiler.ir import copy_graph_module
from compiler.kv_cache import FullCache, KIVICache, cache_for, fp16_bytes
from compiler.ops import kv_quant
from compiler.passes import default_pipeline
from compiler.passes.kv_cache import KVQuantize
from tests.models import tiny_llama, token_inputs

pytestmark = pytest.mark.usefixtures("kernel_cache_in_tmp")


@pytest.fixture(scope="module")
def llama() -> torch.nn.Module:
    return tiny_llama()


@pytest.fixture(scope="module")
def cached(llama: torch.nn.Module) -> CachedLM:
    return CachedLM.capture(llama)


def _compile(gm: torch.fx.GraphModule, *passes: object) -> object:
    pipeline = default_pipeline()
    for i, p in enumerate(passes):
        pipeline.passes.insert(1 + i, p)
    return compile_graph(copy_graph_module(gm), CompileOptions.make("host", budget="ppl:+5%", pipeline=pipeline))


def test_teacher_forced_decode_equals_the_forward(llama: torch.nn.Module, cached: CachedLM) -> None:
    ids = token_inputs(40, seed=3)["input_ids"]
    with torch.no_grad():
        expected = llama(ids).logits[:, 29:39]
    prefill, decode = _compile(cached.prefill.gm), _compile(cached.decode.gm)
    # the decode step's mask (keys 0..T, the query at T) is proven causal, aligned to the end
    canonical = next(r for r in decode.records if r.name == "canonicalize_causal_attention")
    assert len(canonical.result.changes) == 2 and all("after a cache" in c for c in canonical.result.changes)
    for run_prefill, run_decode in ((cached.prefill.gm, cached.decode.gm), (prefill.executable, decode.executable)):
        got = Session(run_prefill, run_decode, FullCache(2)).score(ids[:, :30], ids[:, 30:])
        # one forward vs 10 steps: the same math in another order (fp32, logits ~1)
        torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-4)


def test_greedy_generation_equals_hf_generate(llama: torch.nn.Module, cached: CachedLM) -> None:
    ids = token_inputs(12, seed=4)["input_ids"]
    with torch.no_grad():
        expected = llama.generate(ids, max_new_tokens=8, do_sample=False, attention_mask=torch.ones_like(ids))[:, 12:]
    assert torch.equal(Session(cached.prefill.gm, cached.decode.gm, FullCache(2)).generate(ids, 8), expected)


def test_decode_positions_are_an_input_not_the_cache_length(cached: CachedLM) -> None:
    """A cache that keeps fewer entries (eviction) still gives RoPE the true position."""
    ids = token_inputs(20, seed=5)["input_ids"]
    session = Session(cached.prefill.gm, cached.decode.gm, FullCache(2))
    session.prefill(ids[:, :16])
    keys, values = session.cache.keys, session.cache.values
    full = cached.decode.gm(ids[:, 16:17], torch.tensor([[16]]), *keys, *values)[0]
    moved = cached.decode.gm(ids[:, 16:17], torch.tensor([[17]]), *keys, *values)[0]
    assert not torch.allclose(full, moved)


def test_kivi_graph_reads_the_cache_kivi_holds(cached: CachedLM) -> None:
    """At every step, the quantized graph's logits equal the plain decode graph's given the
    fp keys and values the KIVI cache stands for (dequantized codes, then the residual)."""
    compiled = _compile(cached.decode.gm, KVQuantize(bits=4, k_group=4, v_group=8, residual=8))
    layout = compiled.ir.meta["kv_cache"]
    assert layout == {"kind": "kivi", "layers": 2, "bits": 4, "k_group": 4, "v_group": 8, "residual": 8, "sink": 0, "recent": 0}
    record = next(r for r in compiled.records if r.name == "kv_quantize")
    assert len(record.result.changes) == 2
    stats = record.result.stats
    # the plan records the memory: at 4096 tokens, 4-bit codes plus fp16 scale and min per 4
    # tokens per channel (keys) and per 8 channels per token (values), against 16 bits
    bits_per_element = 4 + (2 * 16 / 4 + 2 * 16 / 8) / 2
    assert stats["ratio_vs_fp16"] == pytest.approx(16 / bits_per_element, rel=1e-3)
    assert all(row["predicted_quantized_s"] > 0 and row["predicted_fp_s"] > 0 for row in stats["sites"])
    ops = [n.target for n in compiled.ir.graph.nodes]
    assert ops.count(kv_quant.quantized_kv_attention.overload) == 2
    ids = token_inputs(40, seed=6)["input_ids"]
    session = Session(cached.prefill.gm, compiled.executable, cache_for(layout, 2))
    logits = session.prefill(ids[:, :21])
    cache = session.cache
    assert isinstance(cache, KIVICache) and cache.quantized_tokens() == 16
    for i in range(12):
        keys = [torch.cat([kv_quant.dequantize_keys(q, 4), r], 2) for q, r in zip(cache.k_q, cache.k_res)]
        values = [torch.cat([kv_quant.dequantize_values(q, 4), r], 2) for q, r in zip(cache.v_q, cache.v_res)]
        token = ids[:, 21 + i]
        expected = cached.decode.gm(token[:, None], torch.tensor([[21 + i]]), *keys, *values)[0][:, -1]
        got = session.step(token)
        torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-4)
        # KIVI's schedule: fewer than `residual` recent tokens at full precision
        assert cache.quantized_tokens() % 8 == 0 and cache.k_res[0].shape[2] < 8
        assert cache.quantized_tokens() + cache.k_res[0].shape[2] == 22 + i
    assert logits.shape == (1, 128)


def test_kivi_sinks_stay_exact_and_the_graph_reads_them(cached: CachedLM) -> None:
    """With sink=2 the first two positions never quantize: they head the residual, the
    quantized blocks start after them, and the logits equal the plain graph's on the cache's
    fp equivalent at every step (a decode query sees every key, in any order)."""
    compiled = _compile(cached.decode.gm, KVQuantize(bits=2, k_group=4, v_group=8, residual=8, sink=2, recent=3))
    layout = compiled.ir.meta["kv_cache"]
    assert (layout["sink"], layout["recent"]) == (2, 3)
    ids = token_inputs(40, seed=8)["input_ids"]
    session = Session(cached.prefill.gm, compiled.executable, cache_for(layout, 2))
    session.prefill(ids[:, :21])
    cache = session.cache
    prompt_keys = [k for k in session.cache.k_res]
    for i in range(12):
        keys = [torch.cat([kv_quant.dequantize_keys(q, 2), r], 2) for q, r in zip(cache.k_q, cache.k_res)]
        values = [torch.cat([kv_quant.dequantize_values(q, 2), r], 2) for q, r in zip(cache.v_q, cache.v_res)]
        token = ids[:, 21 + i]
        expected = cached.decode.gm(token[:, None], torch.tensor([[21 + i]]), *keys, *values)[0][:, -1]
        torch.testing.assert_close(session.step(token), expected, atol=2e-5, rtol=1e-4)
        waiting = cache.k_res[0].shape[2] - 2
        assert cache.sinks == 2 and 3 <= waiting < 8 + 3 and cache.quantized_tokens() % 8 == 0
        assert cache.quantized_tokens() + cache.k_res[0].shape[2] == 22 + i
        assert all(torch.equal(r[:, :, :2], k[:, :, :2]) for r, k in zip(cache.k_res, prompt_keys))  # the sinks, exact


def test_kivi_sinks_fill_from_a_short_prompt() -> None:
    cache = KIVICache(1, bits=4, k_group=2, v_group=4, residual=4, sink=3)
    k = torch.randn(1, 1, 2, 8)
    cache.load([k], [k])
    assert cache.sinks == 2 and cache.quantized_tokens() == 0
    for _ in range(6):
        step = torch.randn(1, 1, 1, 8)
        cache.append([step], [step])
    # 8 tokens: 3 sinks, then one block of 4 quantized, then 1 waiting
    assert cache.sinks == 3 and cache.quantized_tokens() == 4 and cache.k_res[0].shape[2] == 4
    assert torch.equal(cache.k_res[0][:, :, :2], k)


def test_pass_predicts_the_bytes_the_cache_holds(cached: CachedLM) -> None:
    for options in ({}, {"sink": 4}, {"sink": 4, "recent": 16}):
        kv = KVQuantize(bits=4, k_group=32, v_group=8, residual=64, report_length=1000, **options)
        record = next(r for r in _compile(cached.decode.gm, kv).records if r.name == "kv_quantize")
        cache = KIVICache(2, 4, 32, 8, 64, **options)
        keys = [torch.randn(1, 2, 1000, 16) for _ in range(2)]
        cache.load(keys, keys)
        assert record.result.stats["cache_bytes"] == cache.nbytes()


def test_int8_cache_changes_logits_by_little(cached: CachedLM) -> None:
    from compiler.generation import compile_cached

    compiled = compile_cached(cached, budget="ppl:+5%", passes=[KVQuantize(bits=8, k_group=4, v_group=8, residual=4)])
    ids = token_inputs(40, seed=7)["input_ids"]
    fp = Session(cached.prefill.gm, cached.decode.gm, FullCache(2)).score(ids[:, :24], ids[:, 24:])
    q8 = compiled.session().score(ids[:, :24], ids[:, 24:])
    assert float((q8 - fp).abs().max()) < 0.02 * float(fp.abs().max())
    assert torch.equal(q8.argmax(-1), fp.argmax(-1))


def test_pass_leaves_graphs_without_a_cache_input_alone(cached: CachedLM) -> None:
    compiled = _compile(cached.prefill.gm, KVQuantize())
    record = next(r for r in compiled.records if r.name == "kv_quantize")
    assert not record.result.changes and "kv_cache" not in compiled.ir.meta
    assert any("not a decode step" in why for why in record.result.stats["left"])


def test_pass_is_skipped_under_a_lossless_budget(cached: CachedLM) -> None:
    pipeline = default_pipeline()
    pipeline.passes.insert(1, KVQuantize())
    result = compile_graph(copy_graph_module(cached.decode.gm), CompileOptions.make("host", pipeline=pipeline))
    record = next(r for r in result.records if r.name == "kv_quantize")
    assert record.status == "skipped" and "lossless" in record.reason


def test_kivi_bytes_are_codes_plus_fp16_scales_plus_the_residual() -> None:
    cache = KIVICache(3, bits=4, k_group=32, v_group=16, residual=64)
    keys = [torch.randn(1, 2, 200, 32) for _ in range(3)]
    cache.load(keys, [k.clone() for k in keys])
    quantized, residual, heads = 192, 8, 2  # whole residuals of 64 quantized, the rest at fp32
    codes = 2 * heads * quantized * 32 // 2  # 4-bit codes of keys and of values, 2 per byte
    key_scales = 2 * heads * (quantized // 32) * 32 * 2  # scale and min per 32 tokens per channel, fp16
    value_scales = 2 * heads * quantized * (32 // 16) * 2  # scale and min per 16 channels per token, fp16
    residual_bytes = 2 * heads * residual * 32 * 4  # residual keys and values, fp32
    assert cache.nbytes() == 3 * (codes + key_scales + value_scales + residual_bytes)
    assert fp16_bytes(3, 1, 2, 200, 32, 32) == 3 * 2 * 200 * 64 * 2


def test_kivi_refuses_a_residual_that_is_not_whole_key_groups() -> None:
    from compiler.errors import UserInputError

    with pytest.raises(UserInputError, match="multiple of the key group"):
        KIVICache(2, k_group=32, residual=48)
    with pytest.raises(UserInputError, match="bits must be one of"):
        KVQuantize(bits=3)


# -- eviction ----------------------------------------------------------------------------------


def test_key_scores_are_the_attention_each_key_receives() -> None:
    gen = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 4, 6, 8, generator=gen), torch.randn(1, 2, 10, 8, generator=gen)
    got = torch.ops.compiler.attention_key_scores(q, k, 0.4, 3)
    expected = torch.zeros(1, 2, 10)
    for h in range(4):
        for i in range(3, 6):  # the last 3 of 6 queries, at positions 7, 8, 9 of 10 keys
            p = torch.softmax(q[0, h, i] @ k[0, h // 2].T * 0.4 + torch.where(torch.arange(10) <= i + 4, 0.0, float("-inf")), -1)
            expected[0, h // 2] += p
    torch.testing.assert_close(got, expected)
    assert torch.allclose(torch.ops.compiler.attention_key_scores(q, k, 0.4, 0).sum(), torch.tensor(24.0))  # 6 queries x 4 heads


def _evicting(cached: CachedLM, policy: str, budget: float, **options: object) -> Session:
    from compiler.passes.kv_cache import KVEvict

    prefill = _compile(cached.prefill.gm, KVEvict(policy, budget, **options))
    decode = _compile(cached.decode.gm, KVEvict(policy, budget, **options))
    assert prefill.ir.meta["kv_cache"]["policy"] == policy == decode.ir.meta["kv_cache"]["policy"]
    return Session(prefill.executable, decode.executable, cache_for(decode.ir.meta["kv_cache"], 2))


@pytest.mark.parametrize("policy", ["streaming", "snapkv", "h2o"])
def test_a_budget_that_holds_everything_changes_nothing(cached: CachedLM, policy: str) -> None:
    ids = token_inputs(40, seed=8)["input_ids"]
    fp = Session(cached.prefill.gm, cached.decode.gm, FullCache(2)).score(ids[:, :24], ids[:, 24:])
    got = _evicting(cached, policy, 64).score(ids[:, :24], ids[:, 24:])
    torch.testing.assert_close(got, fp, atol=2e-5, rtol=1e-4)


def test_streaming_keeps_sinks_and_the_most_recent(cached: CachedLM) -> None:
    ids = token_inputs(40, seed=9)["input_ids"]
    session = _evicting(cached, "streaming", 12, sink=2)
    session.prefill(ids[:, :30])
    assert session.cache.positions[0][0, 0].tolist() == [0, 1, *range(20, 30)]
    full = Session(cached.prefill.gm, cached.decode.gm, FullCache(2))
    full.prefill(ids[:, :30])
    torch.testing.assert_close(session.cache.keys[1], full.cache.keys[1][:, :, [0, 1, *range(20, 30)]])
    for i in range(3):
        session.step(ids[:, 30 + i])
    assert session.cache.positions[1][0, 1].tolist() == [0, 1, *range(23, 33)]


def test_snapkv_keeps_the_window_and_the_most_voted_positions(cached: CachedLM) -> None:
    ids = token_inputs(40, seed=10)["input_ids"]
    session = _evicting(cached, "snapkv", 0.5, window=4, pool=1)
    session.prefill(ids[:, :32])
    # brute force: the window's attention per key from the plain graphs' q and k
    sites_q = _prefill_queries_and_keys(cached, ids[:, :32])
    for layer, (q, k) in enumerate(sites_q):
        votes = torch.ops.compiler.attention_key_scores(q, k, q.shape[-1] ** -0.5, 4)[..., :28]
        for h in range(2):
            expected = sorted(votes[0, h].topk(12).indices.tolist()) + [28, 29, 30, 31]
            assert session.cache.positions[layer][0, h].tolist() == expected
    before = session.cache.keys[0].shape[2]
    session.step(ids[:, 32])
    assert session.cache.keys[0].shape[2] == before + 1  # SnapKV compresses the prompt only


def _prefill_queries_and_keys(cached: CachedLM, ids: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    from compiler.passes.kv_cache.sites import prefill_sites
    from compiler.passes.sparse.calibrate import collect_qk

    sites, why = prefill_sites(cached.prefill.gm, 2)
    assert not why
    got: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    collect_qk(cached.prefill.gm, sites, [[ids]], lambda b, i, q, k: got.__setitem__(i, (q, k)))
    return [got[i] for i in range(2)]


def test_h2o_holds_its_budget_and_keeps_the_recent_window(cached: CachedLM) -> None:
    ids = token_inputs(40, seed=11)["input_ids"]
    session = _evicting(cached, "h2o", 10, recent=0.5)
    session.prefill(ids[:, :24])
    assert session.cache.keys[0].shape[2] == 10
    for i in range(6):
        session.step(ids[:, 24 + i])
        positions = session.cache.positions[0][0, 0].tolist()
        assert len(positions) == 10 and positions == sorted(positions)
        assert positions[-5:] == list(range(25 + i - 5, 25 + i))  # the 5 most recent are kept
    # the accumulated attention of each kept entry is a sum of probabilities: at most one per
    # query and query head that has seen it (2 query heads per KV head, 24 + 6 queries)
    assert float(session.cache.scores[0].max()) <= 2 * 30


def test_eviction_names_a_missing_score_output() -> None:
    from compiler.kv_cache import EvictingCache

    cache = EvictingCache(2, "snapkv", 0.5)
    with pytest.raises(ValueError, match="kv_evict pass"):
        cache.load([torch.zeros(1, 2, 8, 4)] * 2, [torch.zeros(1, 2, 8, 4)] * 2)
