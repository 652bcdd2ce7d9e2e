"""KV-cache passes on explicit-cache decode graphs (`compiler.generation`): quantization (KIVI)."""

from compiler.passes.kv_cache.quantize import KVQuantize

__all__ = ["KVQuantize"]
