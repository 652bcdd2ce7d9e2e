"""The Triton codegen backend: lowerings of compiler ops and of fused regions (`region`) to Triton
kernels for CUDA targets.

Importing this package registers its lowerings and nothing more: triton is
imported when a lowering runs, because TRITON_INTERPRET (run kernels on CPU tensors, for tests
on machines without a GPU) must be set before triton is first imported.
"""

from compiler.codegen.triton import attention, block_sparse_attention, kv_quant_attention, matmul, region, rms_norm, shift_add

__all__ = ["attention", "block_sparse_attention", "kv_quant_attention", "matmul", "region", "rms_norm", "shift_add"]
