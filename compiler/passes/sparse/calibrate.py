"""Offline per-head pattern selection for sparse attention (MInference, DuoAttention).

MInference picks each head's pattern offline and builds its indices online; DuoAttention finds
by calibration which heads need full attention ("retrieval heads") and which do with attention
sinks plus recent tokens ("streaming heads"). Both rest on one measurement, done here: run the
model on calibration text, and for every attention site and head compare the exact attention
with what each candidate pattern would keep.

- `collect_qk` runs the graph on calibration inputs and hands each site's q and k to a callback
  as soon as they are computed (one site's tensors alive at a time, not the model's);
- `block_mass` is the exact attention, summed per (query block, key block): row r is the mean
  over query block r's queries of each query's attention mass per key block (rows sum to 1);
- `score_candidates` measures each candidate's recall (the attention mass it keeps, mean over
  query blocks) and density (the fraction of causal blocks it keeps) per head; with `last=n`,
  the recall of the last n queries only: on retrieval prompts (a passkey hidden far back, the
  question at the end) those are the queries that must reach the needle, and a mean over all
  query blocks would drown them (on SmolLM2 at 4096 tokens, heads chosen by the mean alone kept
  3 of 10 passkeys that dense attention retrieved);
- `choose` takes, per head, the sparsest candidate whose recall reaches the target on text, and
  on retrieval prompts when there are some, or keeps the head dense (a retrieval head) when
  none does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
import torch.fx as fx

from compiler.calibration import record
from compiler.ops.block_sparse_attention import num_blocks
from compiler.ops.sparse_layout import HeadPattern, Spec, block_masks

DENSE = HeadPattern("dense")


def candidates(method: str, gammas: Sequence[float] = (0.8, 0.9, 0.95, 0.98), windows: Sequence[int] = (2, 4, 8, 16, 32)) -> list[HeadPattern]:
    """The patterns calibration chooses among: `calibrated` tries every kind, `duo` only the
    streaming shapes (a head is streaming or keeps full attention)."""
    streaming = [HeadPattern("streaming", sink=1, window=w) for w in windows]
    if method == "duo":
        return streaming
    return [
        *streaming,
        *(HeadPattern("vertical_slash", gamma=g) for g in gammas),
        *(HeadPattern("block_topk", gamma=g) for g in gammas),
    ]


def collect_qk(gm: fx.GraphModule, sites: Sequence[Any], batches: Sequence[Sequence[Any]], on_site: Callable[[int, int, torch.Tensor, torch.Tensor], None]) -> None:
    """For each batch (flat graph inputs) and site: `on_site(batch, site, q, k)`."""
    wanted: dict[fx.Node, tuple[int, str]] = {}
    for i, site in enumerate(sites):
        wanted[site.q] = (i, "q")
        wanted[site.k] = (i, "k")  # a node can be both only for self-attention on one tensor
    pending: dict[tuple[int, int], dict[str, torch.Tensor]] = {}

    def report(b: int, node: fx.Node, value: torch.Tensor) -> None:
        site, role = wanted[node]
        got = pending.setdefault((b, site), {})
        got[role] = value.detach()
        if len(got) == 2:
            on_site(b, site, got["q"], got["k"])
            del pending[(b, site)]

    record(gm, wanted, batches, report)


def block_mass(q: torch.Tensor, k: torch.Tensor, scale: float, block_size: int, chunk: int = 512) -> torch.Tensor:
    """Exact causal attention mass per (query block, key block): [B, Hq, NB, NB], rows sum to 1.
    q [B, Hq, S, D], k [B, Hkv, S, D]; queries go in chunks so the probabilities of only
    `chunk` queries per head exist at a time."""
    b, hq, s, d = q.shape
    hkv = k.shape[1]
    g = hq // hkv
    nb = num_blocks(s, block_size)
    pad = nb * block_size - s
    keys = torch.arange(s, device=q.device)
    out = torch.zeros(b, hq, nb, nb, dtype=torch.float32, device=q.device)
    kt = k.float().transpose(-1, -2)
    for start in range(0, s, chunk):
        stop = min(s, start + chunk)
        rows = stop - start
        qc = q[:, :, start:stop].float().reshape(b, hkv, g * rows, d) * scale
        scores = (qc @ kt).view(b, hq, rows, s)
        causal = keys[None, :] > torch.arange(start, stop, device=q.device)[:, None]
        probs = torch.softmax(scores.masked_fill(causal, -math.inf), -1)
        per_block = torch.nn.functional.pad(probs, (0, pad)).view(b, hq, rows, nb, block_size).sum(-1)
        block_of_row = torch.arange(start, stop, device=q.device) // block_size
        out.index_add_(2, block_of_row, per_block)
    sizes = torch.full((nb,), float(block_size), device=q.device)
    sizes[-1] = s - (nb - 1) * block_size
    return out / sizes[:, None]


@dataclass
class HeadScores:
    """Recall and density of each candidate for each head of one site, summed over batches."""

    recall: torch.Tensor  # [candidates, Hq]
    density: torch.Tensor  # [candidates, Hq]
    batches: int = 0


def last_query_mass(q: torch.Tensor, k: torch.Tensor, scale: float, block_size: int, last: int) -> torch.Tensor:
    """Exact causal attention mass of each of the last `last` queries per key block:
    [B, Hq, last, NB], rows sum to 1."""
    b, hq, s, d = q.shape
    hkv = k.shape[1]
    g = hq // hkv
    last = min(last, s)
    nb = num_blocks(s, block_size)
    qc = q[:, :, s - last :].float().reshape(b, hkv, g * last, d) * scale
    scores = (qc @ k.float().transpose(-1, -2)).view(b, hq, last, s)
    causal = torch.arange(s, device=q.device)[None, :] > torch.arange(s - last, s, device=q.device)[:, None]
    probs = torch.softmax(scores.masked_fill(causal, -math.inf), -1)
    return torch.nn.functional.pad(probs, (0, nb * block_size - s)).view(b, hq, last, nb, block_size).sum(-1)


def score_candidates(
    q: torch.Tensor, k: torch.Tensor, scale: float, block_size: int, patterns: Sequence[HeadPattern], last: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(recall, density) per candidate and head, [len(patterns), Hq], for one batch of q/k.
    Recall is the mean over query blocks of the mass kept, or with `last` the mean over the
    last `last` queries."""
    s = q.shape[-2]
    if last is None:
        mass = block_mass(q, k, scale, block_size)
    else:
        last = min(last, s)
        mass = last_query_mass(q, k, scale, block_size, last)
        rows = torch.arange(s - last, s, device=q.device) // block_size
    hq, nb = q.shape[1], mass.shape[-1]
    causal_blocks = nb * (nb + 1) / 2
    recall, density = [], []
    estimates: dict[str, torch.Tensor] = {}  # one estimate per kind serves all its thresholds
    for pattern in patterns:
        mask = block_masks(q, k, Spec((pattern,) * hq, block_size), estimates)
        kept = mask if last is None else mask[:, :, rows]  # each query's row of its block
        recall.append((mass * kept).sum(-1).mean(-1).mean(0))
        density.append(mask.sum((-1, -2)).float().mean(0) / causal_blocks)
    return torch.stack(recall), torch.stack(density)


def choose(
    recall: torch.Tensor,
    density: torch.Tensor,
    patterns: Sequence[HeadPattern],
    target: float,
    retrieval: torch.Tensor | None = None,
    retrieval_target: float | None = None,
) -> list[tuple[HeadPattern, float, float]]:
    """Per head: (pattern, recall, density) of the sparsest candidate reaching `target`
    recall (and `retrieval_target` on the `retrieval` recalls, when given), or (dense, 1, 1)
    when none does with fewer blocks than dense (a window longer than the calibration text keeps
    everything: that is dense attention, not a sparse pattern)."""
    if retrieval is not None:
        need = target if retrieval_target is None else retrieval_target
        retrieves = retrieval >= need
    else:
        retrieves = torch.ones_like(recall, dtype=torch.bool)
    chosen = []
    for h in range(recall.shape[1]):
        ok = [
            (float(density[c, h]), -float(recall[c, h]), c)
            for c in range(len(patterns))
            if recall[c, h] >= target and retrieves[c, h] and density[c, h] < 1
        ]
        if not ok:
            chosen.append((DENSE, 1.0, 1.0))
            continue
        d, r, c = min(ok)
        chosen.append((patterns[c], -r, d))
    return chosen
