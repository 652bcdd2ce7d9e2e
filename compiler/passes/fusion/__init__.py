"""Operator fusion passes: rewrite chains of ATen ops into compiler ops or fused regions."""
