"""FuseAttention: causal SDPA becomes compiler::causal_attention where the backend has a kernel.

The reference is eager: the rewritten and lowered model gives the same logits as the
original (the kernels are exact attention in fp32; max abs error 1e-5 on logits of order 1
allows the online softmax's reassociated sums). Sites that are not plain causal attention are
left alone with a reason.
"""

import pytest
import torch
import torch.nn.functional as F

import compiler
from compiler.capture import capture_export
from compiler.ir import op_counts
from compiler.ops import causal_attention as CAUSAL_ATTENTION
from compiler.passes.fusion.attention import FuseAttention
from compiler.passes.pipeline import PassContext
from models import FunctionModule

SDPA = "aten.scaled_dot_product_attention.default"
CAUSAL = "compiler.causal_attention.default"


class GQASelfAttention(torch.nn.Module):
    """A causal self-attention block that calls SDPA itself (is_causal, enable_gqa), as
    hand-written models and nanoGPT-style code do."""

    def __init__(self, dim: int = 64, heads: int = 4, kv_heads: int = 2) -> None:
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, dim // heads
        self.q = torch.nn.Linear(dim, dim)
        self.kv = torch.nn.Linear(dim, 2 * kv_heads * self.head_dim)
        self.out = torch.nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        q = self.q(x).view(b, s, self.heads, self.head_dim).transpose(1, 2)
        k, v = self.kv(x).view(b, s, 2, self.kv_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        return self.out(y.transpose(1, 2).reshape(b, s, -1))


@pytest.mark.parametrize("target", ["host", "h100"])
def test_causal_sdpa_becomes_the_op_and_the_block_still_matches_eager(target):
    model = GQASelfAttention().eval()
    x = torch.randn(2, 37, 64)
    gm = capture_export(model, (x,)).gm
    assert op_counts(gm)[SDPA] == 1
    result = FuseAttention().run(gm, PassContext(target=target))
    counts = op_counts(gm)
    assert counts.get(SDPA, 0) == 0 and counts[CAUSAL] == 1, result.stats
    assert all("predicted" in change for change in result.changes)
    compiled = compiler.compile(model, (x,), target=target)
    kernels = [k.name for k in compiled.result.codegen.kernels if "attention" in k.name]
    assert kernels and not [f for f in compiled.result.codegen.fallbacks if "causal_attention" in f]
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), atol=1e-5, rtol=1e-5)


def _block_graph():
    return capture_export(GQASelfAttention().eval(), (torch.randn(1, 8, 64),)).gm


def test_left_alone_without_a_kernel_for_the_backend(monkeypatch):
    gm = _block_graph()
    monkeypatch.delitem(CAUSAL_ATTENTION.lowerings, "tvm")
    result = FuseAttention().run(gm, PassContext(target="host"))
    assert not result.changes and op_counts(gm)[SDPA] == 1
    assert all("no tvm kernel" in why for why in result.stats["left"])


@pytest.mark.parametrize(
    "fn, why",
    [
        (lambda q, k, v: F.scaled_dot_product_attention(q, k, v), "not is_causal"),
        (lambda q, k, v: F.scaled_dot_product_attention(q, k[:, :, :6], v[:, :, :6], is_causal=True), "differ in length"),
        (lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=torch.ones(8, 8, dtype=torch.bool).tril()), "explicit mask"),
    ],
)
def test_other_attention_is_left_with_a_reason(fn, why):
    q, k, v = (torch.randn(1, 2, 8, 16) for _ in range(3))
    gm = capture_export(FunctionModule(fn), (q, k, v)).gm
    result = FuseAttention().run(gm, PassContext(target="host"))
    assert not result.changes and op_counts(gm)[SDPA] == 1
    assert any(why in reason for reason in result.stats["left"]), result.stats
