"""The TVM lowering of `compiler::quantized_kv_attention`: split-KV decode over a KIVI cache, for
the host.

Part of the codegen step (capture -> passes -> codegen -> compiled module). The op is decode
attention (one query per head, Sq == 1) over a cache of Nq quantized tokens followed by Nr
full-precision residual ones, in `kv_quant`'s format: packed uint8 codes, keys quantized per
channel over groups of Gk tokens, values per token over groups of Gv channels, fp16 scale and
min (x = code * scale + min); query head h reads KV head h // G, G = Hq // Hkv. A decode step
reads the whole cache for little arithmetic per element, so the kernel reads the codes as stored
(4-bit codes are an eighth of fp32's bytes) and dequantizes nothing ahead: no fp32 K or V exists
outside a register, and the work per element is kept to an unpacking and one FMA:

- keys: q . k = sum_d (q_d * s_d) * code_d + sum_d q_d * m_d, the scales and minimums constant
  over a key group. Once per group, q (times the softmax scale) is multiplied into the scales
  and dotted with the minimums; the score of each of its Gk keys is then one FMA per element
  between the codes and that scaled query, plus the group's constant;
- values: sum_t p_t * (code_td * s_tg + m_tg) = sum_t (p_t * s_tg) * code_td + sum_t p_t * m_tg.
  Once per chunk, the probabilities are multiplied into the scales (a weight per token and
  channel group) and dotted with the minimums; each element is then one FMA, and the minimums'
  term is added when the chunk's output is written;
- unpacking: code j of byte i is element i * (8 // bits) + j. The kernel never restores the
  element order within a row: it keeps the query (keys) and the accumulators (values) in the
  codes' order instead, (j, i) with j major, permuted once per key group or once per chunk. A
  vector of consecutive bytes ANDed with the mask of code j gives code j of each, times
  2**(j * bits), exactly, after an integer-to-float conversion; the factor is folded into the
  permuted query (or applied to the accumulators at the end), so no shift is needed. Where a
  row is whole vectors of 32-bit words (4-bit codes at head dim 64: one vector of 8 words), the
  codes are read as words, 32 // bits codes each, which saves the widening of bytes into lanes.
  An unpacked vector is shared by the G query heads of the KV head;
- scores are dot products along vector lanes; the partial sums of `lanes` keys are reduced
  together, by a butterfly of shuffles, rather than one horizontal sum per key.

Split-KV, as `attention`'s decode: the quantized tokens go by chunks of whole key groups (256
tokens, or one group when Gk is larger), the residual by chunks of `attention`'s decode chunk;
a work item is (batch entry, KV head, chunk) and covers the G query heads of that KV head, so
every code is read once. Items run in parallel on TVM's thread pool. Per item: the chunk's
scores (above, or plain dot products along vector lanes for residual keys), its softmax max and
sum (Cephes exp, `attention`'s `_exp_nonpositive`), then P @ V into register tiles of query heads
x vectors of columns; it leaves a partial (max, sum, unnormalized output) that a final serial
loop combines per head, rescaled by exp(chunk max - overall max). Nq = 0 or Nr = 0 simply gives
no chunk of that kind.

Batch, Nq (and its Nq / Gk key groups) and Nr are symbolic TIR vars, so one build serves every
cache length; bits, Gk, Gv, head counts and head dims are fixed per build; q, the residual and
the output are fp32.

What the kernel does not take falls back to the op's reference: at lowering time (`Unsupported`:
queries that are statically more than one (prefill of a quantized cache is not a decode step),
dtypes other than fp32 q / residual, uint8 codes and fp16 scales, symbolic heads or head dims,
head dims that are not a multiple of the vector width, value groups that split a byte of codes,
non-CPU tensors, targets other than `llvm`) or at run time, in the runner: Sq != 1, bits or Gk
other than the build's, tensors whose shapes or dtypes the build does not fit (the reference
raises the op's error where they are inconsistent), an empty cache, and tensors whose element
count needs 64-bit indices (the kernel indexes in int32).
"""

from __future__ import annotations

import functools
import math
import operator
import sys
from dataclasses import dataclass
from typing import Any, Callable

import torch

from compiler.codegen.tvm.attention import _DECODE_CHUNK, _NO_SCORE, _exp_nonpositive, _lanes, _max
from compiler.codegen.tvm.build import BuiltFunction, as_kernel_input, build_primfunc, host_fp32_lanes, parse_target
from compiler.errors import Unsupported
from compiler.ops import quantized_kv_attention as QUANTIZED_KV_ATTENTION
from compiler.ops.causal_attention import output_like
from compiler.ops.kv_quant import BITS, SCALE_DTYPE, check_cache
from compiler.ops.registry import Kernel, LoweringRequest

# Quantized tokens per chunk (rounded to whole key groups): as `attention`'s decode chunk, enough
# items for the thread pool at a few thousand tokens, each long enough to amortize its partial.
_CHUNK_TOKENS = 256
# Accumulators of a P @ V register tile: 3 query heads x 2 vectors at GQA 3, with their 3
# broadcast weights and the unpacked codes well inside AVX2's 16 vector registers. Tiles of 12
# (the prefill's) made LLVM spill accumulators in the token loop: measured ~12% slower overall.
_ACCUMULATORS = 6
_ARGS = ("q", "k_codes", "k_scale", "k_min", "v_codes", "v_scale", "v_min", "k_res", "v_res")
_DTYPES = (torch.float32, torch.uint8, *[SCALE_DTYPE] * 2, torch.uint8, *[SCALE_DTYPE] * 2, torch.float32, torch.float32)


@dataclass(frozen=True)
class _Shape:
    """What a build fixes: head counts, head dims, the code width and both group sizes."""

    q_heads: int
    kv_heads: int
    head_dim: int
    value_dim: int
    bits: int
    key_group: int  # Gk: tokens per key scale
    value_group: int  # Gv: channels per value scale

    @property
    def group(self) -> int:
        return self.q_heads // self.kv_heads

    @property
    def per_byte(self) -> int:
        return 8 // self.bits

    @property
    def value_groups(self) -> int:
        return self.value_dim // self.value_group

    @property
    def name(self) -> str:
        return (
            f"quantized_kv_attention_float32_hq{self.q_heads}_hkv{self.kv_heads}_d{self.head_dim}"
            f"_dv{self.value_dim}_int{self.bits}_gk{self.key_group}_gv{self.value_group}_decode"
        )


@dataclass(frozen=True)
class _Rows:
    """How the kernel reads the rows of one of its four cache tensors (keys or values, codes or
    residual): `items` stored items per row, `per` elements per item; element j of item i is
    element i * per + j of the row, and the kernel keeps rows in (j, i) order, j major. Items are
    floats (the residual), bytes of codes (8 // bits each), or 32-bit words of codes (`words`:
    32 // bits each, the bytes read four at a time; on a little-endian host a word's code j is
    element i * per + j)."""

    per: int
    items: int
    bits: int  # 32 for the fp32 residual: no unpacking
    words: bool = False

    @property
    def dtype(self) -> str:
        return "float32" if self.bits == 32 else "int32" if self.words else "uint8"

    def element(self, src: Any, b: Any, h: Any, token: Any, item: Any, j: Any) -> Any:
        """Element j of stored item `item` of a row as fp32, times `1 / unit(j)`: the code masked
        in place (code * 2**(j * bits), exact in fp32: an AND and a conversion, no shift), or the
        residual value. A word's top code is shifted down instead: masked in place, it would
        set the sign bit of the signed conversion."""
        from tvm import tirx

        x = src[b, h, token, item]
        if self.bits == 32:
            return x
        if self.per == 1:
            return x.astype("float32")
        levels = (1 << self.bits) - 1
        if not self.words:
            return tirx.bitwise_and(x, _pick(j, [levels << (k * self.bits) for k in range(self.per)], "uint8")).astype("float32")
        masked = tirx.bitwise_and(x, _pick(j, [levels << (k * self.bits) for k in range(self.per - 1)] + [0], "int32"))
        top = tirx.bitwise_and(tirx.shift_right(x, 32 - self.bits), levels)
        return tirx.Select(j == self.per - 1, top, masked).astype("float32")

    def unit(self, j: Any) -> Any:
        """What `element` is to be multiplied by: 2**-(j * bits) (1 for whole bytes, floats and
        a word's top code)."""
        from tvm import tirx

        top = self.per - 1 if self.words else None  # shifted down: a unit of 1
        return _pick(j, [1.0 if k == top else 2.0 ** (-k * self.bits) for k in range(self.per)], "float32")


def _pick(j: Any, values: list[Any], dtype: str) -> Any:
    """values[j] for a loop var j that unrolling makes a constant (then the Selects fold away)."""
    from tvm import tirx

    picked = tirx.const(values[-1], dtype)
    for k in reversed(range(len(values) - 1)):
        picked = tirx.Select(j == k, tirx.const(values[k], dtype), picked)
    return picked


@dataclass(frozen=True)
class _Tile:
    """A P @ V register tile: `heads` query heads x `codes` code positions (values of j) x `items`
    stored items, in vectors of `lanes` (a vector of codes lies in one value group: one weight)."""

    heads: int
    codes: int
    items: int
    lanes: int

    @property
    def accumulators(self) -> int:
        return self.heads * self.codes * self.items // self.lanes


def _value_tile(group: int, rows: _Rows, lanes: int, value_group: int) -> _Tile:
    """The tile with the most accumulators up to `_ACCUMULATORS`, then the most heads (the G
    heads share each unpacked vector), then the widest unpacking."""
    vl = math.gcd(lanes, rows.items, value_group // rows.per)
    widths = [vl << k for k in range(8) if rows.items % (vl << k) == 0]
    tiles = [
        _Tile(heads, codes, width, vl)
        for heads in range(1, group + 1) if group % heads == 0
        for codes in range(1, rows.per + 1) if rows.per % codes == 0
        for width in widths
    ]
    fits = [t for t in tiles if t.accumulators <= _ACCUMULATORS] or [min(tiles, key=lambda t: t.accumulators)]
    return max(fits, key=lambda t: (t.accumulators, t.heads, t.items))


@QUANTIZED_KV_ATTENTION.register_lowering("tvm")
def lower_quantized_kv_attention(req: LoweringRequest) -> Kernel:
    """The host decode kernel of one call site; other targets keep the reference."""
    target = parse_target(req.target.tvm_target)
    kind = target.kind.name
    if kind != "llvm":
        raise Unsupported(f"TVM quantized_kv_attention has no schedule for target kind {kind!r}")
    shape = _shape(*req.args)
    for name, t in zip(_ARGS, req.args):
        if t.device.type != "cpu":
            raise Unsupported(f"TVM llvm kernel for quantized_kv_attention on a {t.device.type} tensor ({name})")
    lanes = host_fp32_lanes(target)
    func = _decode_primfunc(shape, lanes)
    source = func.script()
    note = f"chunks of {_chunk_tokens(shape)} quantized / {_DECODE_CHUNK} residual tokens, {lanes} lanes"
    if not req.run_here:
        return Kernel(shape.name, "tvm", source, note=f"{note}; not built: the caller asked for source only")
    built = build_primfunc(func, req.target.tvm_target, shape.name)
    serial = build_primfunc(_decode_primfunc(shape, lanes, parallel=False), req.target.tvm_target, f"{shape.name}_serial")
    key_codes, value_codes, _, _ = _row_layouts(shape, lanes)
    runner = _host_runner(shape, built, serial, key_codes.words, value_codes.words)
    note += f"; on the calling thread below {_PARALLEL_FROM} cached tokens"
    return Kernel(shape.name, "tvm", source, runner=runner, note=f"{note}; shared library: {built.library}")


def _shape(
    q: torch.Tensor, k_codes: torch.Tensor, k_scale: torch.Tensor, k_min: torch.Tensor,
    v_codes: torch.Tensor, v_scale: torch.Tensor, v_min: torch.Tensor, k_res: torch.Tensor, v_res: torch.Tensor,
    _scale: Any, bits: Any, k_group: Any,
) -> _Shape:
    what = "TVM quantized_kv_attention"
    tensors = dict(zip(_ARGS, (q, k_codes, k_scale, k_min, v_codes, v_scale, v_min, k_res, v_res)))
    for (name, t), dtype in zip(tensors.items(), _DTYPES):
        if t.dim() != 4:
            raise Unsupported(f"{what} takes 4-d tensors; {name} has {t.dim()} dims")
        if t.dtype != dtype:
            raise Unsupported(f"{what} takes {dtype} {name}, not {t.dtype}")
    if not isinstance(bits, int) or bits not in BITS or not isinstance(k_group, int) or k_group < 1:
        raise Unsupported(f"{what} needs static bits in {BITS} and a static key group; got {bits!r}, {k_group!r}")
    queries = q.shape[2]
    if isinstance(queries, int) and queries != 1:
        raise Unsupported(f"{what} has a decode kernel only (one query); this call site has {queries}")
    sizes = {"Hq": q.shape[1], "Hkv": k_res.shape[1], "D": q.shape[3], "Dv": v_res.shape[3]}
    sizes |= {"key code bytes": k_codes.shape[3], "value code bytes": v_codes.shape[3], "value groups": v_scale.shape[3]}
    symbolic = [n for n, s in sizes.items() if not isinstance(s, int)]
    if symbolic:
        raise Unsupported(f"{what} needs static head counts, dims and value groups ({', '.join(symbolic)} symbolic)")
    per = 8 // bits
    hq, hkv, d, dv, groups = sizes["Hq"], sizes["Hkv"], sizes["D"], sizes["Dv"], sizes["value groups"]
    fits = (
        hkv > 0 and hq % hkv == 0 and d % per == 0 and dv % per == 0
        and k_codes.shape[3] == d // per and v_codes.shape[3] == dv // per
        and k_scale.shape[3] == d and k_min.shape[3] == d and groups > 0 and dv % groups == 0
        and v_min.shape[3] == groups
    )
    if not fits:
        shapes = ", ".join(f"{n} {tuple(t.shape)}" for n, t in tensors.items())
        raise Unsupported(f"{what}: {shapes} do not fit {bits}-bit codes")
    if (dv // groups) % per:
        raise Unsupported(f"{what}: value groups of {dv // groups} channels split bytes of {per} {bits}-bit codes")
    return _Shape(hq, hkv, d, dv, bits, k_group, dv // groups)


# The kernel ------------------------------------------------------------------------------------


def _chunk_tokens(shape: _Shape) -> int:
    """Quantized tokens per chunk: whole key groups, about `_CHUNK_TOKENS`."""
    return shape.key_group * max(1, _CHUNK_TOKENS // shape.key_group)


def _row_layouts(shape: _Shape, lanes: int) -> tuple[_Rows, _Rows, _Rows, _Rows]:
    """Key codes, value codes, residual keys, residual values. Sub-byte codes are read as words
    where a row is whole vectors of them (and, for values, a value group whole vectors too: one
    weight per vector): a word gives 32 // bits codes for an AND and a conversion each, where
    bytes need a widening first (4-bit codes at head dim 64: a row is one vector of words)."""
    if shape.head_dim % lanes or shape.value_dim % lanes:
        raise Unsupported(
            f"TVM quantized_kv_attention needs head dims that are multiples of {lanes} (the host's fp32 "
            f"lanes); D={shape.head_dim}, Dv={shape.value_dim}"
        )

    def codes(dim: int, group: int) -> _Rows:
        per = 32 // shape.bits
        # (a word's code j is element i * per + j only where its first byte is its lowest)
        whole = dim % (per * lanes) == 0 and group % (per * lanes) == 0
        if shape.bits < 8 and whole and sys.byteorder == "little":
            return _Rows(per, dim // per, shape.bits, words=True)
        return _Rows(shape.per_byte, dim // shape.per_byte, shape.bits)

    return (
        codes(shape.head_dim, shape.head_dim),
        codes(shape.value_dim, shape.value_group),
        _Rows(1, shape.head_dim, 32),
        _Rows(1, shape.value_dim, 32),
    )


def _unpack_width(rows: _Rows, lanes: int) -> int:
    """Items unpacked per vector operation: sub-byte codes are masked as bytes, so twice the fp32
    lanes fill a whole register of bytes; whole bytes and floats convert lane by lane."""
    return math.gcd(2 * lanes if rows.per > 1 and not rows.words else lanes, rows.items)


def _transpose_sum(dot: Any, g: Any, lanes: int) -> Any:
    """The vector whose lane t is the sum of the lanes of dot[g, t] (a [G, lanes, lanes] buffer):
    a butterfly of shuffles and adds, 3 instructions per pair of vectors per level (21 for 8
    vectors at 8 lanes) where a horizontal sum per vector takes about 8 each. Level by level,
    pairs of vectors fold their halves (then quarters, ...) together, each output vector holding
    the partial sums of both inputs' segments; inputs are taken in the order that leaves token t
    in lane t."""
    from tvm import tirx

    labels: list[list[int]] = [[t] for t in range(lanes)]  # the token of each segment, per vector
    while len(labels) > 1:
        labels = [[x for pair in zip(a, b) for x in pair] for a, b in zip(labels[::2], labels[1::2])]
    position = {token: i for i, token in enumerate(labels[0])}
    vectors = [dot.vload([g, t, 0], f"float32x{lanes}") for t in sorted(range(lanes), key=position.__getitem__)]
    half = lanes // 2
    while len(vectors) > 1:
        low, high = [], []
        for segment in range(lanes // (2 * half)):
            for side in (0, 1):
                for i in range(half):
                    low.append(side * lanes + segment * 2 * half + i)
                    high.append(side * lanes + segment * 2 * half + i + half)
        vectors = [tirx.Shuffle([a, b], low) + tirx.Shuffle([a, b], high) for a, b in zip(vectors[::2], vectors[1::2])]
        half //= 2
    return vectors[0]


def _lane_sum(dot: Any, g: Any, lanes: int) -> Any:
    """The sum of the lanes of dot[g, 0] (one row's dot products)."""
    return functools.reduce(operator.add, [dot[g, 0, i] for i in range(lanes)])


def _scores_macro(group: int, rows: _Rows, lanes: int) -> Any:
    """s[g, s0 + t] = qe[g] . row(first + t) + qm[g] for the `keys` rows from `first` on, qe in
    the kernel's (j, i) order. Each row is unpacked once into `kf` and shared by the G heads; the
    dot products of a block of `lanes` rows are reduced together (`_transpose_sum`), the rows
    past the last whole block one by one."""
    from tvm.script import tirx as T

    G, PER, ITEMS, L = group, rows.per, rows.items, lanes
    UW = _unpack_width(rows, lanes)
    element = rows.element
    lane_sum, transpose_sum = _lane_sum, _transpose_sum

    @T.macro
    def row_dots(src, qe, kf, dot, b, h, token, tt):
        for j in T.unroll(PER):
            for iu in T.unroll(ITEMS // UW):
                for l in T.vectorized(UW):
                    kf[j * ITEMS + iu * UW + l] = element(src, b, h, token, iu * UW + l, j)
        for g in T.unroll(G):
            for l in T.vectorized(L):
                dot[g, tt, l] = T.float32(0)
            for e in T.unroll(PER * ITEMS // L):
                for l in T.vectorized(L):
                    dot[g, tt, l] = dot[g, tt, l] + qe[g, e * L + l] * kf[e * L + l]

    @T.macro
    def scores(src, qe, qm, s, kf, dot, b, h, first, keys, s0):
        for tb in range(keys // L):
            for tt in T.unroll(L):
                row_dots(src, qe, kf, dot, b, h, first + tb * L + tt, tt)
            for g in T.unroll(G):
                s[g, T.Ramp(s0 + tb * L, 1, L)] = transpose_sum(dot, g, L) + T.Broadcast(qm[g], L)
        for t in range(keys // L * L, keys):
            row_dots(src, qe, kf, dot, b, h, first + t, 0)
            for g in T.unroll(G):
                s[g, s0 + t] = lane_sum(dot, g, L) + qm[g]

    return scores


def _values_macro(shape: _Shape, rows: _Rows, tile: _Tile, packed: bool) -> Any:
    """P @ V of one chunk: part_out[partial(g), :] = sum_t p[g, t] * value(first + t), for the
    `keys` rows from `first` on, tile by tile. Codes: the weight of a vector of codes is
    ws[g, group, t] = p[g, t] times its group's scale, the accumulators hold the kernel's (j, i)
    order, and the unit of j and the minimums' term pm[g, group] (both computed by the caller)
    are applied when the tile is written out in channel order. Residual: the weight is s[g, t]."""
    from tvm.script import tirx as T

    HQ, G, GV = shape.q_heads, shape.group, shape.value_group
    PER, ITEMS = rows.per, rows.items
    RD, JP, UB, VL = tile.heads, tile.codes, tile.items, tile.lanes
    NV = UB // VL
    GI = GV // PER  # items per value group
    element, unit = rows.element, rows.unit

    @T.macro
    def values(src, ws, pm, s, acc, vf, part_out, b, h, first, keys, c, chunks):
        for gt in range(G // RD):
            for jt in T.unroll(PER // JP):
                for it in range(ITEMS // UB):
                    for r in T.unroll(RD):
                        for jj in T.unroll(JP):
                            for v in T.unroll(NV):
                                for l in T.vectorized(VL):
                                    acc[r, jj, v, l] = T.float32(0)
                    for t in range(keys):
                        for jj in T.unroll(JP):
                            for v in T.unroll(NV):
                                for l in T.vectorized(VL):
                                    vf[jj, v * VL + l] = element(src, b, h, first + t, it * UB + v * VL + l, jt * JP + jj)
                        for r in T.unroll(RD):
                            for jj in T.unroll(JP):
                                for v in T.unroll(NV):
                                    for l in T.vectorized(VL):
                                        if packed:
                                            acc[r, jj, v, l] = acc[r, jj, v, l] + ws[
                                                gt * RD + r, (it * UB + v * VL) // GI, t
                                            ] * vf[jj, v * VL + l]
                                        else:
                                            acc[r, jj, v, l] = acc[r, jj, v, l] + s[gt * RD + r, t] * vf[jj, v * VL + l]
                    for r in T.unroll(RD):
                        partial: T.let = (b * HQ + h * G + gt * RD + r) * chunks + c
                        for jj in T.unroll(JP):
                            for v in T.unroll(NV):
                                for l in range(VL):
                                    channel: T.let = (it * UB + v * VL + l) * PER + jt * JP + jj
                                    part_out[partial, channel] = acc[r, jj, v, l] * unit(jt * JP + jj) + pm[
                                        gt * RD + r, channel // GV
                                    ]

    return values


def _decode_primfunc(shape: _Shape, lanes: int, parallel: bool = True) -> Any:
    """The PrimFunc (q, k_codes, k_scale, k_min, v_codes, v_scale, v_min, k_res, v_res, out,
    scale), q and out with one query; see the module docstring. `parallel=False` runs the work
    items on the calling thread."""
    from tvm.script import tirx as T

    items_loop = T.parallel if parallel else T.serial
    HQ, HKV, D, DV, G = shape.q_heads, shape.kv_heads, shape.head_dim, shape.value_dim, shape.group
    GK, NVG, L = shape.key_group, shape.value_groups, lanes
    key_codes, value_codes, key_res, value_res = _row_layouts(shape, lanes)
    KB, VB, PER = key_codes.items, value_codes.items, key_codes.per
    C = _chunk_tokens(shape)
    GPC = C // GK  # key groups per chunk
    RC = _DECODE_CHUNK  # residual tokens per chunk
    CMAX = max(C, RC)
    qtile, rtile = _value_tile(G, value_codes, L, shape.value_group), _value_tile(G, value_res, L, DV)
    code_scores, res_scores = _scores_macro(G, key_codes, L), _scores_macro(G, key_res, L)
    code_values = _values_macro(shape, value_codes, qtile, True)
    res_values = _values_macro(shape, value_res, rtile, False)
    unit = key_codes.unit
    exp = _exp_nonpositive
    lane_sum = _lanes
    add, maximum = operator.add, _max
    no_score = _NO_SCORE
    masked_out = -math.inf

    @T.prim_func
    def quantized_kv_attention(
        q_h: T.handle, kc_h: T.handle, ks_h: T.handle, km_h: T.handle, vc_h: T.handle, vs_h: T.handle,
        vm_h: T.handle, kr_h: T.handle, vr_h: T.handle, o_h: T.handle, scale: T.float32,
    ):
        T.func_attr({"tir.noalias": True})
        nb = T.int32()
        nq = T.int32()
        ng = T.int32()  # key groups: nq / Gk
        nr = T.int32()
        q = T.match_buffer(q_h, (nb, HQ, 1, D), "float32")
        k_codes = T.match_buffer(kc_h, (nb, HKV, nq, KB), key_codes.dtype)
        k_scale = T.match_buffer(ks_h, (nb, HKV, ng, D), "float16")
        k_min = T.match_buffer(km_h, (nb, HKV, ng, D), "float16")
        v_codes = T.match_buffer(vc_h, (nb, HKV, nq, VB), value_codes.dtype)
        v_scale = T.match_buffer(vs_h, (nb, HKV, nq, NVG), "float16")
        v_min = T.match_buffer(vm_h, (nb, HKV, nq, NVG), "float16")
        k_res = T.match_buffer(kr_h, (nb, HKV, nr, D), "float32")
        v_res = T.match_buffer(vr_h, (nb, HKV, nr, DV), "float32")
        o = T.match_buffer(o_h, (nb, 1, HQ, DV), "float32")
        coded: T.let = (ng + GPC - 1) // GPC  # chunks of codes, then chunks of the residual
        chunks: T.let = (ng + GPC - 1) // GPC + (nr + RC - 1) // RC
        # Per (batch, query head, chunk): max score, sum of exp(score - max), unnormalized output.
        part_max = T.alloc_buffer((nb * HQ * ((ng + GPC - 1) // GPC + (nr + RC - 1) // RC),), "float32")
        part_sum = T.alloc_buffer((nb * HQ * ((ng + GPC - 1) // GPC + (nr + RC - 1) // RC),), "float32")
        part_out = T.alloc_buffer((nb * HQ * ((ng + GPC - 1) // GPC + (nr + RC - 1) // RC), DV), "float32")
        for item in items_loop(nb * HKV * chunks):
            b: T.let = item // (HKV * chunks)
            h: T.let = item // chunks % HKV
            c: T.let = item % chunks
            # Global scope, as in `attention`: buffers under 1 KiB go on the stack, where LLVM
            # keeps the register tiles in registers.
            qs = T.alloc_buffer((G, D), "float32")  # q * scale
            qe = T.alloc_buffer((G, D), "float32")  # the query the rows are dotted with
            qm = T.alloc_buffer((G,), "float32")  # the key group's constant
            pm = T.alloc_buffer((G, NVG), "float32")  # sum_t p_t * v_min[t, group]
            s = T.alloc_buffer((G, CMAX), "float32")
            kf = T.alloc_buffer((D,), "float32")
            dot = T.alloc_buffer((G, L, L), "float32")
            red = T.alloc_buffer((L,), "float32")
            ws = T.alloc_buffer((G, NVG, C), "float32")  # p_t * v_scale[t, group]
            vf = T.alloc_buffer((qtile.codes, qtile.items), "float32")
            rf = T.alloc_buffer((1, rtile.items), "float32")
            q_acc = T.alloc_buffer((qtile.heads, qtile.codes, qtile.items // qtile.lanes, qtile.lanes), "float32")
            r_acc = T.alloc_buffer((rtile.heads, 1, rtile.items // rtile.lanes, rtile.lanes), "float32")
            for g in range(G):
                for d in T.vectorized(D):
                    qs[g, d] = q[b, h * G + g, 0, d] * scale
            keys = T.alloc_buffer((1,), "int32")
            if c < coded:
                g0: T.let = c * GPC
                keys[0] = T.min(GPC, ng - g0) * GK
                for kg in range(T.min(GPC, ng - g0)):
                    # The group's scales folded into the query (in the codes' element order), its
                    # minimums into a constant.
                    for g in range(G):
                        for j in T.unroll(PER):
                            for i in T.vectorized(KB):
                                qe[g, j * KB + i] = (
                                    qs[g, i * PER + j] * T.Cast("float32", k_scale[b, h, g0 + kg, i * PER + j]) * unit(j)
                                )
                        for l in T.vectorized(L):
                            red[l] = T.float32(0)
                        for dc in range(D // L):
                            for l in T.vectorized(L):
                                red[l] = red[l] + qs[g, dc * L + l] * T.Cast("float32", k_min[b, h, g0 + kg, dc * L + l])
                        qm[g] = lane_sum(add, red)
                    code_scores(k_codes, qe, qm, s, kf, dot, b, h, (g0 + kg) * GK, GK, kg * GK)
            else:
                r0: T.let = (c - coded) * RC
                keys[0] = T.min(RC, nr - r0)
                for g in range(G):
                    qm[g] = T.float32(0)
                res_scores(k_res, qs, qm, s, kf, dot, b, h, r0, T.min(RC, nr - r0), 0)
            # The chunk's softmax: max and sum per head over its keys (lanes past them -inf).
            for g in range(G):
                partial: T.let = (b * HQ + h * G + g) * chunks + c
                for t in range(keys[0], (keys[0] + L - 1) // L * L):
                    s[g, t] = T.float32(masked_out)
                for l in T.vectorized(L):
                    red[l] = T.float32(no_score)
                for tc in range((keys[0] + L - 1) // L):
                    for l in T.vectorized(L):
                        red[l] = T.max(red[l], s[g, tc * L + l])
                part_max[partial] = lane_sum(maximum, red)
                for l in T.vectorized(L):
                    red[l] = T.float32(0)
                for tc in range((keys[0] + L - 1) // L):
                    for l in T.vectorized(L):
                        s[g, tc * L + l] = exp(s[g, tc * L + l] - part_max[partial])
                        red[l] = red[l] + s[g, tc * L + l]
                part_sum[partial] = lane_sum(add, red)
            if c < coded:
                # The values' minimums term and the weights of their codes, per channel group.
                t0: T.let = c * GPC * GK
                for g in range(G):
                    for vg in range(NVG):
                        for l in T.vectorized(L):
                            red[l] = T.float32(0)
                        for tc in range(keys[0] // L):
                            for l in T.vectorized(L):
                                red[l] = red[l] + s[g, tc * L + l] * T.Cast("float32", v_min[b, h, t0 + tc * L + l, vg])
                                ws[g, vg, tc * L + l] = s[g, tc * L + l] * T.Cast("float32", v_scale[b, h, t0 + tc * L + l, vg])
                        pm[g, vg] = lane_sum(add, red)
                        for t in range(keys[0] // L * L, keys[0]):
                            pm[g, vg] = pm[g, vg] + s[g, t] * T.Cast("float32", v_min[b, h, t0 + t, vg])
                            ws[g, vg, t] = s[g, t] * T.Cast("float32", v_scale[b, h, t0 + t, vg])
                code_values(v_codes, ws, pm, s, q_acc, vf, part_out, b, h, t0, keys[0], c, chunks)
            else:
                for g in range(G):
                    for vg in range(NVG):
                        pm[g, vg] = T.float32(0)
                res_values(v_res, ws, pm, s, r_acc, rf, part_out, b, h, (c - coded) * RC, keys[0], c, chunks)
        # Serial: ~Hq * chunks * Dv FMAs, less than a second fork-join of the thread pool costs.
        for head in T.serial(nb * HQ):
            stats = T.alloc_buffer((2,), "float32")  # overall max, normalizer
            acc = T.alloc_buffer((DV,), "float32")
            stats[0] = T.float32(no_score)
            for c in range(chunks):
                stats[0] = T.max(stats[0], part_max[head * chunks + c])
            stats[1] = T.float32(0)
            for d in T.vectorized(DV):
                acc[d] = T.float32(0)
            for c in range(chunks):
                rescale: T.let = exp(part_max[head * chunks + c] - stats[0])
                stats[1] = stats[1] + rescale * part_sum[head * chunks + c]
                for d in T.vectorized(DV):
                    acc[d] = acc[d] + rescale * part_out[head * chunks + c, d]
            for d in T.vectorized(DV):
                o[head // HQ, 0, head % HQ, d] = acc[d] / stats[1]

    return quantized_kv_attention


# Running it ------------------------------------------------------------------------------------


# Cached tokens from which the work items go to TVM's thread pool. Below, the calling thread runs
# them: a decode step's attention sits between ATen matmuls whose OpenMP workers spin after each
# op, and TVM's pool then waits for cores it does not get (SmolLM2, 4096 tokens, 2-core host:
# 0.22-0.28x SDPA interleaved with it on the pool, against 0.6x SDPA's time alone; see
# docs/DESIGN.md, "Two thread pools on one CPU").
_PARALLEL_FROM = 16384


def _host_runner(shape: _Shape, kernel: BuiltFunction, serial: BuiltFunction, key_words: bool, value_words: bool) -> Callable[..., torch.Tensor]:
    """The runner; codes read as words go to the kernel as int32 views of their bytes."""
    words = (False, key_words, False, False, value_words, False, False, False, False)

    def run(
        q: torch.Tensor, k_codes: torch.Tensor, k_scale: torch.Tensor, k_min: torch.Tensor,
        v_codes: torch.Tensor, v_scale: torch.Tensor, v_min: torch.Tensor, k_res: torch.Tensor, v_res: torch.Tensor,
        scale: float, bits: int, k_group: int,
    ) -> torch.Tensor:
        tensors = (q, k_codes, k_scale, k_min, v_codes, v_scale, v_min, k_res, v_res)
        if not _kernel_takes(shape, tensors, bits, k_group):
            return QUANTIZED_KV_ATTENTION.reference(*tensors, scale, bits, k_group)
        # The op's output layout: the kernel writes its [B, 1, Hq, Dv] memory order directly.
        out = output_like(q, v_res)
        inputs = [as_kernel_input(t) for t in tensors]  # (an empty part of the cache included)
        inputs = [t.view(torch.int32) if word else t for t, word in zip(inputs, words)]
        run = kernel if k_codes.shape[2] + k_res.shape[2] >= _PARALLEL_FROM else serial
        run(*inputs, out.transpose(1, 2), float(scale))
        return out

    return run


def _kernel_takes(shape: _Shape, tensors: tuple[torch.Tensor, ...], bits: int, k_group: int) -> bool:
    """Whether the kernel computes this call; else the reference does (and raises the op's errors).
    Run at every decode step: plain comparisons, cheap next to the kernel."""
    q, k_codes, _, _, _, v_scale, _, k_res, v_res = tensors
    if bits != shape.bits or k_group != shape.key_group:
        return False
    if any(t.dtype != dtype or not t.is_cpu for t, dtype in zip(tensors, _DTYPES)):
        return False
    try:
        check_cache(*tensors, bits, k_group)  # every shape consistent with q's
    except ValueError:
        return False  # the reference raises it
    fits = (
        q.shape[1] == shape.q_heads and q.shape[2] == 1 and q.shape[3] == shape.head_dim
        and k_res.shape[1] == shape.kv_heads and v_res.shape[3] == shape.value_dim
        and v_scale.shape[3] == shape.value_groups
    )
    out_numel = q.shape[0] * shape.q_heads * shape.value_dim
    numel = max(max(t.numel() for t in tensors), out_numel)
    return fits and out_numel > 0 and k_codes.shape[2] + k_res.shape[2] > 0 and numel < 2**31  # int32 indices
