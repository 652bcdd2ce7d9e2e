"""The Python front door: `compiler.compile(model, example_inputs, target=..., ...)`.

Captures the model with torch.export (falling back to nothing silently is not an option: a
model export cannot take is a CaptureError that points at the torch.compile backend), runs the
data path and returns a `CompiledModule` that is called like the model.
"""

from __future__ import annotations

from typing import Any, Iterable

import torch

from compiler.budget import Budget
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
) -> CompiledModule:
    """Compile `model` for `target`.

    `example_inputs` is a tuple of args, a dict of kwargs or a tensor. `passes` keeps only the
    named passes, `disable` removes some, `budget` bounds lossy passes ("lossless",
    "ppl:+2%", "agreement:98%"), `verify` checks each pass numerically on the example inputs.
    """
    options = CompileOptions.make(target, budget, passes, disable, pipeline, verify, dump_dir)
    args, kwargs = split_example_inputs(example_inputs)
    if isinstance(model, torch.fx.GraphModule):
        captured = capture_fx(model, args)
    else:
        captured = capture_export(model, args, kwargs)
    sample = captured.flatten_inputs(args, kwargs)
    result = compile_graph(captured.gm, options, sample_inputs=sample)
    return CompiledModule(captured, result)

