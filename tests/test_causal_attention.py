"""CanonicalizeCausalAttention: explicit causal masks become causal SDPA, exactly.

The reference is eager HF: the rewritten graph must give the same logits (fp32, the same
SDPA math on unrepeated K/V: max abs error 1e-5 on logits of order 1) with and without
padding, through both capture paths; structurally, the mask and the K/V repeats are gone.
"""

import torch

from compiler.backend import CompilerBackend
from compiler.capture import capture_export
from compiler.ir import op_counts
from compiler.passes.canonicalize.causal_attention import CanonicalizeCausalAttention
from models import FunctionModule, tiny_gpt2, tiny_llama, token_inputs

SDPA = "aten.scaled_dot_product_attention.default"
CAUSAL = "compiler.causal_attention.default"


def _logits(model, inputs):
    with torch.no_grad():
        return model(**inputs, use_cache=False).logits


def _run_captured(captured, inputs):
    out = captured.unflatten_outputs(captured.gm(*captured.flatten_inputs((), inputs)))
    return out.logits


def test_export_graph_rewritten_and_exact_with_padding():
    for model in (tiny_llama(), tiny_gpt2()):
        inputs = token_inputs(16, batch=2)
        captured = capture_export(model, (), inputs)
        before = op_counts(captured.gm)
        result = CanonicalizeCausalAttention().run(captured.gm)
        captured.gm.recompile()
        after = op_counts(captured.gm)
        assert before[SDPA] == 2 and after.get(SDPA, 0) == 0 and after[CAUSAL] == 2, result
        assert "aten.le.Tensor" not in after and "aten.index.Tensor" not in after  # mask is dead
        padded = dict(inputs, attention_mask=inputs["attention_mask"].clone())
        padded["attention_mask"][0, :5] = 0
        for case in (inputs, padded):
            torch.testing.assert_close(_run_captured(captured, case), _logits(model, case), atol=1e-5, rtol=1e-5)


def test_kv_repeat_removed_for_gqa():
    captured = capture_export(tiny_llama(), (), token_inputs(16))
    CanonicalizeCausalAttention().run(captured.gm)
    for node in captured.gm.graph.nodes:
        if node.target is torch.ops.compiler.causal_attention.default:
            q, k, v = (a.meta["val"] for a in node.args[:3])
            assert q.shape[1] == 4 and k.shape[1] == 2 and v.shape[1] == 2


def test_dynamo_dynamic_lengths_rewritten_and_exact():
    model = tiny_llama()
    backend = CompilerBackend({"passes": "canonicalize_causal_attention"})
    compiled = torch.compile(model, backend=backend)
    with torch.no_grad():
        for length in (8, 12, 20):
            inputs = token_inputs(length, batch=2)
            inputs["attention_mask"][1, :3] = 0
            torch.testing.assert_close(compiled(**inputs).logits, model(**inputs).logits, atol=1e-5, rtol=1e-5)
    for result in backend.results:
        assert op_counts(result.ir)[CAUSAL] == 2


def _sdpa_graph(mask_fn):
    """A graph computing SDPA with the mask `mask_fn(positions)` built from aranges."""

    def f(q, k, v):
        pos = torch.arange(q.shape[-2])
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask_fn(pos))

    q = torch.randn(1, 2, 8, 4)
    return capture_export(FunctionModule(f), (q, q.clone(), q.clone()))



def test_sliding_window_is_not_causal():
    # Equal to causal when the window exceeds the length, so only a structural proof is safe.
    captured = _sdpa_graph(lambda p: (p[None, :] <= p[:, None]) & (p[:, None] - p[None, :] < 100))
    result = CanonicalizeCausalAttention().run(captured.gm)
    assert not result.changed
    assert "not part of a causal mask" in result.stats["left"][0]


def test_plain_causal_mask_becomes_is_causal():
    captured = _sdpa_graph(lambda p: p[None, :] <= p[:, None])
    q = torch.randn(1, 2, 8, 4)
    k, v = torch.randn_like(q), torch.randn_like(q)
    reference = captured.gm(q, k, v)
    result = CanonicalizeCausalAttention().run(captured.gm)
    captured.gm.recompile()
    assert result.changed
    (node,) = [n for n in captured.gm.graph.nodes if n.target is torch.ops.aten.scaled_dot_product_attention.default]
    assert node.kwargs["is_causal"] is True and len(node.args) == 3
    torch.testing.assert_close(captured.gm(q, k, v), reference, atol=1e-6, rtol=1e-6)
