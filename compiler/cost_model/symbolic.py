"""Cost formulas in symbols, and the length at which one formula starts to beat another.

A pass that rewrites attention wants a rule of the form "sparsify above L tokens on this
target". Both sides are roofline times (sympy expressions in a length symbol, with `Max` for the
roofline and `Piecewise` for cache levels), so the crossover is the smallest integer L from
which the candidate is cheaper and stays cheaper. `crossover` finds it by exponential search
and bisection on exact evaluations (the difference changes sign once for these formulas; the
function checks that on a grid), so it needs no closed form.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import sympy
import torch

from compiler.cost_model.model import CostModel
from compiler.cost_model.rules import TensorInfo, attention_work
from compiler.cost_model.work import Expr, Work

L = sympy.Symbol("L", positive=True, integer=True)


@dataclass(frozen=True)
class AttentionShape:
    """One attention site: query heads, KV heads (GQA), head dim, batch, dtype."""

    heads: int
    kv_heads: int
    head_dim: int
    batch: int = 1
    dtype: torch.dtype = torch.float32

    def tensors(self, sq: Expr, skv: Expr) -> tuple[TensorInfo, TensorInfo, TensorInfo, TensorInfo]:
        q = TensorInfo((self.batch, self.heads, sq, self.head_dim), self.dtype)
        k = TensorInfo((self.batch, self.kv_heads, skv, self.head_dim), self.dtype)
        return q, k, k, q


SMOLLM2 = AttentionShape(heads=9, kv_heads=3, head_dim=64)


def dense_attention(shape: AttentionShape, length: Expr = L) -> Work:
    """Causal prefill attention over `length` tokens (SDPA with is_causal)."""
    q, k, v, out = shape.tensors(length, length)
    return attention_work(q, k, v, [out], causal=True)


def block_sparse_attention(shape: AttentionShape, density: float, length: Expr = L, block: int = 64, probe_queries: int = 64) -> Work:
    """Block-sparse causal prefill attention keeping `density` of the causal blocks, with the
    online index estimation of MInference's vertical-slash pattern: the last `probe_queries`
    queries attend to every key (one dense launch), their scores are pooled per key block and
    the top blocks selected (one launch over the (L/block) scores per head), then the sparse
    kernel runs over the kept blocks (its pairs rounded up to whole blocks)."""
    q, k, v, out = shape.tensors(length, length)
    kept_pairs_fraction = density
    kernel = attention_work(q, k, v, [out], causal=True, density=kept_pairs_fraction)
    probe_q = TensorInfo((shape.batch, shape.heads, probe_queries, shape.head_dim), shape.dtype)
    probe = attention_work(probe_q, k, v, [probe_q], causal=False)
    scores = shape.batch * shape.heads * length / block
    select = Work(vector_flops=scores * math.log2(max(2, block)), bytes_read=4 * scores, bytes_written=4 * scores * density)
    return kernel + probe + select


def crossover(baseline: Expr, candidate: Expr, symbol: sympy.Symbol = L, lo: int = 1, hi: int = 1 << 22) -> int | None:
    """Smallest integer value of `symbol` in [lo, hi] from which `candidate < baseline` holds
    for every larger value; None when the candidate does not win at `hi`.

    Bisection finds a sign change of the difference; a 5% geometric grid above it then checks
    the candidate keeps winning, and if it loses again somewhere, the search restarts above the
    last loss (so a window where the candidate wins briefly is not reported as the threshold).
    """
    diff = _numeric(candidate - baseline, symbol)

    def wins(x: int) -> bool:
        return diff(x) < 0

    if not wins(hi):
        return None
    low = lo
    while True:
        if low == lo and wins(lo):
            first = lo
        else:
            high = hi  # invariant: not wins(low), wins(high)
            while high - low > 1:
                mid = (low + high) // 2
                if wins(mid):
                    high = mid
                else:
                    low = mid
            first = high
        steps = int(math.log(hi / first, 1.05)) + 1
        losers = [x for x in sorted({int(first * 1.05**i) for i in range(steps)}) if not wins(x)]
        if not losers:
            return first
        low = max(losers)


def attention_crossover(target: str, shape: AttentionShape = SMOLLM2, density: float = 0.1, **sparse_options: int) -> int | None:
    """Sequence length from which block-sparse prefill attention at `density` is predicted to
    beat dense causal attention on `target` (one attention site)."""
    model = CostModel(target)
    dense = model.estimate(dense_attention(shape)).time
    sparse = model.estimate(block_sparse_attention(shape, density, **sparse_options)).time
    return crossover(dense, sparse)


def _numeric(expr: Expr, symbol: sympy.Symbol):
    if not isinstance(expr, sympy.Basic) or symbol not in expr.free_symbols:
        value = float(expr)
        return lambda x: value
    fn = sympy.lambdify(symbol, expr, modules="math")
    return lambda x: float(fn(x))
