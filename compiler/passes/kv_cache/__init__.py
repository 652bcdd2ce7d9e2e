"""KV-cache passes on explicit-cache graphs (`compiler.generation`): quantization (KIVI) and
eviction (StreamingLLM, SnapKV, H2O)."""

from compiler.passes.kv_cache.evict import KVEvict
from compiler.passes.kv_cache.quantize import KVQuantize

__all__ = ["KVEvict", "KVQuantize"]
