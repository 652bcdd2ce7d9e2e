"""Codegen: turn each compiler-op call site into a kernel for the target's backend.

`lower_graph` walks the IR after the passes, asks each compiler op for its lowering on the
target's backend (`triton` for GPUs, `tvm` for the host), and builds an executable copy of the
graph in which call sites with a runnable kernel call it. Everything else stays ATen, never
all-or-nothing: an op with no lowering, a lowering that declines (`Unsupported`), or a kernel
that cannot run on this machine keeps the op's reference implementation, and the report says
which and why.
"""

from __future__ import annotations

import warnings
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx

from compiler.errors import Unsupported
from compiler.ir import arg_values, fake_mode_of
from compiler.ops.registry import Kernel, LoweringRequest, op_for_target

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


def _copy_graph_module(gm: fx.GraphModule) -> fx.GraphModule:
    """A new GraphModule over a copy of the graph that shares the weights (no tensor copies)."""
    graph = fx.Graph()
    out = graph.graph_copy(gm.graph, {})
    graph.output(out)
    return fx.GraphModule(gm, graph)


def lower_graph(gm: fx.GraphModule, target: Any) -> tuple[fx.GraphModule, CodegenReport]:
    """The executable graph for `target` and what codegen did. `gm` itself is not changed."""
    report = CodegenReport(target.codegen)
    executable = _copy_graph_module(gm)
    mode = fake_mode_of(gm) if any(op_for_target(n.target) for n in gm.graph.nodes) else None
    kernels: dict[tuple[str, str], Kernel] = {}
    for node in executable.graph.nodes:
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
        request = LoweringRequest(args=arg_values(executable, node.args, mode), target=target, run_here=True)
        try:
            kernel = lowering(request)
        except Unsupported as exc:
            warnings.warn(f"compiler::{op.name} at {node.name} falls back to its reference: {exc}", stacklevel=2)
            report.fallbacks.append(f"{node.name}: {exc}; runs its reference")
            continue
        if (kernel.name, kernel.backend) not in kernels:
            kernels[(kernel.name, kernel.backend)] = kernel
            report.kernels.append(kernel)
        if kernel.runner is None:
            report.fallbacks.append(f"{node.name}: {kernel.note}; runs its reference")
            continue
        node.target = kernel.runner
        node.meta["compiler.kernel"] = kernel.name
    executable.recompile()
    report.aten_ops = dict(Counter(report.aten_ops).most_common())
    return executable, report
