"""Shared plumbing of the TVM backend: targets, building, the kernel cache and tensor exchange.

Codegen is the step of capture -> passes -> codegen -> compiled module that turns an op call or a
fused region into a kernel. A TVM lowering (rms_norm today; fused regions and attention later)
writes a TIR PrimFunc and schedules it; this module does the rest the same way for all of them:

- `parse_target` turns a target file's `tvm_target` ("llvm", "cuda -arch=sm_90") into a
  `tvm.target.Target` (TVM 0.27 no longer parses the CLI form itself);
- `build_primfunc` compiles for the host CPU once: the shared library is cached on disk by content
  hash (TVMScript + target + TVM version) and memoized in-process, so later compiles are fast;
- `device_source` generates the code of a GPU target, for reading, without running it;
- `to_tvm` / `from_tvm` exchange tensors with torch through DLPack, without copies.

tvm is imported inside the functions: importing it takes seconds, and a compile that never
lowers to TVM should not pay for it.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from compiler.cache import cache_dir

# Generated code assumes 64-byte aligned buffers (TVM's default data alignment); DLPack import
# checks it, so kernel inputs must be aligned (see `as_kernel_input`).
_ALIGNMENT = 64
# CLI options whose value is a comma-separated list in the target's JSON form.
_LIST_OPTIONS = ("keys", "libs", "mattr")


@dataclass(frozen=True)
class BuiltFunction:
    """A compiled TVM function, callable with torch tensors and Python scalars.

    Calls are destination-passing: the caller allocates the outputs and passes them with the
    inputs, in the PrimFunc's parameter order. Tensors go through `to_tvm`, so they must be
    contiguous and aligned; `library` is the shared library it was loaded from.
    """

    name: str
    library: Path
    module: Any
    function: Any

    def __call__(self, *args: Any) -> Any:
        return self.function(*(to_tvm(a) if isinstance(a, torch.Tensor) else a for a in args))


# Loaded functions by library path: the path names the cache folder too, so a test or a user
# pointing COMPILER_CACHE_DIR elsewhere gets a library written there.
_BUILT: dict[Path, BuiltFunction] = {}
_BUILD_LOCK = threading.Lock()


def parse_target(tvm_target: str) -> Any:
    """The `tvm.target.Target` for a target file's `tvm_target` string.

    Accepts the JSON form TVM 0.27 takes ('{"kind": "cuda", "arch": "sm_90"}') and the CLI form
    the target files use ("cuda -arch=sm_90", "llvm -mattr=+avx2,+fma"). A bare "llvm" means the
    host: its CPU is filled in so LLVM uses the host's vector width instead of baseline x86-64.
    """
    import tvm
    from tvm.target import codegen

    is_json = tvm_target.lstrip().startswith("{")
    config = json.loads(tvm_target) if is_json else _parse_cli(tvm_target)
    if config.get("kind") == "llvm" and "mcpu" not in config and "mtriple" not in config:
        config["mcpu"] = codegen.llvm_get_system_cpu()
    return tvm.target.Target(config)


def _parse_cli(tvm_target: str) -> dict[str, Any]:
    kind, *options = tvm_target.split()
    config: dict[str, Any] = {"kind": kind}
    for option in options:
        key, sep, value = option.lstrip("-").partition("=")
        if not sep:
            config[key] = True
        elif key in _LIST_OPTIONS:
            config[key] = value.split(",")
        else:
            config[key] = value
    return config


def host_fp32_lanes(target: Any) -> int:
    """fp32 lanes of the host's vector registers, from the CPU features LLVM reports. (TVM 0.27's
    `llvm_get_vector_width` says 512 bits for any x86 CPU, AVX2 ones included; 16-lane loops
    then take two registers per value, and polynomial kernels spill.)"""
    from tvm.target.codegen import llvm_get_cpu_features

    features = llvm_get_cpu_features(target)
    if "avx512f" in features:
        return 16
    if "avx" in features:
        return 8
    return 4  # SSE, NEON


def build_primfunc(func: Any, tvm_target: str, name: str) -> BuiltFunction:
    """Compile a scheduled PrimFunc for a host target and return its entry point `name`.

    The shared library lives in `cache_dir("tvm")` under a hash of the function's TVMScript, the
    resolved target and the TVM version, so an edit to the kernel or an upgrade of TVM never
    loads stale code. A hit loads the library instead of compiling; loaded functions are also
    memoized by path, so the same kernel is loaded once per process.
    """
    import tvm

    target = parse_target(tvm_target)
    func = func.with_attr("global_symbol", name)
    key = hashlib.sha256(
        "\n".join((func.script(), str(target), tvm.__version__)).encode()
    ).hexdigest()[:24]
    library = cache_dir("tvm") / f"{name}-{key}.so"
    with _BUILD_LOCK:
        if library not in _BUILT:
            if not library.is_file():
                _export(_compile(func, target), library)
            module = tvm.runtime.load_module(str(library))
            _BUILT[library] = BuiltFunction(name, library, module, module[name])
        return _BUILT[library]


def _compile(func: Any, target: Any) -> Any:
    import tvm

    return tvm.compile(tvm.IRModule({"main": func}), target=target)


def _export(executable: Any, library: Path) -> None:
    # Write under a private name and rename: another process compiling the same kernel must
    # never load a half-written library.
    partial = library.with_name(f"{library.stem}.{os.getpid()}.{threading.get_ident()}.tmp.so")
    executable.export_library(str(partial))
    os.replace(partial, library)


def device_source(func: Any, tvm_target: str, name: str) -> str:
    """The device code (CUDA C for a cuda target) TVM generates for a scheduled PrimFunc.

    Nothing is run, so no GPU is needed. Raises whatever TVM raises when the code cannot be
    generated (a missing toolchain, a schedule the target rejects); callers fall back to the
    TVMScript.
    """
    module = _compile(func.with_attr("global_symbol", name), parse_target(tvm_target)).mod
    if not module.imports:
        raise RuntimeError(f"TVM generated no device module for {tvm_target!r}")
    return module.imports[0].inspect_source()


def as_kernel_input(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` itself when a TVM kernel can read it in place (contiguous, 64-byte aligned), else
    a contiguous copy. Only for inputs: a kernel writing to a copy would write to nowhere.
    An empty tensor is always replaced: torch calls it contiguous whatever its strides (an empty
    slice of a cache keeps its parent's), while TVM checks them against its compact ones."""
    if tensor.numel() == 0:
        # TVM's compact strides are products of the later sizes (0 across an empty dim);
        # torch's own treat an empty dim as size 1
        strides, step = [], 1
        for size in reversed(tensor.shape):
            strides.append(step)
            step *= size
        return torch.empty_strided(tensor.shape, tuple(reversed(strides)), dtype=tensor.dtype, device=tensor.device)
    if tensor.is_contiguous() and tensor.data_ptr() % _ALIGNMENT == 0:
        return tensor
    return tensor.clone(memory_format=torch.contiguous_format)


def to_tvm(tensor: torch.Tensor) -> Any:
    """A TVM tensor viewing the same memory as `tensor` (DLPack, no copy).

    Raises if the tensor is not contiguous or not 64-byte aligned, because the generated code
    would misread it; pass inputs through `as_kernel_input` first.
    """
    import tvm

    return tvm.runtime.from_dlpack(tensor)


def from_tvm(tensor: Any) -> torch.Tensor:
    """A torch tensor viewing the same memory as a TVM tensor (DLPack, no copy)."""
    return torch.from_dlpack(tensor)
