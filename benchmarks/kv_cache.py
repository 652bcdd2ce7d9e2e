"""Benchmark of KV-cache quantization on the host: memory, quality through real decode, speed, passkey.

SmolLM2-135M (fp32), target `host`. The model is captured once as explicit-cache prefill and
decode graphs (`compiler.generation.CachedLM`); the decode graph is compiled without and with
the `kv_quantize` pass per bit width, and every figure below runs through those compiled graphs.
Sections (`--only`):

- `memory`: bytes of the cache at `--memory-tokens` cached tokens (4096) for fp32, fp16 and
  KIVI at 8/4/2 bits (codes, fp16 scales and minimums, and the full-precision residual), and
  `ratio_vs_fp16` = bytes of an fp16 cache / ours. KIVI's residual holds (tokens mod R) tokens;
  `kv_bytes` is the cache at 4096 tokens (a multiple of R: residual empty) and `peak_kv_bytes`
  the worst case of the cycle next to it (4095 tokens, R - 1 of them in the fp32 residual). The pass's own prediction is listed too.
- `quality`: `--samples` windows of `novel_evaluation.txt`: a `--prompt`-token prompt (2048)
  prefilled, then `--continuation` tokens (256) teacher-forced one decode step at a time
  through the cache. Perplexity of the continuation and top-1 agreement of every step's
  next-token choice with the fp cache's, for KIVI at 8/4/2 bits and the eviction policies
  (streaming, SnapKV, H2O) at budgets of 25% and 50% of the prompt, with the bytes each cache
  holds at the end.
- `decode`: decode-step attention at a 4096-token cache: the fused dequantizing kernel of
  `compiler::quantized_kv_attention` (TVM, host) against `F.scaled_dot_product_attention` on
  the dense fp32 cache (9 query heads, 3 KV heads, head_dim 64), interleaved; plus one whole
  decode step of the model, fp cache vs each KIVI cache (`decode_step` rows).
- `passkey`: a 5-digit key in filler text at depths 10/50/90% of a 2048-token prompt, the
  prompt prefilled and the key generated greedily through the cache (10 cases).

Run (about 25 minutes on the 2-core host with the defaults):

    .venv/bin/python benchmarks/kv_cache.py --json /tmp/kv.json
    .venv/bin/python benchmarks/kv_cache.py --only memory decode --json /tmp/kv_speed.json
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(REPO))

from benchmarks.common import env_info, finish, load_smollm2, summarize, time_interleaved  # noqa: E402

SECTIONS = ("memory", "quality", "decode", "passkey")
BITS = (8, 4, 2)
HEADS_Q, HEADS_KV, HEAD_DIM = 9, 3, 64
# KIVI's defaults here (the pass's): keys per channel over 128 tokens, values per token over
# the whole 64-channel head, a residual of up to 128 recent tokens at full precision.
K_GROUP, V_GROUP, RESIDUAL = 128, 64, 128
# The attention-sink variant: the first SINK positions never quantize (`KIVICache(sink=)`).
SINK = 4


def _log(msg: str) -> None:
    print(f"[kv_cache] {msg}", file=sys.stderr, flush=True)


Config = tuple  # ("fp",) | ("kivi", bits) | ("kivi", bits, sink) | ("evict", policy, budget)
FP: Config = ("fp",)
EVICTION = tuple(("evict", policy, budget) for policy in ("streaming", "snapkv", "h2o") for budget in (0.25, 0.5))


def config_name(config: Config) -> str:
    if config[0] == "kivi":
        return f"kivi-int{config[1]}" + (f"+sink{config[2]}" if len(config) > 2 and config[2] else "")
    if config[0] == "evict":
        return f"{config[1]}-{int(config[2] * 100)}%"
    return "fp"


class Models:
    """SmolLM2's prefill and decode graphs, compiled once each per cache configuration."""

    def __init__(self) -> None:
        from compiler.generation import CachedLM

        self.module = load_smollm2()
        self.tok = self.module.tokenizer()
        start = time.perf_counter()
        self.lm = CachedLM.capture(self.module.model(), say=_log)
        _log(f"captured prefill and decode graphs in {time.perf_counter() - start:.0f} s")
        self._compiled: dict[tuple[str, Config], Any] = {}

    def compiled(self, graph: str, config: Config) -> Any:
        """The compiled "prefill" or "decode" graph for a cache configuration. Prefill is the
        fp one except for eviction policies that rank positions by attention scores."""
        if graph == "prefill" and config[0] == "kivi":
            config = FP
        key = (graph, config)
        if key not in self._compiled:
            self._compiled[key] = self._compile(graph, config)
        return self._compiled[key]

    def decode(self, bits: int | None) -> Any:
        return self.compiled("decode", FP if bits is None else ("kivi", bits))

    def session(self, config: Config | int | None) -> Any:
        from compiler.generation import Session
        from compiler.kv_cache import cache_for

        if not isinstance(config, tuple):
            config = FP if config is None else ("kivi", config)
        prefill, decode = self.compiled("prefill", config), self.compiled("decode", config)
        return Session(prefill.executable, decode.executable, cache_for(decode.ir.meta.get("kv_cache"), self.lm.shape.layers))

    def _compile(self, graph: str, config: Config) -> Any:
        from compiler.driver import CompileOptions, compile_graph
        from compiler.ir import copy_graph_module
        from compiler.passes import default_pipeline
        from compiler.passes.kv_cache import KVEvict, KVQuantize

        pipeline = default_pipeline()
        if config[0] == "kivi":
            sink = config[2] if len(config) > 2 else 0
            pipeline.passes.insert(1, KVQuantize(bits=config[1], k_group=K_GROUP, v_group=V_GROUP, residual=RESIDUAL, sink=sink))
        elif config[0] == "evict":
            pipeline.passes.insert(1, KVEvict(config[1], config[2]))
        gm = self.lm.prefill.gm if graph == "prefill" else self.lm.decode.gm
        start = time.perf_counter()
        result = compile_graph(copy_graph_module(gm), CompileOptions.make("host", budget="ppl:+3%", pipeline=pipeline))
        _log(f"compiled {graph} ({config_name(config)}) in {time.perf_counter() - start:.0f} s")
        return result


# -- memory -----------------------------------------------------------------------------------


def memory_rows(models: Models | None, tokens: int) -> list[dict[str, Any]]:
    from compiler.kv_cache import FullCache, KIVICache, fp16_bytes

    layers, heads, dim = 30, HEADS_KV, HEAD_DIM
    gen = torch.Generator().manual_seed(0)
    keys = [torch.randn(1, heads, tokens, dim, generator=gen) for _ in range(layers)]
    values = [torch.randn(1, heads, tokens, dim, generator=gen) for _ in range(layers)]
    reference = fp16_bytes(layers, 1, heads, tokens, dim, dim)
    rows = []
    full = FullCache(layers)
    full.load(keys, values)
    rows.append({"method": "fp32", "bits": 32, "tokens": tokens, "kv_bytes": full.nbytes(), "ratio_vs_fp16": reference / full.nbytes()})
    rows.append({"method": "fp16", "bits": 16, "tokens": tokens, "kv_bytes": reference, "ratio_vs_fp16": 1.0})
    for bits, sink in [*((b, 0) for b in BITS), *((b, SINK) for b in (4, 2))]:
        cache = KIVICache(layers, bits, K_GROUP, V_GROUP, RESIDUAL, sink)
        cache.load(keys, values)
        # the residual holds the sinks and (tokens - sinks) mod R tokens; the worst case of the
        # cycle is R - 1 of them
        worst = sink + (tokens - sink - RESIDUAL) // RESIDUAL * RESIDUAL + RESIDUAL - 1
        peak = KIVICache(layers, bits, K_GROUP, V_GROUP, RESIDUAL, sink)
        peak.load([k[:, :, :worst] for k in keys], [v[:, :, :worst] for v in values])
        peak_reference = fp16_bytes(layers, 1, heads, worst, dim, dim)
        # over one residual cycle ending at `tokens`, what a long generation holds on average
        cycle = []
        for n in range(tokens - RESIDUAL + 1, tokens + 1):
            one = KIVICache(1, bits, K_GROUP, V_GROUP, RESIDUAL, sink)  # every layer holds the same
            one.load([keys[0][:, :, :n]], [values[0][:, :, :n]])
            cycle.append(fp16_bytes(1, 1, heads, n, dim, dim) / one.nbytes())
        row = {
            "method": "kivi", "bits": bits, "sink": sink, "tokens": tokens, "cycle_mean_ratio_vs_fp16": sum(cycle) / len(cycle), "k_group": K_GROUP, "v_group": V_GROUP, "residual": RESIDUAL,
            "kv_bytes": cache.nbytes(), "ratio_vs_fp16": reference / cache.nbytes(),
            "residual_tokens": cache.k_res[0].shape[2],
            "peak_kv_bytes": peak.nbytes(), "peak_ratio_vs_fp16": peak_reference / peak.nbytes(), "peak_residual_tokens": peak.k_res[0].shape[2],
        }
        if models is not None and not sink:
            stats = _pass_stats(models.decode(bits))
            row["predicted_kv_bytes"] = stats.get("cache_bytes")
            row["predicted_ratio_vs_fp16"] = stats.get("ratio_vs_fp16")
        rows.append(row)
        _log(f"memory {bits}-bit, sink {sink}: {row['kv_bytes'] / 2**20:.1f} MiB, {row['ratio_vs_fp16']:.2f}x vs fp16 (peak {row['peak_ratio_vs_fp16']:.2f}x, cycle mean {row['cycle_mean_ratio_vs_fp16']:.2f}x)")
    from compiler.kv_cache import EvictingCache

    for budget in (0.25, 0.5):
        # every policy keeps the same number of entries at the model's precision (fp32)
        cache = EvictingCache(layers, "streaming", budget)
        cache.load(keys, values)
        rows.append({
            "method": "eviction (streaming, snapkv, h2o)", "bits": 32, "budget": budget, "tokens": tokens,
            "kept_tokens": cache.keys[0].shape[2], "kv_bytes": cache.nbytes(), "ratio_vs_fp16": reference / cache.nbytes(),
        })
    return rows


def _pass_stats(compiled: Any) -> dict[str, Any]:
    record = next((r for r in compiled.records if r.name == "kv_quantize"), None)
    return dict(record.result.stats) if record is not None and record.result is not None else {}


# -- quality ----------------------------------------------------------------------------------


def _windows(models: Models, prompt: int, continuation: int, samples: int) -> list[torch.Tensor]:
    from compiler.evaluation import load_text, token_windows

    window = prompt + continuation
    every = token_windows(models.tok, load_text("novel_evaluation"), window, count=None)
    if len(every) < samples:
        raise SystemExit(f"novel_evaluation.txt holds {len(every)} windows of {window} tokens, {samples} asked for")
    step = len(every) // samples
    return [every[i * step] for i in range(samples)]


def quality_rows(models: Models, prompt: int, continuation: int, samples: int, eviction: bool) -> list[dict[str, Any]]:
    windows = _windows(models, prompt, continuation, samples)
    reference: list[torch.Tensor] = []
    rows = []
    configs: list[Config] = [FP, *(("kivi", b) for b in BITS), ("kivi", 4, SINK), ("kivi", 2, SINK), *(EVICTION if eviction else ())]
    for config in configs:
        nll, agree, tokens = 0.0, 0, 0
        start = time.perf_counter()
        kept = []
        for i, ids in enumerate(windows):
            session = models.session(config)
            logits = session.score(ids[:, :prompt], ids[:, prompt:])[0]
            kept.append(session.cache.nbytes())
            target = ids[0, prompt:]
            nll += float(F.cross_entropy(logits.double(), target, reduction="sum"))
            tokens += target.numel()
            if config == FP:
                reference.append(logits.argmax(-1))
            else:
                agree += int((logits.argmax(-1) == reference[i]).sum())
        ppl = math.exp(nll / tokens)
        cache_bytes = sum(kept) / len(kept)
        if config == FP:
            ppl_fp, fp_bytes = ppl, cache_bytes
            _log(f"quality fp: ppl {ppl:.3f} over {tokens} decoded tokens ({time.perf_counter() - start:.0f} s)")
            continue
        row = {
            "method": config[0] if config[0] == "kivi" else config[1], "config": config_name(config),
            "bits": config[1] if config[0] == "kivi" else 32, "budget": config[2] if config[0] == "evict" else None,
            "sink": (config[2] if len(config) > 2 else 0) if config[0] == "kivi" else None,
            "prompt": prompt, "continuation": continuation, "samples": samples,
            "ppl_fp": ppl_fp, "ppl": ppl, "ppl_increase": ppl / ppl_fp - 1, "top1_agreement": agree / tokens,
            "cache_bytes_at_end": cache_bytes, "ratio_vs_fp32_cache": fp_bytes / cache_bytes,
        }
        rows.append(row)
        _log(f"quality {row['config']}: ppl {ppl_fp:.3f} -> {ppl:.3f} ({row['ppl_increase']:+.2%}), top-1 {row['top1_agreement']:.3f} ({time.perf_counter() - start:.0f} s)")
    return rows


# -- decode speed -----------------------------------------------------------------------------


def kernel_rows(tokens: int, repeats: int) -> list[dict[str, Any]]:
    import compiler.codegen.tvm  # noqa: F401 - registers the TVM lowerings
    from compiler.ops import kv_quant
    from compiler.ops.registry import LoweringRequest
    from compiler.targets import load_target

    target = load_target("host")
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, HEADS_Q, 1, HEAD_DIM, generator=gen)
    k = torch.randn(1, HEADS_KV, tokens, HEAD_DIM, generator=gen)
    v = torch.randn(1, HEADS_KV, tokens, HEAD_DIM, generator=gen)
    scale = HEAD_DIM ** -0.5
    rows = []
    for bits in BITS:
        for residual in (0, RESIDUAL - 1):
            nq = (tokens - residual) // K_GROUP * K_GROUP
            kq, vq = kv_quant.quantize_keys(k[:, :, :nq], bits, K_GROUP), kv_quant.quantize_values(v[:, :, :nq], bits, V_GROUP)
            k_res, v_res = k[:, :, nq:].contiguous(), v[:, :, nq:].contiguous()
            args = (q, kq.codes, kq.scale, kq.min, vq.codes, vq.scale, vq.min, k_res, v_res, scale, bits, K_GROUP)
            kernel = kv_quant.quantized_kv_attention.lowerings["tvm"](LoweringRequest(args, target, True))
            if kernel.runner is None:
                raise RuntimeError(f"no runnable TVM kernel for quantized_kv_attention: {kernel.note}")
            run = kernel.runner
            dense_k, dense_v = torch.cat([kv_quant.dequantize_keys(kq, bits), k_res], 2), torch.cat([kv_quant.dequantize_values(vq, bits), v_res], 2)
            times = time_interleaved(
                {
                    "sdpa_fp32": lambda: F.scaled_dot_product_attention(q, dense_k, dense_v, scale=scale, enable_gqa=True),
                    "fused": lambda: run(*args),
                },
                repeats,
                warmup=3,
            )
            error = float((run(*args) - kv_quant.quantized_kv_attention.reference(*args)).abs().max())
            row = {
                "bits": bits, "tokens": tokens, "quantized_tokens": nq, "residual_tokens": tokens - nq, "kernel": kernel.name,
                **{f"{n}_s": summarize(t) for n, t in times.items()}, "max_abs_error_vs_reference": error,
            }
            row["decode_speedup"] = row["sdpa_fp32_s"]["median"] / row["fused_s"]["median"]
            rows.append(row)
            _log(f"decode attention {bits}-bit, residual {tokens - nq}: {row['decode_speedup']:.2f}x SDPA fp32")
    return rows


def decode_step_rows(models: Models, tokens: int, repeats: int) -> list[dict[str, Any]]:
    """One whole decode step of the model at `tokens` cached tokens, fp cache vs KIVI."""
    from compiler.evaluation import load_text, token_windows

    ids = token_windows(models.tok, load_text("novel_evaluation"), tokens + 1, count=1)[0]
    sessions = {}
    for bits in (None, *BITS):
        session = models.session(bits)
        session.prefill(ids[:, :tokens])
        sessions[bits] = session
    token = ids[:, tokens]

    def step(session: Any) -> Callable[[], Any]:
        cache = session.cache
        inputs = [token.reshape(1, 1), torch.full((1, 1), tokens), *cache.graph_inputs()]
        run = session.decode_fn
        return lambda: run(*inputs)

    times = time_interleaved({str(b): step(s) for b, s in sessions.items()}, repeats, warmup=2)
    base = summarize(times["None"])["median"]
    rows = []
    for bits in BITS:
        t = summarize(times[str(bits)])
        rows.append({"bits": bits, "tokens": tokens, "fp_s": summarize(times["None"]), "kivi_s": t, "speedup": base / t["median"]})
        _log(f"decode step {bits}-bit at {tokens} tokens: {base / t['median']:.2f}x the fp cache")
    return rows


# -- passkey ----------------------------------------------------------------------------------


def passkey_rows(models: Models, length: int, cases: int) -> list[dict[str, Any]]:
    from compiler.evaluation import passkey_filler_ids, passkey_prompt

    gen = torch.Generator().manual_seed(5)
    depths = [(0.1, 0.5, 0.9)[i % 3] for i in range(cases)]
    keys = [str(int(torch.randint(10000, 100000, (1,), generator=gen))) for _ in range(cases)]
    filler = passkey_filler_ids(models.tok, length)
    configs: list[Config] = [FP, *(("kivi", b) for b in BITS), ("kivi", 4, SINK)]
    names = {c: "fp" if c == FP else config_name(c).removeprefix("kivi-") for c in configs}
    hits: dict[str, list[bool]] = {names[c]: [] for c in configs}
    for depth, key in zip(depths, keys):
        ids, positions = passkey_prompt(models.tok, filler, length, depth, key)
        prompt, answer = ids[:, : positions[0]], ids[:, positions[0] :]
        for config in configs:
            out = models.session(config).generate(prompt, answer.shape[1])
            hits[names[config]].append(bool(torch.equal(out, answer)))
    row: dict[str, Any] = {"seq_len": length, "cases": cases, "depths": depths}
    for name, got in hits.items():
        row[f"{name}_correct"] = sum(got)
        row[name] = got
        if name != "fp":
            row[f"{name}_lost"] = sum(d and not s for d, s in zip(hits["fp"], got))
    _log("passkey " + ", ".join(f"{n} {sum(g)}/{cases}" for n, g in hits.items()))
    return [row]


def _goals(payload: dict[str, Any]) -> dict[str, Any]:
    goals: dict[str, Any] = {}
    for row in payload.get("memory") or []:
        if row["method"] == "kivi" and row["bits"] in (4, 2) and not row["sink"]:
            need = 3.5 if row["bits"] == 4 else 6.0
            goals[f"memory_int{row['bits']}_ratio>={need}"] = {"value": round(row["ratio_vs_fp16"], 3), "met": row["ratio_vs_fp16"] >= need}
    for row in payload.get("quality") or []:
        if row["method"] == "kivi" and row["bits"] == 4:
            name = row["config"].removeprefix("kivi-")
            goals[f"quality_{name}_ppl_increase<=1%"] = {"value": round(row["ppl_increase"], 5), "met": row["ppl_increase"] <= 0.01}
            goals[f"quality_{name}_top1>=98%"] = {"value": round(row["top1_agreement"], 4), "met": row["top1_agreement"] >= 0.98}
    for row in payload.get("decode") or []:
        if row["residual_tokens"] == 0:
            goals[f"decode_int{row['bits']}_speedup>=1"] = {"value": round(row["decode_speedup"], 3), "met": row["decode_speedup"] >= 1.0}
    return goals


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--only", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    parser.add_argument("--memory-tokens", type=int, default=4096)
    parser.add_argument("--prompt", type=int, default=2048)
    parser.add_argument("--continuation", type=int, default=256)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--decode-tokens", type=int, default=4096)
    parser.add_argument("--passkey-length", type=int, default=2048)
    parser.add_argument("--passkey-cases", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--no-eviction", action="store_true", help="quality of the KIVI caches only")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    payload: dict[str, Any] = {"env": env_info(), "target": "host", "kivi": {"k_group": K_GROUP, "v_group": V_GROUP, "residual": RESIDUAL}}
    start = time.perf_counter()
    models = Models() if set(args.only) - {"memory"} else None
    if "memory" in args.only:
        payload["memory"] = memory_rows(models, args.memory_tokens)
    if "decode" in args.only:
        payload["decode"] = kernel_rows(args.decode_tokens, args.repeats)
        if models is not None:
            payload["decode_step"] = decode_step_rows(models, args.decode_tokens, max(5, args.repeats // 3))
    if "quality" in args.only:
        payload["quality"] = quality_rows(models, args.prompt, args.continuation, args.samples, not args.no_eviction)
    if "passkey" in args.only:
        payload["passkey"] = passkey_rows(models, args.passkey_length, args.passkey_cases)
    finish(payload, _goals, start, args.json)


if __name__ == "__main__":
    main()
