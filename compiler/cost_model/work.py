"""The unit the cost model reasons about: the work one kernel does, and its roofline time.

`Work` counts what a kernel computes and moves: matmul FLOPs by input dtype (tensor cores on a
GPU, the GEMM path on a CPU), vector FLOPs (elementwise and reduction arithmetic),
transcendentals (exp, log, sigmoid ...: special-function units on a GPU, long polynomial
sequences on a CPU), bytes read and written, and kernel launches. Every count may be a sympy
expression in shape symbols, so one estimate answers for every sequence length.

`roofline(work, hw)` turns work into time on a target: launch overhead plus the larger of
compute time and memory time (the classic roofline max; the two overlap in a well-written
kernel). Memory time uses the bandwidth of the smallest cache level that holds the working set,
which matters on CPUs, where a 300 KB activation streams at L2 speed and a 100 MB weight at
DRAM speed.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Union

import sympy
import torch

from compiler.targets import Hardware

Expr = Union[int, float, sympy.Expr]

DTYPE_NAMES = {
    torch.float32: "fp32",
    torch.float64: "fp32",
    torch.bfloat16: "bf16",
    torch.float16: "fp16",
    torch.float8_e4m3fn: "fp8",
    torch.float8_e5m2: "fp8",
    torch.int8: "int8",
    torch.uint8: "int8",
}


@dataclass(frozen=True)
class Work:
    matmul_flops: dict[str, Expr] = field(default_factory=dict)
    vector_flops: Expr = 0
    transcendentals: Expr = 0
    bytes_read: Expr = 0
    bytes_written: Expr = 0
    launches: Expr = 1

    @property
    def flops(self) -> Expr:
        return sum(self.matmul_flops.values(), 0) + self.vector_flops + self.transcendentals

    @property
    def bytes(self) -> Expr:
        return self.bytes_read + self.bytes_written

    def __add__(self, other: Work) -> Work:
        """Work of two kernels run one after the other."""
        matmul = dict(self.matmul_flops)
        for dtype, flops in other.matmul_flops.items():
            matmul[dtype] = matmul.get(dtype, 0) + flops
        return Work(
            matmul,
            self.vector_flops + other.vector_flops,
            self.transcendentals + other.transcendentals,
            self.bytes_read + other.bytes_read,
            self.bytes_written + other.bytes_written,
            self.launches + other.launches,
        )

    def scaled(self, factor: Expr) -> Work:
        """This work `factor` times (launches included)."""
        return Work(
            {d: f * factor for d, f in self.matmul_flops.items()},
            self.vector_flops * factor,
            self.transcendentals * factor,
            self.bytes_read * factor,
            self.bytes_written * factor,
            self.launches * factor,
        )

    def subs(self, bindings: dict[Any, Any]) -> Work:
        def s(v: Expr) -> Expr:
            return v.subs(bindings) if isinstance(v, sympy.Basic) else v

        return Work({d: s(f) for d, f in self.matmul_flops.items()}, s(self.vector_flops), s(self.transcendentals), s(self.bytes_read), s(self.bytes_written), s(self.launches))


FREE = Work(launches=0)


@dataclass(frozen=True)
class Roofline:
    """Time of some work on one hardware target: `time = overhead + max(compute, memory)`."""

    compute: Expr
    memory: Expr
    overhead: Expr

    @property
    def time(self) -> Expr:
        return self.overhead + _max(self.compute, self.memory)

    def subs(self, bindings: dict[Any, Any]) -> Roofline:
        def s(v: Expr) -> Expr:
            return v.subs(bindings) if isinstance(v, sympy.Basic) else v

        return replace(self, compute=s(self.compute), memory=s(self.memory), overhead=s(self.overhead))

    @property
    def bound(self) -> str:
        """'compute', 'memory' or 'overhead' (launch-bound: the fixed cost exceeds both), or
        'symbolic' while the shape symbols are unbound."""
        try:
            compute, memory, overhead = float(self.compute), float(self.memory), float(self.overhead)
        except TypeError:
            return "symbolic"
        if overhead > max(compute, memory):
            return "overhead"
        return "compute" if compute >= memory else "memory"


def roofline(work: Work, hw: Hardware) -> Roofline:
    compute = sum((f / hw.matmul_rate(d) for d, f in work.matmul_flops.items()), sympy.Integer(0))
    compute += work.vector_flops / (hw.vector_flops * hw.achievable["vector"])
    compute += work.transcendentals / (hw.transcendentals * hw.achievable["vector"])
    return Roofline(_simplify(compute), memory_time(work.bytes, hw), work.launches * hw.launch_overhead)


def memory_time(nbytes: Expr, hw: Hardware) -> Expr:
    """Seconds to move `nbytes`, at the bandwidth of the smallest level that holds them."""
    if not isinstance(nbytes, sympy.Basic) or nbytes.is_number:
        return float(nbytes) / hw.bandwidth_for(float(nbytes)) if nbytes else 0.0
    dram = nbytes / (hw.memory_bandwidth * hw.achievable["memory"])
    if not hw.caches:
        return dram
    pieces = [(nbytes / (bw * hw.achievable["memory"]), sympy.Le(nbytes, cap)) for cap, bw in hw.caches]
    return sympy.Piecewise(*pieces, (dram, True))


def _max(a: Expr, b: Expr) -> Expr:
    if isinstance(a, sympy.Basic) or isinstance(b, sympy.Basic):
        return sympy.Max(a, b)
    return max(a, b)


def _simplify(v: Expr) -> Expr:
    if isinstance(v, sympy.Basic) and v.is_number:
        return float(v)
    return v
