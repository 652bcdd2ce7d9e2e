"""Benchmark of CanonicalizeCausalAttention: an explicit causal mask over repeated K/V vs causal GQA SDPA.

For each sequence length, with baseline and candidate timed in interleaved rounds (median of
`--repeats`):

- kernel: SmolLM2-135M's attention (30 layers, 9 query heads, 3 KV heads, head_dim 64, fp32).
  Baseline is what the captured graph runs: a [1, 1, S, S] causal mask (boolean as captured,
  and an additive float variant) built once per forward, K/V repeated to 9 heads per layer
  (unsqueeze, expand, reshape: a copy) and `scaled_dot_product_attention(q, k, v, attn_mask=mask)`.
  Candidate is the rewrite: `is_causal=True, enable_gqa=True` on the 3 KV heads. Each timed call
  is one layer (30 distinct inputs, cycled), baseline and candidate alternating, `--repeats` x 30
  samples; the reported time is the per-layer median x 30. `max_abs_err` covers the 30 outputs.
- model: SmolLM2 prefill on real text (novel_evaluation) through `compiler.compile(target="host")`:
  baseline with no passes, candidate with only `canonicalize_causal_attention`. Inputs are
  `input_ids` and an all-ones `attention_mask` (the examples/smollm2.py batches); with the
  padding mask the pass emits `compiler::causal_attention` (captured with `input_ids` alone,
  the pass proves transformers' packed-sequence term all true and emits `is_causal` SDPA).
  The row's `codegen` says which kernel ran. `max_abs_err` is over the logits.

Run (about 5 minutes on the 2-core host with the defaults, half of it capturing the model twice
per length; ratios matter, absolute times move with other load on the machine):

    .venv/bin/python benchmarks/causal_attention.py --json /tmp/causal_attention.json
    .venv/bin/python benchmarks/causal_attention.py --lengths 512 --repeats 3 --skip-model
"""

from __future__ import annotations

import argparse
import itertools
import os
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

from benchmarks.common import env_info, load_smollm2, summarize, time_interleaved, write_json  # noqa: E402

LAYERS, HEADS_Q, HEADS_KV, HEAD_DIM = 30, 9, 3, 64
SCALE = HEAD_DIM**-0.5
PASS = "canonicalize_causal_attention"


def _log(msg: str) -> None:
    print(f"[causal_attention] {msg}", file=sys.stderr, flush=True)


def causal_mask(seq_len: int, additive: bool) -> torch.Tensor:
    """[1, 1, S, S]: key <= query, as boolean (the captured graph) or 0/-inf float."""
    idx = torch.arange(seq_len)
    mask = (idx[None, :] <= idx[:, None])[None, None].expand(1, -1, seq_len, seq_len)
    return torch.where(mask, 0.0, float("-inf")) if additive else mask


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """HF's repeat_kv as captured: unsqueeze, expand, reshape (which copies)."""
    b, h, s, d = x.shape
    return x[:, :, None].expand(b, h, n_rep, s, d).reshape(b, h * n_rep, s, d)


def _cycling(fn: Callable[[int], torch.Tensor]) -> Callable[[], torch.Tensor]:
    """`fn` called on layer 0, 1, ..., 29, 0, ... on successive calls."""
    counter = itertools.count()
    return lambda: fn(next(counter) % LAYERS)


def kernel_rows(seq_len: int, repeats: int) -> list[dict[str, Any]]:
    g = torch.Generator().manual_seed(seq_len)
    layers = [
        (
            torch.randn(1, HEADS_Q, seq_len, HEAD_DIM, generator=g),
            torch.randn(1, HEADS_KV, seq_len, HEAD_DIM, generator=g),
            torch.randn(1, HEADS_KV, seq_len, HEAD_DIM, generator=g),
        )
        for _ in range(LAYERS)
    ]
    n_rep = HEADS_Q // HEADS_KV

    def candidate(i: int) -> torch.Tensor:
        q, k, v = layers[i]
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=SCALE, enable_gqa=True)

    rows = []
    for variant in ("bool_mask", "additive_mask"):
        mask = causal_mask(seq_len, additive=variant == "additive_mask")  # one per forward, shared by all layers

        def baseline(i: int, mask: torch.Tensor = mask) -> torch.Tensor:
            q, k, v = layers[i]
            return F.scaled_dot_product_attention(q, repeat_kv(k, n_rep), repeat_kv(v, n_rep), attn_mask=mask, scale=SCALE)

        with torch.no_grad():
            err = max((baseline(i) - candidate(i)).abs().max().item() for i in range(LAYERS))
            # One layer per timed call, baseline and candidate alternating: bursts of other load on
            # this shared host then hit both alike. Per-layer samples x 30 = time per forward.
            fns = {"baseline": _cycling(baseline), "candidate": _cycling(candidate)}
            samples = time_interleaved(fns, repeats * LAYERS, warmup=2)
        times = {name: [t * LAYERS for t in ts] for name, ts in samples.items()}
        rows.append(_row("kernel", seq_len, times, err, variant=variant))
    return rows


def _logits(out: Any) -> torch.Tensor:
    return out["logits"] if isinstance(out, dict) else (out.logits if hasattr(out, "logits") else out[0])


def model_rows(lengths: list[int], repeats: int, eager: bool) -> list[dict[str, Any]]:
    import compiler
    from compiler.evaluation import load_text, token_windows

    smollm2 = load_smollm2()
    model, tok = smollm2.model(), smollm2.tokenizer()
    ids_all = token_windows(tok, load_text("novel_evaluation"), max(lengths), count=1)[0]
    rows = []
    for seq_len in lengths:
        ids = ids_all[:, :seq_len].clone()
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        start = time.perf_counter()
        base = compiler.compile(model, batch, target="host", passes=[])
        cand = compiler.compile(model, batch, target="host", passes=[PASS])
        _log(f"model S={seq_len}: compiled baseline and candidate in {time.perf_counter() - start:.0f} s")
        record = next(r for r in cand.result.records if r.name == PASS)
        fns = {"baseline": lambda: base(**batch), "candidate": lambda: cand(**batch)}
        if eager:
            fns["eager"] = lambda: model(**batch)
        with torch.no_grad():
            err = (_logits(base(**batch)) - _logits(cand(**batch))).abs().max().item()
            times = time_interleaved(fns, repeats)
        extra: dict[str, Any] = {
            "rewritten": len(record.result.changes) if record.result else 0,
            "codegen": cand.result.codegen.fallback_summary() or "no change",
        }
        if eager:
            extra["eager_s"] = summarize(times["eager"])["median"]
        rows.append(_row("model", seq_len, times, err, **extra))
        del base, cand
    return rows


def _row(level: str, seq_len: int, times: dict[str, list[float]], err: float, **extra: Any) -> dict[str, Any]:
    base, cand = summarize(times["baseline"]), summarize(times["candidate"])
    row = {
        "level": level,
        "seq_len": seq_len,
        "baseline_s": base["median"],
        "candidate_s": cand["median"],
        "speedup": base["median"] / cand["median"],
        "max_abs_err": err,
        "baseline_min_s": base["min"],
        "candidate_min_s": cand["min"],
        "speedup_of_min": base["min"] / cand["min"],
        **extra,
    }
    _log(f"{level} S={seq_len} {extra.get('variant', '')}: {row['baseline_s']:.3f} s -> {row['candidate_s']:.3f} s")
    return row


def print_table(rows: list[dict[str, Any]]) -> None:
    print(f"{'level':<8}{'variant':<15}{'seq':>6}{'baseline s':>12}{'candidate s':>13}{'speedup':>9}{'(of min)':>10}{'max abs err':>13}")
    for r in rows:
        print(
            f"{r['level']:<8}{r.get('variant', '-'):<15}{r['seq_len']:>6}{r['baseline_s']:>12.3f}"
            f"{r['candidate_s']:>13.3f}{r['speedup']:>8.2f}x{r['speedup_of_min']:>9.2f}x{r['max_abs_err']:>13.2e}"
        )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", metavar="OUT", help="write the results as JSON here")
    parser.add_argument("--lengths", default="512,2048", help="comma-separated sequence lengths")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds per measurement (median taken)")
    parser.add_argument("--skip-model", action="store_true", help="kernel level only")
    parser.add_argument("--eager", action="store_true", help="also time the eager HF model (model level)")
    args = parser.parse_args(argv)
    lengths = [int(x) for x in args.lengths.split(",") if x.strip()]
    env = env_info()
    if env["loadavg_1_5_15"][0] > (env["cpu_count"] or 1) / 2:
        _log(f"warning: load average {env['loadavg_1_5_15'][0]:.1f}; other work will skew the timings")

    rows = [row for seq_len in lengths for row in kernel_rows(seq_len, args.repeats)]
    if not args.skip_model:
        rows += model_rows(lengths, args.repeats, args.eager)
    print_table(rows)
    if args.json:
        env["loadavg_end"] = os.getloadavg()
        payload = {"benchmark": "causal_attention", "env": env, "repeats": args.repeats, "rows": rows}
        _log(f"wrote {write_json(args.json, payload)}")


if __name__ == "__main__":
    main()
