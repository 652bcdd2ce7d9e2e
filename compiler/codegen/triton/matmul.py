"""The Triton lowering of matmul_epilogue regions: a tiled GEMM whose epilogue is the region's
elementwise ops, computed on the accumulator before the one store.

Part of the codegen step. The partitioner (compiler.passes.fusion.partition) forms a
matmul_epilogue region from one `mm`, `addmm` or `bmm` and the pointwise ops that consume its
result element for element: a bias, a residual add, an activation, SwiGLU's `silu(x @ Wg) * up`.
This module writes the region as one Triton kernel, in the same kind of module as the
pointwise and reduction regions (compiler.codegen.triton.region: a `@triton.jit` kernel and a
plain-Python `launch`, loaded from the cache folder) and with the same generator for the
epilogue.

The GEMM
--------
One program computes a BLOCK_M x BLOCK_N tile of the [M, N] product (per batch entry of a bmm:
the grid's second axis). Programs are numbered in grouped order: GROUP_M consecutive tile rows
sweep the tile columns together, so the columns of B they share are read from L2, not from
memory, by all but the first. The K loop loads a BLOCK_M x BLOCK_K tile of A and a
BLOCK_K x BLOCK_N tile of B and accumulates `tl.dot` into an fp32 accumulator. A and B are read
through their strides, passed at launch: the transposed weight of a linear layer
(`mm(x, t(w))`, as export writes `F.linear`) and any permuted or expanded operand need no copy.
Rows and columns past M and N are wrapped back into the matrix (`rm % M`), so the loads need
no mask on M and N and every index the epilogue sees is in bounds; only the K tail is masked
(not at all when BLOCK_K divides K, a compile-time flag) and only the stores are masked on M
and N. fp32 operands use the IEEE dot (full fp32 products, as eager computes them by default)
unless `torch.get_float32_matmul_precision()` allows TF32, as it allows cuBLAS; fp16 and bf16
tiles go to the tensor cores. (Triton's interpreter multiplies bf16 tiles as their raw bits,
numpy having no bf16: under it, and only there, a compile-time flag converts them to fp32
first, which is exact.)

The epilogue
------------
The region generator computes every region value at an index (see region.py). Here the index
is the tile's own: (m, n), or (b, m, n) for a bmm, with m and n the [BLOCK_M, 1] and
[1, BLOCK_N] row and column indices, so every loaded operand broadcasts against the tile (a
bias is read as one [1, BLOCK_N] row). The matmul node's value at that index is the
accumulator (times alpha, plus beta times the bias for addmm; rounded to fp16/bf16 when the
product is, as eager's product is); the views the partitioner lets between the product and
its consumers are reshapes, whose value at the tile's index (mapped through the reshape) is the
same. An output is a reshape of the product's elements too; it is stored at its own strides in
its own dtype. Anything that reads the product at another element (a transpose, a slice, a
shifted index) raises `Unsupported`, and the region runs in ATen.

Tile configs
------------
Chosen at launch, from constants at the top of the module: the H100 one (128 x 128 tiles, K
steps of 32, 8 warps, 3 pipeline stages, GROUP_M 8), used on every GPU, and a 32 x 32 x 32 one
under the CPU interpreter (which runs each tile op in numpy: small tiles keep tests fast and put
odd sizes across tile edges). Tiles shrink to the next power of two of a small M, N or K (at
least 16, `tl.dot`'s minimum), so a decode step's one row does not compute 128. The source
text is the same for both, so one kernel name serves both.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import sympy
import torch
from torch import fx

from compiler.codegen import RegionRequest, register_region_lowering
from compiler.codegen.triton.region import (
    _F32,
    _FLOATS,
    _REDUCTIONS,
    _STORAGE,
    Ix,
    Val,
    _expr,
    _Generator,
    _Input,
    _literal,
    _render,
    _strides,
    build_kernel,
)
from compiler.errors import Unsupported
from compiler.ops.registry import Kernel
from compiler.passes.fusion.partition import MATMULS, RESHAPES

aten = torch.ops.aten

H100_CONFIG = dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=32, GROUP_M=8, num_warps=8, num_stages=3)
INTERPRETER_CONFIG = dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, GROUP_M=8, num_warps=4, num_stages=1)
_MIN_DOT = 16  # tl.dot needs every block dim >= 16

_CONSTANTS = [
    "# Tile configs, chosen at launch: H100's (used on every GPU) and a small one for the CPU",
    "# interpreter, which runs each tile op in numpy.",
    f"H100_CONFIG = {H100_CONFIG!r}",
    f"INTERPRETER_CONFIG = {INTERPRETER_CONFIG!r}",
]


@register_region_lowering("triton", kinds=("matmul_epilogue",))
def lower_matmul_epilogue(req: RegionRequest) -> Kernel:
    """A Triton GEMM with the region's epilogue for a matmul_epilogue region, or `Unsupported`
    saying why not."""
    if req.region.kind != "matmul_epilogue":
        raise Unsupported(f"the Triton matmul lowering covers matmul_epilogue regions, not {req.region.kind}")
    return build_kernel(req, _GemmGenerator)


@dataclass
class _GemmGenerator(_Generator):
    """The region generator walking a GEMM's output tile instead of a flat block or a row."""

    product: fx.Node | None = None
    tile: tuple[Ix, ...] = ()

    def generate(self) -> tuple[str, str]:
        self.check_outputs()
        ops = self.region.ops()
        gemms = [n for n in ops if n.target in MATMULS]
        if len(gemms) != 1:
            raise Unsupported(f"a matmul_epilogue region holds one mm/addmm/bmm, this one {len(gemms)}")
        reductions = [n for n in ops if n.target in _REDUCTIONS]
        if reductions:
            raise Unsupported(f"{reductions[0].name}: {reductions[0].target} in a matmul epilogue")
        mm = self.product = gemms[0]
        addmm = mm.target is aten.addmm.default
        batched = mm.target is aten.bmm.default
        a_node, b_node = mm.args[1:3] if addmm else mm.args[:2]
        (ia, a), (ib, b) = self.operand_input(mm, a_node), self.operand_input(mm, b_node)
        if a.dtype != b.dtype:
            raise Unsupported(f"{mm.name}: operands of dtypes {a.dtype} and {b.dtype}")

        shape = self.shape(mm)
        M, K, N = self.size(a.shape[-2], mm.name), self.size(a.shape[-1], mm.name), self.size(b.shape[-1], mm.name)
        self.mask = ""  # the epilogue's indices are wrapped into the bounds: its loads need no mask
        rows_cols = (Ix("m", vec=True), Ix("n", vec=True))
        self.tile = (Ix("bid"), *rows_cols) if batched else rows_cols
        head = self.tile_head(ia, ib, M, N, K, batched, a.dtype)
        self.seed(mm, self.product_value(mm, addmm))

        stores = []
        for k, out in enumerate(self.outputs):
            storage = _STORAGE[self.output_dtype(out)]
            if sympy.expand(self.numel(out) - self.numel(mm)) != 0:
                raise Unsupported(f"output {out.name} of shape {self.shape_text(self.shape(out))} is not a reshape of the product {self.shape_text(shape)}")
            idx = self.reindex(shape, self.shape(out), self.tile, out.name)
            value = self.cast(self.value(out, idx), storage)
            address = self.strided(idx, _strides(self.val(out)), "output")
            stores.append(f"tl.store(out{k}_ptr + {address}, {self.tensor_of(value, 'BLOCK_M, BLOCK_N')}, mask=mask)")

        batch = self.size(a.shape[0], mm.name) if batched else "1"
        work = _render(sympy.expand(sympy.Mul(*[_expr(s) for s in shape])), "product")
        grid = f"(triton.cdiv({M}, BLOCK_M) * triton.cdiv({N}, BLOCK_N), {batch})"
        setup = [
            'interpreted = os.environ.get("TRITON_INTERPRET", "0") == "1"',
            "config = INTERPRETER_CONFIG if interpreted else H100_CONFIG",
            f'BLOCK_M = min(config["BLOCK_M"], max({_MIN_DOT}, triton.next_power_of_2({M})))',
            f'BLOCK_N = min(config["BLOCK_N"], max({_MIN_DOT}, triton.next_power_of_2({N})))',
            f'BLOCK_K = min(config["BLOCK_K"], max({_MIN_DOT}, triton.next_power_of_2({K})))',
        ]
        constexprs = [(c, c) for c in ("BLOCK_M", "BLOCK_N", "BLOCK_K")]
        constexprs += [("GROUP_M", 'config["GROUP_M"]'), ("EVEN_K", f"{K} % BLOCK_K == 0")]
        if a.dtype == torch.bfloat16:
            constexprs.append(("UPCAST_BF16", "interpreted"))
        options = {"num_warps": 'config["num_warps"]', "num_stages": 'config["num_stages"]'}
        product = f"[{self.size(a.shape[0], mm.name)} x] " if batched else ""
        product += f"[{M} x {K}] @ [{K} x {N}]"
        epilogue = [name for name in self.op_names() if name not in ("mm", "addmm", "bmm")]
        h100, small = H100_CONFIG, INTERPRETER_CONFIG
        summary = (
            f"GEMM {product} {a.dtype} with the epilogue {', '.join(epilogue) or '(none)'}: one program per "
            f"BLOCK_M x BLOCK_N tile, grouped order, fp32 accumulator; tiles {_tile(h100)} with "
            f"{h100['num_warps']} warps and {h100['num_stages']} stages (H100), {_tile(small)} (interpreter)"
        )
        doc = f"{', '.join(self.op_names())}: one BLOCK_M x BLOCK_N tile of the {product} product per program, then the epilogue."
        text = self.assemble(
            doc, head, stores, constexprs, grid, work, options,
            imports=["import os"], constants=_CONSTANTS, setup=setup,
        )
        return text, summary

    def operand_input(self, mm: fx.Node, node: Any) -> tuple[int, torch.Tensor]:
        """A GEMM operand: a region input read through its strides (the partitioner keeps the
        operands and their views outside the region)."""
        if not isinstance(node, fx.Node) or node.op != "placeholder":
            raise Unsupported(f"{mm.name}: operand {node} is computed in the region; the GEMM reads its operands from memory")
        value = self.val(node)
        if not isinstance(value, torch.Tensor) or value.dtype not in _FLOATS:
            raise Unsupported(f"{mm.name}: operand {node.name} is not an fp32/fp16/bf16 tensor")
        i = self.placeholders.index(node)
        self.used_inputs.setdefault(i, _Input(i, node))
        return i, value

    def tile_head(self, ia: int, ib: int, M: str, N: str, K: str, batched: bool, dtype: torch.dtype) -> list[str]:
        """The kernel up to the accumulated tile: program ids in grouped order, the wrapped row
        and column indices m and n, the store mask, and the K loop."""
        sa = [f"in{ia}_stride{d}" for d in range(2 + batched)]
        sb = [f"in{ib}_stride{d}" for d in range(2 + batched)]
        head = [
            "pid = tl.program_id(0)",
            f"tiles_m = tl.cdiv({M}, BLOCK_M)",
            f"tiles_n = tl.cdiv({N}, BLOCK_N)",
            "# Grouped order: GROUP_M tile rows sweep the tile columns together, so the columns of B",
            "# they share are still in L2 when the next rows read them.",
            "per_group = GROUP_M * tiles_n",
            "first_m = (pid // per_group) * GROUP_M",
            "group_rows = tl.minimum(tiles_m - first_m, GROUP_M)",
            "pid_m = first_m + (pid % per_group) % group_rows",
            "pid_n = (pid % per_group) // group_rows",
            "# int64: row * stride passes 2**31 for large outputs",
            "rm = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)",
            "rn = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)",
            "# Rows and columns past the edge wrap into it: every load is in bounds, the stores are masked.",
            f"m = (rm % {M})[:, None]",
            f"n = (rn % {N})[None, :]",
            f"mask = (rm < {M})[:, None] & (rn < {N})[None, :]",
            "rk = tl.arange(0, BLOCK_K)",
        ]
        a_base, b_base = f"in{ia}_ptr", f"in{ib}_ptr"
        if batched:
            head.append("bid = tl.program_id(1).to(tl.int64)")
            a_base, b_base = f"{a_base} + bid * {sa[0]}", f"{b_base} + bid * {sb[0]}"
        head += [
            f"a_ptrs = {a_base} + m * {sa[-2]} + rk[None, :] * {sa[-1]}",
            f"b_ptrs = {b_base} + rk[:, None] * {sb[-2]} + n * {sb[-1]}",
            "acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)",
            f"for k in range(0, tl.cdiv({K}, BLOCK_K)):",
            "    if EVEN_K:",
            "        a = tl.load(a_ptrs)",
            "        b = tl.load(b_ptrs)",
            "    else:",
            f"        a = tl.load(a_ptrs, mask=rk[None, :] < {K} - k * BLOCK_K, other=0.0)",
            f"        b = tl.load(b_ptrs, mask=rk[:, None] < {K} - k * BLOCK_K, other=0.0)",
        ]
        if dtype == torch.bfloat16:
            head += [
                "    if UPCAST_BF16:  # the interpreter would multiply bf16 tiles as raw bits (numpy has no bf16)",
                "        a = a.to(tl.float32)",
                "        b = b.to(tl.float32)",
            ]
        head += [
            f"    acc = tl.dot(a, b, acc{_precision(dtype)})",
            f"    a_ptrs += BLOCK_K * {sa[-1]}",
            f"    b_ptrs += BLOCK_K * {sb[-2]}",
        ]
        return head

    def product_value(self, mm: fx.Node, addmm: bool) -> Val:
        """The matmul node's value at the tile: the accumulator, with addmm's alpha and beta *
        bias, rounded to the product's dtype where that is narrower than fp32."""
        value = Val("acc", _F32, True)
        if addmm:
            beta, alpha = mm.kwargs.get("beta", 1), mm.kwargs.get("alpha", 1)
            if alpha != 1:
                value = self.assign(f"acc * {_literal(alpha)}", _F32, True, "alpha")
            if beta != 0:  # beta = 0 ignores the bias, NaN included, as torch.addmm does
                bias = self.cast(self.operand(mm.args[0], self.shape(mm), self.tile, mm.name), _F32)
                term = bias.text if beta == 1 else f"{bias.text} * {_literal(beta)}"
                value = self.assign(f"{value.text} + {term}", _F32, True, "bias")
        dtype = self.val(mm).dtype
        if dtype != torch.float32:
            value = self.assign(f"{value.text}.to({_STORAGE[dtype]}).to(tl.float32)", _F32, True, f"the product in {dtype}")
        return value

    def seed(self, mm: fx.Node, value: Val) -> None:
        """Make `value` the product's value at the tile, and that of every reshape of the product
        at the tile's index mapped through the reshape (what the epilogue asks them for)."""
        shape = self.shape(mm)
        stack = [mm]
        while stack:
            node = stack.pop()
            idx = self.tile if node is mm else self.reindex(shape, self.shape(node), self.tile, node.name)
            self.memo[(node, tuple(ix.text for ix in idx))] = value
            stack += [u for u in node.users if u.op == "call_function" and u.target in RESHAPES]

    def compute(self, node: fx.Node, idx: tuple[Ix, ...]) -> Val:
        if node is self.product:  # its value at the tile is memoized; any other element is another tile's
            at = ", ".join(ix.text for ix in idx)
            raise Unsupported(f"{node.name}: the epilogue reads the product at ({at}), not at the element its tile computes")
        return super().compute(node, idx)

    def flat_offset(self, node: fx.Node, idx: tuple[Ix, ...]) -> tuple[str, str, str] | None:
        return None  # inputs are read at their strides: the tile is no flat walk of any of them

    def numel(self, node: fx.Node) -> sympy.Expr:
        return sympy.Mul(*[_expr(s) for s in self.shape(node)])


def _precision(dtype: torch.dtype) -> str:
    """tl.dot's input precision for fp32 operands: IEEE unless torch allows TF32 for matmuls
    (`torch.set_float32_matmul_precision("high")`), as cuBLAS in eager would use it."""
    if dtype != torch.float32:
        return ""
    return ', input_precision="ieee"' if torch.get_float32_matmul_precision() == "highest" else ', input_precision="tf32"'


def _tile(config: dict[str, int]) -> str:
    return f"{config['BLOCK_M']}x{config['BLOCK_N']}x{config['BLOCK_K']}"


__all__ = ["lower_matmul_epilogue", "H100_CONFIG", "INTERPRETER_CONFIG"]
