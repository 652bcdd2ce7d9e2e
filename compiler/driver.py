"""The one data path that every front door uses.

    IR (from compiler.capture) --Pipeline(passes, PassContext)--> rewritten IR
       --codegen[target]--> executable graph (kernels where they exist, ATen elsewhere)
       --> CompiledModule: callable, plus what happened (pass records, kernels, fallbacks)

`compile_graph` does the work on a captured graph, and prices the graph before and after the
passes with the target's cost model; `write_artifacts` puts the readable results (graph,
kernel sources, plan.json, report.md, cost.json, roofline.png) in a folder.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch
import torch.fx as fx

from compiler.budget import Budget, parse_budget
from compiler.calibration import Calibration
from compiler.capture import Captured
from compiler.codegen import CodegenReport, lower_graph
from compiler.cost_model import CostModel
from compiler.cost_model.report import CostReport
from compiler.ir import graph_text, op_counts
from compiler.passes import default_pipeline
from compiler.passes.pipeline import (
    DumpGraphInstrument,
    PassContext,
    PassRecord,
    Pipeline,
    VerifyNumericsInstrument,
)
from compiler.targets import Target, load_target


def _names(value: str | Iterable[str] | None) -> set[str] | None:
    if value is None:
        return None
    if isinstance(value, str):
        return {v.strip() for v in value.split(",") if v.strip()}
    return set(value)


@dataclass
class CompileOptions:
    """What the user asked for. `passes` keeps only those passes; `disable` removes some."""

    target: Target
    budget: Budget
    passes: set[str] | None = None
    disable: set[str] = field(default_factory=set)
    pipeline: Pipeline | None = None
    verify: bool = False
    dump_dir: Path | None = None
    length: int | None = None  # price the graph at this sequence length (default: the example's)

    @classmethod
    def make(
        cls,
        target: str | Target = "host",
        budget: str | Budget | None = None,
        passes: str | Iterable[str] | None = None,
        disable: str | Iterable[str] | None = None,
        pipeline: Pipeline | None = None,
        verify: bool = False,
        dump_dir: str | Path | None = None,
        length: int | None = None,
    ) -> CompileOptions:
        return cls(
            target=load_target(target),
            budget=parse_budget(budget),
            passes=_names(passes),
            disable=_names(disable) or set(),
            pipeline=pipeline,
            verify=verify,
            dump_dir=Path(dump_dir) if dump_dir else None,
            length=length,
        )


@dataclass
class CompileResult:
    """The rewritten IR, its executable form, and the record of how it was made."""

    ir: fx.GraphModule
    executable: fx.GraphModule
    target: Target
    budget: Budget
    records: list[PassRecord]
    codegen: CodegenReport
    seconds: float
    cost: CostReport

    def plan(self) -> dict[str, Any]:
        return {
            "target": self.target.name,
            "codegen": self.target.codegen,
            "budget": str(self.budget),
            "passes": [r.as_dict() for r in self.records],
            "codegen_report": self.codegen.as_dict(),
            "compile_seconds": round(self.seconds, 3),
            "ops_after": op_counts(self.ir),
            "cost": self.cost.plan_entry(),
        }


def compile_graph(
    gm: fx.GraphModule,
    options: CompileOptions,
    sample_inputs: Sequence[Any] | None = None,
    calibration: Calibration | None = None,
) -> CompileResult:
    """Run the passes on `gm` (in place) and generate code for the target; the cost model
    prices the graph before and after the passes. Lossy passes calibrate on `calibration`
    (flat graph inputs)."""
    start = time.perf_counter()
    cost_model = CostModel(options.target)
    before = cost_model.graph(gm)
    pipeline = options.pipeline or default_pipeline()
    instruments = []
    if options.verify and sample_inputs is not None:
        instruments.append(VerifyNumericsInstrument(sample_inputs))
    if options.dump_dir is not None:
        instruments.append(DumpGraphInstrument(options.dump_dir))
    ctx = PassContext(
        target=options.target,
        budget=options.budget,
        sample_inputs=sample_inputs,
        calibration_data=calibration,
        disabled=options.disable,
        enabled_only=options.passes,
        instruments=instruments,
        cost_model=cost_model,
    )
    records = pipeline.run(gm, ctx)
    cost = CostReport.make(options.target, before, cost_model.graph(gm), gm, sample_inputs, options.length)
    executable, report = lower_graph(gm, options.target)
    return CompileResult(gm, executable, options.target, options.budget, records, report, time.perf_counter() - start, cost)


class CompiledModule(torch.nn.Module):
    """A compiled model: call it like the original (same args, same output structure)."""

    def __init__(self, captured: Captured, result: CompileResult) -> None:
        super().__init__()
        self.captured = captured
        self.result = result
        self.executable = result.executable

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        flat = self.captured.flatten_inputs(args, kwargs)
        with torch.no_grad():
            out = self.executable(*flat)
        return self.captured.unflatten_outputs(out)

    def write_artifacts(self, directory: str | Path) -> Path:
        return write_artifacts(self.result, directory)


def _report_markdown(result: CompileResult, plot: str | None) -> str:
    lines = [
        f"# Compilation report: target `{result.target.name}` ({result.target.description})",
        "",
        f"Codegen backend: `{result.target.codegen}`. Budget: `{result.budget}`. "
        f"Compile time: {result.seconds:.2f} s.",
        "",
        "## Passes",
        "",
        "| pass | lossy | status | changes | seconds |",
        "|---|---|---|---|---|",
    ]
    for r in result.records:
        n = len(r.result.changes) if r.result else 0
        status = r.status + (f" ({r.reason})" if r.reason else "")
        lines.append(f"| {r.name} | {'yes' if r.lossy else 'no'} | {status} | {n} | {r.seconds:.3f} |")
    lines += _pass_details(result.records)
    lines += ["", "## Kernels", ""]
    for k in result.codegen.kernels:
        where = "runs here" if k.runner is not None else f"not run here: {k.note}"
        lines.append(f"- `{k.name}` ({k.backend}): {where}")
    if not result.codegen.kernels:
        lines.append("- none")
    lines += ["", "## Left to ATen", ""]
    lines += [f"- x{n}: {reason}" for reason, n in result.codegen.fallback_summary().items()]
    lines += [f"- `{op}` x{n}" for op, n in result.codegen.aten_ops.items()]
    lines += ["", result.cost.markdown(plot)]
    return "\n".join(lines)


def _pass_details(records: list[PassRecord], most: int = 8) -> list[str]:
    """Per pass that changed the graph: its first changes, and its per-site statistics (stats
    entries that are lists of records) as tables."""
    lines: list[str] = []
    for r in records:
        if r.result is None or not (r.result.changes or _tables(r.result.stats)):
            continue
        lines += ["", f"### {r.name}", ""]
        lines += [f"- {change}" for change in r.result.changes[:most]]
        if len(r.result.changes) > most:
            lines.append(f"- ... and {len(r.result.changes) - most} more (plan.json lists every change)")
        for name, rows in _tables(r.result.stats).items():
            columns = list(dict.fromkeys(c for row in rows for c in row))
            lines += ["", f"{name}:", "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
            lines += ["| " + " | ".join(_cell(row.get(c)) for c in columns) + " |" for row in rows]
    return lines


def _tables(stats: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    return {k: v for k, v in stats.items() if isinstance(v, list) and v and all(isinstance(x, dict) for x in v)}


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    if isinstance(value, (list, tuple)):
        counts = Counter(map(str, value))
        return ", ".join(f"{n}x {v}" if n > 1 else v for v, n in counts.items())
    return "" if value is None else str(value)


_SUFFIX = {"python": ".py", "cuda": ".cu", "c": ".c", "tvmscript": ".py", "llvm": ".ll"}


def write_artifacts(result: CompileResult, directory: str | Path) -> Path:
    """Write graph.txt, kernels/, plan.json, report.md, cost.json and roofline.png (when the
    graph's cost is numeric) into `directory`."""
    out = Path(directory)
    kernels = out / "kernels"
    kernels.mkdir(parents=True, exist_ok=True)
    (out / "graph.txt").write_text(graph_text(result.ir))
    for k in result.codegen.kernels:
        (kernels / f"{k.name}.{k.backend}{_SUFFIX.get(k.language, '.txt')}").write_text(k.source)
    (out / "plan.json").write_text(json.dumps(result.plan(), indent=2, default=str))
    plot = result.cost.write(out)
    (out / "report.md").write_text(_report_markdown(result, plot))
    return out
