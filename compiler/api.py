"""The Python front door: `compiler.compile(model, example_inputs, target=..., ...)`.

Captures the model with torch.export (falling back to nothing silently is not an option: a
model export cannot take is a CaptureError that points at the torch.compile backend), runs the
data path and returns a `CompiledModule` that is called like the model.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Sequence

import torch

from compiler.budget import Budget
from compiler.calibration import Calibration
from compiler.capture import capture_export, capture_fx, split_example_inputs
from compiler.driver import CompiledModule, CompileOptions, compile_graph
from compiler.passes.pipeline import Pipeline
from compiler.targets import Target


def compile(
    model: torch.nn.Module,
    example_inputs: Any,
    *,
    target: str | Target = "host",
    passes: str | Iterable[str] | None = None,
    disable: str | Iterable[str] | None = None,
    budget: str | Budget | None = None,
    pipeline: Pipeline | None = None,
    verify: bool = False,
    dump_dir: str | None = None,
    calibration: Calibration | Callable[[int, int], Sequence[Any]] | Sequence[Any] | None = None,
    dynamic_shapes: Any = None,
) -> CompiledModule:
    """Compile `model` for `target`.

    `example_inputs` is a tuple of args, a dict of kwargs or a tensor. `passes` keeps only the
    named passes, `disable` removes some, `budget` bounds lossy passes ("lossless",
    "ppl:+2%", "agreement:98%"), `verify` checks each pass numerically on the example inputs.
    `calibration` feeds lossy passes: a function `(window, count) -> list of model inputs`
    (each like `example_inputs`), a list of model inputs, or a `Calibration` (which can also make
    retrieval prompts, `Calibration(make, retrieval=...)`). `dynamic_shapes` goes to
    torch.export (e.g. the sequence dimension, so that one graph serves every length).
    """
    options = CompileOptions.make(target, budget, passes, disable, pipeline, verify, dump_dir)
    args, kwargs = split_example_inputs(example_inputs)
    if isinstance(model, torch.fx.GraphModule):
        captured = capture_fx(model, args)
    else:
        captured = capture_export(model, args, kwargs, dynamic_shapes=dynamic_shapes)
    sample = captured.flatten_inputs(args, kwargs)
    source = None
    if calibration is not None:
        if isinstance(calibration, Calibration):
            source = calibration
        else:
            source = Calibration(calibration) if callable(calibration) else Calibration.fixed(calibration)
        source = source.with_flatten(captured.flatten_example)
    result = compile_graph(captured.gm, options, sample_inputs=sample, calibration=source)
    return CompiledModule(captured, result)

