"""Tests of the `optimize` CLI (compiler.cli), run in-process through `main([...])`: the
artifacts of a tiny Llama for a GPU target (Triton) and the host (TVM), the cost report (table
in report.md, cost.json, roofline.png, the summary line), the one-line errors
(exit status 2, no traceback) for each kind of bad input, and the installed console script."""

from __future__ import annotations

import contextlib
import io
import json
import re
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from compiler.cli import main
from compiler.passes import default_pipeline
from compiler.targets import known_targets

# A MODEL.py as a user writes it: only torch and transformers.
MODEL_SOURCE = '''\
import torch
from transformers import LlamaConfig, LlamaForCausalLM


def model():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    return LlamaForCausalLM(config).eval()


def example_inputs():
    gen = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, 128, (1, 8), generator=gen)
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}
'''

# Logits of a 2-layer fp32 model whose passes only regroup the same arithmetic (RMSNorm,
# attention): reduction-order differences of ~1e-6 relative, far below 1e-4 absolute.
MODEL_ATOL = 1e-4
# What each target's kernels are written in, recognisably.
KERNEL_MARKERS = {"h100": ("triton", "@triton.jit"), "host": ("tvm", "T.prim_func")}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("cli")
    (path / "tiny_llama.py").write_text(MODEL_SOURCE)
    (path / "no_model.py").write_text("import torch\n\n\ndef example_inputs():\n    return torch.ones(2)\n")
    return path


@pytest.fixture(scope="module", params=sorted(KERNEL_MARKERS))
def cli_run(request, workdir):
    """One full `optimize` run per target: (target, exit status, output folder, stdout, stderr)."""
    target = request.param
    out = workdir / f"out-{target}"
    stdout, stderr = io.StringIO(), io.StringIO()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("COMPILER_CACHE_DIR", str(workdir / "cache"))
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            code = main([str(workdir / "tiny_llama.py"), "--target", target, "--out", str(out), "--json"])
    return target, code, out, stdout.getvalue(), stderr.getvalue()


def test_cli_exits_zero_and_writes_every_artifact(cli_run):
    target, code, out, _, stderr = cli_run
    assert code == 0, stderr
    assert sorted(p.name for p in out.iterdir()) == ["cost.json", "graph.txt", "kernels", "model.onnx", "plan.json", "report.html", "report.md", "roofline.png"]
    assert "Traceback" not in stderr
    # graph.txt is the optimized graph: the norms are fused regions (their bodies listed after
    # the graph), so the top-level listing has no decomposed norm left.
    graph = (out / "graph.txt").read_text()
    top, _, bodies = graph.partition("\n\n")
    assert "aten.rsqrt.default(" not in top and "fused_reduction_0(" in top
    assert "fused_reduction_0:  # reduction rms_norm" in bodies and "aten.rsqrt.default(" in bodies


def test_cli_writes_the_region_kernels_for_the_targets_backend(cli_run):
    target, code, out, _, _ = cli_run
    assert code == 0
    backend, marker = KERNEL_MARKERS[target]
    kernels = sorted((out / "kernels").iterdir())
    assert kernels, "no kernel sources written"
    # The norms' kernels: a reduction over pow, mean and rsqrt (with the residual add or not).
    norms = [k for k in kernels if "pow_mean" in k.name and "rsqrt" in k.name and f".{backend}." in k.name]
    assert norms, f"no {backend} norm kernel among {[k.name for k in kernels]}"
    assert all(marker in k.read_text() for k in kernels)
    other = {b for b, _ in KERNEL_MARKERS.values()} - {backend}
    assert not [k for k in kernels if any(f".{o}." in k.name for o in other)]


def test_cli_plan_records_passes_and_the_check_against_eager(cli_run):
    target, code, out, stdout, _ = cli_run
    assert code == 0
    plan = json.loads((out / "plan.json").read_text())
    assert plan["target"] == target
    assert [p["name"] for p in plan["passes"]] == default_pipeline().names()
    # every lossless pass ran; lossy ones wait for a budget (the default is lossless)
    assert all(p["status"] == ("skipped" if p["lossy"] else "ran") for p in plan["passes"])
    fuse = next(p for p in plan["passes"] if p["name"] == "fuse_regions")
    labels = fuse["stats"]["by_label"]
    assert labels.get("rms_norm", 0) + labels.get("residual+rms_norm", 0) == 5  # 2 layers x 2 norms + the final norm
    check = plan["check_vs_eager"]
    assert 0 <= check["max_abs_error"] <= MODEL_ATOL
    # --json prints the same plan on stdout.
    assert json.loads(stdout) == plan
    report = (out / "report.md").read_text()
    assert report.startswith(f"# Compilation report: target `{target}`")
    assert "## Check against eager" in report and "fuse_regions" in report


def test_cli_writes_the_cost_report(cli_run):
    target, code, out, _, stderr = cli_run
    assert code == 0
    cost = json.loads((out / "cost.json").read_text())
    assert cost["target"] == target
    rows = {r["category"]: r for r in cost["categories"]}
    assert list(rows) == ["attention", "linear", "norm", "elementwise", "other", "total"]
    for side in ("before", "after"):
        parts = [r[f"{side}_launches"] for c, r in rows.items() if c != "total"]
        assert sum(parts) == rows["total"][f"{side}_launches"] == cost["launches"][side]
        assert sum(r[f"{side}_s"] for c, r in rows.items() if c != "total") == pytest.approx(cost["predicted_seconds"][side], rel=1e-12)
    # plan.json carries the totals; the passes (RMSNorm, attention fusion) cut launches
    plan = json.loads((out / "plan.json").read_text())["cost"]
    assert plan["predicted_seconds"] == cost["predicted_seconds"]
    assert plan["predicted_speedup"] == pytest.approx(cost["predicted_seconds"]["before"] / cost["predicted_seconds"]["after"])
    assert plan["launches"]["after"] < plan["launches"]["before"]
    assert set(plan["by_category"]) == set(rows) - {"total"}
    # report.md has the table and shows the plot
    report = (out / "report.md").read_text()
    assert f"## Predicted cost ({target})" in report
    assert "| category | before | after | share | launches before | launches after |" in report
    assert "| **total** |" in report and "`aten.mm`" in report
    assert f"![Roofline on {target}](roofline.png)" in report
    png = (out / "roofline.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and struct.unpack(">II", png[16:24]) == (1000, 650)
    # one summary line on stderr
    summary = [line for line in stderr.splitlines() if line.startswith("optimize: cost model")]
    assert len(summary) == 1
    assert re.fullmatch(rf"optimize: cost model \({target}\): predicted [\d.]+ \w+ -> [\d.]+ \w+ \([\d.]+x\); \d+ -> \d+ launches", summary[0]), summary[0]


# -- bad inputs: one line, exit status 2 ----------------------------------------------------------


def _bad(capsys, argv: list[str]) -> str:
    code = main(argv)
    captured = capsys.readouterr()
    assert code == 2
    assert captured.out == ""
    assert "Traceback" not in captured.err
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("optimize: error: "), captured.err
    return lines[0]


def test_missing_model_file(capsys, workdir):
    line = _bad(capsys, [str(workdir / "does_not_exist.py")])
    assert "does_not_exist.py" in line and "not found" in line


def test_model_file_without_model_function(capsys, workdir):
    line = _bad(capsys, [str(workdir / "no_model.py")])
    assert "does not define model()" in line


def test_unknown_target_lists_the_known_ones(capsys, workdir):
    line = _bad(capsys, [str(workdir / "tiny_llama.py"), "--target", "tpu9000"])
    assert "tpu9000" in line
    assert known_targets() and all(name in line for name in known_targets())


@pytest.mark.parametrize("budget", ["ppl:lots", "agreement:150%", "fast"])
def test_bad_budget(capsys, workdir, budget):
    line = _bad(capsys, [str(workdir / "tiny_llama.py"), "--budget", budget])
    assert "budget" in line and budget in line


@pytest.mark.parametrize("flag", ["--passes", "--disable"])
def test_unknown_pass_name(capsys, workdir, flag):
    line = _bad(capsys, [str(workdir / "tiny_llama.py"), flag, "fuse_rms_norm,no_such_pass"])
    assert "no_such_pass" in line
    assert all(name in line for name in default_pipeline().names())


# -- the console script ---------------------------------------------------------------------------


def test_optimize_console_script_is_installed():
    script = Path(sys.executable).parent / "optimize"
    assert script.is_file(), f"no console script at {script}"
    done = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage: optimize") and "MODEL.py" in done.stdout and "--target" in done.stdout
