"""SparseAttention: causal prefill attention becomes block-sparse, per head, above a crossover.

Long-context prefill is dominated by attention, and most heads put most of their mass on a
few keys: the first tokens (attention sinks), the recent ones, a few columns and diagonals.
The pass replaces each causal attention site (found by `compiler.analysis.find_attention`:
SDPA, `compiler::causal_attention` without padding, or decomposed matmul-softmax-matmul with a
proven causal mask; a key padding mask is carried along) by

    kv_blocks, kv_counts = compiler::sparse_attention_layout(q, k, spec)   # online indices
    out = compiler::block_sparse_attention(q, k, v, kv_blocks, kv_counts, scale, block, density)

where `spec` gives every query head a pattern (see `compiler.ops.sparse_layout`). Methods, the
pass option `method`:

- `duo` (default): DuoAttention's split: per head, the narrowest sinks + window that keeps
  `recall` of the exact attention mass on calibration text, else dense (a retrieval head);
- `calibrated`: per head, the sparsest of all candidate patterns (streaming windows,
  vertical-slash and block top-k at several thresholds) that keeps `recall`; heads no
  candidate serves stay dense. On SmolLM2 it reaches lower density than `duo` at the same
  recall but agrees less often on the next token (benchmarks/sparse_attention.py): the online
  estimates miss mass the exact measurement counted;
- `streaming`, `vertical_slash`, `block_topk`: one pattern for every head (`sink`/`window` in
  blocks, or the cumulative threshold `gamma`).

Calibration (every method measures its density on it; `calibrated` and `duo` also choose with
it) runs the graph on `calibration_count` windows of `calibration_length` tokens of calibration
text, or of the graph's own length when that is fixed; results are stored in the cache under the
model's weights fingerprint, so a second compile reuses them. When the calibration source makes
retrieval prompts (`Calibration.retrieval_batches`: passkeys hidden in calibration text), the
choosing methods also run `retrieval_count` of them and require a head's pattern to keep
`retrieval_recall` (default: `recall`) of the attention mass of the last `retrieval_queries`
queries, the ones that must reach back to the needle: the training-free form of DuoAttention's
passkey-based calibration of retrieval heads.

Cost gate: the cost model prices dense causal attention against the layout estimate plus the
sparse attention at the calibrated density, per site shape, as formulas in the sequence length,
and finds the crossover: the shortest sequence (in blocks) from which sparse is cheaper on the
target. A graph of fixed length below it is left alone; a graph symbolic in the length gets the
crossover as the layout's `min_length`, below which the layout is dense. The option
`min_length` replaces the crossover (0: sparsify at every length). The result records, per
site, the crossover, the predicted times at the graph's length and the pattern of every head.
"""

from __future__ import annotations

import hashlib
import operator
from collections import Counter
from typing import Any

import torch
import torch.fx as fx
from torch.fx.experimental.symbolic_shapes import statically_known_true

from compiler.analysis import find_attention, replace_site
from compiler.cache import Store
from compiler.cost_model.rules import TensorInfo
from compiler.cost_model.symbolic import L, crossover
from compiler.errors import UserInputError
from compiler.ir import at_hints, weights_fingerprint
from compiler.ops import block_sparse_attention as BLOCK_SPARSE_ATTENTION
from compiler.ops import causal_attention as CAUSAL_ATTENTION
from compiler.ops import sparse_attention_layout as SPARSE_LAYOUT
from compiler.ops.sparse_layout import PATTERN_KINDS, HeadPattern, Spec
from compiler.passes.base import Pass, PassResult
from compiler.passes.sparse import calibrate


METHODS = ("calibrated", "duo", "streaming", "vertical_slash", "block_topk")
# Bumped when calibration computes something different, so stored results are not reused.
_CALIBRATION_VERSION = 3


class SparseAttention(Pass):
    name = "sparse_attention"
    lossy = True
    requires = ("calibration_data",)

    def __init__(
        self,
        method: str = "duo",
        recall: float = 0.95,
        gamma: float = 0.9,
        sink: int = 1,
        window: int = 8,
        block_size: int = 64,
        calibration_length: int = 4096,
        calibration_count: int = 2,
        min_length: int | None = None,
        retrieval_recall: float | None = None,
        retrieval_count: int = 4,
        retrieval_queries: int = 16,
    ) -> None:
        if method not in METHODS:
            raise UserInputError(f"sparse_attention: unknown method {method!r}; choose one of {', '.join(METHODS)}")
        if not 0.0 < recall <= 1.0:
            raise UserInputError(f"sparse_attention: recall is a fraction of attention mass in (0, 1], got {recall}")
        self.method = method
        self.recall = recall
        self.gamma = gamma
        self.sink = sink
        self.window = window
        self.block_size = block_size
        self.calibration_length = calibration_length
        self.calibration_count = calibration_count
        self.min_length = min_length
        self.retrieval_recall = recall if retrieval_recall is None else retrieval_recall
        self.retrieval_count = retrieval_count
        self.retrieval_queries = retrieval_queries
        self.fixed_pattern = HeadPattern(method, sink=sink, window=window, gamma=gamma) if method in PATTERN_KINDS else None

    def config(self) -> dict[str, Any]:
        return {
            "method": self.method, "recall": self.recall, "gamma": self.gamma, "sink": self.sink, "window": self.window,
            "block_size": self.block_size, "calibration_length": self.calibration_length,
            "calibration_count": self.calibration_count, "min_length": self.min_length,
            "retrieval_recall": self.retrieval_recall, "retrieval_count": self.retrieval_count,
            "retrieval_queries": self.retrieval_queries,
        }

    def run(self, gm: fx.GraphModule, ctx: Any) -> PassResult:
        result = PassResult()
        sites, left = [], []
        for site in find_attention(gm):
            why = _why_not(site)
            if why is None:
                sites.append(site)
            else:
                left.append(f"site {site.index} ({site.output.name}): {why}")
        result.stats = {"method": self.method, "sites": [], "left": left}
        if not sites:
            return result
        length = sites[0].q.meta["val"].shape[-2]
        static = isinstance(length, int)
        choice = self._patterns(gm, sites, ctx, int(length) if static else self.calibration_length)
        for site, (heads, density) in zip(sites, choice):
            crossover, dense_time, sparse_time = _crossover(ctx.cost_model, site, density, self.block_size)
            row = {
                "site": site.index, "node": site.output.name, "density": round(density, 4), "crossover": crossover,
                "heads": [h.short() for h in heads], "predicted_dense_s": dense_time, "predicted_sparse_s": sparse_time,
            }
            result.stats["sites"].append(row)
            if all(h.kind == "dense" for h in heads):
                left.append(f"site {site.index}: every head keeps full attention at recall {self.recall}")
                continue
            threshold = self.min_length if self.min_length is not None else crossover
            if threshold is None or (static and length < threshold):
                where = "never" if threshold is None else f"from {threshold} tokens"
                left.append(f"site {site.index}: sparse pays off {where}; the graph has {length}")
                continue
            spec = Spec(tuple(heads), self.block_size, 0 if static else threshold)
            new = _rewrite(gm, site, spec, density)
            kinds = Counter(h.kind for h in heads)
            result.record(
                f"site {site.index} ({site.output.name} -> {new.name}): block-sparse attention, "
                f"{', '.join(f'{n} {k}' for k, n in kinds.items())} heads, density {density:.1%}, "
                f"crossover {crossover} tokens; heads: {'; '.join(h.short() for h in heads)}"
            )
        gm.graph.eliminate_dead_code()
        return result

    # -- patterns ---------------------------------------------------------------------------

    def _patterns(self, gm: fx.GraphModule, sites: list[Any], ctx: Any, length: int) -> list[tuple[list[HeadPattern], float]]:
        """Per site: the head patterns and their mean density on calibration text."""
        patterns = [self.fixed_pattern] if self.fixed_pattern else calibrate.candidates(self.method)
        scores = self._scores(gm, sites, ctx, length, patterns)
        out = []
        for r, d, rr in scores:
            if self.fixed_pattern is not None:
                out.append(([self.fixed_pattern] * r.shape[1], float(d[0].mean())))
                continue
            chosen = calibrate.choose(r, d, patterns, self.recall, rr, self.retrieval_recall)
            out.append(([c[0] for c in chosen], sum(c[2] for c in chosen) / len(chosen)))
        return out

    def _scores(self, gm: fx.GraphModule, sites: list[Any], ctx: Any, length: int, patterns: list[HeadPattern]) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]:
        """Per site: every candidate pattern's recall and density per head on calibration text,
        and its recall on retrieval prompts (None without them). Stored: they do not depend on
        `recall`, so a planner that tries several recalls calibrates once."""
        store, key = Store(), self._cache_key(gm, sites, length, ctx.calibration_data.has_retrieval)
        cached = store.get("sparse_attention", key)
        if cached is not None:
            return [(torch.tensor(r), torch.tensor(d), None if rr is None else torch.tensor(rr)) for r, d, rr in cached]
        recall: dict[int, torch.Tensor] = {}
        density: dict[int, torch.Tensor] = {}

        def on_site(batch: int, i: int, q: torch.Tensor, k: torch.Tensor) -> None:
            r, d = calibrate.score_candidates(q, k, _scale(sites[i]), self.block_size, patterns)
            recall[i] = recall.get(i, 0) + r
            density[i] = density.get(i, 0) + d

        batches = ctx.calibration_data.batches(length, self.calibration_count)
        calibrate.collect_qk(gm, sites, batches, on_site)
        retrieval: dict[int, torch.Tensor] = {}
        prompts = [] if self.fixed_pattern else ctx.calibration_data.retrieval_batches(length, self.retrieval_count)

        def on_prompt(batch: int, i: int, q: torch.Tensor, k: torch.Tensor) -> None:
            r, _ = calibrate.score_candidates(q, k, _scale(sites[i]), self.block_size, patterns, last=self.retrieval_queries)
            retrieval[i] = retrieval.get(i, 0) + r

        if prompts:
            calibrate.collect_qk(gm, sites, prompts, on_prompt)
        out = [(recall[i] / len(batches), density[i] / len(batches), retrieval[i] / len(prompts) if prompts else None) for i in range(len(sites))]
        store.put("sparse_attention", key, [(r.tolist(), d.tolist(), None if rr is None else rr.tolist()) for r, d, rr in out])
        return out

    def _cache_key(self, gm: fx.GraphModule, sites: list[Any], length: int, retrieval: bool) -> str:
        shapes = [(s.q_heads, s.kv_heads, s.head_dim) for s in sites]
        # what the scores do not depend on: the choice made from them, and when to apply
        options = {k: v for k, v in self.config().items() if k not in ("min_length", "recall", "retrieval_recall")}
        text = repr((_CALIBRATION_VERSION, options, length, retrieval, shapes, weights_fingerprint(gm)))
        return hashlib.sha256(text.encode()).hexdigest()


def _why_not(site: Any) -> str | None:
    if not site.causal:
        return f"not causal ({site.reason})" if site.reason else "not causal"
    if site.mask is not None and site.key_padding_mask is None:  # causal AND padding is fine
        return f"has a mask besides the causal one and key padding ({site.reason})" if site.reason else "has a mask besides the causal one and key padding"
    if site.kind == "block_sparse_attention":
        return "already block-sparse"
    q, k = site.q.meta["val"], site.k.meta["val"]
    if not statically_known_true(q.shape[-2] == k.shape[-2]):
        return "queries and keys differ in length (a decode step or a cache); sparse prefill needs Sq == Sk"
    if q.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return f"dtype {q.dtype}"
    return None


def _scale(site: Any) -> float:
    return float(site.scale) if site.scale is not None else site.head_dim ** -0.5


def _rewrite(gm: fx.GraphModule, site: Any, spec: Spec, density: float) -> fx.Node:
    def build(graph: fx.Graph) -> list[fx.Node]:
        layout = graph.call_function(SPARSE_LAYOUT.overload, (site.q, site.k, spec.to_json()))
        blocks = graph.call_function(operator.getitem, (layout, 0))
        counts = graph.call_function(operator.getitem, (layout, 1))
        args = (site.q, site.k, site.v, blocks, counts, _scale(site), spec.block_size, density)
        if site.key_padding_mask is not None:
            args += (site.key_padding_mask,)
        return [layout, blocks, counts, graph.call_function(BLOCK_SPARSE_ATTENTION.overload, args)]

    return replace_site(gm, site, build)


def _crossover(cost_model: Any, site: Any, density: float, block_size: int) -> tuple[int | None, Any, Any]:
    """(the shortest length, rounded up to whole blocks, from which the layout op plus the
    sparse op are predicted faster than dense causal attention, None if never below 4M tokens;
    the predicted dense and sparse times at the graph's length when it is known)."""
    if cost_model is None:
        return block_size, None, None
    s = L
    q = site.q.meta["val"]
    b = q.shape[0] if isinstance(q.shape[0], int) else 1

    def info(heads: int, dim: int) -> TensorInfo:
        return TensorInfo((b, heads, s, dim), q.dtype)

    qi, ki, vi = info(site.q_heads, site.head_dim), info(site.kv_heads, site.head_dim), info(site.kv_heads, site.value_dim)
    nb = s / block_size
    blocks, counts = TensorInfo((b, site.q_heads, nb, nb), torch.int32), TensorInfo((b, site.q_heads, nb), torch.int32)
    spec = Spec((HeadPattern("block_topk"),) * site.q_heads, block_size).to_json()
    dense = cost_model.estimate(CAUSAL_ATTENTION.cost(qi, ki, vi, None, _scale(site)).work).time
    sparse = (
        cost_model.estimate(SPARSE_LAYOUT.cost(qi, ki, spec).work).time
        + cost_model.estimate(BLOCK_SPARSE_ATTENTION.cost(qi, ki, vi, blocks, counts, _scale(site), block_size, density).work).time
    )
    length = crossover(dense, sparse, s, lo=block_size)
    if length is not None:
        length = -(-length // block_size) * block_size
    at = _graph_length(site)
    if at is None:
        return length, None, None
    return length, float(dense.subs(s, at)), float(sparse.subs(s, at))


def _graph_length(site: Any) -> int | None:
    length = site.q.meta["val"].shape[-2]
    if isinstance(length, int):
        return length
    hint = at_hints(length.node.expr, site.q.graph.owning_module)
    return int(hint) if hint is not None else None
