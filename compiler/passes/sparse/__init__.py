"""Sparsification passes: block-sparse attention with calibrated per-head patterns."""

from compiler.passes.sparse.attention import METHODS, SparseAttention

__all__ = ["METHODS", "SparseAttention"]
