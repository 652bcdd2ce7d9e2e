"""Tests of the cost report (compiler.cost_model.report): the category table against the graph
estimate's own totals, the JSON and Markdown forms, the roofline plot (a valid PNG of the
expected size, an mm's point where the roofline formula puts it), binding shape symbols to
example sizes, and the report the driver keeps for a compilation (static and Dynamo graphs)."""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import pytest
import sympy
import torch

from compiler.backend import CompilerBackend
from compiler.capture import capture_export, split_example_inputs
from compiler.cost_model import CATEGORIES, CostModel, Work
from compiler.cost_model.model import GraphEstimate
from compiler.cost_model.report import (
    PLOT_DPI,
    PLOT_INCHES,
    CostReport,
    cost_json,
    cost_markdown,
    cost_table,
    example_bindings,
    group_kernels,
    roofline_plot,
    roofline_points,
    roofs,
    seconds,
    si,
)
from compiler.driver import CompileOptions, compile_graph
from compiler.targets import Hardware, load_target
from models import tiny_llama, token_inputs

PNG_SIZE = (round(PLOT_INCHES[0] * PLOT_DPI), round(PLOT_INCHES[1] * PLOT_DPI))
# mm of a (M, K) activation by a (K, N) fp32 weight: large enough to be compute-bound on an H100.
M, K, N = 256, 512, 1024


class MatMulRelu(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(K, N))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x @ self.weight).relu()


def png_size(path: Path) -> tuple[int, int]:
    """(width, height) from a PNG's IHDR chunk; fails unless the file is a PNG."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


@pytest.fixture(scope="module")
def llama_result():
    """tiny Llama compiled for h100 through the driver: its CostReport before/after the passes."""
    args, kwargs = split_example_inputs(token_inputs(8))
    captured = capture_export(tiny_llama(), args, kwargs)
    sample = captured.flatten_inputs(args, kwargs)
    return compile_graph(captured.gm, CompileOptions.make("h100"), sample_inputs=sample)


# -- the table ------------------------------------------------------------------------------------


def test_table_rows_are_the_graph_estimates_own_numbers(llama_result):
    before, after = llama_result.cost.before, llama_result.cost.after
    rows = cost_table(before, after)
    assert [r["category"] for r in rows] == [*CATEGORIES, "total"]
    for side, graph in (("before", before), ("after", after)):
        by_category = graph.by_category()
        for r in rows[:-1]:
            assert r[f"{side}_s"] == by_category[r["category"]]
        assert rows[-1][f"{side}_s"] == graph.time
        assert rows[-1][f"{side}_launches"] == graph.launches
        # launches are integers: the categories add up exactly; seconds up to float reassociation
        assert sum(r[f"{side}_launches"] for r in rows[:-1]) == graph.launches
        assert math.fsum(r[f"{side}_s"] for r in rows[:-1]) == pytest.approx(graph.time, rel=1e-12)
    assert math.fsum(r["share"] for r in rows[:-1]) == pytest.approx(1.0, rel=1e-12)
    # the passes fused the RMSNorms: a norm category appears, fewer kernels run
    norm = rows[CATEGORIES.index("norm")]
    assert norm["before_launches"] == 0 < norm["after_launches"]
    assert after.launches < before.launches and after.time < before.time


def test_table_of_one_graph_has_only_before_columns(llama_result):
    rows = cost_table(llama_result.cost.before)
    assert all(set(r) == {"category", "before_s", "before_launches", "share"} for r in rows)
    assert rows[-1]["share"] == 1.0
    text = cost_markdown(rows, group_kernels(llama_result.cost.before.estimates))
    assert text.startswith("| category | before | share | launches before |")


def test_symbolic_estimates_must_be_bound_first():
    s = sympy.Symbol("s0", positive=True, integer=True)
    model = CostModel("h100")
    est = model.estimate(Work(vector_flops=64 * s, bytes_read=256 * s, bytes_written=256 * s), "add", "aten.add.Tensor", "elementwise")
    graph = GraphEstimate("h100", (est,))
    with pytest.raises(ValueError, match="s0.*GraphEstimate.at"):
        cost_table(graph)
    with pytest.raises(ValueError, match="s0"):
        roofline_points(graph.estimates)
    bound = graph.at({"s0": 1024})
    assert cost_table(bound)[-1]["before_s"] == pytest.approx(float(est.at({"s0": 1024}).time))


def test_json_and_markdown_forms(llama_result):
    cost = llama_result.cost
    table = cost_table(cost.before, cost.after)
    kernels = group_kernels(cost.after.estimates, cost.shapes)
    data = json.loads(json.dumps(cost_json(table, kernels, cost.after.generic_ops())))
    assert data["categories"] == table
    assert data["predicted_seconds"] == {"before": cost.before.time, "after": cost.after.time}
    assert data["predicted_speedup"] == pytest.approx(cost.before.time / cost.after.time)
    # every launched kernel is in exactly one group, costliest group first
    assert sum(k["count"] for k in data["kernels"]) == cost.after.launches
    totals = [k["total_s"] for k in data["kernels"]]
    assert totals == sorted(totals, reverse=True)
    # the up projections and the LM head (gate projections are matmul_epilogue regions on h100)
    mm = next(k for k in data["kernels"] if k["op"] == "aten.mm" and k["shape"] == "8x64, 64x128 -> 8x128")
    assert mm["count"] == 3 and mm["flops"] == 2 * 8 * 64 * 128
    text = cost_markdown(table, kernels, top=3)
    for category in CATEGORIES:
        assert f"| {category} |" in text
    assert "| **total** |" in text and "(3 of " in text
    assert f"`{kernels[0].op}` | {kernels[0].count} | {kernels[0].shape or '-'} |" in text  # regions have no shape


# -- the roofline ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mm_graph() -> GraphEstimate:
    captured = capture_export(MatMulRelu(), (torch.randn(M, K),))
    return CostModel("h100").graph(captured.gm)


def test_mm_point_sits_at_the_formulas_intensity_and_flop_rate(mm_graph, tmp_path):
    hw = load_target("h100").hw
    flops = 2 * M * K * N
    nbytes = 4 * (M * K + K * N + M * N)
    compute = flops / (66.9e12 * 0.75)  # targets/h100.toml: fp32 matmul peak x achievable
    memory = nbytes / (3350e9 * 0.9)  # HBM3 bandwidth x achievable
    time = 4e-6 + max(compute, memory)  # launch overhead + roofline
    assert (hw.matmul_rate("fp32"), hw.launch_overhead) == pytest.approx((66.9e12 * 0.75, 4e-6))

    points = roofline_plot(mm_graph.estimates, hw, tmp_path / "mm.png", "mm")
    assert points == roofline_points(mm_graph.estimates)
    mm = next(p for p in points if p.op == "aten.mm")
    assert (mm.count, mm.category, mm.bound, mm.matmul_dtypes) == (1, "linear", "compute", ("fp32",))
    assert mm.intensity == pytest.approx(flops / nbytes, rel=1e-12)
    assert mm.flop_rate == pytest.approx(flops / time, rel=1e-12)
    assert png_size(tmp_path / "mm.png") == PNG_SIZE


def test_plot_of_a_large_graph_is_a_png_of_the_expected_size(llama_result, tmp_path):
    cost = llama_result.cost
    path = tmp_path / "roofline.png"
    points = roofline_plot(cost.after.estimates, load_target("h100").hw, path, "tiny Llama")
    assert png_size(path) == PNG_SIZE
    # free ops (views) and kernels without FLOPs (copies, gathers) are not points
    assert all(p.flops > 0 and p.bytes > 0 for p in points)
    plotted = sum(p.count for p in points)
    assert 0 < plotted < cost.after.launches


def test_roofs_include_cache_levels_and_one_compute_roof_per_dtype(mm_graph, tmp_path):
    hw = Hardware(
        matmul_flops={"fp32": 2e12, "bf16": 8e12}, vector_flops=1e12, transcendentals=1e11,
        memory_bandwidth=100e9, memory_bytes=64e9, launch_overhead=5e-6, compute_units=16,
        achievable={"matmul": 0.8, "vector": 0.5, "memory": 0.9}, caches=((32 * 2**20, 400e9),),
    )
    found = roofs(hw, {"fp32", "bf16"})
    assert [(r.memory, r.secondary) for r in found] == [(True, False), (True, True), (False, False), (False, False), (False, True)]
    assert [r.rate for r in found] == pytest.approx([90e9, 360e9, 6.4e12, 1.6e12, 0.5e12])
    roofline_plot(mm_graph.estimates, hw, tmp_path / "cached.png", "cache roofs")
    assert png_size(tmp_path / "cached.png") == PNG_SIZE


# -- binding shape symbols, and the report per compilation ----------------------------------------


def test_symbols_bind_to_the_example_sizes_or_the_captures_hints():
    x = torch.randn(48, K)
    captured = capture_export(MatMulRelu(), (torch.randn(M, K),), dynamic_shapes=({0: torch.export.Dim("m")},))
    graph = CostModel("h100").graph(captured.gm)
    assert len(graph.symbols) == 1
    (symbol,) = graph.symbols
    assert example_bindings(captured.gm, [x]) == {symbol: 48}
    assert example_bindings(captured.gm) == {symbol: M}  # the size export traced with
    report = CostReport.make(load_target("h100"), graph, graph, captured.gm, [x])
    assert report.unbound == [] and report.bindings == {"x.size(0)": 48}
    assert report.shapes["mm"] == f"48x{K}, {K}x{N} -> 48x{N}"
    assert report.table[-1]["before_s"] == pytest.approx(float(graph.at({symbol: 48}).time))


def test_unbound_symbols_give_a_note_and_no_plot(tmp_path):
    s = sympy.Symbol("u0", positive=True, integer=True)
    est = CostModel("h100").estimate(Work({"fp32": 2 * s * 64 * 64}, bytes_read=8 * s * 64, bytes_written=4 * s * 64), "mm", "aten.mm", "linear")
    graph = GraphEstimate("h100", (est,))
    report = CostReport(load_target("h100"), graph, graph, {}, {})
    assert report.unbound == ["u0"]
    assert "unbound shape symbols u0" in report.summary()
    assert report.write(tmp_path) is None
    assert not (tmp_path / "roofline.png").exists()
    assert json.loads((tmp_path / "cost.json").read_text())["unbound_symbols"] == ["u0"]
    assert "could not be bound" in report.markdown(None)


def test_compile_result_carries_the_cost_report(llama_result, tmp_path):
    cost = llama_result.cost
    t = cost.table[-1]
    assert cost.summary() == (
        f"cost model (h100): predicted {seconds(t['before_s'])} -> {seconds(t['after_s'])} "
        f"({t['before_s'] / t['after_s']:.2f}x); {t['before_launches']:.0f} -> {t['after_launches']:.0f} launches"
    )
    plan = llama_result.plan()["cost"]
    assert plan["predicted_seconds"] == {"before": cost.before.time, "after": cost.after.time}
    assert plan["predicted_speedup"] == pytest.approx(cost.before.time / cost.after.time)
    assert set(plan["by_category"]) == set(CATEGORIES)
    assert cost.write(tmp_path) == "roofline.png"
    assert png_size(tmp_path / "roofline.png") == PNG_SIZE
    section = cost.markdown("roofline.png")
    assert section.startswith("## Predicted cost (h100)") and "![Roofline on h100](roofline.png)" in section


def test_dynamo_graphs_are_priced_at_the_sizes_they_were_compiled_for():
    torch._dynamo.reset()
    backend = CompilerBackend({"target": "h100"})
    model = MatMulRelu()
    compiled = torch.compile(model, backend=backend, dynamic=True)
    with torch.no_grad():
        compiled(torch.randn(40, K))
    torch._dynamo.reset()
    (result,) = backend.results
    cost = result.cost
    assert cost.unbound == [] and list(cost.bindings.values()) == [40]
    mm = next(e for e in cost.before.estimates if e.op == "aten.mm")  # after: fused with the relu
    assert float(mm.flops) == 2 * 40 * K * N
    assert cost.summary().startswith("cost model (h100): predicted ")


def test_units():
    assert [seconds(v) for v in (0, 4.0129e-6, 4e-4, 9.996e-4, 0.0049, 3.2)] == ["0", "4.01 us", "400 us", "1.00 ms", "4.90 ms", "3.20 s"]
    assert [si(v, "B") for v in (512, 38912, 3.02e12)] == ["512 B", "38.9 kB", "3.02 TB"]
