"""Benchmark of layer skipping on the host: static sublayer/block removal and SkipDecode.

SmolLM2-135M (fp32, 30 blocks), target `host`. Sections (`--only`):

- `static`: the `layer_skip` pass removes 10%, 20% and 30% of the attention sublayers, of the
  MLP sublayers and of the whole blocks, ranked by input/output similarity on calibration text
  (He et al.), plus Unified Layer Skipping's evenly spread blocks and the greedy ranking of
  attention sublayers by measured calibration perplexity (`method="greedy"`, one greedy order
  grown to the largest fraction; every fraction takes its prefix). `--modes` picks a subset
  (`attention:greedy block:unified`). Per row:
  - `ppl`, `ppl_increase`, `top1_agreement` against the unmodified model on `--windows` windows
    of `--length` tokens of `abstracts_evaluation.txt` and of `novel_evaluation.txt` (the
    rewritten ATen graph run as is, against the captured graph);
  - `speedup_measured`: prefill of `--prefill` tokens (last position's logits, as generation
    runs it), both graphs compiled by the default lossless pipeline for the host, timed
    interleaved (`--repeats`, medians);
  - `speedup_predicted`: the cost model's ratio over the same two compiled graphs at that
    length; `speedup_predicted_pass`: the pass's own estimate on the graph it rewrote (before
    fusion).
  A PNG of ppl increase against measured speedup per mode is written next to the JSON.
- `dynamic`: SkipDecode schedules (exits falling linearly over the continuation), decode graphs
  run as captured (eager ATen, the same for the full model). Teacher-forced perplexity and top-1
  agreement of the continuation through real token-by-token decode (a `--dyn-prompt`-token
  prompt, `--dyn-continuation` tokens) against full decode; `speedup_measured` is the ratio of
  the decode steps' total times (the prefill, the same in both, untimed), `speedup_predicted`
  the cost model's over the same steps.

Run:

    .venv/bin/python benchmarks/layer_skip.py --json /tmp/layer_skip.json
    .venv/bin/python benchmarks/layer_skip.py --only static --fractions 0.1 --json /tmp/ls.json
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.common import capture_lm_forward, env_info, finish, load_smollm2, summarize, time_interleaved  # noqa: E402

SECTIONS = ("static", "dynamic")
TEXTS = ("abstracts_evaluation", "novel_evaluation")
MODES = (("attention", "similarity"), ("attention", "greedy"), ("mlp", "similarity"), ("block", "similarity"), ("block", "unified"))


def _log(msg: str) -> None:
    print(f"[layer_skip] {msg}", file=sys.stderr, flush=True)


class Models:
    """SmolLM2 captured with a symbolic length twice: all logits (quality) and the last
    position's (prefill speed)."""

    def __init__(self) -> None:
        self.module = load_smollm2()
        self.model = self.module.model()
        self.tok = self.module.tokenizer()
        self._graphs: dict[bool, Any] = {}

    @property
    def full(self) -> Any:
        return self._captured(False)

    @property
    def last(self) -> Any:
        return self._captured(True)

    def _captured(self, last_only: bool) -> Any:
        if last_only not in self._graphs:
            start = time.perf_counter()
            self._graphs[last_only] = capture_lm_forward(self.model, last_only)
            _log(f"captured the forward graph ({'last' if last_only else 'all'} logits) in {time.perf_counter() - start:.0f} s")
        return self._graphs[last_only]

    def calibration(self) -> Any:
        from compiler.calibration import Calibration

        def make(window: int, count: int) -> list[dict[str, torch.Tensor]]:
            return [{"input_ids": b["input_ids"]} for b in self.module.calibration_batches(window=window, count=count)]

        return Calibration(make).with_flatten(self.full.flatten_example)


CALIBRATION_WINDOWS = 8  # windows of 512 tokens the pass ranks on (--calibration-windows)


def _skip(gm: Any, names: list[str] | None, kind: str, method: str, fraction: float, calibration: Any, length: int, count: int | None = None) -> tuple[Any, dict[str, Any]]:
    """A copy of gm with the pass applied: (graph, the pass's stats)."""
    from compiler.ir import copy_graph_module
    from compiler.passes.layer_skip import LayerSkip
    from compiler.passes.pipeline import PassContext

    out = copy_graph_module(gm)
    if names is not None:
        p = LayerSkip(kind=kind, method=method, names=names, length=length, say=_log)
    elif count is not None:
        p = LayerSkip(kind=kind, method=method, count=count, length=length, calibration_count=CALIBRATION_WINDOWS, say=_log)
    else:
        p = LayerSkip(kind=kind, method=method, fraction=fraction, length=length, say=_log)
    result = p.run(out, PassContext(target="host", calibration_data=calibration))
    return out, result.stats


def _compile(gm: Any) -> Any:
    from compiler.driver import CompileOptions, compile_graph
    from compiler.ir import copy_graph_module

    return compile_graph(copy_graph_module(gm), CompileOptions.make("host", "lossless"))


def _predicted(baseline: Any, candidate: Any, length: int) -> float:
    from compiler.cost_model import CostModel

    model = CostModel("host")

    def seconds(gm: Any) -> float:
        est = model.graph(gm)
        return float(est.at_length(length).time)

    return seconds(baseline) / seconds(candidate)


def static_rows(models: Models, modes: list[tuple[str, str]], fractions: list[float], length: int, windows: int, prefill: int, repeats: int) -> list[dict[str, Any]]:
    from compiler.evaluation import compare, load_text, token_windows

    calibration = models.calibration()
    texts = {name: token_windows(models.tok, load_text(name), length, count=windows) for name in TEXTS}
    prefill_ids = token_windows(models.tok, load_text("novel_evaluation"), prefill, count=1)[0]
    flat = models.last.flatten_inputs((), {"input_ids": prefill_ids, "logits_to_keep": 1})
    start = time.perf_counter()
    base = _compile(models.last.gm)
    _log(f"compiled the unmodified prefill graph in {time.perf_counter() - start:.0f} s")

    def run_full(gm: Any) -> Callable[..., torch.Tensor]:
        return lambda input_ids, attention_mask=None: models.full.unflatten_outputs(gm(*models.full.flatten_inputs((), {"input_ids": input_ids}))).logits

    memo: dict[tuple[int, tuple[int, ...]], torch.Tensor] = {}

    def reference(input_ids: torch.Tensor, attention_mask: Any = None) -> torch.Tensor:
        key = (input_ids.data_ptr(), tuple(input_ids.shape))  # the same window tensors every time
        if key not in memo:
            memo[key] = run_full(models.full.gm)(input_ids)
        return memo[key]

    rows = []
    for kind, method in modes:
        ranked: list[str] = []
        greedy: dict[str, Any] = {}
        if method == "similarity":  # one calibration per kind: every fraction takes a prefix of the ranking
            _, stats = _skip(models.full.gm, None, kind, method, 1.0, calibration, prefill)
            ranked, similarity = stats["skipped"], {u["name"]: u["similarity"] for u in stats["units"]}
        elif method == "greedy":  # one greedy order, grown to the largest fraction's count
            t0 = time.perf_counter()
            units = len(find_units(models.full.gm, kind))
            _, stats = _skip(models.full.gm, None, kind, method, 1.0, calibration, prefill, count=round(max(fractions) * units))
            ranked, similarity = stats["skipped"], {}
            greedy = {"order": ranked, "seconds": time.perf_counter() - t0}
            _log(f"greedy order of {len(ranked)} {kind} units in {greedy['seconds']:.0f} s: {', '.join(ranked)}")
        for fraction in fractions:
            t0 = time.perf_counter()
            if method in ("similarity", "greedy"):
                names = ranked[: round(fraction * len(ranked))]
                rewritten, stats = _skip(models.full.gm, names, kind, method, fraction, None, prefill)
            else:
                rewritten, stats = _skip(models.full.gm, None, kind, method, fraction, None, prefill)
                names, similarity = stats["skipped"], {}
            last, last_stats = _skip(models.last.gm, names, kind, method, fraction, None, prefill)
            row: dict[str, Any] = {
                "mode": kind, "method": method, "fraction": fraction, "skipped": names, "units": len(stats["units"]),
                "similarity": {name: similarity[name] for name in names if name in similarity},
                "speedup_predicted_pass": last_stats["predicted_speedup"],
            }
            if greedy:
                row["greedy_order"] = greedy["order"]
                row["greedy_seconds"] = greedy["seconds"]
            for text, ids in texts.items():
                report = compare(reference, run_full(rewritten), ids)
                row[text] = {"ppl_fp": report.ppl_reference, "ppl": report.ppl_candidate, "ppl_increase": report.ppl_increase, "top1_agreement": report.top1_agreement, "tokens": report.tokens}
            compiled = _compile(last)
            with torch.no_grad():
                times = time_interleaved({"full": lambda: base.executable(*flat), "skipped": lambda: compiled.executable(*flat)}, repeats, warmup=1)
            row["prefill_tokens"] = prefill
            row.update({f"{n}_s": summarize(t) for n, t in times.items()})
            row["speedup_measured"] = row["full_s"]["median"] / row["skipped_s"]["median"]
            row["speedup_predicted"] = _predicted(base.ir, compiled.ir, prefill)
            row["prediction_error"] = row["speedup_predicted"] / row["speedup_measured"] - 1
            rows.append(row)
            q = ", ".join(f"{t.split('_')[0]} ppl {row[t]['ppl_increase']:+.2%} top-1 {row[t]['top1_agreement']:.3f}" for t in TEXTS)
            _log(f"static {kind}/{method} {fraction:.0%} ({len(names)} units): {q}; prefill {row['speedup_measured']:.3f}x measured, {row['speedup_predicted']:.3f}x predicted ({time.perf_counter() - t0:.0f} s)")
    return rows


def find_units(gm: Any, kind: str) -> list[Any]:
    from compiler.analysis.blocks import find_blocks

    blocks = find_blocks(gm)
    return [b for b in blocks.blocks if b.sublayers] if kind == "block" else blocks.of_kind(kind)


def plot(rows: list[dict[str, Any]], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for kind, method in MODES:
        points = [r for r in rows if r["mode"] == kind and r["method"] == method]
        if not points:
            continue
        xs = [r["speedup_measured"] for r in points]
        ys = [100 * sum(r[t]["ppl_increase"] for t in TEXTS) / len(TEXTS) for r in points]
        ax.plot(xs, ys, marker="o", label=f"{kind} ({method})")
        for r, x, y in zip(points, xs, ys):
            ax.annotate(f"{r['fraction']:.0%}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.set_xlabel(f"measured prefill speedup ({rows[0]['prefill_tokens']} tokens, host)")
    ax.set_ylabel("perplexity increase, mean of both texts (%)")
    ax.set_yscale("symlog", linthresh=10)
    ax.axhline(5, color="grey", linestyle=":", linewidth=1)
    ax.set_title("SmolLM2-135M: layer skipping, quality against speed")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def dynamic_rows(models: Models, schedules: list[tuple[int, int]], prompt: int, continuation: int, samples: int) -> list[dict[str, Any]]:
    from compiler.evaluation import load_text, token_windows
    from compiler.generation import CachedLM, Session
    from compiler.kv_cache import FullCache
    from compiler.passes.layer_skip.dynamic import ExitSchedule, compile_skip_decode, predicted_decode_speedup

    start = time.perf_counter()
    lm = CachedLM.capture(models.model, say=_log)
    _log(f"captured prefill and decode in {time.perf_counter() - start:.0f} s")
    layers = lm.shape.layers
    cases = {text: token_windows(models.tok, load_text(text), prompt + continuation, count=samples) for text in TEXTS}

    def score(session_fn: Callable[[], Session], ids: torch.Tensor) -> tuple[torch.Tensor, float]:
        """Teacher-forced logits of the continuation (as `Session.score`), and the seconds its
        decode steps took (the prefill, the same graph in both, is not timed)."""
        session = session_fn()
        logits = [session.prefill(ids[:, :prompt])]
        t0 = time.perf_counter()
        for i in range(prompt, ids.shape[1] - 1):
            logits.append(session.step(ids[:, i]))
        return torch.stack(logits, 1), time.perf_counter() - t0

    full: dict[str, list[tuple[torch.Tensor, float]]] = {}
    for text, windows in cases.items():
        full[text] = [score(lambda: Session(lm.prefill.gm, lm.decode.gm, FullCache(layers)), ids) for ids in windows]
    rows = []
    for min_blocks, stride in schedules:
        schedule = ExitSchedule(layers, min_blocks, continuation, stride)
        skip = compile_skip_decode(lm, schedule, compile=False)
        row: dict[str, Any] = {"max_blocks": layers, "min_blocks": min_blocks, "span": continuation, "stride": stride, "mean_blocks": schedule.mean_blocks(continuation - 1)}
        full_s = skip_s = 0.0
        for text, windows in cases.items():
            nll_ref = nll = agree = tokens = 0.0
            for ids, (ref, _) in zip(windows, full[text]):
                # full and skipping decode back to back on the same window: the timed pair sees
                # the same machine (the reference logits come from the first full run)
                _, t_ref = score(lambda: Session(lm.prefill.gm, lm.decode.gm, FullCache(layers)), ids)
                logits, t = score(skip.session, ids)
                target = ids[:, prompt:]
                nll_ref += float(torch.nn.functional.cross_entropy(ref[0], target[0], reduction="sum"))
                nll += float(torch.nn.functional.cross_entropy(logits[0], target[0], reduction="sum"))
                agree += float((logits.argmax(-1) == ref.argmax(-1)).sum())
                tokens += target.numel()
                full_s, skip_s = full_s + t_ref, skip_s + t
            ppl_ref, ppl = float(torch.exp(torch.tensor(nll_ref / tokens))), float(torch.exp(torch.tensor(nll / tokens)))
            row[text] = {"ppl_fp": ppl_ref, "ppl": ppl, "ppl_increase": ppl / ppl_ref - 1, "top1_agreement": agree / tokens, "tokens": int(tokens)}
        row["seconds_full"], row["seconds_skip"] = full_s, skip_s
        row["speedup_measured"] = full_s / skip_s
        row["speedup_predicted"] = predicted_decode_speedup(lm, schedule, continuation - 1, prompt + continuation // 2)
        rows.append(row)
        q = ", ".join(f"{t.split('_')[0]} ppl {row[t]['ppl_increase']:+.2%} top-1 {row[t]['top1_agreement']:.3f}" for t in TEXTS)
        _log(f"dynamic {layers}->{min_blocks} blocks (mean {row['mean_blocks']:.1f}): {q}; {row['speedup_measured']:.3f}x measured, {row['speedup_predicted']:.3f}x predicted decode")
    return rows


def _goals(payload: dict[str, Any]) -> dict[str, Any]:
    goals: dict[str, Any] = {}
    static = payload.get("static") or []
    attention = [r for r in static if r["mode"] == "attention" and all(r[t]["ppl_increase"] <= 0.05 for t in TEXTS)]
    if static:
        best = max((r["speedup_measured"] for r in attention), default=1.0)
        goals["attention_prefill_speedup>=1.15_within_ppl+5%"] = {"value": round(best, 3), "met": best >= 1.15}
        worst = max(abs(r["prediction_error"]) for r in static)
        goals["predicted_within_10%_of_measured"] = {"value": round(worst, 3), "met": worst <= 0.10}
    return goals


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", metavar="OUT", help="write the results here as JSON (and the plot next to it)")
    parser.add_argument("--only", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.1, 0.2, 0.3])
    parser.add_argument("--calibration-windows", type=int, default=CALIBRATION_WINDOWS, help="512-token calibration windows the greedy ranking measures on (default 8)")
    parser.add_argument("--modes", nargs="+", default=[f"{k}:{m}" for k, m in MODES], help="static modes as kind:method (default: all)")
    parser.add_argument("--length", type=int, default=1024, help="tokens per evaluation window")
    parser.add_argument("--windows", type=int, default=3, help="evaluation windows per text")
    parser.add_argument("--prefill", type=int, default=2048, help="tokens of the timed prefill")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--schedules", nargs="+", default=["24:2", "18:3"], help="SkipDecode min_blocks:stride")
    parser.add_argument("--dyn-prompt", type=int, default=256)
    parser.add_argument("--dyn-continuation", type=int, default=128)
    parser.add_argument("--dyn-samples", type=int, default=2)
    args = parser.parse_args(argv)

    globals()["CALIBRATION_WINDOWS"] = args.calibration_windows
    torch.manual_seed(0)
    payload: dict[str, Any] = {"env": env_info(), "target": "host", "calibration_windows": CALIBRATION_WINDOWS}
    start = time.perf_counter()
    models = Models()
    if "static" in args.only:
        modes = [tuple(m.split(":", 1)) for m in args.modes]
        unknown = [f"{k}:{m}" for k, m in modes if (k, m) not in MODES]
        if unknown:
            parser.error(f"--modes: unknown {', '.join(unknown)}; known: {', '.join(f'{k}:{m}' for k, m in MODES)}")
        payload["static"] = static_rows(models, modes, args.fractions, args.length, args.windows, args.prefill, args.repeats)
        if args.json:
            payload["plot"] = str(plot(payload["static"], Path(args.json).with_suffix(".png")))
    if "dynamic" in args.only:
        schedules = [tuple(int(x) for x in s.split(":")) for s in args.schedules]
        payload["dynamic"] = dynamic_rows(models, schedules, args.dyn_prompt, args.dyn_continuation, args.dyn_samples)
    finish(payload, _goals, start, args.json)


if __name__ == "__main__":
    main()
