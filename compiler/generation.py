"""Explicit-cache decoding: a decoder LM's prefill and decode step as two graphs in which the KV
cache is an input and an output, compiled by the one pipeline and driven by a cache object.

HF models keep their cache in a Python object that a graph cannot carry, and the export-friendly
`StaticCache` hides it in mutable buffers (`index_copy_` into [B, H, max_len, D] tensors). Here the
cache is plain tensors at the graph boundary instead, so that a pass can change what they are:

- prefill(input_ids [B, S]) -> (logits of the last position [B, 1, V], keys_0..keys_{L-1},
  values_0..values_{L-1}), each [B, Hkv, S, D] (after RoPE: what attention reads);
- decode(input_ids [B, 1], position_ids [B, 1], past_keys_0.., past_values_0..) ->
  (logits [B, 1, V], new_keys_0.., new_values_0..), each new one [B, Hkv, 1, D]; the past length
  is symbolic, so one graph serves every step. Attention reads cat(past, new).

Positions are an input of the decode step (not the cache length), so a cache that evicts
entries still gives RoPE the true position. The cache object (`compiler.kv_cache`) decides what
the past is: the full fp cache hands in every key; the KIVI cache, whose decode graph the
`kv_quantize` pass rewrote, hands in its full-precision residual plus packed codes and scales
(the inputs that pass appended, described by the graph's `meta["kv_cache"]`).

An eviction pass (`kv_evict`) may append one output per layer to either graph: the attention
each key received ([B, Hkv, n]), which the evicting cache ranks positions by.

`CachedLM` captures both graphs (torch.export, dynamic lengths), `compile` runs them through
`compile_graph` with any pipeline, and `Session` runs prefill then one decode step per token:
`generate` (greedy) and `score` (teacher-forced log-probabilities of a given continuation, for
perplexity through real token-by-token decode).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from compiler.capture import Captured, capture_export
from compiler.errors import UserInputError


class _Prefill(torch.nn.Module):
    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
        from transformers import DynamicCache

        cache = DynamicCache()
        out = self.model(input_ids=input_ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
        return out.logits, [layer.keys for layer in cache.layers], [layer.values for layer in cache.layers]


class _Decode(torch.nn.Module):
    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(
        self, input_ids: torch.Tensor, position_ids: torch.Tensor, past_keys: list[torch.Tensor], past_values: list[torch.Tensor]
    ) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
        from transformers import DynamicCache

        t = past_keys[0].shape[2]
        cache = DynamicCache(ddp_cache_data=list(zip(past_keys, past_values)))
        out = self.model(input_ids=input_ids, position_ids=position_ids, past_key_values=cache, use_cache=True)
        return out.logits, [layer.keys[:, :, t:] for layer in cache.layers], [layer.values[:, :, t:] for layer in cache.layers]


@dataclass(frozen=True)
class CacheShape:
    """What every cache of a model shares: layers, KV heads, head dims, dtype."""

    layers: int
    kv_heads: int
    head_dim: int
    value_dim: int
    dtype: torch.dtype


@dataclass
class CachedLM:
    """A decoder LM's prefill and decode graphs (see the module docstring)."""

    prefill: Captured
    decode: Captured
    shape: CacheShape
    capture_seconds: float

    @classmethod
    def capture(cls, model: torch.nn.Module, say: Callable[[str], None] = lambda _: None) -> CachedLM:
        """Export both graphs (about a minute each for SmolLM2 on the 2-core host)."""
        config = getattr(model, "config", None)
        if config is None or not hasattr(config, "num_hidden_layers"):
            raise UserInputError(f"{type(model).__name__} is not an HF decoder LM (no config.num_hidden_layers); explicit-cache capture needs one")
        layers = config.num_hidden_layers
        kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        dtype = next(model.parameters()).dtype
        shape = CacheShape(layers, kv_heads, head_dim, head_dim, dtype)
        start = time.perf_counter()
        ids = torch.zeros(1, 16, dtype=torch.int64)
        say("capturing prefill (torch.export, dynamic length)")
        prefill = capture_export(_Prefill(model), (ids,), {}, dynamic_shapes={"input_ids": {1: torch.export.Dim.DYNAMIC}})
        past = [torch.zeros(1, kv_heads, 16, head_dim, dtype=dtype) for _ in range(layers)]
        length = torch.export.Dim.DYNAMIC
        say("capturing the decode step (torch.export, dynamic cache length)")
        decode = capture_export(
            _Decode(model),
            (ids[:, :1], torch.full((1, 1), 16), past, [p.clone() for p in past]),
            {},
            dynamic_shapes={"input_ids": None, "position_ids": None, "past_keys": [{2: length}] * layers, "past_values": [{2: length}] * layers},
        )
        return cls(prefill, decode, shape, time.perf_counter() - start)


Runner = Callable[..., Any]  # flat graph inputs -> flat graph outputs


class Session:
    """One sequence's generation: `prefill(ids)`, then `step(token)` per new token.

    `prefill_fn` and `decode_fn` take flat graph inputs and return flat outputs (a compiled
    graph's `executable`, or the captured graph itself); the cache decides the decode graph's
    past inputs (see `compiler.kv_cache`).
    """

    def __init__(self, prefill_fn: Runner, decode_fn: Runner, cache: Any) -> None:
        self.prefill_fn = prefill_fn
        self.decode_fn = decode_fn
        self.cache = cache
        self.position = 0

    def prefill(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Run the prompt [B, S]; returns the logits of its last position [B, V]."""
        if input_ids.dim() != 2 or input_ids.shape[1] < 2:
            raise UserInputError(f"prefill takes input_ids [B, S] with S >= 2, got {list(input_ids.shape)}")
        with torch.no_grad():
            logits, keys, values, scores = self._split(self.prefill_fn(input_ids))
        self.cache.load(keys, values, scores)
        self.position = input_ids.shape[1]
        return logits[:, -1]

    def step(self, token: torch.Tensor) -> torch.Tensor:
        """Decode one token per batch entry ([B] or [B, 1]); returns the next logits [B, V]."""
        token = token.reshape(-1, 1)
        position = torch.full_like(token, self.position)
        with torch.no_grad():
            logits, keys, values, scores = self._split(self.decode_fn(token, position, *self.cache.graph_inputs()))
        self.cache.append(keys, values, scores)
        self.position += 1
        return logits[:, -1]

    def generate(self, input_ids: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
        """Greedy decoding: the [B, max_new_tokens] tokens after the prompt."""
        logits = self.prefill(input_ids)
        out = []
        for i in range(max_new_tokens):
            token = logits.argmax(-1)
            out.append(token)
            if i + 1 < max_new_tokens:
                logits = self.step(token)
        return torch.stack(out, 1)

    def score(self, prompt: torch.Tensor, continuation: torch.Tensor) -> torch.Tensor:
        """Teacher forcing through real decode steps: the logits [B, N, V] that predicted each of
        the N continuation tokens (the first from the prefill, the others from one decode step
        each, fed the true previous token)."""
        logits = [self.prefill(prompt)]
        for i in range(continuation.shape[1] - 1):
            logits.append(self.step(continuation[:, i]))
        return torch.stack(logits, 1)

    def _split(self, flat: Sequence[Any]) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor], list[torch.Tensor] | None]:
        """(logits, keys, values, the attention scores an eviction pass added, or None)."""
        layers = self.cache.layers
        if len(flat) not in (1 + 2 * layers, 1 + 3 * layers):
            raise ValueError(f"a cached-LM graph returns logits plus {layers} keys and {layers} values (and {layers} scores); got {len(flat)} outputs")
        scores = list(flat[1 + 2 * layers :]) or None
        return flat[0], list(flat[1 : 1 + layers]), list(flat[1 + layers : 1 + 2 * layers]), scores


@dataclass
class CompiledLM:
    """A `CachedLM` compiled: both graphs through one pipeline; `session()` starts a sequence."""

    prefill: Any  # compiler.driver.CompileResult
    decode: Any
    layers: int

    def session(self) -> Session:
        from compiler.kv_cache import cache_for

        return Session(self.prefill.executable, self.decode.executable, cache_for(self.decode.ir.meta.get("kv_cache"), self.layers))


def compile_cached(lm: CachedLM, target: str = "host", budget: str = "lossless", passes: Sequence[Any] = (), **options: Any) -> CompiledLM:
    """Compile both graphs of `lm` with the default pipeline plus `passes` (KV-cache passes such
    as `KVQuantize(bits=4)` or `KVEvict("snapkv", 0.5)`, inserted after canonicalization).
    `budget` must allow loss for lossy passes to run."""
    from compiler.driver import CompileOptions, compile_graph
    from compiler.ir import copy_graph_module
    from compiler.passes import default_pipeline

    def build(gm: Any) -> Any:
        pipeline = default_pipeline()
        for i, p in enumerate(passes):
            pipeline.passes.insert(1 + i, p)
        return compile_graph(copy_graph_module(gm), CompileOptions.make(target, budget, pipeline=pipeline, **options))

    return CompiledLM(build(lm.prefill.gm), build(lm.decode.gm), lm.shape.layers)
