"""The TVM codegen backend: lowerings of compiler ops to TIR, built by Apache TVM.

It serves the host CPU (`llvm` targets: built, cached and run from torch) and generates CUDA code
for reading. Importing this package registers its lowerings on the compiler ops and its fused
region lowering (`region`); tvm itself is imported only when a lowering runs (`build` holds the
plumbing that kernels share).

TVM's thread pool reads its settings when it starts, so they are set here, before any kernel
runs, unless the user set them:
- TVM_NUM_THREADS: unset, TVM takes half the hardware threads on x86 (assuming SMT), one
  thread on a 2-core VM without SMT; the kernels get as many threads as torch uses;
- TVM_THREAD_POOL_SPIN_COUNT: after a kernel, TVM's workers spin waiting for the next one
  (300000 rounds by default) and take the cores from the ATen op that runs next: measured on
  the 2-core host, an SDPA call between TVM kernels took ~8 ms instead of 0.5 ms. 1000 rounds
  keep back-to-back TVM kernels warm and give the cores back at once.
"""

import os

import torch

os.environ.setdefault("TVM_NUM_THREADS", str(torch.get_num_threads()))
os.environ.setdefault("TVM_THREAD_POOL_SPIN_COUNT", "1000")

from compiler.codegen.tvm import attention, block_sparse_attention, kv_quant_attention, region, rms_norm, shift_add  # noqa: E402

__all__ = ["attention", "block_sparse_attention", "kv_quant_attention", "region", "rms_norm", "shift_add"]
