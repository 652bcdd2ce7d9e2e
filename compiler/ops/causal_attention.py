"""`compiler::causal_attention`: causal SDPA with an optional key padding mask, GQA-aware.

What HF models compute when given an `attention_mask`: position q attends to key k when
k <= q and the key is not padding. Captured, that is an explicit [B, 1, S, S] boolean mask and
K/V repeated to every query head; this op keeps K/V unrepeated and, when the padding mask is
all ones (the common case), takes SDPA's `is_causal` path, which skips the masked half.

Queries are aligned to the end of the keys: with Sq queries and Sk >= Sq keys, query i sits at
position Sk - Sq + i and sees keys 0..Sk - Sq + i. For Sq == Sk (prefill, what the canonicalizer
produces) that is the usual lower triangle; for Sq == 1 it is a decode step, one new token
against the whole cache. (SDPA's own `is_causal` aligns to the start instead, so the reference
builds the mask explicitly whenever Sq != Sk.)
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from compiler.cost_model.rules import OpCost, TensorInfo, attention_work
from compiler.ops.registry import compiler_op


def output_like(q: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """An uninitialized output: [B, H, Sq, Dv] laid out as [B, Sq, H, Dv] in memory, as SDPA's
    CPU and CUDA kernels give it. Graphs captured from SDPA follow the op with
    `transpose(1, 2).view(B, Sq, H * Dv)`, a view only in that layout, so every implementation
    (the reference, the fake, each kernel) returns it."""
    b, h, sq, _ = q.shape
    return torch.empty_permuted((b, h, sq, v.shape[-1]), (0, 2, 1, 3), dtype=q.dtype, device=q.device)


def _fake(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_padding_mask: Optional[torch.Tensor], scale: float) -> torch.Tensor:
    return output_like(q, v)


def _cost(q: TensorInfo, k: TensorInfo, v: TensorInfo, key_padding_mask: Optional[TensorInfo], scale: float) -> OpCost:
    # priced as the common all-ones case: is_causal SDPA on unrepeated K/V
    out = TensorInfo((*q.shape[:-1], v.shape[-1]), q.dtype)
    return OpCost(attention_work(q, k, v, [out], causal=True, end_aligned=True), "attention")


@compiler_op("causal_attention", fake=_fake, cost=_cost)
def causal_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_padding_mask: Optional[torch.Tensor], scale: float
) -> torch.Tensor:
    out = _attention(q, k, v, key_padding_mask, scale)
    if out.stride() != output_like(q, v).stride():
        out = output_like(q, v).copy_(out)
    return out


def effective_padding(key_padding_mask: Optional[torch.Tensor], keys: int) -> Optional[torch.Tensor]:
    """The key padding mask over the first `keys` keys as booleans, or None when it masks
    nothing (absent, or all ones: the common case, which kernels take)."""
    if key_padding_mask is None:
        return None
    padding = key_padding_mask[:, :keys].to(torch.bool)
    return None if bool(padding.all()) else padding


def _attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_padding_mask: Optional[torch.Tensor], scale: float
) -> torch.Tensor:
    gqa = q.shape[1] != k.shape[1]
    queries, keys = q.shape[-2], k.shape[-2]
    if queries > keys:
        raise ValueError(f"causal_attention: {queries} queries against {keys} keys; queries are the last Sq of the Sk positions, so Sq <= Sk")
    padding = effective_padding(key_padding_mask, keys)
    all_keys = padding is None
    if all_keys and queries == keys:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=gqa)
    causal = torch.ones(queries, keys, dtype=torch.bool, device=q.device).tril(keys - queries)
    if all_keys:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=causal, scale=scale, enable_gqa=gqa)
    mask = causal & padding[:, None, None, :]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa)
