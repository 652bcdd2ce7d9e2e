"""The cost report that `optimize` writes: predicted time by category before and after the
passes, the most expensive kernels, and a roofline plot of the graph on its target.

    table = cost_table(before, after)           # rows per category, plus the total
    kernels = group_kernels(after.estimates)    # identical kernels counted, costliest first
    text = cost_markdown(table, kernels)        # both as Markdown
    data = cost_json(table, kernels)            # both as JSON values
    roofline_plot(after.estimates, hw, "roofline.png", "SmolLM2 on h100")

Everything here needs numbers: bind a graph's shape symbols first (`GraphEstimate.at`, or
`example_bindings` for the sizes of the example inputs). `CostReport` is what the driver keeps
per compilation and writes next to the other artifacts.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from functools import cached_property, reduce
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import sympy
import torch
from torch import fx

from compiler.cost_model.model import Estimate, GraphEstimate, as_json, shape_symbols
from compiler.cost_model.rules import CATEGORIES
from compiler.targets import Hardware, Target

TOP_KERNELS = 12
# The roofline PNG: inches x dpi, so a fixed size in pixels.
PLOT_INCHES = (10.0, 6.5)
PLOT_DPI = 100
LABELS = 8  # the most expensive points get their op's name
COLOURS = {"attention": "tab:red", "linear": "tab:blue", "norm": "tab:green", "elementwise": "tab:orange", "other": "tab:gray"}


# -- kernels, grouped --------------------------------------------------------------------------


@dataclass(frozen=True)
class KernelGroup:
    """Identical kernels (same op, category, shapes, work and time), counted: one row of the
    kernel table and one point of the roofline plot."""

    op: str
    category: str
    names: tuple[str, ...]
    shape: str
    flops: float
    bytes: float
    time: float
    bound: str
    matmul_dtypes: tuple[str, ...]

    @property
    def count(self) -> int:
        return len(self.names)

    @property
    def total_time(self) -> float:
        return self.time * self.count

    @property
    def intensity(self) -> float:
        """FLOPs per byte moved."""
        return self.flops / self.bytes if self.bytes else math.inf

    @property
    def flop_rate(self) -> float:
        """Attained FLOP/s: FLOPs over the predicted time (launch overhead included)."""
        return self.flops / self.time

    def as_dict(self) -> dict[str, Any]:
        return {
            "op": self.op,
            "category": self.category,
            "count": self.count,
            "names": list(self.names),
            "shape": self.shape,
            "flops": self.flops,
            "bytes": self.bytes,
            "intensity": self.intensity if self.bytes else None,
            "time_s": self.time,
            "total_s": self.total_time,
            "bound": self.bound,
        }


def group_kernels(estimates: Iterable[Estimate], shapes: Mapping[str, str] | None = None) -> list[KernelGroup]:
    """The (numeric) estimates that cost anything, grouped when identical, most total time
    first."""
    groups: dict[tuple[Any, ...], list[Estimate]] = {}
    for e in estimates:
        if _float(e.time) > 0:
            shape = (shapes or {}).get(e.name, "")
            key = (e.op, e.category, shape, _float(e.flops), _float(e.bytes), _float(e.time), e.bound)
            groups.setdefault(key, []).append(e)
    out = [
        KernelGroup(op, category, tuple(e.name for e in members), shape, flops, nbytes, time, bound, tuple(sorted(members[0].work.matmul_flops)))
        for (op, category, shape, flops, nbytes, time, bound), members in groups.items()
    ]
    return sorted(out, key=lambda g: -g.total_time)


def kernel_shapes(gm: fx.GraphModule, bindings: Mapping[sympy.Symbol, int] | None = None) -> dict[str, str]:
    """A shape summary per call_function node, e.g. {"mm": "8x64, 64x192 -> 8x192"}, with
    shape symbols replaced by `bindings`."""
    summaries: dict[fx.Node, str] = {}

    def summary(node: fx.Node) -> str:
        if node not in summaries:
            value = node.meta.get("val")
            if value is None and node.op == "get_attr":
                value = reduce(getattr, str(node.target).split("."), gm)
            shapes = [t.shape for t in torch.utils._pytree.tree_leaves(value) if isinstance(t, torch.Tensor)]
            summaries[node] = ", ".join("x".join(str(_bound(d, bindings)) for d in shape) or "scalar" for shape in shapes)
        return summaries[node]

    out = {}
    for node in gm.graph.nodes:
        if node.op == "call_function":
            ins = [x for x in map(summary, node.all_input_nodes) if x]
            out[node.name] = f"{', '.join(ins)} -> {summary(node)}"
    return out


def example_bindings(gm: fx.GraphModule, sample_inputs: Sequence[Any] | None = None) -> dict[sympy.Symbol, int]:
    """Numbers for the graph's shape symbols: the sizes of `sample_inputs` (one per
    placeholder) where a placeholder's size is a symbol, then the sizes the capture saw (the
    shape environment's hints) for the rest."""
    out: dict[sympy.Symbol, int] = {}
    placeholders = gm.graph.find_nodes(op="placeholder")
    for node, value in zip(placeholders, sample_inputs or ()):
        val = node.meta.get("val")
        pairs = zip(val.shape, value.shape) if isinstance(val, torch.Tensor) and isinstance(value, torch.Tensor) else [(val, value)]
        for size, actual in pairs:
            if isinstance(size, torch.SymInt) and isinstance(size.node.expr, sympy.Symbol) and isinstance(actual, int):
                out[size.node.expr] = actual
    env = _shape_env(gm)
    if env is not None:
        for sym, hint in env.backed_var_to_val.items():
            if isinstance(sym, sympy.Symbol) and sym not in out and hint.is_number:
                out[sym] = int(hint)
    return out


# -- the table ---------------------------------------------------------------------------------


def cost_table(before: GraphEstimate, after: GraphEstimate | None = None) -> list[dict[str, Any]]:
    """Predicted seconds and launches per category, before and (if given) after the passes,
    then a "total" row with the graphs' own totals. `share` is of the last graph's total."""
    graphs = {"before": before} if after is None else {"before": before, "after": after}
    by_category = {side: g.by_category() for side, g in graphs.items()}
    last = "after" if after is not None else "before"
    total = _float(graphs[last].time)
    rows = []
    for category in CATEGORIES:
        row: dict[str, Any] = {"category": category}
        for side, g in graphs.items():
            row[f"{side}_s"] = _float(by_category[side][category])
            row[f"{side}_launches"] = sum(_float(e.work.launches) for e in g.estimates if e.category == category)
        row["share"] = row[f"{last}_s"] / total if total else 0.0
        rows.append(row)
    totals: dict[str, Any] = {"category": "total"}
    for side, g in graphs.items():
        totals[f"{side}_s"] = _float(g.time)
        totals[f"{side}_launches"] = _float(g.launches)
    rows.append({**totals, "share": 1.0})
    return rows


def cost_json(table: list[dict[str, Any]], kernels: Sequence[KernelGroup], generic: Mapping[str, int] | None = None) -> dict[str, Any]:
    """A `cost_table`, the kernel groups of the last graph (`group_kernels`) and the ops it
    priced generically as plain JSON values, with the totals and the predicted speedup."""
    total = table[-1]
    sides = [s for s in ("before", "after") if f"{s}_s" in total]
    data: dict[str, Any] = {
        "predicted_seconds": {s: total[f"{s}_s"] for s in sides},
        "launches": {s: total[f"{s}_launches"] for s in sides},
        "categories": table,
        "kernels": [g.as_dict() for g in kernels],
        "generic_ops": dict(generic or {}),
    }
    if "after_s" in total:
        data["predicted_speedup"] = _ratio(total["before_s"], total["after_s"])
    return data


def cost_markdown(table: list[dict[str, Any]], kernels: Sequence[KernelGroup], generic: Mapping[str, int] | None = None, top: int = TOP_KERNELS) -> str:
    """A `cost_table` and the `top` most expensive kernel groups (`group_kernels` of the last
    graph) as Markdown, then the ops priced generically."""
    sides = [s for s in ("before", "after") if f"{s}_s" in table[-1]]
    head = ["category", *sides, "share", *(f"launches {s}" for s in sides)]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for r in table:
        name = f"**{r['category']}**" if r["category"] == "total" else r["category"]
        cells = [name, *(seconds(r[f"{s}_s"]) for s in sides), f"{r['share']:.1%}", *(f"{r[f'{s}_launches']:.0f}" for s in sides)]
        lines.append("| " + " | ".join(cells) + " |")
    total = table[-1][f"{sides[-1]}_s"]
    lines += [
        "",
        f"Most expensive kernels{' after the passes' if len(sides) > 1 else ''} ({min(top, len(kernels))} of {len(kernels)} distinct; identical kernels counted together):",
        "",
        "| op | count | shapes | FLOPs | bytes | FLOP/byte | time each | total | share | bound |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for g in kernels[:top]:
        cells = [
            f"`{g.op}`", str(g.count), g.shape or "-", si(g.flops), si(g.bytes, "B"),
            f"{g.intensity:.3g}" if g.bytes else "-", seconds(g.time), seconds(g.total_time),
            f"{g.total_time / total:.1%}" if total else "-", g.bound,
        ]
        lines.append("| " + " | ".join(cells) + " |")
    if generic:
        ops = ", ".join(f"`{op}` x{n}" for op, n in sorted(generic.items()))
        lines += ["", f"Priced generically (no cost rule; bytes moved and one FLOP per output element): {ops}."]
    return "\n".join(lines) + "\n"


# -- the roofline plot -------------------------------------------------------------------------


@dataclass(frozen=True)
class Roof:
    label: str
    rate: float  # FLOP/s for a compute roof, B/s for a memory roof
    memory: bool
    secondary: bool = False  # drawn lighter: cache levels, the vector rate


def roofs(hw: Hardware, dtypes: Iterable[str]) -> list[Roof]:
    """The achievable roofs the estimates use: memory (and each cache level), the matmul rate
    of each dtype in `dtypes`, and the vector rate."""
    out = [Roof(f"memory {si(hw.memory_bandwidth * hw.achievable['memory'], 'B/s')}", hw.memory_bandwidth * hw.achievable["memory"], True)]
    for capacity, bandwidth in hw.caches:
        out.append(Roof(f"cache <= {si(capacity, 'B')}: {si(bandwidth * hw.achievable['memory'], 'B/s')}", bandwidth * hw.achievable["memory"], True, secondary=True))
    for dtype in sorted(set(dtypes), key=hw.matmul_rate, reverse=True):
        out.append(Roof(f"{dtype} matmul {si(hw.matmul_rate(dtype), 'FLOP/s')}", hw.matmul_rate(dtype), False))
    vector = hw.vector_flops * hw.achievable["vector"]
    out.append(Roof(f"vector (fp32) {si(vector, 'FLOP/s')}", vector, False, secondary=True))
    return out


def roofline_points(estimates: Iterable[Estimate]) -> list[KernelGroup]:
    """The plottable kernel groups: those with FLOPs and bytes (a zero on a log axis is not)."""
    return _plottable(group_kernels(estimates))


def _plottable(groups: list[KernelGroup]) -> list[KernelGroup]:
    return [g for g in groups if g.flops > 0 and g.bytes > 0]


def roofline_plot(estimates: Iterable[Estimate], hw: Hardware, path: str | Path, title: str) -> list[KernelGroup]:
    """Write a roofline PNG of `estimates` on `hw` to `path`; returns the points plotted.

    x is arithmetic intensity (FLOP/byte), y attained FLOP/s (FLOPs over predicted time), both
    log; one point per group of identical kernels, coloured by category, with area by total
    time. Roofs are the achievable rates the model uses; ridge points are marked."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    groups = group_kernels(estimates)
    points = _plottable(groups)
    flopless = [g for g in groups if g.flops == 0]
    all_roofs = roofs(hw, {d for g in points for d in g.matmul_dtypes})
    memory = [r for r in all_roofs if r.memory]
    compute = [r for r in all_roofs if not r.memory]
    top = max(r.rate for r in compute)
    ridges = [r.rate / memory[0].rate for r in compute]
    xs = [g.intensity for g in points] + ridges
    x_lo, x_hi = min(xs) / 4, max(xs) * 4
    y_lo = min([g.flop_rate for g in points] + [memory[0].rate * x_lo]) / 4
    y_hi = top * 4

    fig = Figure(figsize=PLOT_INCHES, dpi=PLOT_DPI)
    FigureCanvasAgg(fig)
    ax = fig.add_axes((0.08, 0.085, 0.9, 0.86))
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlim(x_lo, x_hi)
    ax.set_ylim(y_lo, y_hi)
    handles = []
    for r in memory:
        x_end = top / r.rate
        (line,) = ax.plot([x_lo, x_end], [r.rate * x_lo, top], color="black", lw=1.0 if r.secondary else 1.2, ls="--" if r.secondary else "-", label=r.label)
        handles.append(line)
    for i, (r, ridge) in enumerate(zip(compute, ridges)):
        (line,) = ax.plot([ridge, x_hi], [r.rate, r.rate], color="dimgray" if r.secondary else "black", lw=1.2, ls=":" if r.secondary else "-", label=r.label)
        handles.append(line)
        if all(abs(math.log10(ridge / other)) > 0.02 for other in ridges[:i]):  # one label where roofs meet
            ax.plot([ridge], [r.rate], "o", color="black", ms=4)
            ax.annotate(f"ridge {ridge:.3g} FLOP/B", (ridge, r.rate), textcoords="offset points", xytext=(4, -11 if r.secondary else 4), fontsize=8)
    biggest = max((g.total_time for g in points), default=1.0)
    area = {g: 12 + 500 * g.total_time / biggest for g in points}  # points^2
    for category in CATEGORIES:
        mine = [g for g in points if g.category == category]
        if mine:
            ax.scatter(
                [g.intensity for g in mine], [g.flop_rate for g in mine], s=[area[g] for g in mine],
                color=COLOURS[category], alpha=0.7, edgecolors="black", linewidths=0.5, zorder=3,
            )
            kernels = sum(g.count for g in mine)
            handles.append(Line2D([], [], ls="", marker="o", color=COLOURS[category], markeredgecolor="black", label=f"{category}: {kernels} kernels, {seconds(sum(g.total_time for g in mine))}"))
    labelled: list[KernelGroup] = []
    for g in points:
        near = any(abs(math.log10(g.intensity / o.intensity)) < 0.2 and abs(math.log10(g.flop_rate / o.flop_rate)) < 0.3 for o in labelled)
        if len(labelled) < LABELS and not near:
            labelled.append(g)
            radius = math.sqrt(area[g]) / 2
            ax.annotate(f"{g.op.split('.', 1)[-1]} x{g.count}", (g.intensity, g.flop_rate), textcoords="offset points", xytext=(radius + 2, radius / 2 + 2), fontsize=7)
    note = "marker area: total predicted time of the group"
    if flopless:
        note += f"; not shown: {sum(g.count for g in flopless)} kernels with no FLOPs (copies, gathers), {seconds(sum(g.total_time for g in flopless))}"
    ax.text(0.01, 0.01, note, transform=ax.transAxes, fontsize=8, color="dimgray")
    ax.set_xlabel("arithmetic intensity (FLOP/byte)")
    ax.set_ylabel("attained FLOP/s (FLOPs / predicted time)")
    ax.set_title(title)
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(handles=handles, loc="upper left", fontsize=8)
    fig.savefig(path)
    return points


# -- per compilation ---------------------------------------------------------------------------


@dataclass(frozen=True)
class CostReport:
    """The cost model's prediction for one compilation: the graph before and after the passes,
    on `target`, with its shape symbols bound to example sizes (`bindings`, by input size
    name) where they could be; `shapes` summarises each kernel's shapes after the passes."""

    target: Target
    before: GraphEstimate
    after: GraphEstimate
    bindings: dict[str, int]
    shapes: dict[str, str]

    @classmethod
    def make(cls, target: Target, before: GraphEstimate, after: GraphEstimate, gm: fx.GraphModule, sample_inputs: Sequence[Any] | None = None, length: int | None = None) -> CostReport:
        """Bind the symbols of `before` and `after` (of graph `gm`) to the example sizes, or
        every one of them to `length` (a graph symbolic in the sequence length alone)."""
        symbols = _symbols(before) | _symbols(after)
        if length is not None:
            values = {s: length for s in symbols}
        else:
            values = example_bindings(gm, sample_inputs) if symbols else {}
        names = {sym: source for source, sym in shape_symbols(gm).items()}
        bindings = {names.get(sym, sym.name): n for sym, n in values.items() if sym in symbols}
        if values:
            before, after = before.at(values), after.at(values)
        return cls(target, before, after, bindings, kernel_shapes(gm, values))

    @cached_property
    def unbound(self) -> list[str]:
        """Shape symbols no example size was found for (then the report has no numbers)."""
        return sorted(s.name for s in _symbols(self.before) | _symbols(self.after))

    @cached_property
    def table(self) -> list[dict[str, Any]]:
        """`cost_table(before, after)`, computed once (numeric graphs only)."""
        return cost_table(self.before, self.after)

    @cached_property
    def kernels(self) -> list[KernelGroup]:
        return group_kernels(self.after.estimates, self.shapes)

    def summary(self) -> str:
        """One line: predicted time and launches before -> after, and the speedup."""
        if self.unbound:
            return f"cost model ({self.target.name}): predicted time depends on unbound shape symbols {', '.join(self.unbound)}"
        return f"cost model ({self.target.name}): {self._change()}"

    def _change(self) -> str:
        t = self.table[-1]
        return (
            f"predicted {seconds(t['before_s'])} -> {seconds(t['after_s'])} ({_ratio(t['before_s'], t['after_s']):.2f}x); "
            f"{t['before_launches']:.0f} -> {t['after_launches']:.0f} launches"
        )

    def plan_entry(self) -> dict[str, Any]:
        """For plan.json: totals, speedup, time by category, launches, bindings."""
        if self.unbound:
            b, a = self.before.by_category(), self.after.by_category()
            return {
                "target": self.target.name,
                "predicted_seconds": {"before": as_json(self.before.time), "after": as_json(self.after.time)},
                "by_category": {c: {"before": as_json(b[c]), "after": as_json(a[c])} for c in CATEGORIES},
                "bindings": self.bindings,
                "unbound_symbols": self.unbound,
            }
        t = self.table[-1]
        return {
            "target": self.target.name,
            "predicted_seconds": {"before": t["before_s"], "after": t["after_s"]},
            "predicted_speedup": _ratio(t["before_s"], t["after_s"]),
            "launches": {"before": t["before_launches"], "after": t["after_launches"]},
            "by_category": {r["category"]: {"before": r["before_s"], "after": r["after_s"]} for r in self.table[:-1]},
            "bindings": self.bindings,
        }

    def markdown(self, plot: str | None) -> str:
        """The report.md section; `plot` is the roofline PNG's file name, if one was written."""
        lines = [f"## Predicted cost ({self.target.name})", ""]
        if self.unbound:
            lines.append(
                f"The graph's shape symbols {', '.join(self.unbound)} could not be bound to example sizes, so there is "
                f"no table or plot. Predicted time before -> after the passes: `{self.before.time}` -> `{self.after.time}` s."
            )
            return "\n".join(lines) + "\n"
        figures = "measured" if self.target.hw.measured else "published"
        lines += [f"Roofline estimate on {self.target.description} ({figures} figures): {self._change()}.", ""]
        if self.bindings:
            lines += ["Shape symbols bound to the example sizes: " + ", ".join(f"`{k}` = {v}" for k, v in self.bindings.items()) + ".", ""]
        lines.append(cost_markdown(self.table, self.kernels, self.after.generic_ops()))
        lines += [f"![Roofline on {self.target.name}]({plot})" if plot else "No roofline plot: no kernel does arithmetic.", ""]
        return "\n".join(lines)

    def write(self, directory: Path) -> str | None:
        """Write cost.json and, for a numeric graph with arithmetic, roofline.png into
        `directory`; returns the PNG's file name, or None when there is nothing to plot."""
        if self.unbound:
            data = self.plan_entry()
        else:
            data = {"target": self.target.name, **cost_json(self.table, self.kernels, self.after.generic_ops()), "bindings": self.bindings}
        (directory / "cost.json").write_text(json.dumps(data, indent=2))
        if self.unbound or not _plottable(self.kernels):
            return None
        title = f"Roofline on {self.target.name} ({self.target.description}), after the passes"
        roofline_plot(self.after.estimates, self.target.hw, directory / "roofline.png", title)
        return "roofline.png"


# -- formatting --------------------------------------------------------------------------------


def seconds(value: float) -> str:
    """A duration in a readable unit, three significant digits: '4.90 ms', '12.3 us'."""
    return _scaled(value, (("s", 1.0), ("ms", 1e-3), ("us", 1e-6), ("ns", 1e-9)), "")


def si(value: float, unit: str = "") -> str:
    """A count with an SI prefix, three significant digits: si(1.31e5, 'B') == '131 kB'."""
    return _scaled(value, (("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3), ("", 1.0)), unit)


def _scaled(value: float, prefixes: Sequence[tuple[str, float]], unit: str) -> str:
    if not value:
        return "0"
    value = float(f"{value:.3g}")
    prefix, scale = next(((p, s) for p, s in prefixes if abs(value) >= s), prefixes[-1])
    v = value / scale
    if not prefix and v.is_integer():
        return f"{int(v)} {unit}".rstrip()
    return f"{v:.{max(0, 2 - math.floor(math.log10(abs(v))))}f} {prefix}{unit}".rstrip()


def _ratio(before: float, after: float) -> float:
    return before / after if after else math.inf


def _symbols(g: GraphEstimate) -> set[sympy.Symbol]:
    """`g.symbols`, without summing the graph (slow in sympy)."""
    return {s for e in g.estimates if isinstance(e.time, sympy.Basic) for s in e.time.free_symbols}


def _bound(size: Any, bindings: Mapping[sympy.Symbol, int] | None) -> Any:
    """A tensor size as a number where `bindings` make it one."""
    expr = size.node.expr if isinstance(size, torch.SymInt) else size
    return expr.subs(bindings) if bindings and isinstance(expr, sympy.Basic) else expr


def _float(v: Any) -> float:
    """A number from an estimate; a ValueError naming the shape symbols if it has some."""
    if isinstance(v, sympy.Basic) and v.free_symbols:
        names = ", ".join(sorted(s.name for s in v.free_symbols))
        raise ValueError(f"the estimate depends on shape symbols {names}; bind them first with GraphEstimate.at({{...}})")
    return float(v)


def _shape_env(gm: fx.GraphModule) -> Any:
    from compiler.ir import fake_mode_of

    try:
        return fake_mode_of(gm).shape_env
    except ValueError:  # no FakeTensor metadata
        return None
