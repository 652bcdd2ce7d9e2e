"""The cost model against published GPU kernel measurements.

Each row of `PUBLISHED` is one number from a paper, a library's README or its benchmark log,
with its source (figure, table or file) and the setting it was measured in. The test builds the
same work from `TensorInfo` shapes (`attention_work`, the ATen `mm` / `mul` rules), prices it with
`CostModel(target).estimate`, converts the prediction to the metric the source reports, counted
the source's way, and asserts `published / factor <= predicted <= published * factor`.

Conventions:

- Published timings are device-side kernel times (CUDA events, `triton.testing.do_bench`,
  kineto) over back-to-back launches, where the CPU launch cost overlaps execution. The model's
  `launch_overhead` (a few microseconds per one-by-one launch) is therefore left out:
  `kernel_seconds` is the roofline's `max(compute, memory)`.
- FlashAttention-2/3 count forward FLOPs as 4 * seqlen^2 * head_dim * heads per batch element,
  halved with a causal mask (Dao 2023, Sec. 4.1; Shah et al. 2024, Sec. 4.1); the model counts
  the attended (query, key) pairs, s(s+1)/2 when causal, which agrees to 1/s.
- H800 SXM5 rows (DeepSeek's libraries) are priced on the `h100` target: the H800 is the H100
  SXM5's GH100 silicon with the same HBM3 (3.35 TB/s) and dense FP8/BF16 tensor rates; it differs
  in NVLink bandwidth and FP64, which no row here uses.

Factors: 1.25 for rows the roofline describes directly: large GEMMs, streaming, and fused
attention, where GPU targets take the largest of the tensor-core, CUDA-core and SFU times
(`overlapped_units`) because FlashAttention-3 overlaps softmax with the matmuls (Shah et al.
2024, Sec. 3.1-3.2: "exponential can take 50% of the cycle compared to matmul"); summing the
three read 25-30% low. 1.5 where the published figure is an "up to" without its configuration.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable

import pytest
import torch

from compiler.cost_model import CostModel, Estimate, TensorInfo, Work, attention_work
from compiler.cost_model.rules import op_cost

aten = torch.ops.aten
FP16, BF16, FP8 = torch.float16, torch.bfloat16, torch.float8_e4m3fn


def kernel_seconds(est: Estimate) -> float:
    """Predicted device time of one kernel: the roofline without the CPU launch overhead."""
    return max(float(est.roofline.compute), float(est.roofline.memory))


def price(target: str, work: Work) -> float:
    return kernel_seconds(CostModel(target).estimate(work))


# -- the kernels, as the sources set them up -------------------------------------------------


def flash_attention(target: str, batch: int, seqlen: int, heads: int, head_dim: int, causal: bool, metric: str = "TFLOP/s") -> float:
    """Forward attention as in the FlashAttention-2/3 benchmarks (Q, K, V, O all
    batch x heads x seqlen x head_dim, fp16): TFLOP/s counted the papers' way, or ms."""
    q, k, v, o = (TensorInfo((batch, heads, seqlen, head_dim), FP16) for _ in range(4))
    seconds = price(target, attention_work(q, k, v, [o], causal))
    if metric == "ms":
        return seconds * 1e3
    flops = 4 * batch * seqlen**2 * heads * head_dim / (2 if causal else 1)
    return flops / seconds / 1e12


def gemm(target: str, m: int, n: int, k: int, dtype: torch.dtype, out_dtype: torch.dtype, metric: str = "TFLOP/s") -> float:
    """C[m, n] = A[m, k] @ B[k, n], priced through the model's `aten.mm` rule. TFLOP/s as
    2mnk / t; GB/s as DeepGEMM counts it, (A + B + C bytes) / t (scaling factors left out)."""
    a, b, c = TensorInfo((m, k), dtype), TensorInfo((k, n), dtype, constant=True), TensorInfo((m, n), out_dtype)
    work = op_cost(aten.mm.default, (a, b), {}, [c]).work
    seconds = price(target, work)
    if metric == "GB/s":
        return (a.nbytes + b.nbytes + c.nbytes) / seconds / 1e9
    return 2 * m * n * k / seconds / 1e12


def stream_scale(target: str, n: int) -> float:
    """STREAM 'scale', A[i] = B[i] * c over n doubles, through the model's `aten.mul` rule;
    GB/s counting one load and one store stream, as gpu-benches does."""
    return 2 * n * 8 / price(target, stream_scale_work(n)) / 1e9


def stream_scale_work(n: int) -> Work:
    b, a = TensorInfo((n,), torch.float64), TensorInfo((n,), torch.float64)
    return op_cost(aten.mul.Tensor, (b, 3.0), {}, [a]).work


def mla_decode(target: str, batch: int, q_len: int, kv_len: int, q_heads: int, metric: str) -> float:
    """FlashMLA's decode benchmark (tests/test_flash_mla.py): one latent KV head of width 576
    whose first 512 columns are V, bf16, paged cache. FLOPs = q_len * kv_tokens * q_heads *
    (576 + 512) * 2 and bytes = (KV cache + Q + O) * 2, as the benchmark prints them."""
    seconds = price(target, mla_decode_work(batch, q_len, kv_len, q_heads))
    if metric == "GB/s":
        return (batch * kv_len * MLA_D + batch * q_len * q_heads * (MLA_D + MLA_DV)) * 2 / seconds / 1e9
    return q_len * batch * kv_len * q_heads * (MLA_D + MLA_DV) * 2 / seconds / 1e12


MLA_D, MLA_DV = 576, 512


def mla_decode_work(batch: int, q_len: int, kv_len: int, q_heads: int) -> Work:
    q = TensorInfo((batch, q_heads, q_len, MLA_D), BF16)
    k = TensorInfo((batch, 1, kv_len, MLA_D), BF16)
    v = TensorInfo((batch, 1, kv_len, MLA_DV), BF16)
    o = TensorInfo((batch, q_heads, q_len, MLA_DV), BF16)
    # Non-causal: the benchmark's causal mask is bottom-right aligned, so with q_len <= 2 it
    # drops at most one of 8192 keys per query (SDPA's top-left alignment would drop nearly all).
    work = attention_work(q, k, v, [o], causal=False)
    # V is a view of K's first 512 columns: the kernel reads the latent cache once.
    return replace(work, bytes_read=q.nbytes + k.nbytes)


# -- the published table -----------------------------------------------------------------------


@dataclass(frozen=True)
class Published:
    id: str
    target: str
    value: float
    unit: str
    factor: float
    source: str
    predict: Callable[[], float]


PUBLISHED = [
    # FlashAttention-2 (Tri Dao, "FlashAttention-2: Faster Attention with Better Parallelism and
    # Work Partitioning", arXiv:2307.08691, 2023), Sec. 4: "FlashAttention-2 reaches up to 230
    # TFLOPs/s, 73% of the theoretical maximum TFLOPs/s on A100 GPUs" (A100 80GB SXM4, fp16;
    # setting of Sec. 4.1: 16k tokens per batch, hidden 2048). The per-bar values of Fig. 5 exist
    # only as images, so the row takes this headline peak, at the benchmark's most
    # compute-dense forward setting: head dim 128, seqlen 16k, no mask. Factor 1.25: see above.
    Published("fa2-fwd-a100-hdim128-16k", "a100", 230, "TFLOP/s", 1.25, "Dao 2023, arXiv:2307.08691, Sec. 4",
              lambda: flash_attention("a100", 1, 16384, 16, 128, causal=False)),
    # FlashAttention-3 (Shah, Bikshandi, Zhang, Thakkar, Ramani, Dao, "FlashAttention-3: Fast
    # and Accurate Attention with Asynchrony and Low-precision", arXiv:2407.08608v2, 2024),
    # Fig. 5 "Attention forward speed (FP16/BF16) on H100 GPU" (H100 80GB SXM5; 16k tokens per
    # batch, hidden 2048): bar labels at seqlen 16k.
    Published("fa3-fwd-h100-hdim128-16k", "h100", 648, "TFLOP/s", 1.25, "Shah et al. 2024, arXiv:2407.08608, Fig. 5(c)",
              lambda: flash_attention("h100", 1, 16384, 16, 128, causal=False)),
    Published("fa3-fwd-h100-hdim128-16k-causal", "h100", 616, "TFLOP/s", 1.25, "Shah et al. 2024, arXiv:2407.08608, Fig. 5(d)",
              lambda: flash_attention("h100", 1, 16384, 16, 128, causal=True)),
    Published("fa3-fwd-h100-hdim256-16k", "h100", 756, "TFLOP/s", 1.25, "Shah et al. 2024, arXiv:2407.08608, Fig. 5(e)",
              lambda: flash_attention("h100", 1, 16384, 8, 256, causal=False)),
    # Same paper, Table 2 (pipelining ablation): {batch, seqlen, nheads, hdim} = {4, 8448, 16,
    # 128}, non-causal fp16, 3.538 ms (661 TFLOP/s). A time row: predicted ms vs published ms.
    Published("fa3-fwd-h100-table2-time", "h100", 3.538, "ms", 1.25, "Shah et al. 2024, arXiv:2407.08608, Table 2",
              lambda: flash_attention("h100", 4, 8448, 16, 128, causal=False, metric="ms")),
    # cuBLAS BF16 GEMM, M = N = K = 8192, H100 SXM: 797.8 TFLOP/s (1.378 ms), kernel 0 (the
    # cuBLAS baseline) in github.com/pranjalssh/fast.cu README.md, "Benchmarks" (N=2048*4).
    # Factor 1.25: a large GEMM is the case `achievable.matmul` is meant to describe.
    Published("cublas-bf16-gemm-8192-h100", "h100", 797.8, "TFLOP/s", 1.25, "pranjalssh/fast.cu README.md, Benchmarks, kernel 0",
              lambda: gemm("h100", 8192, 8192, 8192, BF16, BF16)),
    # DeepGEMM FP8 GEMM (1x128 / 128x128 block scaling, BF16 out) on H800 SXM5, README.md
    # "Normal GEMMs for dense models" table as of github.com/deepseek-ai/DeepGEMM commit
    # 989c9e3 (2025-04-09). Metrics from tests/test_core.py: 2mnk/t and (mk + kn + 2mn)/t.
    # Compute-bound prefill shape M=4096, N=7168, K=16384: 1520 TFLOPS.
    Published("deepgemm-fp8-4096x7168x16384-h800", "h100", 1520, "TFLOP/s", 1.25, "deepseek-ai/DeepGEMM README.md @989c9e3, dense table",
              lambda: gemm("h100", 4096, 7168, 16384, FP8, BF16)),
    # Memory-bound decode shape M=64, N=7168, K=16384: 2668 GB/s (the weight stream dominates).
    Published("deepgemm-fp8-64x7168x16384-h800", "h100", 2668, "GB/s", 1.25, "deepseek-ai/DeepGEMM README.md @989c9e3, dense table",
              lambda: gemm("h100", 64, 7168, 16384, FP8, BF16, metric="GB/s")),
    # FlashMLA (github.com/deepseek-ai/FlashMLA, README.md at the initial commit 414a2f3,
    # 2025-02-21): "up to 3000 GB/s in memory-bound configuration and 580 TFLOPS in
    # computation-bound configuration on H800 SXM5", from tests/test_flash_mla.py (batch 128,
    # 8192 cached tokens, h_kv = 1, d = 576, dv = 512, bf16). The memory-bound row takes the
    # sweep's lightest setting (16 query heads, 1 query token); the compute-bound row its
    # heaviest (128 query heads, 2 query tokens), the settings the two "up to" figures bound.
    Published("flashmla-decode-mem-h800", "h100", 3000, "GB/s", 1.25, "deepseek-ai/FlashMLA README.md @414a2f3",
              lambda: mla_decode("h100", 128, 1, 8192, 16, "GB/s")),
    Published("flashmla-decode-compute-h800", "h100", 580, "TFLOP/s", 1.5, "deepseek-ai/FlashMLA README.md @414a2f3",
              lambda: mla_decode("h100", 128, 2, 8192, 128, "TFLOP/s")),
    # STREAM "scale" on NVIDIA A100-SXM4-80GB at full occupancy: 1737 GB/s over 256Mi doubles
    # per array (github.com/RRZE-HPC/gpu-benches, gpu-stream/a100_80.txt, last row; device name
    # in device_order.py; triad reaches 1794 GB/s, store-only init 1894 GB/s).
    Published("stream-scale-a100", "a100", 1737, "GB/s", 1.25, "RRZE-HPC/gpu-benches gpu-stream/a100_80.txt",
              lambda: stream_scale("a100", 256 * 2**20 + 2)),
]


@pytest.mark.parametrize("row", PUBLISHED, ids=[r.id for r in PUBLISHED])
def test_prediction_within_factor_of_published(row: Published):
    predicted = row.predict()
    low, high = row.value / row.factor, row.value * row.factor
    assert low <= predicted <= high, (
        f"{row.id} on {row.target}: predicted {predicted:.4g} {row.unit}, published {row.value:.4g} {row.unit} "
        f"({row.source}); ratio {predicted / row.value:.2f} outside 1/{row.factor}..{row.factor}"
    )


def test_rows_are_in_the_regime_they_test():
    """The memory-bound rows must be priced as memory-bound and the others as compute-bound, or
    a row would pass for the wrong reason (a roofline term that does not bind)."""
    h100, a100 = CostModel("h100"), CostModel("a100")
    assert gemm_estimate("h100", 64, 7168, 16384).bound == "memory"
    assert gemm_estimate("h100", 4096, 7168, 16384).bound == "compute"
    assert h100.estimate(mla_decode_work(128, 1, 8192, 16)).bound == "memory"
    assert h100.estimate(mla_decode_work(128, 2, 8192, 128)).bound == "compute"
    assert a100.estimate(stream_scale_work(256 * 2**20 + 2)).bound == "memory"
    q, k, v, o = (TensorInfo((1, 16, 16384, 128), FP16) for _ in range(4))
    assert h100.estimate(attention_work(q, k, v, [o], False)).bound == "compute"


def gemm_estimate(target: str, m: int, n: int, k: int) -> Estimate:
    a, b, c = TensorInfo((m, k), FP8), TensorInfo((k, n), FP8, constant=True), TensorInfo((m, n), BF16)
    return CostModel(target).estimate(op_cost(aten.mm.default, (a, b), {}, [c]).work)


def test_sources_are_cited():
    for row in PUBLISHED:
        assert row.source and row.factor > 1 and row.value > 0, row.id
