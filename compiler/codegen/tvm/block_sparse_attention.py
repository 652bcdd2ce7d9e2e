"""The TVM lowering of `compiler::block_sparse_attention`: causal prefill over a block layout, for
the host.

Part of the codegen step (capture -> passes -> codegen -> compiled module). The op is causal
attention in which query block qb of query head h (batch entry b) sees only the key blocks
`kv_blocks[b, h, qb, :kv_counts[b, h, qb]]` (see the op's docstring). The kernel is the dense
host prefill of `attention` (Q packed transposed, scores as register tiles with rows along the
vector lanes, lane-parallel online softmax, Cephes exp; its `key_block_macro` is the step both
repeat) with the key loop driven by the layout:

- a work item is (batch entry, query head, query block), the block being the layout's own
  (`block_size`, 64 or 32): every query head has its own layout, so the G query heads of a KV
  head visit different blocks and cannot share an item as they do in the dense kernel;
- the register tiles are shaped for 64 (or 32) rows: `attention`'s score panels of 3 vectors
  (24 rows at 8 lanes) would pad 64 rows to 72, an eighth of the work wasted (measured 8-14%
  slower on a full layout at S = 4096). Scores take 2 keys x 4 vectors of rows (32-row panels),
  P @ V 4 rows x 2 vectors of columns: 8 accumulators, which keep a core with two FMA pipes of
  latency 4 (Zen 3, the 2-core host) busy;
- the item visits the first `kv_counts` entries of its row of `kv_blocks` only: blocks below the
  diagonal take the unmasked path, the diagonal block (the last entry when listed) the masked
  one. Entries that break the contract (not increasing, negative, past the diagonal, or a count
  past M) are skipped rather than read out of bounds: a layout that keeps the contract gets the
  blocks the reference sees, and no layout makes the kernel touch memory outside its tensors;
- a row that sees no key (its block lists none) gives 0, as the op's contract says;
- items run on TVM's thread pool in an order the runner computes from `kv_counts` at each call:
  heaviest first, dealt to the threads in snake order (0, 1, ..., T-1, T-1, ..., 0, ...). TVM
  gives each of its T threads a contiguous share of a parallel loop, so the kernel's loop runs
  over T shares of equal length (slots past a thread's items hold -1 and are skipped), and each
  share holds as much work as the others whatever the layout: counts grow with qb for causal
  patterns, vary per head for MInference or FlexPrefill, and are constant for streaming ones.

Batch, sequence length and M are symbolic, so one build serves every length; head counts, head
dims and the block size are fixed per build, fp32 only.

What the kernel does not take falls back to the op's reference: at lowering time (`Unsupported`:
fp16/bf16, symbolic heads or head dims, head dims that are not a multiple of the vector width,
block sizes other than 64 and 32, non-CPU tensors, targets other than `llvm`: Triton serves CUDA)
or at run time in the runner: shapes the build does not fit (the reference then raises the op's
error), empty tensors, and tensors whose element count needs 64-bit indices.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from compiler.codegen.tvm.attention import _NO_SCORE, _OUT_VECTORS, _HostTiles, key_block_macro
from compiler.codegen.tvm.build import BuiltFunction, as_kernel_input, build_primfunc, host_fp32_lanes, parse_target
from compiler.errors import Unsupported
from compiler.ops import block_sparse_attention as BLOCK_SPARSE_ATTENTION
from compiler.ops.block_sparse_attention import num_blocks
from compiler.ops.causal_attention import effective_padding, output_like
from compiler.ops.registry import Kernel, LoweringRequest

# Layout block sizes the kernel takes: the block is both the item's queries and the key block of
# `key_block_macro`, so it must be whole score panels and whole score tiles of keys.
_BLOCK_SIZES = (64, 32)
# Register tiles (see the module docstring): score panels of up to 4 vectors of rows, with as
# many keys as make 8 accumulators; P @ V tiles of 4 rows.
_SCORE_VECTORS = 4
_SCORE_ACCUMULATORS = 8
_OUT_ROWS = 4


@dataclass(frozen=True)
class _Shape:
    """What a build fixes: head counts, head dims and the layout's block size."""

    q_heads: int
    kv_heads: int
    head_dim: int
    value_dim: int
    block_size: int

    @property
    def group(self) -> int:
        return self.q_heads // self.kv_heads

    @property
    def name(self) -> str:
        return (
            f"block_sparse_attention_float32_hq{self.q_heads}_hkv{self.kv_heads}"
            f"_d{self.head_dim}_dv{self.value_dim}_block{self.block_size}"
        )


@BLOCK_SPARSE_ATTENTION.register_lowering("tvm")
def lower_block_sparse_attention(req: LoweringRequest) -> Kernel:
    """The host kernel of one call site; other targets keep the reference."""
    q, k, v, kv_blocks, kv_counts, _scale, block_size, _density = req.args[:8]
    shape = _shape(q, k, v, kv_blocks, kv_counts, block_size)
    target = parse_target(req.target.tvm_target)
    kind = target.kind.name
    if kind != "llvm":
        raise Unsupported(f"TVM block_sparse_attention has no schedule for target kind {kind!r}")
    for name, t in zip(("q", "k", "v", "kv_blocks", "kv_counts"), req.args[:5]):
        if t.device.type != "cpu":
            raise Unsupported(f"TVM llvm kernel for block_sparse_attention on a {t.device.type} tensor ({name})")
    tiles = _host_tiles(shape, host_fp32_lanes(target))
    func = _primfunc(shape, tiles)
    source = func.script()
    tiling = f"block {shape.block_size}, score tile {tiles.score_keys} x {tiles.panel}, {tiles.lanes} lanes"
    if not req.run_here:
        return Kernel(shape.name, "tvm", source, note=f"{tiling}; not built: the caller asked for source only")
    built = build_primfunc(func, req.target.tvm_target, shape.name)
    runner = _host_runner(shape, built)
    return Kernel(shape.name, "tvm", source, runner=runner, note=f"{tiling}; shared library: {built.library}")


def _shape(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_blocks: torch.Tensor, kv_counts: torch.Tensor, block_size: Any
) -> _Shape:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dtype != torch.float32:
            raise Unsupported(f"TVM block_sparse_attention takes float32, not {t.dtype} ({name})")
        if t.dim() != 4:
            raise Unsupported(f"TVM block_sparse_attention takes [B, H, S, D] tensors; {name} has {t.dim()} dims")
    for name, t, dims in (("kv_blocks", kv_blocks, 4), ("kv_counts", kv_counts, 3)):
        if t.dtype != torch.int32 or t.dim() != dims:
            raise Unsupported(f"TVM block_sparse_attention takes a {dims}-d int32 {name}, not {t.dim()}-d {t.dtype}")
    if block_size not in _BLOCK_SIZES:
        allowed = " or ".join(map(str, _BLOCK_SIZES))
        raise Unsupported(f"TVM block_sparse_attention takes blocks of {allowed} positions, not {block_size}")
    sizes = {"Hq": q.shape[1], "Hkv": k.shape[1], "Hv": v.shape[1], "D": q.shape[3], "Dk": k.shape[3], "Dv": v.shape[3]}
    symbolic = [n for n, s in sizes.items() if not isinstance(s, int)]
    if symbolic:
        raise Unsupported(
            f"TVM block_sparse_attention needs static head counts and dims ({', '.join(symbolic)} symbolic)"
        )
    if sizes["Dk"] != sizes["D"] or sizes["Hv"] != sizes["Hkv"] or sizes["Hq"] % sizes["Hkv"]:
        shapes = ", ".join(f"{n} {tuple(t.shape)}" for n, t in (("q", q), ("k", k), ("v", v)))
        raise Unsupported(f"TVM block_sparse_attention: {shapes} do not match")
    return _Shape(sizes["Hq"], sizes["Hkv"], sizes["D"], sizes["Dv"], int(block_size))


def _host_tiles(shape: _Shape, lanes: int) -> _HostTiles:
    """The item's queries are the layout's block; the tiles are the module docstring's."""
    if shape.head_dim % lanes or shape.value_dim % lanes:
        raise Unsupported(
            f"TVM block_sparse_attention needs head dims that are multiples of {lanes} (the host's "
            f"fp32 lanes); D={shape.head_dim}, Dv={shape.value_dim}"
        )
    out_vectors = _OUT_VECTORS if shape.value_dim % (_OUT_VECTORS * lanes) == 0 else 1
    # A panel divides the block: both are powers of two, the panel at most the block.
    score_vectors = min(_SCORE_VECTORS, shape.block_size // lanes)
    return _HostTiles(
        lanes, shape.block_size, out_vectors,
        score_keys=_SCORE_ACCUMULATORS // score_vectors, score_vectors=score_vectors, out_rows=_OUT_ROWS,
    )


def _primfunc(shape: _Shape, tiles: _HostTiles) -> Any:
    """The PrimFunc (q, k, v, kv_blocks, kv_counts, order, out, scale); see the module docstring."""
    from tvm.script import tirx as T

    HQ, HKV, D, DV, G = shape.q_heads, shape.kv_heads, shape.head_dim, shape.value_dim, shape.group
    L, BQ = tiles.lanes, tiles.query_block
    BK = BQ  # a layout block is the key block too
    RK, NQV, WQ = tiles.score_keys, tiles.score_vectors, tiles.panel
    RP, NCV = tiles.out_rows, tiles.out_vectors
    no_score = _NO_SCORE
    key_block = key_block_macro(tiles, BQ, D, DV, padded=False, block_keys=BK)

    @T.prim_func
    def block_sparse_attention(
        q_h: T.handle, k_h: T.handle, v_h: T.handle, blocks_h: T.handle, counts_h: T.handle,
        order_h: T.handle, o_h: T.handle, scale: T.float32,
    ):
        T.func_attr({"tir.noalias": True})
        nb = T.int32()
        s = T.int32()
        nqb = T.int32()
        m = T.int32()
        slots = T.int32()
        q = T.match_buffer(q_h, (nb, HQ, s, D), "float32")
        k = T.match_buffer(k_h, (nb, HKV, s, D), "float32")
        v = T.match_buffer(v_h, (nb, HKV, s, DV), "float32")
        kv_blocks = T.match_buffer(blocks_h, (nb, HQ, nqb, m), "int32")
        kv_counts = T.match_buffer(counts_h, (nb, HQ, nqb), "int32")
        order = T.match_buffer(order_h, (slots,), "int32")
        o = T.match_buffer(o_h, (nb, s, HQ, DV), "float32")
        for slot in T.parallel(slots):
            item: T.let = order[slot]
            if item >= 0:
                b: T.let = item // (HQ * nqb)
                h: T.let = item // nqb % HQ
                qb: T.let = item % nqb
                q0: T.let = qb * BQ
                queries: T.let = T.min(s - q0, BQ)
                # Global scope, as in `attention`: the register tiles stay on the stack.
                qt = T.alloc_buffer((D, BQ), "float32")
                out_acc = T.alloc_buffer((BQ, DV), "float32")
                row_max = T.alloc_buffer((BQ,), "float32")
                row_sum = T.alloc_buffer((BQ,), "float32")
                last_key = T.alloc_buffer((BQ,), "int32")
                st = T.alloc_buffer((BK, WQ), "float32")
                new_max = T.alloc_buffer((NQV, L), "float32")
                alpha = T.alloc_buffer((WQ,), "float32")
                block_sum = T.alloc_buffer((NQV, L), "float32")
                s_tile = T.alloc_buffer((RK, NQV, L), "float32")
                o_tile = T.alloc_buffer((RP, NCV, L), "float32")
                visited = T.alloc_buffer((1,), "int32")  # the last block taken
                for r in range(BQ):
                    if r < queries:
                        for d in range(D):
                            qt[d, r] = q[b, h, q0 + r, d] * scale
                    else:
                        for d in range(D):
                            qt[d, r] = T.float32(0)
                    # Rows past the last query (zeros, never written out) see every key.
                    last_key[r] = T.min(q0 + r, s - 1)
                    row_max[r] = T.float32(no_score)
                    row_sum[r] = T.float32(0)
                    for c in T.vectorized(DV):
                        out_acc[r, c] = T.float32(0)
                visited[0] = -1
                # A count past M reads no further than M; a negative one visits nothing.
                for i in range(T.min(kv_counts[b, h, qb], m)):
                    kb: T.let = kv_blocks[b, h, qb, i]
                    if visited[0] < kb and kb <= qb:
                        visited[0] = kb
                        if kb < qb:
                            key_block(
                                k, v, None, qt, out_acc, row_max, row_sum, last_key,
                                st, new_max, alpha, block_sum, s_tile, o_tile,
                                b, h // G, kb, BK, s, False,
                            )
                        else:
                            key_block(
                                k, v, None, qt, out_acc, row_max, row_sum, last_key,
                                st, new_max, alpha, block_sum, s_tile, o_tile,
                                b, h // G, kb, T.min(BK, s - kb * BK), s, True,
                            )
                for i in range(queries):
                    for c in T.vectorized(DV):
                        # A row that saw no key has a sum of 0 (and an output of 0); a NaN sum
                        # (a NaN among the keys the row sees) stays NaN.
                        o[b, q0 + i, h, c] = T.Select(
                            row_sum[i] == T.float32(0), T.float32(0), out_acc[i, c] / row_sum[i]
                        )

    return block_sparse_attention


def _host_runner(shape: _Shape, kernel: BuiltFunction) -> Callable[..., torch.Tensor]:
    def run(
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
        padded = effective_padding(key_padding_mask, q.shape[2]) is not None
        if padded or not _kernel_takes(shape, q, k, v, kv_blocks, kv_counts, block_size):
            return BLOCK_SPARSE_ATTENTION.reference(q, k, v, kv_blocks, kv_counts, scale, block_size, expected_density, key_padding_mask)
        inputs = [as_kernel_input(t) for t in (q, k, v, kv_blocks, kv_counts)]
        order = _item_order(kv_counts, kv_blocks.shape[-1], _pool_threads())
        # The op's output layout: the kernel writes its [B, S, Hq, Dv] memory order directly.
        out = output_like(q, v)
        kernel(*inputs, order, out.transpose(1, 2), float(scale))
        return out

    return run


def _kernel_takes(
    shape: _Shape,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_blocks: torch.Tensor,
    kv_counts: torch.Tensor,
    block_size: int,
) -> bool:
    """Whether the kernel computes this call; else the reference does (and raises the op's errors)."""
    if q.dim() != 4 or kv_blocks.dim() != 4 or block_size != shape.block_size:
        return False
    if kv_blocks.dtype != torch.int32 or kv_counts.dtype != torch.int32:
        return False
    b, s = q.shape[0], q.shape[2]
    nqb = num_blocks(s, block_size)
    fits = (
        tuple(q.shape) == (b, shape.q_heads, s, shape.head_dim)
        and tuple(k.shape) == (b, shape.kv_heads, s, shape.head_dim)
        and tuple(v.shape) == (b, shape.kv_heads, s, shape.value_dim)
        and tuple(kv_blocks.shape[:3]) == (b, shape.q_heads, nqb)
        and tuple(kv_counts.shape) == (b, shape.q_heads, nqb)
    )
    sizes = [q.numel(), k.numel(), v.numel(), kv_blocks.numel(), b * s * shape.q_heads * shape.value_dim]
    return fits and min(sizes) > 0 and max(sizes) < 2**31  # int32 indices


def _pool_threads() -> int:
    """Threads of TVM's pool: how many contiguous shares its parallel loops are cut into."""
    import tvm

    return tvm.runtime.num_threads()


def _item_order(kv_counts: torch.Tensor, max_count: int, threads: int) -> torch.Tensor:
    """The kernel's parallel slots -> work items (-1 for none): items heaviest first (work grows
    with the blocks visited), dealt in snake order to `threads` shares of equal length, share t
    being slots [t * rounds, (t + 1) * rounds). Snake dealing gives each share one item of every
    round of T, alternately from either end of the round, so the shares' totals differ by at
    most the heaviest item's work."""
    work = kv_counts.reshape(-1).clamp(0, max_count)
    items = work.numel()
    rounds = -(-items // threads)
    rank = torch.arange(items)
    turn, seat = rank // threads, rank % threads
    share = torch.where(turn % 2 == 0, seat, threads - 1 - seat)
    order = torch.full((threads * rounds,), -1, dtype=torch.int32)
    order[share * rounds + turn] = torch.argsort(work, descending=True, stable=True).to(torch.int32)
    return order
