"""The unit the cost model reasons about: the work one kernel does, and its roofline time.

`Work` counts what a kernel computes and moves: matmul FLOPs by input dtype (tensor cores on a
GPU, the GEMM path on a CPU), vector FLOPs (elementwise and reduction arithmetic),
transcendentals (exp, log, sigmoid ...: special-function units on a GPU, long polynomial
sequences on a CPU), bytes read and written, and kernel launches. Every count may be a sympy
expression in shape symbols, so one estimate answers for every sequence length.

`roofline(work, hw)` turns work into time on a target: launch overhead plus the larger of
compute time and memory time (the classic roofline max; the two overlap in a well-written
kernel). The compute terms add up: matmul, vector and transcendental instructions issue from
the same cores (on a CPU the same FMA units) one after the other.

Memory time is where a CPU differs most from one DRAM bandwidth:

- cache levels: the bytes of an op's working set (read + written) up to a level's capacity
  stream at that level's bandwidth, the rest at the next level's (down to memory). A 300 KB
  activation streams at cache speed, a 100 MB one at DRAM speed, and a 40 MB one, just over a
  32 MB last-level cache, mostly from cache, not all from DRAM: the previous op just wrote most
  of it there. (A step at the capacity would price it all at DRAM speed.)
- cold bytes: `bytes_cold` are the part of the traffic that touches constants (weights, frozen
  buffers such as a static KV cache). A forward touches each constant once, and a model's
  constants together exceed any CPU cache (SmolLM2-135M: 540 MB of weights), so these come from
  memory whatever the op's own working set; they are priced at memory bandwidth apart from the
  warm traffic.

Host-only costs. `host` counts, by kind, work that only a CPU host pays for; a calibrated host
prices each kind (`dispatch`, measured by `calibrate`), other targets at zero. One kind is per
byte and adds to memory time:

- `gemv_bytes`: bytes of a weight that a matrix-vector product (a matmul of one row: decode)
  streams from memory. CPU BLAS runs it as a GEMV, on one thread here, below the read-only
  stream rate that `memory_bandwidth` is; the host measures a GEMV over a cold weight.

Three are per element and add to compute time, as extra seconds over what the generic figures
already charge:

- `trig`: sin, cos, tan results. Vectorized CPU libraries (SLEEF) reduce the argument's range
  and evaluate a longer polynomial than for exp, so they run at a lower rate than the exp that
  `transcendentals` is measured with (GPUs issue all of them to the same special-function
  units, at one rate);
- `scalar_loop`: elements of comparison and logical kernels that ATen writes as scalar lambdas
  and the compiler vectorizes only when all operands are contiguous; an operand broadcast along
  the inner loop (`le(row[1, S], col[S, 1])`, `bitwise_and(0-d, mask)`) leaves one element per
  iteration;
- `rows`: rows of a CPU TensorIterator loop beyond one. Elementwise kernels and copies run a
  vectorized inner loop per row of the coalesced iteration space; a strided operand (a
  transposed view, a narrowed slice) cuts that space into short rows, each paying the loop's
  setup (`rules.loop_rows`).

The others are per event and add to the fixed cost. `launches` kernels each cost the target's
launch overhead; on the host a "launch" is PyTorch's dispatch of one ATen op from Python (a few
microseconds), and some calls do more framework work than a plain pointwise op:

- `scalar`: a Python number passed for a Tensor argument (`add.Tensor(x, 1e-6)`), which is
  wrapped into a 0-d tensor first;
- `reduction`: the setup of a reduction (output shape, strides, accumulation);
- `factory`: building a tensor from sizes and options (`arange`, `full`, `new_ones`,
  `_to_copy` to another dtype);
- `index`: advanced indexing (`index.Tensor`: index tensors broadcast, strides computed);
- `concat`: `cat`'s handling of its tensor list;
- `op`: an extra ATen op the CPU implementation runs inside (`mean` is `sum` then `div_`);
- `parallel`, `parallel_reduction`: an OpenMP parallel region (waking the thread pool, splitting
  the loop, joining), which PyTorch opens for loops over more than GRAIN_SIZE (32768) elements
  and runs smaller ones on the calling thread; a reduction's region also combines per-thread
  partial results.
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
    bytes_cold: Expr = 0  # of bytes_read + bytes_written: those touching constants (from memory)
    host: dict[str, Expr] = field(default_factory=dict)  # costs only a CPU host pays, by kind (below)

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
            self.bytes_cold + other.bytes_cold,
            {k: self.host.get(k, 0) + other.host.get(k, 0) for k in {**self.host, **other.host}},
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
            self.bytes_cold * factor,
            {k: n * factor for k, n in self.host.items()},
        )

    def subs(self, bindings: dict[Any, Any]) -> Work:
        def s(v: Expr) -> Expr:
            return v.subs(bindings) if isinstance(v, sympy.Basic) else v

        return Work({d: s(f) for d, f in self.matmul_flops.items()}, s(self.vector_flops), s(self.transcendentals), s(self.bytes_read), s(self.bytes_written), s(self.launches), s(self.bytes_cold), {k: s(n) for k, n in self.host.items()})


FREE = Work(launches=0)


@dataclass(frozen=True)
class Roofline:
    """Time of some work on one hardware target: `time = overhead + max(compute, memory)`."""

    compute: Expr
    memory: Expr
    overhead: Expr

    @property
    def time(self) -> Expr:
        return self.overhead + _max_of([self.compute, self.memory])

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
    units = [
        sum((f / hw.matmul_rate(d) for d, f in work.matmul_flops.items()), sympy.Integer(0)),
        work.vector_flops / (hw.vector_flops * hw.achievable["vector"]),
        work.transcendentals / (hw.transcendentals * hw.achievable["vector"]),
    ]
    # GPUs issue to tensor cores, FP32 pipes and special-function units concurrently (a tuned
    # kernel such as FlashAttention-3 overlaps softmax with the matmuls); a CPU runs all three on
    # the same SIMD units, one after the other
    compute = _max_of(units) if hw.overlapped_units else sum(units, sympy.Integer(0))
    compute += _host_cost(work, hw, lambda k: k in PER_ELEMENT)
    memory = memory_time(work.bytes - work.bytes_cold, hw) + _simplify(work.bytes_cold / (hw.memory_bandwidth * hw.achievable["memory"]))
    memory += _host_cost(work, hw, lambda k: k in PER_BYTE)
    return Roofline(_simplify(compute), _simplify(memory), _simplify(overhead(work, hw)))


PER_ELEMENT = ("trig", "scalar_loop", "rows")  # `host` kinds counted in elements (compute), not events
PER_BYTE = ("gemv_bytes",)  # `host` kinds counted in bytes (memory time)


def overhead(work: Work, hw: Hardware) -> Expr:
    """Fixed cost: a launch overhead per kernel, plus, on a host that measured them, the
    framework events the op's call makes on the CPU (see `Work.host`)."""
    return work.launches * hw.launch_overhead + _host_cost(work, hw, lambda k: k not in PER_ELEMENT and k not in PER_BYTE)


def _host_cost(work: Work, hw: Hardware, kinds: Any) -> Expr:
    costs = getattr(hw, "dispatch", None) or {}
    return sum((n * costs.get(kind, 0.0) for kind, n in work.host.items() if kinds(kind)), 0)


def memory_time(nbytes: Expr, hw: Hardware) -> Expr:
    """Seconds to stream a working set of `nbytes`: the bytes up to each cache level's capacity
    at that level's bandwidth, the rest from the next level, down to memory."""
    symbolic = isinstance(nbytes, sympy.Basic) and not nbytes.is_number
    low, high = (sympy.Min, sympy.Max) if symbolic else (min, max)
    nbytes = nbytes if symbolic else float(nbytes)
    scale = hw.achievable["memory"]
    time: Expr = 0.0
    below = 0.0  # capacity of the level above
    for capacity, bandwidth in sorted(hw.caches):
        time += (low(nbytes, capacity) - low(nbytes, below)) / (bandwidth * scale)
        below = capacity
    time += high(nbytes - below, 0) / (hw.memory_bandwidth * scale)
    return _simplify(time)


def _max_of(values: list[Expr]) -> Expr:
    if any(isinstance(v, sympy.Basic) and not v.is_number for v in values):
        return sympy.Max(*values)
    return max(float(v) for v in values)


def _simplify(v: Expr) -> Expr:
    if isinstance(v, sympy.Basic) and v.is_number:
        return float(v)
    return v
