"""Benchmark of sparse attention on the host: kernel speed, quality, passkey retrieval, end to end.

SmolLM2-135M (fp32), target `host` (TVM kernels for `llvm`). Sections (`--only`):

- `kernel`: `compiler::block_sparse_attention`'s kernel at `--kernel-length` tokens (9 query
  heads, 3 KV heads, head_dim 64) on layouts that keep 5%, 10% and 20% of the causal blocks
  (the diagonal block, block 0 and random others per query block), against dense
  `F.scaled_dot_product_attention(is_causal=True, enable_gqa=True)` and against the dense
  `compiler::causal_attention` kernel, in interleaved rounds; max abs error against the op's
  reference.
- `quality`: per method and window (2048 and 4096 tokens of `novel_evaluation.txt`), the
  compiled model with `sparse_attention` against the compiled model without it: perplexity of
  both, top-1 agreement of next-token choices, and the mean density of the layouts on those
  windows. Calibration reads `*_calibration.txt` only.
- `passkey`: a 5-digit key hidden in filler text at depths 10/50/90% (10 cases per length),
  retrieval judged as greedy decoding would: the prompt plus the key, one forward, and the key
  counts as retrieved when the argmax at each of its positions is its next digit (the model
  is causal, so this is what greedy decoding would produce).
- `e2e`: prefill at `--e2e-lengths` with logits for the last position only (what generation
  needs), compiled without and with `sparse_attention` (default method), interleaved.

Run (about 30 minutes on the 2-core host with the defaults):

    .venv/bin/python benchmarks/sparse_attention.py --json /tmp/sparse.json
    .venv/bin/python benchmarks/sparse_attention.py --only kernel --json /tmp/k.json
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(REPO))

from benchmarks.common import capture_lm_forward, env_info, finish, load_smollm2, summarize, time_interleaved  # noqa: E402

HEADS_Q, HEADS_KV, HEAD_DIM, BLOCK = 9, 3, 64, 64
SECTIONS = ("kernel", "quality", "passkey", "e2e")
METHODS = ("calibrated", "duo", "streaming", "vertical_slash", "block_topk")
DEFAULT_METHOD = "duo"


def _log(msg: str) -> None:
    print(f"[sparse] {msg}", file=sys.stderr, flush=True)


# -- kernel -----------------------------------------------------------------------------------


def random_layout(length: int, density: float, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Per head and query block: the diagonal, block 0, and random earlier blocks, so that the
    layout keeps `density` of the causal blocks."""
    from compiler.ops.block_sparse_attention import num_blocks
    from compiler.ops.sparse_layout import layout_from_mask

    gen = torch.Generator().manual_seed(seed)
    nb = num_blocks(length, BLOCK)
    rows = torch.arange(nb)[:, None]
    cols = torch.arange(nb)[None, :]
    causal = cols <= rows
    fixed = (cols == rows) | (cols == 0)
    want = density * nb * (nb + 1) / 2 - float((fixed & causal).sum())
    free = causal & ~fixed
    p = max(0.0, want) / max(1.0, float(free.sum()))
    mask = fixed | (free & (torch.rand(1, HEADS_Q, nb, nb, generator=gen) < p))
    return layout_from_mask(mask & causal)


def kernel_rows(length: int, densities: list[float], repeats: int) -> list[dict[str, Any]]:
    import compiler.codegen.tvm  # noqa: F401 - registers the TVM lowerings
    from compiler.ops import block_sparse_attention as OP
    from compiler.ops import causal_attention as DENSE
    from compiler.ops.registry import LoweringRequest
    from compiler.targets import load_target

    target = load_target("host")
    torch.manual_seed(0)
    q = torch.randn(1, HEADS_Q, length, HEAD_DIM)
    k = torch.randn(1, HEADS_KV, length, HEAD_DIM)
    v = torch.randn(1, HEADS_KV, length, HEAD_DIM)
    scale = HEAD_DIM ** -0.5
    dense_kernel = DENSE.lowerings["tvm"](LoweringRequest((q, k, v, None, scale), target, True)).runner
    rows = []
    for density in densities:
        blocks, counts = random_layout(length, density)
        kept = float(counts.sum()) / (HEADS_Q * blocks.shape[2] * (blocks.shape[2] + 1) / 2)
        kernel = OP.lowerings["tvm"](LoweringRequest((q, k, v, blocks, counts, scale, BLOCK, kept), target, True))
        if kernel.runner is None:
            raise RuntimeError(f"no runnable TVM kernel for block_sparse_attention: {kernel.note}")
        ours = kernel.runner
        fns: dict[str, Callable[[], Any]] = {
            "sdpa": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=True),
            "dense_kernel": lambda: dense_kernel(q, k, v, None, scale),
            "ours": lambda: ours(q, k, v, blocks, counts, scale, BLOCK, kept),
        }
        times = time_interleaved(fns, repeats, warmup=1)
        reference = OP.reference(q, k, v, blocks, counts, scale, BLOCK, kept)
        row = {
            "seq_len": length, "density": kept, "kernel": kernel.name,
            **{f"{name}_s": summarize(t) for name, t in times.items()},
            "max_abs_err": (fns["ours"]() - reference).abs().max().item(),
        }
        median = {name: row[f"{name}_s"]["median"] for name in times}
        row["speedup"] = median["sdpa"] / median["ours"]
        row["speedup_vs_dense_kernel"] = median["dense_kernel"] / median["ours"]
        rows.append(row)
        _log(f"kernel {length} density {kept:.1%}: {row['speedup']:.2f}x SDPA, {row['speedup_vs_dense_kernel']:.2f}x dense kernel")
    return rows


# -- compiled models ----------------------------------------------------------------------------


class Models:
    """SmolLM2 captured once per output (all logits, or the last position's) with a symbolic
    sequence length, and compiled once per method: one graph serves every length, and the
    sparse pass calibrates at its default 4096 tokens whatever length it later runs at. The
    captures share the model's weights. Inputs are `input_ids` alone (one unpadded sequence)."""

    def __init__(self) -> None:
        smollm2 = load_smollm2()
        self.module = smollm2
        self.model = smollm2.model()
        self.tok = smollm2.tokenizer()
        self._captured: dict[bool, Any] = {}
        self._compiled: dict[tuple[str | None, bool], tuple[Callable[[torch.Tensor], torch.Tensor], Any]] = {}

    def captured(self, last_only: bool) -> Any:
        if last_only not in self._captured:
            self._captured[last_only] = capture_lm_forward(self.model, last_only)
        return self._captured[last_only]

    def compiled(self, method: str | None, last_only: bool = False) -> tuple[Callable[[torch.Tensor], torch.Tensor], Any]:
        """(ids -> logits, compile result) with the sparse pass (`method`) or without (None)."""
        key = (method, last_only)
        if key not in self._compiled:
            start = time.perf_counter()
            self._compiled[key] = self._compile(method, last_only)
            _log(f"compiled {method or 'dense'}{' (last logits)' if last_only else ''} in {time.perf_counter() - start:.0f} s")
        return self._compiled[key]

    def _compile(self, method: str | None, last_only: bool) -> tuple[Callable[[torch.Tensor], torch.Tensor], Any]:
        from compiler.calibration import Calibration
        from compiler.driver import CompileOptions, compile_graph
        from compiler.ir import copy_graph_module
        from compiler.passes import default_pipeline
        from compiler.passes.sparse import SparseAttention

        captured = self.captured(last_only)
        pipeline = default_pipeline()
        if method is None:
            options = CompileOptions.make("host", disable="sparse_attention", pipeline=pipeline)
        else:
            index = pipeline.names().index("sparse_attention")
            pipeline.passes[index] = SparseAttention(method=method)
            options = CompileOptions.make("host", budget="ppl:+3%", pipeline=pipeline)

        def inputs(make: Any) -> Any:
            def batches(window: int, count: int) -> list[dict[str, torch.Tensor]]:
                made = make(window=window, count=count)
                return [{"input_ids": b["input_ids"], **({"logits_to_keep": 1} if last_only else {})} for b in made]

            return batches

        calibration = Calibration(inputs(self.module.calibration_batches), retrieval=inputs(self.module.retrieval_batches))
        calibration = calibration.with_flatten(captured.flatten_example)
        extra = {"logits_to_keep": 1} if last_only else {}
        sample = captured.flatten_inputs((), {"input_ids": torch.zeros(1, 256, dtype=torch.int64), **extra})
        result = compile_graph(copy_graph_module(captured.gm), options, sample_inputs=sample, calibration=calibration)

        def run(ids: torch.Tensor) -> torch.Tensor:
            flat = captured.flatten_inputs((), {"input_ids": ids, **extra})
            return captured.unflatten_outputs(result.executable(*flat)).logits

        return run, result


def _density_of(result: Any) -> float | None:
    for record in result.records:
        if record.name == "sparse_attention" and record.result is not None:
            sites = record.result.stats.get("sites", [])
            rewritten = [s["density"] for s in sites]
            return sum(rewritten) / len(rewritten) if rewritten else None
    return None


def quality_rows(models: Models, windows: list[int], methods: list[str], count: int) -> list[dict[str, Any]]:
    from compiler.evaluation import compare, load_text, token_windows
    from compiler.ops.sparse_layout import measure_density

    text = load_text("novel_evaluation")
    rows = []
    for window in windows:
        ids = token_windows(models.tok, text, window, count=count)
        dense, _ = models.compiled(None)
        for method in methods:
            sparse, result = models.compiled(method)
            with measure_density() as meter:
                report = compare(lambda input_ids, attention_mask: dense(input_ids), lambda input_ids, attention_mask: sparse(input_ids), ids)
            row = {
                "method": method, "window": window, "windows": len(ids), "ppl_dense": report.ppl_reference,
                "ppl_sparse": report.ppl_candidate, "ppl_increase": report.ppl_increase,
                "top1_agreement": report.top1_agreement, "density": meter.density,
                "calibrated_density": _density_of(result),
                "sites_rewritten": sum(len(r.result.changes) for r in result.records if r.name == "sparse_attention" and r.result),
            }
            rows.append(row)
            _log(f"quality {method} @ {window}: ppl {row['ppl_dense']:.3f} -> {row['ppl_sparse']:.3f} ({row['ppl_increase']:+.2%}), top-1 {row['top1_agreement']:.3f}, density {row['density']}")
    return rows


# -- passkey ----------------------------------------------------------------------------------


def passkey_case(tok: Any, length: int, depth: float, key: str) -> tuple[torch.Tensor, list[int]]:
    """(ids of exactly `length` tokens ending with the key's tokens, positions of the key tokens),
    filled with the classic repeated sentences."""
    from compiler.evaluation import passkey_filler_ids, passkey_prompt

    return passkey_prompt(tok, passkey_filler_ids(tok, length), length, depth, key)


def passkey_rows(models: Models, lengths: list[int], cases: int) -> list[dict[str, Any]]:
    gen = torch.Generator().manual_seed(5)
    depths = [(0.1, 0.5, 0.9)[i % 3] for i in range(cases)]
    keys = [str(int(torch.randint(10000, 100000, (1,), generator=gen))) for _ in range(cases)]
    rows = []
    for length in lengths:
        variants = {"dense": models.compiled(None)[0], "sparse": models.compiled(DEFAULT_METHOD)[0]}
        hits: dict[str, list[bool]] = {name: [] for name in variants}
        for depth, key in zip(depths, keys):
            ids, positions = passkey_case(models.tok, length, depth, key)
            for name, run in variants.items():
                with torch.no_grad():
                    logits = run(ids)
                predicted = logits[0, [p - 1 for p in positions]].argmax(-1)
                hits[name].append(bool((predicted == ids[0, positions]).all()))
        row = {
            "seq_len": length, "method": DEFAULT_METHOD, "cases": cases, "depths": depths,
            "dense_correct": sum(hits["dense"]), "sparse_correct": sum(hits["sparse"]),
            "lost": sum(d and not s for d, s in zip(hits["dense"], hits["sparse"])),
            "dense": hits["dense"], "sparse": hits["sparse"],
        }
        rows.append(row)
        _log(f"passkey {length}: dense {row['dense_correct']}/{cases}, sparse {row['sparse_correct']}/{cases}, lost {row['lost']}")
    return rows


# -- end to end -------------------------------------------------------------------------------


def e2e_rows(models: Models, lengths: list[int], repeats: int) -> list[dict[str, Any]]:
    from compiler.evaluation import load_text, token_windows
    from compiler.ops.sparse_layout import measure_density

    rows = []
    for length in lengths:
        ids = token_windows(models.tok, load_text("novel_evaluation"), length, count=1)[0]
        dense, _ = models.compiled(None, last_only=True)
        sparse, _ = models.compiled(DEFAULT_METHOD, last_only=True)
        with torch.no_grad():
            times = time_interleaved({"dense": lambda: dense(ids), "sparse": lambda: sparse(ids)}, repeats, warmup=1)
            with measure_density() as meter:
                same = bool(dense(ids)[0, -1].argmax() == sparse(ids)[0, -1].argmax())
        row = {
            "seq_len": length, "method": DEFAULT_METHOD, **{f"{n}_s": summarize(t) for n, t in times.items()},
            "density": meter.density, "same_next_token": same,
        }
        row["speedup"] = row["dense_s"]["median"] / row["sparse_s"]["median"]
        rows.append(row)
        _log(f"e2e {length}: {row['speedup']:.2f}x (density {row['density']})")
    return rows


# -- main -------------------------------------------------------------------------------------


def _goals(payload: dict[str, Any]) -> dict[str, Any]:
    goals: dict[str, Any] = {}
    for row in payload.get("kernel") or []:
        if abs(row["density"] - 0.10) < 0.02:
            goals["kernel_10pct_speedup>=4"] = {"value": row["speedup"], "met": row["speedup"] >= 4}
    for row in payload.get("quality") or []:
        if row["method"] == DEFAULT_METHOD and row["window"] == 4096:
            ok = row["ppl_increase"] <= 0.03 and row["top1_agreement"] >= 0.95 and (row["density"] or 1) <= 0.30
            goals["quality_default_4096"] = {"value": {k: row[k] for k in ("ppl_increase", "top1_agreement", "density")}, "met": ok}
    for row in payload.get("passkey") or []:
        goals[f"passkey_{row['seq_len']}_lost<=1"] = {"value": row["lost"], "met": row["lost"] <= 1}
    for row in payload.get("e2e") or []:
        if row["seq_len"] == 8192:
            goals["e2e_8192_speedup>=1.8"] = {"value": row["speedup"], "met": row["speedup"] >= 1.8}
    return goals


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", metavar="OUT", help="write the results here as JSON")
    parser.add_argument("--only", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    parser.add_argument("--kernel-length", type=int, default=8192)
    parser.add_argument("--densities", type=float, nargs="+", default=[0.05, 0.10, 0.20])
    parser.add_argument("--windows", type=int, nargs="+", default=[2048, 4096])
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--eval-windows", type=int, default=2, help="evaluation windows per length")
    parser.add_argument("--passkey-cases", type=int, default=10)
    parser.add_argument("--e2e-lengths", type=int, nargs="+", default=[4096, 8192])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    payload: dict[str, Any] = {"env": env_info(), "target": "host", "default_method": DEFAULT_METHOD}
    start = time.perf_counter()
    if "kernel" in args.only:
        payload["kernel"] = kernel_rows(args.kernel_length, args.densities, args.repeats)
    models = Models() if set(args.only) - {"kernel"} else None
    if "quality" in args.only:
        payload["quality"] = quality_rows(models, args.windows, args.methods, args.eval_windows)
    if "passkey" in args.only:
        payload["passkey"] = passkey_rows(models, args.windows, args.passkey_cases)
    if "e2e" in args.only:
        payload["e2e"] = e2e_rows(models, args.e2e_lengths, max(3, args.repeats // 2))
    finish(payload, _goals, start, args.json)


if __name__ == "__main__":
    main()
