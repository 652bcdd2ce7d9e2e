"""`compiler::attention_key_scores`: how much attention each key receives from the last queries.

KV-cache eviction keeps the keys that attention uses: H2O accumulates, per key, the attention
probability every query gave it ("heavy hitters"); SnapKV sums the probabilities that an
observation window of the prompt's last queries gives each earlier key. Both need the scores
of the attention a graph computes, which SDPA never exposes; an eviction pass adds this op next
to each attention site and makes its result a graph output.

- q [B, Hq, Sq, D], k [B, Hkv, Sk, D] (Hq a multiple of Hkv, GQA as in `causal_attention`),
  queries aligned to the end of the keys (query i sits at position Sk - Sq + i, causal);
- returns fp32 [B, Hkv, Sk]: for each key, the sum over the last `last` queries (all of them
  when `last` <= 0 or >= Sq) and over the query heads of its KV head of softmax(q·k·scale), so
  each query head's row contributes a total of 1 per query.

The reference computes the probabilities in chunks of queries, so the memory it needs is
[B, Hq, chunk, Sk], not [B, Hq, Sq, Sk] (H2O's prefill sums over every prompt query).
"""

from __future__ import annotations

import math

import torch

from compiler.cost_model.rules import OpCost, TensorInfo, attention_work
from compiler.ops.registry import compiler_op

_CHUNK = 256


def _fake(q: torch.Tensor, k: torch.Tensor, scale: float, last: int) -> torch.Tensor:
    return q.new_empty((q.shape[0], k.shape[1], k.shape[2]), dtype=torch.float32)


def _cost(q: TensorInfo, k: TensorInfo, scale: float, last: int) -> OpCost:
    rows = q.shape[-2] if last <= 0 else last
    window = TensorInfo((*q.shape[:-2], rows, q.shape[-1]), q.dtype)
    out = TensorInfo((k.shape[0], k.shape[1], k.shape[2]), torch.float32)
    # the scores and the softmax; no P @ V (priced as attention with a zero-width V)
    return OpCost(attention_work(window, k, TensorInfo((*k.shape[:-1], 0), k.dtype), [out], causal=True, end_aligned=True), "attention")


@compiler_op("attention_key_scores", fake=_fake, cost=_cost)
def attention_key_scores(q: torch.Tensor, k: torch.Tensor, scale: float, last: int) -> torch.Tensor:
    b, hq, sq, d = q.shape
    hkv, sk = k.shape[1], k.shape[2]
    if hq % hkv:
        raise ValueError(f"attention_key_scores: {hq} query heads are not a multiple of {hkv} KV heads")
    if sq > sk:
        raise ValueError(f"attention_key_scores: {sq} queries against {sk} keys; queries are the last Sq of the Sk positions")
    rows = sq if last <= 0 else min(last, sq)
    g = hq // hkv
    out = torch.zeros(b, hkv, sk, dtype=torch.float32, device=q.device)
    kt = k.float().transpose(-1, -2)
    keys = torch.arange(sk, device=q.device)
    for start in range(sq - rows, sq, _CHUNK):
        stop = min(sq, start + _CHUNK)
        qc = q[:, :, start:stop].float().reshape(b, hkv, g * (stop - start), d) * scale
        scores = (qc @ kt).view(b, hkv, g, stop - start, sk)
        positions = torch.arange(start, stop, device=q.device) + (sk - sq)
        scores = scores.masked_fill(keys[None, :] > positions[:, None], -math.inf)
        out += torch.softmax(scores, -1).sum((2, 3))
    return out
