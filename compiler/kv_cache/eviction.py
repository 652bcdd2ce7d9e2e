"""Caches that keep a budget of positions: StreamingLLM, SnapKV and H2O.

Keys are cached after RoPE, so a kept key means the same wherever it sits in the cache, and the
decode graph takes the true position as an input: dropping entries needs nothing from the
graph but the scores the policy ranks by. Every head keeps the same number of entries (the
budget), not the same positions, so the cache stays [B, Hkv, n, D] tensors; `positions`
[B, Hkv, n] records which positions each head kept (sorted), for tests and reports.

- `streaming` (StreamingLLM, Xiao et al. 2024): the first `sink` positions and the most recent
  ones, for the prompt and at every decode step;
- `snapkv` (Li et al. 2024): after the prompt, the observation window (its last `window`
  queries) votes with its attention, pooled over `pool` neighbouring positions; each head keeps
  the window and the positions before it with the most votes. Decoded tokens are all kept, as
  in the paper (the cache grows by one per step from the budget);
- `h2o` (Zhang et al. 2023): every query's attention accumulates on the keys it reads; a head
  keeps the `recent` most recent positions and the heavy hitters, the rest of the budget with
  the largest accumulated attention, evicting one entry per decode step once full.

The budget is a number of tokens, or a fraction of the prompt (0 < budget <= 1).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F

from compiler.errors import UserInputError
from compiler.kv_cache.cache import KVCache, _nbytes

POLICIES = ("streaming", "snapkv", "h2o")


def budget_tokens(budget: float, prompt: int) -> int:
    """The tokens a budget keeps for a prompt of `prompt` tokens."""
    if budget <= 0:
        raise UserInputError(f"KV eviction: the budget must be a positive number of tokens or a fraction in (0, 1], got {budget}")
    return max(1, math.ceil(budget * prompt)) if budget <= 1 else int(budget)


class EvictingCache(KVCache):
    kind = "evict"

    def __init__(self, layers: int, policy: str, budget: float, sink: int = 4, window: int = 32, pool: int = 7, recent: float = 0.5) -> None:
        super().__init__(layers)
        if policy not in POLICIES:
            raise UserInputError(f"KV eviction: unknown policy {policy!r}; choose one of {', '.join(POLICIES)}")
        budget_tokens(budget, 1)  # validates
        self.policy, self.budget, self.sink, self.window, self.pool, self.recent = policy, budget, sink, window, pool, recent
        self.capacity = 0
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.positions: list[torch.Tensor] = []
        self.scores: list[torch.Tensor] = []  # h2o: attention accumulated per kept entry

    @property
    def needs_scores(self) -> bool:
        return self.policy in ("snapkv", "h2o")

    def load(self, keys: Sequence[torch.Tensor], values: Sequence[torch.Tensor], scores: Sequence[torch.Tensor] | None = None) -> None:
        self._check(keys, values)
        if self.needs_scores and (scores is None or len(scores) != self.layers):
            raise ValueError(f"{self.policy} needs the prefill graph's attention scores (compile it with the kv_evict pass)")
        b, h, n, _ = keys[0].shape
        self.length = n
        self.capacity = budget_tokens(self.budget, n)
        all_positions = torch.arange(n).expand(b, h, n)
        self.keys, self.values, self.positions, self.scores = [], [], [], []
        for i in range(self.layers):
            keep = all_positions if n <= self.capacity else self._choose_prompt(n, scores[i] if scores is not None else None, b, h)
            self._keep(keys[i], values[i], keep, scores[i] if self.policy == "h2o" else None)

    def _choose_prompt(self, n: int, scores: torch.Tensor | None, b: int, h: int) -> torch.Tensor:
        """Sorted positions [B, H, capacity] to keep of a prompt of n > capacity tokens."""
        cap = self.capacity
        if self.policy == "streaming":
            return self._sinks_and_recent(n).expand(b, h, cap)
        assert scores is not None
        tail = min(self.window, cap) if self.policy == "snapkv" else self._recent(cap)
        votes = scores[..., : n - tail].float()
        if self.policy == "snapkv" and self.pool > 1 and votes.shape[-1]:
            votes = F.avg_pool1d(votes.reshape(b * h, 1, -1), self.pool, stride=1, padding=self.pool // 2, count_include_pad=False).view(b, h, -1)
        # the best-scored positions before the tail (SnapKV's window, H2O's recent tokens), then the tail
        chosen = votes.topk(cap - tail, -1).indices
        return torch.cat([chosen, torch.arange(n - tail, n).expand(b, h, tail)], -1).sort(-1).values

    def _sinks_and_recent(self, n: int) -> torch.Tensor:
        """StreamingLLM's slots of n: the first `sink` and the most recent, `capacity` in all."""
        sink = min(self.sink, self.capacity)
        return torch.cat([torch.arange(sink), torch.arange(n - (self.capacity - sink), n)])

    def _recent(self, cap: int) -> int:
        return min(cap, max(1, round(self.recent * cap)))

    def _keep(self, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor, scores: torch.Tensor | None) -> None:
        index = positions[..., None]
        self.keys.append(k.gather(2, index.expand(-1, -1, -1, k.shape[-1])).contiguous())
        self.values.append(v.gather(2, index.expand(-1, -1, -1, v.shape[-1])).contiguous())
        self.positions.append(positions.clone())
        if scores is not None:
            self.scores.append(scores.float().gather(2, positions))

    def append(self, keys: Sequence[torch.Tensor], values: Sequence[torch.Tensor], scores: Sequence[torch.Tensor] | None = None) -> None:
        self._check(keys, values)
        if self.policy == "h2o" and (scores is None or len(scores) != self.layers):
            raise ValueError("h2o needs the decode graph's attention scores (compile it with the kv_evict pass)")
        position = self.length
        self.length += 1
        for i in range(self.layers):
            k = torch.cat([self.keys[i], keys[i]], 2)
            v = torch.cat([self.values[i], values[i]], 2)
            b, h = k.shape[:2]
            positions = torch.cat([self.positions[i], torch.full((b, h, 1), position)], 2)
            acc = torch.cat([self.scores[i], torch.zeros(b, h, 1)], 2) + scores[i] if self.policy == "h2o" else None
            n = k.shape[2]
            if self.policy == "snapkv" or n <= self.capacity:
                keep = None
            elif self.policy == "streaming":
                keep = self._sinks_and_recent(n).expand(b, h, -1)
            else:  # h2o: drop the lightest entry outside the recent window
                assert acc is not None
                recent = self._recent(self.capacity)
                drop = acc[..., : n - recent].argmin(-1, keepdim=True)
                slots = torch.arange(n).expand(b, h, n)
                keep = slots[slots != drop].view(b, h, n - 1)
            if keep is None:
                self.keys[i], self.values[i], self.positions[i] = k, v, positions
                if acc is not None:
                    self.scores[i] = acc
                continue
            index = keep[..., None]
            self.keys[i] = k.gather(2, index.expand(-1, -1, -1, k.shape[-1]))
            self.values[i] = v.gather(2, index.expand(-1, -1, -1, v.shape[-1]))
            self.positions[i] = positions.gather(2, keep)
            if acc is not None:
                self.scores[i] = acc.gather(2, keep)

    def graph_inputs(self) -> list[torch.Tensor]:
        return [*self.keys, *self.values]

    def nbytes(self) -> int:
        return _nbytes(self.keys + self.values)
