"""The TVM lowering of `compiler::causal_attention`: flash-style prefill and split-KV decode.

Part of the codegen step (capture -> passes -> codegen -> compiled module). The op is causal SDPA
with queries aligned to the end of the keys (query i of Sq sits at position Sk - Sq + i) and
grouped-query heads (query head h reads KV head h // G, G = Hq // Hkv). Both kernels are written
directly in TVMScript: the register tiling they need is easier to state as loops than to reach
through schedule primitives. Batch and sequence lengths are symbolic TIR vars, so one build serves
every length; head counts, head dims and the dtype (fp32) are fixed per build.

Prefill (Sq > 1), for `llvm`. One work item is (batch, KV head, block of BQ queries) and covers
all G query heads of that KV head: their G * BQ rows share every K/V tile the item reads, and K/V
are read at their own head count, never expanded. Work items run in parallel on TVM's thread pool,
their query blocks in zig-zag order (first, last, second, ...) so that each thread's contiguous
share of the causal triangle holds as much work as the others'. Per item:

- Q is packed once, transposed and pre-scaled: QT[d, row], rows = (query head, query);
- keys go by blocks of BK. Blocks wholly below the diagonal take an unmasked path; the blocks
  the diagonal crosses take a masked one; blocks above it are never visited (their count is
  computed, not tested);
- scores are computed transposed, S^T[key, row] = sum_d K[key, d] * QT[d, row], as a register
  tile of 4 keys x 3 vectors of rows: K is read in place (a broadcast per key and d), QT a
  vector load, 12 FMAs per step. Rows lie along vector lanes, so the online softmax is
  lane-parallel as well: the running max, sum and rescale factor of 3 vectors of rows are
  vectors, with no horizontal reduction and no scalar exp;
- P @ V accumulates into the item's fp32 output block as a register tile of 6 rows x 2 vectors
  of V's columns (P broadcast, V read in place), after rescaling it by exp(m_old - m_new);
- the output is the accumulator over the running sum, written once, in the layout of SDPA's
  output ([B, Sq, Hq, Dv] viewed as [B, Hq, Sq, Dv]), which captured graphs rely on.

exp is Cephes' polynomial (`region`'s constants), specialized to the arguments softmax gives it
(score minus a running max, <= 0 or NaN): no overflow branch, and the masked -inf flushes to
exactly 0. LLVM would otherwise call libm once per lane.

Decode (Sq == 1), for `llvm`: one query per head against a long cache is a matrix-vector
product, bound by reading K and V, with too little work per key for the tiles above. The keys
split into chunks of C that run in parallel (all G query heads of a KV head in one item, so K/V
are read once); each chunk leaves a partial (max, sum, unnormalized output), and a final loop
combines a head's chunks, rescaling each by exp(chunk max - overall max).

Key padding mask: a call site that passes one gets kernels that take it, [B, >= Sk] booleans
read in place; a masked key's score is -inf, as past the diagonal, and a row with no visible key
gives 0, as SDPA does. Call sites without one get kernels without it.

`cuda`: the same two algorithms with one query row per thread (prefill: K/V tiles staged in
shared memory, causal skip per thread block) and one output column per thread (decode); CUDA C is
generated for reading (TVMScript when TVM cannot emit it here), never run: Triton serves CUDA
targets.

What the kernels do not take falls back to the op's reference: at lowering time (raising
`Unsupported`: fp16/bf16, symbolic head dims, head dims that are not a multiple of the vector
width, non-CPU tensors for `llvm`) or at run time, in the runner: a mask whose shape the kernels
cannot read (batch other than q's, shorter than Sk), more queries than keys (the reference raises
the op's error), empty tensors, and tensors whose element count needs 64-bit indices (the
kernels index in int32).

TVM sizes its thread pool from TVM_NUM_THREADS (else OMP_NUM_THREADS, else half the hardware
threads on x86, assuming SMT: one thread on a 2-core VM without it).
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch

from compiler.codegen.tvm.build import as_kernel_input, build_primfunc, device_source, host_fp32_lanes, parse_target
from compiler.codegen.tvm.region import _EXP_LO, _let, exp_in_range
from compiler.errors import Unsupported
from compiler.ops import causal_attention as CAUSAL_ATTENTION
from compiler.ops.causal_attention import output_like
from compiler.ops.registry import Kernel, LoweringRequest

# Keys per block of the prefill (BK): a block of K and one of V (16 KiB each at head dim 64) stay
# in L2 while every row panel of the work item reads them.
_KEY_BLOCK = 64
# Queries per block (BQ) aim at this many; the block is then rounded so that G * BQ rows fill
# whole panels of the score tile, and shrunk while the rows exceed _MAX_ROWS (the item's packed Q
# and output block, 2 x rows x 64 x 4 bytes, stay well inside L2).
_QUERY_BLOCK = 64
_MAX_ROWS = 256
# Register tiles (AVX2 has 16 vector registers: 12 accumulators + the operands). Scores: 4 keys x
# 3 vectors of rows; P @ V: 6 rows x 2 vectors of V columns (1 vector when Dv needs it).
_SCORE_KEYS = 4
_SCORE_VECTORS = 3
_OUT_ROWS = 6
_OUT_VECTORS = 2
# Keys per chunk of the split-KV decode: 8192 keys are 32 chunks per KV head, enough items for
# the thread pool, each long enough to amortize its partial's write and combine.
_DECODE_CHUNK = 256
# The running max starts finite, not at -inf: a row that has seen only masked keys then rescales
# by exp(0) = 1 instead of exp(-inf - -inf) = NaN.
_NO_SCORE = -3.0e38
# CUDA: one query per thread and 64 queries per block (prefill), K/V tiles of 32 keys in shared
# memory; one output column per thread (decode).
_CUDA_QUERY_BLOCK = 64
_CUDA_KEY_BLOCK = 32
_NOT_RUN = "TVM CUDA kernels are for reading only; the triton backend runs CUDA targets"


@dataclass(frozen=True)
class _Shape:
    """What a build fixes: head counts, head dims, whether the call site passes a key padding
    mask, and which phases it may run (prefill for Sq > 1, decode for Sq == 1; both when Sq is
    symbolic)."""

    q_heads: int
    kv_heads: int
    head_dim: int
    value_dim: int
    padded: bool
    prefill: bool
    decode: bool

    @property
    def group(self) -> int:
        return self.q_heads // self.kv_heads

    @property
    def phases(self) -> list[str]:
        return [p for p, on in (("prefill", self.prefill), ("decode", self.decode)) if on]

    def function_name(self, phase: str) -> str:
        """The name of one phase's function: it does not depend on the other phases built, so
        call sites that share a phase share its build."""
        padded = "_padded" if self.padded else ""
        return (
            f"causal_attention_float32_hq{self.q_heads}_hkv{self.kv_heads}"
            f"_d{self.head_dim}_dv{self.value_dim}{padded}_{phase}"
        )

    @property
    def name(self) -> str:
        """The kernel's name: its functions' names, joined."""
        return self.function_name("_".join(self.phases))


@CAUSAL_ATTENTION.register_lowering("tvm")
def lower_causal_attention(req: LoweringRequest) -> Kernel:
    """The kernels of one call site: prefill and/or decode, for the host or as CUDA source."""
    q, k, v, key_padding_mask, _scale = req.args
    shape = _shape(q, k, v, key_padding_mask)
    target = parse_target(req.target.tvm_target)
    kind = target.kind.name
    if kind == "llvm":
        return _lower_for_host(req, shape, target)
    if kind == "cuda":
        return _lower_for_cuda(req, shape)
    raise Unsupported(f"TVM causal_attention has no schedule for target kind {kind!r}")


def _shape(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_padding_mask: Optional[torch.Tensor]
) -> _Shape:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dtype != torch.float32:
            raise Unsupported(f"TVM causal_attention takes float32, not {t.dtype} ({name})")
        if t.dim() != 4:
            raise Unsupported(f"TVM causal_attention takes [B, H, S, D] tensors; {name} has {t.dim()} dims")
    sizes = {"Hq": q.shape[1], "Hkv": k.shape[1], "Hv": v.shape[1]}
    sizes |= {"D": q.shape[3], "Dk": k.shape[3], "Dv": v.shape[3]}
    symbolic = [n for n, s in sizes.items() if not isinstance(s, int)]
    if symbolic:
        raise Unsupported(f"TVM causal_attention needs static head counts and dims ({', '.join(symbolic)} symbolic)")
    if sizes["Dk"] != sizes["D"] or sizes["Hv"] != sizes["Hkv"] or sizes["Hq"] % sizes["Hkv"]:
        shapes = ", ".join(f"{n} {tuple(t.shape)}" for n, t in (("q", q), ("k", k), ("v", v)))
        raise Unsupported(f"TVM causal_attention: {shapes} do not match")
    if key_padding_mask is not None and key_padding_mask.dim() != 2:
        raise Unsupported(f"TVM causal_attention takes a [B, S] key padding mask, not a {key_padding_mask.dim()}-d one")
    queries = q.shape[2]
    return _Shape(
        sizes["Hq"], sizes["Hkv"], sizes["D"], sizes["Dv"],
        padded=key_padding_mask is not None,
        prefill=not isinstance(queries, int) or queries > 1,
        decode=not isinstance(queries, int) or queries == 1,
    )


# Host (llvm) ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _HostTiles:
    """Block and register-tile sizes of the host kernels for one shape and vector width. The
    register tiles default to this module's; `block_sparse_attention` shapes its own."""

    lanes: int  # fp32 lanes of a vector register
    query_block: int  # BQ
    out_vectors: int  # vectors of V columns per P @ V tile
    score_keys: int = _SCORE_KEYS  # keys per score tile
    score_vectors: int = _SCORE_VECTORS  # vectors of rows per score tile
    out_rows: int = _OUT_ROWS  # rows per P @ V tile

    @property
    def panel(self) -> int:
        """Rows per score panel: the lanes of the score tile."""
        return self.score_vectors * self.lanes


def _host_tiles(shape: _Shape, lanes: int) -> _HostTiles:
    if shape.head_dim % lanes or shape.value_dim % lanes:
        raise Unsupported(
            f"TVM causal_attention needs head dims that are multiples of {lanes} (the host's fp32 "
            f"lanes); D={shape.head_dim}, Dv={shape.value_dim}"
        )
    g, panel = shape.group, _SCORE_VECTORS * lanes
    if panel % _OUT_ROWS:
        raise Unsupported(f"TVM causal_attention has no host tiles for {lanes}-lane vectors")
    # G * BQ must fill whole panels: BQ a multiple of `step`.
    step = panel // math.gcd(g, panel)
    blocks = max(1, round(_QUERY_BLOCK / step))
    while blocks > 1 and g * step * blocks > _MAX_ROWS:
        blocks -= 1
    out_vectors = _OUT_VECTORS if shape.value_dim % (_OUT_VECTORS * lanes) == 0 else 1
    return _HostTiles(lanes, step * blocks, out_vectors)


def _lower_for_host(req: LoweringRequest, shape: _Shape, target: Any) -> Kernel:
    for name, t in zip("qkv", req.args[:3]):
        if t.device.type != "cpu":
            raise Unsupported(f"TVM llvm kernel for causal_attention on a {t.device.type} tensor ({name})")
    tiles = _host_tiles(shape, host_fp32_lanes(target))
    funcs = {}
    if shape.prefill:
        funcs["prefill"] = _prefill_primfunc(shape, tiles)
    if shape.decode:
        funcs["decode"] = _decode_primfunc(shape, tiles.lanes)
    source = "\n\n".join(f.script() for f in funcs.values())
    tiling = f"BQ={tiles.query_block}, BK={_KEY_BLOCK}, {tiles.lanes} lanes"
    if not req.run_here:
        return Kernel(shape.name, "tvm", source, note=f"{tiling}; not built: the caller asked for source only")
    built = {
        phase: build_primfunc(f, req.target.tvm_target, shape.function_name(phase)) for phase, f in funcs.items()
    }
    libraries = ", ".join(str(b.library) for b in built.values())
    runner = _host_runner(shape, built.get("prefill"), built.get("decode"))
    return Kernel(shape.name, "tvm", source, runner=runner, note=f"{tiling}; shared libraries: {libraries}")


def _exp_nonpositive(x: Any) -> Any:
    """exp(x) in fp32 for x <= 0 or NaN (a score minus a running max): Cephes' expf, without the
    overflow branch it cannot need; within 1.1e-7 relative of exp for x > -87 (measured). Below,
    where exp is under ~2e-38, and for the masked scores' -inf it is exactly 0: 2**n is built from
    exponent bits as 2**(n - 1) * 2, and for n = -126 (x clamped to `_EXP_LO`) those bits are 0.
    NaN propagates through the polynomial (the clamp keeps it: NaN < lo is false)."""
    from tvm import tirx

    lo = tirx.const(_EXP_LO, "float32")
    return _let("x", x, lambda x: _let("v", tirx.Select(x < lo, lo, x), exp_in_range))


def _lanes(reduce: Callable[[Any, Any], Any], buf: Any) -> Any:
    """`reduce` over the elements of a 1-d buffer (a vector's lanes), as a balanced tree."""
    values = [buf[i] for i in range(int(buf.shape[0]))]
    while len(values) > 1:
        pairs = [values[i : i + 2] for i in range(0, len(values), 2)]
        values = [reduce(*pair) if len(pair) == 2 else pair[0] for pair in pairs]
    return values[0]


def _max(a: Any, b: Any) -> Any:
    from tvm import tirx

    return tirx.max(a, b)


def key_block_macro(
    tiles: _HostTiles, rows: int, head_dim: int, value_dim: int, padded: bool, block_keys: int = _KEY_BLOCK
) -> Any:
    """The step both host prefills repeat (this one and `block_sparse_attention`'s): one block of
    BK = `block_keys` keys (a multiple of the score tile's keys) taken into a work item's `rows`
    rows (whole panels of the score tile), as the module docstring describes. The macro's
    arguments are the work item's buffers, the scratch its caller allocates once per item (so
    that no allocation sits in the key loop) and the block."""
    from tvm.script import tirx as T

    D, DV, L, BK = head_dim, value_dim, tiles.lanes, block_keys
    RK, NQV, WQ = tiles.score_keys, tiles.score_vectors, tiles.panel
    RP, NCV = tiles.out_rows, tiles.out_vectors
    WC = NCV * L
    PANELS = rows // WQ
    PADDED = padded
    exp = _exp_nonpositive
    masked_out = -math.inf

    @T.macro
    def key_block(
        k, v, pad, qt, out_acc, row_max, row_sum, last_key,  # inputs, the work item's state
        st, new_max, alpha, block_sum, s_tile, o_tile,  # scratch
        b, h, kb, keys, sk, diagonal,
    ):
        # `keys` valid keys from kb * BK on; `diagonal` (a Python bool) masks keys past a row's
        # `last_key`. Each panel of WQ rows: scores, online softmax, then P @ V.
        for pn in range(PANELS):
            r0: T.let = pn * WQ
            for kt in range(BK // RK):
                for rk in T.unroll(RK):
                    for a in T.unroll(NQV):
                        for l in T.vectorized(L):
                            s_tile[rk, a, l] = T.float32(0)
                for d in range(D):
                    for rk in T.unroll(RK):
                        # The clamp keeps the tail block's loads inside K (those scores are
                        # masked); it is invariant in d.
                        key: T.let = T.min(kb * BK + kt * RK + rk, sk - 1)
                        for a in T.unroll(NQV):
                            for l in T.vectorized(L):
                                s_tile[rk, a, l] = s_tile[rk, a, l] + k[b, h, key, d] * qt[d, r0 + a * L + l]
                for rk in T.unroll(RK):
                    for a in T.unroll(NQV):
                        for l in T.vectorized(L):
                            if PADDED:
                                st[kt * RK + rk, a * L + l] = T.Select(
                                    pad[b, T.min(kb * BK + kt * RK + rk, sk - 1)], s_tile[rk, a, l], T.float32(masked_out)
                                )
                            else:
                                st[kt * RK + rk, a * L + l] = s_tile[rk, a, l]
            for a in T.unroll(NQV):
                for l in T.vectorized(L):
                    new_max[a, l] = row_max[r0 + a * L + l]
            for j in range(BK):
                for a in T.unroll(NQV):
                    for l in T.vectorized(L):
                        if diagonal:
                            st[j, a * L + l] = T.Select(
                                kb * BK + j <= last_key[r0 + a * L + l], st[j, a * L + l], T.float32(masked_out)
                            )
                        new_max[a, l] = T.max(new_max[a, l], st[j, a * L + l])
            for a in T.unroll(NQV):
                for l in T.vectorized(L):
                    alpha[a * L + l] = exp(row_max[r0 + a * L + l] - new_max[a, l])
                    row_max[r0 + a * L + l] = new_max[a, l]
                    block_sum[a, l] = T.float32(0)
            for j in range(BK):
                for a in T.unroll(NQV):
                    for l in T.vectorized(L):
                        st[j, a * L + l] = exp(st[j, a * L + l] - new_max[a, l])
                        block_sum[a, l] = block_sum[a, l] + st[j, a * L + l]
            for a in T.unroll(NQV):
                for l in T.vectorized(L):
                    row_sum[r0 + a * L + l] = row_sum[r0 + a * L + l] * alpha[a * L + l] + block_sum[a, l]
            for rt in range(WQ // RP):
                for cp in range(DV // WC):
                    c0: T.let = cp * WC
                    for ri in T.unroll(RP):
                        for a in T.unroll(NCV):
                            for l in T.vectorized(L):
                                o_tile[ri, a, l] = out_acc[r0 + rt * RP + ri, c0 + a * L + l] * alpha[rt * RP + ri]
                    # Only the valid keys: V is not read past its end.
                    for j in range(keys):
                        key: T.let = kb * BK + j
                        for ri in T.unroll(RP):
                            for a in T.unroll(NCV):
                                for l in T.vectorized(L):
                                    o_tile[ri, a, l] = o_tile[ri, a, l] + st[j, rt * RP + ri] * v[b, h, key, c0 + a * L + l]
                    for ri in T.unroll(RP):
                        for a in T.unroll(NCV):
                            for l in T.vectorized(L):
                                out_acc[r0 + rt * RP + ri, c0 + a * L + l] = o_tile[ri, a, l]

    return key_block


def _prefill_primfunc(shape: _Shape, tiles: _HostTiles) -> Any:
    """The prefill PrimFunc (q, k, v[, key_padding_mask], out, scale) for the host; see the
    module docstring."""
    from tvm.script import tirx as T

    HQ, HKV, D, DV, G = shape.q_heads, shape.kv_heads, shape.head_dim, shape.value_dim, shape.group
    L, BQ, BK = tiles.lanes, tiles.query_block, _KEY_BLOCK
    ROWS = G * BQ
    RK, NQV, WQ = tiles.score_keys, tiles.score_vectors, tiles.panel
    RP, NCV = tiles.out_rows, tiles.out_vectors
    PADDED = shape.padded
    no_score = _NO_SCORE
    key_block = key_block_macro(tiles, ROWS, D, DV, PADDED)

    @T.macro
    def attend(q, k, v, pad, o, scale, nb, sq, sk):
        blocks: T.let = (sq + BQ - 1) // BQ
        offset: T.let = sk - sq  # position of query 0 among the keys
        for item in T.parallel(nb * HKV * blocks):
            b: T.let = item // (HKV * blocks)
            h: T.let = item // blocks % HKV
            zig: T.let = item % blocks
            qb: T.let = T.Select(zig % 2 == 0, zig // 2, blocks - 1 - zig // 2)
            q0: T.let = qb * BQ
            queries: T.let = T.min(sq - q0, BQ)
            # Global scope: TVM puts such buffers under 1 KiB on the stack, where LLVM keeps the
            # register tiles (s_tile, o_tile, new_max, block_sum) in registers; "local" ones would
            # get a heap workspace, which it cannot.
            qt = T.alloc_buffer((D, ROWS), "float32")
            out_acc = T.alloc_buffer((ROWS, DV), "float32")
            row_max = T.alloc_buffer((ROWS,), "float32")
            row_sum = T.alloc_buffer((ROWS,), "float32")
            last_key = T.alloc_buffer((ROWS,), "int32")
            st = T.alloc_buffer((BK, WQ), "float32")
            new_max = T.alloc_buffer((NQV, L), "float32")
            alpha = T.alloc_buffer((WQ,), "float32")
            block_sum = T.alloc_buffer((NQV, L), "float32")
            s_tile = T.alloc_buffer((RK, NQV, L), "float32")
            o_tile = T.alloc_buffer((RP, NCV, L), "float32")
            for r in range(ROWS):
                g: T.let = r // BQ
                i: T.let = r % BQ
                if i < queries:
                    for d in range(D):
                        qt[d, r] = q[b, h * G + g, q0 + i, d] * scale
                else:
                    for d in range(D):
                        qt[d, r] = T.float32(0)
                # Rows past the last query (zeros, never written out) see every key.
                last_key[r] = T.min(offset + q0 + i, sk - 1)
                row_max[r] = T.float32(no_score)
                row_sum[r] = T.float32(0)
                for c in T.vectorized(DV):
                    out_acc[r, c] = T.float32(0)
            # Blocks below the diagonal: their last key precedes the block's first query.
            below: T.let = (offset + q0 + 1) // BK
            # Blocks up to the one holding the block's last query; later ones are skipped.
            needed: T.let = (offset + q0 + queries + BK - 1) // BK
            for kb in range(below):
                key_block(
                    k, v, pad, qt, out_acc, row_max, row_sum, last_key,
                    st, new_max, alpha, block_sum, s_tile, o_tile,
                    b, h, kb, BK, sk, False,
                )
            for kb in range(below, needed):
                key_block(
                    k, v, pad, qt, out_acc, row_max, row_sum, last_key,
                    st, new_max, alpha, block_sum, s_tile, o_tile,
                    b, h, kb, T.min(BK, sk - kb * BK), sk, True,
                )
            for g in range(G):
                for i in range(queries):
                    row: T.let = g * BQ + i
                    for c in T.vectorized(DV):
                        if PADDED:
                            # A row whose keys are all padding gives 0, as SDPA does.
                            o[b, q0 + i, h * G + g, c] = T.Select(
                                row_sum[row] > T.float32(0), out_acc[row, c] / row_sum[row], T.float32(0)
                            )
                        else:
                            o[b, q0 + i, h * G + g, c] = out_acc[row, c] / row_sum[row]

    return _prefill_entry(attend, shape)


def _decode_primfunc(shape: _Shape, lanes: int) -> Any:
    """The split-KV decode PrimFunc (q, k, v[, key_padding_mask], out, scale) for the host, q and
    out with one query."""
    from tvm.script import tirx as T

    HQ, HKV, D, DV, G = shape.q_heads, shape.kv_heads, shape.head_dim, shape.value_dim, shape.group
    L, C = lanes, _DECODE_CHUNK
    # P @ V: a tile of query heads x 2 vectors of columns, heads as many of G as divide it (<= 6).
    RD = max(r for r in range(1, min(G, _OUT_ROWS) + 1) if G % r == 0)
    NCV = _OUT_VECTORS if DV % (_OUT_VECTORS * L) == 0 else 1
    WC = NCV * L
    PADDED = shape.padded
    exp = _exp_nonpositive
    no_score = _NO_SCORE
    masked_out = -math.inf
    lane_sum = _lanes
    add, maximum = operator.add, _max

    @T.macro
    def attend(q, k, v, pad, o, scale, nb, sk):
        chunks: T.let = (sk + C - 1) // C
        # Per (batch, query head, chunk): the chunk's max score, its sum of exp(score - max) and
        # its unnormalized output.
        part_max = T.alloc_buffer((nb * HQ * ((sk + C - 1) // C),), "float32")
        part_sum = T.alloc_buffer((nb * HQ * ((sk + C - 1) // C),), "float32")
        part_out = T.alloc_buffer((nb * HQ * ((sk + C - 1) // C), DV), "float32")
        for item in T.parallel(nb * HKV * chunks):
            b: T.let = item // (HKV * chunks)
            h: T.let = item // chunks % HKV
            c: T.let = item % chunks
            j0: T.let = c * C
            keys: T.let = T.min(C, sk - j0)
            qs = T.alloc_buffer((G, D), "float32")
            s = T.alloc_buffer((G, C), "float32")
            dot = T.alloc_buffer((L,), "float32")
            red = T.alloc_buffer((L,), "float32")
            o_tile = T.alloc_buffer((RD, NCV, L), "float32")
            for g in range(G):
                for d in T.vectorized(D):
                    qs[g, d] = q[b, h * G + g, 0, d] * scale
            # Scores: dot products along d in vector lanes, then across the lanes. The decode
            # is bound by reading K and V, not by these.
            for g in range(G):
                for j in range(keys):
                    for l in T.vectorized(L):
                        dot[l] = T.float32(0)
                    for dc in T.unroll(D // L):
                        for l in T.vectorized(L):
                            dot[l] = dot[l] + qs[g, dc * L + l] * k[b, h, j0 + j, dc * L + l]
                    if PADDED:
                        s[g, j] = T.Select(pad[b, j0 + j], lane_sum(add, dot), T.float32(masked_out))
                    else:
                        s[g, j] = lane_sum(add, dot)
                for j in range(keys, C):
                    s[g, j] = T.float32(masked_out)
            for g in range(G):
                partial: T.let = (b * HQ + h * G + g) * chunks + c
                for l in T.vectorized(L):
                    red[l] = T.float32(no_score)
                for jc in range(C // L):
                    for l in T.vectorized(L):
                        red[l] = T.max(red[l], s[g, jc * L + l])
                top: T.let = lane_sum(maximum, red)
                for l in T.vectorized(L):
                    red[l] = T.float32(0)
                for jc in range(C // L):
                    for l in T.vectorized(L):
                        s[g, jc * L + l] = exp(s[g, jc * L + l] - top)
                        red[l] = red[l] + s[g, jc * L + l]
                part_max[partial] = top
                part_sum[partial] = lane_sum(add, red)
            for gt in range(G // RD):
                for cp in range(DV // WC):
                    c0: T.let = cp * WC
                    for r in T.unroll(RD):
                        for a in T.unroll(NCV):
                            for l in T.vectorized(L):
                                o_tile[r, a, l] = T.float32(0)
                    for j in range(keys):
                        key: T.let = j0 + j
                        for r in T.unroll(RD):
                            for a in T.unroll(NCV):
                                for l in T.vectorized(L):
                                    o_tile[r, a, l] = o_tile[r, a, l] + s[gt * RD + r, j] * v[b, h, key, c0 + a * L + l]
                    for r in T.unroll(RD):
                        partial: T.let = (b * HQ + h * G + gt * RD + r) * chunks + c
                        for a in T.unroll(NCV):
                            for l in T.vectorized(L):
                                part_out[partial, c0 + a * L + l] = o_tile[r, a, l]
        # Serial: ~Hq * chunks * Dv FMAs, less than a second fork-join of the thread pool costs.
        for head in T.serial(nb * HQ):
            top = T.alloc_buffer((1,), "float32")
            total = T.alloc_buffer((1,), "float32")
            acc = T.alloc_buffer((DV,), "float32")
            top[0] = T.float32(no_score)
            for c in range(chunks):
                top[0] = T.max(top[0], part_max[head * chunks + c])
            total[0] = T.float32(0)
            for d in T.vectorized(DV):
                acc[d] = T.float32(0)
            for c in range(chunks):
                w: T.let = exp(part_max[head * chunks + c] - top[0])
                total[0] = total[0] + w * part_sum[head * chunks + c]
                for d in T.vectorized(DV):
                    acc[d] = acc[d] + w * part_out[head * chunks + c, d]
            for d in T.vectorized(DV):
                if PADDED:
                    o[head // HQ, 0, head % HQ, d] = T.Select(
                        total[0] > T.float32(0), acc[d] / total[0], T.float32(0)
                    )
                else:
                    o[head // HQ, 0, head % HQ, d] = acc[d] / total[0]

    return _decode_entry(attend, shape)


def _host_runner(
    shape: _Shape, prefill: Optional[Callable[..., Any]], decode: Optional[Callable[..., Any]]
) -> Callable[..., torch.Tensor]:
    def run(
        q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_padding_mask: Optional[torch.Tensor], scale: float
    ) -> torch.Tensor:
        kernel = decode if q.shape[2] == 1 else prefill
        out_numel = q.shape[0] * q.shape[2] * shape.q_heads * shape.value_dim
        if kernel is None or not _kernel_takes(shape, q, k, v, key_padding_mask, out_numel):
            return CAUSAL_ATTENTION.reference(q, k, v, key_padding_mask, scale)
        inputs = [as_kernel_input(q), as_kernel_input(k), as_kernel_input(v)]
        if shape.padded:
            # The whole [B, >= Sk] mask: the kernels read its first Sk columns in place.
            inputs.append(as_kernel_input(key_padding_mask.to(torch.bool)))
        # The op's output layout: the kernels write its [B, Sq, Hq, Dv] memory order directly.
        out = output_like(q, v)
        kernel(*inputs, out.transpose(1, 2), float(scale))
        return out

    return run


def _kernel_takes(
    shape: _Shape,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_padding_mask: Optional[torch.Tensor],
    out_numel: int,
) -> bool:
    """Whether the kernels compute this call; else the reference does (and raises the op's errors,
    such as more queries than keys)."""
    keys = k.shape[2]
    sizes = [q.numel(), k.numel(), v.numel(), out_numel]
    if shape.padded:
        # The mask the kernels read: one row per batch entry, at least Sk long.
        mask = key_padding_mask
        mask_fits = mask is not None and mask.dim() == 2 and mask.shape[0] == q.shape[0] and mask.shape[1] >= keys
    else:
        mask_fits = key_padding_mask is None
    return q.shape[2] <= keys and min(sizes) > 0 and max(sizes) < 2**31 and mask_fits  # int32 indices


# CUDA (read-only) -------------------------------------------------------------------------------


def _lower_for_cuda(req: LoweringRequest, shape: _Shape) -> Kernel:
    funcs = []
    if shape.prefill:
        funcs.append(("prefill", _prefill_cuda_primfunc(shape)))
    if shape.decode:
        funcs.append(("decode", _decode_cuda_primfunc(shape)))
    try:
        sources = [device_source(f, req.target.tvm_target, shape.function_name(phase)) for phase, f in funcs]
    except Exception as exc:  # noqa: BLE001 - any toolchain failure leaves the TIR to read
        script = "\n\n".join(f.script() for _, f in funcs)
        return Kernel(shape.name, "tvm", script, note=f"{_NOT_RUN}; CUDA codegen failed here ({exc})")
    return Kernel(shape.name, "tvm", "\n\n".join(sources), note=_NOT_RUN, language="cuda")


def _prefill_cuda_primfunc(shape: _Shape) -> Any:
    """Prefill for CUDA: a thread block per (batch, query head, 64 queries), a thread per query;
    the block stages K/V tiles in shared memory up to its last query's position (the causal skip)
    and each thread keeps its row's online softmax and output in registers."""
    from tvm.script import tirx as T

    HQ, HKV, D, DV, G = shape.q_heads, shape.kv_heads, shape.head_dim, shape.value_dim, shape.group
    BQ, BK = _CUDA_QUERY_BLOCK, _CUDA_KEY_BLOCK
    PADDED = shape.padded
    # `#pragma unroll` for nvcc rather than TVM unrolling the loops itself: the same registers,
    # and source that stays readable.
    pragma = {"pragma_unroll_explicit": False}
    no_score = _NO_SCORE
    masked_out = -math.inf

    @T.macro
    def attend(q, k, v, pad, o, scale, nb, sq, sk):
        for qb in T.thread_binding((sq + BQ - 1) // BQ, thread="blockIdx.x"):
            for bh in T.thread_binding(nb * HQ, thread="blockIdx.y"):
                for tx in T.thread_binding(BQ, thread="threadIdx.x"):
                    k_tile = T.alloc_buffer((BK, D), "float32", scope="shared")
                    v_tile = T.alloc_buffer((BK, DV), "float32", scope="shared")
                    # Per-thread arrays indexed by unrolled loops only, so they stay in registers.
                    q_row = T.alloc_buffer((D,), "float32", scope="local")
                    acc = T.alloc_buffer((DV,), "float32", scope="local")
                    s = T.alloc_buffer((BK,), "float32", scope="local")
                    # Running max and sum; the tile's max and sum; the rescale exp(old max - new max).
                    stats = T.alloc_buffer((5,), "float32", scope="local")
                    b: T.let = bh // HQ
                    h: T.let = bh % HQ // G
                    i: T.let = qb * BQ + tx
                    position: T.let = sk - sq + i
                    # Keys up to the block's last query: later tiles are never loaded.
                    last: T.let = sk - sq + T.min(qb * BQ + BQ, sq) - 1
                    for d in T.unroll(D, annotations=pragma):
                        q_row[d] = T.if_then_else(i < sq, q[b, bh % HQ, i, d] * scale, T.float32(0))
                    for d in T.unroll(DV, annotations=pragma):
                        acc[d] = T.float32(0)
                    stats[0] = T.float32(no_score)
                    stats[1] = T.float32(0)
                    for kb in range(last // BK + 1):
                        # The block loads the tiles together, a row of D (Dv) floats per step.
                        for e in range(BK * D // BQ):
                            j: T.let = (e * BQ + tx) // D
                            d: T.let = (e * BQ + tx) % D
                            k_tile[j, d] = T.if_then_else(kb * BK + j < sk, k[b, h, kb * BK + j, d], T.float32(0))
                        for e in range(BK * DV // BQ):
                            j: T.let = (e * BQ + tx) // DV
                            d: T.let = (e * BQ + tx) % DV
                            v_tile[j, d] = T.if_then_else(kb * BK + j < sk, v[b, h, kb * BK + j, d], T.float32(0))
                        stats[2] = stats[0]
                        for j in T.unroll(BK, annotations=pragma):
                            s[j] = T.float32(0)
                            for d in T.unroll(D, annotations=pragma):
                                s[j] = s[j] + q_row[d] * k_tile[j, d]
                            if PADDED:
                                s[j] = T.Select(
                                    kb * BK + j <= position and pad[b, T.min(kb * BK + j, sk - 1)],
                                    s[j],
                                    T.float32(masked_out),
                                )
                            else:
                                s[j] = T.Select(kb * BK + j <= position, s[j], T.float32(masked_out))
                            stats[2] = T.max(stats[2], s[j])
                        stats[3] = T.float32(0)
                        for j in T.unroll(BK, annotations=pragma):
                            s[j] = T.exp(s[j] - stats[2])
                            stats[3] = stats[3] + s[j]
                        stats[4] = T.exp(stats[0] - stats[2])
                        for d in T.unroll(DV, annotations=pragma):
                            acc[d] = acc[d] * stats[4]
                            for j in T.unroll(BK, annotations=pragma):
                                acc[d] = acc[d] + s[j] * v_tile[j, d]
                        stats[1] = stats[1] * stats[4] + stats[3]
                        stats[0] = stats[2]
                    if i < sq:
                        for d in T.unroll(DV, annotations=pragma):
                            if PADDED:
                                o[b, i, bh % HQ, d] = T.Select(
                                    stats[1] > T.float32(0), acc[d] / stats[1], T.float32(0)
                                )
                            else:
                                o[b, i, bh % HQ, d] = acc[d] / stats[1]

    return _prefill_entry(attend, shape)


def _decode_cuda_primfunc(shape: _Shape) -> Any:
    """Split-KV decode for CUDA: a thread block per (batch, query head, chunk of keys) with a
    thread per output column; the chunk's scores live in shared memory. A second kernel combines
    a head's chunks."""
    from tvm.script import tirx as T

    HQ, HKV, D, DV, G = shape.q_heads, shape.kv_heads, shape.head_dim, shape.value_dim, shape.group
    C = _DECODE_CHUNK
    PADDED = shape.padded
    no_score = _NO_SCORE
    masked_out = -math.inf

    @T.macro
    def attend(q, k, v, pad, o, scale, nb, sk):
        chunks: T.let = (sk + C - 1) // C
        part_max = T.alloc_buffer((nb * HQ * ((sk + C - 1) // C),), "float32")
        part_sum = T.alloc_buffer((nb * HQ * ((sk + C - 1) // C),), "float32")
        part_out = T.alloc_buffer((nb * HQ * ((sk + C - 1) // C), DV), "float32")
        for c in T.thread_binding(chunks, thread="blockIdx.x"):
            for bh in T.thread_binding(nb * HQ, thread="blockIdx.y"):
                for tx in T.thread_binding(DV, thread="threadIdx.x"):
                    s = T.alloc_buffer((C,), "float32", scope="shared")
                    stats = T.alloc_buffer((3,), "float32", scope="local")  # max, sum, output
                    b: T.let = bh // HQ
                    h: T.let = bh % HQ // G
                    # Scores: a key per thread in turn, the dot product in a register, so that
                    # shared memory is written once per key (the barrier then follows the loop).
                    for t in range((C + DV - 1) // DV):
                        key: T.let = c * C + t * DV + tx
                        stats[2] = T.float32(0)
                        for d in range(D):
                            stats[2] = stats[2] + q[b, bh % HQ, 0, d] * k[b, h, T.min(key, sk - 1), d]
                        if t * DV + tx < C:
                            if PADDED:
                                s[t * DV + tx] = T.Select(
                                    key < sk and pad[b, T.min(key, sk - 1)], stats[2] * scale, T.float32(masked_out)
                                )
                            else:
                                s[t * DV + tx] = T.Select(key < sk, stats[2] * scale, T.float32(masked_out))
                    # Every thread reduces the chunk's scores itself: C reads of shared memory.
                    stats[0] = T.float32(no_score)
                    for j in range(C):
                        stats[0] = T.max(stats[0], s[j])
                    stats[1] = T.float32(0)
                    stats[2] = T.float32(0)
                    for j in range(T.min(C, sk - c * C)):
                        stats[1] = stats[1] + T.exp(s[j] - stats[0])
                        stats[2] = stats[2] + T.exp(s[j] - stats[0]) * v[b, h, c * C + j, tx]
                    part_out[bh * chunks + c, tx] = stats[2]
                    if tx == 0:
                        part_max[bh * chunks + c] = stats[0]
                        part_sum[bh * chunks + c] = stats[1]
        for bh in T.thread_binding(nb * HQ, thread="blockIdx.x"):
            for tx in T.thread_binding(DV, thread="threadIdx.x"):
                stats = T.alloc_buffer((3,), "float32", scope="local")  # max, sum, output
                stats[0] = T.float32(no_score)
                for c in range(chunks):
                    stats[0] = T.max(stats[0], part_max[bh * chunks + c])
                stats[1] = T.float32(0)
                stats[2] = T.float32(0)
                for c in range(chunks):
                    w: T.let = T.exp(part_max[bh * chunks + c] - stats[0])
                    stats[1] = stats[1] + w * part_sum[bh * chunks + c]
                    stats[2] = stats[2] + w * part_out[bh * chunks + c, tx]
                if PADDED:
                    o[bh // HQ, 0, bh % HQ, tx] = T.Select(stats[1] > T.float32(0), stats[2] / stats[1], T.float32(0))
                else:
                    o[bh // HQ, 0, bh % HQ, tx] = stats[2] / stats[1]

    return _decode_entry(attend, shape)


# Entry points ----------------------------------------------------------------------------------
# Each kernel body is a macro `attend(q, k, v, pad, o, scale, nb, [sq,] sk)`; these bind it to the
# PrimFunc's buffers (batch and lengths symbolic), with or without the padding mask.


def _prefill_entry(attend: Any, shape: _Shape) -> Any:
    from tvm.script import tirx as T

    HQ, HKV, D, DV = shape.q_heads, shape.kv_heads, shape.head_dim, shape.value_dim
    if shape.padded:

        @T.prim_func
        def prefill_padded(
            q_h: T.handle, k_h: T.handle, v_h: T.handle, pad_h: T.handle, o_h: T.handle, scale: T.float32
        ):
            T.func_attr({"tir.noalias": True})
            nb = T.int32()
            sq = T.int32()
            sk = T.int32()
            mask_len = T.int32()
            q = T.match_buffer(q_h, (nb, HQ, sq, D), "float32")
            k = T.match_buffer(k_h, (nb, HKV, sk, D), "float32")
            v = T.match_buffer(v_h, (nb, HKV, sk, DV), "float32")
            pad = T.match_buffer(pad_h, (nb, mask_len), "bool")
            o = T.match_buffer(o_h, (nb, sq, HQ, DV), "float32")
            attend(q, k, v, pad, o, scale, nb, sq, sk)

        return prefill_padded

    @T.prim_func
    def prefill(q_h: T.handle, k_h: T.handle, v_h: T.handle, o_h: T.handle, scale: T.float32):
        T.func_attr({"tir.noalias": True})
        nb = T.int32()
        sq = T.int32()
        sk = T.int32()
        q = T.match_buffer(q_h, (nb, HQ, sq, D), "float32")
        k = T.match_buffer(k_h, (nb, HKV, sk, D), "float32")
        v = T.match_buffer(v_h, (nb, HKV, sk, DV), "float32")
        o = T.match_buffer(o_h, (nb, sq, HQ, DV), "float32")
        attend(q, k, v, None, o, scale, nb, sq, sk)

    return prefill


def _decode_entry(attend: Any, shape: _Shape) -> Any:
    from tvm.script import tirx as T

    HQ, HKV, D, DV = shape.q_heads, shape.kv_heads, shape.head_dim, shape.value_dim
    if shape.padded:

        @T.prim_func
        def decode_padded(
            q_h: T.handle, k_h: T.handle, v_h: T.handle, pad_h: T.handle, o_h: T.handle, scale: T.float32
        ):
            T.func_attr({"tir.noalias": True})
            nb = T.int32()
            sk = T.int32()
            mask_len = T.int32()
            q = T.match_buffer(q_h, (nb, HQ, 1, D), "float32")
            k = T.match_buffer(k_h, (nb, HKV, sk, D), "float32")
            v = T.match_buffer(v_h, (nb, HKV, sk, DV), "float32")
            pad = T.match_buffer(pad_h, (nb, mask_len), "bool")
            o = T.match_buffer(o_h, (nb, 1, HQ, DV), "float32")
            attend(q, k, v, pad, o, scale, nb, sk)

        return decode_padded

    @T.prim_func
    def decode(q_h: T.handle, k_h: T.handle, v_h: T.handle, o_h: T.handle, scale: T.float32):
        T.func_attr({"tir.noalias": True})
        nb = T.int32()
        sk = T.int32()
        q = T.match_buffer(q_h, (nb, HQ, 1, D), "float32")
        k = T.match_buffer(k_h, (nb, HKV, sk, D), "float32")
        v = T.match_buffer(v_h, (nb, HKV, sk, DV), "float32")
        o = T.match_buffer(o_h, (nb, 1, HQ, DV), "float32")
        attend(q, k, v, None, o, scale, nb, sk)

    return decode
