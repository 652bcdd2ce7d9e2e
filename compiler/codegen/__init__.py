"""Codegen: turn each compiler-op call site and each fused region into a kernel for the
target's backend.

`lower_graph` walks the IR after the passes, asks each compiler op for its lowering on the
target's backend (`triton` for GPUs, `tvm` for the host), and each fused region
(`compiler.passes.fusion.region.FusedRegion`) for the first region lowering of that backend that
accepts it, and builds an executable copy of the graph in which call sites with a runnable
kernel call it. Everything else stays ATen, never
all-or-nothing: an op with no lowering, a lowering that declines (`Unsupported`), or a kernel
that cannot run on this machine keeps the op's reference implementation, and the report says
which and why.

A region lowering declares the region kinds it takes; `region_kinds(backend)` tells the
partitioner which kinds are worth forming for a target.
"""

from __future__ import annotations

import functools
import warnings
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
import torch.fx as fx

from compiler.errors import Unsupported
from compiler.ir import arg_values, copy_graph_module, fake_mode_of, recompile
from compiler.ops.registry import Kernel, LoweringRequest, op_for_target
from compiler.passes.fusion.region import REGION_KINDS, FusedRegion


@dataclass(frozen=True)
class RegionRequest:
    """What a region lowering may look at: the region (its graph carries FakeTensor metadata),
    the FakeTensors of its inputs, and the target. The kernel's runner takes the region's
    inputs and returns what the region returns (one tensor, or a tuple)."""

    region: FusedRegion
    args: tuple[Any, ...]
    target: Any
    run_here: bool


RegionLowering = Callable[[RegionRequest], Kernel]
# The kinds a lowering takes unless it names others: those of the index-based generators that
# every backend has, which compute any elementwise op and last-dim reduction.
GENERIC_REGION_KINDS = ("pointwise", "reduction")
_REGION_LOWERINGS: dict[str, list[tuple[RegionLowering, frozenset[str]]]] = {}


def register_region_lowering(
    backend: str, kinds: Sequence[str] = GENERIC_REGION_KINDS
) -> Callable[[RegionLowering], RegionLowering]:
    """Add a region lowering for `backend` that takes regions of `kinds`; lowerings are tried in
    registration order and decline a region they cannot take by raising `Unsupported`."""
    unknown = sorted(set(kinds) - set(REGION_KINDS))
    if unknown:
        raise ValueError(f"unknown region kind(s) {unknown}; kinds are {list(REGION_KINDS)}")

    def decorate(fn: RegionLowering) -> RegionLowering:
        _REGION_LOWERINGS.setdefault(backend, []).append((fn, frozenset(kinds)))
        return fn

    return decorate


def region_kinds(backend: str | None = None) -> frozenset[str]:
    """The region kinds that some lowering of `backend` takes; with no backend (a pass run
    without a target), the kinds that every backend takes. The partitioner forms no others: a
    region no lowering takes would only run its ATen ops, and a warning."""
    if backend is not None:
        return frozenset().union(*(kinds for _, kinds in _REGION_LOWERINGS.get(backend, [])))
    per_backend = [region_kinds(b) for b in _REGION_LOWERINGS]
    return frozenset.intersection(*per_backend) if per_backend else frozenset()


def _lower_region(region: FusedRegion, args: tuple[Any, ...], target: Any) -> tuple[Kernel | None, str]:
    """The first kernel a lowering that takes the region's kind makes for it, or None and why not."""
    reasons = []
    for lowering, kinds in _REGION_LOWERINGS.get(target.codegen, []):
        if region.kind not in kinds:
            continue
        try:
            return lowering(RegionRequest(region, args, target, run_here=True)), ""
        except Unsupported as exc:
            reasons.append(str(exc))
    return None, "; ".join(reasons) or f"no {target.codegen} lowering for {region.kind} regions"

# Importing the backends registers their lowerings; neither imports triton or tvm until a
# lowering runs (TRITON_INTERPRET must be set before triton's first import).
import compiler.codegen.triton  # noqa: E402,F401
import compiler.codegen.tvm  # noqa: E402,F401


@dataclass
class CodegenReport:
    """Kernels generated, call sites that fell back to ATen and why, and ATen ops left."""

    backend: str
    kernels: list[Kernel] = field(default_factory=list)
    fallbacks: list[str] = field(default_factory=list)
    aten_ops: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "backend": self.backend,
            "kernels": [{"name": k.name, "backend": k.backend, "runs_here": k.runner is not None, "note": k.note} for k in self.kernels],
            "fallbacks": self.fallbacks,
            "fallback_summary": self.fallback_summary(),
            "aten_ops": self.aten_ops,
        }


    def fallback_summary(self) -> dict[str, int]:
        """Fallback reasons with how many call sites each covers."""
        return dict(Counter(f.split(": ", 1)[1] for f in self.fallbacks).most_common())


def _use_kernel(node: fx.Node, kernel: Kernel, kernels: dict[tuple[str, str], Kernel], report: CodegenReport) -> None:
    """Record the kernel and, when it runs on this machine, make the node call it."""
    if (kernel.name, kernel.backend) not in kernels:
        kernels[(kernel.name, kernel.backend)] = kernel
        report.kernels.append(kernel)
    if kernel.runner is None:
        report.fallbacks.append(f"{node.name}: {kernel.note}; runs its reference")
        return
    node.op = "call_function"
    node.target = _profiled(kernel.name, kernel.runner)
    node.meta["compiler.kernel"] = kernel.name


def _profiled(name: str, runner: Callable[..., Any]) -> Callable[..., Any]:
    """`runner`, shown under the kernel's name in `torch.profiler` traces. The check costs
    ~0.1 us per call; an unconditional `record_function` would cost ~16 us, which a decode step
    of a few hundred kernel calls would feel."""

    @functools.wraps(runner)
    def run(*args: Any, **kwargs: Any) -> Any:
        if not torch.autograd.profiler._is_profiler_enabled:
            return runner(*args, **kwargs)
        with torch.profiler.record_function(f"compiler::{name}"):
            return runner(*args, **kwargs)

    return run


def _signature(value: Any) -> Any:
    """What a lowering can see of an argument, as a hashable key: a tensor's shape, strides,
    dtype and device (sizes as their symbolic expressions), scalars and None as themselves."""
    if isinstance(value, torch.Tensor):
        return ("tensor", tuple(map(str, value.shape)), tuple(map(str, value.stride())), value.dtype, value.device.type)
    if isinstance(value, (list, tuple)):
        return tuple(_signature(v) for v in value)
    if isinstance(value, (torch.SymInt, torch.SymFloat, torch.SymBool)):
        return ("sym", str(value))
    return (type(value).__name__, value)


def _region_signature(region: FusedRegion) -> tuple[Any, ...]:
    """A region's structure up to node names: its kind and, per node, the op, the target, the
    arguments (other nodes by position) and the value's signature. Regions that agree here
    compute the same function, so they share a kernel."""
    index = {n: i for i, n in enumerate(region.graph.nodes)}

    def arg(a: Any) -> Any:
        if isinstance(a, fx.Node):
            return ("node", index[a])
        if isinstance(a, (list, tuple)):
            return tuple(arg(x) for x in a)
        if isinstance(a, dict):
            return tuple(sorted((k, arg(v)) for k, v in a.items()))
        return _signature(a)

    nodes = tuple(
        (n.op, str(n.target) if n.op != "placeholder" else "", arg(n.args), arg(n.kwargs), _signature(n.meta.get("val")))
        for n in region.graph.nodes
    )
    return (region.kind, nodes)


def lower_graph(gm: fx.GraphModule, target: Any) -> tuple[fx.GraphModule, CodegenReport]:
    """The executable graph for `target` and what codegen did. `gm` itself is not changed."""
    report = CodegenReport(target.codegen)
    executable = copy_graph_module(gm)
    mode = fake_mode_of(gm) if any(op_for_target(n.target) for n in gm.graph.nodes) else None
    kernels: dict[tuple[str, str], Kernel] = {}
    # Call sites with equal arguments, and regions of equal structure (the 30 layers of a
    # model), get one lowering.
    lowered: dict[tuple[str, Any, Any], Any] = {}
    for node in executable.graph.nodes:
        if node.op == "call_module" and isinstance(executable.get_submodule(str(node.target)), FusedRegion):
            region = executable.get_submodule(str(node.target))
            args = tuple(a.meta["val"] if isinstance(a, fx.Node) else a for a in node.args)
            key = ("region", _region_signature(region), _signature(args))
            if key not in lowered:
                lowered[key] = _lower_region(region, args, target)
            kernel, why = lowered[key]
            if kernel is None:
                warnings.warn(f"region {node.name} ({region.kind}) runs in ATen: {why}", stacklevel=2)
                report.fallbacks.append(f"{node.name}: {why}; region runs in ATen")
                continue
            _use_kernel(node, kernel, kernels, report)
            continue
        if node.op != "call_function":
            continue
        op = op_for_target(node.target)
        if op is None:
            if isinstance(node.target, torch._ops.OpOverload):
                key = str(node.target)
                report.aten_ops[key] = report.aten_ops.get(key, 0) + 1
            continue
        lowering = op.lowerings.get(target.codegen)
        if lowering is None:
            report.fallbacks.append(f"{node.name}: compiler::{op.name} has no {target.codegen} lowering; runs its reference")
            continue
        args = arg_values(executable, node.args, mode)
        key = ("op", op.name, _signature(args))
        if key not in lowered:
            try:
                lowered[key] = lowering(LoweringRequest(args=args, target=target, run_here=True))
            except Unsupported as exc:
                lowered[key] = exc
        kernel = lowered[key]
        if isinstance(kernel, Unsupported):
            warnings.warn(f"compiler::{op.name} at {node.name} falls back to its reference: {kernel}", stacklevel=2)
            report.fallbacks.append(f"{node.name}: {kernel}; runs its reference")
            continue
        _use_kernel(node, kernel, kernels, report)
    recompile(executable)
    report.aten_ops = dict(Counter(report.aten_ops).most_common())
    return executable, report
