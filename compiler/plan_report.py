"""What `optimize` adds to its report when it plans: the search, the quality table, the Pareto
plot, the measured speed, and the HTML rendering of report.md.

    pareto_plot(plan, "pareto.png")           # quality cost vs predicted speedup, front and budget
    lines = plan_markdown(plan, evaluation, speed, "pareto.png")
    html = markdown_html(text, "title")        # report.md as a standalone page, images inline-linked
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

from compiler.planner import Plan

PLOT_INCHES = (9.0, 6.0)
PLOT_DPI = 100


def pareto_plot(plan: Plan, path: str | Path) -> Path | None:
    """Calibration ppl increase against predicted speedup of every measured candidate, the
    Pareto front joined, the budget as a line (ppl budgets), the chosen plan ringed. None when
    nothing was measured."""
    measured = [c for c in plan.candidates if c.quality is not None and c.predicted_speedup]
    if not measured:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=PLOT_INCHES, dpi=PLOT_DPI)
    for c in measured:
        fits = c.status in ("fits", "chosen")
        ax.scatter(c.predicted_speedup, 100 * c.quality["ppl_increase"], color="tab:green" if fits else "tab:red", zorder=3)
        ax.annotate(c.label, (c.predicted_speedup, 100 * c.quality["ppl_increase"]), fontsize=7, xytext=(4, 3), textcoords="offset points")
    front = plan.pareto()
    ax.plot([c.predicted_speedup for c in front], [100 * c.quality["ppl_increase"] for c in front], color="tab:blue", lw=1, label="Pareto front", zorder=2)
    ax.scatter([1.0], [0.0], marker="s", color="black", label="lossless pipeline", zorder=3)
    if plan.budget.kind == "ppl":
        ax.axhline(100 * plan.budget.value, color="gray", ls="--", lw=1, label=f"budget {plan.budget}")
    chosen = plan.chosen
    if chosen.quality is not None:
        ax.scatter(chosen.predicted_speedup, 100 * chosen.quality["ppl_increase"], s=250, facecolors="none", edgecolors="black", label=f"chosen: {chosen.label}", zorder=4)
    ax.set_xlabel(f"predicted speedup over the lossless pipeline ({plan.target.name}, {plan.length} tokens)")
    ax.set_ylabel("perplexity increase on calibration text (%)")
    ax.set_yscale("symlog", linthresh=1.0)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    ax.set_title(f"Planner search: quality against predicted speed (budget {plan.budget})")
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out)
    plt.close(fig)
    return out


def plan_markdown(plan: Plan, evaluation: dict[str, Any] | None, speed: dict[str, Any] | None, plot: str | None) -> str:
    """The report.md section on the plan: choice, every candidate, left-out families, quality on
    evaluation text, measured speed."""
    c = plan.chosen
    lines = [
        "## Plan",
        "",
        f"Budget `{plan.budget}`, target `{plan.target.name}`, priced at {plan.length} tokens. "
        f"Chosen: **{c.label}**, predicted {c.predicted_speedup:.3f}x the lossless pipeline "
        f"({plan.captured_seconds / c.predicted_seconds:.3f}x the captured graph). {c.reason}.",
        "",
        f"Search: {len(plan.candidates)} candidates in {plan.seconds:.0f} s; quality measured on "
        f"{plan.calibration['windows']} calibration windows of {plan.calibration['length']} tokens "
        f"({plan.calibration['source']}).",
        "",
        "| candidate | predicted speedup | calibration ppl | top-1 | status | why |",
        "|---|---|---|---|---|---|",
    ]
    for cand in sorted(plan.candidates, key=lambda x: -(x.predicted_speedup or 0)):
        q = cand.quality
        ppl = f"{q['ppl_increase']:+.2%}" if q else ""
        top = f"{q['top1_agreement']:.3f}" if q else ""
        speedup = f"{cand.predicted_speedup:.3f}x" if cand.predicted_speedup else ""
        cached = " (cached)" if cand.cached else ""
        lines.append(f"| {cand.label} | {speedup} | {ppl} | {top} | {cand.status}{cached} | {cand.reason} |")
    if plan.excluded:
        lines += ["", "Left out of the search:", ""]
        lines += [f"- `{family}`: {why}" for family, why in plan.excluded.items()]
    if plot:
        lines += ["", f"![Quality against predicted speed]({plot})"]
    return "\n".join(lines) + "\n" + evaluation_markdown(evaluation) + speed_markdown(speed)


def evaluation_markdown(evaluation: dict[str, Any] | None) -> str:
    """The quality of the compiled model on evaluation text, per text."""
    if not evaluation:
        return ""
    lines = ["", "## Quality of the chosen plan on evaluation text", ""]
    lines += [f"{evaluation['windows']} window(s) of {evaluation['length']} tokens per text, compiled model against the captured one.", ""]
    lines += ["| text | ppl before | ppl after | increase | top-1 agreement | within budget |", "|---|---|---|---|---|---|"]
    for name, q in evaluation["texts"].items():
        lines.append(f"| {name} | {q['ppl_reference']:.3f} | {q['ppl_candidate']:.3f} | {q['ppl_increase']:+.2%} | {q['top1_agreement']:.3f} | {'yes' if q['within_budget'] else '**no**'} |")
    return "\n".join(lines) + "\n"


def speed_markdown(speed: dict[str, Any] | None) -> str:
    """Eager against compiled prefill, measured here, next to the cost model's ratio."""
    if not speed:
        return ""
    if "skipped" in speed:
        return f"\n## Measured speed on this machine\n\nNot measured: {speed['skipped']}.\n"
    predicted = speed.get("predicted_speedup")
    lines = ["", "## Measured speed on this machine", ""]
    lines.append(
        f"Prefill of {speed['length']} tokens, median of {speed['repeats']} interleaved runs: eager PyTorch "
        f"{speed['eager_s']:.3f} s, compiled {speed['compiled_s']:.3f} s: **{speed['measured_speedup']:.3f}x measured**"
        + (f", {predicted:.3f}x predicted by the cost model (captured graph against the compiled one)." if predicted else ".")
    )
    return "\n".join(lines) + "\n"


def markdown_html(text: str, title: str) -> str:
    """report.md as one HTML page (markdown-it, tables on); images stay relative links."""
    from markdown_it import MarkdownIt

    body = MarkdownIt("commonmark").enable("table").render(text)
    style = (
        "body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;line-height:1.45}"
        "table{border-collapse:collapse;margin:1em 0;font-size:0.9em}th,td{border:1px solid #ccc;padding:3px 8px;text-align:left}"
        "th{background:#f3f3f3}code{background:#f6f6f6;padding:0 3px}img{max-width:100%}"
    )
    return f"<!doctype html>\n<html><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title><style>{style}</style></head>\n<body>\n{body}</body></html>\n"
