"""FuseRMSNorm: the decomposed RMSNorm of Llama-family models becomes `compiler::rms_norm`.

HF's LlamaRMSNorm computes in float32 and casts back; captured, that is six to eight ATen ops
and as many passes over the activations. One op lets every backend emit a single-pass kernel.
The pattern is traced once per activation dtype because the casts only appear below float32.
"""

from __future__ import annotations

import torch

from compiler.passes.pattern import Pattern, PatternPass


def rms_norm_search(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    dtype = x.dtype
    x32 = x.to(torch.float32)
    normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * normed.to(dtype)


def rms_norm_replace(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return torch.ops.compiler.rms_norm(x, weight, eps)


def fuse_rms_norm() -> PatternPass:
    patterns = [
        Pattern(rms_norm_search, rms_norm_replace, [torch.empty(2, 8, dtype=dtype), torch.empty(8, dtype=dtype)], scalars={"eps": 1e-6})
        for dtype in (torch.float32, torch.bfloat16, torch.float16)
    ]
    return PatternPass("fuse_rms_norm", patterns=patterns)
