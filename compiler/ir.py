"""The IR: an ATen-level `torch.fx.GraphModule` whose nodes carry FakeTensor metadata.

Every capture path produces this form, every pass consumes and returns it:

- `call_function` nodes target `torch._ops.OpOverload`s (ATen or the `compiler` namespace) or
  `operator.getitem`;
- every value node has `node.meta["val"]`: a FakeTensor (shapes may hold SymInts), a SymInt,
  or a tuple of them;
- weights are frozen: parameters and buffers are `get_attr` nodes on the module (the same
  tensor objects as the model's, not copies), so passes can see and rewrite constants;
  placeholders are the runtime inputs only.

This module holds the small helpers that keep those invariants when a pass edits the graph.
"""

from __future__ import annotations

import contextlib
import hashlib
import operator
from typing import Any, Iterable, Iterator

import torch
import torch.fx as fx
from torch._guards import detect_fake_mode
from torch._subclasses.fake_tensor import FakeTensorMode


def fake_mode_of(gm: fx.GraphModule) -> FakeTensorMode:
    """The FakeTensorMode (with its ShapeEnv) that produced the graph's metadata."""
    vals = [n.meta.get("val") for n in gm.graph.nodes if "val" in n.meta]
    mode = detect_fake_mode(vals)
    if mode is None:
        raise ValueError("graph has no FakeTensor metadata; capture it with compiler.capture")
    return mode


def _to_fake(value: Any, mode: FakeTensorMode) -> Any:
    if isinstance(value, torch.Tensor) and not isinstance(value, torch._subclasses.FakeTensor):
        return mode.from_tensor(value, static_shapes=True)
    return value


def arg_values(gm: fx.GraphModule, args: Any, mode: FakeTensorMode) -> Any:
    """Node arguments with each node replaced by its FakeTensor (or SymInt) value."""
    def val(n: fx.Node) -> Any:
        if n.op == "get_attr":
            return _to_fake(_get_attr(gm, str(n.target)), mode)
        return n.meta["val"]

    return fx.node.map_arg(args, val)


def _get_attr(gm: fx.GraphModule, target: str) -> Any:
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def propagate_meta(gm: fx.GraphModule, nodes: Iterable[fx.Node]) -> None:
    """Fill `meta["val"]` on new nodes by running their targets on FakeTensors."""
    mode = fake_mode_of(gm)
    for node in nodes:
        if node.op == "get_attr":
            node.meta["val"] = _to_fake(_get_attr(gm, str(node.target)), mode)
        elif node.op == "call_function":
            args = arg_values(gm, node.args, mode)
            kwargs = arg_values(gm, node.kwargs, mode)
            with mode:
                node.meta["val"] = node.target(*args, **kwargs)


def freeze_inputs(gm: fx.GraphModule, constants: dict[fx.Node, torch.Tensor]) -> None:
    """Turn placeholders that carry weights into `get_attr` nodes holding those tensors.

    The tensors are registered as-is (no copy): the graph sees in-place updates of the
    model's weights, though not a weight replaced by a new tensor object.
    """
    if not constants:
        return
    first = next(n for n in gm.graph.nodes if n.op != "placeholder") if len(gm.graph.nodes) else None
    for i, (node, tensor) in enumerate(constants.items()):
        name = f"_frozen_{i}"
        if isinstance(tensor, torch.nn.Parameter):
            gm.register_parameter(name, tensor)
        else:
            gm.register_buffer(name, tensor, persistent=False)
        with gm.graph.inserting_before(first):
            attr = gm.graph.get_attr(name)
        attr.meta.update(node.meta)
        node.replace_all_uses_with(attr)
        gm.graph.erase_node(node)
    gm.graph.lint()
    gm.recompile()


@contextlib.contextmanager
def shallow_recompile() -> Iterator[None]:
    """Within this block `GraphModule.recompile` (and building a GraphModule) regenerates the
    code of that module only, not of every child GraphModule as torch does. Fused regions are
    compiled when they are built and no pass edits their graphs afterwards, so regenerating
    their code on every pass was waste: ~0.45 s per recompile of a model with 150 regions."""
    regenerate = fx.GraphModule._recompile_submodules
    fx.GraphModule._recompile_submodules = lambda self: []  # type: ignore[method-assign]
    try:
        yield
    finally:
        fx.GraphModule._recompile_submodules = regenerate  # type: ignore[method-assign]


def copy_graph_module(gm: fx.GraphModule) -> fx.GraphModule:
    """A new GraphModule over a copy of the graph (node metadata included, shallowly) that
    shares the weights and submodules: passes may edit the copy without touching `gm`."""
    graph = fx.Graph()
    out = graph.graph_copy(gm.graph, {})
    graph.output(out)
    with shallow_recompile():
        return fx.GraphModule(gm, graph)


def recompile(gm: fx.GraphModule) -> None:
    """`gm.recompile()` without regenerating its submodules (see `shallow_recompile`)."""
    with shallow_recompile():
        gm.recompile()


def is_mutating(node: fx.Node) -> bool:
    """True when the node writes to one of its inputs (an in-place or out= op)."""
    target = node.target
    if isinstance(target, torch._ops.OpOverload):
        return target._schema.is_mutable
    return False


def is_view(target: Any) -> bool:
    """True for an ATen op whose outputs all alias an input without writing it (the schema says
    so), plus `_unsafe_view`, a view the schema does not mark as one."""
    if not isinstance(target, torch._ops.OpOverload):
        return False
    if target.overloadpacket is torch.ops.aten._unsafe_view:
        return True
    returns = target._schema.returns
    return bool(returns) and all(r.alias_info is not None and not r.alias_info.is_write for r in returns)


def op_counts(gm: fx.GraphModule) -> dict[str, int]:
    """How many call sites each op has: a quick structural summary for tests and reports."""
    counts: dict[str, int] = {}
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target is not operator.getitem:
            key = str(node.target)
            counts[key] = counts.get(key, 0) + 1
    return counts


def graph_text(gm: fx.GraphModule) -> str:
    """A readable listing of the graph: one line per node with its shape and dtype; the body of
    each called submodule (a fused region) follows, indented, under its name."""
    lines = _node_lines(gm)
    for node in gm.graph.nodes:
        if node.op == "call_module":
            sub = gm.get_submodule(str(node.target))
            if isinstance(sub, fx.GraphModule):
                kind = " ".join(str(getattr(sub, a)) for a in ("kind", "label") if getattr(sub, a, ""))
                lines += ["", f"{node.target}:  # {kind or type(sub).__name__}"]
                lines += [f"    {line}" for line in _node_lines(sub)]
    return "\n".join(lines) + "\n"


def _node_lines(gm: fx.GraphModule) -> list[str]:
    lines = []
    for node in gm.graph.nodes:
        val = node.meta.get("val")
        shape = ""
        if isinstance(val, torch.Tensor):
            shape = f"  # {str(val.dtype).removeprefix('torch.')}{list(val.shape)}"
        if node.op == "placeholder":
            lines.append(f"{node.name} = input(){shape}")
        elif node.op == "get_attr":
            lines.append(f"{node.name} = constant({node.target}){shape}")
        elif node.op == "output":
            lines.append(f"return {node.args[0]}")
        else:
            args = ", ".join([*map(repr, node.args), *(f"{k}={v!r}" for k, v in node.kwargs.items())])
            lines.append(f"{node.name} = {node.target}({args}){shape}")
    return lines


def at_hints(expr: Any, gm: fx.GraphModule) -> Any:
    """A formula in shape symbols evaluated at the sizes the graph was captured with (the shape
    environment's hints, which add no guard); plain numbers come back as they are, and None
    when a symbol has no hint."""
    import sympy

    if not isinstance(expr, sympy.Basic) or not expr.free_symbols:
        return expr
    try:
        env = fake_mode_of(gm).shape_env
        table = env.backed_var_to_val if hasattr(env, "backed_var_to_val") else env.var_to_val
        # symbols only: a loaded ExportedProgram's environment also keys hints by expressions
        hints = {s.name: v for s, v in table.items() if isinstance(s, sympy.Symbol)}
    except Exception:  # no shape environment to ask
        return None
    value = expr.subs({s: hints[s.name] for s in expr.free_symbols if s.name in hints})
    return None if value.free_symbols else value


def graph_fingerprint(gm: fx.GraphModule) -> str:
    """A hash of the graph's code (nodes, targets, arguments): with `weights_fingerprint`, what
    stored measurements and calibrations are keyed on."""
    return hashlib.sha256(str(gm.graph).encode()).hexdigest()


def weights_fingerprint(gm: fx.GraphModule) -> str:
    """A hash of the graph's constants: names, shapes, dtypes and a strided sample of values
    (hashing every byte of a 540 MB model would take a second per compile)."""
    h = hashlib.sha256()
    for name, tensor in sorted({**dict(gm.named_parameters()), **dict(gm.named_buffers())}.items()):
        flat = tensor.detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // 4096)].float().contiguous()
        h.update(f"{name}{tuple(tensor.shape)}{tensor.dtype}".encode())
        h.update(sample.numpy().tobytes())
    return h.hexdigest()
