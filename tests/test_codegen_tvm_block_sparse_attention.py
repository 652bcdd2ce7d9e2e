"""Tests of the TVM lowering of compiler::block_sparse_attention
(compiler.codegen.tvm.block_sparse_attention): the host kernel against the op's reference on
random layouts (GQA and MHA, lengths the blocks do not divide, two batch entries with layouts of
their own, rows that list no block, blocks of 64 and 32), the full layout against dense causal
SDPA, entries the kernel must not visit, one build serving every length, the work order across
threads, the graph path, and what falls back to the reference.

Tolerance: the kernel sums scores, exponentials and products in another order than the reference
(register tiles, vector lanes, block-by-block rescaling of the online softmax) and its exp is a
polynomial a few ulp from the correctly rounded one. Outputs are convex combinations of V rows
(|V| ~ 1 here), so at D = 64 and these lengths this moves them by ~1e-6 (measured <= 7e-7); 1e-5
absolute and relative leaves room and is far below a real bug (a block missed or visited twice,
a wrong mask or rescale moves outputs by 1e-2 or more).
"""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv, StatelessSymbolicContext

import compiler.codegen.tvm  # noqa: F401 - registers the tvm lowering
from compiler.capture import capture_export
from compiler.codegen import lower_graph
from compiler.codegen.tvm import block_sparse_attention, build
from compiler.errors import Unsupported
from compiler.ops import LoweringRequest
from compiler.ops import block_sparse_attention as BLOCK_SPARSE_ATTENTION
from compiler.targets import load_target
from models import FunctionModule

FP32 = dict(rtol=1e-5, atol=1e-5)
GQA, MHA = (4, 2), (2, 2)

pytestmark = pytest.mark.usefixtures("kernel_cache_in_tmp")


def _fake(t: torch.Tensor, mode: FakeTensorMode, dynamic: list[bool]) -> torch.Tensor:
    """A FakeTensor for `t` whose dims marked in `dynamic` are symbolic, as a dynamic capture gives."""
    dims = [DimDynamic.DYNAMIC if d else DimDynamic.STATIC for d in dynamic]
    return mode.from_tensor(t, symbolic_context=StatelessSymbolicContext(dynamic_sizes=dims))


def _lower(q_heads, kv_heads, block_size=64, d=64, dtype=torch.float32, target="host", run_here=True):
    """The kernel for a call site with these heads and block, batch, length and M symbolic."""
    mode = FakeTensorMode(shape_env=ShapeEnv())
    q = _fake(torch.empty(2, q_heads, 8, d, dtype=dtype), mode, [True, False, True, False])
    kv = _fake(torch.empty(2, kv_heads, 8, d, dtype=dtype), mode, [True, False, True, False])
    kv_blocks = _fake(torch.zeros(2, q_heads, 3, 3, dtype=torch.int32), mode, [True, False, True, True])
    kv_counts = _fake(torch.zeros(2, q_heads, 3, dtype=torch.int32), mode, [True, False, True])
    req = LoweringRequest((q, kv, kv, kv_blocks, kv_counts, d**-0.5, block_size, 0.1), load_target(target), run_here)
    return BLOCK_SPARSE_ATTENTION.lowerings["tvm"](req)


@pytest.fixture(scope="module")
def kernels():
    """Kernels by (Hq, Hkv, block), built on first use and shared by the module's tests."""
    built = {}

    def get(q_heads, kv_heads, block_size=64):
        key = (q_heads, kv_heads, block_size)
        if key not in built:
            built[key] = _lower(q_heads, kv_heads, block_size)
        return built[key]

    return get


def _inputs(batch, heads, length, d=64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads[0], length, d, generator=gen)
    k = torch.randn(batch, heads[1], length, d, generator=gen)
    v = torch.randn(batch, heads[1], length, d, generator=gen)
    return q, k, v


def _layout(batch, q_heads, length, block_size, density, seed=0, empty_rows=0.0):
    """A random layout: each query block lists its diagonal block and each earlier block with
    probability `density`, in increasing order; a fraction `empty_rows` of the query blocks list
    nothing. M is the longest list; past its count, a row holds the blocks it does not list."""
    gen = torch.Generator().manual_seed(seed)
    nb = -(-length // block_size)
    listed = (torch.rand(batch, q_heads, nb, nb, generator=gen) < density).tril(-1)
    listed |= torch.eye(nb, dtype=torch.bool)
    listed &= torch.rand(batch, q_heads, nb, 1, generator=gen) >= empty_rows
    counts = listed.sum(-1, dtype=torch.int32)
    # Listed blocks first, in increasing order, then the unlisted ones.
    order = torch.sort((~listed).int() * nb + torch.arange(nb), dim=-1).values % nb
    m = max(int(counts.max()), 1)
    return order[..., :m].to(torch.int32).contiguous(), counts


def _check(kernel, q, k, v, kv_blocks, kv_counts, block_size=64):
    scale = q.shape[-1] ** -0.5
    out = kernel.runner(q, k, v, kv_blocks, kv_counts, scale, block_size, 0.5)
    expected = BLOCK_SPARSE_ATTENTION.reference(q, k, v, kv_blocks, kv_counts, scale, block_size, 0.5)
    # The op's layout, [B, S, Hq, Dv] viewed as [B, Hq, S, Dv]: captured graphs view its transpose.
    assert out.shape == expected.shape and out.stride() == expected.stride()
    torch.testing.assert_close(out, expected, **FP32)
    return out


# The kernel against the reference ---------------------------------------------------------------


@pytest.mark.parametrize("length", [64, 200, 333])
@pytest.mark.parametrize("heads", [GQA, MHA], ids=["gqa", "mha"])
def test_matches_reference_on_random_layouts(kernels, heads, length):
    # 200 and 333 end mid-block (the last diagonal block is short); two batch entries and every
    # query head have layouts of their own.
    q, k, v = _inputs(2, heads, length, seed=length)
    _check(kernels(*heads), q, k, v, *_layout(2, heads[0], length, 64, density=0.4, seed=length))


@pytest.mark.parametrize("length", [32, 100, 250])
def test_blocks_of_32(kernels, length):
    q, k, v = _inputs(2, GQA, length, seed=length)
    _check(kernels(*GQA, 32), q, k, v, *_layout(2, GQA[0], length, 32, density=0.3, seed=length), block_size=32)


def test_rows_that_list_no_block_give_zero(kernels):
    q, k, v = _inputs(2, GQA, 300)
    kv_blocks, kv_counts = _layout(2, GQA[0], 300, 64, density=0.5, empty_rows=0.4)
    kv_counts[1] = 0  # the whole second batch entry sees nothing
    assert (kv_counts[0] == 0).any() and (kv_counts[0] > 0).any()
    out = _check(kernels(*GQA), q, k, v, kv_blocks, kv_counts)
    rows = kv_counts.repeat_interleave(64, -1)[..., :300] == 0
    assert not out[rows].any() and out[~rows].abs().amax(-1).gt(0).all()


@pytest.mark.parametrize("heads", [GQA, MHA], ids=["gqa", "mha"])
def test_full_layout_is_dense_causal_attention(kernels, heads):
    q, k, v = _inputs(2, heads, 250)
    nb = 4
    kv_blocks = torch.arange(nb, dtype=torch.int32).expand(2, heads[0], nb, nb).contiguous()
    kv_counts = torch.arange(1, nb + 1, dtype=torch.int32).expand(2, heads[0], nb).contiguous()
    out = kernels(*heads).runner(q, k, v, kv_blocks, kv_counts, 0.125, 64, 1.0)
    dense = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.125, enable_gqa=heads[0] > heads[1])
    torch.testing.assert_close(out, dense, **FP32)


def test_entries_past_the_count_and_off_the_contract_are_not_visited(kernels):
    q, k, v = _inputs(2, GQA, 300)
    kv_blocks, kv_counts = _layout(2, GQA[0], 300, 64, density=0.5)
    expected = _check(kernels(*GQA), q, k, v, kv_blocks, kv_counts)
    # Past the count anything may stand (block 0, out of range, negative): no entry there is read.
    m = kv_blocks.shape[-1]
    listed = torch.arange(m) < kv_counts[..., None]
    junk = torch.where(listed, kv_blocks, 0)
    junk = torch.cat([junk, torch.full_like(kv_blocks, 10**6), torch.full_like(kv_blocks, -7)], -1)
    assert torch.equal(kernels(*GQA).runner(q, k, v, junk, kv_counts, 0.125, 64, 0.5), expected)
    # Within the count, entries that break the contract (negative, repeated, past the diagonal or
    # out of range, out of order) are skipped rather than read out of bounds, and a count past M
    # stops at M.
    rows = []
    for row, count in zip(kv_blocks.view(-1, m).tolist(), kv_counts.flatten().tolist()):
        blocks = row[:count]
        repeated = [b for block in blocks for b in (block, block)]
        rows.append([-1, *repeated[:-1], blocks[-1] + 1, 10**6, *repeated[-1:], blocks[0]])
    width = max(map(len, rows))
    broken = torch.tensor([row + [-1] * (width - len(row)) for row in rows], dtype=torch.int32)
    broken = broken.view(*kv_counts.shape, width)
    counts = torch.full_like(kv_counts, broken.shape[-1] + 3)
    assert torch.equal(kernels(*GQA).runner(q, k, v, broken, counts, 0.125, 64, 0.5), expected)


def test_misaligned_and_strided_inputs(kernels):
    q, k, v = _inputs(1, GQA, 150)
    # [B, S, H, D] transposed to [B, H, S, D], as HF models give them, and a tensor that starts
    # 4 bytes into its storage: the runner copies what the kernel cannot read in place.
    qs = q.transpose(1, 2).contiguous().transpose(1, 2)
    ks = torch.cat([torch.zeros(1), k.flatten()])[1:].view(k.shape)
    _check(kernels(*GQA), qs, ks, v, *_layout(1, GQA[0], 150, 64, density=0.5))


# Builds, the work order, the graph --------------------------------------------------------------


def test_one_build_serves_every_length_and_batch(monkeypatch, kernels):
    kernel = kernels(*GQA)
    compiles = []
    real_compile = build._compile
    monkeypatch.setattr(build, "_compile", lambda *a: compiles.append(a) or real_compile(*a))
    assert kernel.name == "block_sparse_attention_float32_hq4_hkv2_d64_dv64_block64"
    for batch, length in ((1, 1), (3, 70), (1, 129)):
        q, k, v = _inputs(batch, GQA, length, seed=length)
        _check(kernel, q, k, v, *_layout(batch, GQA[0], length, 64, density=0.5, seed=length))
    assert not compiles


@pytest.mark.parametrize("threads", [1, 2, 3, 16])
def test_work_order_gives_each_thread_an_equal_share(threads):
    gen = torch.Generator().manual_seed(threads)
    # Skewed counts: a few heavy rows among many light ones, some past M or negative.
    counts = torch.randint(0, 4, (2, 3, 21), generator=gen, dtype=torch.int32)
    counts[0, 1, :5] = 40
    counts[1, 2, 0], counts[1, 2, 1] = 90, -3
    order = block_sparse_attention._item_order(counts, 50, threads)
    assert order.dtype == torch.int32 and order.numel() % threads == 0
    items = order[order >= 0]
    assert torch.equal(items.sort().values, torch.arange(counts.numel(), dtype=torch.int32))
    work = torch.cat([counts.flatten().clamp(0, 50), torch.zeros(1, dtype=torch.int32)])
    shares = work[order.long()].view(threads, -1).sum(-1)  # -1 slots pick the appended 0
    assert int(shares.max() - shares.min()) <= int(work.max())


def test_lower_graph_replaces_the_op_with_the_kernel():
    q, k, v = _inputs(1, GQA, 130)
    kv_blocks, kv_counts = _layout(1, GQA[0], 130, 64, density=0.5)

    def f(q, k, v, kv_blocks, kv_counts):
        return torch.ops.compiler.block_sparse_attention(q, k, v, kv_blocks, kv_counts, 0.125, 64, 0.5)

    gm = capture_export(FunctionModule(f), (q, k, v, kv_blocks, kv_counts)).gm
    executable, report = lower_graph(gm, load_target("host"))
    assert [kernel.name for kernel in report.kernels] == ["block_sparse_attention_float32_hq4_hkv2_d64_dv64_block64"]
    assert not report.fallbacks
    torch.testing.assert_close(executable(q, k, v, kv_blocks, kv_counts)[0], f(q, k, v, kv_blocks, kv_counts), **FP32)


# What the kernel declines -----------------------------------------------------------------------


def test_a_layout_the_build_does_not_fit_raises_the_ops_error(kernels):
    q, k, v = _inputs(1, GQA, 130)
    kv_blocks, kv_counts = _layout(1, GQA[0], 130, 64, density=0.5)
    with pytest.raises(ValueError, match="layout must be"):
        kernels(*GQA).runner(q, k, v, kv_blocks[:, :, :2], kv_counts[:, :, :2], 0.125, 64, 0.5)


@pytest.mark.parametrize(
    "dtype, block_size, match",
    [(torch.float16, 64, "float32"), (torch.bfloat16, 64, "float32"), (torch.float32, 48, "blocks of 64 or 32")],
)
def test_declined_call_sites_fall_back_with_a_reason(dtype, block_size, match):
    with pytest.raises(Unsupported, match=match):
        _lower(*GQA, block_size, dtype=dtype, run_here=False)
    q, k, v = (t.to(dtype) for t in _inputs(1, GQA, 96))
    kv_blocks, kv_counts = _layout(1, GQA[0], 96, block_size, density=0.5)

    def f(q, k, v, kv_blocks, kv_counts):
        return torch.ops.compiler.block_sparse_attention(q, k, v, kv_blocks, kv_counts, 0.125, block_size, 0.5)

    gm = capture_export(FunctionModule(f), (q, k, v, kv_blocks, kv_counts)).gm
    with pytest.warns(UserWarning, match=match):
        executable, report = lower_graph(gm, load_target("host"))
    assert not report.kernels and len(report.fallbacks) == 1 and re.search(match, report.fallbacks[0])
    assert torch.equal(executable(q, k, v, kv_blocks, kv_counts)[0], f(q, k, v, kv_blocks, kv_counts))


def test_other_targets_and_head_dims_are_unsupported():
    with pytest.raises(Unsupported, match="target kind 'cuda'"):
        _lower(*GQA, target="h100")
    with pytest.raises(Unsupported, match="multiples of"):
        _lower(*GQA, d=12)


def test_source_only_when_not_asked_to_run(tmp_path):
    kernel = _lower(*GQA, run_here=False)
    assert kernel.runner is None and "T.prim_func" in kernel.source and "not built" in kernel.note
    assert not list(tmp_path.glob("tvm/*.so"))
