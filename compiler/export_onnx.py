"""Export the optimized IR to ONNX, with every compiler op as an ONNX function of our own domain.

    IR (after the passes) --copy; inline fused regions; bake in non-tensor inputs-->  ATen graph
      --torch.export, torch.onnx.export(dynamo=True, custom_translation_table)-->  ModelProto in
        which each `compiler::<op>` call is ONE node `ai.ml_compiler::<op_type>`
      + one FunctionProto per op_type, its body exported from the op's reference
      --checked: each function and the whole model in onnxruntime, onnx.checker-->  file

Why functions in a custom domain. A compiler op is the unit the passes reason about and the
backends lower (a Triton or TVM kernel per op). Exporting it as one node of `ai.ml_compiler`
keeps that unit visible in the ONNX file: a runtime with its own kernel for `causal_attention`
can take the node whole, and the graph reads as the compiler's IR does. ONNX model-local
functions give the same node a portable meaning: a runtime without such a kernel inlines the
body (onnxruntime does), so the file runs anywhere, with no custom-op library.

How the bodies are built. Each `CompilerOp` has a plain-torch `reference`, the op's meaning
(`compiler.ops.registry`). For every distinct call signature (the op, its tensor arguments'
dtypes and shapes, its other arguments' values) the reference is wrapped in a small module
with the non-tensor arguments baked in, exported by the same exporter at the call's shapes,
and its graph becomes the FunctionProto (initializers turned into Constant nodes). A body is
specialized to its scalars and shapes, so each signature gets its own op_type: the op's name,
or `<op>_<i>` when an op has several (the function's doc string lists the baked-in scalars).
There is no second, hand-written ONNX version of an op that could drift from what the
compiler runs. Fused regions are plain ATen graphs: they are inlined and exported as such.

One exception: a reference that branches on tensor values (a fast path when a padding mask is
all ones) cannot be traced by torch.export, and tracing the branch the sample took would be
wrong for other inputs. `TRACEABLE_REFERENCES` holds, for those ops, the reference's general
branch without the test (the same math on every input; the tests compare each with the
reference on inputs that take each branch). An op whose reference cannot be traced and has no
entry there is refused with a `UserInputError` that names it, as is any custom op outside the
`compiler` namespace (no reference) and any ATen op torchlib cannot translate.
`_aten_translations` fills the few ATen gaps the references hit (`x >> y` of two tensors,
unsigned shifts, `empty_permuted`).

How it is checked. `export_onnx` first runs the IR on the sample inputs, recording what every
compiler op receives; before anything is written, onnxruntime runs each function alone on its
first call's arguments against the reference, and the whole model on the sample inputs against
the IR's outputs; `onnx.checker.check_model(full_check=True)` infers types and shapes through
the function bodies. A mismatch raises `CompilerError`. `check_onnx` runs a saved file and
compares every output with the compiled model's (or anything else's).

Shapes. By default the model takes exactly the sample inputs' static shapes. With
`dynamic=True`, every dimension the IR holds symbolically (a graph captured with
`dynamic_shapes`) stays symbolic in the model and in the function bodies; a dimension that
torch.export specializes while re-exporting, or a compiler op taking a symbolic scalar, raises
a `UserInputError`. Non-tensor inputs (`use_cache=False`) are always baked in.

Size. Weights are initializers; above 1 GiB the file is saved with external data (protobuf
stops at 2 GiB), next to it as `<name>.data`.
"""

from __future__ import annotations

import math
import operator
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.fx as fx
import torch.nn.functional as F

import compiler.ops  # noqa: F401 - registers torch.ops.compiler.*
from compiler.errors import CompilerError, UserInputError
from compiler.ir import copy_graph_module, recompile
from compiler.ops.registry import NAMESPACE, CompilerOp, compiler_ops, op_for_target

DOMAIN = "ai.ml_compiler"
DOMAIN_VERSION = 1
DEFAULT_OPSET = 18
# Above this size a model is saved with its weights as external data (protobuf's limit is 2 GiB).
EXTERNAL_DATA_BYTES = 1 << 30

_TENSOR_TYPES = [
    f"tensor({t})"
    for t in (
        "float", "float16", "bfloat16", "double", "int8", "int16", "int32", "int64",
        "uint8", "uint16", "uint32", "uint64", "bool",
    )
]


# -- traceable forms of references that branch on tensor values --------------------------------


def _causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_padding_mask: torch.Tensor | None, scale: float) -> torch.Tensor:
    """`compiler::causal_attention`'s general branch (explicit end-aligned causal mask and the
    padding mask), which the reference skips for SDPA's `is_causal` when the mask is all ones.
    A query row that sees no key gives 0, as torch's SDPA does; ONNX's softmax would give NaN."""
    queries, keys = q.shape[-2], k.shape[-2]
    mask = torch.ones(queries, keys, dtype=torch.bool, device=q.device).tril(keys - queries)
    if key_padding_mask is not None:
        mask = mask & key_padding_mask[:, :keys].to(torch.bool)[:, None, None, :]
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=q.shape[1] != k.shape[1])
    return torch.where(mask.any(-1, keepdim=True), out, 0.0).to(q.dtype)


def _block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_blocks: torch.Tensor,
    kv_counts: torch.Tensor,
    scale: float,
    block_size: int,
    expected_density: float,
    key_padding_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """`compiler::block_sparse_attention`'s general branch, all heads at once: the listed
    blocks expanded to positions, causal, padding; rows that see no key give 0. The reference
    takes dense `is_causal` SDPA instead when the layout lists every block (the same result)."""
    from compiler.ops.block_sparse_attention import block_mask, check_layout

    check_layout(q, k, kv_blocks, kv_counts, block_size)
    s = q.shape[2]
    blocks = block_mask(kv_blocks, kv_counts, s, block_size)  # [B, Hq, NB, NB]
    mask = blocks.repeat_interleave(block_size, 2)[:, :, :s].repeat_interleave(block_size, 3)[..., :s]
    mask = mask & torch.ones(s, s, dtype=torch.bool, device=q.device).tril()
    if key_padding_mask is not None:
        mask = mask & key_padding_mask[:, :s].to(torch.bool)[:, None, None, :]
    group = q.shape[1] // k.shape[1]
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=group > 1)
    return torch.where(mask.any(-1, keepdim=True), out, 0.0).to(q.dtype)


TRACEABLE_REFERENCES: dict[str, Callable[..., Any]] = {
    "causal_attention": _causal_attention,
    "block_sparse_attention": _block_sparse_attention,
}


def body_reference(op: CompilerOp) -> Callable[..., Any]:
    """The function a body is exported from: the op's reference, or its traceable form."""
    return TRACEABLE_REFERENCES.get(op.name, op.reference)


# -- ATen overloads torchlib lacks or gets wrong ---------------------------------------------------------------


_UNSIGNED = ("UINT8", "UINT16", "UINT32", "UINT64")


def _shift_translation(direction: str) -> Callable[..., Any]:
    """`x >> y` / `x << y`. torchlib (onnxscript 0.7) registers the `bitwise_*_shift`
    spellings but not `aten.__rshift__.Tensor`, which `a >> b` of two tensors records, and its
    shifts cast every result to a signed type (a uint8 shift comes back int8). Unsigned
    operands map to ONNX BitShift as they are; signed ones to torchlib's arithmetic shift."""

    def translate(self: Any, other: Any) -> Any:
        import onnx_ir as ir
        from onnxscript.function_libs.torch_lib.ops import core
        from onnxscript.onnx_opset import opset18 as op

        if not isinstance(self, ir.Value):
            self = op.Constant(value=ir.tensor(self, dtype=other.dtype))
        if not isinstance(other, ir.Value):
            other = op.Constant(value=ir.tensor(other, dtype=self.dtype))
        if other.dtype != self.dtype:
            other = op.CastLike(other, self)
        if self.dtype is not None and self.dtype.name in _UNSIGNED:
            return op.BitShift(self, other, direction=direction)
        signed = core.aten_bitwise_right_shift if direction == "RIGHT" else core.aten_bitwise_left_shift
        return signed(self, other)

    return translate


def _empty_permuted(size: Any, physical_layout: Any, dtype: Any = None, **_: Any) -> Any:
    """`torch.empty_permuted` (the references' outputs in SDPA's memory layout): ONNX tensors
    have no strides, so it is `empty` of the logical size (torchlib's, zeros)."""
    from onnxscript.function_libs.torch_lib.ops import core

    return core.aten_empty(size, dtype=-1 if dtype is None else dtype)


def _aten_translations() -> dict[Any, Callable[..., Any]]:
    """ATen overloads that torchlib lacks or gets wrong, for the graph and the bodies."""
    aten = torch.ops.aten
    right, left = _shift_translation("RIGHT"), _shift_translation("LEFT")
    return {
        aten.empty_permuted.default: _empty_permuted,
        aten.__rshift__.Tensor: right,
        aten.__rshift__.Scalar: right,
        aten.bitwise_right_shift.Tensor: right,
        aten.bitwise_right_shift.Tensor_Scalar: right,
        aten.__lshift__.Tensor: left,
        aten.__lshift__.Scalar: left,
        aten.bitwise_left_shift.Tensor: left,
        aten.bitwise_left_shift.Tensor_Scalar: left,
    }


# -- results ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class CustomFunction:
    """One function of the custom domain: a compiler op at one call signature."""

    op: str  # the compiler op, `compiler::<op>`
    op_type: str  # the node and function name in DOMAIN
    calls: int  # call sites in the model
    inputs: tuple[tuple[str, tuple[int | None, ...]], ...]  # per tensor argument: dtype, dims (None: symbolic)
    constants: dict[str, Any]  # the non-tensor arguments baked into the body
    body_nodes: int
    max_abs_error: float | None  # onnxruntime against the reference, on the sample's first call


@dataclass
class OnnxExport:
    """What `export_onnx` wrote."""

    path: Path
    opset: int
    domain: str
    functions: list[CustomFunction]
    inputs: list[str]
    outputs: list[str]
    dynamic: bool
    regions_inlined: int
    nodes: int  # nodes of the main graph
    op_types: dict[str, int]  # main-graph nodes per "domain::op_type"
    external_data: bool
    max_abs_error: float | None  # onnxruntime against the IR on the sample inputs (None: unchecked)
    seconds: float
    notes: list[str] = field(default_factory=list)

    def function_calls(self) -> dict[str, int]:
        """Call sites per custom op_type."""
        return {f.op_type: f.calls for f in self.functions}

    def summary(self) -> str:
        lines = [
            f"ONNX export: {self.path} (opset {self.opset}, {self.nodes} nodes, "
            f"{'dynamic' if self.dynamic else 'static'} shapes, {self.seconds:.1f} s)",
            f"inputs: {', '.join(self.inputs)}",
            f"outputs: {', '.join(self.outputs)}",
            f"fused regions inlined: {self.regions_inlined}",
            "max |ort - IR| on the sample: " + ("unchecked" if self.max_abs_error is None else f"{self.max_abs_error:.2e}"),
        ]
        for f in self.functions:
            err = "unchecked" if f.max_abs_error is None else f"max |ort - reference| = {f.max_abs_error:.2e}"
            args = ", ".join(f"{dtype}[{', '.join('?' if d is None else str(d) for d in dims)}]" for dtype, dims in f.inputs)
            lines.append(f"- {self.domain}::{f.op_type} ({f.op}) x{f.calls}: ({args}) with {f.constants}, {f.body_nodes} body nodes, {err}")
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


# -- preparing the graph ------------------------------------------------------------------------


def _prepare(gm: fx.GraphModule, sample_inputs: Sequence[Any]) -> tuple[fx.GraphModule, list[torch.Tensor], int]:
    """A copy of `gm` that torch.export can take: fused regions inlined (they are plain ATen
    graphs), non-tensor inputs (`use_cache=False`) baked in as the constants the sample holds.
    Returns it, its tensor inputs, and how many regions were inlined."""
    out = copy_graph_module(gm)
    placeholders = [n for n in out.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != len(sample_inputs):
        raise UserInputError(
            f"export_onnx: the graph takes {len(placeholders)} inputs, {len(sample_inputs)} sample inputs were given; "
            "pass the flat inputs (Captured.flatten_inputs)"
        )
    tensors = []
    for node, value in zip(placeholders, sample_inputs):
        if isinstance(value, torch.Tensor):
            # a copy: torch.export marks the dims it makes dynamic on the tensor objects it is
            # given, and a second export of the caller's tensors (a static retry) would inherit them
            tensors.append(value.clone())
            continue
        if not isinstance(value, (bool, int, float, type(None))):
            raise UserInputError(f"export_onnx: input {node.name} is a {type(value).__name__}; only tensors and Python scalars can be exported")
        for user in list(node.users):
            user.args = fx.node.map_arg(user.args, lambda n, node=node, value=value: value if n is node else n)
            user.kwargs = fx.node.map_arg(user.kwargs, lambda n, node=node, value=value: value if n is node else n)
        out.graph.erase_node(node)
    inlined = _inline_regions(out)
    out.graph.lint()
    recompile(out)
    return out.eval(), tensors, inlined


def _inline_regions(gm: fx.GraphModule) -> int:
    """Replace every `call_module` of a GraphModule (a FusedRegion) by its nodes."""
    count = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_module":
            continue
        module = gm.get_submodule(str(node.target))
        if not isinstance(module, fx.GraphModule):
            raise UserInputError(f"export_onnx: {node.name} calls a {type(module).__name__}, not a fused region; only ATen graphs can be exported")
        if node.kwargs:
            raise UserInputError(f"export_onnx: region {node.target} is called with keyword arguments")
        result = _copy_region(gm, node, module)
        if isinstance(result, (tuple, list)):
            for user in list(node.users):
                if user.target is not operator.getitem:
                    raise UserInputError(f"export_onnx: {user.name} uses the outputs of region {node.target} other than by getitem")
                user.replace_all_uses_with(result[user.args[1]])
                gm.graph.erase_node(user)
        else:
            node.replace_all_uses_with(result)
        gm.graph.erase_node(node)
        count += 1
    gm.delete_all_unused_submodules()
    return count


def _copy_region(gm: fx.GraphModule, call: fx.Node, region: fx.GraphModule) -> Any:
    env: dict[fx.Node, Any] = {}
    inputs = iter(call.args)
    result: Any = None
    with gm.graph.inserting_before(call):
        for sub in region.graph.nodes:
            if sub.op == "placeholder":
                env[sub] = next(inputs)
            elif sub.op == "output":
                result = fx.node.map_arg(sub.args[0], lambda n: env[n])
            elif sub.op == "get_attr":
                name = _free_attr(gm, f"{call.target}_{sub.target}".replace(".", "_"))
                gm.register_buffer(name, _get_attr(region, str(sub.target)), persistent=False)
                env[sub] = gm.graph.get_attr(name)
                env[sub].meta.update(sub.meta)
            elif sub.op == "call_module":
                raise UserInputError(f"export_onnx: region {call.target} calls a module; regions must be flat ATen graphs")
            else:
                env[sub] = gm.graph.node_copy(sub, lambda n: env[n])
    return result


def _get_attr(module: torch.nn.Module, target: str) -> Any:
    obj: Any = module
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _free_attr(gm: fx.GraphModule, prefix: str) -> str:
    i = 0
    while hasattr(gm, f"{prefix}_{i}"):
        i += 1
    return f"{prefix}_{i}"


def _check_supported(gm: fx.GraphModule) -> None:
    """Refuse, before any export work, calls the exporter could only get wrong: custom ops of
    other namespaces (no reference to build a body from) and compiler ops taking tensor lists."""
    for node in gm.graph.nodes:
        if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload):
            continue
        ns = node.target.namespace
        if ns == NAMESPACE:
            op = op_for_target(node.target)
            if op is None:
                raise UserInputError(f"export_onnx: {node.target} is not a registered compiler op (compiler.ops.compiler_ops()); register it with @compiler_op")
            for arg in _bound_args(node.target, node.args, node.kwargs):
                if isinstance(arg, (list, tuple)) and any(isinstance(a, fx.Node) for a in arg):
                    raise UserInputError(f"export_onnx: {node.name} ({node.target}) takes a list of tensors; compiler ops with tensor-list arguments cannot be exported")
        elif ns not in ("aten", "prims"):
            raise UserInputError(
                f"export_onnx: {node.name} calls {node.target._schema.name}, a custom op with no reference implementation to build an "
                f"ONNX function from; define it as a compiler op (compiler.ops.compiler_op) or run the pass that replaces it"
            )


def _bound_args(target: torch._ops.OpOverload, args: Sequence[Any], kwargs: dict[str, Any]) -> list[Any]:
    """Every schema argument in order: positional, then by keyword, then the default."""
    out = []
    for i, a in enumerate(target._schema.arguments):
        if i < len(args):
            out.append(args[i])
        elif a.name in kwargs:
            out.append(kwargs[a.name])
        elif a.has_default_value():
            out.append(a.default_value)
        else:
            raise UserInputError(f"export_onnx: a call of {target} misses argument {a.name}")
    return out


# -- call signatures ----------------------------------------------------------------------------


def _dims(shape: Sequence[Any]) -> tuple[int | None, ...]:
    """Static dims as ints, symbolic ones as None."""
    return tuple(d if isinstance(d, int) else None for d in shape)


def _signature(op: str, args: Sequence[Any], describe: Callable[[int, Any], Any]) -> tuple[Any, ...]:
    """What makes one function body: the op, each tensor argument's (dtype, dims) and each
    other argument's value. `describe(i, arg)` gives a tensor's (dtype, dims), else None; the
    torch side (recorded calls) and the ONNX side (the translation) must agree on it."""
    parts: list[Any] = [op]
    for i, a in enumerate(args):
        d = describe(i, a)
        parts.append(("tensor", *d) if d is not None else ("const", _hashable(a)))
    return tuple(parts)


def _hashable(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return tuple(_hashable(v) for v in value)
    if isinstance(value, torch.dtype):
        return str(value)
    return value


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _describe_onnx(i: int, a: Any) -> Any:
    import onnx_ir as ir
    from onnx_ir.tensor_adapters import to_torch_dtype

    if isinstance(a, ir.Value):
        if a.dtype is None or a.shape is None:
            raise CompilerError(f"export_onnx: argument {i} of a compiler op has no type in the exported graph ({a})")
        return (_dtype_name(to_torch_dtype(a.dtype)), _dims(a.shape))
    return None


@dataclass
class _Config:
    """One call signature and what it becomes."""

    op: CompilerOp
    args: list[Any]  # the first call's bound arguments (real tensors)
    output: Any  # the op's output on them
    tensor_slots: list[int]  # positions of the tensor arguments
    symbolic: list[tuple[int | None, ...]]  # dims per tensor argument, None where symbolic
    calls: int = 1
    op_type: str = ""

    def constants(self) -> dict[str, Any]:
        """The non-tensor arguments, by name: what the body has baked in."""
        names = [a.name for a in self.op.overload._schema.arguments]
        return {names[i]: a for i, a in enumerate(self.args) if i not in self.tensor_slots}


def _record_calls(gm: fx.GraphModule, inputs: Sequence[torch.Tensor], dynamic: bool) -> tuple[dict[tuple[Any, ...], _Config], Any]:
    """Run the graph on the sample inputs and group every compiler op call by signature; the
    first call of each keeps its arguments and output (to export and check the body with).
    Each signature gets its op_type: the op's name, or `<name>_<i>` when it has several.
    Returns the signatures and the graph's outputs."""
    configs: dict[tuple[Any, ...], _Config] = {}

    class Recorder(fx.Interpreter):
        def run_node(self, n: fx.Node) -> Any:
            self.node = n
            return super().run_node(n)

        def call_function(self, target: Any, args: Any, kwargs: Any) -> Any:
            out = super().call_function(target, args, kwargs)
            op = op_for_target(target)
            if op is not None:
                metas = _bound_args(target, *_meta_args(self.node))
                _add_call(configs, op, _bound_args(target, args, kwargs), metas, out, dynamic)
            return out

    with torch.no_grad():
        outputs = Recorder(gm).run(*inputs)
    by_op: dict[str, list[_Config]] = {}
    for cfg in configs.values():
        by_op.setdefault(cfg.op.name, []).append(cfg)
    for name, group in by_op.items():
        for i, cfg in enumerate(group):
            cfg.op_type = name if len(group) == 1 else f"{name}_{i}"
    return configs, outputs


def _add_call(configs: dict[tuple[Any, ...], _Config], op: CompilerOp, args: list[Any], metas: list[Any], out: Any, dynamic: bool) -> None:
    """Count one call under its signature. The dims come from the IR's metadata when the
    export is dynamic (None where symbolic), from the real arguments otherwise."""
    slots = [i for i, a in enumerate(args) if isinstance(a, torch.Tensor)]
    dims = {i: _dims(metas[i].shape) if dynamic and isinstance(metas[i], torch.Tensor) else tuple(args[i].shape) for i in slots}
    if dynamic:
        for i, m in enumerate(metas):
            if isinstance(m, (torch.SymInt, torch.SymFloat, torch.SymBool)):
                raise UserInputError(
                    f"export_onnx: compiler::{op.name} takes argument {op.overload._schema.arguments[i].name} as a symbolic "
                    "scalar; a function body bakes scalars in, so export with dynamic=False"
                )
    key = _signature(op.name, args, lambda i, a: (_dtype_name(a.dtype), dims[i]) if i in dims else None)
    if key in configs:
        configs[key].calls += 1
    else:
        configs[key] = _Config(op, args, out, slots, [dims[i] for i in slots])
    _output_count(out)


def _meta_args(node: fx.Node) -> tuple[Any, Any]:
    def val(n: fx.Node) -> Any:
        return n.meta.get("val")

    return fx.node.map_arg(node.args, val), fx.node.map_arg(node.kwargs, val)


# -- the main graph -----------------------------------------------------------------------------


def _dynamic_shapes(gm: fx.GraphModule) -> tuple[Any, ...]:
    """torch.export's dynamic_shapes for the prepared graph: a dimension is dynamic where the
    IR's placeholder holds a SymInt."""
    from torch.export import Dim

    specs = []
    for node in gm.graph.nodes:
        if node.op != "placeholder":
            continue
        val = node.meta.get("val")
        if isinstance(val, torch.Tensor):
            specs.append({i: Dim.DYNAMIC for i, d in enumerate(val.shape) if not isinstance(d, int)} or None)
        else:
            specs.append(None)
    return tuple(specs)


def _torch_export(module: torch.nn.Module, args: Sequence[torch.Tensor], dynamic_shapes: Any, what: str) -> torch.export.ExportedProgram:
    try:
        with torch.no_grad():
            return torch.export.export(module, tuple(args), dynamic_shapes=dynamic_shapes, strict=False)
    except Exception as exc:
        lines = str(exc).strip().splitlines() or [type(exc).__name__]
        where = next((ln.strip() for ln in lines if ln.strip().startswith('File "')), "")
        raise UserInputError(f"export_onnx: torch.export could not trace {what}: {lines[0]}" + (f" ({where})" if where else "")) from exc


def _onnx_program(ep: torch.export.ExportedProgram, opset: int, table: dict[Any, Callable[..., Any]] | None, what: str) -> Any:
    import logging
    import warnings

    # the registry logs a warning per torchvision op it cannot register, on every export
    registry_log = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = registry_log.level
    registry_log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            table = {**_aten_translations(), **(table or {})}
            return torch.onnx.export(ep, (), dynamo=True, opset_version=opset, custom_translation_table=table, optimize=True, verbose=False)
    except Exception as exc:
        reason = _onnx_reason(exc)
        if "No ONNX function found" in reason:
            reason += (
                "; torchlib has no translation for this ATen op: add one to compiler.export_onnx._aten_translations, "
                "or disable the pass that produced it"
            )
        raise UserInputError(f"export_onnx: torch.onnx could not translate {what}: {reason}") from exc
    finally:
        registry_log.setLevel(level)


def _onnx_reason(exc: BaseException) -> str:
    """The innermost useful line of an exporter error (it wraps the cause in several layers)."""
    reasons = []
    e: BaseException | None = exc
    while e is not None:
        text = str(e).strip()
        for line in text.splitlines():
            if "No ONNX function found" in line or "not supported" in line.lower():
                return line.strip()
        if text:
            reasons.append(text.splitlines()[0])
        e = e.__cause__ or e.__context__
    return reasons[-1] if reasons else type(exc).__name__


def _translation(op: CompilerOp, configs: dict[tuple[Any, ...], _Config]) -> Callable[..., Any]:
    """The custom translation of `compiler::<op>`: one node of DOMAIN whose op_type is its
    call signature's, with the tensor arguments as inputs (the rest is in the body)."""
    from onnxscript.values import Op, Opset

    def translate(*args: Any, **kwargs: Any) -> Any:
        bound = _bound_args(op.overload, args, kwargs)
        key = _signature(op.name, bound, _describe_onnx)
        cfg = configs.get(key)
        if cfg is None:
            raise CompilerError(
                f"export_onnx: a call of compiler::{op.name} has signature {key[1:]}, which no call on the sample inputs had "
                "(torch.export specialized a shape?); export with dynamic=False"
            )
        tensors = [bound[i] for i in cfg.tensor_slots]
        outputs = _output_count(cfg.output)
        return Op(Opset(DOMAIN, DOMAIN_VERSION), cfg.op_type, _schema(cfg.op_type, len(tensors), outputs))(*tensors)

    return translate


def _output_count(output: Any) -> int:
    if isinstance(output, torch.Tensor):
        return 1
    if isinstance(output, (tuple, list)) and all(isinstance(o, torch.Tensor) for o in output):
        return len(output)
    raise UserInputError(f"export_onnx: a compiler op returned {type(output).__name__}; only tensors and tuples of tensors can be exported")


def _schema(op_type: str, inputs: int, outputs: int) -> Any:
    """An OpSchema (not registered anywhere) that lets onnxscript's tracer emit the node."""
    from onnx.defs import OpSchema

    return OpSchema(
        op_type,
        DOMAIN,
        DOMAIN_VERSION,
        inputs=[OpSchema.FormalParameter(f"x{i}", f"T{i}") for i in range(inputs)],
        outputs=[OpSchema.FormalParameter(f"y{i}", f"U{i}") for i in range(outputs)],
        type_constraints=[(f"T{i}", _TENSOR_TYPES, "") for i in range(inputs)] + [(f"U{i}", _TENSOR_TYPES, "") for i in range(outputs)],
    )


# -- function bodies ----------------------------------------------------------------------------


class _Reference(torch.nn.Module):
    """The reference at one call signature: tensors in, non-tensor arguments baked in."""

    def __init__(self, fn: Callable[..., Any], template: list[Any], slots: list[int]) -> None:
        super().__init__()
        self.fn = fn
        self.template = template
        self.slots = slots

    def forward(self, *tensors: torch.Tensor) -> Any:
        args = list(self.template)
        for i, t in zip(self.slots, tensors):
            args[i] = t
        return self.fn(*args)


@dataclass
class _Body:
    """A function built from a reference, with what the model needs to call it."""

    function: Any  # onnx.FunctionProto
    nested: list[Any]  # functions its body calls (exporter helpers), to add to the model
    imports: dict[str, int]  # its opset imports
    ir_version: int


def _build_function(cfg: _Config, opset: int, dynamic: bool) -> _Body:
    """Export the reference at the call signature and turn its graph into the FunctionProto
    `DOMAIN::cfg.op_type`: graph inputs and outputs become the function's, initializers
    become Constant nodes (a function has no initializers)."""
    from onnx import helper
    from torch.export import Dim

    template = [None if i in cfg.tensor_slots else a for i, a in enumerate(cfg.args)]
    module = _Reference(body_reference(cfg.op), template, cfg.tensor_slots).eval()
    tensors = [cfg.args[i] for i in cfg.tensor_slots]
    shapes = None
    if dynamic and any(None in dims for dims in cfg.symbolic):
        # forward takes *tensors: one parameter, whose spec is the tuple of per-tensor specs.
        # Dim.AUTO, not DYNAMIC: the body relates its inputs' symbolic dims (q's and k's
        # sequence are one symbol, a block count is derived from it), which torch.export then
        # infers; a dim it would specialize is refused below instead
        shapes = (tuple({i: Dim.AUTO for i, d in enumerate(dims) if d is None} or None for dims in cfg.symbolic),)
    what = f"the reference of compiler::{cfg.op.name}"
    try:
        ep = _torch_export(module, tensors, shapes, what)
        if shapes is not None:
            _check_still_symbolic(ep, cfg.symbolic, what)
    except UserInputError as exc:
        if "data-dependent" not in str(exc):
            raise
        raise UserInputError(
            f"{exc}. The reference branches on tensor values; give compiler::{cfg.op.name} a traceable form "
            "(the same math on every input) in compiler.export_onnx.TRACEABLE_REFERENCES, or disable the pass that inserts it"
        ) from exc.__cause__
    model = _onnx_program(ep, opset, None, what).model_proto
    graph = model.graph
    if len(graph.input) != len(tensors):
        raise CompilerError(f"export_onnx: the body of {cfg.op_type} takes {len(graph.input)} inputs, the call {len(tensors)}")
    inputs = [i.name for i in graph.input]
    constants = {init.name for init in graph.initializer}
    nodes = [helper.make_node("Constant", [], [init.name], value=init) for init in graph.initializer]
    outputs = []
    for o in graph.output:
        if o.name in inputs or o.name in constants or o.name in outputs:
            # a function output must be computed by a node of the body, once
            name = f"{o.name}_out{len(outputs)}"
            nodes.append(helper.make_node("Identity", [o.name], [name]))
            outputs.append(name)
        else:
            outputs.append(o.name)
    nodes[len(constants):len(constants)] = list(graph.node)
    imports = {imp.domain: imp.version for imp in model.opset_import}
    function = helper.make_function(
        DOMAIN,
        cfg.op_type,
        inputs,
        outputs,
        nodes,
        [helper.make_opsetid(d, v) for d, v in imports.items()],
        doc_string=f"compiler::{cfg.op.name} with {cfg.constants()}; body exported from its reference",
    )
    return _Body(function, list(model.functions), imports, model.ir_version)


def _check_still_symbolic(ep: torch.export.ExportedProgram, wanted: Sequence[tuple[int | None, ...]], what: str) -> None:
    """Refuse an export that specialized a dimension the IR keeps symbolic (the function would
    be right at the sample's sizes only)."""
    from torch.export.graph_signature import InputKind

    users = [s.arg.name for s in ep.graph_signature.input_specs if s.kind == InputKind.USER_INPUT]
    vals = {n.name: n.meta.get("val") for n in ep.graph.nodes if n.op == "placeholder"}
    for j, (name, dims) in enumerate(zip(users, wanted)):
        val = vals.get(name)
        if not isinstance(val, torch.Tensor):
            continue
        fixed = [i for i, d in enumerate(dims) if d is None and isinstance(val.shape[i], int)]
        if fixed:
            raise UserInputError(f"export_onnx: torch.export could not trace {what}: it specialized dims {fixed} of input {j}, which the graph keeps symbolic")


def _call_model(body: _Body, cfg: _Config) -> Any:
    """A one-node model calling the function on the call's tensors."""
    from onnx import helper

    tensors = [cfg.args[i] for i in cfg.tensor_slots]
    ins = [helper.make_tensor_value_info(f"in{i}", _onnx_dtype(t.dtype), list(t.shape)) for i, t in enumerate(tensors)]
    outs = [helper.make_tensor_value_info(f"out{i}", _onnx_dtype(t.dtype), list(t.shape)) for i, t in enumerate(_outputs(cfg.output))]
    node = helper.make_node(cfg.op_type, [i.name for i in ins], [o.name for o in outs], domain=DOMAIN)
    graph = helper.make_graph([node], cfg.op_type, ins, outs)
    opsets = [helper.make_opsetid(d, v) for d, v in {**body.imports, DOMAIN: DOMAIN_VERSION}.items()]
    return helper.make_model(graph, opset_imports=opsets, functions=[body.function, *body.nested], ir_version=body.ir_version)


def _outputs(output: Any) -> list[torch.Tensor]:
    return [output] if isinstance(output, torch.Tensor) else list(output)


def _onnx_dtype(dtype: torch.dtype) -> int:
    from onnx_ir.tensor_adapters import from_torch_dtype

    return int(from_torch_dtype(dtype))


def _check_function(model: Any, cfg: _Config, rtol: float, atol: float) -> float:
    """Run the one-node model in onnxruntime on the call's tensors and compare with the op's
    output there (the reference's); raises CompilerError on a mismatch."""
    got = run_onnx(model, [cfg.args[i] for i in cfg.tensor_slots])
    worst = 0.0
    for g, w in zip(got, _outputs(cfg.output)):
        report = _compare(torch.from_numpy(np.asarray(g)), w, rtol, atol)
        worst = max(worst, report["max_abs_error"])
        if not report["ok"]:
            raise CompilerError(
                f"export_onnx: the ONNX function {DOMAIN}::{cfg.op_type} differs from the reference of compiler::{cfg.op.name} "
                f"on the sample's call ({report['why']}); not writing a wrong model"
            )
    return worst


def op_call_model(op: str | CompilerOp, args: Sequence[Any], *, opset: int = DEFAULT_OPSET) -> Any:
    """A one-node ONNX model (ModelProto) that calls `op`'s function at these arguments, as
    `export_onnx` builds it: the tensors are the model's inputs, the rest is baked into the
    body. For testing a function on inputs of one's choosing (`run_onnx(model, tensors)`)."""
    if isinstance(op, str):
        if op not in compiler_ops():
            raise UserInputError(f"op_call_model: no compiler op {op!r}; known: {', '.join(sorted(compiler_ops()))}")
        op = compiler_ops()[op]
    bound = _bound_args(op.overload, args, {})
    with torch.no_grad():
        output = op.overload(*bound)
    slots = [i for i, a in enumerate(bound) if isinstance(a, torch.Tensor)]
    cfg = _Config(op, bound, output, slots, [tuple(bound[i].shape) for i in slots], op_type=op.name)
    return _call_model(_build_function(cfg, opset, dynamic=False), cfg)


# -- assembling ---------------------------------------------------------------------------------


def export_onnx(
    gm: fx.GraphModule,
    sample_inputs: Sequence[Any],
    path: str | Path,
    *,
    dynamic: bool = False,
    opset: int = DEFAULT_OPSET,
    check: bool = True,
    rtol: float = 1e-4,
    atol: float = 1e-4,
) -> OnnxExport:
    """Export the IR `gm` (e.g. `CompileResult.ir`) to `path`.

    `sample_inputs` are the flat graph inputs (`Captured.flatten_inputs`); non-tensor ones are
    baked in, tensors become the model's inputs in order. Compiler ops become nodes of DOMAIN
    with one function per call signature (see the module doc). With `check`, before anything is
    written, onnxruntime runs each function on the sample's call of it against the reference,
    and the whole model on the sample inputs against the IR (`rtol`, `atol`). `dynamic` keeps
    the IR's symbolic dimensions symbolic. Raises UserInputError for what cannot be exported
    (naming the op and the fix) and CompilerError when a check fails; nothing is written then.
    """
    import onnx

    start = time.perf_counter()
    path = Path(path)
    prepared, tensors, inlined = _prepare(gm, sample_inputs)
    _check_supported(prepared)
    configs, expected = _record_calls(prepared, tensors, dynamic)
    table = {cfg.op.overload: _translation(cfg.op, configs) for cfg in configs.values()}
    # the bodies first: they are small, and where one cannot be exported (a symbolic dim that
    # its reference specializes), the export fails before the minute the whole graph takes
    bodies = {cfg.op_type: _build_function(cfg, opset, dynamic) for cfg in configs.values()}
    ep = _torch_export(prepared, tensors, _dynamic_shapes(prepared) if dynamic else None, "the graph")
    model = _onnx_program(ep, opset, table, "the graph").model_proto
    functions = _add_functions(model, configs, bodies, check, rtol, atol)
    _check_model(model)
    error = _check_outputs(model, tensors, expected, rtol, atol) if check else None
    external = model.ByteSize() > EXTERNAL_DATA_BYTES
    path.parent.mkdir(parents=True, exist_ok=True)
    if external:
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location=path.name + ".data")
    else:
        onnx.save_model(model, str(path))
    notes = []
    if not dynamic:
        notes.append("static shapes: the model takes exactly the sample inputs' shapes")
    return OnnxExport(
        path=path,
        opset=opset,
        domain=DOMAIN,
        functions=functions,
        inputs=[_value_text(v) for v in model.graph.input],
        outputs=[_value_text(v) for v in model.graph.output],
        dynamic=dynamic,
        regions_inlined=inlined,
        nodes=len(model.graph.node),
        op_types=_op_types(model),
        external_data=external,
        max_abs_error=error,
        seconds=time.perf_counter() - start,
        notes=notes,
    )


def _add_functions(model: Any, configs: dict[tuple[Any, ...], _Config], bodies: dict[str, _Body], check: bool, rtol: float, atol: float) -> list[CustomFunction]:
    """Check and attach one function per signature (`bodies`, by op_type); add DOMAIN to the
    opset imports."""
    from onnx import helper

    used = {n.op_type for n in model.graph.node if n.domain == DOMAIN}
    known = {(f.domain, f.name, f.overload) for f in model.functions}
    imports = {imp.domain: imp.version for imp in model.opset_import}
    out = []
    for cfg in configs.values():
        if cfg.op_type not in used:
            raise CompilerError(f"export_onnx: compiler::{cfg.op.name} ({cfg.op_type}) was called on the sample but is not in the exported graph")
        body = bodies[cfg.op_type]
        for domain, version in body.imports.items():
            if imports.setdefault(domain, version) != version:
                raise CompilerError(f"export_onnx: the body of {cfg.op_type} imports {domain or 'ai.onnx'} {version}, the model {imports[domain]}")
        error = _check_function(_call_model(body, cfg), cfg, rtol, atol) if check else None
        for f in [body.function, *body.nested]:
            if (f.domain, f.name, f.overload) not in known:
                known.add((f.domain, f.name, f.overload))
                model.functions.append(f)
        out.append(
            CustomFunction(
                op=cfg.op.name,
                op_type=cfg.op_type,
                calls=sum(1 for n in model.graph.node if n.domain == DOMAIN and n.op_type == cfg.op_type),
                inputs=tuple((_dtype_name(cfg.args[i].dtype), d) for i, d in zip(cfg.tensor_slots, cfg.symbolic)),
                constants=cfg.constants(),
                body_nodes=len(body.function.node),
                max_abs_error=error,
            )
        )
    missing = used - {f.op_type for f in out}
    if missing:
        raise CompilerError(f"export_onnx: nodes {sorted(missing)} of {DOMAIN} have no function")
    imports[DOMAIN] = DOMAIN_VERSION
    del model.opset_import[:]
    model.opset_import.extend(helper.make_opsetid(d, v) for d, v in imports.items())
    return out


def _check_outputs(model: Any, tensors: Sequence[torch.Tensor], expected: Any, rtol: float, atol: float) -> float | None:
    """The whole model in onnxruntime on the sample inputs against the IR's outputs; None when
    the model is too large to run from memory (check the saved file with `check_onnx`)."""
    if model.ByteSize() > EXTERNAL_DATA_BYTES:
        return None
    want = [y for y in _flat(expected) if isinstance(y, torch.Tensor)]
    got = run_onnx(model, tensors)
    if len(got) != len(want):
        raise CompilerError(f"export_onnx: the model has {len(got)} outputs, the IR {len(want)}")
    worst = 0.0
    for i, (g, w) in enumerate(zip(got, want)):
        report = _compare(torch.from_numpy(np.asarray(g)), w, rtol, atol)
        worst = max(worst, report["max_abs_error"])
        if not report["ok"]:
            raise CompilerError(f"export_onnx: output {i} of the ONNX model differs from the IR on the sample inputs ({report['why']}); not writing a wrong model")
    return worst


def _check_model(model: Any) -> None:
    """onnx.checker with full_check (shape inference through the functions), by path above
    protobuf's in-memory limit."""
    import tempfile

    import onnx

    try:
        if model.ByteSize() < (1 << 31) - (1 << 20):
            onnx.checker.check_model(model, full_check=True)
        else:
            with tempfile.TemporaryDirectory() as tmp:
                f = Path(tmp) / "model.onnx"
                onnx.save_model(model, str(f), save_as_external_data=True, location="model.onnx.data")
                onnx.checker.check_model(str(f), full_check=True)
    except Exception as exc:
        raise CompilerError(f"export_onnx: the ONNX checker rejected the model: {str(exc).strip().splitlines()[0]}") from exc


def _value_text(v: Any) -> str:
    t = v.type.tensor_type
    dims = [d.dim_value if d.HasField("dim_value") else d.dim_param or "?" for d in t.shape.dim]
    from onnx import helper

    return f"{v.name}: {helper.tensor_dtype_to_np_dtype(t.elem_type).name}{dims}"


def _op_types(model: Any) -> dict[str, int]:
    counts: dict[str, int] = {}
    for n in model.graph.node:
        key = f"{n.domain}::{n.op_type}" if n.domain else n.op_type
        counts[key] = counts.get(key, 0) + 1
    return counts


# -- running the file ----------------------------------------------------------------------------


def _session(model: Any) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    source = model if isinstance(model, (str, bytes)) else str(model) if isinstance(model, Path) else model.SerializeToString()
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def run_onnx(model: Any, tensors: Sequence[torch.Tensor]) -> list[np.ndarray]:
    """Run an ONNX model (a path or a ModelProto) in onnxruntime on CPU; inputs in order."""
    return _run_session(_session(model), tensors)


def _run_session(session: Any, tensors: Sequence[torch.Tensor]) -> list[np.ndarray]:
    names = [i.name for i in session.get_inputs()]
    if len(names) != len(tensors):
        raise UserInputError(f"run_onnx: the model takes {len(names)} inputs ({', '.join(names)}), {len(tensors)} tensors were given")
    feeds = {n: t.detach().cpu().numpy() for n, t in zip(names, tensors)}
    return session.run(None, feeds)


def _compare(got: torch.Tensor, want: torch.Tensor, rtol: float, atol: float) -> dict[str, Any]:
    want = want.detach().cpu()
    if tuple(got.shape) != tuple(want.shape):
        return {"ok": False, "max_abs_error": math.inf, "why": f"shape {list(got.shape)} != {list(want.shape)}"}
    if want.dtype.is_floating_point or want.dtype.is_complex:
        g, w = got.double(), want.double()
        ok = bool(torch.allclose(g, w, rtol=rtol, atol=atol, equal_nan=True))
        diff = (g - w).abs()
        diff = diff[~(g.isnan() & w.isnan())]
        err = float(diff.max()) if diff.numel() else 0.0
        if math.isnan(err):
            err = math.inf
    else:
        ok = bool(torch.equal(got.to(want.dtype), want))
        err = float((got.long() - want.long()).abs().max()) if want.numel() else 0.0
    return {"ok": ok, "max_abs_error": err, "why": "" if ok else f"max abs error {err:.3g} (rtol={rtol}, atol={atol})"}


def check_onnx(
    path: str | Path,
    sample_inputs: Sequence[Any],
    expected_outputs: Sequence[Any],
    rtol: float = 1e-4,
    atol: float = 1e-4,
    *,
    raise_on_mismatch: bool = False,
) -> dict[str, Any]:
    """Run the ONNX file in onnxruntime (CPU) on `sample_inputs` (the same flat inputs as for
    `export_onnx`; non-tensors are skipped, as the export baked them in) and compare every
    output with `expected_outputs` (the compiled model's flat outputs; non-tensors skipped).

    Returns {"ok", "outputs": [{"name", "ok", "max_abs_error", "why"}], "max_abs_error"};
    with `raise_on_mismatch`, a mismatch raises CompilerError naming the outputs."""
    tensors = [x for x in sample_inputs if isinstance(x, torch.Tensor)]
    expected = [y for y in _flat(expected_outputs) if isinstance(y, torch.Tensor)]
    session = _session(Path(path))
    got = _run_session(session, tensors)
    names = [o.name for o in session.get_outputs()]
    if len(got) != len(expected):
        report = {"ok": False, "outputs": [], "max_abs_error": math.inf, "why": f"the model has {len(got)} outputs, {len(expected)} were expected"}
    else:
        rows = [{"name": n, **_compare(torch.from_numpy(np.asarray(g)), w, rtol, atol)} for n, g, w in zip(names, got, expected)]
        report = {
            "ok": all(r["ok"] for r in rows),
            "outputs": rows,
            "max_abs_error": max((r["max_abs_error"] for r in rows), default=0.0),
            "why": "; ".join(f"{r['name']}: {r['why']}" for r in rows if not r["ok"]),
        }
    if raise_on_mismatch and not report["ok"]:
        raise CompilerError(f"check_onnx: {path} differs from the expected outputs: {report['why']}")
    return report


def _flat(values: Any) -> list[Any]:
    if isinstance(values, torch.Tensor):
        return [values]
    import torch.utils._pytree as pytree

    return pytree.tree_leaves(values)
