"""`optimize MODEL.py --target NAME [--passes a,b] [--disable c] [--budget ppl:+2%] [--out DIR]`

MODEL.py defines `model()` and `example_inputs()` (a tensor, a tuple of args or a dict of
kwargs), optionally `calibration_batches(window, count)` (inputs for lossy passes to calibrate
on), `evaluation_batches()`, `dynamic_shapes()` (torch.export's dynamic_shapes for the
example inputs: a graph symbolic in the sequence length serves every length, and passes that
pay off only on long sequences, such as sparse attention, can then apply) and `pipeline()` (a
`compiler.passes.Pipeline` to run instead of the default one, e.g. the default passes plus
your own; `--pipeline FILE.py:NAME` names one in another file). The CLI captures the
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


def _load_python_file(path: str, what: str = "a Python file") -> ModuleType:
    file = Path(path)
    if not file.is_file():
        raise UserInputError(f"{path!r} not found; give the path to {what}")
    spec = importlib.util.spec_from_file_location(f"_optimize_{file.stem}", file)
    if spec is None or spec.loader is None:
        raise UserInputError(f"{path!r} is not a Python file; give {what}")
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(file.resolve().parent))
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.pop(0)
    return module


def _load_model_file(path: str) -> ModuleType:
    module = _load_python_file(path, "a Python file defining model() and example_inputs()")
    for name in ("model", "example_inputs"):
        if not callable(getattr(module, name, None)):
            raise UserInputError(f"{path} does not define {name}(); add `def {name}():` (see examples/smollm2.py)")
    return module


def _load_pipeline(spec: str | None, module: ModuleType) -> Any:
    """The pipeline the user named (`FILE.py:NAME`), else MODEL.py's `pipeline()`, else None
    (the default pipeline)."""
    from compiler.passes import Pipeline

    if spec is None:
        source, name = module, "pipeline"
        if not hasattr(module, name):
            return None
    else:
        path, sep, name = spec.rpartition(":")
        if not sep or not path or not name:
            raise UserInputError(f"--pipeline {spec!r}: write FILE.py:NAME, e.g. my_passes.py:pipeline")
        source = _load_python_file(path)
        if not hasattr(source, name):
            raise UserInputError(f"--pipeline {spec!r}: {path} defines no {name!r}")
    value = getattr(source, name)
    value = value() if callable(value) and not isinstance(value, Pipeline) else value
    if not isinstance(value, Pipeline):
        raise UserInputError(f"pipeline {name!r} is a {type(value).__name__}, not a compiler.passes.Pipeline; return Pipeline([...passes])")
    return value


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="optimize", description="Compile a PyTorch model for a hardware target.")
    p.add_argument("model_file", metavar="MODEL.py", help="defines model() and example_inputs()")
    p.add_argument("--target", default="host", help="hardware target (a file in targets/); default: host")
    p.add_argument("--passes", help="comma-separated passes to run (default: the whole pipeline)")
    p.add_argument("--disable", help="comma-separated passes to skip")
    p.add_argument("--pipeline", metavar="FILE.py:NAME", help="a Pipeline (or a function returning one) to run instead of the default; default: MODEL.py's pipeline() if it defines one")
    p.add_argument("--budget", default="lossless", help="quality budget: lossless, ppl:+2%%, agreement:98%%")
    p.add_argument("--out", help="output folder (default: out/<model>-<target>)")
    p.add_argument("--length", type=int, default=4096, help="sequence length to plan, price and time the prefill at (default 4096)")
    p.add_argument("--families", help="lossy families the planner searches (default: all; known: layer_skip, sparse_attention, shift_add)")
    p.add_argument("--windows", type=int, default=2, help="windows of --length tokens per quality measurement (default 2)")
    p.add_argument("--remeasure", action="store_true", help="ignore stored planner and quality measurements (and store the new ones)")
    p.add_argument("--no-speed", action="store_true", help="on --target host, do not time eager against compiled")
    p.add_argument("--no-onnx", action="store_true", help="do not export model.onnx")
    p.add_argument("--quiet", action="store_true", help="print nothing but errors (no progress bars)")
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

    module = _load_model_file(args.model_file)
    user_pipeline = _load_pipeline(args.pipeline, module)
    pipeline = user_pipeline or default_pipeline()
    options = CompileOptions.make(args.target, args.budget, args.passes, args.disable, pipeline=pipeline, length=args.length)
    pipeline.check_names(options.passes)
    pipeline.check_names(options.disable)
    if args.length < 2:
        raise UserInputError(f"--length {args.length}: the sequence length to plan and price at must be >= 2")
    out = Path(args.out or Path("out") / f"{Path(args.model_file).stem}-{options.target.name}")

    import torch

    from compiler.cache import Store

    store = Store()
    start = time.perf_counter()
    say("loading the model")
    model = module.model()
    inputs = module.example_inputs()
    call_args, call_kwargs = split_example_inputs(inputs)
    dynamic = module.dynamic_shapes() if callable(getattr(module, "dynamic_shapes", None)) else None
    say(f"capturing {type(model).__name__} with torch.export" + (" (dynamic shapes)" if dynamic else ""))
    captured = capture_export(model, call_args, call_kwargs, dynamic_shapes=dynamic, cache=True)
    say(f"captured {sum(1 for _ in captured.gm.graph.nodes)} nodes in {time.perf_counter() - start:.0f} s")
    sample = captured.flatten_inputs(call_args, call_kwargs)
    calibration = None
    if callable(getattr(module, "calibration_batches", None)):
        calibration = Calibration(module.calibration_batches, name=f"{Path(args.model_file).name}: calibration_batches()")
        calibration = calibration.with_flatten(captured.flatten_example).with_retrieval(getattr(module, "retrieval_batches", None))

    from compiler.calibration import static_length

    length = args.length
    fixed = static_length(captured.gm)
    if fixed is not None and fixed != length:
        say(f"the graph was captured at a fixed {fixed} tokens (define dynamic_shapes() for another length): planning and pricing at {fixed}")
        length = fixed
        options = CompileOptions.make(options.target, options.budget, options.passes, options.disable, pipeline=options.pipeline, length=length)
    planned = None
    if not options.budget.lossless and options.passes is None:
        from compiler.planner import FAMILIES, Planner

        families = None
        if args.families:
            names = [f.strip() for f in args.families.split(",") if f.strip()]
            unknown = sorted(set(names) - set(FAMILIES))
            if unknown:
                raise UserInputError(f"--families: unknown {', '.join(unknown)}; known: {', '.join(FAMILIES)}")
            families = {name: FAMILIES[name] for name in names}

        say(f"planning for {options.target.name} within {options.budget} at {length} tokens")
        planner = Planner(options.target, options.budget, calibration, length=length, families=families, pipeline=user_pipeline, quality_count=args.windows,
                          store=_FreshStore() if args.remeasure else store, progress=not args.quiet, say=say)
        planned = planner.plan(captured.gm)
        pipeline = planned.pipeline()
        options = CompileOptions.make(options.target, options.budget, set(pipeline.names()), options.disable, pipeline=pipeline, length=length)
    # the captured graph stays as it is: the evaluation below compares against it
    from compiler.ir import copy_graph_module

    say(f"compiling for {options.target.name}" + (f": {planned.chosen.label}" if planned else ""))
    result = compile_graph(copy_graph_module(captured.gm), options, sample_inputs=sample, calibration=calibration)
    for record in result.records:
        n = len(record.result.changes) if record.result else 0
        say(f"  {record.name}: {record.status}{' (' + record.reason + ')' if record.reason else ''}, {n} change(s)")
    say(f"codegen ({options.target.codegen}): {len(result.codegen.kernels)} kernel(s), {len(result.codegen.fallbacks)} fallback(s)")

    say("checking the compiled graph against eager on the example inputs")
    with torch.no_grad():
        reference = model(*call_args, **{**captured.fixed_kwargs, **call_kwargs})
        candidate = captured.unflatten_outputs(result.executable(*sample))
    error = _max_abs_error(reference, candidate)

    from compiler import measure

    key = measure.run_key(captured.gm, options.target.name, planned.chosen.label if planned else "+".join(pipeline.names()), length)
    evaluation = None
    lossy = any(r.lossy and r.status == "ran" for r in result.records)
    if lossy:
        sets = measure.evaluation_sets(module, length, args.windows)
        if sets:
            say(f"measuring the plan's quality on evaluation text ({', '.join(sets)})")
            evaluation = measure.cached(store, "evaluation", key, args.remeasure, lambda: measure.evaluate(captured, result.executable, sets, options.budget))
    speed = None
    if options.target.name == "host" and not args.no_speed:
        if not callable(getattr(module, "calibration_batches", None)):
            speed = {"skipped": "MODEL.py defines no calibration_batches(window, count) to make a prefill input from"}
        else:
            say(f"timing eager against compiled prefill of {length} tokens on this machine")
            speed = measure.cached(store, "speed", key, args.remeasure, lambda: measure.prefill_speed(model, captured, result.executable, module, length))
            speed["predicted_speedup"] = result.cost.plan_entry().get("predicted_speedup")

    write_artifacts(result, out)
    onnx = _export_onnx(result, sample, out, say) if not args.no_onnx else {"skipped": "--no-onnx"}
    plan_path = out / "plan.json"
    plan = json.loads(plan_path.read_text())
    plan["model_file"] = str(args.model_file)
    plan["check_vs_eager"] = {"inputs": "example_inputs()", "max_abs_error": error}
    plan["planner"] = planned.as_dict() if planned else {"skipped": "passes named with --passes" if options.passes is not None and not options.budget.lossless else "the budget is lossless: the lossless pipeline, no search"}
    plan["evaluation"] = evaluation
    plan["speed"] = speed
    plan["onnx"] = onnx
    plan["total_seconds"] = round(time.perf_counter() - start, 3)
    plan_path.write_text(json.dumps(plan, indent=2, default=str))
    _finish_report(out, planned, evaluation, speed, onnx, error)
    say(result.cost.summary())
    if planned is not None:
        say(f"plan: {planned.chosen.label} ({planned.chosen.predicted_speedup:.3f}x the lossless pipeline predicted)")
    if evaluation:
        say("evaluation: " + "; ".join(f"{t} ppl {q['ppl_increase']:+.2%}" for t, q in evaluation["texts"].items()))
    if speed and "skipped" not in speed:
        say(f"prefill of {length} tokens on this machine: {speed['measured_speedup']:.3f}x measured, {speed['predicted_speedup']:.3f}x predicted")
    written = ", ".join(p.name + ("/" if p.is_dir() else "") for p in sorted(out.iterdir()))
    say(f"max abs error vs eager: {error:.3g}; wrote {out}/ ({written}) in {time.perf_counter() - start:.0f} s")
    if args.json:
        print(json.dumps(plan, indent=2, default=str))
    return 0


class _FreshStore:
    """A store that remembers nothing: --remeasure."""

    def get(self, namespace: str, key: str) -> Any:
        return None

    def put(self, namespace: str, key: str, value: Any) -> None:
        from compiler.cache import Store

        Store().put(namespace, key, value)


def _export_onnx(result: Any, sample: Sequence[Any], out: Path, say: Any) -> dict[str, Any]:
    """model.onnx from the optimized IR (symbolic in the sequence length where the graph is,
    else at the example's shapes), checked in onnxruntime against the compiled model on the
    example inputs. The exported file is kept in the cache under the IR's fingerprint, so a
    rerun copies it (the check runs again). A failure is reported and warned about, never fatal
    to the other artifacts."""
    import hashlib
    import shutil
    import warnings

    import torch

    from compiler.cache import Store, cache_dir
    from compiler.ir import graph_text, weights_fingerprint

    path = out / "model.onnx"
    try:
        from compiler.export_onnx import check_onnx, export_onnx

        key = hashlib.sha256(repr((1, graph_text(result.ir), weights_fingerprint(result.ir))).encode()).hexdigest()[:32]
        kept, store = cache_dir("onnx") / f"{key}.onnx", Store()
        info = store.get("onnx_export", key)
        if info is not None and kept.is_file():
            say("model.onnx: the same optimized graph was exported before; copying it")
            shutil.copyfile(kept, path)
            info = {**info, "from_cache": True}
        else:
            say("exporting the optimized graph to ONNX (compiler ops as custom-domain functions)")
            try:
                exported = export_onnx(result.ir, sample, path, dynamic=True)
            except UserInputError as exc:
                say(f"a symbolic-length export was refused ({exc}); exporting at the example's shapes")
                exported = export_onnx(result.ir, sample, path, dynamic=False)
            info = {
                "path": "model.onnx", "domain": exported.domain, "opset": exported.opset, "dynamic": exported.dynamic,
                "functions": exported.function_calls(), "regions_inlined": exported.regions_inlined, "nodes": exported.nodes,
                "max_abs_error_vs_ir": exported.max_abs_error, "export_seconds": round(exported.seconds, 1), "notes": exported.notes,
            }
            shutil.copyfile(path, kept)
            store.put("onnx_export", key, info)
            info = {**info, "from_cache": False}
        with torch.no_grad():
            expected = result.executable(*sample)
        check = check_onnx(path, sample, expected)
        return {**info, "check": {"against": "the compiled model on example_inputs()", "ok": check["ok"], "max_abs_error": check["max_abs_error"], "why": check.get("why", "")}}
    except Exception as exc:  # noqa: BLE001 - reported in plan.json and report.md
        warnings.warn(f"ONNX export failed: {type(exc).__name__}: {exc}", stacklevel=2)
        return {"error": f"{type(exc).__name__}: {exc}"}


def _finish_report(out: Path, planned: Any, evaluation: Any, speed: Any, onnx: dict[str, Any], error: float) -> None:
    """Append the plan, quality, speed, ONNX and eager check to report.md; write report.html."""
    from compiler.plan_report import markdown_html, pareto_plot, plan_markdown

    text = (out / "report.md").read_text()
    extra = ""
    if planned is not None:
        plot = pareto_plot(planned, out / "pareto.png")
        extra += "\n" + plan_markdown(planned, evaluation, speed, plot.name if plot else None)
    elif evaluation or speed:
        extra += "\n" + _measured_markdown(evaluation, speed)
    extra += "\n## ONNX\n\n"
    if "error" in onnx:
        extra += f"Export failed: {onnx['error']}\n"
    elif "skipped" in onnx:
        extra += f"Not exported ({onnx['skipped']}).\n"
    else:
        check = onnx.get("check", {})
        functions = ", ".join(f"`{name}` x{n}" for name, n in onnx.get("functions", {}).items()) or "none"
        shapes = "a symbolic sequence length" if onnx.get("dynamic") else "the example's shapes"
        verdict = "ok" if check.get("ok") else f"MISMATCH: {check.get('why')}"
        extra += (
            f"`model.onnx` (opset {onnx.get('opset')}, {shapes}): compiler ops as functions of domain `{onnx.get('domain', '')}` "
            f"built from their reference implementations ({functions}). onnxruntime against the compiled model on "
            f"example_inputs(): max abs error {check.get('max_abs_error', float('nan')):.3g} ({verdict}).\n"
        )
    extra += f"\n## Check against eager\n\nMax abs error of the outputs on example_inputs(): {error:.3g}\n"
    text += extra
    (out / "report.md").write_text(text)
    (out / "report.html").write_text(markdown_html(text, f"optimize report: {out.name}"))


def _measured_markdown(evaluation: Any, speed: Any) -> str:
    from compiler.plan_report import evaluation_markdown, speed_markdown

    return evaluation_markdown(evaluation) + speed_markdown(speed)


def main(argv: Sequence[str] | None = None) -> int:
    try:
        return run(argv)
    except CompilerError as exc:
        print(f"optimize: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
