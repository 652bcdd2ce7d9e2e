"""Benchmark of operator fusion and fused attention on the host: eager, Inductor, and ours.

Everything is SmolLM2-135M (fp32) on this machine's CPU, target `host` (TVM kernels for
`llvm`); baseline and candidates run side by side in interleaved rounds (median of
`--repeats`; the min is kept too, as the figure least disturbed by other load). Inductor is
`torch.compile(..., options={"freezing": True})`: its best configuration here (weights
prepacked for the BLAS; default Inductor is slower than eager on this host beyond 512 tokens).

- `regions`: the four fused regions of a SmolLM2 layer at `--region-length` tokens, built from
  transformers' own Llama code (LlamaRMSNorm, apply_rotary_pos_emb, silu(gate) * up, and the
  residual add feeding the next norm): eager, Inductor, and `compiler.compile(target="host")`,
  whose default pipeline turns each into one region kernel. `eager_s`, `inductor_s`,
  `ours_s`, speedups, the kernel it ran, and max abs error against eager.
- `attention`: causal GQA attention (9 query heads, 3 KV heads, head_dim 64) at
  `--attention-lengths`: `compiler::causal_attention`'s TVM kernel against
  `F.scaled_dot_product_attention(is_causal=True, enable_gqa=True)` (what the op's reference
  calls) and against SDPA on K/V expanded to 9 heads (faster in PyTorch). A `decode` row per
  cache length: one query against the whole cache (split-KV kernel vs SDPA without a mask).
- `e2e`: SmolLM2 prefill on real text (novel_evaluation) at `--e2e-lengths`, with an all-ones
  attention mask: eager HF, Inductor, and `compiler.compile(model, target="host")` (default
  pipeline). Speedups, whether the next token (argmax at the last position) is identical, and
  max abs logit error over all positions.
- `compile_s`: `compiler.compile` of SmolLM2 at 512 tokens in a fresh process, with an empty
  kernel cache (cold) and again with the cache it left (warm); capture (torch.export) and the
  rest (passes, codegen, TVM builds or cache loads) reported apart.

Run (about 15 minutes on the 2-core host with the defaults; ratios are what matter, absolute
times move with other load on the machine):

    .venv/bin/python benchmarks/fusion.py --json /tmp/fusion.json
    .venv/bin/python benchmarks/fusion.py --only regions attention --attention-lengths 2048
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(REPO))

from benchmarks.common import env_info, load_smollm2, summarize, time_interleaved, write_json  # noqa: E402

HIDDEN, INTERMEDIATE, HEADS_Q, HEADS_KV, HEAD_DIM, EPS = 576, 1536, 9, 3, 64, 1e-5
SECTIONS = ("regions", "attention", "e2e", "compile")


def _log(msg: str) -> None:
    print(f"[fusion] {msg}", file=sys.stderr, flush=True)


def _inductor(module: torch.nn.Module) -> torch.nn.Module:
    return torch.compile(module, dynamic=False, options={"freezing": True})


def _outputs(out: Any) -> tuple[torch.Tensor, ...]:
    if hasattr(out, "logits"):
        return (out.logits,)
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


def _max_err(a: Any, b: Any) -> float:
    return max((x - y).abs().max().item() for x, y in zip(_outputs(a), _outputs(b)))


def _ratios(times: dict[str, list[float]], baselines: dict[str, str]) -> dict[str, Any]:
    """Median seconds per variant and, for each (speedup key -> baseline), baseline / ours."""
    med = {name: summarize(ts) for name, ts in times.items()}
    row: dict[str, Any] = {f"{name}_s": med[name]["median"] for name in med}
    row["min_s"] = {name: med[name]["min"] for name in med}
    for key, base in baselines.items():
        row[key] = med[base]["median"] / med["ours"]["median"]
    return row


# -- regions ----------------------------------------------------------------------------------


def _region_cases(length: int) -> dict[str, tuple[torch.nn.Module, tuple[torch.Tensor, ...]]]:
    from transformers.activations import ACT2FN
    from transformers.models.llama.modeling_llama import LlamaRMSNorm, apply_rotary_pos_emb

    class SwiGLU(torch.nn.Module):
        def forward(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
            return ACT2FN["silu"](gate) * up

    class Rotary(torch.nn.Module):
        def forward(self, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return apply_rotary_pos_emb(q, k, cos, sin)

    class ResidualNorm(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.norm = LlamaRMSNorm(HIDDEN, eps=EPS)

        def forward(self, residual: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            hidden = residual + x
            return hidden, self.norm(hidden)

    g = torch.Generator().manual_seed(0)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g)

    norm = LlamaRMSNorm(HIDDEN, eps=EPS)
    residual_norm = ResidualNorm()
    with torch.no_grad():
        norm.weight.copy_(1 + 0.1 * randn(HIDDEN))
        residual_norm.norm.weight.copy_(1 + 0.1 * randn(HIDDEN))
    # q and k as the projections leave them: [B, S, H, D] transposed to [B, H, S, D].
    q = randn(1, length, HEADS_Q, HEAD_DIM).transpose(1, 2)
    k = randn(1, length, HEADS_KV, HEAD_DIM).transpose(1, 2)
    angles = torch.arange(length)[:, None] * (10000.0 ** (-torch.arange(0, HEAD_DIM, 2) / HEAD_DIM))
    angles = torch.cat((angles, angles), dim=-1)[None]
    return {
        "rms_norm": (norm, (randn(1, length, HIDDEN),)),
        "swiglu": (SwiGLU(), (randn(1, length, INTERMEDIATE), randn(1, length, INTERMEDIATE))),
        "rotary": (Rotary(), (q, k, angles.cos(), angles.sin())),
        "residual_norm": (residual_norm, (randn(1, length, HIDDEN), randn(1, length, HIDDEN))),
    }


def region_rows(length: int, repeats: int) -> list[dict[str, Any]]:
    import compiler

    rows = []
    for name, (module, args) in _region_cases(length).items():
        module.eval()
        with torch.no_grad():
            ours = compiler.compile(module, args, target="host")
            kernels = [k.name for k in ours.result.codegen.kernels]
            inductor = _inductor(module)
            expected = module(*args)
            err = {"ours": _max_err(ours(*args), expected), "inductor": _max_err(inductor(*args), expected)}
            fns: dict[str, Callable[[], Any]] = {
                "eager": lambda m=module, a=args: m(*a),
                "inductor": lambda m=inductor, a=args: m(*a),
                "ours": lambda m=ours, a=args: m(*a),
            }
            times = time_interleaved(fns, repeats, warmup=2)
        row = {"region": name, "seq_len": length, "kernels": kernels, "fallbacks": ours.result.codegen.fallbacks}
        row.update(_ratios(times, {"speedup_vs_eager": "eager", "speedup_vs_inductor": "inductor"}))
        row["max_abs_err"] = err
        rows.append(row)
        _log(f"region {name}: {row['speedup_vs_eager']:.2f}x eager, {row['speedup_vs_inductor']:.2f}x inductor ({kernels})")
    return rows


# -- attention --------------------------------------------------------------------------------


def _attention_kernel(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[Callable[..., torch.Tensor] | None, str]:
    """The TVM kernel of compiler::causal_attention for these shapes, or None and why not."""
    from compiler.errors import Unsupported
    from compiler.ops import causal_attention
    from compiler.ops.registry import LoweringRequest
    from compiler.targets import load_target

    lowering = causal_attention.lowerings.get("tvm")
    if lowering is None:
        return None, "compiler::causal_attention has no tvm lowering"
    try:
        kernel = lowering(LoweringRequest(args=(q, k, v, None, HEAD_DIM**-0.5), target=load_target("host"), run_here=True))
    except Unsupported as exc:
        return None, str(exc)
    return kernel.runner, kernel.name


def _expand(x: torch.Tensor) -> torch.Tensor:
    return x.repeat_interleave(HEADS_Q // HEADS_KV, dim=1)


def attention_rows(lengths: list[int], repeats: int) -> list[dict[str, Any]]:
    rows = []
    scale = HEAD_DIM**-0.5
    for length in lengths:
        g = torch.Generator().manual_seed(length)
        q = torch.randn(1, HEADS_Q, length, HEAD_DIM, generator=g)
        k = torch.randn(1, HEADS_KV, length, HEAD_DIM, generator=g)
        v = torch.randn(1, HEADS_KV, length, HEAD_DIM, generator=g)
        k9, v9 = _expand(k), _expand(v)
        for phase, query in (("prefill", q), ("decode", q[:, :, -1:].contiguous())):
            kernel, name = _attention_kernel(query, k, v)
            if kernel is None:
                rows.append({"phase": phase, "seq_len": length, "ours": None, "why": name})
                continue
            causal = phase == "prefill"  # one query at the end sees every key: no mask
            fns = {
                "sdpa_gqa": lambda: F.scaled_dot_product_attention(query, k, v, is_causal=causal, scale=scale, enable_gqa=True),
                "sdpa_expanded": lambda: F.scaled_dot_product_attention(query, k9, v9, is_causal=causal, scale=scale),
                "ours": lambda: kernel(query, k, v, None, scale),
            }
            with torch.no_grad():
                err = (fns["ours"]() - fns["sdpa_gqa"]()).abs().max().item()
                n = repeats if phase == "prefill" else repeats * 10
                times = time_interleaved(fns, n, warmup=1)
            row = {"phase": phase, "seq_len": length, "kernel": name}
            row.update(_ratios(times, {"speedup_vs_sdpa_gqa": "sdpa_gqa", "speedup_vs_sdpa_expanded": "sdpa_expanded"}))
            row["max_abs_err"] = err
            rows.append(row)
            _log(f"attention {phase} {length}: {row['speedup_vs_sdpa_gqa']:.2f}x SDPA(gqa), {row['speedup_vs_sdpa_expanded']:.2f}x SDPA(expanded)")
    return rows


# -- end to end -------------------------------------------------------------------------------


def e2e_rows(lengths: list[int], repeats: int) -> list[dict[str, Any]]:
    import compiler
    from compiler.evaluation import load_text, token_windows

    smollm2 = load_smollm2()
    model, tok = smollm2.model(), smollm2.tokenizer()
    ids_all = token_windows(tok, load_text("novel_evaluation"), max(lengths), count=1)[0]
    rows = []
    for length in lengths:
        inputs = {"input_ids": ids_all[:, :length], "attention_mask": torch.ones(1, length, dtype=torch.int64)}
        with torch.no_grad():
            start = time.perf_counter()
            ours = compiler.compile(model, inputs, target="host")
            compile_s = time.perf_counter() - start
            start = time.perf_counter()
            inductor = _inductor(model)
            inductor(**inputs, use_cache=False)
            inductor_compile_s = time.perf_counter() - start
            fns: dict[str, Callable[[], Any]] = {
                "eager": lambda: model(**inputs, use_cache=False).logits,
                "inductor": lambda: inductor(**inputs, use_cache=False).logits,
                "ours": lambda: ours(**inputs).logits,
            }
            expected, got, theirs = fns["eager"](), fns["ours"](), fns["inductor"]()
            times = time_interleaved(fns, repeats, warmup=1)
        row = {"seq_len": length}
        row.update(_ratios(times, {"speedup_vs_eager": "eager", "speedup_vs_inductor": "inductor"}))
        row.update(
            same_next_token=bool(expected[0, -1].argmax() == got[0, -1].argmax()),
            max_abs_logit_err=(got - expected).abs().max().item(),
            inductor_max_abs_logit_err=(theirs - expected).abs().max().item(),
            compile_s=compile_s,
            inductor_compile_s=inductor_compile_s,
            kernels=len(ours.result.codegen.kernels),
            fallbacks=ours.result.codegen.fallback_summary(),
        )
        rows.append(row)
        _log(f"e2e {length}: {row['speedup_vs_eager']:.2f}x eager, {row['speedup_vs_inductor']:.2f}x inductor, err {row['max_abs_logit_err']:.2e}")
        del inductor
        torch._dynamo.reset()
    return rows


# -- compile time -----------------------------------------------------------------------------


def _compile_probe(length: int) -> None:
    """In a fresh process: load SmolLM2 (untimed), then time capture and compile; print JSON."""
    from compiler.capture import capture_export
    from compiler.driver import CompileOptions, compile_graph

    smollm2 = load_smollm2()
    model = smollm2.model()
    ids = torch.randint(0, 1000, (1, length))
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    # The kernel cache moves to the probe's folder only now, after the model loaded from the
    # usual cache (converting the GGUF again would time the wrong thing).
    os.environ["COMPILER_CACHE_DIR"] = os.environ["FUSION_PROBE_CACHE"]
    start = time.perf_counter()
    captured = capture_export(model, (), inputs)
    capture_s = time.perf_counter() - start
    result = compile_graph(captured.gm, CompileOptions.make("host"), sample_inputs=captured.flatten_inputs((), inputs))
    total = time.perf_counter() - start
    print(json.dumps({"capture_s": capture_s, "passes_and_codegen_s": total - capture_s, "total_s": total, "kernels": len(result.codegen.kernels)}))


def compile_rows(length: int) -> list[dict[str, Any]]:
    rows = []
    with tempfile.TemporaryDirectory(prefix="fusion-cache-") as cache:
        for state in ("cold", "warm"):
            env = dict(os.environ, FUSION_PROBE_CACHE=cache)
            proc = subprocess.run(
                [sys.executable, __file__, "--compile-probe", str(length)],
                env=env, capture_output=True, text=True, check=False,
            )
            if proc.returncode != 0:
                raise RuntimeError(f"compile probe failed:\n{proc.stderr[-3000:]}")
            row = {"cache": state, "seq_len": length, **json.loads(proc.stdout.strip().splitlines()[-1])}
            rows.append(row)
            _log(f"compile ({state}): {row['total_s']:.1f} s (capture {row['capture_s']:.1f} s)")
    return rows


# -- main -------------------------------------------------------------------------------------


def _goals(payload: dict[str, Any]) -> dict[str, Any]:
    """Each goal of the fusion issue with the measured figure and whether it is met."""
    import statistics

    goals: dict[str, Any] = {}
    regions = payload.get("regions") or []
    if regions:
        eager = statistics.median(r["speedup_vs_eager"] for r in regions)
        inductor = statistics.median(r["speedup_vs_inductor"] for r in regions)
        goals["regions_vs_eager_median>=1.5"] = {"value": eager, "met": eager >= 1.5}
        goals["regions_vs_inductor_median>=1.0"] = {"value": inductor, "met": inductor >= 1.0}
    for row in payload.get("attention") or []:
        if "speedup_vs_sdpa_gqa" not in row:  # no kernel for these shapes
            continue
        key = f"attention_{row['phase']}_{row['seq_len']}_vs_sdpa>=1.0"
        goals[key] = {"value": row["speedup_vs_sdpa_gqa"], "met": row["speedup_vs_sdpa_gqa"] >= 1.0}
    for row in payload.get("e2e") or []:
        ok = row["speedup_vs_eager"] >= 1.2 and row["speedup_vs_inductor"] >= 1.0
        ok = ok and row["same_next_token"] and row["max_abs_logit_err"] <= 1e-3
        goals[f"e2e_{row['seq_len']}"] = {
            "value": {k: row[k] for k in ("speedup_vs_eager", "speedup_vs_inductor", "max_abs_logit_err", "same_next_token")},
            "met": ok,
        }
    for row in payload.get("compile_s") or []:
        limit = 120 if row["cache"] == "cold" else 10
        goals[f"compile_{row['cache']}<={limit}s"] = {"value": row["total_s"], "met": row["total_s"] <= limit}
    return goals


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", metavar="OUT", help="write the results here as JSON")
    parser.add_argument("--only", nargs="+", choices=SECTIONS, default=list(SECTIONS), help="sections to run")
    parser.add_argument("--region-length", type=int, default=2048)
    parser.add_argument("--attention-lengths", type=int, nargs="+", default=[2048, 8192])
    parser.add_argument("--e2e-lengths", type=int, nargs="+", default=[512, 2048])
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds (regions use 4x as many)")
    parser.add_argument("--compile-probe", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.compile_probe:
        _compile_probe(args.compile_probe)
        return
    env = env_info()
    if env["loadavg_1_5_15"][0] > (env["cpu_count"] or 1) / 2:
        _log(f"warning: load average {env['loadavg_1_5_15'][0]:.1f}; other work will skew the timings")
    payload: dict[str, Any] = {
        "env": env,
        "inductor": "torch.compile(dynamic=False, options={'freezing': True})",
        "target": "host",
    }
    if "regions" in args.only:
        payload["regions"] = region_rows(args.region_length, 4 * args.repeats)
    if "attention" in args.only:
        payload["attention"] = attention_rows(args.attention_lengths, args.repeats)
    if "e2e" in args.only:
        payload["e2e"] = e2e_rows(args.e2e_lengths, args.repeats)
    if "compile" in args.only:
        payload["compile_s"] = compile_rows(512)
    payload["goals"] = _goals(payload)
    if args.json:
        _log(f"wrote {write_json(args.json, payload)}")
    print(json.dumps(payload["goals"], indent=2))


if __name__ == "__main__":
    main()
