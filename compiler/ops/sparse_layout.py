"""`compiler::sparse_attention_layout`: the block layout of `block_sparse_attention`, built online.

Training-free sparse attention keeps, per head, the key blocks that hold most of each query
block's attention mass. Which blocks those are depends on the input for most heads, so the
sparsification pass inserts this op before each sparse attention: it reads q and k and returns
`(kv_blocks, kv_counts)` for `compiler::block_sparse_attention`. Each head follows one
`HeadPattern` (chosen per head by calibration, or one method for all heads):

- `dense`: every causal block (the head keeps full attention: a DuoAttention retrieval head);
- `streaming` (StreamingLLM, LM-Infinite: the "Lambda" shape): `sink` blocks at the start and
  the `window` most recent blocks (the diagonal included); fixed, nothing is estimated;
- `vertical_slash` (MInference): the last query block's attention to every key, computed
  exactly, is summed per key block (vertical lines: keys every query reads) and per block
  diagonal (slash lines: keys at a fixed distance); the heaviest columns and diagonals are kept
  until they hold `gamma` of that mass, at most `budget` of each;
- `block_topk` (FlexPrefill's query-aware pattern): block-averaged queries against
  block-averaged keys estimate each query block's distribution over key blocks; per query block
  the heaviest blocks are kept until they hold `gamma` of the estimate.

Every pattern also keeps the sink block and the diagonal block, so no query row is left
without keys. Below `min_length` tokens (the cost model's crossover for the target) the layout
is dense: sparse attention would not pay off there.

The spec is a JSON string (a torch.library op takes strings, not objects): `Spec.to_json()`.
Estimation costs O(H * S * (block_size * D)) for vertical-slash and O(H * (S / block_size)^2 * D)
for block top-k, against O(H * S^2 * D) for the attention it prunes.
"""

from __future__ import annotations

import contextlib
import json
import math
from dataclasses import asdict, dataclass, field
from typing import Iterator

import torch
import torch.nn.functional as F

from compiler.cost_model.rules import OpCost, TensorInfo
from compiler.cost_model.work import Work
from compiler.ops.block_sparse_attention import num_blocks
from compiler.ops.registry import compiler_op

PATTERN_KINDS = ("dense", "streaming", "vertical_slash", "block_topk")


@dataclass(frozen=True)
class HeadPattern:
    """One head's pattern; block counts are in blocks of the layout's block size."""

    kind: str = "dense"
    sink: int = 1
    window: int = 4
    gamma: float = 0.9
    budget: int = 1 << 30

    def __post_init__(self) -> None:
        if self.kind not in PATTERN_KINDS:
            raise ValueError(f"unknown sparse attention pattern {self.kind!r}; choose one of {', '.join(PATTERN_KINDS)}")
        if self.sink < 0 or self.window < 1:
            raise ValueError(f"pattern {self.kind}: sink must be >= 0 and window >= 1 blocks, got {self.sink} and {self.window}")
        if not 0.0 < self.gamma <= 1.0:
            raise ValueError(f"pattern {self.kind}: gamma is a fraction of attention mass in (0, 1], got {self.gamma}")

    def short(self) -> str:
        if self.kind == "streaming":
            return f"streaming(sink={self.sink}, window={self.window})"
        if self.kind in ("vertical_slash", "block_topk"):
            return f"{self.kind}(gamma={self.gamma:g})"
        return self.kind


@dataclass(frozen=True)
class Spec:
    """The layout of one attention site: a pattern per query head."""

    heads: tuple[HeadPattern, ...]
    block_size: int = 64
    min_length: int = 0
    last_queries: int = field(default=64)

    def to_json(self) -> str:
        return json.dumps({**asdict(self), "heads": [asdict(h) for h in self.heads]}, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Spec:
        raw = json.loads(text)
        return cls(tuple(HeadPattern(**h) for h in raw.pop("heads")), **raw)


def _fake(q: torch.Tensor, k: torch.Tensor, spec: str) -> tuple[torch.Tensor, torch.Tensor]:
    parsed = Spec.from_json(spec)
    b, h, s, _ = q.shape
    nb = -(-s // parsed.block_size)  # works for SymInts too
    return q.new_empty((b, h, nb, nb), dtype=torch.int32), q.new_empty((b, h, nb), dtype=torch.int32)


def _cost(q: TensorInfo, k: TensorInfo, spec: str) -> OpCost:
    parsed = Spec.from_json(spec)
    b, h, s, d = q.shape
    heads = b * h
    blocks = s / parsed.block_size
    # vertical-slash: the last query block against all keys; block top-k: pooled blocks
    flops = 2 * heads * d * (parsed.last_queries * s + blocks * blocks)
    layout = 4 * heads * blocks * (blocks + 1)
    return OpCost(Work({q.dtype_name: flops}, vector_flops=heads * (s * d + parsed.last_queries * s),
                       transcendentals=heads * (parsed.last_queries * s + blocks * blocks),
                       bytes_read=q.nbytes + k.nbytes, bytes_written=layout), "attention")


@compiler_op("sparse_attention_layout", fake=_fake, cost=_cost)
def sparse_attention_layout(q: torch.Tensor, k: torch.Tensor, spec: str) -> tuple[torch.Tensor, torch.Tensor]:
    parsed = Spec.from_json(spec)
    b, hq, s, _ = q.shape
    if len(parsed.heads) != hq:
        raise ValueError(f"sparse_attention_layout: the spec has {len(parsed.heads)} head patterns for {hq} query heads")
    mask = block_masks(q, k, parsed)
    for meter in _meters:
        meter.add(mask)
    return layout_from_mask(mask)


@dataclass
class DensityMeter:
    """Blocks the layouts built inside `measure_density()` kept, out of their causal blocks."""

    kept: int = 0
    causal: int = 0

    def add(self, mask: torch.Tensor) -> None:
        nb = mask.shape[-1]
        self.kept += int(mask.sum())
        self.causal += mask[..., 0, 0].numel() * nb * (nb + 1) // 2

    @property
    def density(self) -> float | None:
        return self.kept / self.causal if self.causal else None


_meters: list[DensityMeter] = []


@contextlib.contextmanager
def measure_density() -> Iterator[DensityMeter]:
    """Measure the density of every layout this op builds in the block (on this thread's
    calls): what a sparse model really attended, as opposed to the calibrated estimate."""
    meter = DensityMeter()
    _meters.append(meter)
    try:
        yield meter
    finally:
        _meters.remove(meter)


def block_masks(q: torch.Tensor, k: torch.Tensor, spec: Spec, estimates: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    """The [B, Hq, NB, NB] boolean block mask of `spec` for these inputs; the heads that share
    a pattern kind are estimated together. `estimates`, when given, keeps each kind's scores
    for later calls on the same q and k (calibration tries many thresholds on one estimate)."""
    b, hq, s, _ = q.shape
    nb = num_blocks(s, spec.block_size)
    causal = torch.ones(nb, nb, dtype=torch.bool, device=q.device).tril()
    if s < spec.min_length:
        return causal.expand(b, hq, nb, nb).clone()
    qb_index = torch.arange(nb, device=q.device)[:, None]
    kb_index = torch.arange(nb, device=q.device)[None, :]
    out = ((kb_index == qb_index) | (kb_index < 1)).expand(b, hq, nb, nb).clone()
    scale = 1.0 / math.sqrt(q.shape[-1])

    def per_head(name: str) -> torch.Tensor:
        return torch.tensor([getattr(p, name) for p in spec.heads], device=q.device)[:, None, None]

    for kind in PATTERN_KINDS:
        heads = [h for h, p in enumerate(spec.heads) if p.kind == kind]
        if not heads:
            continue
        index = torch.tensor(heads, device=q.device)
        # Each kind is computed for every head, then the heads of that kind are taken: the
        # estimates read the last queries or block means, cheaper than gathering q and
        # repeating k for a subset of heads.
        if kind == "dense":
            m = causal
        elif kind == "streaming":
            m = ((kb_index < per_head("sink")) | ((qb_index - kb_index) < per_head("window")))[index]
        else:
            estimates = {} if estimates is None else estimates
            if kind not in estimates:
                estimates[kind] = _ESTIMATES[kind](q, k, spec, scale, nb)
            m = _SELECT[kind](estimates[kind], per_head("gamma"), per_head("budget"), nb)[:, index]
        out[:, index] |= m
    return out & causal


def layout_from_mask(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(kv_blocks, kv_counts) listing the True blocks of each row, in increasing order."""
    nb = mask.shape[-1]
    counts = mask.sum(-1, dtype=torch.int32)
    # Sorting the keys "listed first, then by index" puts the listed blocks in order up front.
    order = torch.where(mask, torch.arange(nb, device=mask.device), nb + torch.arange(nb, device=mask.device))
    blocks = order.sort(-1).values
    blocks = torch.where(blocks < nb, blocks, 0).to(torch.int32)
    return blocks.contiguous(), counts.contiguous()


def density(mask: torch.Tensor) -> float:
    """The fraction of the causal blocks a block mask keeps."""
    nb = mask.shape[-1]
    return float(mask.sum()) / (mask[..., 0, 0].numel() * nb * (nb + 1) / 2)


def _keep_until(scores: torch.Tensor, gamma: torch.Tensor, budget: torch.Tensor) -> torch.Tensor:
    """Per row of `scores` (non-negative): the smallest set of the largest entries whose sum
    reaches `gamma` of the row's total, at most `budget` entries (both broadcast over rows)."""
    values, order = scores.sort(-1, descending=True)
    total = values.sum(-1, keepdim=True)
    before = values.cumsum(-1) - values  # mass of the entries ranked above each one
    rank = torch.arange(values.shape[-1], device=scores.device)
    keep_sorted = (before < gamma * total) & (rank < budget) & (values > 0)
    return torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)


def _grouped(q: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """[B, Hq, N, D] as [B, Hkv, G * N, D]: the query rows of each KV head's group together."""
    b, hq, n, d = q.shape
    return q.reshape(b, kv_heads, hq // kv_heads * n, d)


def _pool(x: torch.Tensor, bs: int) -> torch.Tensor:
    """Block means along dim 2 of [B, H, S, D] (the last block may be short)."""
    full = x.shape[2] // bs
    parts = [x[:, :, : full * bs].unflatten(2, (full, bs)).mean(3)]
    if full * bs < x.shape[2]:
        parts.append(x[:, :, full * bs :].mean(2, keepdim=True))
    return torch.cat(parts, 2)


def _vertical_slash(q: torch.Tensor, k: torch.Tensor, spec: Spec, scale: float, nb: int) -> torch.Tensor:
    """MInference's online estimate, in blocks, for every head (q [B, Hq, S, D], k
    [B, Hkv, S, D]): the last queries' attention mass per key block (vertical) and per block of
    distances (slash), [B, Hq, 2 * NB]."""
    b, h, s, _ = q.shape
    bs = spec.block_size
    last = min(spec.last_queries, s)
    positions = torch.arange(s - last, s, device=q.device)[:, None]
    keys = torch.arange(s, device=q.device)[None, :]
    scores = (_grouped(q[:, :, s - last :].float() * scale, k.shape[1]) @ k.float().transpose(-1, -2)).view(b, h, last, s)
    probs = torch.softmax(scores.masked_fill(keys > positions, -math.inf), -1)  # [B, H, last, S]
    pad = nb * bs - s
    vertical = F.pad(probs.sum(2), (0, pad)).view(b, h, nb, bs).sum(-1)  # mass per key block
    # slash lines: mass per distance (query - key), then per block of distances
    distance = (positions - keys).clamp_min(0).reshape(-1).expand(b, h, -1)
    by_distance = probs.new_zeros(b, h, s).scatter_add_(-1, distance, probs.reshape(b, h, -1))
    slash = F.pad(by_distance, (0, pad)).view(b, h, nb, bs).sum(-1)
    return torch.cat([vertical, slash], -1)


def _select_vertical_slash(scores: torch.Tensor, gamma: torch.Tensor, budget: torch.Tensor, nb: int) -> torch.Tensor:
    """The heaviest columns and diagonals until `gamma` of the mass (gamma, budget [Hq, 1, 1])."""
    keep = _keep_until(scores, gamma[:, 0], 2 * budget[:, 0])  # rows [B, H]
    columns, diagonals = keep[..., :nb], keep[..., nb:]
    offset = (torch.arange(nb, device=scores.device)[:, None] - torch.arange(nb, device=scores.device)[None, :]).clamp(0, nb - 1)
    # the distances of block distance j reach block offsets j and j + 1
    near = diagonals | F.pad(diagonals[..., :-1], (1, 0))
    return columns[..., None, :] | near[..., offset]


def _block_topk(q: torch.Tensor, k: torch.Tensor, spec: Spec, scale: float, nb: int) -> torch.Tensor:
    """FlexPrefill's query-aware estimate for every head (q [B, Hq, S, D], k [B, Hkv, S, D]):
    each query block's estimated distribution over key blocks, [B, Hq, NB, NB]."""
    b, h, s, _ = q.shape
    bs = spec.block_size
    sizes = torch.full((nb,), float(bs), device=q.device)
    sizes[-1] = s - (nb - 1) * bs
    q_pool, k_pool = _pool(q.float(), bs), _pool(k.float(), bs)
    # a key block's estimated mass is its size times exp(pooled score)
    scores = (_grouped(q_pool * scale, k.shape[1]) @ k_pool.transpose(-1, -2)).view(b, h, nb, nb) + sizes.log()
    causal = torch.ones(nb, nb, dtype=torch.bool, device=q.device).tril()
    return torch.softmax(scores.masked_fill(~causal, -math.inf), -1)


def _select_block_topk(probs: torch.Tensor, gamma: torch.Tensor, budget: torch.Tensor, nb: int) -> torch.Tensor:
    """Per query block, the heaviest key blocks until `gamma` of the estimate."""
    return _keep_until(probs, gamma, budget)


_ESTIMATES = {"vertical_slash": _vertical_slash, "block_topk": _block_topk}
_SELECT = {"vertical_slash": _select_vertical_slash, "block_topk": _select_block_topk}
