"""The attention finder (compiler.analysis.attention) on captured HF models and hand-written
attention.

Structure: one site per layer, with the head counts, scale and masking the model has, K/V at
their own (unrepeated) head count. Numerics: the reported q, k, v, run through SDPA with the
reported scale and causality, give the site's output (fp32, 1e-5), so the finder names the
right nodes and not merely nodes of the right shapes.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch.fx.experimental.proxy_tensor import make_fx

from compiler.analysis import find_attention, summary
from compiler.capture import capture_export
from compiler.passes import PassContext, default_pipeline
from models import FunctionModule, tiny_gpt2, tiny_llama, token_inputs

BUILDERS = {"llama": tiny_llama, "gpt2": tiny_gpt2}
HEADS = {"llama": (4, 2), "gpt2": (4, 4)}  # (query heads, KV heads)
LAYERS, HEAD_DIM, LENGTH = 2, 16, 16


def _values(gm: fx.GraphModule, nodes: set[fx.Node], inputs: list) -> dict[fx.Node, torch.Tensor]:
    """The values `nodes` take when `gm` runs on `inputs`."""
    seen: dict[fx.Node, torch.Tensor] = {}

    class Recorder(fx.Interpreter):
        def run_node(self, n: fx.Node):
            out = super().run_node(n)
            if n in nodes:
                seen[n] = out
            return out

    with torch.no_grad():
        Recorder(gm).run(*inputs)
    return seen


def _check_numerics(gm: fx.GraphModule, sites, inputs: list) -> None:
    """SDPA on the reported q, k, v (GQA-aware) reproduces every site's output."""
    values = _values(gm, {n for s in sites for n in (s.q, s.k, s.v, s.output)}, inputs)
    for site in sites:
        q, k, v = values[site.q], values[site.k], values[site.v]
        expected = F.scaled_dot_product_attention(q, k, v, is_causal=site.causal, scale=site.scale, enable_gqa=True)
        torch.testing.assert_close(values[site.output], expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("with_mask", [True, False], ids=["attention_mask", "no_mask"])
@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_hf_models(name: str, impl: str, with_mask: bool) -> None:
    inputs = token_inputs(LENGTH)
    if not with_mask:
        del inputs["attention_mask"]
    captured = capture_export(BUILDERS[name](attn_implementation=impl), (), inputs)
    sites = find_attention(captured.gm)
    q_heads, kv_heads = HEADS[name]
    assert len(sites) == LAYERS
    outputs = [n for n in captured.gm.graph.nodes if n in {s.output for s in sites}]
    assert [s.output for s in sites] == outputs and [s.index for s in sites] == list(range(LAYERS))
    placeholders = {n.name: n for n in captured.gm.graph.nodes if n.op == "placeholder"}
    for site in sites:
        assert site.kind == ("sdpa" if impl == "sdpa" else "decomposed")
        assert (site.q_heads, site.kv_heads, site.head_dim, site.value_dim) == (q_heads, kv_heads, HEAD_DIM, HEAD_DIM)
        assert site.scale == pytest.approx(HEAD_DIM**-0.5)
        assert tuple(site.q.meta["val"].shape) == (1, q_heads, LENGTH, HEAD_DIM)
        assert tuple(site.k.meta["val"].shape) == tuple(site.v.meta["val"].shape) == (1, kv_heads, LENGTH, HEAD_DIM)
        assert site.output in site.nodes and not {site.q, site.k, site.v} & set(site.nodes)
        # HF's mask is causal in every case; with an attention_mask it also gathers padding
        assert site.causal, site.reason
        if with_mask:
            assert site.key_padding_mask is placeholders["attention_mask"] and site.mask is not None
        else:
            assert site.key_padding_mask is None and site.mask is None
    rows = summary(sites)
    json.dumps(rows)
    assert rows[1]["index"] == 1 and rows[1]["q_heads"] == q_heads and rows[1]["output"] == sites[1].output.name
    assert rows[1]["mask"] == ("causal + key padding (attention_mask)" if with_mask else "causal")
    _check_numerics(captured.gm, sites, captured.flatten_inputs((), inputs))


@pytest.mark.parametrize("with_mask", [True, False], ids=["attention_mask", "no_mask"])
@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_after_default_pipeline(name: str, with_mask: bool) -> None:
    """Canonicalization and fusion leave `compiler::causal_attention`, which is found too."""
    inputs = token_inputs(LENGTH)
    if not with_mask:
        del inputs["attention_mask"]
    captured = capture_export(BUILDERS[name](), (), inputs)
    ctx = PassContext(target="host", enabled_only={"canonicalize_causal_attention", "fuse_attention"})
    default_pipeline().run(captured.gm, ctx)
    sites = find_attention(captured.gm)
    assert [s.kind for s in sites] == ["causal_attention"] * LAYERS
    for site in sites:
        assert site.causal and (site.key_padding_mask is not None) == with_mask and site.kv_heads == HEADS[name][1]
        assert site.nodes == [site.output]
    _check_numerics(captured.gm, sites, captured.flatten_inputs((), inputs))


def test_position_ids_from_the_caller_are_not_proven_causal() -> None:
    """Positions given as an input may restart (packed sequences): HF's mask is then not causal."""
    inputs = token_inputs(LENGTH)
    inputs["position_ids"] = torch.arange(LENGTH)[None]
    del inputs["attention_mask"]
    sites = find_attention(capture_export(tiny_llama(attn_implementation="eager"), (), inputs).gm)
    assert len(sites) == LAYERS
    for site in sites:
        assert not site.causal and site.mask is not None and "not proven causal" in site.reason


def _capture(fn, *shapes: tuple[int, ...]):
    torch.manual_seed(0)
    args = tuple(torch.randn(shape) for shape in shapes)
    return capture_export(FunctionModule(fn), args), list(args)


def _plain(q, k, v):
    return torch.softmax(q @ k.transpose(-2, -1) * 0.3, dim=-1) @ v


def _decomposed_softmax_causal(q, k, v):
    """Scale on q, explicit amax/exp/sum/div softmax, causal mask as `where(keep, s, -inf)`."""
    pos = torch.arange(q.shape[-2])
    scores = torch.matmul(q / 4.0, k.transpose(2, 3))
    scores = torch.where(pos[None, :] <= pos[:, None], scores, torch.full((), float("-inf")))
    e = torch.exp(scores - torch.amax(scores, dim=-1, keepdim=True))
    return torch.matmul(e / e.sum(dim=-1, keepdim=True), v)


def _sliding_window(q, k, v):
    pos = torch.arange(q.shape[-2])
    keep = (pos[None, :] <= pos[:, None]) & (pos[:, None] - pos[None, :] < 100)
    scores = (q @ k.transpose(-1, -2)).masked_fill(~keep, float("-inf"))
    return torch.softmax(scores, dim=-1) @ v


def _additive_bias(q, k, v, bias):
    return torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]) + bias, dim=-1) @ v


def _gqa_repeat(q, k, v):
    """HF's eager attention: `repeat_kv`, scale on the scores, fp32 softmax cast back."""
    b, hkv, s, d = k.shape
    group = q.shape[1] // hkv
    k = k[:, :, None].expand(b, hkv, group, s, d).reshape(b, hkv * group, s, d)
    v = v[:, :, None].expand(b, hkv, group, s, d).reshape(b, hkv * group, s, d)
    weights = torch.matmul(q, k.transpose(2, 3)) * d**-0.5
    return torch.matmul(F.softmax(weights, dim=-1, dtype=torch.float32).to(q.dtype), v)


QKV = ((2, 4, 8, 16), (2, 4, 8, 16), (2, 4, 8, 16))


@pytest.mark.parametrize(
    "fn, shapes, scale, causal, reason",
    [
        (_plain, QKV, 0.3, False, "no mask"),
        (_decomposed_softmax_causal, QKV, 0.25, True, "proven causal"),
        (_sliding_window, QKV, 1.0, False, "not proven causal"),
        (_additive_bias, (*QKV, (8, 8)), 0.25, False, "additive float mask"),
        (_gqa_repeat, ((2, 4, 8, 16), (2, 2, 8, 16), (2, 2, 8, 16)), 0.25, False, "no mask"),
    ],
    ids=["plain", "decomposed_softmax_causal", "sliding_window", "additive_bias", "gqa_repeat"],
)
def test_hand_written_decomposed(fn, shapes, scale, causal, reason) -> None:
    captured, args = _capture(fn, *shapes)
    (site,) = find_attention(captured.gm)
    placeholders = [n for n in captured.gm.graph.nodes if n.op == "placeholder"]
    assert site.kind == "decomposed" and (site.q, site.k, site.v) == tuple(placeholders[:3])
    assert (site.q_heads, site.kv_heads) == (shapes[0][1], shapes[1][1])
    assert site.scale == pytest.approx(scale) and site.causal is causal and reason in site.reason
    assert (site.mask is None) == (causal or reason == "no mask")
    if fn is _additive_bias:
        assert site.mask is placeholders[3]
    if not site.mask:
        _check_numerics(captured.gm, [site], args)


def test_sdpa_kernel_variant_and_compiler_ops() -> None:
    """A device SDPA kernel (tuple output, options at its own positions) and the block-sparse op."""

    def variant(q, k, v):
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, True, scale=0.5)[0]

    # capture folds the kernels back into SDPA; make_fx keeps the kernel as called
    args = [torch.randn(shape) for shape in QKV]
    gm = make_fx(variant, tracing_mode="fake")(*args)
    (site,) = find_attention(gm)
    (kernel,) = [n for n in gm.graph.nodes if n.target is torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default]
    assert (site.kind, site.nodes, site.scale, site.causal) == ("sdpa", [kernel, site.output], 0.5, True)
    _check_numerics(gm, [site], args)

    blocks = torch.arange(2, dtype=torch.int32).expand(2, 4, 2, 2).contiguous()
    counts = torch.arange(1, 3, dtype=torch.int32).expand(2, 4, 2).contiguous()

    def block_sparse(q, k, v, kv_blocks, kv_counts, padding):
        return torch.ops.compiler.block_sparse_attention(q, k, v, kv_blocks, kv_counts, 0.25, 4, 1.0, padding)

    torch.manual_seed(0)
    padding = torch.ones(2, 8, dtype=torch.bool)
    captured = capture_export(FunctionModule(block_sparse), (*(torch.randn(s) for s in QKV), blocks, counts, padding))
    (site,) = find_attention(captured.gm)
    assert site.kind == "block_sparse_attention" and site.causal and site.scale == 0.25
    placeholders = [n for n in captured.gm.graph.nodes if n.op == "placeholder"]
    assert site.mask is placeholders[3] and site.key_padding_mask is placeholders[5] and site.nodes == [site.output]


def test_no_attention() -> None:
    mlp = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Softmax(dim=-1), torch.nn.Linear(32, 16))
    assert find_attention(capture_export(mlp, (torch.randn(2, 8, 16),)).gm) == []
