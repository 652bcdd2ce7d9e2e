"""`optimize MODEL.py --target NAME [--passes a,b] [--disable c] [--budget ppl:+2%] [--out DIR]`

MODEL.py defines `model()` and `example_inputs()` (a tensor, a tuple of args or a dict of
kwargs), optionally `calibration_batches(window, count)` (inputs for lossy passes to calibrate
on), `evaluation_batches()` and `dynamic_shapes()` (torch.export's dynamic_shapes for the
example inputs: a graph symbolic in the sequence length serves every length, and passes that
pay off only on long sequences, such as sparse attention, can then apply). The CLI captures the
model, runs the pipeline for the target, generates kernels and writes into DIR: `graph.txt`
(the optimized graph), `kernels/` (generated sources), `plan.json` (passes, what each changed,
timings, the check against eager, the predicted cost), `report.md`, and the cost model's
prediction before and after the passes: `cost.json` and `roofline.png`.

User errors print one line and exit with status 2; no tracebacks for them.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any, Sequence

from compiler.errors import CompilerError, UserInputError


def _load_model_file(path: str) -> ModuleType:
    file = Path(path)
    if not file.is_file():
        raise UserInputError(f"model file {path!r} not found; give the path to a Python file defining model() and example_inputs()")
    spec = importlib.util.spec_from_file_location(f"_optimize_model_{file.stem}", file)
    if spec is None or spec.loader is None:
        raise UserInputError(f"{path!r} is not a Python file; give a .py file defining model() and example_inputs()")
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(file.resolve().parent))
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.pop(0)
    for name in ("model", "example_inputs"):
        if not callable(getattr(module, name, None)):
            raise UserInputError(f"{path} does not define {name}(); add `def {name}():` (see examples/smollm2.py)")
    return module


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="optimize", description="Compile a PyTorch model for a hardware target.")
    p.add_argument("model_file", metavar="MODEL.py", help="defines model() and example_inputs()")
    p.add_argument("--target", default="host", help="hardware target (a file in targets/); default: host")
    p.add_argument("--passes", help="comma-separated passes to run (default: the whole pipeline)")
    p.add_argument("--disable", help="comma-separated passes to skip")
    p.add_argument("--budget", default="lossless", help="quality budget: lossless, ppl:+2%%, agreement:98%%")
    p.add_argument("--out", help="output folder (default: out/<model>-<target>)")
    p.add_argument("--quiet", action="store_true", help="print nothing but errors")
    p.add_argument("--json", action="store_true", help="print the plan as JSON on stdout")
    return p


def _max_abs_error(reference: Any, candidate: Any) -> float:
    import torch
    import torch.utils._pytree as pytree

    worst = 0.0
    for a, b in zip(pytree.tree_leaves(reference), pytree.tree_leaves(candidate)):
        if isinstance(a, torch.Tensor) and a.is_floating_point():
            worst = max(worst, (a - b).abs().max().item())
    return worst


def run(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    say = (lambda msg: None) if args.quiet else (lambda msg: print(f"optimize: {msg}", file=sys.stderr, flush=True))

    # Validate everything the user typed before any slow work.
    from compiler.calibration import Calibration
    from compiler.capture import capture_export, split_example_inputs
    from compiler.driver import CompileOptions, compile_graph, write_artifacts
    from compiler.passes import default_pipeline

    options = CompileOptions.make(args.target, args.budget, args.passes, args.disable)
    pipeline = default_pipeline()
    pipeline.check_names(options.passes)
    pipeline.check_names(options.disable)
    module = _load_model_file(args.model_file)
    out = Path(args.out or Path("out") / f"{Path(args.model_file).stem}-{options.target.name}")

    import torch

    start = time.perf_counter()
    say("loading the model")
    model = module.model()
    inputs = module.example_inputs()
    call_args, call_kwargs = split_example_inputs(inputs)
    dynamic = module.dynamic_shapes() if callable(getattr(module, "dynamic_shapes", None)) else None
    say(f"capturing {type(model).__name__} with torch.export" + (" (dynamic shapes)" if dynamic else ""))
    captured = capture_export(model, call_args, call_kwargs, dynamic_shapes=dynamic)
    say(f"captured {sum(1 for _ in captured.gm.graph.nodes)} nodes; running passes for {options.target.name}")
    sample = captured.flatten_inputs(call_args, call_kwargs)
    calibration = None
    if callable(getattr(module, "calibration_batches", None)):
        calibration = Calibration(module.calibration_batches, name=f"{args.model_file}: calibration_batches()")
        calibration = calibration.with_flatten(captured.flatten_example).with_retrieval(getattr(module, "retrieval_batches", None))
    result = compile_graph(captured.gm, options, sample_inputs=sample, calibration=calibration)
    for record in result.records:
        n = len(record.result.changes) if record.result else 0
        say(f"  {record.name}: {record.status}{' (' + record.reason + ')' if record.reason else ''}, {n} change(s)")
    say(f"codegen ({options.target.codegen}): {len(result.codegen.kernels)} kernel(s), {len(result.codegen.fallbacks)} fallback(s)")

    say("checking the compiled graph against eager on the example inputs")
    with torch.no_grad():
        reference = model(*call_args, **{**captured.fixed_kwargs, **call_kwargs})
        candidate = captured.unflatten_outputs(result.executable(*sample))
    error = _max_abs_error(reference, candidate)
    write_artifacts(result, out)
    plan_path = out / "plan.json"
    plan = json.loads(plan_path.read_text())
    plan["model_file"] = str(args.model_file)
    plan["check_vs_eager"] = {"inputs": "example_inputs()", "max_abs_error": error}
    plan["total_seconds"] = round(time.perf_counter() - start, 3)
    plan_path.write_text(json.dumps(plan, indent=2, default=str))
    with (out / "report.md").open("a") as report:
        report.write(f"\n## Check against eager\n\nMax abs error of the outputs on example_inputs(): {error:.3g}\n")
    say(result.cost.summary())
    written = ", ".join(p.name + ("/" if p.is_dir() else "") for p in sorted(out.iterdir()))
    say(f"max abs error vs eager: {error:.3g}; wrote {out}/ ({written})")
    if args.json:
        print(json.dumps(plan, indent=2, default=str))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    try:
        return run(argv)
    except CompilerError as exc:
        print(f"optimize: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
