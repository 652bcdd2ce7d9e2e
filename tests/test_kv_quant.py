"""KV cache quantization format (compiler.ops.kv_quant): packing, the round-trip error bound
each bit width implies, and `quantized_kv_attention`'s reference against attention by the
definition over the dequantized cache."""

from __future__ import annotations

import math

import pytest
import torch

from compiler.ops import kv_quant


@pytest.mark.parametrize("bits", kv_quant.BITS)
def test_pack_round_trips(bits: int) -> None:
    gen = torch.Generator().manual_seed(bits)
    codes = torch.randint(0, 1 << bits, (2, 3, 5, 64), generator=gen, dtype=torch.uint8)
    packed = kv_quant.pack(codes, bits)
    assert packed.dtype == torch.uint8 and packed.shape[-1] == 64 * bits // 8
    assert torch.equal(kv_quant.unpack(packed, bits), codes)
    # element i * per + j sits in bits [j * bits, (j + 1) * bits) of byte i
    per = 8 // bits
    j = 1 % per
    expected = (packed[..., 0].int() >> (j * bits)) & ((1 << bits) - 1)
    assert torch.equal(expected.to(torch.uint8), codes[..., j])


def test_pack_refuses_rows_that_do_not_fill_bytes() -> None:
    with pytest.raises(ValueError, match="multiple of 4"):
        kv_quant.pack(torch.zeros(3, 6, dtype=torch.uint8), 2)
    with pytest.raises(ValueError, match="bits must be one of"):
        kv_quant.pack(torch.zeros(3, 8, dtype=torch.uint8), 3)


@pytest.mark.parametrize("bits", kv_quant.BITS)
def test_keys_round_trip_within_half_a_step_per_channel_group(bits: int) -> None:
    gen = torch.Generator().manual_seed(0)
    k = torch.randn(1, 2, 96, 64, generator=gen) * torch.logspace(-2, 1, 64)  # outlier channels, as real keys have
    q = kv_quant.quantize_keys(k, bits, 32)
    assert q.scale.shape == (1, 2, 3, 64) and q.scale.dtype == torch.float16
    back = kv_quant.dequantize_keys(q, bits)
    # Each element is within half a step of its group; the step is the stored fp16 scale.
    # The fp32 arithmetic of code * scale + min adds at most a few ulps of the magnitude.
    step = q.scale.float().repeat_interleave(32, 2)
    err = (back - k).abs()
    assert bool((err <= step / 2 + 4 * torch.finfo(torch.float32).eps * k.abs().clamp_min(1)).all())
    # and the step is what the bit width implies: the group's range over 2**bits - 1 levels
    rng = k.view(1, 2, 3, 32, 64).amax(3) - k.view(1, 2, 3, 32, 64).amin(3)
    assert bool((q.scale.float() <= rng / ((1 << bits) - 1) * (1 + 2e-3) + 1e-7).all())


@pytest.mark.parametrize("bits", kv_quant.BITS)
def test_values_round_trip_within_half_a_step_per_token_group(bits: int) -> None:
    gen = torch.Generator().manual_seed(1)
    v = torch.randn(2, 3, 17, 64, generator=gen)
    q = kv_quant.quantize_values(v, bits, 32)
    assert q.scale.shape == (2, 3, 17, 2)
    back = kv_quant.dequantize_values(q, bits)
    step = q.scale.float().repeat_interleave(32, -1)
    assert bool(((back - v).abs() <= step / 2 + 1e-6).all())


def test_constant_groups_dequantize_within_fp16_rounding() -> None:
    # the min is rounded down to fp16 (at most one fp16 ulp, 2**-11 relative at 0.3), so the
    # range is that ulp at most and the error is half a step of it, or exactly 0 for 0
    k = torch.full((1, 1, 8, 8), 0.3)
    k[..., 0] = 0.0
    q = kv_quant.quantize_keys(k, 2, 8)
    back = kv_quant.dequantize_keys(q, 2)
    assert float((back - k).abs().max()) <= 0.3 * 2**-11
    assert bool((back[..., 0] == 0).all())


def test_keys_need_whole_groups() -> None:
    with pytest.raises(ValueError, match="whole groups of 32"):
        kv_quant.quantize_keys(torch.zeros(1, 1, 40, 8), 4, 32)


def _cache(bits: int, nq: int, nr: int, hkv: int = 2, d: int = 16, k_group: int = 8, v_group: int = 8, seed: int = 0):  # noqa: ANN202
    gen = torch.Generator().manual_seed(seed)
    k, v = torch.randn(1, hkv, nq, d, generator=gen), torch.randn(1, hkv, nq, d, generator=gen)
    kq, vq = kv_quant.quantize_keys(k, bits, k_group), kv_quant.quantize_values(v, bits, v_group)
    k_res, v_res = torch.randn(1, hkv, nr, d, generator=gen), torch.randn(1, hkv, nr, d, generator=gen)
    return kq, vq, k_res, v_res


@pytest.mark.parametrize("bits,nq,nr,sq", [(4, 24, 3, 1), (2, 0, 5, 1), (8, 16, 0, 1), (4, 16, 4, 3)])
def test_attention_reference_is_attention_over_the_dequantized_cache(bits: int, nq: int, nr: int, sq: int) -> None:
    kq, vq, k_res, v_res = _cache(bits, nq, nr)
    q = torch.randn(1, 4, sq, 16)
    out = torch.ops.compiler.quantized_kv_attention(q, kq.codes, kq.scale, kq.min, vq.codes, vq.scale, vq.min, k_res, v_res, 0.3, bits, 8)
    k = torch.cat([kv_quant.dequantize_keys(kq, bits), k_res], 2)
    v = torch.cat([kv_quant.dequantize_values(vq, bits), v_res], 2)
    n = k.shape[2]
    for h in range(4):
        scores = q[0, h] @ k[0, h // 2].T * 0.3
        # query i sits at position n - sq + i and sees keys up to it
        visible = torch.arange(n)[None, :] <= torch.arange(n - sq, n)[:, None]
        p = torch.softmax(scores.masked_fill(~visible, -math.inf), -1)
        torch.testing.assert_close(out[0, h], p @ v[0, h // 2], atol=1e-5, rtol=1e-5)


def test_attention_names_an_inconsistent_cache() -> None:
    kq, vq, k_res, v_res = _cache(4, 16, 2)
    q = torch.randn(1, 4, 1, 16)
    with pytest.raises(ValueError, match="k_scale/k_min"):
        torch.ops.compiler.quantized_kv_attention(q, kq.codes, kq.scale, kq.min, vq.codes, vq.scale, vq.min, k_res, v_res, 0.3, 4, 4)
    with pytest.raises(ValueError, match="k_codes must be"):
        torch.ops.compiler.quantized_kv_attention(q, kq.codes, kq.scale, kq.min, vq.codes, vq.scale, vq.min, k_res, v_res, 0.3, 2, 8)
