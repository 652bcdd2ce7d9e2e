"""Shift-add weights (ShiftAddLLM) and `compiler::shiftadd_linear`, the matmul that reads them.

ShiftAddLLM (You et al., 2024) reparameterizes a weight matrix W [N, K] (out x in) as a sum of
`q` binary matrices with power-of-two scales, per group of G consecutive input channels:

    W[n, k] ~ r[n] * sum_i f[i, n, k // G] * B_i[n, k],      B_i[n, k] in {-1, +1}

where each group factor f is an additive power of two, (1 + m / 8) * 2**e with a three-bit m
(at most four shifted terms; ShiftAddLLM rounds its scaling factors to sums of up to three
powers of two for the same reason: one power of two alone rounds a factor by up to 41%). So
`W @ x` needs no multiplier per weight: for every 8 consecutive activations, the 256 sums
+-x0 +- ... +- x7 are computed once (a lookup table shared by every output row and bit plane),
each row and plane then looks its byte of signs up and adds, and each group's sum is scaled by
its factor (shifts and adds in hardware; exact in fp32). The per-row scale r[n] is one multiply
per output, after the sum, and lets the factors' grid follow each row's magnitude.

This module fixes the storage format shared by the pass, the reference and the kernels:

- `planes`: uint8 [q, N, K / 8]; bit j (least significant first) of byte c of plane i, row n is
  the sign of element k = 8 c + j: 1 is +1, 0 is -1;
- `scales`: uint8 [q, N, K / G]: plane i's factor for row n and input group g, as a code
  c = 8 k + m standing for (8 + m) * 2**(k - 34) = (1 + m / 8) * 2**(k - 31), from 2**-31 to
  1.875 (`scale_factors`, `encode_scales`);
- `row_scale`: float32 [N].

G is K / scales.shape[-1]; it must be a multiple of 8 (a byte of signs never straddles two
groups). Nothing is expanded to floats at load: a model holds q bits per weight, plus one
byte per plane and group, plus four bytes per row.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from compiler.cost_model.rules import OpCost, TensorInfo
from compiler.cost_model.work import Work
from compiler.ops.registry import compiler_op

BITS = (1, 2, 3, 4)
_BIT_WEIGHTS = 1 << torch.arange(8, dtype=torch.int32)


def pack_signs(signs: torch.Tensor) -> torch.Tensor:
    """Pack a sign tensor [..., K] (True / positive is +1) into uint8 [..., K / 8] (see the
    module doc: element 8c + j is bit j of byte c)."""
    k = signs.shape[-1]
    if k % 8:
        raise ValueError(f"shift-add: the input dim ({k}) must be a multiple of 8 to pack signs")
    bits = (signs > 0) if signs.dtype != torch.bool else signs
    b = bits.reshape(*bits.shape[:-1], k // 8, 8).to(torch.int32)
    return (b * _BIT_WEIGHTS.to(b.device)).sum(-1).to(torch.uint8)


def unpack_signs(planes: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The +-1 values [..., K] of packed sign bytes [..., K / 8]."""
    bits = (planes[..., None].to(torch.int32) >> torch.arange(8, device=planes.device, dtype=torch.int32)) & 1
    return (bits * 2 - 1).to(dtype).reshape(*planes.shape[:-1], planes.shape[-1] * 8)


SCALE_BIAS = 34  # a scale code c stands for (8 + (c & 7)) * 2**((c >> 3) - SCALE_BIAS)


def scale_factors(codes: torch.Tensor) -> torch.Tensor:
    """The factors, in fp32, of uint8 scale codes: c = 8 k + m is (1 + m / 8) * 2**(k - 31), a
    power of two with a three-bit mantissa (ShiftAddLLM's additive powers of two: at most four
    shifted terms), from 2**-31 to 1.875, each exact in fp32."""
    c = codes.to(torch.int32)
    return torch.ldexp((8 + (c & 7)).float(), (c >> 3) - SCALE_BIAS)


def encode_scales(x: torch.Tensor) -> torch.Tensor:
    """The uint8 codes of the representable factors nearest to x (> 0; clamped to the range
    [2**-31, 1.875])."""
    x = x.float().clamp(2.0 ** -31, 1.875)
    k = torch.floor(torch.log2(x)).clamp(-31, 0)
    m = torch.round((x / torch.exp2(k) - 1) * 8)
    carry = m >= 8
    k, m = torch.where(carry & (k < 0), k + 1, k), torch.where(carry, torch.where(k < 0, 0.0, 7.0), m)
    return ((k + 31) * 8 + m).to(torch.uint8)


def group_size(planes: torch.Tensor, scales: torch.Tensor) -> int:
    """G, the input channels that share one factor (K / scales.shape[-1])."""
    k = planes.shape[-1] * 8
    groups = scales.shape[-1]
    if groups < 1 or k % groups or (k // groups) % 8:
        raise ValueError(f"shift-add: {groups} scale groups do not split K = {k} into groups that are a multiple of 8")
    return k // groups


@dataclass(frozen=True)
class ShiftAddWeight:
    """One reparameterized weight matrix in the module's format."""

    planes: torch.Tensor  # uint8 [q, N, K / 8]
    scales: torch.Tensor  # uint8 [q, N, K / G], codes of the group factors
    row_scale: torch.Tensor  # float32 [N]

    @property
    def bits(self) -> int:
        return self.planes.shape[0]

    @property
    def shape(self) -> tuple[int, int]:
        """(N, K) of the matrix it stands for."""
        return self.planes.shape[1], self.planes.shape[2] * 8

    @property
    def group(self) -> int:
        return group_size(self.planes, self.scales)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.planes, self.scales, self.row_scale))

    def dense(self) -> torch.Tensor:
        """The fp32 matrix [N, K] the weight stands for (for tests and the reference)."""
        return dense_weight(self.planes, self.scales, self.row_scale)

    def rows(self, start: int, end: int) -> ShiftAddWeight:
        """Output rows [start, end) (rows are independent in this format)."""
        return ShiftAddWeight(self.planes[:, start:end].contiguous(), self.scales[:, start:end].contiguous(), self.row_scale[start:end].contiguous())


def dense_weight(planes: torch.Tensor, scales: torch.Tensor, row_scale: torch.Tensor) -> torch.Tensor:
    """W [N, K] = r[n] * sum_i f[i, n, k // G] * B_i[n, k], in float32."""
    g = group_size(planes, scales)
    signs = unpack_signs(planes)  # [q, N, K]
    factors = scale_factors(scales).repeat_interleave(g, -1)
    return (signs * factors).sum(0) * row_scale.float()[:, None]


def check_weight(x: torch.Tensor, planes: torch.Tensor, scales: torch.Tensor, row_scale: torch.Tensor) -> None:
    """Raise ValueError naming what is inconsistent in one call's arguments."""
    name = "shiftadd_linear"
    if planes.dim() != 3 or planes.dtype != torch.uint8:
        raise ValueError(f"{name}: planes must be uint8 [q, N, K / 8], got {planes.dtype} {list(planes.shape)}")
    q, n, k8 = planes.shape
    if scales.dtype != torch.uint8 or scales.dim() != 3 or tuple(scales.shape[:2]) != (q, n):
        raise ValueError(f"{name}: scales must be uint8 [q, N, K / G] = [{q}, {n}, K / G], got {scales.dtype} {list(scales.shape)}")
    group_size(planes, scales)
    if tuple(row_scale.shape) != (n,) or row_scale.dtype != torch.float32:
        raise ValueError(f"{name}: row_scale must be float32 [N] = [{n}], got {row_scale.dtype} {list(row_scale.shape)}")
    if x.shape[-1] != k8 * 8:
        raise ValueError(f"{name}: x has {x.shape[-1]} input features, the weight {k8 * 8}")


def lookup_tables(x: torch.Tensor) -> torch.Tensor:
    """The kernels' tables, in torch: [M, K / 8, 256] where entry p of chunk c is
    sum_j (+x[8c + j] if bit j of p else -x[8c + j]) for x [M, K] (fp32)."""
    m, k = x.shape
    patterns = unpack_signs(torch.arange(256, dtype=torch.uint8, device=x.device))  # [256 * 8] -> [256, 8]
    patterns = patterns.reshape(256, 8)
    return torch.einsum("mcj,pj->mcp", x.float().reshape(m, k // 8, 8), patterns)


def lookup_linear(x: torch.Tensor, planes: torch.Tensor, scales: torch.Tensor, row_scale: torch.Tensor) -> torch.Tensor:
    """The kernels' algorithm in torch, for x [M, K]: per row, plane and chunk, look the byte of
    signs up in the table; add the chunks of a group; scale the group's sum by its factor;
    add the planes and groups; multiply by the row scale. Slow (it materializes the gathered
    [M, q, N, K / 8] sums); it documents the math the kernels follow."""
    tables = lookup_tables(x)  # [M, C, 256]
    q, n, c = planes.shape
    g = group_size(planes, scales) // 8  # chunks per group
    idx = planes.long().permute(1, 0, 2).reshape(1, n * q, c).expand(x.shape[0], -1, -1)  # [M, N*q, C]
    looked = torch.gather(tables, 2, idx.transpose(1, 2)).transpose(1, 2)  # [M, N*q, C]
    sums = looked.reshape(x.shape[0], n, q, c // g, g).sum(-1)  # [M, N, q, groups]
    shifted = sums * scale_factors(scales).permute(1, 0, 2)[None]
    return shifted.sum((2, 3)) * row_scale[None]


def _fake(x: torch.Tensor, planes: torch.Tensor, scales: torch.Tensor, row_scale: torch.Tensor) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], planes.shape[1]))


def _cost(x: TensorInfo, planes: TensorInfo, scales: TensorInfo, row_scale: TensorInfo) -> OpCost:
    """A lookup-table matmul: tables (M * K / 8 * 256 adds, built incrementally), one lookup
    and add per row, plane and chunk, one scaling per row, plane and group. The weight bytes
    are the packed ones, read cold from memory (a decode step streams them all)."""
    m = 1
    for s in x.shape[:-1]:
        m = m * s
    q, n, chunks = planes.shape
    groups = scales.shape[-1]
    out_bytes = m * n * x.dtype.itemsize
    weight_bytes = planes.nbytes + scales.nbytes + row_scale.nbytes
    work = Work(
        vector_flops=m * chunks * 256 + 2 * m * q * n * chunks + 2 * m * q * n * groups + m * n,
        bytes_read=x.nbytes + weight_bytes,
        bytes_written=out_bytes,
        bytes_cold=weight_bytes,
    )
    return OpCost(work, "linear")


@compiler_op("shiftadd_linear", fake=_fake, cost=_cost)
def shiftadd_linear(x: torch.Tensor, planes: torch.Tensor, scales: torch.Tensor, row_scale: torch.Tensor) -> torch.Tensor:
    """y [..., N] = x [..., K] @ W.T for the shift-add weight W (see the module doc), computed
    in float32 and returned in x's dtype. The reference expands W to fp32 per call (never
    stored); the kernels never expand it (lookup tables, see `lookup_linear`)."""
    check_weight(x, planes, scales, row_scale)
    w = dense_weight(planes, scales, row_scale)
    y = x.reshape(-1, x.shape[-1]).float() @ w.t()
    return y.reshape(*x.shape[:-1], w.shape[0]).to(x.dtype)
