"""`compiler::rms_norm`: y = x / sqrt(mean(x^2, -1) + eps) * weight, as in Llama.

Computed in float32 whatever the input dtype (as HF's LlamaRMSNorm does), then cast back and
scaled by the weight. It is the example op that goes through the whole path: the
`FuseRMSNorm` pass inserts it, and Triton and TVM lower it.
"""

from __future__ import annotations

import torch

from compiler.errors import Unsupported
from compiler.cost_model.rules import OpCost, TensorInfo
from compiler.cost_model.work import Work
from compiler.ops.registry import compiler_op

KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _fake(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return torch.empty_like(x, dtype=torch.promote_types(x.dtype, weight.dtype))


def _cost(x: TensorInfo, weight: TensorInfo, eps: float) -> OpCost:
    # one pass over x: square, mean, rsqrt, scale, weight
    return OpCost(Work(vector_flops=4 * x.numel, bytes_read=x.nbytes + weight.nbytes, bytes_written=x.nbytes), "norm")


@compiler_op("rms_norm", fake=_fake, cost=_cost)
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    x32 = x.to(torch.float32)
    normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * normed.to(x.dtype)


def kernel_row_length(x: torch.Tensor, weight: torch.Tensor, max_n: int | None = None) -> int:
    """N for a generated kernel, after checking the call site is one kernels handle (static N,
    weight [N], a float dtype); raises Unsupported, so the call site keeps the reference."""
    from torch.fx.experimental.symbolic_shapes import is_concrete_int

    if x.dim() == 0:
        raise Unsupported("rms_norm of a 0-d tensor")
    n = x.shape[-1]
    if not is_concrete_int(n):
        raise Unsupported(f"rms_norm over a symbolic last dimension ({n}); the kernels fix N")
    n = int(n)
    if n == 0 or (max_n is not None and n > max_n):
        raise Unsupported(f"rms_norm kernels handle 0 < N <= {max_n or 'any'}, not N={n}")
    if tuple(weight.shape) != (n,):
        raise Unsupported(f"rms_norm weight of shape {tuple(weight.shape)} for N={n}")
    for tensor, role in ((x, "x"), (weight, "weight")):
        if tensor.dtype not in KERNEL_DTYPES:
            raise Unsupported(f"rms_norm with {role} of dtype {tensor.dtype}")
    return n


def kernel_name(n: int, x_dtype: torch.dtype, w_dtype: torch.dtype) -> str:
    """One name per specialization, the same in every backend: rms_norm_float32_n576."""
    x_name, w_name = (str(d).removeprefix("torch.") for d in (x_dtype, w_dtype))
    return f"rms_norm_{x_name}_n{n}" if x_dtype == w_dtype else f"rms_norm_{x_name}_{w_name}_n{n}"
