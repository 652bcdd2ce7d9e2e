"""Quantized KV cache storage (KIVI) and `compiler::quantized_kv_attention`, attention that reads it.

KIVI (Liu et al., 2024) stores keys quantized per channel and values per token: key outliers sit
in a few channels, so a channel's range over a group of tokens is narrow, while a value's error
matters per token (it is mixed by that token's attention weight). A recent window is kept in
full precision. This module fixes the storage format every piece shares (the quantization pass,
the cache that carries it between decode steps, the kernels) and gives the reference of each
step in plain torch.

Format, for one layer, B batch entries, H KV heads, D head dim, `bits` in {8, 4, 2}:

- codes: uint8, `8 // bits` codes per byte along the last (channel) axis; code j of byte i is
  element `i * (8 // bits) + j`, in bits `[j * bits, (j + 1) * bits)`. Keys and values both:
  `k_codes` [B, H, Nq, D * bits / 8], `v_codes` [B, H, Nq, Dv * bits / 8]. The last dim must
  be a multiple of `8 // bits`.
- asymmetric affine scales in fp16 (`x ~ code * scale + min`), per group:
  keys per channel over groups of `Gk` consecutive tokens: `k_scale`, `k_min` [B, H, Nq / Gk, D];
  values per token over groups of `Gv` consecutive channels: `v_scale`, `v_min` [B, H, Nq, Dv / Gv].
  Nq (the quantized tokens) is a multiple of Gk. The attention op takes Gk as an argument (Nq
  is symbolic in a captured graph, so the shapes alone do not fix it at compile time); Gv is
  what the static shapes say, Dv / v_scale.shape[-1].
- the residual: the most recent tokens in full precision, `k_res` [B, H, Nr, D], `v_res`
  [B, H, Nr, Dv], at positions Nq .. Nq + Nr - 1 (after every quantized token).

Rounding: the fp16 minimum is rounded down and the fp16 scale up, so that every element of a
group lies in [min, min + scale * (2**bits - 1)] exactly as stored; the codes are then computed
from the stored fp16 values, and each dequantized element is within scale / 2 of the original
(plus fp32 rounding): the bound the round-trip tests check.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from compiler.cost_model.rules import OpCost, TensorInfo, attention_work, io_bytes
from compiler.ops.causal_attention import output_like
from compiler.ops.registry import compiler_op

BITS = (8, 4, 2)
SCALE_DTYPE = torch.float16


def _check_bits(bits: int) -> int:
    if bits not in BITS:
        raise ValueError(f"KV cache quantization: bits must be one of {BITS}, got {bits}")
    return 8 // bits


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer codes in [0, 2**bits) along the last dim into uint8 (see the module doc)."""
    per = _check_bits(bits)
    n = codes.shape[-1]
    if n % per:
        raise ValueError(f"KV cache quantization: the last dim ({n}) must be a multiple of {per} to pack {bits}-bit codes")
    c = codes.to(torch.uint8).reshape(*codes.shape[:-1], n // per, per)
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=codes.device)
    return (c << shifts).sum(-1, dtype=torch.uint8) if per > 1 else c[..., 0]


def unpack(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """The codes (uint8, one per element) of `pack`ed bytes."""
    per = _check_bits(bits)
    if per == 1:
        return packed
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=packed.device)
    mask = (1 << bits) - 1
    return ((packed[..., None] >> shifts) & mask).reshape(*packed.shape[:-1], packed.shape[-1] * per)


def _round_down_fp16(x: torch.Tensor) -> torch.Tensor:
    h = x.to(SCALE_DTYPE)
    over = h.float() > x
    return torch.where(over, torch.nextafter(h, torch.full_like(h, -math.inf)), h)


def _round_up_fp16(x: torch.Tensor) -> torch.Tensor:
    h = x.to(SCALE_DTYPE)
    under = h.float() < x
    return torch.where(under, torch.nextafter(h, torch.full_like(h, math.inf)), h)


def _affine(x: torch.Tensor, bits: int, dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Codes, fp16 scale and fp16 min of x quantized over `dim` (one group per index of the
    other dims)."""
    x = x.float()
    lo = _round_down_fp16(x.amin(dim, keepdim=True))
    hi = x.amax(dim, keepdim=True)
    levels = (1 << bits) - 1
    span = (hi - lo.float()).clamp_min(0)
    # a constant group gets the smallest normal scale: its codes are 0 and it dequantizes exactly
    scale = _round_up_fp16((span / levels).clamp_min(torch.finfo(SCALE_DTYPE).tiny))
    codes = torch.round((x - lo.float()) / scale.float()).clamp_(0, levels)
    return codes, scale, lo


@dataclass(frozen=True)
class Quantized:
    """One tensor in the cache format: packed codes and their fp16 scales and minimums."""

    codes: torch.Tensor
    scale: torch.Tensor
    min: torch.Tensor

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.codes, self.scale, self.min))


def quantize_keys(k: torch.Tensor, bits: int, group: int) -> Quantized:
    """Keys [B, H, N, D] per channel over groups of `group` tokens (N a multiple of it)."""
    b, h, n, d = k.shape
    if group < 1 or n % group:
        raise ValueError(f"quantize_keys: {n} tokens are not whole groups of {group}; quantize whole groups and keep the rest in the residual")
    codes, scale, lo = _affine(k.reshape(b, h, n // group, group, d), bits, 3)
    return Quantized(pack(codes.reshape(b, h, n, d), bits), scale.squeeze(3), lo.squeeze(3))


def quantize_values(v: torch.Tensor, bits: int, group: int) -> Quantized:
    """Values [B, H, N, Dv] per token over groups of `group` channels (Dv a multiple of it)."""
    b, h, n, d = v.shape
    if group < 1 or d % group:
        raise ValueError(f"quantize_values: head dim {d} is not whole groups of {group} channels")
    codes, scale, lo = _affine(v.reshape(b, h, n, d // group, group), bits, 4)
    return Quantized(pack(codes.reshape(b, h, n, d), bits), scale.squeeze(4), lo.squeeze(4))


def dequantize_keys(q: Quantized, bits: int) -> torch.Tensor:
    """fp32 keys [B, H, Nq, D] from their quantized form."""
    codes = unpack(q.codes, bits).float()
    b, h, n, d = codes.shape
    groups = q.scale.shape[2]
    if groups == 0:
        return codes
    g = n // groups
    x = codes.view(b, h, groups, g, d) * q.scale.float()[:, :, :, None] + q.min.float()[:, :, :, None]
    return x.view(b, h, n, d)


def dequantize_values(q: Quantized, bits: int) -> torch.Tensor:
    """fp32 values [B, H, Nq, Dv] from their quantized form."""
    codes = unpack(q.codes, bits).float()
    b, h, n, d = codes.shape
    groups = q.scale.shape[-1]
    g = d // groups
    x = codes.view(b, h, n, groups, g) * q.scale.float()[..., None] + q.min.float()[..., None]
    return x.view(b, h, n, d)


def check_cache(q: torch.Tensor, k_codes: torch.Tensor, k_scale: torch.Tensor, k_min: torch.Tensor, v_codes: torch.Tensor, v_scale: torch.Tensor, v_min: torch.Tensor, k_res: torch.Tensor, v_res: torch.Tensor, bits: int, k_group: int) -> None:
    """Raise ValueError naming what is inconsistent in one call's cache tensors."""
    per = _check_bits(bits)
    name = "quantized_kv_attention"
    if q.dim() != 4 or k_res.dim() != 4 or v_res.dim() != 4:
        raise ValueError(f"{name}: q, k_res and v_res must be [B, H, S, D]")
    b, hq, _, d = q.shape
    hkv, dv = k_res.shape[1], v_res.shape[-1]
    if hq % hkv:
        raise ValueError(f"{name}: {hq} query heads are not a multiple of {hkv} KV heads")
    nq = k_codes.shape[2]
    expect = {
        "k_codes": (k_codes, (b, hkv, nq, d // per)),
        "v_codes": (v_codes, (b, hkv, nq, dv // per)),
        "k_res": (k_res, (b, hkv, k_res.shape[2], d)),
        "v_res": (v_res, (b, hkv, k_res.shape[2], dv)),
    }
    for what, (t, shape) in expect.items():
        if tuple(t.shape) != shape:
            raise ValueError(f"{name}: {what} must be {list(shape)} for q {list(q.shape)}, {bits}-bit codes; got {list(t.shape)}")
    if k_codes.dtype != torch.uint8 or v_codes.dtype != torch.uint8:
        raise ValueError(f"{name}: codes must be uint8 (packed), got {k_codes.dtype} and {v_codes.dtype}")
    if k_group < 1 or nq % k_group or tuple(k_scale.shape) != (b, hkv, nq // k_group, d) or k_min.shape != k_scale.shape:
        raise ValueError(f"{name}: k_scale/k_min must be [B, H, Nq / Gk, D] = {[b, hkv, nq // max(k_group, 1), d]} for {nq} quantized tokens in groups of {k_group}; got {list(k_scale.shape)}")
    vg = v_scale.shape[-1]
    if tuple(v_scale.shape) != (b, hkv, nq, vg) or v_min.shape != v_scale.shape or vg == 0 or dv % vg:
        raise ValueError(f"{name}: v_scale/v_min must be [B, H, Nq, Dv / Gv]; got {list(v_scale.shape)}")


def _fake(q, k_codes, k_scale, k_min, v_codes, v_scale, v_min, k_res, v_res, scale: float, bits: int, k_group: int):
    return output_like(q, v_res)


def _cost(q: TensorInfo, k_codes: TensorInfo, k_scale: TensorInfo, k_min: TensorInfo, v_codes: TensorInfo, v_scale: TensorInfo, v_min: TensorInfo, k_res: TensorInfo, v_res: TensorInfo, scale: float, bits: int, k_group: int) -> OpCost:
    """Attention over Nq + Nr keys; the bytes are those of the packed cache as stored (this is
    what makes a memory-bound decode step faster), plus one dequantize per element read."""
    *batch, sq, d = q.shape
    nq, nr = k_codes.shape[2], k_res.shape[2]
    keys = TensorInfo((*k_res.shape[:2], nq + nr, d), q.dtype)
    values = TensorInfo((*v_res.shape[:2], nq + nr, v_res.shape[-1]), q.dtype)
    out = TensorInfo((*q.shape[:-1], v_res.shape[-1]), q.dtype)
    work = attention_work(q, keys, values, [out], causal=True, end_aligned=True)
    read, _ = io_bytes([q, k_codes, k_scale, k_min, v_codes, v_scale, v_min, k_res, v_res], [])
    dequantize = 2 * nq * math.prod(k_codes.shape[:2]) * (d + v_res.shape[-1])  # a multiply-add per element
    work = dataclasses.replace(work, bytes_read=read, bytes_cold=0, vector_flops=work.vector_flops + dequantize)
    return OpCost(work, "attention")


@compiler_op("quantized_kv_attention", fake=_fake, cost=_cost)
def quantized_kv_attention(
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
    """Causal attention of q [B, Hq, Sq, D] over the cache's Nq quantized then Nr residual
    keys (queries aligned to the end: query i sits at position Nq + Nr - Sq + i), GQA-aware.
    The reference dequantizes to fp32 and calls `causal_attention`'s math; kernels dequantize
    inside the key loop and never materialize fp32 keys."""
    check_cache(q, k_codes, k_scale, k_min, v_codes, v_scale, v_min, k_res, v_res, bits, k_group)
    k = torch.cat([dequantize_keys(Quantized(k_codes, k_scale, k_min), bits).to(k_res.dtype), k_res], 2)
    v = torch.cat([dequantize_values(Quantized(v_codes, v_scale, v_min), bits).to(v_res.dtype), v_res], 2)
    sq, sk = q.shape[2], k.shape[2]
    if sq > sk:
        raise ValueError(f"quantized_kv_attention: {sq} queries against {sk} cached keys; the new tokens must be in the residual")
    gqa = q.shape[1] != k.shape[1]
    mask = None if sq == 1 else torch.ones(sq, sk, dtype=torch.bool, device=q.device).tril(sk - sq)
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa)
    return output_like(q, v_res).copy_(o)
