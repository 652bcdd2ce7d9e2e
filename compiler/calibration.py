"""Calibration inputs for lossy passes.

A pass that calibrates needs inputs at a length that suits it (sparse attention wants long
windows, a weight quantizer short ones), in the captured graph's flat calling convention.
`Calibration` makes them on demand from a function of (window, count) that returns the
model's own inputs (a dict of kwargs, a tuple of args, or a tensor, as `example_inputs`),
e.g. `MODEL.calibration_batches` of an `optimize` model file; `Calibration.fixed` wraps a list
of ready inputs. Text for it comes from `*_calibration.txt` only (see compiler.evaluation).

A source may also make retrieval prompts (`MODEL.retrieval_batches`: passkey-style prompts built
from calibration text, whose last tokens can only be predicted by attending far back): sparse
attention calibrates on them which heads long-range retrieval needs, as DuoAttention does.
"""

from __future__ import annotations

from typing import Any, Callable, Collection, Sequence

import torch
import torch.fx as fx

from compiler.errors import UserInputError


class Calibration:
    def __init__(
        self,
        make: Callable[[int, int], Sequence[Any]],
        flatten: Callable[[Any], list[Any]] | None = None,
        name: str = "calibration",
        retrieval: Callable[[int, int], Sequence[Any]] | None = None,
    ) -> None:
        self._make = make
        self._flatten = flatten
        self._retrieval = retrieval
        self.name = name

    @classmethod
    def fixed(cls, inputs: Sequence[Any], name: str = "calibration inputs") -> Calibration:
        """Ready inputs; `window` must match their length when a pass asks for one."""
        return cls(lambda window, count: list(inputs)[:count], name=name)

    def with_flatten(self, flatten: Callable[[Any], list[Any]]) -> Calibration:
        """The same source, flattened for a captured graph."""
        return Calibration(self._make, flatten, self.name, self._retrieval)

    def with_retrieval(self, retrieval: Callable[[int, int], Sequence[Any]] | None) -> Calibration:
        """The same source, with a maker of retrieval prompts (None: none)."""
        return Calibration(self._make, self._flatten, self.name, retrieval)

    @property
    def has_retrieval(self) -> bool:
        return self._retrieval is not None

    def batches(self, window: int, count: int) -> list[list[Any]]:
        """`count` inputs of `window` tokens, as flat graph inputs."""
        return self._flat(self._make, window, count)

    def retrieval_batches(self, window: int, count: int) -> list[list[Any]]:
        """`count` retrieval prompts of `window` tokens as flat graph inputs ([] without a maker)."""
        return [] if self._retrieval is None else self._flat(self._retrieval, window, count)

    def _flat(self, make: Callable[[int, int], Sequence[Any]], window: int, count: int) -> list[list[Any]]:
        made = list(make(window, count))
        if not made:
            raise UserInputError(f"{self.name} gave no inputs for window={window}, count={count}")
        if self._flatten is None:
            return [list(x) if isinstance(x, (list, tuple)) else [x] for x in made]
        return [self._flatten(x) for x in made]


class _Recorder(fx.Interpreter):
    """Runs the graph and reports the values of chosen nodes as they are computed."""

    def __init__(self, gm: fx.GraphModule, wanted: Collection[fx.Node], report: Callable[[fx.Node, Any], None]) -> None:
        super().__init__(gm)
        self.wanted = wanted
        self.report = report

    def run_node(self, n: fx.Node) -> Any:
        value = super().run_node(n)
        if n in self.wanted:
            self.report(n, value)
        return value


def record(gm: fx.GraphModule, nodes: Collection[fx.Node], batches: Sequence[Sequence[Any]], report: Callable[[int, fx.Node, Any], None]) -> None:
    """Run the graph on each batch (flat inputs), without grad, calling `report(batch, node,
    value)` as each of `nodes` is computed: calibration sees every activation it needs while
    only the interpreter's live values are held, not every node's of the model."""
    wanted = set(nodes)
    for b, inputs in enumerate(batches):
        with torch.no_grad():
            _Recorder(gm, wanted, lambda node, value, b=b: report(b, node, value)).run(*inputs)


def static_length(gm: fx.GraphModule) -> int | None:
    """The sequence length of a graph captured at a fixed one (token ids [B, S] with S an int):
    calibration windows must have it; None when it is symbolic."""
    for node in gm.graph.nodes:
        val = node.meta.get("val") if node.op == "placeholder" else None
        if isinstance(val, torch.Tensor) and val.dim() == 2 and not val.dtype.is_floating_point:
            return val.shape[1] if isinstance(val.shape[1], int) else None
    return None
