"""An ML graph compiler for PyTorch models, mostly LLMs.

    nn.Module --capture--> ATen GraphModule (FakeTensor metadata)
              --Pipeline(passes, PassContext)--> rewritten graph
              --codegen[target]--> Triton | TVM kernels | ATen fallback --> CompiledModule

Front doors: `compiler.compile(model, example_inputs, target=...)`, the torch.compile backend
`backend="compiler"`, and the `optimize` CLI. Pass authors start at `compiler.passes`.
"""

from compiler.api import compile
from compiler.driver import CompiledModule, CompileResult
from compiler.errors import CaptureError, CompilerError, PassError, Unsupported, UserInputError

__all__ = [
    "CaptureError",
    "CompileResult",
    "CompiledModule",
    "CompilerError",
    "PassError",
    "Unsupported",
    "UserInputError",
    "compile",
]
