"""The convention every compiler op follows, and the table of its per-backend lowerings.

A pass that needs something ATen lacks inserts a compiler op: a `torch.library` custom op in
the project's own namespace (`torch.ops.compiler.*`) with

- a reference implementation in plain torch: the ground truth for tests, and the fallback
  whenever no kernel covers a call;
- a fake implementation, so shapes propagate through FakeTensor and export;
- one lowering per codegen backend (`"triton"`, `"tvm"`), each turning one call site into a
  `Kernel`: readable source plus, where it can run on this machine, a callable;
- a cost declaration: `cost(*args)` returns the `compiler.cost_model.OpCost` of one call from
  its arguments described as `compiler.cost_model.TensorInfo` shapes (ints or sympy), so the cost
  model prices the op, symbolically in sequence length, without running it.

The lowering table is keyed by (op, backend) and lives on the op object itself; the op names
are qualified by our namespace, so two libraries cannot collide in it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch

NAMESPACE = "compiler"


@dataclass(frozen=True)
class Kernel:
    """Generated code for one op call or fused region.

    `runner` has the op's calling convention and runs on this machine; it is None when the
    code can only run elsewhere (a Triton kernel for a GPU on a CPU-only host), in which case
    `note` says why and the graph keeps the reference implementation.
    """

    name: str
    backend: str
    source: str
    runner: Callable[..., Any] | None = None
    note: str = ""
    language: str = "python"


@dataclass(frozen=True)
class LoweringRequest:
    """What a lowering may look at: the call site's arguments (FakeTensors for tensors,
    Python values or SymInts otherwise) and the target being compiled for."""

    args: tuple[Any, ...]
    target: Any
    run_here: bool


Lowering = Callable[[LoweringRequest], Kernel]


@dataclass
class CompilerOp:
    """One op of the `compiler` namespace with its reference, fake and lowerings."""

    name: str
    reference: Callable[..., Any]
    overload: torch._ops.OpOverload
    lowerings: dict[str, Lowering] = field(default_factory=dict)
    cost: Callable[..., Any] | None = None

    def register_lowering(self, backend: str) -> Callable[[Lowering], Lowering]:
        def decorate(fn: Lowering) -> Lowering:
            if backend in self.lowerings:
                raise ValueError(f"compiler::{self.name} already has a {backend!r} lowering")
            self.lowerings[backend] = fn
            return fn

        return decorate

    def __call__(self, *args: Any) -> Any:
        return self.overload(*args)


_OPS: dict[str, CompilerOp] = {}


def compiler_op(name: str, *, fake: Callable[..., Any], cost: Callable[..., Any] | None = None) -> Callable[[Callable[..., Any]], CompilerOp]:
    """Define `torch.ops.compiler.<name>` from its typed reference implementation.

    The schema is inferred from the reference's annotations (torch.library.custom_op), so the
    reference is the one place that says what the op means.
    """

    def decorate(reference: Callable[..., Any]) -> CompilerOp:
        if name in _OPS:
            raise ValueError(f"compiler::{name} is defined twice")
        custom = torch.library.custom_op(f"{NAMESPACE}::{name}", reference, mutates_args=())
        custom.register_fake(fake)
        op = CompilerOp(name, reference, getattr(getattr(torch.ops, NAMESPACE), name).default, cost=cost)
        _OPS[name] = op
        return op

    return decorate


def compiler_ops() -> dict[str, CompilerOp]:
    """All compiler ops, by name."""
    return dict(_OPS)


def op_for_target(target: Any) -> CompilerOp | None:
    """The compiler op behind an fx node target, or None for ATen and other callables."""
    if isinstance(target, torch._ops.OpOverload) and target.namespace == NAMESPACE:
        return _OPS.get(target._schema.name.split("::")[1])
    return None
