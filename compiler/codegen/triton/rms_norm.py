"""The Triton lowering of `compiler::rms_norm`: one program normalizes a block of rows.

Part of the codegen step (capture -> passes -> codegen -> compiled module). The kernel is kept
here as source text: the lowering hands that text to the artifact folder for people to read, and
the runner loads the very same text (written to `cache_dir("triton")` and imported, since
`triton.jit` reads a kernel's source from its file). The text is the same for every call site;
N, the dtypes and the leading dims arrive at launch, and the block sizes are launch constants.

The runner launches on CUDA tensors, or on CPU tensors under Triton's interpreter
(TRITON_INTERPRET=1, which `triton.jit` reads when the kernel module is loaded). Nothing here
imports triton before a lowering runs, so the environment can still choose the interpreter.
"""

from __future__ import annotations

import hashlib
from types import ModuleType
from typing import Callable

import torch

from compiler.codegen.triton.runtime import load_module, why_not_runnable
from compiler.ops import rms_norm as RMS_NORM
from compiler.ops.registry import Kernel, LoweringRequest
from compiler.ops.rms_norm import kernel_name, kernel_row_length

KERNEL_NAME = "rms_norm_kernel"
KERNEL_SOURCE = '''\
import triton
import triton.language as tl


@triton.jit
def rms_norm_kernel(x_ptr, w_ptr, y_ptr, rows, n_cols, eps,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """y = weight * (x * rsqrt(mean(x^2) + eps)) over BLOCK_M rows of x[rows, n_cols].

    BLOCK_N is n_cols rounded up to a power of two (Triton blocks are powers of two); the masks
    keep the padding out of the loads, the sum and the stores.
    """
    row = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)[:, None]
    col = tl.arange(0, BLOCK_N)[None, :]
    mask = (row < rows) & (col < n_cols)
    # int64 offsets: rows * n_cols passes 2**31 for long prompts of wide models.
    offsets = row.to(tl.int64) * n_cols + col
    x = tl.load(x_ptr + offsets, mask=mask, other=0.0)
    x32 = x.to(tl.float32)
    mean_sq = tl.sum(x32 * x32, axis=1) / n_cols
    # Round the normalized row to x's dtype before the weight, as the reference does.
    normed = (x32 * tl.rsqrt(mean_sq + eps)[:, None]).to(x.dtype)
    w = tl.load(w_ptr + col, mask=col < n_cols, other=0.0)
    y = w.to(tl.float32) * normed.to(tl.float32)
    tl.store(y_ptr + offsets, y.to(y_ptr.dtype.element_ty), mask=mask)
'''

# One program holds BLOCK_M x BLOCK_N values in registers; past this N a row no longer fits and
# the kernel would need a loop over column blocks.
_MAX_N = 65536
# Elements per program: several short rows share a program so small-N launches stay busy.
_ELEMENTS_PER_PROGRAM = 4096
_MAX_ROWS_PER_PROGRAM = 16
_ELEMENTS_PER_WARP = 512

# Loaded kernel modules, by interpreter mode: `triton.jit` decides at load time whether it makes
# a GPU kernel or an interpreted one, so each mode loads its own copy.


@RMS_NORM.register_lowering("triton")
def lower_rms_norm(req: LoweringRequest) -> Kernel:
    import triton

    x, weight, _eps = req.args
    n = kernel_row_length(x, weight, _MAX_N)
    block_n = triton.next_power_of_2(n)
    block_m = max(1, min(_MAX_ROWS_PER_PROGRAM, _ELEMENTS_PER_PROGRAM // block_n))
    num_warps = min(16, max(1, block_m * block_n // _ELEMENTS_PER_WARP))
    name = kernel_name(n, x.dtype, weight.dtype)
    source = (
        f"# {name}: {KERNEL_NAME}[(cdiv(rows, {block_m}),)](..., n_cols={n}, "
        f"BLOCK_M={block_m}, BLOCK_N={block_n}, num_warps={num_warps})\n{KERNEL_SOURCE}"
    )
    why_not = why_not_runnable(req, x.device.type)
    if why_not:
        return Kernel(name, "triton", source, note=why_not)
    out_dtype = torch.promote_types(x.dtype, weight.dtype)
    runner = _runner(_kernel_module(), n, out_dtype, block_m, block_n, num_warps)
    return Kernel(name, "triton", source, runner=runner)


def _kernel_module() -> ModuleType:
    """KERNEL_SOURCE as an imported module, named by its content."""
    digest = hashlib.sha256(KERNEL_SOURCE.encode()).hexdigest()[:16]
    return load_module(f"rms_norm_{digest}", KERNEL_SOURCE)


def _runner(
    module: ModuleType, n: int, out_dtype: torch.dtype, block_m: int, block_n: int, num_warps: int
) -> Callable[..., torch.Tensor]:
    kernel = getattr(module, KERNEL_NAME)

    def run(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        rows = x.reshape(-1, n).contiguous()
        y = torch.empty(rows.shape, dtype=out_dtype, device=x.device)
        if rows.shape[0]:
            grid = (-(-rows.shape[0] // block_m),)
            kernel[grid](
                rows, weight.contiguous(), y, rows.shape[0], n, eps,
                BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps,
            )
        return y.view(x.shape)

    return run
