"""The Triton lowering of fused regions: one generated kernel per pointwise or reduction region.

Part of the codegen step. A `FusedRegion` (compiler.passes.fusion.region) holds a small ATen
graph with FakeTensor metadata; this module turns it into a Python module of readable Triton:
one `@triton.jit` kernel plus a plain-Python `launch(...)` that takes the region's inputs,
allocates its outputs, computes the grid and the strides, and returns what the region returns.
`launch` is the Kernel's runner. As in rms_norm.py the text is written to
`cache_dir("triton")` under the kernel's name and imported from there, because `triton.jit`
reads a kernel's source from its file.

How the kernel is generated: every region value is computed *at an index*. The generator walks
the region graph backwards from each output, asking for the value of a node at the output's
multi-index (one index expression per dim). An elementwise op asks its operands for their value
at the broadcast index (a size-1 dim reads index 0), a view op rewrites the index (permute
reorders it, unsqueeze drops a dim, a reshape divides and takes remainders, slice scales and
shifts, cat selects the input by range) and asks its input, and a region input is loaded at
`ptr + sum(index[d] * stride[d])` with its strides passed at launch, so non-contiguous and
expanded (stride-0) inputs need no copy. Everything is inlined (no intermediate buffers) and
identical expressions are computed once. Floating-point math runs in fp32 whatever the storage
dtype (an explicit cast to bf16/fp16 rounds there, as in eager), and each output is stored in
its own dtype.

- kind "pointwise": the flattened output is split into blocks of BLOCK elements, one program
  per block; the output's multi-index comes from the flat offset by divisions by the (static or
  runtime) sizes, and the tail is masked. All outputs must have the same number of elements.
- kind "reduction": one program per row of the row space `L + [N]`; the row length N is a
  compile-time constant (BLOCK_N is its next power of two, rows of up to 16384 columns, longer
  rows are declined), the leading dims L may be symbolic. Last-dim sum, mean, amax, amin, var,
  var_mean, _softmax, _log_softmax and native_layer_norm are reductions of the row held in
  registers (masked to N columns) with any elementwise prologue and epilogue around them.
  Outputs are either full rows (`L + [N]`) or per-row values (`L + [1]` or `L`).
- kind "matmul_epilogue": compiler.codegen.triton.matmul, a tiled GEMM whose epilogue this
  generator computes at the index of the GEMM's output tile (`build_kernel` serves both).

Translated ops: add/sub/rsub/mul/div (Tensor and Scalar, alpha, floor/trunc rounding of floats),
neg, abs, exp, exp2, log, log2, sqrt, rsqrt, sin, cos, erf, floor, ceil, reciprocal, sigmoid,
silu, tanh, gelu (erf and tanh forms), relu, pow (Tensor_Scalar: integer exponents up to 64 as
multiplications by squaring, 0.5 as sqrt, -0.5 as rsqrt, others as exp2(e * log2 x); Scalar base
> 0), maximum/minimum, clamp/clamp_min/clamp_max, where, eq/ne/lt/le/gt/ge, logical and
bitwise and/or/xor/not on ints and bools, _to_copy and convert_element_type, clone/alias,
scalar_tensor/full; views: view/_unsafe_view/reshape/squeeze/unsqueeze/expand/permute/t/transpose/
slice/select/cat; reductions as above. NaN propagates through relu, clamp, maximum and minimum
as in eager; amax/amin use tl.max/tl.min, which on a GPU skip NaN where torch returns it.

Sizes: static sizes are written into the text as literals (the graph fixes them), symbolic ones
(SymInts from export's dynamic dims) become kernel arguments named after their symbols, bound by
`launch` from its inputs' shapes; so one kernel serves every value of them. Strides are always
launch arguments.

Anything else raises `Unsupported` naming the node and the reason; codegen then keeps the region
in ATen. The kernel name is a hash of the generated text (written with canonical value names,
not the graph's node names) and the region's dtypes, so equal regions share one kernel.

The Triton interpreter (TRITON_INTERPRET=1, for tests on CPU) has no libdevice, so the text
uses only `tl` functions (tanh is built from exp). It also truncates fp32 -> bf16 where a GPU
rounds to nearest even: bf16 outputs may differ by one bf16 ulp between the two.
"""

from __future__ import annotations

import hashlib
import math
import operator
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import sympy
import torch
from torch import fx

from compiler.codegen.triton.runtime import load_module, why_not_runnable
from compiler.codegen import RegionRequest, register_region_lowering
from compiler.errors import Unsupported
from compiler.ops.registry import Kernel

aten = torch.ops.aten
prims = torch.ops.prims

# Elements per program of a pointwise kernel, and its warps: 8 elements per thread.
POINTWISE_BLOCK = 1024
POINTWISE_WARPS = 4
# A reduction program holds its whole row in registers; past this a row needs a looped kernel.
MAX_ROW = 16384
# Integer powers up to this exponent become multiplications (x**n by squaring).
_MAX_INT_POW = 64

_STORAGE = {
    torch.float32: "tl.float32",
    torch.float16: "tl.float16",
    torch.bfloat16: "tl.bfloat16",
    torch.int64: "tl.int64",
    torch.int32: "tl.int32",
    torch.int16: "tl.int16",
    torch.int8: "tl.int8",
    torch.uint8: "tl.uint8",
    torch.bool: "tl.int1",
}
_FLOATS = {torch.float32, torch.float16, torch.bfloat16}
_F32 = "tl.float32"
_BOOL = "tl.int1"
_I64 = "tl.int64"

# Loaded kernel modules by (interpreter mode, kernel name): `triton.jit` decides at load time
# whether it makes a GPU kernel or an interpreted one.

_SAME_LAYOUT = '''\
def _same_layout(a, b):
    """Whether a holds its elements where b does (equal strides wherever a dim is > 1)."""
    return a.shape == b.shape and all(n == 1 or s == t for n, s, t in zip(a.shape, a.stride(), b.stride()))

'''

_TANH_HELPER = '''\
@triton.jit
def _tanh(x):
    # tanh from exp (the interpreter has no libdevice): exact up to fp32 rounding of
    # exp(-2|x|), which is an absolute error below 1e-7.
    t = tl.exp(-2.0 * tl.abs(x))
    y = (1.0 - t) / (1.0 + t)
    return tl.where(x < 0, -y, y)
'''


# ------------------------------------------------------------------------------------------------
# The lowering
# ------------------------------------------------------------------------------------------------


@register_region_lowering("triton", kinds=("pointwise", "reduction"))
def lower_region(req: RegionRequest) -> Kernel:
    """A Triton kernel for a pointwise or reduction region, or `Unsupported` saying why not."""
    region = req.region
    if region.kind not in ("pointwise", "reduction"):
        raise Unsupported(f"the Triton region lowering covers pointwise and reduction regions, not {region.kind}")
    return build_kernel(req, _Generator)


def build_kernel(req: RegionRequest, generator: Callable[[Any, tuple[Any, ...]], _Generator]) -> Kernel:
    """The Kernel of the module text that `generator(region, args)` writes: named by a hash of
    the text and the dtypes, loaded when it can run here (`Unsupported` when it cannot be made)."""
    region = req.region
    try:
        gen = generator(region, req.args)
        text, summary = gen.generate()
    except Unsupported:
        raise
    except Exception as exc:  # a gap in the generator must cost one region, not the compile
        raise Unsupported(f"the Triton region generator failed ({type(exc).__name__}: {exc})") from exc
    digest = hashlib.sha256((text + repr(gen.dtype_signature())).encode()).hexdigest()[:12]
    ops = "_".join(dict.fromkeys(_short_name(n.target) for n in region.ops() if n.target is not operator.getitem))
    name = f"triton_{region.kind}_{ops[:40].strip('_')}_{digest}"
    source = _header(name, region, summary, type(gen).__module__) + text.replace(_NAME, name)
    why_not = why_not_runnable(req, gen.device_type)
    if why_not:
        return Kernel(name, "triton", source, note=why_not, language="python")
    module = load_module(name, source)
    return Kernel(name, "triton", source, runner=module.launch, note=summary, language="python")


def _short_name(target: Any) -> str:
    text = str(getattr(target, "__name__", target))
    text = text.replace("aten.", "").replace("prims.", "").split(".")[0].strip("_")
    return re.sub(r"[^A-Za-z0-9_]", "", text)


def _header(name: str, region: Any, summary: str, generator: str) -> str:
    graph = "\n".join(f"#   {line}" for line in region.code.strip().splitlines() if line.strip())
    return (
        f"# {name}: {summary}\n"
        f"# Generated by {generator} from the {region.kind} region {region.label}:\n"
        f"{graph}\n"
    )


# ------------------------------------------------------------------------------------------------
# Values and indices inside the kernel
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Ix:
    """An index expression; `vec` when it differs between the lanes of a program."""

    text: str
    vec: bool = False


ZERO = Ix("0")
COLS = Ix("cols", vec=True)


@dataclass(frozen=True)
class Val:
    """A value in the kernel: a name or literal, its Triton dtype, whether it varies across
    lanes, and the Python number when it is a literal."""

    text: str
    ctype: str
    vec: bool
    const: Any = None


def _literal(value: Any) -> str:
    if isinstance(value, bool):
        return "True" if value else "False"
    if isinstance(value, int):
        return str(value)
    value = float(value)
    if math.isnan(value):
        return 'float("nan")'
    if math.isinf(value):
        return 'float("inf")' if value > 0 else 'float("-inf")'
    return repr(value)


def _const(value: Any, ctype: str | None = None) -> Val:
    if ctype is None:
        ctype = _BOOL if isinstance(value, bool) else _I64 if isinstance(value, int) else _F32
    if ctype == _F32:
        value = float(value)
    elif ctype == _BOOL:
        value = bool(value)
    elif isinstance(value, float) and value.is_integer():
        value = int(value)
    return Val(_literal(value), ctype, False, value)


def _compute_type(dtype: torch.dtype, where: str) -> str:
    if dtype in _FLOATS:
        return _F32
    if dtype in _STORAGE:
        return _STORAGE[dtype]
    raise Unsupported(f"{where}: dtype {dtype} has no Triton region lowering (fp32/fp16/bf16, ints and bool only)")


def _is_tensor(value: Any) -> bool:
    return isinstance(value, torch.Tensor)


def _expr(size: Any) -> sympy.Expr:
    if isinstance(size, sympy.Expr):
        return size
    if isinstance(size, torch.SymInt):
        return sympy.sympify(size.node.expr)
    return sympy.Integer(int(size))


def _render(expr: sympy.Expr, where: str) -> str:
    """A size expression as kernel/launcher text: literals, symbols, + and * only."""
    expr = sympy.expand(expr)
    for sub in sympy.preorder_traversal(expr):
        if not isinstance(sub, (sympy.Add, sympy.Mul, sympy.Symbol, sympy.Integer)):
            raise Unsupported(f"{where}: size {expr} is not a polynomial of the shape symbols")
    if expr.is_Integer:
        return str(int(expr))
    text = str(expr).replace(" ", "").replace("*", " * ").replace("+", " + ")
    return text if expr.is_Symbol else f"({text})"


def _strides(value: torch.Tensor) -> list[sympy.Expr]:
    return [_expr(s) for s in value.stride()]


def _contiguous_strides(sizes: list[sympy.Expr]) -> list[sympy.Expr]:
    strides, running = [], sympy.Integer(1)
    for size in reversed(sizes):
        strides.append(running)
        running = running * size
    return strides[::-1]


def _same(a: sympy.Expr, b: sympy.Expr) -> bool:
    return sympy.expand(a - b) == 0


def _is_contiguous(value: torch.Tensor) -> bool:
    """Row-major without gaps (strides of size-1 dims do not matter), proven symbolically."""
    sizes = [_expr(s) for s in value.shape]
    return all(
        size == 1 or _same(st, want)
        for size, st, want in zip(sizes, _strides(value), _contiguous_strides(sizes))
    )


def _dense_order(value: torch.Tensor) -> list[int] | None:
    """The dims from outermost to innermost in memory when `value` is a permutation of a
    contiguous tensor (what eager makes of pointwise ops on permuted inputs), else None.
    Symbolic strides are ordered as if every symbol were large, then checked exactly."""
    sizes, strides = [_expr(s) for s in value.shape], _strides(value)
    big = {sym: 10**6 + 7 for e in sizes + strides for sym in e.free_symbols}
    dims = [d for d in range(len(sizes)) if sizes[d] != 1]
    order = sorted(dims, key=lambda d: (-int(strides[d].xreplace(big)), d))
    expected = _contiguous_strides([sizes[d] for d in order])
    if not all(_same(strides[d], want) for d, want in zip(order, expected)):
        return None
    return order + [d for d in range(len(sizes)) if sizes[d] == 1]


def _tuple_text(items: list[str]) -> str:
    return f"({items[0]},)" if len(items) == 1 else f"({', '.join(items)})"


def _norm_dim(dim: int, rank: int) -> int:
    return dim + rank if dim < 0 else dim


# ------------------------------------------------------------------------------------------------
# The generator
# ------------------------------------------------------------------------------------------------

_NAME = "KERNEL_NAME__"
_REDUCTIONS = {
    aten.sum.dim_IntList, aten.sum.default, aten.mean.dim, aten.mean.default, aten.amax.default,
    aten.amin.default, aten.var.correction, aten.var_mean.correction, aten._softmax.default,
    aten._log_softmax.default, aten.native_layer_norm.default,
}


@dataclass
class _Input:
    index: int
    node: fx.Node
    # constexpr flags that let a read skip the index math: name -> launch-time condition
    flags: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class _Layout:
    """How a program walks an output: its multi-index at `offs`, and where it stores."""

    idx: tuple[Ix, ...]
    owner: int  # the output this walk was made for
    dense: bool  # offs is the storage offset (the walk follows the output's memory order)


@dataclass
class _Generator:
    """Builds the module text of one region: kernel body lines (`prologue` then `body`), the
    inputs, sizes and scalars it reads, and the launcher."""

    region: Any
    args: tuple[Any, ...]
    body: list[str] = field(default_factory=list)
    memo: dict[Any, Val] = field(default_factory=dict)
    exprs: dict[str, str] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)
    used_inputs: dict[int, _Input] = field(default_factory=dict)
    scalar_params: dict[int, str] = field(default_factory=dict)
    symbols: set[sympy.Symbol] = field(default_factory=set)
    helpers: set[str] = field(default_factory=set)
    layouts: dict[tuple[Any, ...], _Layout] = field(default_factory=dict)
    prologue: list[str] = field(default_factory=list)
    row_length: int | None = None
    row_space: tuple[Any, ...] = ()
    device_type: str = "cpu"

    # --- setup ------------------------------------------------------------------------------------

    def __post_init__(self) -> None:
        self.placeholders = [n for n in self.region.graph.nodes if n.op == "placeholder"]
        # The lane mask loads use: "mask" (pointwise) or "cmask" (reduction); empty when every
        # lane's index is in bounds (a matmul epilogue's).
        self.mask = "mask"
        self.values = {}
        for i, node in enumerate(self.placeholders):
            value = self.args[i] if i < len(self.args) else node.meta.get("val")
            self.values[node] = value if value is not None else node.meta.get("val")
        output = next(n for n in self.region.graph.nodes if n.op == "output")
        outs = output.args[0]
        self.single_output = not isinstance(outs, (tuple, list))
        self.outputs = [outs] if self.single_output else list(outs)
        tensors = [v for v in self.values.values() if _is_tensor(v)]
        if not tensors:
            raise Unsupported("region has no tensor input to take the device from")
        devices = {str(t.device) for t in tensors}
        if len(devices) > 1:
            raise Unsupported(f"region inputs live on several devices {sorted(devices)}")
        self.device_type = tensors[0].device.type

    def val(self, node: Any) -> Any:
        if isinstance(node, fx.Node):
            return self.values[node] if node in self.values else node.meta.get("val")
        return node

    def shape(self, node: fx.Node) -> tuple[Any, ...]:
        return tuple(self.val(node).shape)

    def dtype_signature(self) -> tuple[str, ...]:
        ins = [str(v.dtype) if _is_tensor(v) else type(v).__name__ for v in self.values.values()]
        return tuple(ins + [str(self.val(o).dtype) for o in self.outputs if isinstance(o, fx.Node)])

    # --- text helpers -----------------------------------------------------------------------------

    def fresh(self, prefix: str) -> str:
        n = self.counts.get(prefix, 0)
        self.counts[prefix] = n + 1
        return f"{prefix}{n}"

    def assign(self, expr: str, ctype: str, vec: bool, comment: str = "", prefix: str = "v") -> Val:
        """`name = expr` in the body (once per distinct expression); the value named."""
        if expr not in self.exprs:
            name = self.fresh(prefix)
            self.exprs[expr] = name
            self.body.append(f"{name} = {expr}" + (f"  # {comment}" if comment else ""))
        return Val(self.exprs[expr], ctype, vec)

    def index(self, expr: str, vec: bool) -> Ix:
        """An index expression, named when it is more than a name or a literal."""
        if re.fullmatch(r"[A-Za-z_][A-Za-z_0-9]*|-?\d+", expr):
            return Ix(expr, vec)
        return Ix(self.assign(expr, _I64, vec, prefix="t").text, vec)

    def size(self, size: Any, where: str) -> str:
        expr = _expr(size)
        self.symbols |= expr.free_symbols
        return _render(expr, where)

    def cast(self, value: Val, ctype: str) -> Val:
        if value.ctype == ctype:
            return value
        if value.const is not None:
            return _const(value.const, ctype)
        if ctype == _BOOL:
            return Val(f"({value.text} != 0)", ctype, value.vec)
        return Val(f"{value.text}.to({ctype})", ctype, value.vec)

    def tensor_of(self, value: Val, block: str) -> str:
        """A value as a tensor to store: literals become `tl.full`."""
        if value.const is not None:
            return f"tl.full([{block}], {value.text}, {value.ctype})"
        return value.text

    # --- kernel structure ------------------------------------------------------------------------

    def generate(self) -> tuple[str, str]:
        self.check_outputs()
        reductions = [n for n in self.region.ops() if n.target in _REDUCTIONS]
        if reductions and self.region.kind == "pointwise":
            raise Unsupported(f"{reductions[0].name}: {reductions[0].target} is a reduction in a pointwise region")
        if reductions:
            return self.generate_reduction(reductions)
        return self.generate_pointwise()

    def check_outputs(self) -> None:
        for out in self.outputs:
            if not isinstance(out, fx.Node) or not _is_tensor(self.val(out)):
                raise Unsupported(f"region output {out} is not a tensor")
            if out.op == "placeholder":
                raise Unsupported(f"region output {out.name} is a region input (nothing to compute)")

    def output_dtype(self, out: fx.Node) -> torch.dtype:
        dtype = self.val(out).dtype
        if dtype not in _STORAGE:
            raise Unsupported(f"output {out.name}: dtype {dtype} has no Triton region lowering")
        return dtype

    def generate_pointwise(self) -> tuple[str, str]:
        shapes = [self.shape(o) for o in self.outputs]
        numels = {sympy.expand(sympy.Mul(*[_expr(s) for s in shape])) for shape in shapes}
        if len(numels) > 1:
            raise Unsupported(f"pointwise region outputs have different sizes {[tuple(s) for s in shapes]}")
        (numel_expr,) = numels
        numel = self.size(numel_expr, "output")
        self.mask = "mask"
        stores = []
        for k, out in enumerate(self.outputs):
            storage = _STORAGE[self.output_dtype(out)]
            layout = self.layout(k)
            value = self.cast(self.value(out, layout.idx), storage)
            address = "offs" if layout.dense else self.strided(layout.idx, _strides(self.val(out)), "output")
            stores.append(f"tl.store(out{k}_ptr + {address}, {self.tensor_of(value, 'BLOCK')}, mask=mask)")
        head = [
            "pid = tl.program_id(0).to(tl.int64)",
            "offs = pid * BLOCK + tl.arange(0, BLOCK)",
            f"mask = offs < {numel}",
        ]
        block = POINTWISE_BLOCK
        if numel_expr.is_Integer:  # a small static output gets one program of the next power of two
            block = max(16, min(POINTWISE_BLOCK, 1 << max(0, int(numel_expr) - 1).bit_length()))
        summary = (
            f"pointwise over the flattened {self.shape_text(shapes[0])} output, "
            f"BLOCK={block} elements per program"
        )
        grid = f"(triton.cdiv({numel}, {block}),)"
        doc = f"{', '.join(self.op_names())}: BLOCK elements of the flattened output per program."
        return self.assemble(doc, head, stores, [("BLOCK", str(block))], grid, numel, {"num_warps": POINTWISE_WARPS}), summary

    def layout(self, k: int) -> _Layout:
        """How programs walk output k: in its memory order when it is dense (then `offs` is the
        storage offset and stores are coalesced), else in row-major order with strided stores.
        Outputs of one shape and memory order share the walk."""
        value = self.val(self.outputs[k])
        shape = tuple(value.shape)
        order = _dense_order(value)
        key = (tuple(str(_expr(s)) for s in shape), tuple(order) if order else None)
        if key not in self.layouts:
            n = len(self.layouts)
            prefix = "ijklmn"[n] if n < 6 else f"g{n}_"
            perm = order or list(range(len(shape)))
            # Walk the dims in memory order; each index keeps its dim's name (i2 indexes dim 2).
            names = [f"{prefix}{d}" for d in perm]
            walked = self.decompose("offs", tuple(shape[d] for d in perm), names, vec=True)
            idx = [ZERO] * len(shape)
            for d, ix in zip(perm, walked):
                idx[d] = ix
            self.layouts[key] = _Layout(tuple(idx), k, order is not None)
        return self.layouts[key]

    def strided(self, idx: tuple[Ix, ...], strides: list[sympy.Expr], where: str) -> str:
        """sum(idx[d] * strides[d]) as text."""
        terms = []
        for ix, stride in zip(idx, strides):
            if ix.text == "0" or stride == 0:
                continue
            terms.append(ix.text if stride == 1 else f"{ix.text} * {self.size(stride, where)}")
        return " + ".join(terms) or "0"

    def decompose(self, flat: str, shape: tuple[Any, ...], names: list[str], vec: bool) -> tuple[Ix, ...]:
        """The row-major multi-index of the flat index `flat` in `shape`, as prologue lines
        `names[d] = ...`."""
        sizes = [_expr(s) for s in shape]
        idx = []
        for d, size in enumerate(sizes):
            if size == 1:
                idx.append(ZERO)
                continue
            inner = sympy.Mul(*sizes[d + 1:])
            text = flat if inner == 1 else f"{flat} // {self.size(inner, 'output')}"
            if d > 0:
                text = f"{text if inner == 1 else f'({text})'} % {self.size(size, 'output')}"
            self.prologue.append(f"{names[d]} = {text}")
            idx.append(Ix(names[d], vec))
        return tuple(idx)

    def generate_reduction(self, reductions: list[fx.Node]) -> tuple[str, str]:
        for node in reductions:  # the reduced dims first: the most telling reason to decline
            self.last_dim_only(node, _reduced_dims(self, node), len(self.shape(node.args[0])))
        first = reductions[0]
        operand_shape = self.shape(first.args[0])
        if not operand_shape:
            raise Unsupported(f"{first.name}: reduction of a 0-dim tensor")
        n = operand_shape[-1]
        if not isinstance(n, int):
            raise Unsupported(f"{first.name}: row length {n} is symbolic; a reduction kernel needs it static")
        if n > MAX_ROW:
            raise Unsupported(f"{first.name}: row length {n} > {MAX_ROW} needs a looped reduction kernel")
        self.row_length = n
        self.row_space = operand_shape[:-1]
        lead = [_expr(s) for s in self.row_space]
        self.row_idx = self.decompose("row", self.row_space, [f"i{d}" for d in range(len(lead))], vec=False)
        self.mask = "cmask"
        stores = []
        full = tuple(lead) + (sympy.Integer(n),)
        for k, out in enumerate(self.outputs):
            dtype = self.output_dtype(out)
            shape = tuple(_expr(s) for s in self.shape(out))
            contiguous = _is_contiguous(self.val(out))
            if shape == full:
                idx = self.row_idx + (COLS,)
                value = self.cast(self.value(out, idx), _STORAGE[dtype])
                text = self.tensor_of(value, "BLOCK_N")
                address = f"row * {n} + cols" if contiguous else self.strided(idx, _strides(self.val(out)), "output")
                stores.append(f"tl.store(out{k}_ptr + {address}, {text}, mask=cmask)")
            elif shape in (tuple(lead), tuple(lead) + (sympy.Integer(1),)):
                idx = self.row_idx + ((ZERO,) if len(shape) > len(lead) else ())
                value = self.cast(self.value(out, idx), _STORAGE[dtype])
                if value.vec:
                    raise Unsupported(f"output {out.name}: a per-row value that varies along the row")
                address = "row" if contiguous else self.strided(idx, _strides(self.val(out)), "output")
                stores.append(f"tl.store(out{k}_ptr + {address}, {self.tensor_of(value, '')})")
            else:
                raise Unsupported(
                    f"output {out.name} of shape {self.shape_text(self.shape(out))} is neither a row "
                    f"{self.shape_text(self.row_space + (n,))} nor a per-row value of the row space"
                )
        block_n = 1 << max(0, n - 1).bit_length()
        warps = max(1, min(16, block_n // 256))
        head = [
            "row = tl.program_id(0).to(tl.int64)",
            "cols = tl.arange(0, BLOCK_N)",
            f"cmask = cols < {n}",
        ]
        rows = _render(sympy.expand(sympy.Mul(*lead)), "row space")  # launch only: bound there
        summary = (
            f"one program per row of {self.shape_text(self.row_space + (n,))}, "
            f"BLOCK_N={block_n} for rows of {n}, num_warps={warps}"
        )
        doc = f"{', '.join(self.op_names())}: one program per row of {n} columns (BLOCK_N >= {n})."
        return self.assemble(doc, head, stores, [("BLOCK_N", str(block_n))], f"({rows},)", rows, {"num_warps": warps}), summary

    def shape_text(self, shape: tuple[Any, ...]) -> str:
        return "[" + ", ".join(str(s) for s in shape) + "]"

    def op_names(self) -> list[str]:
        return list(dict.fromkeys(_short_name(n.target) for n in self.region.ops() if n.target is not operator.getitem))

    def assemble(
        self, doc: str, head: list[str], stores: list[str], constexprs: list[tuple[str, str]],
        grid: str, work: str, options: dict[str, Any], *,
        imports: Sequence[str] = (), constants: Sequence[str] = (), setup: Sequence[str] = (),
    ) -> str:
        """The module text: imports, module constants, helpers, the kernel and its launcher.
        `constexprs` and `options` (num_warps, ...) are launch keywords whose values are
        launcher text; `setup` lines run in the launcher before the launch (to bind names
        those values or the grid use)."""
        outs = [f"out{k}" for k in range(len(self.outputs))]
        # Kernel parameters and launch arguments, in four groups: pointers, sizes and scalars,
        # strides, compile-time constants.
        pointers = [f"in{i}" for i in sorted(self.used_inputs)] + outs
        symbols = [str(s) for s in sorted(self.symbols, key=str)]
        scalars = symbols + [name for _, name in sorted(self.scalar_params.items())]
        strides, stride_args = [], []
        for i in sorted(self.used_inputs):
            rank = len(self.shape(self.placeholders[i]))
            strides += [f"in{i}_stride{d}" for d in range(rank)]
            stride_args += [f"in{i}.stride({d})" for d in range(rank)]
        flags = [(name, cond) for _, inp in sorted(self.used_inputs.items()) for name, cond in inp.flags.items()]
        all_constexprs = constexprs + flags
        param_groups = [
            [f"{p}_ptr" for p in pointers], scalars, strides, [f"{name}: tl.constexpr" for name, _ in all_constexprs],
        ]
        arg_groups = [
            pointers, scalars, stride_args,
            [f"{name}={value}" for name, value in all_constexprs] + [f"{name}={value}" for name, value in options.items()],
        ]

        lines = sorted({"import torch", "import triton", "import triton.language as tl", *imports}) + ["", ""]
        if constants:
            lines += [*constants, "", ""]
        if any("_same_layout(" in cond for _, cond in flags):
            lines += [_SAME_LAYOUT, ""]
        for helper in sorted(self.helpers):
            lines += [helper, ""]
        lines.append("@triton.jit")
        lines.append(f"def {_NAME}(")
        lines += [f"    {', '.join(group)}," for group in param_groups if group]
        lines.append("):")
        lines.append(f'    """{doc}"""')
        lines += [f"    {line}" for line in head + self.prologue + self.body + stores]
        lines += ["", ""]
        lines += self.launcher(arg_groups, grid, work, setup)
        return "\n".join(lines) + "\n"

    def launcher(self, arg_groups: list[list[str]], grid: str, work: str, setup: Sequence[str] = ()) -> list[str]:
        names = [f"in{i}" for i in range(len(self.placeholders))]
        plural = "s" if len(self.outputs) > 1 else ""
        lines = [f"def launch({', '.join(names)}):", f'    """Run {_NAME} on the region\'s inputs; returns its output{plural}."""']
        needed = set(self.symbols)
        for out in self.outputs:
            for size in list(self.shape(out)) + list(self.val(out).stride()):
                needed |= _expr(size).free_symbols
        bound: set[sympy.Symbol] = set()
        for i, node in enumerate(self.placeholders):
            value = self.values[node]
            if _is_tensor(value):
                for d, s in enumerate(value.shape):
                    e = _expr(s)
                    if e.is_Symbol and e in needed and e not in bound:
                        lines.append(f"    {e} = in{i}.shape[{d}]")
                        bound.add(e)
            elif isinstance(value, torch.SymInt):
                e = _expr(value)
                if e.is_Symbol and e in needed and e not in bound:
                    lines.append(f"    {e} = int(in{i})")
                    bound.add(e)
        missing = needed - bound
        if missing:
            raise Unsupported(f"sizes {sorted(map(str, missing))} cannot be read from the region's inputs")
        device = next(f"in{i}" for i, n in enumerate(self.placeholders) if _is_tensor(self.values[n]))
        # Outputs get the strides eager gives them (the FakeTensor's): later ops of the graph,
        # views in particular, were traced against that layout.
        for k, out in enumerate(self.outputs):
            value = self.val(out)
            shape = _tuple_text([_render(_expr(s), "output") for s in value.shape])
            strides = _tuple_text([_render(e, "output stride") for e in _strides(value)])
            lines.append(
                f"    out{k} = torch.empty_strided({shape}, {strides}, dtype={value.dtype}, device={device}.device)"
            )
        for i, name in sorted(self.scalar_params.items()):
            lines.append(f"    {name} = {'float' if name.startswith('f') else 'int'}(in{i})")
        lines += [f"    {line}" for line in setup]
        result = ", ".join(f"out{k}" for k in range(len(self.outputs)))
        if len(self.outputs) > 1 or not self.single_output:
            result = f"({result},)" if len(self.outputs) == 1 else f"({result})"
        call = [f"{_NAME}[{grid}]("] + [f"    {', '.join(group)}," for group in arg_groups if group] + [")"]
        if not work.isdigit():  # a symbolic size may be 0 at run time: no programs to launch then
            lines.append(f"    if {work} > 0:")
            lines += [f"        {line}" for line in call]
        elif int(work) > 0:
            lines += [f"    {line}" for line in call]
        lines.append(f"    return {result}")
        return lines

    def reindex(self, shape: tuple[Any, ...], to: tuple[Any, ...], idx: tuple[Ix, ...], where: str) -> tuple[Ix, ...]:
        """The index in shape `to` of the element at `idx` in `shape`, both shapes of one
        row-major sequence (a reshape). The index maps group by group: runs of dims whose sizes
        multiply to the same number; in a group the flat index is rebuilt from one side and
        split by the other, and a group of one dim on each side passes its index through."""
        have, want = [_expr(s) for s in shape], [_expr(s) for s in to]
        have_dims = [d for d, s in enumerate(have) if s != 1]
        want_dims = [d for d, s in enumerate(want) if s != 1]
        result = [ZERO] * len(want)
        i = j = 0
        while i < len(want_dims) or j < len(have_dims):
            if i >= len(want_dims) or j >= len(have_dims):
                raise Unsupported(f"{where}: cannot match the dims of {tuple(shape)} and {tuple(to)}")
            group_want, group_have = [want_dims[i]], [have_dims[j]]
            pw, ph = want[want_dims[i]], have[have_dims[j]]
            i, j = i + 1, j + 1
            while sympy.simplify(pw - ph) != 0:
                # Grow the side whose product divides the other's (sizes are positive integers).
                grow_want = sympy.fraction(sympy.cancel(ph / pw))[1] == 1
                grow_have = sympy.fraction(sympy.cancel(pw / ph))[1] == 1
                if grow_want and i < len(want_dims):
                    group_want.append(want_dims[i])
                    pw *= want[want_dims[i]]
                    i += 1
                elif grow_have and j < len(have_dims):
                    group_have.append(have_dims[j])
                    ph *= have[have_dims[j]]
                    j += 1
                else:
                    raise Unsupported(f"{where}: cannot match the dims of {tuple(shape)} and {tuple(to)}")
            if len(group_want) == 1 and len(group_have) == 1:
                result[group_want[0]] = idx[group_have[0]]
                continue
            vec = any(idx[d].vec for d in group_have)
            terms = []
            for k, d in enumerate(group_have):
                inner = sympy.Mul(*[have[e] for e in group_have[k + 1:]])
                terms.append(idx[d].text if inner == 1 else f"{idx[d].text} * {self.size(inner, where)}")
            flat = self.index(" + ".join(t for t in terms if t != "0") or "0", vec)
            for k, d in enumerate(group_want):
                inner = sympy.Mul(*[want[e] for e in group_want[k + 1:]])
                text = flat.text if inner == 1 else f"({flat.text} // {self.size(inner, where)})"
                if k > 0:
                    text = f"{text} % {self.size(want[d], where)}"
                result[d] = self.index(text, vec)
        return tuple(result)

    # --- values ------------------------------------------------------------------------------------

    def operand(self, arg: Any, out_shape: tuple[Any, ...], idx: tuple[Ix, ...], where: str) -> Val:
        """The value of an op's operand at the op's output index `idx`, broadcasting."""
        if isinstance(arg, fx.Node):
            value = self.val(arg)
            if not _is_tensor(value):
                return self.scalar(arg)
            shape = tuple(value.shape)
            if len(shape) > len(out_shape):
                raise Unsupported(f"{where}: operand {arg.name} has more dims than the result")
            offset = len(out_shape) - len(shape)
            mapped = []
            for d, s in enumerate(shape):
                e, o = _expr(s), _expr(out_shape[offset + d])
                if e == 1:
                    mapped.append(ZERO)
                elif e == o:
                    mapped.append(idx[offset + d])
                else:
                    raise Unsupported(f"{where}: cannot prove {arg.name}'s size {s} broadcasts to {out_shape[offset + d]}")
            return self.value(arg, tuple(mapped))
        if isinstance(arg, (bool, int, float)):
            return _const(arg)
        raise Unsupported(f"{where}: operand {arg!r} of type {type(arg).__name__}")

    def scalar(self, node: fx.Node) -> Val:
        """A non-tensor value: a SymInt is rendered from its symbols, a float input is a param."""
        value = self.val(node)
        computed_int = isinstance(value, int) and not isinstance(value, bool) and node.op != "placeholder"
        if isinstance(value, torch.SymInt) or computed_int:
            return Val(self.size(value, node.name), _I64, False)
        if node.op == "placeholder":
            i = self.placeholders.index(node)
            if isinstance(value, (float, torch.SymFloat)):
                name = self.scalar_params.setdefault(i, f"f{i}")
                return Val(name, _F32, False)
            if isinstance(value, (int, bool)):
                name = self.scalar_params.setdefault(i, f"n{i}")
                return Val(name, _I64, False)
        raise Unsupported(f"{node.name}: scalar {value!r} of type {type(value).__name__} in a region")

    def value(self, node: fx.Node, idx: tuple[Ix, ...]) -> Val:
        key = (node, tuple(ix.text for ix in idx))
        if key not in self.memo:
            self.memo[key] = self.compute(node, idx)
        return self.memo[key]

    def compute(self, node: fx.Node, idx: tuple[Ix, ...]) -> Val:
        if node.op == "placeholder":
            if not _is_tensor(self.val(node)):
                return self.scalar(node)
            return self.load(node, idx)
        if node.op != "call_function":
            raise Unsupported(f"{node.name}: {node.op} nodes are not lowered")
        if not _is_tensor(self.val(node)) and node.target is not operator.getitem:
            return self.scalar(node)
        handler = _HANDLERS.get(node.target)
        if handler is None:
            raise Unsupported(f"{node.name}: {node.target} has no Triton translation")
        return handler(self, node, idx)

    def load(self, node: fx.Node, idx: tuple[Ix, ...]) -> Val:
        i = self.placeholders.index(node)
        value = self.val(node)
        if value.dtype not in _STORAGE:
            raise Unsupported(f"input {node.name}: dtype {value.dtype} has no Triton region lowering")
        inp = self.used_inputs.setdefault(i, _Input(i, node))
        terms = [f"{ix.text} * in{i}_stride{d}" for d, ix in enumerate(idx) if ix.text != "0"]
        vec = any(ix.vec for ix in idx)
        address = " + ".join(terms)
        # The common case, an input read in the walk's own order, skips the index math when the
        # tensor has the walked layout at launch (a constexpr flag: the other branch is not compiled).
        flat = self.flat_offset(node, idx)
        if flat is not None and terms:
            offset_text, flag, condition = flat
            inp.flags[flag] = condition
            key = f"flat:{i}:{address}"
            if key not in self.exprs:
                self.exprs[key] = offset = self.fresh(f"off{i}_")
                self.body += [
                    f"if {flag}:",
                    f"    {offset} = {offset_text}",
                    "else:",
                    f"    {offset} = {address}",
                ]
            address = self.exprs[key]
        pointer = f"in{i}_ptr + {address}" if terms else f"in{i}_ptr"
        load = f"tl.load({pointer}, mask={self.mask}, other=0)" if vec and self.mask else f"tl.load({pointer})"
        ctype = _compute_type(value.dtype, node.name)
        if ctype != _STORAGE[value.dtype]:
            load = f"{load}.to({ctype})"
        return self.assign(load, ctype, vec, prefix="x")

    def flat_offset(self, node: fx.Node, idx: tuple[Ix, ...]) -> tuple[str, str, str] | None:
        """When `idx` is the walk's own index and `node` the walked shape: the flat offset an
        input in the walked layout is read at, the constexpr flag for that, and its launch-time
        condition; else None."""
        i = self.placeholders.index(node)
        shape = tuple(str(_expr(s)) for s in self.shape(node))
        if self.mask == "mask":
            for (walk_shape, _), layout in self.layouts.items():
                if layout.dense and walk_shape == shape and layout.idx == idx:
                    return "offs", f"IN{i}_LIKE_OUT{layout.owner}", f"_same_layout(in{i}, out{layout.owner})"
            return None
        full = tuple(str(_expr(s)) for s in self.row_space) + (str(self.row_length),)
        if shape == full and idx == self.row_idx + (COLS,):
            return f"row * {self.row_length} + cols", f"IN{i}_CONTIGUOUS", f"in{i}.is_contiguous()"
        return None

    # --- reductions -----------------------------------------------------------------------------------

    def row_operand(self, node: fx.Node, arg: fx.Node, row_idx: tuple[Ix, ...]) -> Val:
        """`arg` (a tensor whose last dim is the row) at the row's index and every column."""
        shape = self.shape(arg)
        if not shape or shape[-1] != self.row_length:
            raise Unsupported(f"{node.name}: reduces {arg.name} of shape {self.shape_text(shape)}, not a row of {self.row_length}")
        if any(ix.vec for ix in row_idx):
            raise Unsupported(f"{node.name}: a row statistic read at an index that varies along the row")
        if len(shape) - 1 != len(row_idx):
            raise Unsupported(f"{node.name}: reduces {arg.name} of rank {len(shape)} at a row index of rank {len(row_idx)}")
        # row_idx was mapped to arg's leading dims by the consumers (size-1 dims read index 0).
        return self.value(arg, tuple(row_idx) + (COLS,))

    def reduce(self, how: str, value: Val, comment: str) -> Val:
        if value.const is not None:
            value = Val(f"tl.full([BLOCK_N], {value.text}, {value.ctype})", value.ctype, True)
        if how == "sum":
            fill = "0"
            expr = f"tl.sum(tl.where(cmask, {value.text}, {fill}), axis=0)"
        elif how == "max":
            expr = f'tl.max(tl.where(cmask, {value.text}, float("-inf")), axis=0)'
        else:
            expr = f'tl.min(tl.where(cmask, {value.text}, float("inf")), axis=0)'
        return self.assign(expr, value.ctype, False, comment, prefix="r")

    def reduced_row_idx(self, node: fx.Node, idx: tuple[Ix, ...], keepdim: bool) -> tuple[Ix, ...]:
        """The row index of a reduction's result at `idx`."""
        if self.row_length is None:
            raise Unsupported(f"{node.name}: reduction outside a reduction region")
        return idx[:-1] if keepdim else idx

    def last_dim_only(self, node: fx.Node, dims: Any, rank: int) -> None:
        if dims is None or (isinstance(dims, (list, tuple)) and len(dims) == 0):
            dims = list(range(rank))
        dims = [dims] if isinstance(dims, int) else list(dims)
        if [_norm_dim(d, rank) for d in dims] != [rank - 1]:
            raise Unsupported(f"{node.name}: {node.target} over dims {dims} of a rank-{rank} tensor; only the last dim is lowered")

    def moments(self, node: fx.Node, arg: fx.Node, row_idx: tuple[Ix, ...]) -> tuple[Val, Val]:
        """(mean, sum of squared deviations) of the row, two passes over registers."""
        x = self.cast(self.row_operand(node, arg, row_idx), _F32)
        total = self.reduce("sum", x, f"row sum of {arg.name}")
        mean = self.assign(f"{total.text} / {self.row_length}", _F32, False, "row mean", prefix="r")
        dev = self.assign(f"{x.text} - {mean.text}", _F32, True)
        m2 = self.reduce("sum", Val(f"{dev.text} * {dev.text}", _F32, True), "row sum of squared deviations")
        return mean, m2


# ------------------------------------------------------------------------------------------------
# Translations of ATen ops: handler(gen, node, idx) -> Val
# ------------------------------------------------------------------------------------------------

_HANDLERS: dict[Any, Callable[[_Generator, fx.Node, tuple[Ix, ...]], Val]] = {}


def _handles(*targets: Any) -> Callable[[Callable], Callable]:
    def decorate(fn: Callable) -> Callable:
        for target in targets:
            _HANDLERS[target] = fn
        return fn

    return decorate


def _out(gen: _Generator, node: fx.Node) -> tuple[tuple[Any, ...], str]:
    value = gen.val(node)
    return tuple(value.shape), _compute_type(value.dtype, node.name)


def _args(gen: _Generator, node: fx.Node, idx: tuple[Ix, ...], ctype: str | None, *args: Any) -> list[Val]:
    shape, out_ctype = _out(gen, node)
    vals = [gen.operand(a, shape, idx, node.name) for a in args]
    target = ctype or out_ctype
    vals = [gen.cast(v, target) for v in vals]
    if vals and all(v.const is not None for v in vals):
        # Only literals: make the first one a 0-dim tensor so the result is a tensor, not a float.
        vals[0] = Val(f"tl.full([], {vals[0].text}, {vals[0].ctype})", vals[0].ctype, False)
    return vals


def _emit(gen: _Generator, node: fx.Node, expr: str, ctype: str, *operands: Val) -> Val:
    return gen.assign(expr, ctype, any(v.vec for v in operands), str(node.target))


def _binary(fmt: str, alpha_on: str = "b") -> Callable:
    def handle(gen: _Generator, node: fx.Node, idx: tuple[Ix, ...]) -> Val:
        _, ctype = _out(gen, node)
        vals = dict(zip("ab", _args(gen, node, idx, None, node.args[0], node.args[1])))
        alpha = node.kwargs.get("alpha", node.args[2] if len(node.args) > 2 else 1)
        if alpha != 1:
            v = vals[alpha_on]
            vals[alpha_on] = _emit(gen, node, f"{v.text} * {_literal(alpha)}", ctype, v)
        a, b = vals["a"], vals["b"]
        return _emit(gen, node, fmt.format(a=a.text, b=b.text), ctype, a, b)

    return handle


_handles(aten.add.Tensor, aten.add.Scalar)(_binary("{a} + {b}"))
_handles(aten.sub.Tensor, aten.sub.Scalar)(_binary("{a} - {b}"))
_handles(aten.rsub.Tensor, aten.rsub.Scalar)(_binary("{b} - {a}", alpha_on="a"))
_handles(aten.mul.Tensor, aten.mul.Scalar)(_binary("{a} * {b}"))


@_handles(aten.div.Tensor, aten.div.Scalar, aten.div.Tensor_mode, aten.div.Scalar_mode)
def _div(gen: _Generator, node: fx.Node, idx: tuple[Ix, ...]) -> Val:
    _, ctype = _out(gen, node)
    mode = node.kwargs.get("rounding_mode")
    if ctype != _F32:
        raise Unsupported(f"{node.name}: integer division (rounding_mode={mode!r}) is not lowered")
    a, b = _args(gen, node, idx, None, node.args[0], node.args[1])
    q = _emit(gen, node, f"{a.text} / {b.text}", ctype, a, b)
    if mode == "floor":
        return _emit(gen, node, f"tl.floor({q.text})", ctype, q)
    if mode == "trunc":
        return _emit(gen, node, f"tl.where({q.text} < 0, tl.ceil({q.text}), tl.floor({q.text}))", ctype, q)
    return q


def _unary(fmt: str, float_only: bool = True) -> Callable:
    def handle(gen: _Generator, node: fx.Node, idx: tuple[Ix, ...]) -> Val:
        _, ctype = _out(gen, node)
        if float_only and ctype != _F32:
            raise Unsupported(f"{node.name}: {node.target} on {gen.val(node).dtype} is not lowered")
        (a,) = _args(gen, node, idx, None, node.args[0])
        return _emit(gen, node, fmt.format(a=a.text), ctype, a)

    return handle


_handles(aten.neg.default)(_unary("-{a}", float_only=False))
_handles(aten.exp.default)(_unary("tl.exp({a})"))
_handles(aten.exp2.default)(_unary("tl.exp2({a})"))
_handles(aten.log.default)(_unary("tl.log({a})"))
_handles(aten.log2.default)(_unary("tl.log2({a})"))
_handles(aten.sqrt.default)(_unary("tl.sqrt({a})"))
_handles(aten.rsqrt.default)(_unary("tl.rsqrt({a})"))
_handles(aten.sin.default)(_unary("tl.sin({a})"))
_handles(aten.cos.default)(_unary("tl.cos({a})"))
_handles(aten.erf.default)(_unary("tl.erf({a})"))
_handles(aten.floor.default)(_unary("tl.floor({a})"))
_handles(aten.ceil.default)(_unary("tl.ceil({a})"))
_handles(aten.abs.default)(_unary("tl.abs({a})", float_only=False))
_handles(aten.sigmoid.default)(_unary("tl.sigmoid({a})"))
_handles(aten.silu.default)(_unary("{a} * tl.sigmoid({a})"))
_handles(aten.reciprocal.default)(_unary("1.0 / {a}"))
# where(a < 0, 0, a) keeps NaN, as torch.relu does (tl.maximum would drop it).
_handles(aten.relu.default)(_unary("tl.where({a} < 0, 0, {a})", float_only=False))


@_handles(aten.tanh.default)
def _tanh(gen: _Generator, node: fx.Node, idx: tuple[Ix, ...]) -> Val:
    gen.helpers.add(_TANH_HELPER)
    return _unary("_tanh({a})")(gen, node, idx)


@_handles(aten.gelu.default)
def _gelu(gen: _Generator, node: fx.Node, idx: tuple[Ix, ...]) -> Val:
    approximate = node.kwargs.get("approximate", node.args[1] if len(node.args) > 1 else "none")
    if approximate == "tanh":
        gen.helpers.add(_TANH_HELPER)
        fmt = "0.5 * {a} * (1.0 + _tanh(0.7978845608028654 * ({a} + 0.044715 * {a} * {a} * {a})))"
    else:
        fmt = "0.5 * {a} * (1.0 + tl.erf({a} * 0.7071067811865476))"
    return _unary(fmt)(gen, node, idx)


@_handles(aten.pow.Tensor_Scalar)
def _pow(gen: _Generator, node: fx.Node, idx: tuple[Ix, ...]) -> Val:
    _, ctype = _out(gen, node)
    (a,) = _args(gen, node, idx, None, node.args[0])
    e = node.args[1]
    if not isinstance(e, (int, float)) or isinstance(e, bool):
        raise Unsupported(f"{node.name}: pow with exponent {e!r}")
    if float(e).is_integer() and abs(e) <= _MAX_INT_POW:
        n = int(e)
        if n == 0:
            return _const(1, ctype)
        if n < 0 and ctype != _F32:
            raise Unsupported(f"{node.name}: negative integer power of an integer tensor")
        # x**|n| by squaring: one multiply per bit plus one per set bit.
        result, square, k = None, a, abs(n)
        while k:
            if k & 1:
                result = square if result is None else _emit(gen, node, f"{result.text} * {square.text}", ctype, result, square)
            k >>= 1
            if k:
                square = _emit(gen, node, f"{square.text} * {square.text}", ctype, square)
        return _emit(gen, node, f"1.0 / {result.text}", ctype, result) if n < 0 else result
    if ctype != _F32:
        raise Unsupported(f"{node.name}: fractional power of an integer tensor")
    if e == 0.5:
        return _emit(gen, node, f"tl.sqrt({a.text})", ctype, a)
    if e == -0.5:
        return _emit(gen, node, f"tl.rsqrt({a.text})", ctype, a)
    # x**e = 2**(e * log2 x): NaN for x < 0 and 0 or inf for x = 0, as torch.pow gives.
    return _emit(gen, node, f"tl.exp2({_literal(float(e))} * tl.log2({a.text}))", ctype, a)


@_handles(aten.pow.Scalar)
def _pow_scalar(gen: _Generator, node: fx.Node, idx: tuple[Ix, ...]) -> Val:
    _, ctype = _out(gen, node)
    base = node.args[0]
    if not isinstance(base, (int, float)) or base <= 0 or ctype != _F32:
        raise Unsupported(f"{node.name}: pow of the scalar base {base!r}")
    (a,) = _args(gen, node, idx, None, node.args[1])
    return _emit(gen, node, f"tl.exp2({a.text} * {_literal(math.log2(base))})", ctype, a)


@_handles(aten.maximum.default, aten.minimum.default)
def _extremum(gen: _Generator, node: fx.Node, idx: tuple[Ix, ...]) -> Val:
    _, ctype = _out(gen, node)
    a, b = _args(gen, node, idx, None, node.args[0], node.args[1])
    fn = "tl.maximum" if node.target is aten.maximum.default else "tl.minimum"
    nan = ", propagate_nan=tl.PropagateNan.ALL" if ctype == _F32 else ""
    return _emit(gen, node, f"{fn}({a.text}, {b.text}{nan})", ctype, a, b)


@_handles(aten.clamp.default, aten.clamp.Tensor, aten.clamp_min.default, aten.clamp_max.default)
def _clamp(gen: _Generator, node: fx.Node, idx: tuple[Ix, ...]) -> Val:
    _, ctype = _out(gen, node)
    args = list(node.args) + [None] * 3
    if node.target is aten.clamp_min.default:
        lo, hi = args[1], None
    elif node.target is aten.clamp_max.default:
        lo, hi = None, args[1]
    else:
        lo, hi = node.kwargs.get("min", args[1]), node.kwargs.get("max", args[2])
    (x,) = _args(gen, node, idx, None, node.args[0])
    # where(x < lo, lo, x) keeps NaN, as torch.clamp does.
    if lo is not None:
        (lo_v,) = _args(gen, node, idx, None, lo)
        x = _emit(gen, node, f"tl.where({x.text} < {lo_v.text}, {lo_v.text}, {x.text})", ctype, x, lo_v)
    if hi is not None:
        (hi_v,) = _args(gen, node, idx, None, hi)
        x = _emit(gen, node, f"tl.where({x.text} > {hi_v.text}, {hi_v.text}, {x.text})", ctype, x, hi_v)
    return x


def _where_targets() -> list[Any]:
    return [getattr(aten.where, o) for o in ("self", "ScalarSelf", "ScalarOther", "Scalar") if hasattr(aten.where, o)]


@_handles(*_where_targets())
def _where(gen: _Generator, node: fx.Node, idx: tuple[Ix, ...]) -> Val:
    _, ctype = _out(gen, node)
    (c,) = _args(gen, node, idx, _BOOL, node.args[0])
    a, b = _args(gen, node, idx, None, node.args[1], node.args[2])
    return _emit(gen, node, f"tl.where({c.text}, {a.text}, {b.text})", ctype, c, a, b)


def _common_type(gen: _Generator, args: list[Any]) -> str:
    dtypes = []
    for a in args:
        value = gen.val(a)
        if _is_tensor(value):
            dtypes.append(value.dtype)
        elif isinstance(value, bool):
            dtypes.append(torch.bool)
        elif isinstance(value, (float, torch.SymFloat)):
            dtypes.append(torch.float32)
        else:
            dtypes.append(torch.int64)
    if any(d.is_floating_point for d in dtypes):
        return _F32
    if all(d == torch.bool for d in dtypes):
        return _BOOL
    return _I64 if torch.int64 in dtypes or len(set(dtypes)) > 1 else _compute_type(dtypes[0], "comparison")


def _compare(op: str) -> Callable:
    def handle(gen: _Generator, node: fx.Node, idx: tuple[Ix, ...]) -> Val:
        ctype = _common_type(gen, list(node.args[:2]))
        a, b = _args(gen, node, idx, ctype, node.args[0], node.args[1])
        return _emit(gen, node, f"{a.text} {op} {b.text}", _BOOL, a, b)

    return handle


for _name, _op in (("eq", "=="), ("ne", "!="), ("lt", "<"), ("le", "<="), ("gt", ">"), ("ge", ">=")):
    _handles(getattr(aten, _name).Tensor, getattr(aten, _name).Scalar)(_compare(_op))


@_handles(aten.logical_not.default)
def _logical_not(gen: _Generator, node: fx.Node, idx: tuple[Ix, ...]) -> Val:
    (a,) = _args(gen, node, idx, _BOOL, node.args[0])
    return _emit(gen, node, f"{a.text} == 0", _BOOL, a)


@_handles(aten.logical_and.default, aten.logical_or.default)
def _logical(gen: _Generator, node: fx.Node, idx: tuple[Ix, ...]) -> Val:
    a, b = _args(gen, node, idx, _BOOL, node.args[0], node.args[1])
    op = "&" if node.target is aten.logical_and.default else "|"
    return _emit(gen, node, f"{a.text} {op} {b.text}", _BOOL, a, b)


@_handles(aten.bitwise_and.Tensor, aten.bitwise_and.Scalar, aten.bitwise_or.Tensor, aten.bitwise_or.Scalar,
          aten.bitwise_xor.Tensor, aten.bitwise_xor.Scalar)
def _bitwise(gen: _Generator, node: fx.Node, idx: tuple[Ix, ...]) -> Val:
    _, ctype = _out(gen, node)
    if ctype == _F32:
        raise Unsupported(f"{node.name}: {node.target} of a floating-point tensor")
    a, b = _args(gen, node, idx, None, node.args[0], node.args[1])
    op = {"bitwise_and": "&", "bitwise_or": "|", "bitwise_xor": "^"}[node.target._schema.name.split("::")[1]]
    return _emit(gen, node, f"{a.text} {op} {b.text}", ctype, a, b)


@_handles(aten.bitwise_not.default)
def _bitwise_not(gen: _Generator, node: fx.Node, idx: tuple[Ix, ...]) -> Val:
    _, ctype = _out(gen, node)
    if ctype == _F32:
        raise Unsupported(f"{node.name}: bitwise_not of a floating-point tensor")
    (a,) = _args(gen, node, idx, None, node.args[0])
    return _emit(gen, node, f"{a.text} == 0" if ctype == _BOOL else f"~{a.text}", ctype, a)


@_handles(aten._to_copy.default, prims.convert_element_type.default)
def _convert(gen: _Generator, node: fx.Node, idx: tuple[Ix, ...]) -> Val:
    value, src = gen.val(node), gen.val(node.args[0])
    if src.device != value.device:
        raise Unsupported(f"{node.name}: copies from {src.device} to {value.device}")
    dtype = value.dtype
    ctype = _compute_type(dtype, node.name)
    (a,) = _args(gen, node, idx, ctype, node.args[0])
    if dtype in (torch.float16, torch.bfloat16) and src.dtype != dtype:
        # Compute in fp32, but round where the program rounds, as eager does.
        return _emit(gen, node, f"{a.text}.to({_STORAGE[dtype]}).to(tl.float32)", ctype, a)
    return a


@_handles(aten.clone.default, aten.alias.default, aten.lift_fresh_copy.default, aten.detach.default)
def _identity(gen: _Generator, node: fx.Node, idx: tuple[Ix, ...]) -> Val:
    return gen.value(node.args[0], idx)


@_handles(aten.scalar_tensor.default, aten.full.default)
def _constant(gen: _Generator, node: fx.Node, idx: tuple[Ix, ...]) -> Val:
    _, ctype = _out(gen, node)
    fill = node.args[0] if node.target is aten.scalar_tensor.default else node.args[1]
    if not isinstance(fill, (bool, int, float)):
        raise Unsupported(f"{node.name}: constant of value {fill!r}")
    return _const(fill, ctype)


# --- views: rewrite the index and ask the input ---------------------------------------------------


@_handles(aten.permute.default)
def _permute(gen: _Generator, node: fx.Node, idx: tuple[Ix, ...]) -> Val:
    rank = len(idx)
    dims = [_norm_dim(d, rank) for d in node.args[1]]
    src = [ZERO] * rank
    for k, d in enumerate(dims):
        src[d] = idx[k]
    return gen.value(node.args[0], tuple(src))


@_handles(aten.t.default, aten.transpose.int)
def _transpose(gen: _Generator, node: fx.Node, idx: tuple[Ix, ...]) -> Val:
    rank = len(idx)
    if rank < 2:
        return gen.value(node.args[0], idx)
    a, b = (0, 1) if node.target is aten.t.default else (_norm_dim(node.args[1], rank), _norm_dim(node.args[2], rank))
    src = list(idx)
    src[a], src[b] = idx[b], idx[a]
    return gen.value(node.args[0], tuple(src))


@_handles(aten.unsqueeze.default)
def _unsqueeze(gen: _Generator, node: fx.Node, idx: tuple[Ix, ...]) -> Val:
    dim = _norm_dim(node.args[1], len(idx))
    return gen.value(node.args[0], idx[:dim] + idx[dim + 1:])


@_handles(aten.expand.default)
def _expand(gen: _Generator, node: fx.Node, idx: tuple[Ix, ...]) -> Val:
    src = node.args[0]
    return gen.operand(src, gen.shape(node), idx, node.name)


@_handles(aten.select.int)
def _select(gen: _Generator, node: fx.Node, idx: tuple[Ix, ...]) -> Val:
    src = node.args[0]
    shape = gen.shape(src)
    dim, index = _norm_dim(node.args[1], len(shape)), node.args[2]
    if not isinstance(index, int):
        raise Unsupported(f"{node.name}: select at the symbolic index {index}")
    if index < 0:
        if not isinstance(shape[dim], int):
            raise Unsupported(f"{node.name}: negative select index on a symbolic dim")
        index += shape[dim]
    return gen.value(src, idx[:dim] + (Ix(str(index)),) + idx[dim:])


@_handles(aten.slice.Tensor)
def _slice(gen: _Generator, node: fx.Node, idx: tuple[Ix, ...]) -> Val:
    src = node.args[0]
    shape = gen.shape(src)
    args = list(node.args) + [None] * 5
    dim = _norm_dim(args[1] if args[1] is not None else 0, len(shape))
    start, step = args[2] or 0, args[4] or 1
    if not isinstance(start, int) or not isinstance(step, int):
        raise Unsupported(f"{node.name}: slice with symbolic start or step")
    if start < 0:
        if not isinstance(shape[dim], int):
            raise Unsupported(f"{node.name}: negative slice start on a symbolic dim")
        start = max(0, start + shape[dim])
    if isinstance(shape[dim], int):
        start = min(start, shape[dim])
    ix = idx[dim]
    text = ix.text if step == 1 else f"{ix.text} * {step}"
    if start:
        text = f"{text} + {start}" if ix.text != "0" else str(start)
    elif ix.text == "0":
        text = "0"
    return gen.value(src, idx[:dim] + (gen.index(text, ix.vec),) + idx[dim + 1:])


@_handles(aten.squeeze.default, aten.squeeze.dim, aten.squeeze.dims,
          aten.view.default, aten._unsafe_view.default, aten.reshape.default)
def _reshape(gen: _Generator, node: fx.Node, idx: tuple[Ix, ...]) -> Val:
    src = node.args[0]
    return gen.value(src, gen.reindex(gen.shape(node), gen.shape(src), idx, node.name))


@_handles(aten.cat.default)
def _cat(gen: _Generator, node: fx.Node, idx: tuple[Ix, ...]) -> Val:
    """Each input is read at the index clamped into its range, then the right one selected."""
    shape, ctype = _out(gen, node)
    tensors = [t for t in node.args[0] if tuple(gen.shape(t)) != (0,)]
    dim = _norm_dim(node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0), len(shape))
    sizes = [gen.shape(t)[dim] for t in tensors]
    if not all(isinstance(s, int) for s in sizes):
        raise Unsupported(f"{node.name}: cat along a symbolic dim")
    ix = idx[dim]
    offsets = [sum(sizes[:k]) for k in range(len(sizes))]
    if not ix.vec and ix.text.lstrip("-").isdigit():
        at = int(ix.text)
        k = max(k for k, o in enumerate(offsets) if o <= at)
        local = Ix(str(at - offsets[k]))
        return gen.cast(gen.value(tensors[k], idx[:dim] + (local,) + idx[dim + 1:]), ctype)
    branches = []
    for k, (t, o, n) in enumerate(zip(tensors, offsets, sizes)):
        local = ix.text if o == 0 else f"{ix.text} - {o}"
        if o > 0:
            local = f"tl.maximum({local}, 0)"
        if k < len(tensors) - 1:
            local = f"tl.minimum({local}, {n - 1})"
        local_ix = gen.index(local, ix.vec)
        branches.append(gen.cast(gen.value(t, idx[:dim] + (local_ix,) + idx[dim + 1:]), ctype))
    result = branches[-1]
    for k in range(len(branches) - 2, -1, -1):
        cond = f"{ix.text} < {offsets[k + 1]}"
        vec = ix.vec or branches[k].vec or result.vec
        result = gen.assign(f"tl.where({cond}, {branches[k].text}, {result.text})", ctype, vec, str(node.target))
    return result


# --- reductions -----------------------------------------------------------------------------------


def _reduction_args(node: fx.Node) -> tuple[Any, bool]:
    args = list(node.args) + [None] * 4
    if node.target in (aten.sum.default, aten.mean.default):
        return None, False
    dims = node.kwargs.get("dim", args[1])
    keepdim = node.kwargs.get("keepdim", args[2] if node.target not in (aten.var.correction, aten.var_mean.correction) else False)
    return dims, bool(keepdim)


def _reduced_dims(gen: _Generator, node: fx.Node) -> Any:
    """The dims a reduction node reduces, as its arguments give them."""
    if node.target is aten.native_layer_norm.default:
        rank = len(gen.shape(node.args[0]))
        return list(range(rank - len(node.args[1]), rank))
    if node.target in (aten._softmax.default, aten._log_softmax.default):
        return node.args[1]
    if node.target in (aten.var.correction, aten.var_mean.correction):
        return node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else None)
    return _reduction_args(node)[0]


@_handles(aten.sum.dim_IntList, aten.sum.default, aten.mean.dim, aten.mean.default, aten.amax.default, aten.amin.default)
def _reduction(gen: _Generator, node: fx.Node, idx: tuple[Ix, ...]) -> Val:
    src = node.args[0]
    rank = len(gen.shape(src))
    dims, keepdim = _reduction_args(node)
    gen.last_dim_only(node, dims, rank)
    _, ctype = _out(gen, node)
    row_idx = gen.reduced_row_idx(node, idx, keepdim)
    x = gen.row_operand(node, src, row_idx)
    if node.target in (aten.amax.default, aten.amin.default):
        if ctype != _F32:
            raise Unsupported(f"{node.name}: {node.target} of an integer tensor")
        return gen.reduce("max" if node.target is aten.amax.default else "min", x, str(node.target))
    if node.target in (aten.mean.dim, aten.mean.default):
        total = gen.reduce("sum", gen.cast(x, _F32), str(node.target))
        return gen.assign(f"{total.text} / {gen.row_length}", _F32, False, "mean", prefix="r")
    return gen.cast(gen.reduce("sum", gen.cast(x, ctype), str(node.target)), ctype)


def _correction(node: fx.Node) -> float:
    correction = node.kwargs.get("correction", None)
    return 1.0 if correction is None else float(correction)


@_handles(aten.var.correction)
def _var(gen: _Generator, node: fx.Node, idx: tuple[Ix, ...]) -> Val:
    src = node.args[0]
    dims, keepdim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else None), node.kwargs.get("keepdim", False)
    gen.last_dim_only(node, dims, len(gen.shape(src)))
    _, m2 = gen.moments(node, src, gen.reduced_row_idx(node, idx, keepdim))
    return gen.assign(f"{m2.text} / {_literal(gen.row_length - _correction(node))}", _F32, False, "variance", prefix="r")


@_handles(aten._softmax.default, aten._log_softmax.default)
def _softmax(gen: _Generator, node: fx.Node, idx: tuple[Ix, ...]) -> Val:
    src, dim = node.args[0], node.args[1]
    shape = gen.shape(src)
    gen.last_dim_only(node, dim, len(shape))
    if gen.row_length is None:
        raise Unsupported(f"{node.name}: softmax outside a reduction region")
    _, ctype = _out(gen, node)
    row_idx = idx[:-1]
    x = gen.cast(gen.row_operand(node, src, row_idx), _F32)
    m = gen.reduce("max", x, "row max")
    e = gen.assign(f"tl.exp({x.text} - {m.text})", _F32, True)
    s = gen.reduce("sum", e, "row sum of exp")
    # The element asked for (usually this row's own column, then x_j is x).
    xj = gen.cast(gen.operand(src, gen.shape(node), idx, node.name), _F32)
    if node.target is aten._log_softmax.default:
        return _emit(gen, node, f"{xj.text} - {m.text} - tl.log({s.text})", ctype, xj)
    ej = gen.assign(f"tl.exp({xj.text} - {m.text})", _F32, xj.vec)
    return _emit(gen, node, f"{ej.text} / {s.text}", ctype, ej)


def _layer_norm_stats(gen: _Generator, node: fx.Node, row_idx: tuple[Ix, ...]) -> tuple[Val, Val]:
    x, normalized, _, _, eps = node.args
    if len(normalized) != 1:
        raise Unsupported(f"{node.name}: layer norm over {len(normalized)} dims; only the last dim is lowered")
    if not isinstance(eps, (int, float)):
        raise Unsupported(f"{node.name}: layer norm with a non-constant eps")
    mean, m2 = gen.moments(node, x, row_idx)
    var = gen.assign(f"{m2.text} / {gen.row_length}", _F32, False, "variance", prefix="r")
    rstd = gen.assign(f"tl.rsqrt({var.text} + {_literal(eps)})", _F32, False, "rstd", prefix="r")
    return mean, rstd


@_handles(operator.getitem)
def _getitem(gen: _Generator, node: fx.Node, idx: tuple[Ix, ...]) -> Val:
    src, which = node.args
    if not isinstance(src, fx.Node) or src.op != "call_function":
        raise Unsupported(f"{node.name}: getitem of {src}")
    if gen.row_length is None:
        raise Unsupported(f"{node.name}: {src.target} outside a reduction region")
    value = gen.val(node)
    ctype = _compute_type(value.dtype, node.name)
    if src.target is aten.native_layer_norm.default:
        x, _, weight, bias, _ = src.args
        if which == 0:
            mean, rstd = _layer_norm_stats(gen, src, idx[:-1])
            xj = gen.cast(gen.operand(x, tuple(value.shape), idx, node.name), _F32)
            centered = gen.assign(f"{xj.text} - {mean.text}", _F32, xj.vec)
            y = gen.assign(f"{centered.text} * {rstd.text}", _F32, xj.vec, "normalized")
            if weight is not None:
                w = gen.cast(gen.operand(weight, tuple(value.shape), idx, node.name), _F32)
                y = gen.assign(f"{y.text} * {w.text}", _F32, y.vec or w.vec, "weight")
            if bias is not None:
                b = gen.cast(gen.operand(bias, tuple(value.shape), idx, node.name), _F32)
                y = gen.assign(f"{y.text} + {b.text}", _F32, y.vec or b.vec, "bias")
            return y
        rank = len(gen.shape(x))
        row_idx = idx[: rank - 1]
        mean, rstd = _layer_norm_stats(gen, src, row_idx)
        return mean if which == 1 else rstd
    if src.target is aten.var_mean.correction:
        x = src.args[0]
        dims = src.kwargs.get("dim", src.args[1] if len(src.args) > 1 else None)
        keepdim = src.kwargs.get("keepdim", False)
        gen.last_dim_only(src, dims, len(gen.shape(x)))
        mean, m2 = gen.moments(src, x, gen.reduced_row_idx(src, idx, keepdim))
        if which == 1:
            return mean
        return gen.assign(f"{m2.text} / {_literal(gen.row_length - _correction(src))}", _F32, False, "variance", prefix="r")
    raise Unsupported(f"{node.name}: getitem of {src.target} has no Triton translation")
