"""Capture: turn a model into the IR (see `compiler.ir`) from any of three front ends.

- `capture_export(model, args, kwargs)`: torch.export (non-strict), then decomposition to the
  ATen ops we keep (CompositeImplicit ops decomposed, nothing more).
- `capture_fx(gm, example_inputs)`: a `torch.fx.GraphModule` at torch level (e.g. from
  `symbolic_trace`), lowered to ATen through the same export path.
- `aten_graph_from_aot(gm, static_inputs)`: the ATen inference graph that aot_autograd hands
  the torch.compile backend, with the weights (which Dynamo passes as inputs) frozen.

All three end in `_normalize`, so every pass sees one dialect: weights as `get_attr`
constants, device-specific SDPA kernels (`_scaled_dot_product_flash_attention_for_cpu`, ...)
folded back into the device-neutral `aten.scaled_dot_product_attention`, no dead code.
"""

from __future__ import annotations

import inspect
import operator
import os
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
import torch.fx as fx
import torch.utils._pytree as pytree
from torch.export import ExportedProgram
from torch.export.graph_signature import InputKind, OutputKind

from compiler.errors import CaptureError
from compiler.ir import freeze_inputs, propagate_meta

aten = torch.ops.aten


@dataclass
class Captured:
    """The IR of one model plus how the model's (args, kwargs) map to its flat inputs.

    `gm` takes the flat tensor leaves of (args, kwargs) and returns a flat tuple; `in_spec`
    and `out_spec` rebuild the model's calling convention around it.
    """

    gm: fx.GraphModule
    in_spec: pytree.TreeSpec | None
    out_spec: pytree.TreeSpec | None
    source: str
    fixed_kwargs: dict[str, Any] = field(default_factory=dict)

    def flatten_inputs(self, args: Sequence[Any], kwargs: dict[str, Any]) -> list[Any]:
        kwargs = {**self.fixed_kwargs, **kwargs}
        if self.in_spec is not None and kwargs:
            from torch.export._tree_utils import reorder_kwargs

            kwargs = reorder_kwargs(kwargs, self.in_spec)
        return [x for x in pytree.tree_leaves((tuple(args), kwargs)) if x is not None]

    def flatten_example(self, example_inputs: Any) -> list[Any]:
        """`flatten_inputs` for inputs written as `example_inputs` are (a tensor, a tuple of
        args or a dict of kwargs)."""
        return self.flatten_inputs(*split_example_inputs(example_inputs))

    def unflatten_outputs(self, flat: Sequence[Any]) -> Any:
        if self.out_spec is None:
            return flat
        return pytree.tree_unflatten(list(flat), self.out_spec)


def split_example_inputs(example_inputs: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """The MODEL.py contract allows a tuple of args, a dict of kwargs, or one tensor."""
    if isinstance(example_inputs, dict):
        return (), dict(example_inputs)
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,), {}
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs), {}
    raise CaptureError(
        f"example_inputs() returned a {type(example_inputs).__name__}; return a tensor, a tuple of args "
        "or a dict of keyword arguments"
    )


def capture_export(
    model: torch.nn.Module,
    args: Sequence[Any] = (),
    kwargs: dict[str, Any] | None = None,
    *,
    dynamic_shapes: Any = None,
    cache: bool = False,
) -> Captured:
    """Capture with torch.export; `dynamic_shapes` as torch.export takes it.

    HF models return a KV-cache object by default; a forward graph does not need it
    (explicit-cache graphs are captured on their own), so `use_cache=False` is fixed when the
    model takes it and the caller did not say.

    With `cache`, the decomposed ExportedProgram is saved (`torch.export.save`) under the
    compiler's cache, keyed by the model's class and source, a fingerprint of its weights, the
    inputs' shapes and dtypes, the dynamic shapes and the torch and transformers versions; a
    later capture of the same model loads it (seconds, where exporting SmolLM2 with a symbolic
    length takes a minute or more).
    """
    kwargs = dict(kwargs or {})
    fixed = {}
    if "use_cache" in inspect.signature(model.forward).parameters and "use_cache" not in kwargs:
        fixed["use_cache"] = False
    kwargs.update(fixed)
    if isinstance(dynamic_shapes, dict) and fixed:
        dynamic_shapes = {**dynamic_shapes, **{k: None for k in fixed}}
    path = _export_cache_path(model, args, kwargs, dynamic_shapes) if cache else None
    ep = _load_export(path) if path is not None else None
    if ep is None:
        try:
            with torch.no_grad():
                ep = torch.export.export(model, tuple(args), kwargs, dynamic_shapes=dynamic_shapes, strict=False)
                ep = ep.run_decompositions(_cia_decompositions())
        except Exception as exc:  # export raises many types; the user needs the first line
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise CaptureError(
                f"torch.export could not capture {type(model).__name__}: {first}. "
                "Use the torch.compile backend, which tolerates graph breaks"
            ) from exc
        if path is not None:
            _save_export(ep, path)
            # what a later capture will load: the same program, node for node, so that the
            # fingerprints keyed on its graph (planner, calibration, measurements) match
            ep = _load_export(path) or ep
    gm = _from_exported(ep)
    return Captured(gm, ep.call_spec.in_spec, ep.call_spec.out_spec, "export", fixed)


_EXPORT_CACHE_VERSION = 1


def _export_cache_path(model: torch.nn.Module, args: Sequence[Any], kwargs: dict[str, Any], dynamic_shapes: Any) -> Any:
    """Where a capture of this model with these inputs is stored (None: not cacheable)."""
    import hashlib

    import transformers

    from compiler.cache import cache_dir

    try:
        source = inspect.getsource(type(model))
    except (OSError, TypeError):
        return None
    h = hashlib.sha256()
    leaves = [(type(x).__name__, tuple(x.shape), str(x.dtype)) if isinstance(x, torch.Tensor) else repr(x) for x in pytree.tree_leaves((tuple(args), kwargs))]
    config = getattr(model, "config", None)
    h.update(repr((_EXPORT_CACHE_VERSION, torch.__version__, transformers.__version__, type(model).__qualname__, source, sorted(kwargs), leaves, repr(dynamic_shapes), config.to_json_string() if hasattr(config, "to_json_string") else None)).encode())
    for name, tensor in sorted({**dict(model.named_parameters()), **dict(model.named_buffers())}.items()):
        flat = tensor.detach().reshape(-1)
        h.update(f"{name}{tuple(tensor.shape)}{tensor.dtype}".encode())
        h.update(flat[:: max(1, flat.numel() // 4096)].float().contiguous().numpy().tobytes())
    return cache_dir("captures") / f"{h.hexdigest()[:32]}.pt2"


def _load_export(path: Any) -> ExportedProgram | None:
    if not path.is_file():
        return None
    try:
        return torch.export.load(path)
    except Exception:  # noqa: BLE001 - a damaged or incompatible file: capture again
        path.unlink(missing_ok=True)
        return None


def _save_export(ep: ExportedProgram, path: Any) -> None:
    tmp = path.with_name(f"{path.stem}.{os.getpid()}.tmp.pt2")
    try:
        torch.export.save(ep, tmp)
        tmp.replace(path)
    except Exception as exc:  # noqa: BLE001 - caching is an optimization, never a failure
        tmp.unlink(missing_ok=True)
        import warnings

        warnings.warn(f"could not cache the exported program ({type(exc).__name__}: {exc}); the next capture exports again", stacklevel=3)


def _cia_decompositions() -> dict[Any, Any]:
    """Decompose exactly what aot_autograd decomposes (CompositeImplicitAutograd ops) so both
    paths produce one dialect; SDPA stays whole, as `_fold_sdpa_variants` makes it on the
    aot path. Export preserves CIA ops such as `aten.linear` unless told otherwise, and only
    its private helpers enumerate them.
    """
    from torch._export.utils import _collect_all_valid_cia_ops, _get_decomp_for_cia

    keep = {aten.scaled_dot_product_attention.default}
    return {op: _get_decomp_for_cia(op) for op in _collect_all_valid_cia_ops() if op not in keep}


def capture_fx(gm: fx.GraphModule, example_inputs: Sequence[Any]) -> Captured:
    """Capture a torch-level fx GraphModule (e.g. from symbolic_trace) into the IR."""
    if not isinstance(gm, fx.GraphModule):
        raise CaptureError(f"capture_fx takes a torch.fx.GraphModule, got {type(gm).__name__}")
    captured = capture_export(gm, tuple(example_inputs))
    captured.source = "fx"
    return captured


def _from_exported(ep: ExportedProgram) -> fx.GraphModule:
    gm = ep.graph_module
    sig = ep.graph_signature
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    constants: dict[fx.Node, torch.Tensor] = {}
    lookup = {**ep.state_dict, **ep.constants}
    for node, spec in zip(placeholders, sig.input_specs):
        if spec.kind in (InputKind.PARAMETER, InputKind.BUFFER, InputKind.CONSTANT_TENSOR):
            constants[node] = lookup[spec.target]
            node.meta["weight_name"] = spec.target  # kept by the get_attr that replaces it
        elif spec.kind != InputKind.USER_INPUT:
            raise CaptureError(f"unsupported exported input kind {spec.kind} for {spec.arg.name}")
    mutated = {spec.arg.name: spec.target for spec in sig.output_specs if spec.kind == OutputKind.BUFFER_MUTATION}
    for spec in sig.output_specs:
        if spec.kind not in (OutputKind.USER_OUTPUT, OutputKind.BUFFER_MUTATION):
            raise CaptureError(f"unsupported exported output kind {spec.kind}")
    _write_back_buffer_mutations(gm, mutated, placeholders, sig)
    freeze_inputs(gm, constants)
    # The exported graph module carries pytree codegen for the ExportedProgram's calling
    # convention; the IR is flat, so give it a plain graph.
    flat = fx.GraphModule(gm, gm.graph)
    flat.graph._codegen = fx.graph.CodeGen()
    flat.recompile()
    _normalize(flat)
    return flat


def _write_back_buffer_mutations(gm: fx.GraphModule, mutated: dict[str, str], placeholders: list[fx.Node], sig: Any) -> None:
    """Exported buffer updates are extra outputs; the IR writes them into the buffer instead."""
    if not mutated:
        return
    by_target = {spec.target: node for node, spec in zip(placeholders, sig.input_specs) if spec.kind == InputKind.BUFFER}
    out = next(n for n in gm.graph.nodes if n.op == "output")
    values = list(out.args[0])
    kept = []
    for spec, value in zip(sig.output_specs, values):
        if spec.kind == OutputKind.BUFFER_MUTATION:
            with gm.graph.inserting_before(out):
                copy = gm.graph.call_function(aten.copy_.default, (by_target[spec.target], value))
            copy.meta["val"] = by_target[spec.target].meta.get("val")
        else:
            kept.append(value)
    out.args = (tuple(kept),)


def aten_graph_from_aot(gm: fx.GraphModule, static_inputs: dict[int, torch.Tensor]) -> fx.GraphModule:
    """Normalize an aot_autograd inference graph, freezing the inputs at `static_inputs`."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    freeze_inputs(gm, {placeholders[i]: t for i, t in static_inputs.items()})
    _normalize(gm)
    return gm


# Device-specific SDPA kernels that CompositeImplicit decomposition picks, and where their
# arguments sit: (query, key, value) first, then these positions/keywords.
_SDPA_VARIANTS = {
    aten._scaled_dot_product_flash_attention_for_cpu.default: ("attn_mask", 3, 4),
    aten._scaled_dot_product_flash_attention.default: (None, 3, 4),
    aten._scaled_dot_product_efficient_attention.default: (3, 5, 6),
}


def _fold_sdpa_variants(gm: fx.GraphModule) -> int:
    """Fold device-specific SDPA kernels back into `aten.scaled_dot_product_attention`."""
    folded = 0
    for node in list(gm.graph.nodes):
        layout = _SDPA_VARIANTS.get(node.target) if node.op == "call_function" else None
        if layout is None:
            continue
        users = list(node.users)
        if any(u.target is not operator.getitem or u.args[1] != 0 for u in users):
            continue  # logsumexp is used (training graphs); keep the kernel as it is
        mask_at, dropout_at, causal_at = layout

        def arg(at: Any, default: Any) -> Any:
            if isinstance(at, str):
                return node.kwargs.get(at, default)
            return node.args[at] if at is not None and len(node.args) > at else default

        given = {
            "attn_mask": arg(mask_at, None),
            "dropout_p": arg(dropout_at, 0.0),
            "is_causal": arg(causal_at, False),
            "scale": node.kwargs.get("scale"),
        }
        defaults = {"attn_mask": None, "dropout_p": 0.0, "is_causal": False, "scale": None}
        kwargs = {k: v for k, v in given.items() if v != defaults[k] or isinstance(v, fx.Node)}
        with gm.graph.inserting_before(node):
            sdpa = gm.graph.call_function(aten.scaled_dot_product_attention.default, tuple(node.args[:3]), kwargs)
        propagate_meta(gm, [sdpa])
        for u in users:
            u.replace_all_uses_with(sdpa)
            gm.graph.erase_node(u)
        gm.graph.erase_node(node)
        folded += 1
    return folded


def _drop_noops(gm: fx.GraphModule) -> None:
    """Remove runtime dtype asserts (export's `.to()` checks) and `alias` (a functional no-op),
    and empty operands of `cat`: HF's cache layers start from `torch.tensor([])` and cat the
    first keys onto it, which would hide the cache input of an explicit-cache graph behind a
    copy (`cat([empty, past])` is `past`, and the graph is functional, so nothing can tell)."""
    for node in list(gm.graph.nodes):
        if node.target is aten._assert_tensor_metadata.default:
            gm.graph.erase_node(node)
        elif node.target is aten.alias.default:
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)
        elif node.target is aten.cat.default:
            _drop_empty_cat_operands(gm, node)


def _drop_empty_cat_operands(gm: fx.GraphModule, node: fx.Node) -> None:
    parts = node.args[0]
    out = node.meta.get("val")

    def empty(part: Any) -> bool:
        val = part.meta.get("val") if isinstance(part, fx.Node) else None
        # only the legacy 1-D [0] operand, which cat skips whatever the other shapes are
        return isinstance(val, torch.Tensor) and val.dim() == 1 and isinstance(val.shape[0], int) and val.shape[0] == 0
    kept = [p for p in parts if not empty(p)]
    if len(kept) == len(parts) or not kept:
        return
    if len(kept) == 1 and isinstance(out, torch.Tensor) and kept[0].meta.get("val") is not None and kept[0].meta["val"].dtype == out.dtype:
        node.replace_all_uses_with(kept[0])
        gm.graph.erase_node(node)
    else:
        node.args = (kept, *node.args[1:])


def _normalize(gm: fx.GraphModule) -> None:
    _fold_sdpa_variants(gm)
    _drop_noops(gm)
    gm.graph.eliminate_dead_code()
    gm.graph.lint()
    gm.recompile()
