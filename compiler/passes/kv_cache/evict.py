"""KVEvict: explicit-cache graphs for a cache that keeps a budget of positions (StreamingLLM,
SnapKV, H2O; see `compiler.kv_cache.eviction` for the policies).

Which positions to keep is the cache's decision, but SnapKV and H2O rank positions by the
attention they receive, which SDPA never exposes. So the pass adds, next to each layer's
attention site, `compiler::attention_key_scores` over the same queries and keys, and appends its
result to the graph's outputs (one per layer, after the keys and values):

- prefill graphs (`snapkv`: the last `window` queries, SnapKV's observation window; `h2o`: every
  query, the attention the prompt's keys accumulate);
- decode graphs (`h2o` only: the new query's attention over the cache and itself).

`streaming` needs no scores and leaves both graphs as they are. The graph's `meta["kv_cache"]`
records the policy and budget for `compiler.kv_cache.cache_for`. The result records the cache
bytes the budget keeps against the full cache at `report_length` prompt tokens; the cost
model prices the added scores with the rest of the graph (the op declares its cost).
"""

from __future__ import annotations

from typing import Any

import torch.fx as fx

from compiler.errors import UserInputError
from compiler.ir import propagate_meta
from compiler.kv_cache.eviction import POLICIES, budget_tokens
from compiler.ops import attention_key_scores as KEY_SCORES
from compiler.passes.base import Pass, PassResult
from compiler.passes.kv_cache.sites import NOT_DECODE, decode_sites, graph_outputs, prefill_sites, site_scale


class KVEvict(Pass):
    name = "kv_evict"
    lossy = True

    def __init__(self, policy: str = "snapkv", budget: float = 0.5, sink: int = 4, window: int = 32, pool: int = 7, recent: float = 0.5, report_length: int = 4096) -> None:
        if policy not in POLICIES:
            raise UserInputError(f"kv_evict: unknown policy {policy!r}; choose one of {', '.join(POLICIES)}")
        budget_tokens(budget, 1)
        if window < 1 or sink < 0 or pool < 1 or not 0 < recent <= 1:
            raise UserInputError("kv_evict: window and pool must be >= 1, sink >= 0, recent a fraction in (0, 1]")
        self.policy, self.budget, self.sink, self.window, self.pool, self.recent = policy, budget, sink, window, pool, recent
        self.report_length = report_length

    def config(self) -> dict[str, Any]:
        return {"policy": self.policy, "budget": self.budget, "sink": self.sink, "window": self.window, "pool": self.pool, "recent": self.recent}

    def run(self, gm: fx.GraphModule, ctx: Any) -> PassResult:
        result = PassResult()
        result.stats = {**self.config(), "left": []}
        if gm.meta.get("kv_cache", {}).get("kind", "full") != "full":
            result.stats["left"].append(f"the graph already reads a {gm.meta['kv_cache']['kind']} cache")
            return result
        decode, why_decode = decode_sites(gm)
        if decode and not why_decode:
            layers = len(decode)
            scored = [(s.site.q, s.k_cat, site_scale(s.site), 1) for s in decode] if self.policy == "h2o" else []
            phase = "decode"
        else:
            _, outputs = graph_outputs(gm)
            layers = (len(outputs) - 1) // 2
            sites, why = prefill_sites(gm, layers)
            if why or not sites:
                result.stats["left"] = why_decode + why or [NOT_DECODE]
                return result
            last = self.window if self.policy == "snapkv" else 0
            scored = [(s.q, s.k, site_scale(s), last) for s in sites] if self.policy != "streaming" else []
            phase = "prefill"
        added = _add_score_outputs(gm, scored)
        for i, node in enumerate(added):
            result.record(f"layer {i}: {node.name} = attention each key receives, a new {phase} output for {self.policy}")
        if not added:
            result.record(f"{phase} graph unchanged: {self.policy} needs no scores here")
        gm.meta["kv_cache"] = {"kind": "evict", "layers": layers, **self.config(), "scores": bool(added)}
        kept = budget_tokens(self.budget, self.report_length)
        result.stats.update(phase=phase, layers=layers, report_length=self.report_length, kept_tokens=min(kept, self.report_length), memory_ratio=round(self.report_length / min(kept, self.report_length), 3))
        return result


def _add_score_outputs(gm: fx.GraphModule, scored: list[tuple[fx.Node, fx.Node, float, int]]) -> list[fx.Node]:
    if not scored:
        return []
    output, outputs = graph_outputs(gm)
    added = []
    with gm.graph.inserting_before(output):
        for q, k, scale, last in scored:
            added.append(gm.graph.call_function(KEY_SCORES.overload, (q, k, scale, last)))
    propagate_meta(gm, added)
    output.args = (tuple(outputs + added),)
    return added
