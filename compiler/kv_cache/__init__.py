"""KV caches that explicit-cache decode graphs (`compiler.generation`) read and write.

A cache object holds what a decode graph's past inputs are made of and keeps it up to date:
`load` takes the prompt's keys and values from the prefill graph, `append` the new ones of
each decode step, `graph_inputs` hands the decode graph its past inputs in placeholder order,
`nbytes` says what it holds in memory. Which cache a compiled decode graph needs is written in
the graph (`meta["kv_cache"]`, set by the pass that changed its inputs); `cache_for` makes it.
"""

from compiler.kv_cache.cache import FullCache, KIVICache, KVCache, cache_for, fp16_bytes
from compiler.kv_cache.eviction import POLICIES, EvictingCache, budget_tokens

__all__ = ["POLICIES", "EvictingCache", "FullCache", "KIVICache", "KVCache", "budget_tokens", "cache_for", "fp16_bytes"]
