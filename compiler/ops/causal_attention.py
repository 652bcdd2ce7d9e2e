"""`compiler::causal_attention`: causal SDPA with an optional key padding mask, GQA-aware.

What HF models compute when given an `attention_mask`: position q attends to key k when
k <= q and the key is not padding. Captured, that is an explicit [B, 1, S, S] boolean mask and
K/V repeated to every query head; this op keeps K/V unrepeated and, when the padding mask is
all ones (the common case), takes SDPA's `is_causal` path, which skips the masked half.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from compiler.cost_model.rules import OpCost, TensorInfo, attention_work
from compiler.ops.registry import compiler_op


def _fake(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_padding_mask: Optional[torch.Tensor], scale: float) -> torch.Tensor:
    return q.new_empty((*q.shape[:-1], v.shape[-1]))


def _cost(q: TensorInfo, k: TensorInfo, v: TensorInfo, key_padding_mask: Optional[TensorInfo], scale: float) -> OpCost:
    # priced as the common all-ones case: is_causal SDPA on unrepeated K/V
    out = TensorInfo((*q.shape[:-1], v.shape[-1]), q.dtype)
    return OpCost(attention_work(q, k, v, [out], causal=True), "attention")


@compiler_op("causal_attention", fake=_fake, cost=_cost)
def causal_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_padding_mask: Optional[torch.Tensor], scale: float
) -> torch.Tensor:
    gqa = q.shape[1] != k.shape[1]
    if key_padding_mask is not None:
        key_padding_mask = key_padding_mask[:, : k.shape[-2]]
    if key_padding_mask is None or bool(key_padding_mask.all()):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=gqa)
    causal = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool, device=q.device).tril()
    mask = causal & key_padding_mask.to(torch.bool)[:, None, None, :]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa)
