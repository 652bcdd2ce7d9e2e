"""The `shift_add` pass: ShiftAddLLM's reparameterization of the linear layers of a graph.

Every linear layer (`sites.linear_sites`: a matmul by a constant weight) becomes
`compiler::shiftadd_linear(x, planes, scales, row_scale)` (plus the bias), its weight replaced
by `q` packed sign planes, one scale code per plane, row and group of input channels, and a
scale per row (`compiler.ops.shift_add`); the fp weight is no longer referenced by the graph
and is dropped from it unless another node (a tied embedding) still reads it.

Calibration (`calibration_count` windows of `calibration_length` tokens of the model's
calibration text): the graph runs once and every linear layer's input gram matrix H = X^T X is
accumulated (layers reading the same activation share it: q/k/v, gate/up); the quantizer uses it
to minimize the output error (`quantize.shift_add_quantize`).

Bits: `bits` for every layer, or `avg_bits` for ShiftAddLLM's automated allocation: every layer
is quantized at 2, 3 and 4 bits, its sensitivity at each width is its relative output error
on the calibration inputs, and a greedy allocation starts every layer at 2 bits and upgrades,
one bit at a time, the layer whose error drops most per added byte, while the average bits per
weight stay within the budget.

The cost model prices each layer as the matmul it was and as the lookup-table op, on the target,
at the graph's row count (M = 1 for a decode step; prefill's M makes the lookups lose to a
dense GEMM, and `only_if_faster` then keeps those layers dense). The result records per layer:
bits, output error, bytes against fp16, predicted times; in total: the reparameterized weights'
bytes and their ratio to fp16.

Quantized weights are kept in the compiler's cache (safetensors, keyed by the weight's bytes,
bits, group and the calibration inputs), so compiling the same model again skips the fitting.
"""

from __future__ import annotations

import hashlib
import math
import sys
import time
from typing import Any

import torch
import torch.fx as fx

from compiler.cache import cache_dir
from compiler.calibration import record, static_length
from compiler.cost_model.rules import TensorInfo, node_cost, op_cost
from compiler.errors import UserInputError
from compiler.ops import shift_add as ops
from compiler.passes.base import Pass, PassResult
from compiler.passes.shift_add.quantize import QuantizedLinear, relative_output_error, shift_add_quantize
from compiler.passes.shift_add.sites import LinearSite, linear_sites

aten = torch.ops.aten
_VERSION = 3  # bumped when the quantizer computes something different: cached weights are not reused
ALLOCATION_BITS = (2, 3, 4)


class ShiftAdd(Pass):
    name = "shift_add"
    lossy = True
    opt_in = True  # minutes of fitting on a real model: run when asked for (or by a planner)
    # calibration data is used when given (output error); without, the weight error is minimized

    def __init__(
        self,
        bits: int | None = 3,
        group: int = 64,
        avg_bits: float | None = None,
        calibration_length: int = 512,
        calibration_count: int = 16,
        skip_tied: bool = True,
        only: tuple[str, ...] | None = None,
        only_if_faster: bool = False,
        say: Any = None,
    ) -> None:
        if avg_bits is not None:
            if not ALLOCATION_BITS[0] <= avg_bits <= ALLOCATION_BITS[-1]:
                raise UserInputError(f"shift_add: avg_bits must be within {ALLOCATION_BITS[0]}..{ALLOCATION_BITS[-1]}, got {avg_bits}")
            bits = None
        elif bits not in ops.BITS:
            raise UserInputError(f"shift_add: bits must be one of {ops.BITS} (or give avg_bits for a per-layer allocation), got {bits}")
        if group < 8 or group % 8:
            raise UserInputError(f"shift_add: group must be a positive multiple of 8 (a byte of signs never straddles two groups), got {group}")
        self.bits, self.group, self.avg_bits = bits, group, avg_bits
        self.calibration_length, self.calibration_count = calibration_length, calibration_count
        self.skip_tied, self.only, self.only_if_faster = skip_tied, tuple(only) if only else None, only_if_faster
        self.say = say or (lambda msg: print(f"[shift_add] {msg}", file=sys.stderr, flush=True))

    def config(self) -> dict[str, Any]:
        return {
            "bits": self.bits, "group": self.group, "avg_bits": self.avg_bits,
            "calibration_length": self.calibration_length, "calibration_count": self.calibration_count,
            "skip_tied": self.skip_tied, "only": list(self.only) if self.only else None, "only_if_faster": self.only_if_faster,
        }

    def run(self, gm: fx.GraphModule, ctx: Any) -> PassResult:
        result = PassResult()
        result.stats = {**self.config(), "layers": [], "left": []}
        sites = self._eligible(gm, result)
        if not sites:
            return result
        hessians, calibration = self._hessians(gm, sites, ctx)
        widths = (self.bits,) if self.bits is not None else ALLOCATION_BITS
        fitted = self._fit(gm, sites, hessians, calibration, widths)
        chosen = {i: self.bits for i in fitted} if self.bits is not None else allocate(
            {i: {b: q.output_error for b, q in f.items()} for i, f in fitted.items()},
            {i: sites[i].matrix(gm).numel() for i in fitted},
            self.avg_bits,
        )
        total = fp16 = 0
        for i, site in enumerate(sites):
            q = fitted[i][chosen[i]]
            row = self._estimate(ctx.cost_model, site, q)
            if self.only_if_faster and row.get("predicted_speedup", math.inf) < 1:
                result.stats["left"].append({"layer": site.name, "why": f"predicted {row['predicted_speedup']:.2f}x the dense matmul on {ctx.target.name if ctx.target else 'the target'}"})
                continue
            new = _rewrite(gm, site, q.weight, i)
            total += q.weight.nbytes
            fp16 += 2 * q.weight.shape[0] * q.weight.shape[1]
            result.stats["layers"].append({"layer": site.name, "index": i, "node": site.node.name, "transposed": site.transposed, "shape": list(q.weight.shape), "bits": chosen[i], "output_error": q.output_error, "ratio_vs_fp16": round(2 * q.weight.shape[0] * q.weight.shape[1] / q.weight.nbytes, 3), **row})
            result.record(f"{site.name} ({site.node.name} -> {new.name}): {chosen[i]}-bit shift-add, output error {q.output_error:.2e}")
        gm.graph.eliminate_dead_code()
        _drop_unused_attrs(gm)
        if total:
            result.stats["weight_bytes"], result.stats["fp16_bytes"] = total, fp16
            result.stats["ratio_vs_fp16"] = round(fp16 / total, 3)
            result.stats["average_bits"] = round(sum(r["bits"] * math.prod(r["shape"]) for r in result.stats["layers"]) / sum(math.prod(r["shape"]) for r in result.stats["layers"]), 3)
        return result

    # -- which layers -------------------------------------------------------------------------

    def predicted_time(self, gm: fx.GraphModule, cost_model: Any, rows: int) -> tuple[float, float]:
        """(dense, shift-add) predicted seconds of the eligible linear layers at `rows` rows of
        activations, from shapes alone: what a planner asks before paying for the fitting. At
        prefill's rows the dense GEMM is compute-bound and the lookups lose; at a decode step's
        (rows = 1) the weight bytes decide and shift-add wins."""
        dense = lut = 0.0
        bits = self.bits or ALLOCATION_BITS[0]
        scratch = PassResult()
        scratch.stats["left"] = []
        for site in self._eligible(gm, scratch):
            n, k = site.matrix(gm).shape
            dtype = site.x.meta["val"].dtype
            x = TensorInfo((rows, k), dtype)
            dense += float(cost_model.estimate(op_cost(aten.mm.default, [x, TensorInfo((k, n), dtype, constant=True)], {}, [TensorInfo((rows, n), dtype)]).work).time)
            infos = (x, TensorInfo((bits, n, k // 8), torch.uint8, constant=True), TensorInfo((bits, n, k // self.group), torch.uint8, constant=True), TensorInfo((n,), torch.float32, constant=True))
            lut += float(cost_model.estimate(ops.shiftadd_linear.cost(*infos).work).time)
        return dense, lut

    def _eligible(self, gm: fx.GraphModule, result: PassResult) -> list[LinearSite]:
        sites, others = linear_sites(gm)
        if self.only is not None:
            named = {s.name for s in sites}
            for node, why in others:
                if any(pattern in node.name for pattern in self.only):
                    raise UserInputError(f"shift_add: {node.name} was selected by only={list(self.only)} but cannot be reparameterized: {why}. Select linear layers with constant weights (names: {sorted(named)[:5]}...)")
            missing = [p for p in self.only if not any(p in s.name or p in s.node.name for s in sites)]
            if missing:
                raise UserInputError(f"shift_add: only={missing} matches no linear layer with a constant weight; layers are named like {sorted(named)[:3]}")
        kept = []
        for site in sites:
            why = self._why_not(gm, site)
            if why is None and self.only is not None and not any(p in site.name or p in site.node.name for p in self.only):
                why = "not selected by `only`"
            if why:
                result.stats["left"].append({"layer": site.name, "why": why})
            else:
                kept.append(site)
        return kept

    def _why_not(self, gm: fx.GraphModule, site: LinearSite) -> str | None:
        n, k = site.matrix(gm).shape
        if k % self.group:
            return f"input dim {k} is not a multiple of the group ({self.group})"
        if self.skip_tied and any(user is not site.node and user.target is not aten.t.default for user in site.weight.users):
            return "the weight is also read by another op (a tied embedding): its fp copy stays, so nothing is saved (skip_tied=False to reparameterize it anyway)"
        val = site.x.meta.get("val")
        if val is None or val.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            return "the activation is not a float tensor"
        return None

    # -- calibration --------------------------------------------------------------------------

    def _hessians(self, gm: fx.GraphModule, sites: list[LinearSite], ctx: Any) -> tuple[dict[fx.Node, torch.Tensor], str | None]:
        """X^T X per activation that some layer reads, and a fingerprint of the calibration
        inputs (for the weight cache's key); ({}, None) without calibration data."""
        if ctx.calibration_data is None:
            self.say("no calibration data: minimizing the weight error only")
            return {}, None
        length = static_length(gm) or self.calibration_length
        batches = ctx.calibration_data.batches(length, self.calibration_count)
        sources = {s.source for s in sites}
        grams: dict[fx.Node, torch.Tensor] = {}

        def report(batch: int, node: fx.Node, value: Any) -> None:
            x = value.detach().reshape(-1, value.shape[-1]).float()
            grams[node] = grams.get(node, 0) + x.t() @ x

        start = time.perf_counter()
        record(gm, sources, batches, report)
        self.say(f"collected the inputs of {len(sites)} layers on {len(batches)} windows of {length} tokens ({time.perf_counter() - start:.0f} s)")
        return grams, _fingerprint(batches)

    def _fit(self, gm: fx.GraphModule, sites: list[LinearSite], hessians: dict[fx.Node, torch.Tensor], calibration: str | None, widths: tuple[int, ...]) -> dict[int, dict[int, QuantizedLinear]]:
        """Per site and width, its quantized weight. Sites that read the same activation (q, k
        and v; gate and up) share a Hessian, and the quantizer treats rows independently, so
        their matrices are stacked and quantized in one call (a third of the column sweeps)."""
        by_source: dict[fx.Node, list[int]] = {}
        for i, site in enumerate(sites):
            by_source.setdefault(site.source, []).append(i)
        fitted: dict[int, dict[int, QuantizedLinear]] = {i: {} for i in range(len(sites))}
        start = time.perf_counter()
        for done, (source, members) in enumerate(by_source.items(), 1):
            matrices = [sites[i].matrix(gm) for i in members]
            stacked = torch.cat(matrices, 0)
            h = hessians.get(source)
            for bits in widths:
                q = self._quantized(stacked, bits, h, calibration)
                row = 0
                for i, w in zip(members, matrices):
                    part = q.weight.rows(row, row + w.shape[0])
                    fitted[i][bits] = QuantizedLinear(part, relative_output_error(w, part.dense(), h))
                    row += w.shape[0]
            if done % 10 == 0 or done == len(by_source):
                spent = time.perf_counter() - start
                self.say(f"quantized {done}/{len(by_source)} layer groups at {'/'.join(map(str, widths))} bits ({spent:.0f} s, ~{spent / done * (len(by_source) - done):.0f} s left)")
        return fitted

    def _quantized(self, w: torch.Tensor, bits: int, hessian: torch.Tensor | None, calibration: str | None) -> QuantizedLinear:
        """The quantizer's result, from the cache when the same weight and calibration inputs
        (`calibration`, their fingerprint) were quantized before."""
        from safetensors.torch import load_file, save_file

        key = hashlib.sha256(repr((_VERSION, bits, self.group, calibration if hessian is not None else None)).encode() + w.contiguous().numpy().tobytes()).hexdigest()[:40]
        path = cache_dir("shift_add") / f"{key}.safetensors"
        if path.exists():
            t = load_file(str(path))
            return QuantizedLinear(ops.ShiftAddWeight(t["planes"], t["scales"], t["row_scale"]), float(t["output_error"]))
        q = shift_add_quantize(w, bits, self.group, hessian)
        save_file({"planes": q.weight.planes, "scales": q.weight.scales, "row_scale": q.weight.row_scale, "output_error": torch.tensor(q.output_error)}, str(path))
        return q

    # -- cost ---------------------------------------------------------------------------------

    def _estimate(self, cost_model: Any, site: LinearSite, q: QuantizedLinear) -> dict[str, Any]:
        """Predicted time of the dense matmul and of the shift-add op at the graph's rows."""
        if cost_model is None:
            return {}
        x = site.x.meta["val"]
        rows = math.prod(x.shape[:-1])
        if not isinstance(rows, int):
            return {}
        dense = cost_model.estimate(node_cost(site.node).work).time
        w = q.weight
        infos = (TensorInfo(tuple(x.shape), x.dtype), TensorInfo(tuple(w.planes.shape), torch.uint8, constant=True), TensorInfo(tuple(w.scales.shape), torch.uint8, constant=True), TensorInfo(tuple(w.row_scale.shape), torch.float32, constant=True))
        lut = cost_model.estimate(ops.shiftadd_linear.cost(*infos).work).time
        return {"rows": rows, "predicted_dense_s": float(dense), "predicted_shift_add_s": float(lut), "predicted_speedup": round(float(dense / lut), 3)}


def allocate(errors: dict[int, dict[int, float]], sizes: dict[int, int], avg_bits: float) -> dict[int, int]:
    """Bits per layer minimizing the sum of the layers' output errors with the average bits per
    weight at most `avg_bits`: every layer starts at the fewest bits, then the upgrade (one more
    bit for one layer) that removes the most error per added bit-weight is taken while it fits."""
    widths = sorted(next(iter(errors.values())))
    chosen = {i: widths[0] for i in errors}
    budget = avg_bits * sum(sizes.values())
    used = sum(widths[0] * sizes[i] for i in errors)
    while True:
        best, gain = None, 0.0
        for i, b in chosen.items():
            up = widths.index(b) + 1
            if up == len(widths) or used + (widths[up] - b) * sizes[i] > budget + 1e-9:
                continue
            g = (errors[i][b] - errors[i][widths[up]]) / ((widths[up] - b) * sizes[i])
            if best is None or g > gain:
                best, gain = i, g
        if best is None:
            return chosen
        up = widths[widths.index(chosen[best]) + 1]
        used += (up - chosen[best]) * sizes[best]
        chosen[best] = up




def _fingerprint(batches: list[list[Any]]) -> str:
    h = hashlib.sha256()
    for batch in batches:
        for t in batch:
            if isinstance(t, torch.Tensor):
                h.update(t.detach().contiguous().cpu().numpy().tobytes())
    return h.hexdigest()


def _rewrite(gm: fx.GraphModule, site: LinearSite, weight: ops.ShiftAddWeight, index: int) -> fx.Node:
    """Replace the matmul by shiftadd_linear(x, planes, scales, row_scale) (+ bias)."""
    from compiler.ir import propagate_meta

    names = []
    for part in ("planes", "scales", "row_scale"):
        name = f"_shift_add_{index}_{part}"
        gm.register_buffer(name, getattr(weight, part), persistent=False)
        names.append(name)
    graph = gm.graph
    with graph.inserting_before(site.node):
        attrs = [graph.get_attr(n) for n in names]
        new = graph.call_function(ops.shiftadd_linear.overload, (site.x, *attrs))
        added = [*attrs, new]
        if site.bias is not None:
            new = graph.call_function(aten.add.Tensor, (new, site.bias))
            added.append(new)
    propagate_meta(gm, added)
    new.meta.update({k: site.node.meta[k] for k in ("stack_trace", "nn_module_stack") if k in site.node.meta})
    site.node.replace_all_uses_with(new)
    graph.erase_node(site.node)
    return new


def _drop_unused_attrs(gm: fx.GraphModule) -> None:
    """Delete the fp weights no node reads any more (the graph then holds only the packed ones)."""
    used = {str(n.target) for n in gm.graph.nodes if n.op == "get_attr"}
    for name in [n for n, _ in gm.named_parameters(recurse=False) if n not in used]:
        delattr(gm, name)
    for name in [n for n, _ in gm.named_buffers(recurse=False) if n not in used]:
        delattr(gm, name)
