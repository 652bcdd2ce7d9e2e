"""`compiler::rms_norm`: y = x / sqrt(mean(x^2, -1) + eps) * weight, as in Llama.

Computed in float32 whatever the input dtype (as HF's LlamaRMSNorm does), then cast back and
scaled by the weight. It is the example op that goes through the whole path: the
`FuseRMSNorm` pass inserts it, and Triton and TVM lower it.
"""

from __future__ import annotations

import torch

from compiler.ops.registry import compiler_op


def _fake(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return torch.empty_like(x, dtype=torch.promote_types(x.dtype, weight.dtype))


@compiler_op("rms_norm", fake=_fake)
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    x32 = x.to(torch.float32)
    normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * normed.to(x.dtype)
