"""The Triton lowering of `compiler::quantized_kv_attention`: split-KV decode over a KIVI cache.

Part of the codegen step, built like the decode path of attention.py (flash-decoding), whose
pieces it shares: the step over one full-precision K/V block (`attention.KEY_BLOCK_SOURCE`, for
the residual), the combine kernel that merges the splits (`attention_decode_combine_kernel`,
taken from attention.py's text), the launch constants, the split heuristic and the checks of
where a kernel runs. The kernel text is those pieces plus the program below; the lowering hands
it to the artifact folder whole and the runner imports it (`runtime.load_module`).

The cache format is kv_quant.py's: packed uint8 codes (`8 // bits` a byte, code j of byte i is
element i * (8 // bits) + j), keys quantized per channel over groups of K_GROUP tokens, values
per token over groups of V_GROUP channels, fp16 scale and min (x = code * scale + min), then Nr
full-precision residual keys after the Nq quantized ones. bits and the two group sizes are
launch constants (one kernel per format); Nq and Nr are runtime arguments, either may be 0.

Decode step (`quantized_kv_attention_split_kernel`), Sq == 1. One program per (batch, kv head)
takes all Hq / Hkv query heads of the GQA group (the rows of one BLOCK_R tile, padded to 16 for
tl.dot), so each packed K/V block is read and unpacked once for the group, and a chunk of the
Nq + Nr key positions, split across a second grid axis as in attention.py (FlashAttention-2's
wave heuristic, chunks of `min_keys_per_split`, a multiple of BLOCK_N). A chunk folds its
quantized blocks, then its residual blocks, into one online softmax (base 2, fp32 running max,
sum and accumulator), so both parts share one normalization; the residual blocks are the dense
kernel's step with its end mask (the query, at position Nq + Nr - 1, sees every key). The
program writes its normalized partial output and log-sum-exp, merged by the combine kernel; with
one split it writes the output itself.

Dequantization happens in registers, block by block; fp32 K or V never exist in memory:
- keys: BLOCK_N divides K_GROUP, so a key block lies in one group, which has one scale and min
  row s, m over the head dim. Then q . k_n = sum_d (q_d s_d) c_nd + sum_d q_d m_d: the scales are
  folded into the query tile (BLOCK_R x D multiplies a block instead of D x BLOCK_N), the codes
  c enter tl.dot as they are (integers below 256: exact in every dot input format), and the
  group's q . m is one row sum added to every score. Nq is whole groups, hence whole blocks: no
  quantized block is ragged or masked.
- values: per token and per V_GROUP channels, v_nd = c_nd s_n,d/Gv + m_n,d/Gv, dequantized in
  fp32, rounded to the input dtype (as the reference rounds them) and multiplied by P as dense
  values are. Folding their scales into P instead (o_d = sum_n (p_n s_n,g) c_nd + p_n m_n,g)
  would trade the BLOCK_N x Dv dequantize multiplies, a 16th of P @ V's multiply-adds, for
  2 x BLOCK_R x BLOCK_N x Dv / Gv (as many at Gv = 32 with the 16 padded rows), and need one
  dot and one accumulator per channel group, which Triton's register tiles cannot slice.
Codes are loaded as bytes, a contiguous row of D * bits / 8 per token, and unpacked by shifting
each byte by j * bits for its codes j (a [rows, bytes, per] tile reshaped to [rows, D]).

Numerics: scores and P @ V as in attention.py (fp32 accumulation, exp2 with scale * log2(e)
folded into q, P rounded to the input dtype before P @ V). The folded key dot multiplies q * s in
fp32 by the codes: "ieee" for fp32 inputs (no TF32, as the reference), "tf32" for 16-bit inputs,
where rounding q * s to fp16 would underflow for small scales (q * s below fp16's smallest
normal, 6e-5, keeps few bits); tf32 has fp32's exponent and fp16's mantissa, and the codes are
exact in it. The output has q's dtype and the reference's memory layout (`output_like`).

What keeps the reference: Sq != 1 (prefill or a speculative chunk: declined at lowering when Sq
is static, run by the reference in the runner when it is symbolic); q, k_res, v_res of
different dtypes or other than fp32/fp16/bf16, and head dims over 256 (`attention.head_dims`);
scales that are not floating point; a K_GROUP with no power-of-two factor of at least 16
(tl.dot's smallest tile: the block must lie in one key group); a GQA group over
DECODE_MAX_ROWS query heads; symbolic head dims or value group counts (the kernel fixes them);
bf16 under the interpreter (attention.why_not_loaded). Offsets of batches, heads and blocks
are int64, as in attention.py.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any, Callable

import torch

from compiler.codegen.triton import attention
from compiler.codegen.triton.attention import (
    DECODE_MAX_ROWS,
    KEY_BLOCK_SOURCE,
    LOG2_E,
    MIN_DOT,
    TRITON_IMPORTS,
    LaunchConfig,
    head_dims,
    kernel_module,
    kernel_name,
    launch_config,
    next_power_of_2,
    num_splits,
    why_not_loaded,
)
from compiler.codegen.triton.runtime import interpreting
from compiler.errors import Unsupported
from compiler.ops import kv_quant
from compiler.ops.causal_attention import output_like
from compiler.ops.registry import Kernel, LoweringRequest

OP = "quantized_kv_attention"
SPLIT_KERNEL = "quantized_kv_attention_split_kernel"
COMBINE_KERNEL = "attention_decode_combine_kernel"
SCALE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def jit_function_source(source: str, name: str) -> str:
    """The text of the `@triton.jit` function `name` in kernel `source`, up to the next one."""
    start = source.index(f"@triton.jit\ndef {name}(")
    end = source.find("\n@triton.jit\n", start + 1)
    return source[start:] if end < 0 else source[start : end + 1]


QUANTIZED_BLOCK_SOURCE = '''\
@triton.jit
def _load_codes(base, start_n, n_bytes, stride_n, stride_c,
                BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BITS: tl.constexpr):
    """The codes of tokens start_n .. start_n + BLOCK_N, [BLOCK_N, BLOCK_C] in fp32: a row of
    n_bytes packed bytes a token, byte i holding codes i * (8 // BITS) + j in bits
    [j * BITS, (j + 1) * BITS); codes past n_bytes (head dim padding) are 0."""
    offs_n = tl.arange(0, BLOCK_N)
    offs_b = tl.arange(0, BLOCK_C * BITS // 8)
    ptrs = base + start_n.to(tl.int64) * stride_n + offs_n[:, None] * stride_n + offs_b[None, :] * stride_c
    packed = tl.load(ptrs, mask=offs_b[None, :] < n_bytes, other=0)
    if BITS == 8:
        return packed.to(tl.float32)
    shifts = tl.arange(0, 8 // BITS) * BITS
    codes = (packed.to(tl.int32)[:, :, None] >> shifts[None, None, :]) & ((1 << BITS) - 1)
    return tl.reshape(codes, [BLOCK_N, BLOCK_C]).to(tl.float32)


@triton.jit
def _attend_quantized_block(
    acc, l_i, m_i, q,
    kc_base, ks_base, km_base, vc_base, vs_base, vm_base,
    stride_kcn, stride_kcc, stride_ksg, stride_ksd, stride_kmg, stride_kmd,
    stride_vcn, stride_vcc, stride_vsn, stride_vsg, stride_vmn, stride_vmg,
    start_n, v_dtype: tl.constexpr,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_N: tl.constexpr, BITS: tl.constexpr, K_GROUP: tl.constexpr, V_GROUP: tl.constexpr,
    KEY_PRECISION: tl.constexpr,
):
    """Fold quantized keys start_n .. start_n + BLOCK_N (one key group, all before the query:
    no mask) into the online softmax (acc, l_i, m_i) of q, fp32 and already times
    scale * log2(e)."""
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    group = (start_n // K_GROUP).to(tl.int64)
    d_real = offs_d < HEAD_DIM
    k_scale = tl.load(ks_base + group * stride_ksg + offs_d * stride_ksd, mask=d_real, other=0.0).to(tl.float32)
    k_min = tl.load(km_base + group * stride_kmg + offs_d * stride_kmd, mask=d_real, other=0.0).to(tl.float32)
    k_codes = _load_codes(kc_base, start_n, HEAD_DIM * BITS // 8, stride_kcn, stride_kcc, BLOCK_N, BLOCK_D, BITS)
    # q . k = (q * s) . codes + q . m over the group's scale and min rows
    qk = tl.dot(q * k_scale[None, :], tl.trans(k_codes), input_precision=KEY_PRECISION)
    qk += tl.sum(q * k_min[None, :], 1)[:, None]
    m_new = tl.maximum(m_i, tl.max(qk, 1))
    p = tl.exp2(qk - m_new[:, None])
    alpha = tl.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    # values: code * scale + min of each token's channel group, in registers
    v_codes = _load_codes(vc_base, start_n, HEAD_DIM_V * BITS // 8, stride_vcn, stride_vcc, BLOCK_N, BLOCK_DV, BITS)
    tokens = start_n.to(tl.int64) + tl.arange(0, BLOCK_N)
    v_group = offs_dv // V_GROUP
    dv_real = offs_dv[None, :] < HEAD_DIM_V
    v_scale = tl.load(vs_base + tokens[:, None] * stride_vsn + v_group[None, :] * stride_vsg, mask=dv_real, other=0.0)
    v_min = tl.load(vm_base + tokens[:, None] * stride_vmn + v_group[None, :] * stride_vmg, mask=dv_real, other=0.0)
    v = v_codes * v_scale.to(tl.float32) + v_min.to(tl.float32)
    acc = tl.dot(p.to(v_dtype), v.to(v_dtype), acc * alpha[:, None], input_precision="ieee")
    return acc, l_i, m_new


@triton.jit
def quantized_kv_attention_split_kernel(
    q_ptr, kc_ptr, ks_ptr, km_ptr, vc_ptr, vs_ptr, vm_ptr, kr_ptr, vr_ptr, o_ptr, part_o_ptr, part_lse_ptr,
    stride_qb, stride_qh, stride_qd,
    stride_kcb, stride_kch, stride_kcn, stride_kcc,
    stride_ksb, stride_ksh, stride_ksg, stride_ksd,
    stride_kmb, stride_kmh, stride_kmg, stride_kmd,
    stride_vcb, stride_vch, stride_vcn, stride_vcc,
    stride_vsb, stride_vsh, stride_vsn, stride_vsg,
    stride_vmb, stride_vmh, stride_vmn, stride_vmg,
    stride_krb, stride_krh, stride_krn, stride_krd,
    stride_vrb, stride_vrh, stride_vrn, stride_vrd,
    stride_ob, stride_oh, stride_od,
    n_kv_heads, group, n_quant, n_res, keys_per_split, n_splits, qk_scale,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, BITS: tl.constexpr, K_GROUP: tl.constexpr,
    V_GROUP: tl.constexpr, KEY_PRECISION: tl.constexpr, SINGLE_SPLIT: tl.constexpr,
):
    """The decode query of the `group` query heads of kv head (b, hk) (rows r of a BLOCK_R tile,
    head hk * group + r) against key positions [split * keys_per_split, + keys_per_split) of
    the n_quant quantized then n_res residual keys.

    Grid: (B * Hkv, n_splits). Writes the chunk's normalized partial output and base-2
    log-sum-exp per row to part_o [B * Hq, n_splits, HEAD_DIM_V] / part_lse [B * Hq, n_splits]
    (fp32, rows in o's (b, h) order), or, with a single split, the output.
    """
    bkv = tl.program_id(0)
    split = tl.program_id(1)
    batch = (bkv // n_kv_heads).to(tl.int64)
    kv_head = (bkv % n_kv_heads).to(tl.int64)

    offs_r = tl.arange(0, BLOCK_R)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    real_row = offs_r < group
    head = kv_head * group + offs_r
    q_ptrs = q_ptr + batch * stride_qb + head[:, None] * stride_qh + offs_d[None, :] * stride_qd
    q = tl.load(q_ptrs, mask=real_row[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)
    q_quant = q.to(tl.float32) * qk_scale

    m_i = tl.full([BLOCK_R], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_R], dtype=tl.float32)
    acc = tl.zeros([BLOCK_R, BLOCK_DV], dtype=tl.float32)
    start = split * keys_per_split
    end = tl.minimum(start + keys_per_split, n_quant + n_res)

    # Quantized positions [start, min(end, n_quant)): whole blocks (n_quant is whole key groups).
    kc_base = kc_ptr + batch * stride_kcb + kv_head * stride_kch
    ks_base = ks_ptr + batch * stride_ksb + kv_head * stride_ksh
    km_base = km_ptr + batch * stride_kmb + kv_head * stride_kmh
    vc_base = vc_ptr + batch * stride_vcb + kv_head * stride_vch
    vs_base = vs_ptr + batch * stride_vsb + kv_head * stride_vsh
    vm_base = vm_ptr + batch * stride_vmb + kv_head * stride_vmh
    for start_n in range(start, tl.minimum(end, n_quant), BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        acc, l_i, m_i = _attend_quantized_block(
            acc, l_i, m_i, q_quant, kc_base, ks_base, km_base, vc_base, vs_base, vm_base,
            stride_kcn, stride_kcc, stride_ksg, stride_ksd, stride_kmg, stride_kmd,
            stride_vcn, stride_vcc, stride_vsn, stride_vsg, stride_vmn, stride_vmg,
            start_n, vr_ptr.dtype.element_ty,
            HEAD_DIM, HEAD_DIM_V, BLOCK_D, BLOCK_DV, BLOCK_N, BITS, K_GROUP, V_GROUP, KEY_PRECISION,
        )

    # Residual positions n_quant + [lo, hi): blocks at multiples of BLOCK_N of the residual (start
    # and n_quant both are), masked past n_res. Every block holds a key the query sees (its
    # first), so no row's max stays -inf: the step needs no NaN guard (HAS_MASK=False).
    kr_base = kr_ptr + batch * stride_krb + kv_head * stride_krh
    vr_base = vr_ptr + batch * stride_vrb + kv_head * stride_vrh
    q_pos = tl.zeros([BLOCK_R], dtype=tl.int32) + (n_res - 1)
    for start_n in range(tl.maximum(start, n_quant) - n_quant, end - n_quant, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        acc, l_i, m_i = _attend_key_block(
            acc, l_i, m_i, q, q_pos, kr_base, vr_base, kr_base,
            stride_krn, stride_krd, stride_vrn, stride_vrd, 0,
            start_n, n_res, qk_scale,
            HEAD_DIM, HEAD_DIM_V, BLOCK_D, BLOCK_DV, BLOCK_N, True, False,
        )

    # Every chunk holds a key: l > 0 in every row (padding rows have q = 0, scores 0).
    out = acc / l_i[:, None]
    o_mask = real_row[:, None] & (offs_dv[None, :] < HEAD_DIM_V)
    if SINGLE_SPLIT:
        o_ptrs = o_ptr + batch * stride_ob + head[:, None] * stride_oh + offs_dv[None, :] * stride_od
        tl.store(o_ptrs, out.to(o_ptr.dtype.element_ty), mask=o_mask)
    else:
        row = (batch * n_kv_heads * group + head) * n_splits + split
        tl.store(part_lse_ptr + row, m_i + tl.log2(l_i), mask=real_row)
        tl.store(part_o_ptr + row[:, None] * HEAD_DIM_V + offs_dv[None, :], out, mask=o_mask)
'''

KERNEL_SOURCE = (
    TRITON_IMPORTS
    + "\n\n"
    + KEY_BLOCK_SOURCE
    + "\n\n"
    + QUANTIZED_BLOCK_SOURCE
    + "\n\n"
    + jit_function_source(attention.KERNEL_SOURCE, COMBINE_KERNEL)
)


@kv_quant.quantized_kv_attention.register_lowering("triton")
def lower_quantized_kv_attention(req: LoweringRequest) -> Kernel:
    q, k_codes, k_scale, k_min, v_codes, v_scale, v_min, k_res, v_res, _scale, bits, k_group = req.args
    head_dim, head_dim_v = head_dims(OP, q, k_res, v_res)
    seq_q = q.shape[2]
    if isinstance(seq_q, int) and seq_q != 1:
        raise Unsupported(f"{OP} with {seq_q} queries: the kernel is the decode step (Sq = 1)")
    if bits not in kv_quant.BITS or not isinstance(k_group, int) or k_group < 1:
        raise Unsupported(f"{OP} with bits={bits}, k_group={k_group}")
    if k_codes.dtype != torch.uint8 or v_codes.dtype != torch.uint8:
        raise Unsupported(f"{OP} with codes of dtypes {k_codes.dtype}, {v_codes.dtype} (packed uint8 expected)")
    if not all(t.dtype in SCALE_DTYPES for t in (k_scale, k_min, v_scale, v_min)):
        raise Unsupported(f"{OP} with scales and minimums not floating point")
    per = 8 // bits
    if head_dim % per or head_dim_v % per:
        raise Unsupported(f"{OP}: head dims {head_dim}, {head_dim_v} do not pack {per} codes a byte")
    v_group = _value_group(head_dim_v, v_scale.shape[-1])
    block_d, block_dv = (max(MIN_DOT, next_power_of_2(d)) for d in (head_dim, head_dim_v))
    config = launch_config(max(block_d, block_dv), q.dtype, interpreting())
    # A key block must lie in one key group: the largest power of two dividing k_group, at most
    # the decode block.
    block_n = min(config.decode_block_n, k_group & -k_group)
    if block_n < MIN_DOT:
        raise Unsupported(
            f"{OP} with key groups of {k_group} tokens: a key block lies in one group, and tl.dot needs {MIN_DOT} keys"
        )
    assert config.min_keys_per_split % block_n == 0, "splits must be whole key blocks"
    compute_units = attention._compute_units(req.target)
    name = f"{kernel_name(head_dim, head_dim_v, q.dtype, op=OP)}_int{bits}_gk{k_group}_gv{v_group}"
    dims = dict(
        HEAD_DIM=head_dim, HEAD_DIM_V=head_dim_v, BLOCK_D=block_d, BLOCK_DV=block_dv, BLOCK_N=block_n,
        BITS=bits, K_GROUP=k_group, V_GROUP=v_group, KEY_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
    )
    source = _header(name, dims, config, compute_units) + KERNEL_SOURCE
    why_not = why_not_loaded(req, q)
    if why_not:
        return Kernel(name, "triton", source, note=why_not)
    return Kernel(name, "triton", source, runner=_runner(kernel_module(OP, KERNEL_SOURCE), dims, config, compute_units))


def _value_group(head_dim_v: int, groups: Any) -> int:
    """Gv, the channels of a value group, from the static count of groups Dv / Gv."""
    from torch.fx.experimental.symbolic_shapes import is_concrete_int

    if not is_concrete_int(groups):
        raise Unsupported(f"{OP} over a symbolic count of value groups {groups}; the kernel fixes Gv")
    groups = int(groups)
    if groups < 1 or head_dim_v % groups:
        raise Unsupported(f"{OP}: {groups} value groups do not divide head dim {head_dim_v}")
    return head_dim_v // groups


def _header(name: str, dims: dict[str, Any], config: LaunchConfig, compute_units: int) -> str:
    launch = ", ".join(f"{key}={value!r}" for key, value in dims.items())
    return (
        f"# {name}: per call, from the shapes (group = Hq // Hkv, Nq + Nr keys)\n"
        f"#   decode, Sq == 1 and group <= {DECODE_MAX_ROWS}: splits = FlashAttention-2 heuristic over"
        f" {compute_units} compute units, chunks of {config.min_keys_per_split} keys\n"
        f"#     {SPLIT_KERNEL}[(B * Hkv, splits)](..., {launch},\n"
        f"#         BLOCK_R=max({MIN_DOT}, next_pow2(group)), num_warps={config.decode_warps},"
        f" num_stages={config.decode_stages})\n"
        f"#     then, if splits > 1: {COMBINE_KERNEL}[(B * Hq,)](..., BLOCK_S=next_pow2(splits))\n"
        f"#   otherwise: the reference (dequantize, then SDPA)\n"
    )


def _runner(
    module: ModuleType, dims: dict[str, Any], config: LaunchConfig, compute_units: int
) -> Callable[..., torch.Tensor]:
    split_kernel = getattr(module, SPLIT_KERNEL)
    combine_kernel = getattr(module, COMBINE_KERNEL)
    head_dim_v, block_dv = dims["HEAD_DIM_V"], dims["BLOCK_DV"]

    def run(
        q: torch.Tensor,
        k_codes: torch.Tensor,
        k_scale: torch.Tensor,
        k_min: torch.Tensor,
        v_codes: torch.Tensor,
        v_scale: torch.Tensor,
        v_min: torch.Tensor,
        k_res: torch.Tensor,
        v_res: torch.Tensor,
        scale: float,
        bits: int,
        k_group: int,
    ) -> torch.Tensor:
        args = (q, k_codes, k_scale, k_min, v_codes, v_scale, v_min, k_res, v_res, scale, bits, k_group)
        if (bits, k_group) != (dims["BITS"], dims["K_GROUP"]):
            lowered = f"{dims['BITS']}-bit codes in key groups of {dims['K_GROUP']}"
            raise ValueError(f"{OP}: kernel for {lowered} called with bits={bits}, k_group={k_group}")
        kv_quant.check_cache(*args[:9], bits, k_group)
        if v_scale.shape[-1] * dims["V_GROUP"] != head_dim_v:
            groups = v_scale.shape[-1]
            raise ValueError(f"{OP}: kernel for value groups of {dims['V_GROUP']} called with {groups} groups")
        batch, n_q_heads, seq_q, _ = q.shape
        n_kv_heads, n_quant, n_res = k_res.shape[1], k_codes.shape[2], k_res.shape[2]
        group = n_q_heads // n_kv_heads
        if seq_q != 1 or group > DECODE_MAX_ROWS or n_quant + n_res == 0:
            # not the decode step (symbolic Sq), or no key at all (the reference raises)
            return kv_quant.quantized_kv_attention.reference(*args)
        out = output_like(q, v_res)
        if out.numel() == 0:
            return out
        programs = batch * n_kv_heads
        seq_k = n_quant + n_res
        splits = num_splits(seq_k, programs, compute_units, config.min_keys_per_split)
        chunk = config.min_keys_per_split
        keys_per_split = -(-seq_k // (splits * chunk)) * chunk
        splits = -(-seq_k // keys_per_split)  # no split without keys
        rows = batch * n_q_heads
        if splits == 1:
            part_o = part_lse = out  # never written: the single split stores the output itself
        else:
            part_o = torch.empty((rows, splits, head_dim_v), dtype=torch.float32, device=q.device)
            part_lse = torch.empty((rows, splits), dtype=torch.float32, device=q.device)
        q_strides = (q.stride(0), q.stride(1), q.stride(3))
        o_strides = (out.stride(0), out.stride(1), out.stride(3))
        tensors = (k_codes, k_scale, k_min, v_codes, v_scale, v_min, k_res, v_res)
        split_kernel[(programs, splits)](
            q, *tensors, out, part_o, part_lse,
            *q_strides, *(s for t in tensors for s in t.stride()), *o_strides,
            n_kv_heads, group, n_quant, n_res, keys_per_split, splits, float(scale) * LOG2_E, **dims,
            BLOCK_R=max(MIN_DOT, next_power_of_2(group)), SINGLE_SPLIT=splits == 1,
            num_warps=config.decode_warps, num_stages=config.decode_stages,
        )
        if splits > 1:
            combine_kernel[(rows,)](
                part_o, part_lse, out, *out.stride(), n_q_heads, 1, splits,
                HEAD_DIM_V=head_dim_v, BLOCK_DV=block_dv, BLOCK_S=next_power_of_2(splits),
                num_warps=max(1, block_dv // 128),
            )
        return out

    return run
