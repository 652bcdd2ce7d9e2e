"""Benchmark of ShiftAddLLM reparameterization on the host: quality, memory, GEMV speed, MiniLM.

SmolLM2-135M (fp32), target `host`. Sections (`--only`):

- `quality`: the model compiled with the `shift_add` pass at 2, 3 and 4 bits (groups of
  `--group` input channels, calibrated on `calibration_batches`), and the same layers quantized
  by group-wise round-to-nearest at the same bits and group (the baseline); perplexity and
  top-1 agreement with the fp32 model on `--windows` windows of `--length` tokens of
  `abstracts_evaluation.txt` and of `novel_evaluation.txt` (`quality` rows, `ppl_fp` beside).
  Every linear layer of the blocks is reparameterized (210); the LM head, tied to the
  embedding, stays fp32 in both methods.
- `memory`: bytes of the reparameterized weights (planes, scale codes, row scales) against the
  same weights in fp16, per bit width, from the pass's stats; RTN's bytes beside.
- `gemv`: decode GEMV (one row) for SmolLM2's linear shapes, N x K = 576x576, 1536x576,
  576x1536, 192x576: the TVM lookup-table kernel of `compiler::shiftadd_linear` at `--gemv-bits`
  against `F.linear` on the fp32 weight (`speedup_vs_fp32`); then all 210 linear layers of one
  decode step in sequence, each its own weight (so they stream from memory as in a real step):
  `decode_linear_speedup`.
- `minilm`: all-MiniLM-L6-v2 (`examples/minilm.py`) compiled with `shift_add` at 2/3/4 bits;
  cosine similarity of its sentence embeddings with fp32's on evaluation sentences.

Run:

    .venv/bin/python benchmarks/shift_add.py --json /tmp/shift_add.json
    .venv/bin/python benchmarks/shift_add.py --only gemv memory --json /tmp/shift_add_speed.json

Quantized weights are cached (`$COMPILER_CACHE_DIR/shift_add`): the first run fits them (minutes
per bit width), later runs load them.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.common import env_info, finish, load_smollm2, summarize, time_interleaved  # noqa: E402

SECTIONS = ("quality", "memory", "gemv", "minilm")
BITS = (4, 3, 2)
TEXTS = ("abstracts_evaluation", "novel_evaluation")
SHAPES = ((576, 576), (1536, 576), (576, 1536), (192, 576))  # N x K


def _log(msg: str) -> None:
    print(f"[shift_add] {msg}", file=sys.stderr, flush=True)


def compile_shift_add(model: torch.nn.Module, example: dict[str, torch.Tensor], calibration: Callable[[int, int], Any], bits: int, group: int, **options: Any) -> Any:
    """The model compiled with only the `shift_add` pass (fusion off: the figures are the
    reparameterization's, and the graph runs the op's kernels or reference)."""
    import compiler
    from compiler.passes import default_pipeline
    from compiler.passes.shift_add import ShiftAdd

    pipeline = default_pipeline()
    pipeline.passes[pipeline.names().index("shift_add")] = ShiftAdd(bits=bits, group=group, say=_log, **options)
    start = time.perf_counter()
    compiled = compiler.compile(model, example, target="host", pipeline=pipeline, calibration=calibration, passes="shift_add")
    _log(f"compiled with {bits}-bit shift-add in {time.perf_counter() - start:.0f} s")
    return compiled


def pass_stats(compiled: Any) -> dict[str, Any]:
    record = next(r for r in compiled.result.records if r.name == "shift_add")
    return dict(record.result.stats)


def rtn_model(model: torch.nn.Module, layers: list[str], bits: int, group: int) -> tuple[torch.nn.Module, int, int]:
    """A copy of the model with the named weights replaced by their round-to-nearest
    quantization; (model, RTN bytes, fp16 bytes) of those weights."""
    from compiler.passes.shift_add import rtn_quantize

    out = copy.deepcopy(model)
    state = out.state_dict()
    nbytes = fp16 = 0
    for name in layers:
        w = state[name]
        q = rtn_quantize(w, bits, group)
        state[name] = q.dense.to(w.dtype)
        nbytes += q.nbytes
        fp16 += 2 * w.numel()
    out.load_state_dict(state)
    return out.eval(), nbytes, fp16


# -- quality and memory -----------------------------------------------------------------------


def quality_rows(args: argparse.Namespace) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    from compiler.evaluation import compare, load_text, token_windows

    module = load_smollm2()
    model = module.model()
    tok = module.tokenizer()
    windows = {}
    for text in TEXTS:
        every = token_windows(tok, load_text(text), args.length, count=None)
        step = max(1, len(every) // args.windows)
        windows[text] = [every[i * step] for i in range(args.windows)]
    example = {"input_ids": windows[TEXTS[0]][0], "attention_mask": torch.ones_like(windows[TEXTS[0]][0])}
    calibration = lambda window, count: module.calibration_batches(window, count)  # noqa: E731
    rows, memory = [], []
    for bits in args.bits:
        compiled = compile_shift_add(model, example, calibration, bits, args.group)
        stats = pass_stats(compiled)
        layers = [row["layer"] for row in stats["layers"]]
        baseline, rtn_bytes, fp16 = rtn_model(model, layers, bits, args.group)
        memory.append({
            "bits": bits, "group": args.group, "layers": len(layers), "fp16_bytes": stats["fp16_bytes"],
            "shiftadd_bytes": stats["weight_bytes"], "ratio_vs_fp16": stats["ratio_vs_fp16"],
            "rtn_bytes": rtn_bytes, "rtn_ratio_vs_fp16": fp16 / rtn_bytes,
        })
        _log(f"memory {bits}-bit: shift-add {stats['ratio_vs_fp16']:.2f}x fp16 ({stats['weight_bytes'] / 2**20:.1f} MiB), RTN {fp16 / rtn_bytes:.2f}x")
        for text in TEXTS:
            for method, candidate in (("shiftadd", compiled), ("rtn", baseline)):
                start = time.perf_counter()
                report = compare(model, candidate, windows[text])
                row = {
                    "method": method, "bits": bits, "group": args.group, "text": text, "windows": args.windows, "length": args.length,
                    "ppl_fp": report.ppl_reference, "ppl": report.ppl_candidate, "ppl_increase": report.ppl_increase,
                    "top1_agreement": report.top1_agreement, "tokens": report.tokens,
                }
                rows.append(row)
                _log(f"quality {method} {bits}-bit on {text}: ppl {row['ppl_fp']:.3f} -> {row['ppl']:.3f} ({row['ppl_increase']:+.2%}), top-1 {row['top1_agreement']:.3f} ({time.perf_counter() - start:.0f} s)")
    return rows, memory


# -- speed ------------------------------------------------------------------------------------


def _random_weight(n: int, k: int, bits: int, group: int, gen: torch.Generator) -> Any:
    from compiler.ops.shift_add import ShiftAddWeight

    planes = torch.randint(0, 256, (bits, n, k // 8), generator=gen, dtype=torch.int32).to(torch.uint8)
    scales = torch.randint(200, 248, (bits, n, k // group), generator=gen, dtype=torch.int32).to(torch.uint8)
    return ShiftAddWeight(planes, scales, torch.rand(n, generator=gen) * 0.1)


def _kernel(weight: Any, x: torch.Tensor) -> Callable[..., torch.Tensor]:
    import compiler.codegen.tvm  # noqa: F401 - registers the TVM lowerings
    from compiler.ops.registry import LoweringRequest
    from compiler.ops.shift_add import shiftadd_linear
    from compiler.targets import load_target

    kernel = shiftadd_linear.lowerings["tvm"](LoweringRequest((x, weight.planes, weight.scales, weight.row_scale), load_target("host"), True))
    if kernel.runner is None:
        raise RuntimeError(f"no runnable TVM kernel for shiftadd_linear: {kernel.note}")
    return kernel.runner


def gemv_rows(bits: int, group: int, repeats: int) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    from compiler.ops.shift_add import shiftadd_linear

    gen = torch.Generator().manual_seed(0)
    rows = []
    for n, k in SHAPES:
        x = torch.randn(1, k, generator=gen)
        w = _random_weight(n, k, bits, group, gen)
        dense = w.dense()
        run = _kernel(w, x)
        error = float((run(x, w.planes, w.scales, w.row_scale) - shiftadd_linear.reference(x, w.planes, w.scales, w.row_scale)).abs().max())
        times = time_interleaved({"fp32": lambda: F.linear(x, dense), "shiftadd": lambda: run(x, w.planes, w.scales, w.row_scale)}, repeats, warmup=5)
        row = {"n": n, "k": k, "bits": bits, "group": group, **{f"{m}_s": summarize(t) for m, t in times.items()}, "max_abs_error_vs_reference": error}
        row["speedup_vs_fp32"] = row["fp32_s"]["median"] / row["shiftadd_s"]["median"]
        rows.append(row)
        _log(f"gemv {n}x{k} {bits}-bit: {row['speedup_vs_fp32']:.2f}x fp32 F.linear")
    # one decode step: 30 layers x (q, k, v, o, gate, up, down), each its own weight
    layer = ((576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576), (576, 1536))
    shapes = [s for _ in range(30) for s in layer]
    xs = {k: torch.randn(1, k, generator=gen) for k in (576, 1536)}
    packed = [_random_weight(n, k, bits, group, gen) for n, k in shapes]
    fp32 = [w.dense() for w in packed]
    runs = {shape: _kernel(w, xs[shape[1]]) for shape, w in zip(shapes, packed)}

    def step_fp32() -> None:
        for (n, k), w in zip(shapes, fp32):
            F.linear(xs[k], w)

    def step_shiftadd() -> None:
        for shape, w in zip(shapes, packed):
            runs[shape](xs[shape[1]], w.planes, w.scales, w.row_scale)

    times = time_interleaved({"fp32": step_fp32, "shiftadd": step_shiftadd}, max(5, repeats // 4), warmup=2)
    step = {
        "layers": len(shapes), "bits": bits, "group": group,
        "fp32_weight_bytes": sum(w.numel() * 4 for w in fp32), "shiftadd_weight_bytes": sum(w.nbytes for w in packed),
        **{f"{m}_s": summarize(t) for m, t in times.items()},
    }
    step["decode_linear_speedup"] = step["fp32_s"]["median"] / step["shiftadd_s"]["median"]
    _log(f"decode step, all {len(shapes)} linear layers at {bits} bits: {step['decode_linear_speedup']:.2f}x fp32")
    return rows, step


# -- MiniLM -----------------------------------------------------------------------------------


def minilm_rows(group: int, bits_list: tuple[int, ...]) -> list[dict[str, Any]]:
    spec = __import__("importlib.util").util.spec_from_file_location("minilm_example", REPO / "examples" / "minilm.py")
    minilm = __import__("importlib.util").util.module_from_spec(spec)
    spec.loader.exec_module(minilm)
    model = minilm.model()
    batches = minilm.evaluation_batches()
    with torch.no_grad():
        reference = torch.cat([model(**b) for b in batches])
    rows = []
    for bits in bits_list:
        compiled = compile_shift_add(model, minilm.example_inputs(), minilm.calibration_batches, bits, group, calibration_length=minilm.SEQ_TOKENS, calibration_count=8)
        stats = pass_stats(compiled)
        with torch.no_grad():
            got = torch.cat([compiled(**b) for b in batches])
        cos = F.cosine_similarity(got, reference, dim=-1)
        rows.append({"bits": bits, "group": group, "sentences": int(cos.numel()), "layers": len(stats["layers"]), "ratio_vs_fp16": stats.get("ratio_vs_fp16"), "cosine_mean": float(cos.mean()), "cosine_min": float(cos.min())})
        _log(f"minilm {bits}-bit: cosine with fp32 mean {float(cos.mean()):.4f}, min {float(cos.min()):.4f}")
    return rows


def _goals(payload: dict[str, Any]) -> dict[str, Any]:
    goals: dict[str, Any] = {}
    quality = payload.get("quality") or []
    for bits in (3, 2):
        for text in TEXTS:
            sa = next((r for r in quality if r["method"] == "shiftadd" and r["bits"] == bits and r["text"] == text), None)
            rtn = next((r for r in quality if r["method"] == "rtn" and r["bits"] == bits and r["text"] == text), None)
            if sa and rtn:
                goals[f"shiftadd_beats_rtn_{bits}bit_{text}"] = {"value": [round(sa["ppl"], 3), round(rtn["ppl"], 3)], "met": sa["ppl"] < rtn["ppl"]}
    for r in quality:
        if r["method"] == "shiftadd" and r["bits"] == 4:
            goals[f"shiftadd_4bit_ppl_increase<=5%_{r['text']}"] = {"value": round(r["ppl_increase"], 4), "met": r["ppl_increase"] <= 0.05}
    for r in payload.get("memory") or []:
        if r["bits"] == 3:
            goals["memory_3bit_ratio>=4.5"] = {"value": r["ratio_vs_fp16"], "met": r["ratio_vs_fp16"] >= 4.5}
    step = payload.get("decode_step")
    if step:
        goals["decode_linear_speedup>=1.5"] = {"value": round(step["decode_linear_speedup"], 3), "met": step["decode_linear_speedup"] >= 1.5}
    return goals


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--only", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    parser.add_argument("--bits", type=int, nargs="+", default=list(BITS))
    parser.add_argument("--group", type=int, default=64)
    parser.add_argument("--windows", type=int, default=8, help="windows per evaluation text")
    parser.add_argument("--length", type=int, default=512)
    parser.add_argument("--gemv-bits", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=50)
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    payload: dict[str, Any] = {"env": env_info(), "target": "host", "group": args.group}
    start = time.perf_counter()
    if "quality" in args.only or "memory" in args.only:
        quality, memory = quality_rows(args)
        if "quality" in args.only:
            payload["quality"] = quality
        payload["memory"] = memory
    if "gemv" in args.only:
        payload["gemv"], payload["decode_step"] = gemv_rows(args.gemv_bits, args.group, args.repeats)
    if "minilm" in args.only:
        payload["minilm"] = minilm_rows(args.group, tuple(args.bits))
    finish(payload, _goals, start, args.json)


if __name__ == "__main__":
    main()
