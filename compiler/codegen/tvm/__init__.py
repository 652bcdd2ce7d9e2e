"""The TVM codegen backend: lowerings of compiler ops to TIR, built by Apache TVM.

It serves the host CPU (`llvm` targets: built, cached and run from torch) and generates CUDA code
for reading. Importing this package registers its lowerings on the compiler ops and its fused
region lowering (`region`); tvm itself is imported only when a lowering runs (`build` holds the
plumbing that kernels share).
"""

from compiler.codegen.tvm import region, rms_norm

__all__ = ["region", "rms_norm"]
