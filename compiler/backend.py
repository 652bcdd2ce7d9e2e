"""The torch.compile backend: `torch.compile(model, backend="compiler", options={...})`.

Installed as the entry point `compiler` in the group `torch_dynamo_backends`, so users need
not import this package. Dynamo hands us a torch-level graph; aot_autograd lowers it to the
ATen inference graph; we freeze the weights (Dynamo passes them as inputs), run the one data
path (`compiler.driver.compile_graph`) and return the executable graph.

Options: `target` (default "host"), `passes` (only these), `disable`, `budget`, `dump_dir`.
Dynamic shapes follow Dynamo: the second distinct sequence length recompiles once with a
symbolic length, later lengths reuse that graph. The backend is for inference: a graph that
needs gradients runs eagerly, with a warning.
"""

from __future__ import annotations

import warnings
from typing import Any, Callable, Sequence

import torch
import torch.fx as fx

from compiler.capture import aten_graph_from_aot
from compiler.driver import CompileOptions, CompileResult, compile_graph

_OPTION_KEYS = {"target", "passes", "disable", "budget", "dump_dir", "verify", "pipeline"}


def _static_input_indices(gm: fx.GraphModule) -> list[int]:
    """Positions of Dynamo graph inputs that are weights (parameters and buffers of modules)."""
    indices = []
    for i, node in enumerate(gm.graph.find_nodes(op="placeholder")):
        tensor_dict = node.meta.get("tensor_dict") or {}
        if tensor_dict.get("_dynamo_static_input_type"):
            indices.append(i)
    return indices


class CompilerBackend:
    """Callable Dynamo backend; keeps the results of each compiled graph for inspection."""

    def __init__(self, options: dict[str, Any] | None = None) -> None:
        options = dict(options or {})
        unknown = set(options) - _OPTION_KEYS
        if unknown:
            from compiler.errors import UserInputError

            raise UserInputError(f"unknown backend option(s) {sorted(unknown)}; known: {sorted(_OPTION_KEYS)}")
        self.options = CompileOptions.make(**options)
        self.results: list[CompileResult] = []

    def __call__(self, gm: fx.GraphModule, example_inputs: Sequence[Any]) -> Callable[..., Any]:
        from torch._dynamo.backends.common import aot_autograd

        if torch.is_grad_enabled() and any(isinstance(x, torch.Tensor) and x.requires_grad for x in example_inputs):
            warnings.warn(
                "the 'compiler' backend compiles inference graphs; this graph needs gradients and runs "
                "eagerly. Call the model under torch.no_grad() or torch.inference_mode()",
                stacklevel=2,
            )
            return gm.forward
        static = _static_input_indices(gm)
        lifted = len(dict(gm.named_parameters(remove_duplicate=False))) + len(dict(gm.named_buffers(remove_duplicate=False)))

        def fw_compiler(aten_gm: fx.GraphModule, aot_inputs: Sequence[Any]) -> Callable[..., Any]:
            weights = {}
            if lifted:
                tracing = torch._guards.TracingContext.try_get()
                weights.update(dict(enumerate(tracing.params_flat)))
            weights.update({lifted + i: example_inputs[i] for i in static})
            ir = aten_graph_from_aot(aten_gm, weights)
            result = compile_graph(ir, self.options)
            self.results.append(result)
            executable = result.executable
            keep = [i for i in range(len(aot_inputs)) if i not in weights]

            def run(args: list[Any]) -> Any:
                inputs = [args[i] for i in keep]
                args.clear()
                return executable(*inputs)

            run._boxed_call = True  # type: ignore[attr-defined]
            return run

        return aot_autograd(fw_compiler=fw_compiler, keep_inference_input_mutations=True)(gm, example_inputs)


def compiler_backend(gm: fx.GraphModule, example_inputs: Sequence[Any], options: dict[str, Any] | None = None) -> Callable[..., Any]:
    """Entry point for `torch.compile(..., backend="compiler")`."""
    return CompilerBackend(options)(gm, example_inputs)
