"""Calibration inputs for lossy passes.

A pass that calibrates needs inputs at a length that suits it (sparse attention wants long
windows, a weight quantizer short ones), in the captured graph's flat calling convention.
`Calibration` makes them on demand from a function of (window, count) that returns the
model's own inputs (a dict of kwargs, a tuple of args, or a tensor, as `example_inputs`),
e.g. `MODEL.calibration_batches` of an `optimize` model file; `Calibration.fixed` wraps a list
of ready inputs. Text for it comes from `*_calibration.txt` only (see compiler.evaluation).
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

from compiler.errors import UserInputError


class Calibration:
    def __init__(self, make: Callable[[int, int], Sequence[Any]], flatten: Callable[[Any], list[Any]] | None = None, name: str = "calibration") -> None:
        self._make = make
        self._flatten = flatten
        self.name = name

    @classmethod
    def fixed(cls, inputs: Sequence[Any], name: str = "calibration inputs") -> Calibration:
        """Ready inputs; `window` must match their length when a pass asks for one."""
        return cls(lambda window, count: list(inputs)[:count], name=name)

    def with_flatten(self, flatten: Callable[[Any], list[Any]]) -> Calibration:
        """The same source, flattened for a captured graph."""
        return Calibration(self._make, flatten, self.name)

    def batches(self, window: int, count: int) -> list[list[Any]]:
        """`count` inputs of `window` tokens, as flat graph inputs."""
        made = list(self._make(window, count))
        if not made:
            raise UserInputError(f"{self.name} gave no inputs for window={window}, count={count}")
        if self._flatten is None:
            return [list(x) if isinstance(x, (list, tuple)) else [x] for x in made]
        return [self._flatten(x) for x in made]
