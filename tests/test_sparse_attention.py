"""Sparse attention: the layout op's patterns against brute force, calibration against exact
attention, and the pass on tiny Llamas (what it rewrites, what it leaves, what it equals)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import compiler
from compiler.ops.block_sparse_attention import block_mask, num_blocks
from compiler.ops.sparse_layout import HeadPattern, Spec, block_masks, density, layout_from_mask
from compiler.passes.sparse import calibrate
from tests.models import logits, tiny_llama, token_inputs

pytestmark = pytest.mark.usefixtures("kernel_cache_in_tmp")

BS = 16


def _qk(s: int = 200, hq: int = 4, hkv: int = 2, d: int = 16, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(1, hq, s, d, generator=gen)
    k = torch.randn(1, hkv, s, d, generator=gen)
    # a few heavy key columns and a strong local bias, as real heads have
    k[:, :, 37] *= 4
    return q, k


def _probs(q: torch.Tensor, k: torch.Tensor, h: int) -> torch.Tensor:
    """One head's exact causal attention probabilities [S, S], by the definition."""
    g = q.shape[1] // k.shape[1]
    s = q.shape[2]
    scores = q[0, h] @ k[0, h // g].T / math.sqrt(q.shape[-1])
    return torch.softmax(scores.masked_fill(torch.ones(s, s, dtype=torch.bool).triu(1), -math.inf), -1)


def _keep_until_brute(scores: list[float], gamma: float) -> set[int]:
    order = sorted(range(len(scores)), key=lambda i: -scores[i])
    kept, mass, total = set(), 0.0, sum(scores)
    for i in order:
        if mass >= gamma * total or scores[i] <= 0:
            break
        kept.add(i)
        mass += scores[i]
    return kept


def _with_always(m: torch.Tensor) -> torch.Tensor:
    nb = m.shape[-1]
    eye = torch.eye(nb, dtype=torch.bool)
    first = torch.zeros(nb, nb, dtype=torch.bool)
    first[:, 0] = True
    return (m | eye | first) & torch.ones(nb, nb, dtype=torch.bool).tril()


def test_streaming_mask_is_sinks_plus_window() -> None:
    q, k = _qk()
    nb = num_blocks(q.shape[2], BS)
    mask = block_masks(q, k, Spec((HeadPattern("streaming", sink=2, window=3),) * 4, BS))
    expected = torch.tensor([[kb < 2 or 0 <= qb - kb < 3 for kb in range(nb)] for qb in range(nb)])
    assert torch.equal(mask[0, 1], _with_always(expected))


@pytest.mark.parametrize("gamma", [0.5, 0.9])
def test_vertical_slash_matches_brute_force(gamma: float) -> None:
    q, k = _qk()
    s, nb, last = q.shape[2], num_blocks(q.shape[2], BS), 32
    spec = Spec((HeadPattern("vertical_slash", gamma=gamma),) * 4, BS, last_queries=last)
    mask = block_masks(q, k, spec)
    for h in range(4):
        p = _probs(q, k, h)[s - last :]
        vertical = [float(p[:, kb * BS : (kb + 1) * BS].sum()) for kb in range(nb)]
        slash = [0.0] * nb
        for i in range(last):
            for j in range(s - last + i + 1):
                slash[(s - last + i - j) // BS] += float(p[i, j])
        kept = _keep_until_brute(vertical + slash, gamma)
        expected = torch.zeros(nb, nb, dtype=torch.bool)
        for qb in range(nb):
            for kb in range(qb + 1):
                column = kb in kept
                # distance block j reaches block offsets j and j + 1
                diagonal = (nb + (qb - kb)) in kept or (qb - kb >= 1 and (nb + qb - kb - 1) in kept)
                expected[qb, kb] = column or diagonal
        assert torch.equal(mask[0, h], _with_always(expected)), h


def test_block_topk_matches_brute_force() -> None:
    q, k = _qk()
    s, nb, gamma = q.shape[2], num_blocks(q.shape[2], BS), 0.8
    mask = block_masks(q, k, Spec((HeadPattern("block_topk", gamma=gamma),) * 4, BS))
    for h in range(4):
        kh = k[0, h // 2]
        expected = torch.zeros(nb, nb, dtype=torch.bool)
        for qb in range(nb):
            qm = q[0, h, qb * BS : (qb + 1) * BS].mean(0)
            weights = [len(range(kb * BS, min(s, (kb + 1) * BS))) * math.exp(float(qm @ kh[kb * BS : (kb + 1) * BS].mean(0)) / 4) for kb in range(qb + 1)]
            for kb in _keep_until_brute(weights, gamma):
                expected[qb, kb] = True
        assert torch.equal(mask[0, h], _with_always(expected)), h


def test_layout_round_trips_through_the_op_contract() -> None:
    q, k = _qk(seed=3)
    mask = block_masks(q, k, Spec((HeadPattern("block_topk", gamma=0.6),) * 4, BS))
    blocks, counts = layout_from_mask(mask)
    assert torch.equal(block_mask(blocks, counts, q.shape[2], BS), mask)
    rows = blocks.gather(-1, (counts.long() - 1).clamp_min(0)[..., None])[..., 0]
    assert torch.equal(rows, torch.arange(mask.shape[-1]).expand_as(rows).to(torch.int32))  # diagonal listed last
    assert 0 < density(mask) < 1


@pytest.mark.parametrize("pattern", [HeadPattern("dense"), HeadPattern("streaming", sink=0, window=1000), HeadPattern("vertical_slash", gamma=1.0), HeadPattern("block_topk", gamma=1.0)])
def test_full_density_is_dense_attention_exactly(pattern: HeadPattern) -> None:
    q, k = _qk(s=130, hkv=4)
    v = torch.randn_like(k)
    blocks, counts = torch.ops.compiler.sparse_attention_layout(q, k, Spec((pattern,) * 4, BS).to_json())
    if pattern.kind in ("vertical_slash", "block_topk"):
        # random data puts mass everywhere: gamma=1 keeps every block with any mass
        assert density(block_mask(blocks, counts, 130, BS)) == 1.0
    out = torch.ops.compiler.block_sparse_attention(q, k, v, blocks, counts, 0.25, BS, 1.0)
    assert torch.equal(out, F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.25))


def test_below_min_length_the_layout_is_dense() -> None:
    q, k = _qk()
    mask = block_masks(q, k, Spec((HeadPattern("streaming", window=1),) * 4, BS, min_length=201))
    assert density(mask) == 1.0


def test_block_mass_is_exact_attention_per_block() -> None:
    q, k = _qk(s=90)
    mass = calibrate.block_mass(q, k, 0.25, BS, chunk=32)
    nb = num_blocks(90, BS)
    for h in (0, 3):
        p = torch.softmax((q[0, h] @ k[0, h // 2].T * 0.25).masked_fill(torch.ones(90, 90, dtype=torch.bool).triu(1), -math.inf), -1)
        expected = torch.stack([torch.stack([p[qb * BS : (qb + 1) * BS, kb * BS : (kb + 1) * BS].sum(1).mean() for kb in range(nb)]) for qb in range(nb)])
        torch.testing.assert_close(mass[0, h], expected, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(mass.sum(-1), torch.ones(1, 4, nb))


def test_choose_takes_the_sparsest_pattern_reaching_the_recall() -> None:
    patterns = [HeadPattern("streaming", window=2), HeadPattern("streaming", window=8), HeadPattern("block_topk", gamma=0.9)]
    recall = torch.tensor([[0.99, 0.50], [0.999, 0.90], [0.97, 0.93]])
    dens = torch.tensor([[0.1, 0.1], [0.3, 0.3], [0.2, 0.25]])
    chosen = calibrate.choose(recall, dens, patterns, 0.95)
    assert chosen[0][0] == patterns[0]
    assert chosen[1][0].kind == "dense"  # no candidate reaches 0.95: a retrieval head


def test_last_query_recall_is_exact_attention_of_those_queries() -> None:
    q, k = _qk(s=90)
    patterns = [HeadPattern("streaming", window=1), HeadPattern("block_topk", gamma=0.9)]
    recall, _ = calibrate.score_candidates(q, k, 0.25, BS, patterns, last=20)
    for c, pattern in enumerate(patterns):
        mask = block_masks(q, k, Spec((pattern,) * 4, BS))
        for h in (0, 3):
            p = torch.softmax((q[0, h] @ k[0, h // 2].T * 0.25).masked_fill(torch.ones(90, 90, dtype=torch.bool).triu(1), -math.inf), -1)
            # the mass each of the last 20 queries keeps, by the definition, key by key
            keep = mask[0, h].repeat_interleave(BS, 0)[:90].repeat_interleave(BS, 1)[:, :90]
            expected = (p[70:] * keep[70:]).sum(-1).mean()
            torch.testing.assert_close(recall[c, h], expected, atol=1e-6, rtol=1e-5)


def test_choose_keeps_heads_dense_that_retrieval_prompts_need() -> None:
    patterns = [HeadPattern("streaming", window=2), HeadPattern("streaming", window=8)]
    recall = torch.tensor([[0.99, 0.99], [0.999, 0.999]])
    dens = torch.tensor([[0.1, 0.1], [0.3, 0.3]])
    retrieval = torch.tensor([[0.97, 0.40], [0.99, 0.60]])  # head 1 must reach far back
    chosen = calibrate.choose(recall, dens, patterns, 0.95, retrieval, 0.95)
    assert chosen[0][0] == patterns[0]
    assert chosen[1][0].kind == "dense"
    # a lower bar for retrieval lets the wider window serve head 1
    assert calibrate.choose(recall, dens, patterns, 0.95, retrieval, 0.5)[1][0] == patterns[1]


# -- the pass -----------------------------------------------------------------------------------


def _calibration(window: int, count: int) -> list[dict[str, torch.Tensor]]:
    return [{"input_ids": token_inputs(window, seed=100 + i)["input_ids"]} for i in range(count)]


def _compile(model: torch.nn.Module, length: int, calibration: object = _calibration, **options: object) -> compiler.CompiledModule:
    from compiler.passes import default_pipeline
    from compiler.passes.sparse import SparseAttention

    pipeline = default_pipeline()
    pipeline.passes[pipeline.names().index("sparse_attention")] = SparseAttention(block_size=BS, **options)
    inputs = {"input_ids": token_inputs(length)["input_ids"]}
    # Fusion off: only the sparse kernel is built, which keeps each test to seconds.
    return compiler.compile(
        model, inputs, target="host", budget="ppl:+5%", pipeline=pipeline, calibration=calibration,
        disable="fuse_attention,fuse_regions,fuse_rms_norm",
    )


def _record(compiled: compiler.CompiledModule) -> object:
    return next(r for r in compiled.result.records if r.name == "sparse_attention")


def test_pass_rewrites_each_site_and_equals_the_reference_layout() -> None:
    model = tiny_llama()
    compiled = _compile(model, 96, method="streaming", window=2, min_length=0)
    record = _record(compiled)
    assert record.status == "ran" and len(record.result.changes) == 2, record.result.stats
    ops = [n.target for n in compiled.result.ir.graph.nodes]
    assert ops.count(torch.ops.compiler.block_sparse_attention.default) == 2
    # The same model with its attention forced to the same layout by hand.
    ids = token_inputs(96, seed=7)["input_ids"]
    expected = _llama_with_layout(model, ids, Spec((HeadPattern("streaming", window=2),) * 4, BS))
    torch.testing.assert_close(logits(compiled(input_ids=ids)), expected, atol=1e-4, rtol=1e-4)
    dense = logits(model(input_ids=ids))
    assert (logits(compiled(input_ids=ids)) - dense).abs().max() > 1e-3  # it did sparsify


def _llama_with_layout(model: torch.nn.Module, ids: torch.Tensor, spec: Spec) -> torch.Tensor:
    """HF Llama's eager forward with every attention replaced by the layout's block-sparse
    attention, through transformers' own attention-function registry."""
    from transformers import AttentionInterface

    def sparse(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):  # noqa: ANN001, ANN202
        blocks, counts = torch.ops.compiler.sparse_attention_layout(query, key, spec.to_json())
        out = torch.ops.compiler.block_sparse_attention(query, key, value, blocks, counts, scaling, spec.block_size, 1.0)
        return out.transpose(1, 2), None

    AttentionInterface.register("test_block_sparse", sparse)
    old = model.config._attn_implementation
    model.config._attn_implementation = "test_block_sparse"
    try:
        with torch.no_grad():
            return logits(model(input_ids=ids))
    finally:
        model.config._attn_implementation = old


def test_pass_is_skipped_under_a_lossless_budget() -> None:
    inputs = {"input_ids": token_inputs(64)["input_ids"]}
    compiled = compiler.compile(tiny_llama(), inputs, target="host", calibration=_calibration, disable="fuse_attention,fuse_regions,fuse_rms_norm")
    record = _record(compiled)
    assert record.status == "skipped" and "lossless" in record.reason


def test_short_static_graph_is_left_below_the_crossover() -> None:
    compiled = _compile(tiny_llama(), 64, method="streaming", window=1)
    record = _record(compiled)
    assert not record.result.changes
    sites = record.result.stats["sites"]
    assert sites and all(s["crossover"] is None or s["crossover"] > 64 for s in sites)
    assert any("pays off" in why for why in record.result.stats["left"])


def test_calibration_is_stored_and_reused(monkeypatch: pytest.MonkeyPatch) -> None:
    model = tiny_llama()
    first = _compile(model, 96, method="duo", recall=0.9, min_length=0)
    calls = []
    monkeypatch.setattr(calibrate, "collect_qk", lambda *a, **kw: calls.append(a))
    second = _compile(model, 96, method="duo", recall=0.9, min_length=0)
    assert not calls
    assert _record(first).result.stats["sites"] == _record(second).result.stats["sites"]
    heads = [h for s in _record(first).result.stats["sites"] for h in s["heads"]]
    assert all(h == "dense" or h.startswith("streaming") for h in heads)


def test_retrieval_prompts_make_heads_dense_that_text_alone_would_sparsify() -> None:
    from compiler.calibration import Calibration

    model = tiny_llama()
    plain = _compile(model, 96, method="duo", recall=0.5, min_length=0)

    def needle(window: int, count: int) -> list[dict[str, torch.Tensor]]:
        # the first tokens repeated at the end: induction heads must look back to them
        out = []
        for i in range(count):
            ids = token_inputs(window, seed=300 + i)["input_ids"]
            ids[0, -16:] = ids[0, 20:36]
            out.append({"input_ids": ids})
        return out

    def dense_heads(compiled: compiler.CompiledModule) -> int:
        return sum(h == "dense" for s in _record(compiled).result.stats["sites"] for h in s["heads"])

    strict = _compile(model, 96, method="duo", recall=0.5, min_length=0, retrieval_recall=0.999, calibration=Calibration(_calibration, retrieval=needle))
    assert dense_heads(strict) > dense_heads(plain)


def test_recall_one_keeps_every_head_dense() -> None:
    compiled = _compile(tiny_llama(), 96, method="calibrated", recall=1.0, min_length=0)
    record = _record(compiled)
    assert not record.result.changes
    assert all(h == "dense" for s in record.result.stats["sites"] for h in s["heads"])


def test_padding_mask_is_applied_per_key() -> None:
    q, k = _qk(s=100, hkv=4)
    v = torch.randn_like(k)
    mask = block_masks(q, k, Spec((HeadPattern("streaming", sink=1, window=2),) * 4, BS))
    blocks, counts = layout_from_mask(mask)
    pad = torch.ones(1, 100, dtype=torch.bool)
    pad[0, 20:30] = False
    out = torch.ops.compiler.block_sparse_attention(q, k, v, blocks, counts, 0.25, BS, 1.0, pad)
    dense = mask[0].repeat_interleave(BS, 1)[:, :100].repeat_interleave(BS, 2)[:, :, :100]  # [H, S, S]
    allowed = dense & torch.ones(100, 100, dtype=torch.bool).tril() & pad[0]
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed[None], scale=0.25)
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-5)


def test_pass_carries_the_key_padding_mask() -> None:
    model = tiny_llama()
    from compiler.passes import default_pipeline
    from compiler.passes.sparse import SparseAttention

    pipeline = default_pipeline()
    pipeline.passes[pipeline.names().index("sparse_attention")] = SparseAttention(block_size=BS, method="streaming", window=2, min_length=0)
    inputs = token_inputs(96)
    calibration = lambda window, count: [token_inputs(window, seed=100 + i) for i in range(count)]  # noqa: E731
    compiled = compiler.compile(
        model, inputs, target="host", budget="ppl:+5%", pipeline=pipeline, calibration=calibration,
        disable="fuse_attention,fuse_regions,fuse_rms_norm",
    )
    sparse = [n for n in compiled.result.ir.graph.nodes if n.target == torch.ops.compiler.block_sparse_attention.default]
    assert len(sparse) == 2 and all(len(n.args) == 9 for n in sparse)  # the padding mask rides along
    ids = token_inputs(96, seed=7)["input_ids"]
    no_mask = _llama_with_layout(model, ids, Spec((HeadPattern("streaming", window=2),) * 4, BS))
    torch.testing.assert_close(logits(compiled(input_ids=ids, attention_mask=torch.ones_like(ids))), no_mask, atol=1e-4, rtol=1e-4)


def test_report_lists_the_crossover_and_the_pattern_of_each_head(tmp_path) -> None:
    compiled = _compile(tiny_llama(), 96, method="streaming", window=2, min_length=0)
    compiled.write_artifacts(tmp_path)
    report = (tmp_path / "report.md").read_text()
    section = report.split("### sparse_attention")[1]
    assert "| site | node | density | crossover | heads |" in section
    assert "4x streaming(sink=1, window=2)" in section
    sites = compiled.result.plan()["passes"][1]["stats"]["sites"]
    assert [s["heads"] for s in sites] == [["streaming(sink=1, window=2)"] * 4] * 2
