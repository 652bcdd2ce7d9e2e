"""The TVM codegen backend: lowerings of compiler ops to TIR, built by Apache TVM.

It serves the host CPU (`llvm` targets: built, cached and run from torch) and generates CUDA code
for reading. Importing this package registers its lowerings on the compiler ops and its fused
region lowering (`region`); tvm itself is imported only when a lowering runs (`build` holds the
plumbing that kernels share).

TVM's thread pool reads TVM_NUM_THREADS when it starts; unset, it takes half the hardware
threads on x86 (assuming SMT), which on a VM without SMT is half the cores. The kernels share
the machine with ATen's ops, so the pool gets as many threads as torch uses, unless the user
set it.
"""

import os

import torch

os.environ.setdefault("TVM_NUM_THREADS", str(torch.get_num_threads()))

from compiler.codegen.tvm import region, rms_norm  # noqa: E402

__all__ = ["region", "rms_norm"]
