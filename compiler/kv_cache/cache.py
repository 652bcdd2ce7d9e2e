"""The full-precision cache and the KIVI quantized cache (see `compiler.kv_cache`)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Sequence

import torch

from compiler.errors import UserInputError
from compiler.ops import kv_quant


def _nbytes(tensors: Sequence[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def fp16_bytes(layers: int, batch: int, kv_heads: int, tokens: int, head_dim: int, value_dim: int) -> int:
    """Bytes of an fp16 cache of `tokens` positions: the reference memory ratios are taken to."""
    return 2 * layers * batch * kv_heads * tokens * (head_dim + value_dim)


class KVCache(ABC):
    """The per-layer past of a decode graph."""

    kind = "abstract"

    def __init__(self, layers: int) -> None:
        self.layers = layers
        self.length = 0  # positions seen (prompt plus decoded), whatever is kept of them

    @abstractmethod
    def load(self, keys: Sequence[torch.Tensor], values: Sequence[torch.Tensor], scores: Sequence[torch.Tensor] | None = None) -> None:
        """Take the prompt's keys and values, [B, Hkv, S, D] per layer (and the attention each
        key received, [B, Hkv, S], when the prefill graph gives it: eviction ranks by it)."""

    @abstractmethod
    def append(self, keys: Sequence[torch.Tensor], values: Sequence[torch.Tensor], scores: Sequence[torch.Tensor] | None = None) -> None:
        """Take one decode step's new keys and values, [B, Hkv, 1, D] per layer (and the
        attention over the cache plus the new key, [B, Hkv, n + 1], when the graph gives it)."""

    @abstractmethod
    def graph_inputs(self) -> list[torch.Tensor]:
        """The decode graph's past inputs, in its placeholder order."""

    @abstractmethod
    def nbytes(self) -> int:
        """Bytes held, everything the cache needs to reproduce its keys and values included."""

    def _check(self, keys: Sequence[torch.Tensor], values: Sequence[torch.Tensor]) -> None:
        if len(keys) != self.layers or len(values) != self.layers:
            raise ValueError(f"{self.kind} cache: {self.layers} layers, got {len(keys)} keys and {len(values)} values")


class FullCache(KVCache):
    """Every key and value at the model's precision; the decode graph reads cat(past, new)."""

    kind = "full"

    def __init__(self, layers: int) -> None:
        super().__init__(layers)
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []

    def load(self, keys: Sequence[torch.Tensor], values: Sequence[torch.Tensor], scores: Sequence[torch.Tensor] | None = None) -> None:
        self._check(keys, values)
        self.keys, self.values = [k.contiguous() for k in keys], [v.contiguous() for v in values]
        self.length = max(k.shape[2] for k in keys)  # a layer whose attention was skipped caches nothing

    def append(self, keys: Sequence[torch.Tensor], values: Sequence[torch.Tensor], scores: Sequence[torch.Tensor] | None = None) -> None:
        self._check(keys, values)
        self.keys = [torch.cat([a, b], 2) for a, b in zip(self.keys, keys)]
        self.values = [torch.cat([a, b], 2) for a, b in zip(self.values, values)]
        self.length += max(k.shape[2] for k in keys)

    def graph_inputs(self) -> list[torch.Tensor]:
        return [*self.keys, *self.values]

    def nbytes(self) -> int:
        return _nbytes(self.keys + self.values)


class KIVICache(KVCache):
    """KIVI: keys quantized per channel in groups of `k_group` tokens, values per token in groups
    of `v_group` channels, `bits` per element, fp16 scales and minimums (`compiler.ops.kv_quant`);
    the most recent tokens stay at full precision in a residual: when `residual + recent` of them
    are waiting, the oldest `residual` are quantized at once (a multiple of `k_group`, so keys
    always quantize in whole groups), so the residual holds between `recent` and
    `residual + recent - 1` tokens. `recent=0` is the paper's cycle (the residual empties).

    `sink` first positions of the sequence never quantize (IntactKV/StreamingLLM's observation:
    the attention sinks take much of every query's mass, so their error reaches every step);
    they sit at the head of the residual. A decode step has one query, which sees every cached
    key, so where a key sits among the inputs does not matter, and the kernels are unchanged.

    Decode graph inputs (the `kv_quantize` pass's layout): the residual keys of every layer,
    the residual values of every layer (where the unrewritten graph takes the full past), then
    per layer k_codes, k_scale, k_min, v_codes, v_scale, v_min.
    """

    kind = "kivi"

    def __init__(self, layers: int, bits: int = 4, k_group: int = 128, v_group: int = 64, residual: int = 128, sink: int = 0, recent: int = 0) -> None:
        super().__init__(layers)
        if bits not in kv_quant.BITS:
            raise UserInputError(f"KIVI cache: bits must be one of {kv_quant.BITS}, got {bits}")
        if k_group < 1 or residual < k_group or residual % k_group:
            raise UserInputError(f"KIVI cache: the residual ({residual} tokens) must be a positive multiple of the key group ({k_group}) so keys quantize in whole groups")
        if sink < 0 or recent < 0:
            raise UserInputError(f"KIVI cache: sink ({sink}) and recent ({recent}) count tokens kept at full precision; they cannot be negative")
        self.bits, self.k_group, self.v_group, self.residual = bits, k_group, v_group, residual
        self.sink, self.recent = sink, recent
        self.sinks = 0  # sink tokens held, at the head of the residual
        self.k_res: list[torch.Tensor] = []
        self.v_res: list[torch.Tensor] = []
        self.k_q: list[kv_quant.Quantized] = []
        self.v_q: list[kv_quant.Quantized] = []

    def load(self, keys: Sequence[torch.Tensor], values: Sequence[torch.Tensor], scores: Sequence[torch.Tensor] | None = None) -> None:
        self._check(keys, values)
        n = keys[0].shape[2]
        self.sinks = min(self.sink, n)
        cut = self.to_quantize(n - self.sinks)
        s, e = self.sinks, self.sinks + cut
        self.k_q = [self._keys(k[:, :, s:e]) for k in keys]
        self.v_q = [self._values(v[:, :, s:e]) for v in values]
        self.k_res = [_without(k, s, e) for k in keys]
        self.v_res = [_without(v, s, e) for v in values]
        self.length = n

    def append(self, keys: Sequence[torch.Tensor], values: Sequence[torch.Tensor], scores: Sequence[torch.Tensor] | None = None) -> None:
        self._check(keys, values)
        self.k_res = [torch.cat([a, b], 2) for a, b in zip(self.k_res, keys)]
        self.v_res = [torch.cat([a, b], 2) for a, b in zip(self.v_res, values)]
        self.length += keys[0].shape[2]
        if self.sinks < self.sink and self.quantized_tokens() == 0:  # a prompt shorter than the sinks
            self.sinks = min(self.sink, self.k_res[0].shape[2])
        cut = self.to_quantize(self.k_res[0].shape[2] - self.sinks)
        if cut:
            s, e = self.sinks, self.sinks + cut
            for i in range(self.layers):
                self.k_q[i] = _concat(self.k_q[i], self._keys(self.k_res[i][:, :, s:e]))
                self.v_q[i] = _concat(self.v_q[i], self._values(self.v_res[i][:, :, s:e]))
                self.k_res[i] = _without(self.k_res[i], s, e)
                self.v_res[i] = _without(self.v_res[i], s, e)

    def to_quantize(self, waiting: int) -> int:
        """How many of the `waiting` non-sink residual tokens to quantize now: whole blocks of
        `residual`, keeping at least `recent` at full precision."""
        return max(0, waiting - self.recent) // self.residual * self.residual

    def quantized_after(self, tokens: int) -> int:
        """Tokens held quantized once `tokens` positions have been cached (what the cache's
        schedule leaves at full precision is the rest: the sinks and the residual)."""
        return self.to_quantize(tokens - min(self.sink, tokens))

    def _keys(self, k: torch.Tensor) -> kv_quant.Quantized:
        return kv_quant.quantize_keys(k, self.bits, self.k_group)

    def _values(self, v: torch.Tensor) -> kv_quant.Quantized:
        # a group wider than the head is the whole head, as the kv_quantize pass records it
        return kv_quant.quantize_values(v, self.bits, min(self.v_group, v.shape[-1]))

    def graph_inputs(self) -> list[torch.Tensor]:
        extra = []
        for kq, vq in zip(self.k_q, self.v_q):
            extra += [kq.codes, kq.scale, kq.min, vq.codes, vq.scale, vq.min]
        return [*self.k_res, *self.v_res, *extra]

    def nbytes(self) -> int:
        return _nbytes(self.k_res + self.v_res) + sum(q.nbytes for q in self.k_q + self.v_q)

    def quantized_tokens(self) -> int:
        return self.k_q[0].codes.shape[2] if self.k_q else 0


def _without(t: torch.Tensor, start: int, end: int) -> torch.Tensor:
    """t with tokens [start, end) (dim 2) taken out."""
    return torch.cat([t[:, :, :start], t[:, :, end:]], 2)


def _concat(a: kv_quant.Quantized, b: kv_quant.Quantized) -> kv_quant.Quantized:
    """Tokens of b after those of a (keys: scale groups along dim 2; values: per token)."""
    return kv_quant.Quantized(torch.cat([a.codes, b.codes], 2), torch.cat([a.scale, b.scale], 2), torch.cat([a.min, b.min], 2))


def cache_for(layout: dict[str, Any] | None, layers: int) -> KVCache:
    """The cache a decode graph's `meta["kv_cache"]` layout asks for (None: the full cache)."""
    if not layout or layout.get("kind", "full") == "full":
        return FullCache(layers)
    if layout["kind"] == "kivi":
        return KIVICache(layers, layout["bits"], layout["k_group"], layout["v_group"], layout["residual"], layout.get("sink", 0), layout.get("recent", 0))
    if layout["kind"] == "evict":
        from compiler.kv_cache.eviction import EvictingCache

        return EvictingCache(layers, layout["policy"], layout["budget"], layout["sink"], layout["window"], layout["pool"], layout["recent"])
    raise UserInputError(f"no cache implements the layout {layout.get('kind')!r}; known: full, kivi, evict")
