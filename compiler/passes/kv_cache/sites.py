"""Where the KV cache is in explicit-cache graphs (`compiler.generation`), for the KV-cache passes.

- A decode graph's attention site reads `cat(past, new)` for keys and values, `past` a graph
  input (the cache) and one query: `decode_sites` finds them all, in layer order (the order of
  the past inputs), or says why a site is not one.
- A prefill graph returns each layer's keys (after RoPE) as outputs 1..L, and its attention
  sites read those same nodes: `prefill_sites` pairs each site with its layer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
from torch.fx.experimental.symbolic_shapes import statically_known_true

from compiler.analysis import find_attention

aten = torch.ops.aten

NOT_DECODE = "no attention site reads cat(past input, new) with one query: not an explicit-cache decode graph"


@dataclass
class CachedSite:
    """An attention site of a decode graph and the cache inputs it reads."""

    site: Any  # compiler.analysis.AttentionSite
    k_cat: fx.Node
    v_cat: fx.Node
    past_k: fx.Node
    past_v: fx.Node


def site_scale(site: Any) -> float:
    return float(site.scale) if site.scale is not None else site.head_dim ** -0.5


def _cat_of_past(node: fx.Node, placeholders: list[fx.Node]) -> fx.Node | None:
    """The past input of `node` = cat([past, new], dim 2 of 4), or None."""
    if node.op != "call_function" or node.target is not aten.cat.default:
        return None
    parts = node.args[0]
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    if len(parts) != 2 or dim not in (2, -2) or parts[0] not in placeholders:
        return None
    return parts[0]


def _cached_site(site: Any, placeholders: list[fx.Node]) -> CachedSite | str:
    q = site.q.meta["val"]
    if not statically_known_true(q.shape[-2] == 1):
        return "more than one query: not a decode step"
    past_k, past_v = _cat_of_past(site.k, placeholders), _cat_of_past(site.v, placeholders)
    if past_k is None or past_v is None:
        return "keys or values are not cat(past input, new) along the sequence"
    if site.mask is not None and not site.causal:
        return f"has a mask that is not causal ({site.reason})" if site.reason else "has a mask that is not causal"
    if site.key_padding_mask is not None:
        return "has a key padding mask (batched prompts of different lengths): not supported by the KV-cache passes"
    if q.dtype != torch.float32 or past_k.meta["val"].dtype != torch.float32:
        return f"dtype {q.dtype}: the KV-cache passes take fp32 graphs"
    return CachedSite(site, site.k, site.v, past_k, past_v)


def decode_sites(gm: fx.GraphModule) -> tuple[list[CachedSite], list[str]]:
    """(the decode sites in layer order, why other sites are not ones)."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    sites, why = [], []
    for site in find_attention(gm):
        found = _cached_site(site, placeholders)
        if isinstance(found, str):
            why.append(f"site {site.index} ({site.output.name}): {found}")
        else:
            sites.append(found)
    sites.sort(key=lambda s: placeholders.index(s.past_k))
    return sites, why


def graph_outputs(gm: fx.GraphModule) -> tuple[fx.Node, list[Any]]:
    output = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
    flat = output.args[0]
    return output, list(flat) if isinstance(flat, (list, tuple)) else [flat]


def prefill_sites(gm: fx.GraphModule, layers: int) -> tuple[list[Any], list[str]]:
    """(the attention sites of a prefill graph in layer order, why not) for a graph returning
    (logits, keys_0..keys_{L-1}, values_0..); each site's keys must be its layer's output."""
    _, outputs = graph_outputs(gm)
    if len(outputs) < 1 + 2 * layers:
        return [], [f"the graph returns {len(outputs)} values, not logits plus {layers} keys and values: not an explicit-cache prefill graph"]
    keys = outputs[1 : 1 + layers]
    by_layer: dict[int, Any] = {}
    why = []
    for site in find_attention(gm):
        q, k = site.q.meta["val"], site.k.meta["val"]
        if site.k not in keys:
            why.append(f"site {site.index} ({site.output.name}): its keys are not a cache output")
        elif not site.causal or not statically_known_true(q.shape[-2] == k.shape[-2]):
            why.append(f"site {site.index} ({site.output.name}): not causal prefill attention")
        else:
            by_layer[keys.index(site.k)] = site
    if len(by_layer) != layers and not why:
        why.append(f"{len(by_layer)} attention sites for {layers} cached layers")
    return [by_layer[i] for i in sorted(by_layer)], why
