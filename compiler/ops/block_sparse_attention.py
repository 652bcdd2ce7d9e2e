"""`compiler::block_sparse_attention`: causal prefill attention over a per-head block layout.

The sequence is cut into blocks of `block_size` positions (the last one may be short). For each
batch entry, query head and query block `qb`, `kv_blocks[b, h, qb, :kv_counts[b, h, qb]]` lists
the key blocks that query block attends to, in increasing order, each `<= qb`. Within a listed
block the causal rule still holds (query i sees key j only when j <= i), so listing every block
`0..qb` is exactly dense causal attention; the sparsification passes list fewer. Entries past
the count are ignored (they may hold anything). A query row that sees no key (its block lists
nothing) gives 0, as a fully masked row does in `causal_attention`.

- q: [B, Hq, S, D]; k: [B, Hkv, S, D]; v: [B, Hkv, S, Dv]; Hq a multiple of Hkv (GQA: query head
  h reads KV head h // (Hq // Hkv)); prefill only, queries and keys are the same S positions.
- kv_blocks: int32 [B, Hq, NB, M]; kv_counts: int32 [B, Hq, NB], NB = ceil(S / block_size),
  M <= NB. Each query head has its own layout, as the per-head patterns of MInference,
  FlexPrefill and DuoAttention need.
- The output has `causal_attention`'s layout: [B, Hq, S, Dv] viewed, [B, S, Hq, Dv] in memory.
- `expected_density` is the fraction of the causal blocks the layout is expected to list, for
  the cost model only (the real layout is built at run time from the inputs); the result does
  not depend on it.
- `key_padding_mask` (optional, [B, >= S] booleans, as `causal_attention` takes it): keys it
  marks False are never attended. Kernels take the common all-ones case and leave any other
  to the reference.

The reference materializes one head's [S, S] mask at a time (S = 8192 is 64 MiB of booleans)
and calls SDPA; a layout that lists every causal block takes SDPA's `is_causal` path, so at
density 100% the op is dense causal attention bit for bit.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from compiler.cost_model.rules import OpCost, TensorInfo, attention_work
from compiler.ops.causal_attention import effective_padding, output_like
from compiler.ops.registry import compiler_op


def num_blocks(length: int, block_size: int) -> int:
    return -(-length // block_size)


def check_layout(q: torch.Tensor, k: torch.Tensor, kv_blocks: torch.Tensor, kv_counts: torch.Tensor, block_size: int) -> None:
    """Raise ValueError naming what is wrong with the shapes of a call."""
    if q.dim() != 4 or k.dim() != 4:
        raise ValueError(f"block_sparse_attention: q and k must be [B, H, S, D], got {tuple(q.shape)} and {tuple(k.shape)}")
    b, hq, s, _ = q.shape
    if k.shape[-2] != s:
        raise ValueError(f"block_sparse_attention: prefill only, {s} queries against {k.shape[-2]} keys")
    if hq % k.shape[1]:
        raise ValueError(f"block_sparse_attention: {hq} query heads are not a multiple of {k.shape[1]} KV heads")
    if block_size < 1:
        raise ValueError(f"block_sparse_attention: block_size must be positive, got {block_size}")
    nb = num_blocks(s, block_size)
    if kv_blocks.dim() != 4 or tuple(kv_blocks.shape[:3]) != (b, hq, nb) or tuple(kv_counts.shape) != (b, hq, nb):
        raise ValueError(
            f"block_sparse_attention: layout must be kv_blocks [{b}, {hq}, {nb}, M] and kv_counts "
            f"[{b}, {hq}, {nb}] for S={s}, block_size={block_size}; got {tuple(kv_blocks.shape)} and {tuple(kv_counts.shape)}"
        )
    if kv_blocks.dtype != torch.int32 or kv_counts.dtype != torch.int32:
        raise ValueError("block_sparse_attention: kv_blocks and kv_counts must be int32")


def block_mask(kv_blocks: torch.Tensor, kv_counts: torch.Tensor, length: int, block_size: int) -> torch.Tensor:
    """The [..., NB, NB] boolean block mask a layout lists (causal blocks only)."""
    nb = kv_blocks.shape[-2]
    listed = torch.arange(kv_blocks.shape[-1], device=kv_blocks.device) < kv_counts[..., None].long()
    # Entries past the count go to a spare column that is dropped: scattered as False into
    # their block, one of them could undo a listed entry naming the same block.
    index = torch.where(listed, kv_blocks.long().clamp(0, nb - 1), nb)
    mask = torch.zeros((*kv_blocks.shape[:-1], nb + 1), dtype=torch.bool, device=kv_blocks.device)
    mask = mask.scatter_(-1, index, True)[..., :nb]
    causal = torch.ones(nb, nb, dtype=torch.bool, device=mask.device).tril()
    return mask & causal


def _fake(q, k, v, kv_blocks, kv_counts, scale: float, block_size: int, expected_density: float, key_padding_mask=None):
    return output_like(q, v)


def _cost(q: TensorInfo, k: TensorInfo, v: TensorInfo, kv_blocks: TensorInfo, kv_counts: TensorInfo, scale: float, block_size: int, expected_density: float, key_padding_mask: TensorInfo | None = None) -> OpCost:
    out = TensorInfo((*q.shape[:-1], v.shape[-1]), q.dtype)
    work = attention_work(q, k, v, [out], causal=True, density=expected_density)
    return OpCost(work, "attention")


@compiler_op("block_sparse_attention", fake=_fake, cost=_cost)
def block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_blocks: torch.Tensor,
    kv_counts: torch.Tensor,
    scale: float,
    block_size: int,
    expected_density: float,
    key_padding_mask: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    check_layout(q, k, kv_blocks, kv_counts, block_size)
    b, hq, s, _ = q.shape
    out = output_like(q, v)
    blocks = block_mask(kv_blocks, kv_counts, s, block_size)
    causal_blocks = torch.ones_like(blocks[0, 0]).tril()
    group = hq // k.shape[1]
    padding = effective_padding(key_padding_mask, s)
    if padding is None and bool((blocks == causal_blocks).all()):
        out.copy_(F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=group > 1))
        return out
    causal = torch.ones(s, s, dtype=torch.bool, device=q.device).tril()
    for i in range(b):
        for h in range(hq):
            mask = blocks[i, h].repeat_interleave(block_size, 0)[:s].repeat_interleave(block_size, 1)[:, :s] & causal
            if padding is not None:
                mask = mask & padding[i]
            kv = h // group
            o = F.scaled_dot_product_attention(q[i, h], k[i, kv], v[i, kv], attn_mask=mask, scale=scale)
            # rows that see no key: SDPA gives NaN there, the op's contract is 0
            out[i, h] = torch.where(mask.any(-1, keepdim=True), o, 0)
    return out
