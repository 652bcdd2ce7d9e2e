"""The TVM lowering of `compiler::rms_norm`: a TE compute, scheduled per target, built by TVM.

Part of the codegen step (capture -> passes -> codegen -> compiled module). The op is written
once as a tensor expression over x viewed as [rows, N]; the row count is a symbolic TIR var, so
one build serves every batch size and sequence length, while N and the dtypes are fixed per
build (they pick the vector width and the constants). Two schedules:

- `llvm` (the host): rows in parallel, the sum of squares as `lanes` vectorized partial sums
  (rfactor), the scaling loop vectorized; built, cached and run from torch without copies;
- `cuda`: one thread block per row, the sum as a cross-thread reduction; generated for reading
  (CUDA C when TVM can emit it here, else TVMScript), never run: Triton serves CUDA targets.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch

from compiler.codegen.tvm.build import as_kernel_input, build_primfunc, device_source, host_fp32_lanes, parse_target
from compiler.errors import Unsupported
from compiler.ops import rms_norm as RMS_NORM
from compiler.ops.registry import Kernel, LoweringRequest
from compiler.ops.rms_norm import kernel_name, kernel_row_length

_DTYPES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}
# Threads per block of the CUDA schedule; a smaller N uses its next power of two (at least a warp).
_CUDA_THREADS = 256


@RMS_NORM.register_lowering("tvm")
def lower_rms_norm(req: LoweringRequest) -> Kernel:
    x, weight, _eps = req.args
    n = kernel_row_length(x, weight)
    out_dtype = torch.promote_types(x.dtype, weight.dtype)
    name = kernel_name(n, x.dtype, weight.dtype)
    target = parse_target(req.target.tvm_target)
    func = _rms_norm_primfunc(n, _DTYPES[x.dtype], _DTYPES[weight.dtype], _DTYPES[out_dtype])
    kind = target.kind.name
    if kind == "llvm":
        return _lower_for_host(req, func, n, out_dtype, name, target)
    if kind == "cuda":
        return _lower_for_cuda(req, func, n, name)
    raise Unsupported(f"TVM rms_norm has no schedule for target kind {kind!r}")


def _rms_norm_primfunc(n: int, x_dtype: str, w_dtype: str, out_dtype: str) -> Any:
    """The unscheduled PrimFunc (x[rows, n], weight[n], y[rows, n], eps) -> y, in the reference's
    arithmetic: fp32 sum of squares, the normalized row cast to x's dtype, then the weight."""
    from tvm import te, tirx

    rows = tirx.Var("rows", "int64")
    x = te.placeholder((rows, n), x_dtype, name="x")
    weight = te.placeholder((n,), w_dtype, name="weight")
    eps = tirx.Var("eps", "float32")
    k = te.reduce_axis((0, n), name="k")
    sumsq = te.compute(
        (rows,),
        lambda i: te.sum(x[i, k].astype("float32") * x[i, k].astype("float32"), axis=k),
        name="sumsq",
    )

    def scale(i: Any, j: Any) -> Any:
        normed = x[i, j].astype("float32") * te.rsqrt(sumsq[i] / float(n) + eps)
        # Casting through x's dtype rounds the way the reference does before the weight applies.
        rounded = normed.astype(x_dtype).astype("float32")
        return (weight[j].astype("float32") * rounded).astype(out_dtype)

    y = te.compute((rows, n), scale, name="y")
    return te.create_prim_func([x, weight, y, eps])


def _lower_for_host(
    req: LoweringRequest, func: Any, n: int, out_dtype: torch.dtype, name: str, target: Any
) -> Kernel:
    if req.args[0].device.type != "cpu":
        raise Unsupported(f"TVM llvm kernel for rms_norm on a {req.args[0].device.type} tensor")
    # fp32 lanes of the host's vectors, narrowed to a power of two dividing N so that no loop
    # needs a tail (a tail would keep the reduction from being vectorized).
    lanes = math.gcd(n, host_fp32_lanes(target))
    scheduled = _schedule_host(func, n, lanes)
    source = scheduled.script()
    if not req.run_here:
        return Kernel(name, "tvm", source, note="not built: the caller asked for source only")
    built = build_primfunc(scheduled, req.target.tvm_target, name)
    runner = _host_runner(built, n, out_dtype)
    return Kernel(name, "tvm", source, runner=runner, note=f"shared library: {built.library}")


def _schedule_host(func: Any, n: int, lanes: int) -> Any:
    from tvm import s_tir

    sch = s_tir.Schedule(func)
    sumsq, y = sch.get_sblock("sumsq"), sch.get_sblock("y")
    # A row of exactly `lanes` values is one vector: its loops are not split (compute_at would
    # drop the outer loop of extent 1).
    split = n > lanes
    if lanes > 1:
        # Accumulate `lanes` partial sums side by side (one vector register), then add them up.
        _, k = sch.get_loops(sumsq)
        k_lane = sch.split(k, [None, lanes])[1] if split else k
        partial = sch.rfactor(k_lane, factor_axis=0)
    row, col = sch.get_loops(y)
    sch.compute_at(sumsq, row)
    if lanes > 1:
        sch.compute_at(partial, row)
        if split:
            _, k_lane, k_outer = sch.get_loops(partial)
            sch.reorder(k_outer, k_lane)
        else:
            _, k_lane = sch.get_loops(partial)
        sch.vectorize(k_lane)
        sch.vectorize(sch.split(col, [None, lanes])[1] if split else col)
    sch.parallel(row)
    return sch.mod["main"]


def _host_runner(
    built: Callable[..., Any], n: int, out_dtype: torch.dtype
) -> Callable[..., torch.Tensor]:
    def run(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        rows = as_kernel_input(x.reshape(-1, n))
        y = torch.empty(rows.shape, dtype=out_dtype)
        built(rows, as_kernel_input(weight), y, eps)
        return y.view(x.shape)

    return run


def _lower_for_cuda(req: LoweringRequest, func: Any, n: int, name: str) -> Kernel:
    scheduled = _schedule_cuda(func, n)
    not_run = "TVM CUDA kernels are for reading only; the triton backend runs CUDA targets"
    try:
        source = device_source(scheduled, req.target.tvm_target, name)
    except Exception as exc:  # noqa: BLE001 - any toolchain failure leaves the TIR to read
        return Kernel(
            name, "tvm", scheduled.script(), note=f"{not_run}; CUDA codegen failed here ({exc})"
        )
    return Kernel(name, "tvm", source, note=not_run, language="cuda")


def _schedule_cuda(func: Any, n: int) -> Any:
    from tvm import s_tir

    threads = min(_CUDA_THREADS, max(32, 1 << (n - 1).bit_length()))
    sch = s_tir.Schedule(func)
    sumsq, y = sch.get_sblock("sumsq"), sch.get_sblock("y")
    row, col = sch.get_loops(y)
    sch.compute_at(sumsq, row)
    # Each thread sums a strided slice of the row; binding the reduction loop to threadIdx.x makes
    # TVM emit the warp-shuffle / shared-memory reduction across the block.
    _, k = sch.get_loops(sumsq)
    _, k_thread = sch.split(k, [None, threads])
    sch.bind(k_thread, "threadIdx.x")
    _, col_thread = sch.split(col, [None, threads])
    sch.bind(col_thread, "threadIdx.x")
    sch.bind(row, "blockIdx.x")
    # Every thread reads the row's sum, so it lives in shared memory.
    sch.set_scope(sumsq, 0, "shared")
    return sch.mod["main"]
