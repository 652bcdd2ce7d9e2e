"""Pipelines of passes, the context they run in, and instruments that watch them.

A `Pipeline` is an ordered list of named passes; reading it is reading the compilation. A
`PassContext` carries everything a run needs and nothing global: the target, the quality
budget, calibration data, sample inputs, which passes are disabled (or the only ones
enabled), and instruments. Instruments follow TVM's shape: hooks before and after each pass;
shipped ones time passes, dump the graph before and after, and verify each pass numerically
against its input on sample inputs.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.fx as fx

from compiler.budget import Budget, parse_budget
from compiler.calibration import Calibration
from compiler.errors import PassError, UserInputError
from compiler.ir import graph_text, recompile
from compiler.passes.base import CONTEXT_REQUIREMENTS, Pass, PassResult


class PassInstrument:
    """Hooks around every pass of a pipeline run. Override what you need."""

    def enter_pipeline(self, gm: fx.GraphModule, ctx: PassContext) -> None: ...

    def run_before_pass(self, gm: fx.GraphModule, p: Pass, ctx: PassContext) -> None: ...

    def run_after_pass(self, gm: fx.GraphModule, p: Pass, ctx: PassContext, result: PassResult) -> None: ...

    def exit_pipeline(self, gm: fx.GraphModule, ctx: PassContext) -> None: ...


@dataclass
class PassContext:
    """Everything a pipeline run may use. Build one per compilation; it is not shared."""

    target: Any = None
    budget: Budget | str = "lossless"
    calibration_data: Calibration | None = None
    sample_inputs: Sequence[Any] | None = None
    disabled: set[str] = field(default_factory=set)
    enabled_only: set[str] | None = None
    instruments: list[PassInstrument] = field(default_factory=list)
    cost_model: Any = None
    artifacts_dir: Path | None = None

    def __post_init__(self) -> None:
        self.budget = parse_budget(self.budget)
        if isinstance(self.target, (str, Path)):
            from compiler.targets import load_target

            self.target = load_target(self.target)
        if self.cost_model is None and self.target is not None:
            from compiler.cost_model import CostModel

            self.cost_model = CostModel(self.target)

    def is_enabled(self, name: str) -> bool:
        if name in self.disabled:
            return False
        return self.enabled_only is None or name in self.enabled_only


@dataclass
class PassRecord:
    """One pass in a pipeline run: ran or skipped (and why), its result and time."""

    name: str
    lossy: bool
    status: str  # "ran" | "disabled" | "skipped"
    reason: str = ""
    result: PassResult | None = None
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        out = {"name": self.name, "lossy": self.lossy, "status": self.status, "seconds": round(self.seconds, 4)}
        if self.reason:
            out["reason"] = self.reason
        if self.result is not None:
            out.update(self.result.as_dict())
        return out


class Pipeline:
    """An ordered, named sequence of passes."""

    def __init__(self, passes: Sequence[Pass], name: str = "pipeline") -> None:
        names = [p.name for p in passes]
        for p in passes:
            if not p.name:
                raise ValueError(f"{type(p).__name__} has no name; set the class attribute `name`")
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"pipeline {name!r} has duplicate pass names {dupes}; rename one")
        self.passes = list(passes)
        self.name = name

    def names(self) -> list[str]:
        return [p.name for p in self.passes]

    def check_names(self, names: set[str] | None) -> None:
        """A pass name that is not in this pipeline is a UserInputError listing the known ones."""
        unknown = sorted((names or set()) - set(self.names()))
        if unknown:
            raise UserInputError(
                f"unknown pass {', '.join(unknown)}; passes in {self.name!r}: {', '.join(self.names())}"
            )

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> list[PassRecord]:
        self.check_names(ctx.disabled)
        self.check_names(ctx.enabled_only)
        records: list[PassRecord] = []
        ran: set[str] = set()
        for inst in ctx.instruments:
            inst.enter_pipeline(gm, ctx)
        for p in self.passes:
            if not ctx.is_enabled(p.name):
                records.append(PassRecord(p.name, p.lossy, "disabled"))
                continue
            named = bool(ctx.enabled_only) and p.name in ctx.enabled_only
            if p.opt_in and not named:
                records.append(PassRecord(p.name, p.lossy, "skipped", f"opt-in: name it in passes (--passes {p.name}) to run it"))
                continue
            if p.lossy and ctx.budget.lossless and not named:
                records.append(PassRecord(p.name, p.lossy, "skipped", "lossy, and the budget is lossless: give a budget (ppl:+2%) or name the pass in passes"))
                continue
            missing = self._missing_requirements(p, ran, ctx)
            if missing:
                records.append(PassRecord(p.name, p.lossy, "skipped", f"requires {', '.join(missing)}"))
                continue
            for inst in ctx.instruments:
                inst.run_before_pass(gm, p, ctx)
            start = time.perf_counter()
            result = p.run(gm, ctx)
            seconds = time.perf_counter() - start
            gm.graph.lint()
            recompile(gm)
            for inst in ctx.instruments:
                inst.run_after_pass(gm, p, ctx, result)
            records.append(PassRecord(p.name, p.lossy, "ran", result=result, seconds=seconds))
            ran.add(p.name)
        for inst in ctx.instruments:
            inst.exit_pipeline(gm, ctx)
        return records

    def _missing_requirements(self, p: Pass, ran: set[str], ctx: PassContext) -> list[str]:
        missing = []
        for req in p.requires:
            if req in CONTEXT_REQUIREMENTS:
                if getattr(ctx, req) is None:
                    missing.append(req)
            elif req not in ran:
                missing.append(f"pass {req!r} to run first")
        return missing

    def __repr__(self) -> str:
        return f"Pipeline({self.name!r}, {self.names()})"


class TimingInstrument(PassInstrument):
    """Wall time of each pass, in `self.seconds` by pass name."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._start = 0.0

    def run_before_pass(self, gm: fx.GraphModule, p: Pass, ctx: PassContext) -> None:
        self._start = time.perf_counter()

    def run_after_pass(self, gm: fx.GraphModule, p: Pass, ctx: PassContext, result: PassResult) -> None:
        self.seconds[p.name] = time.perf_counter() - self._start


class DumpGraphInstrument(PassInstrument):
    """Writes the graph before and after each pass: `DIR/NN_<pass>.before.txt` / `.after.txt`."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        self._index = 0

    def run_before_pass(self, gm: fx.GraphModule, p: Pass, ctx: PassContext) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        self._index += 1
        (self.directory / f"{self._index:02d}_{p.name}.before.txt").write_text(graph_text(gm))

    def run_after_pass(self, gm: fx.GraphModule, p: Pass, ctx: PassContext, result: PassResult) -> None:
        (self.directory / f"{self._index:02d}_{p.name}.after.txt").write_text(graph_text(gm))


def _flat_tensors(out: Any) -> list[torch.Tensor]:
    leaves = torch.utils._pytree.tree_leaves(out)
    return [t for t in leaves if isinstance(t, torch.Tensor)]


def _excess(ref: torch.Tensor, new: torch.Tensor, rtol: float) -> float:
    """The largest `|new - ref| - rtol * |ref|`; inf where NaN or inf appear in one and not the other."""
    if not ref.numel():
        return 0.0
    excess = (new - ref).abs() - rtol * ref.abs()
    # Equal values (the same inf included) and NaN in both agree; any other NaN is a disagreement.
    agree = (new == ref) | (new.isnan() & ref.isnan())
    return excess.masked_fill(agree, 0.0).nan_to_num(nan=float("inf")).max().item()


class VerifyNumericsInstrument(PassInstrument):
    """Runs the graph on sample inputs before and after each pass and compares outputs.

    A lossless pass that moves any output by more than `atol + rtol * |reference|` raises a
    PassError naming the pass; a lossy pass's deviation is only recorded in `self.errors`, since
    its budget is judged on quality metrics, not elementwise error.
    """

    def __init__(self, sample_inputs: Sequence[Any] | None = None, *, atol: float = 1e-4, rtol: float = 1e-4) -> None:
        self.sample_inputs = sample_inputs
        self.atol, self.rtol = atol, rtol
        self.errors: dict[str, float] = {}
        self._before: list[torch.Tensor] = []

    def _inputs(self, ctx: PassContext) -> Sequence[Any]:
        inputs = self.sample_inputs if self.sample_inputs is not None else ctx.sample_inputs
        if inputs is None:
            raise UserInputError("VerifyNumericsInstrument needs sample inputs: pass them or set ctx.sample_inputs")
        return inputs

    def run_before_pass(self, gm: fx.GraphModule, p: Pass, ctx: PassContext) -> None:
        with torch.no_grad():
            self._before = _flat_tensors(gm(*self._inputs(ctx)))

    def run_after_pass(self, gm: fx.GraphModule, p: Pass, ctx: PassContext, result: PassResult) -> None:
        with torch.no_grad():
            after = _flat_tensors(gm(*self._inputs(ctx)))
        if len(after) != len(self._before):
            raise PassError(f"pass {p.name!r} changed the number of graph outputs")
        worst = 0.0
        for ref, new in zip(self._before, after):
            if ref.shape != new.shape or ref.dtype != new.dtype:
                raise PassError(f"pass {p.name!r} changed an output from {ref.dtype}{list(ref.shape)} to {new.dtype}{list(new.shape)}")
            if ref.is_floating_point():
                worst = max(worst, _excess(ref, new, self.rtol))
            elif not torch.equal(ref, new):
                worst = float("inf")
        self.errors[p.name] = worst
        if worst > self.atol and not p.lossy:
            raise PassError(
                f"pass {p.name!r} changed the graph's outputs (error {worst:.3g} > atol {self.atol:g}); "
                "it is not lossless: fix the pass or mark it lossy"
            )
