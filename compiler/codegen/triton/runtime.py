"""Where a generated Triton kernel can run (on a CUDA device, or anywhere under the
interpreter: `TRITON_INTERPRET=1`, set before triton is first imported), and how its source
becomes an imported module."""

from __future__ import annotations

import importlib.util
import os
from types import ModuleType
from typing import Any

import torch

from compiler.cache import cache_dir

_LOADED: dict[tuple[bool, str], ModuleType] = {}


def load_module(name: str, source: str) -> ModuleType:
    """Kernel `source` as an imported module: written once per name to the cache folder
    (atomically, so concurrent compiles never read half a file), imported once per process
    and interpreter setting (`@triton.jit` fixes that choice at import)."""
    key = (interpreting(), name)
    if key not in _LOADED:
        path = cache_dir("triton") / f"{name}.py"
        if not path.is_file():
            partial = path.with_name(f"{path.name}.{os.getpid()}.tmp")
            partial.write_text(source)
            os.replace(partial, path)
        spec = importlib.util.spec_from_file_location(f"compiler_triton_{name}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)  # type: ignore[union-attr]
        _LOADED[key] = module
    return _LOADED[key]


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def why_not_runnable(req: Any, device: str) -> str:
    """Empty when a kernel for `req` (a lowering or region request) can run here on tensors of
    `device`, else the reason it cannot."""
    if not req.run_here:
        return "not loaded: the caller asked for source only"
    if interpreting():
        return ""
    if device == "cuda" and torch.cuda.is_available():
        return ""
    if device == "cuda":
        return f"Triton kernel for {req.target.device}: no CUDA device here and TRITON_INTERPRET is not set"
    return f"Triton kernel for {device} tensors: only runs there under TRITON_INTERPRET=1"
