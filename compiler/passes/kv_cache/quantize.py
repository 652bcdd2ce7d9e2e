"""KVQuantize: a decode graph reads its past keys and values from a KIVI-quantized cache.

Decode is bound by reading the KV cache; KIVI (Liu et al., 2024) stores it in 2 or 4 bits,
keys quantized per channel over groups of tokens and values per token over groups of channels,
with the most recent tokens at full precision, and loses little (see `compiler.ops.kv_quant`
for the format). This pass takes an explicit-cache decode graph (`compiler.generation`), in
which each layer's attention reads `cat(past, new)` with `past` a graph input, and rewrites every
such site into

    out = compiler::quantized_kv_attention(q, k_codes, k_scale, k_min, v_codes, v_scale, v_min,
                                           cat(past_k, new_k), cat(past_v, new_v), scale, bits, k_group)

so the past inputs now hold only the full-precision residual, and six inputs per layer are
appended for the packed codes and fp16 scales. The graph's `meta["kv_cache"]` records that
layout; `compiler.kv_cache.cache_for` makes the matching `KIVICache`, whose write path
quantizes the residual when it fills. Every site must take the rewrite, or none does (one cache
serves the whole graph); a graph without explicit-cache sites (a prefill or a plain forward) is
left alone, with the reason.

The cost model prices each rewritten site against the fp attention it replaces, per target, as
formulas in the cached length; the result records the predicted decode-attention times and the
cache bytes (scales included) next to an fp16 cache, at `report_length` tokens.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx

from compiler.cost_model.rules import TensorInfo
from compiler.errors import UserInputError
from compiler.analysis import replace_site
from compiler.ops import causal_attention as CAUSAL_ATTENTION
from compiler.ops import kv_quant
from compiler.passes.base import Pass, PassResult
from compiler.passes.kv_cache.sites import NOT_DECODE, CachedSite, decode_sites, site_scale


# Per layer, the inputs the pass appends, in this order (KIVICache.graph_inputs follows it).
APPENDED = ("k_codes", "k_scale", "k_min", "v_codes", "v_scale", "v_min")


class KVQuantize(Pass):
    name = "kv_quantize"
    lossy = True

    def __init__(self, bits: int = 4, k_group: int = 128, v_group: int = 64, residual: int = 128, sink: int = 0, recent: int = 0, report_length: int = 4096) -> None:
        if bits not in kv_quant.BITS:
            raise UserInputError(f"kv_quantize: bits must be one of {kv_quant.BITS}, got {bits}")
        if k_group < 1 or residual < k_group or residual % k_group:
            raise UserInputError(f"kv_quantize: residual ({residual}) must be a positive multiple of k_group ({k_group}) so keys quantize in whole groups")
        if v_group < 1:
            raise UserInputError(f"kv_quantize: v_group must be positive, got {v_group}")
        if sink < 0 or recent < 0:
            raise UserInputError(f"kv_quantize: sink ({sink}) and recent ({recent}) count full-precision tokens; they cannot be negative")
        self.bits, self.k_group, self.v_group, self.residual = bits, k_group, v_group, residual
        self.sink, self.recent = sink, recent
        self.report_length = report_length

    def config(self) -> dict[str, Any]:
        return {"bits": self.bits, "k_group": self.k_group, "v_group": self.v_group, "residual": self.residual, "sink": self.sink, "recent": self.recent}

    def run(self, gm: fx.GraphModule, ctx: Any) -> PassResult:
        result = PassResult()
        result.stats = {**self.config(), "sites": [], "left": []}
        if gm.meta.get("kv_cache", {}).get("kind", "full") != "full":
            result.stats["left"].append(f"the graph already reads a {gm.meta['kv_cache']['kind']} cache")
            return result
        placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        sites, why = decode_sites(gm)
        if why or not sites:
            result.stats["left"] = why or [NOT_DECODE]
            return result
        v_group = min(self.v_group, sites[0].site.value_dim)
        if sites[0].site.value_dim % v_group or any(s.site.head_dim % (8 // self.bits) for s in sites):
            result.stats["left"] = [f"head dims {sites[0].site.head_dim}/{sites[0].site.value_dim} do not split into {self.bits}-bit bytes and groups of {v_group}"]
            return result
        last = placeholders[-1]
        for layer, found in enumerate(sites):
            new_inputs, last = self._inputs(gm, found, layer, last, v_group)
            new = _rewrite(gm, found, new_inputs, self.bits, self.k_group)
            row = self._estimate(ctx.cost_model, found.site, v_group)
            result.stats["sites"].append({"site": found.site.index, "node": found.site.output.name, "layer": layer, **row})
            result.record(f"site {found.site.index} ({found.site.output.name} -> {new.name}): attention over a {self.bits}-bit KIVI cache")
        gm.meta["kv_cache"] = {"kind": "kivi", "layers": len(sites), **self.config(), "v_group": v_group}
        gm.graph.eliminate_dead_code()
        result.stats["cache_bytes"], result.stats["fp16_bytes"] = self._bytes(sites, v_group)
        result.stats["ratio_vs_fp16"] = round(result.stats["fp16_bytes"] / result.stats["cache_bytes"], 3)
        return result

    def _inputs(self, gm: fx.GraphModule, found: Any, layer: int, after: fx.Node, v_group: int) -> tuple[list[fx.Node], fx.Node]:
        """Append this layer's six inputs after `after`; their fake values have the past's
        symbolic length as the quantized length (what the cost model prices)."""
        past = found.past_k.meta["val"]
        b, h, t, d = past.shape
        dv = found.past_v.meta["val"].shape[-1]
        per = 8 // self.bits
        with past.fake_mode:
            shapes = {
                "k_codes": ((b, h, t, d // per), torch.uint8),
                "k_scale": ((b, h, t // self.k_group, d), kv_quant.SCALE_DTYPE),
                "k_min": ((b, h, t // self.k_group, d), kv_quant.SCALE_DTYPE),
                "v_codes": ((b, h, t, dv // per), torch.uint8),
                "v_scale": ((b, h, t, dv // v_group), kv_quant.SCALE_DTYPE),
                "v_min": ((b, h, t, dv // v_group), kv_quant.SCALE_DTYPE),
            }
            values = {name: torch.empty(shape, dtype=dtype) for name, (shape, dtype) in shapes.items()}
        nodes = []
        for name in APPENDED:
            with gm.graph.inserting_after(after):
                node = gm.graph.placeholder(f"layer{layer}_{name}")
            node.meta["val"] = values[name]
            nodes.append(node)
            after = node
        return nodes, after

    def _estimate(self, cost_model: Any, site: Any, v_group: int) -> dict[str, Any]:
        """Predicted decode attention at `report_length` cached tokens: fp (the op it replaces,
        on an fp32 cache) and quantized (everything quantized, an empty residual)."""
        if cost_model is None:
            return {}
        n, b = self.report_length, 1
        q = TensorInfo((b, site.q_heads, 1, site.head_dim), torch.float32)
        k = TensorInfo((b, site.kv_heads, n + 1, site.head_dim), torch.float32)
        v = TensorInfo((b, site.kv_heads, n + 1, site.value_dim), torch.float32)
        dense = cost_model.estimate(CAUSAL_ATTENTION.cost(q, k, v, None, 1.0).work).time
        args = _quantized_infos(site, n, self.bits, self.k_group, v_group)
        quantized = cost_model.estimate(kv_quant.quantized_kv_attention.cost(q, *args, 1.0, self.bits, self.k_group).work).time
        return {"predicted_fp_s": float(dense), "predicted_quantized_s": float(quantized), "predicted_speedup": round(float(dense / quantized), 3)}

    def _bytes(self, sites: list[Any], v_group: int) -> tuple[int, int]:
        """The cache's bytes at `report_length` tokens, as `KIVICache` holds them then: the
        quantized blocks, plus the sinks and the residual at the model's precision."""
        from compiler.kv_cache import KIVICache

        n = KIVICache(1, self.bits, self.k_group, self.v_group, self.residual, self.sink, self.recent).quantized_after(self.report_length)
        total = fp16 = 0
        for found in sites:
            s = found.site
            infos = _quantized_infos(s, n, self.bits, self.k_group, v_group)
            itemsize = found.past_k.meta["val"].dtype.itemsize
            total += sum(int(t.nbytes) for t in infos[:6]) + (self.report_length - n) * s.kv_heads * (s.head_dim + s.value_dim) * itemsize
            fp16 += 2 * s.kv_heads * self.report_length * (s.head_dim + s.value_dim)
        return total, fp16


def _quantized_infos(site: Any, n: int, bits: int, k_group: int, v_group: int) -> list[TensorInfo]:
    per = 8 // bits
    h, d, dv = site.kv_heads, site.head_dim, site.value_dim
    fp16 = kv_quant.SCALE_DTYPE
    return [
        TensorInfo((1, h, n, d // per), torch.uint8),
        TensorInfo((1, h, n // k_group, d), fp16),
        TensorInfo((1, h, n // k_group, d), fp16),
        TensorInfo((1, h, n, dv // per), torch.uint8),
        TensorInfo((1, h, n, dv // v_group), fp16),
        TensorInfo((1, h, n, dv // v_group), fp16),
        TensorInfo((1, h, 1, d), torch.float32),  # the residual: the new token only
        TensorInfo((1, h, 1, dv), torch.float32),
    ]


def _rewrite(gm: fx.GraphModule, found: CachedSite, inputs: list[fx.Node], bits: int, k_group: int) -> fx.Node:
    site = found.site
    scale = site_scale(site)
    args = (site.q, *inputs, found.k_cat, found.v_cat, scale, bits, k_group)
    return replace_site(gm, site, lambda graph: [graph.call_function(kv_quant.quantized_kv_attention.overload, args)])
