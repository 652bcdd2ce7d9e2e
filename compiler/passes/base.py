"""What a pass is: a named, typed rewrite of the IR that says what it changed and why.

A pass declares whether it is lossy and what it requires (other passes that must run first,
or context such as calibration data), and implements `run(gm, ctx)`, which edits the
GraphModule in place and returns a `PassResult`. Passes hold their options as constructor
arguments; they hold no global state, so two pipelines (or two libraries) never interfere.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch.fx as fx

if TYPE_CHECKING:
    from compiler.passes.pipeline import PassContext


@dataclass
class PassResult:
    """What one run of a pass did: `changes` are human-readable lines (what and why)."""

    changed: bool = False
    changes: list[str] = field(default_factory=list)
    stats: dict[str, Any] = field(default_factory=dict)

    def record(self, change: str) -> None:
        self.changed = True
        self.changes.append(change)

    def as_dict(self) -> dict[str, Any]:
        return {"changed": self.changed, "changes": self.changes, "stats": self.stats}


class Pass:
    """Base class of every pass.

    Subclasses set `name` (unique in a pipeline), `lossy`, `opt_in` (the pipeline runs it
    only when `passes` names it, whatever the budget), and `requires`: names of passes
    that must run earlier in the pipeline, or of context the pass needs ("calibration_data",
    "sample_inputs").
    """

    name: ClassVar[str] = ""
    lossy: ClassVar[bool] = False
    opt_in: ClassVar[bool] = False  # runs only when named in `passes` (costly or a planner's choice)
    requires: ClassVar[tuple[str, ...]] = ()

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        raise NotImplementedError

    def config(self) -> dict[str, Any]:
        """The options that make this pass instance behave as it does (for plans and uuids)."""
        return {}

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


CONTEXT_REQUIREMENTS = ("calibration_data", "sample_inputs")
