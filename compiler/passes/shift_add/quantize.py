"""Weight quantizers of the shift-add pass: ShiftAddLLM's binary coding with power-of-two
scales, and group-wise round-to-nearest (the baseline it is compared against).

Binary-coding quantization (BCQ) of one group of G input channels of a row, w in R^G:
w ~ sum_i alpha_i b_i, b_i in {-1, +1}^G. It is fitted by alternating two exact steps
(Xu et al. 2018; ShiftAddLLM):

- given the signs, the alphas are a q x q least-squares problem per row;
- given the alphas, each weight independently takes the nearest of the 2**q values
  sum_i +-alpha_i (exhaustive: 16 values at 4 bits).

The alphas are then rounded to additive powers of two times a per-row scale,
r * (1 + m / 8) * 2**e (the scale codes of `compiler.ops.shift_add`); r is the row's largest
alpha. ShiftAddLLM rounds its alphas to sums of up to three powers of two for the same reason:
one power of two (relative rounding error up to 41%) costs more than the bits save. Measured
on Gaussian groups of 64: relative weight error 0.044 at 3 bits and 0.018 at 4 with one power
of two on a per-row grid, 0.031 and 0.0082 with the three-bit mantissa (round-to-nearest:
0.037 and 0.0080).

Output error (the paper's second objective) enters as in GPTQ (Frantar et al. 2023): columns
are quantized left to right, and each column's error, scaled by the inverse Hessian of the
layer's calibration inputs (H = X^T X), is subtracted from the columns not yet quantized, so
later columns compensate for the output error of earlier ones. Each group's alphas are fitted
to the group's weights as updated by then. Without a Hessian (no calibration data), the
quantizer minimizes the weight error alone.
"""

from __future__ import annotations

import functools
import itertools
import math
from dataclasses import dataclass

import torch

from compiler.ops.shift_add import ShiftAddWeight, encode_scales, pack_signs, scale_factors

EXPONENT_RANGE = (-128, 127)  # int8
DAMP = 0.01  # GPTQ's dampening: 1% of the mean diagonal added to H
DIVERGED = 1.0  # a relative weight error above this (worse than all zeros) means the sweep diverged


@functools.lru_cache(maxsize=None)
def sign_combinations(bits: int) -> torch.Tensor:
    """[2**bits, bits] of +-1: every way to sign the `bits` planes."""
    return torch.tensor(list(itertools.product((-1.0, 1.0), repeat=bits)))


def nearest(w: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """Signs [R, G, q] of the nearest value sum_i +-alpha_i to each weight of w [R, G], for
    alphas [R, q]."""
    return Levels(alpha).signs(w)


class Levels:
    """The 2**q values sum_i +-alpha_i of each row of alphas [R, q], sorted once so that the
    nearest one to any weight is a binary search."""

    def __init__(self, alpha: torch.Tensor) -> None:
        self.combos = sign_combinations(alpha.shape[-1])  # [C, q]
        values, self.order = (alpha @ self.combos.t()).sort(-1)  # [R, C]
        self.midpoints = (values[:, 1:] + values[:, :-1]) / 2

    def signs(self, w: torch.Tensor) -> torch.Tensor:
        """[R, G, q] for weights w [R, G]."""
        return self.combos[self.order.gather(-1, torch.searchsorted(self.midpoints, w.contiguous()))]


def fit_bcq(w: torch.Tensor, bits: int, iterations: int = 15) -> tuple[torch.Tensor, torch.Tensor]:
    """Alphas [R, q] (positive, decreasing) and signs [R, G, q] minimizing
    ||w - signs @ alpha||^2 per row of w [R, G]: alternating least squares and nearest-value
    signs from two starts, the better kept per row. The greedy start (alpha_i = mean |r_i| of
    the residual, ShiftAddLLM's) is good at 1-2 bits; at 3-4 bits it stalls in a local minimum
    that the uniform start (alphas a * 2**(q-1-i): the 2**q levels of a symmetric uniform
    grid spanning 0.85 of the range) escapes: relative error 0.031 against 0.033 at 3 bits,
    0.0077 against 0.0099 at 4, on Gaussian groups of 64."""
    w = w.float()
    residual = w.clone()
    alphas, signs = [], []
    for _ in range(bits):
        a = residual.abs().mean(-1)
        s = torch.where(residual >= 0, 1.0, -1.0)
        residual = residual - a[:, None] * s
        alphas.append(a)
        signs.append(s)
    starts = [torch.stack(alphas, -1)]
    if bits > 1:
        powers = torch.tensor([2.0 ** (bits - 1 - i) for i in range(bits)], device=w.device)
        starts.append((0.85 * w.abs().amax(-1) / ((1 << bits) - 1))[:, None] * powers)
    best_alpha, best_b, best = None, None, None
    for alpha in starts:
        alpha, b = _alternate(w, alpha, nearest(w, alpha), iterations)
        err = _error(w, b, alpha)
        if best is None:
            best_alpha, best_b, best = alpha, b, err
            continue
        better = err < best
        best_alpha = torch.where(better[:, None], alpha, best_alpha)
        best_b = torch.where(better[:, None, None], b, best_b)
        best = torch.minimum(err, best)
    return _canonical(best_alpha, best_b)


def _alternate(w: torch.Tensor, alpha: torch.Tensor, b: torch.Tensor, iterations: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Least-squares alphas and nearest-value signs in turn while some row improves."""
    best = _error(w, b, alpha)
    for _ in range(iterations):
        new_alpha = _least_squares(w, b, alpha)
        new_b = nearest(w, new_alpha)
        err = _error(w, new_b, new_alpha)
        better = err < best
        if not bool(better.any()):
            break
        alpha = torch.where(better[:, None], new_alpha, alpha)
        b = torch.where(better[:, None, None], new_b, b)
        best = torch.minimum(err, best)
    return alpha, b


def _error(w: torch.Tensor, b: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    return (w - (b * alpha[:, None, :]).sum(-1)).pow(2).sum(-1)


def _least_squares(w: torch.Tensor, b: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """Per row, the alphas minimizing ||w - b @ alpha|| for signs b [R, G, q]; rows whose
    system is singular (two planes equal up to sign) keep their alphas."""
    gram = b.transpose(1, 2) @ b  # [R, q, q]
    rhs = (b.transpose(1, 2) @ w[:, :, None])[..., 0]
    solution, info = torch.linalg.solve_ex(gram.double(), rhs.double())
    ok = (info == 0) & torch.isfinite(solution).all(-1)
    return torch.where(ok[:, None], solution.float(), alpha)


def _canonical(alpha: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Alphas made positive (a negative one flips its plane) and sorted decreasing."""
    flip = torch.where(alpha < 0, -1.0, 1.0)
    alpha, b = alpha * flip, b * flip[:, None, :]
    order = alpha.argsort(-1, descending=True)
    return alpha.gather(-1, order), b.gather(-1, order[:, None, :].expand_as(b))


HEADROOM = 4.0  # row scale / the row's largest weight: factors reach 1.875 of the row scale


def _row_scales(w: torch.Tensor) -> torch.Tensor:
    """Per row of w [N, K], the scale the factors multiply: HEADROOM times its largest
    magnitude. The grid is floating (3 mantissa bits at every exponent), so the headroom costs
    no precision; it leaves room for the weights that error compensation pushes past the
    original range (a saturated factor cannot absorb the error fed to it, and the sweep then
    diverges: seen on MiniLM's first FFN output at 3 bits)."""
    return (HEADROOM * w.abs().amax(-1)).clamp_min(torch.finfo(torch.float32).tiny)


def _on_grid(alpha: torch.Tensor, row: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The scale codes of alphas [N, q] on the rows' grids, and the alphas they stand for."""
    codes = encode_scales(alpha / row[:, None])
    return codes, row[:, None] * scale_factors(codes)


@dataclass(frozen=True)
class QuantizedLinear:
    """A quantized weight, and how far its output is from the original's on calibration
    inputs: `output_error` = tr(dW H dW^T) / tr(W H W^T) (relative squared error of W x), or
    the relative squared weight error without a Hessian."""

    weight: ShiftAddWeight
    output_error: float


def shift_add_quantize(w: torch.Tensor, bits: int, group: int, hessian: torch.Tensor | None = None, iterations: int = 15) -> QuantizedLinear:
    """ShiftAddLLM's reparameterization of w [N, K] (module doc): `bits` sign planes, groups
    of `group` input channels, group factors that are additive powers of two on a per-row
    scale. With `hessian` [K, K] (X^T X of calibration inputs), GPTQ-style error compensation
    minimizes the output error; without, the weight error."""
    w = w.detach().float()
    n, k = w.shape
    if k % group or group % 8:
        raise ValueError(f"shift-add: group {group} must be a multiple of 8 that divides the input dim {k}")
    groups = k // group
    row = _row_scales(w)
    first = fit_bcq(w.reshape(n * groups, group), bits, iterations)[0] if hessian is None else None
    codes = torch.empty(bits, n, groups, dtype=torch.uint8)
    signs = torch.empty(bits, n, k)
    u = _inverse_hessian_factor(hessian, w) if hessian is not None else None
    work = w.clone()
    for g in range(groups):
        cols = slice(g * group, (g + 1) * group)
        alpha = first.reshape(n, groups, bits)[:, g] if u is None else fit_bcq(work[:, cols], bits, iterations)[0]
        c, a = _on_grid(alpha, row)
        codes[:, :, g] = c.t()
        if u is None:
            signs[:, :, cols] = nearest(w[:, cols], a).permute(2, 0, 1)
            continue
        block = work[:, cols].clone()
        errors = torch.zeros_like(block)
        levels = Levels(a)
        for j in range(group):
            col = g * group + j
            s = levels.signs(block[:, j : j + 1])[:, 0, :]  # [N, q]
            signs[:, :, col] = s.t()
            err = (block[:, j] - (s * a).sum(-1)) / u[col, col]
            block[:, j:] -= err[:, None] * u[col, col : (g + 1) * group][None, :]
            errors[:, j] = err
        work[:, (g + 1) * group :] -= errors @ u[cols, (g + 1) * group :]
    weight = ShiftAddWeight(pack_signs(signs), codes, row)
    out = QuantizedLinear(weight, relative_output_error(w, weight.dense(), hessian))
    if hessian is not None and relative_output_error(w, weight.dense(), None) > DIVERGED:
        # Compensation ran away: it pushed the error into directions the calibration inputs
        # barely span (H nearly singular there), so the calibration error looks small while the
        # weight is further from w than zero is. Seen on MiniLM's first FFN output at 3 bits
        # (weight error 2.4, embeddings' cosine 0.35). The weight-only fit is safe.
        plain = shift_add_quantize(w, bits, group, None, iterations)
        return QuantizedLinear(plain.weight, relative_output_error(w, plain.weight.dense(), hessian))
    return out


def _inverse_hessian_factor(hessian: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """GPTQ's upper Cholesky factor of H^-1, H dampened (and dead inputs, never nonzero in
    calibration, made harmless: their columns of w are quantized as they are)."""
    h = hessian.double().clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    h += DAMP * torch.diag(h).mean() * torch.eye(h.shape[0], dtype=h.dtype)
    inverse = torch.cholesky_inverse(torch.linalg.cholesky(h))
    return torch.linalg.cholesky(inverse, upper=True).float()


def relative_output_error(w: torch.Tensor, approx: torch.Tensor, hessian: torch.Tensor | None) -> float:
    """tr(dW H dW^T) / tr(W H W^T): the squared error of W x relative to W x's own, summed over
    the calibration inputs (H = X^T X); the relative weight error without H."""
    delta = (approx - w).double()
    if hessian is None:
        return float(delta.pow(2).sum() / w.double().pow(2).sum().clamp_min(1e-30))
    h = hessian.double()
    return float(((delta @ h) * delta).sum() / ((w.double() @ h) * w.double()).sum().clamp_min(1e-30))


@dataclass(frozen=True)
class RoundToNearest:
    """Group-wise asymmetric round-to-nearest (the baseline): codes in [0, 2**bits), an fp16
    scale and zero per row and group of input channels."""

    dense: torch.Tensor  # the dequantized weight, fp32 [N, K]
    nbytes: int  # packed codes plus fp16 scales and zeros


def rtn_quantize(w: torch.Tensor, bits: int, group: int) -> RoundToNearest:
    w = w.detach().float()
    n, k = w.shape
    if k % group:
        raise ValueError(f"rtn: group {group} does not divide the input dim {k}")
    g = w.reshape(n, k // group, group)
    lo, hi = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
    levels = (1 << bits) - 1
    scale = ((hi - lo) / levels).clamp_min(1e-8).half().float()
    zero = lo.half().float()
    codes = ((g - zero) / scale).round().clamp(0, levels)
    dense = (codes * scale + zero).reshape(n, k)
    nbytes = math.ceil(n * k * bits / 8) + n * (k // group) * 4
    return RoundToNearest(dense, nbytes)
