"""A pass written outside the compiler: GPT-2's hand-written GELU becomes one `aten.gelu`.

GPT-2 (and every model that reuses Hugging Face's `gelu_new`) computes GELU's tanh
approximation by hand:

    0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))

Captured, that is eight ATen ops (mul, pow, mul, add, mul, tanh, add, mul): eight kernel
launches wherever fusion does not gather them. ATen has the same function as one op,
`aten.gelu(x, approximate="tanh")`, which every codegen backend also lowers. `fuse_gelu_tanh`
is a `PatternPass` that finds the eight ops and puts the one op in their place:

- the two coefficients are scalar wildcards (`k`, `c`), so the pattern also matches code that
  writes them as truncated literals (`0.79788456`, a common spelling);
- `check=is_gelu_tanh` then refuses what only looks like GELU: other coefficients (another
  function: rewriting it would change the model), and half-precision graphs, where eager rounds
  after each of the eight ops but `aten.gelu` rounds once, so the outputs would move by the
  dtype's rounding and the pass would no longer be lossless;
- in float32 the rewrite is exact up to float rounding: both compute the same formula in fp32,
  in a different order (measured over [-12, 12]: within 2 ulp of max(|x|, 1); in bfloat16 the
  two differ by up to 1.6e-2 on activations of a few units).

`pipeline()` is the default pipeline with the pass placed before the first fusion pass. The
order matters: `fuse_regions` gathers elementwise chains into fused regions (submodules), and a
pattern sees only the top-level graph, so placed after it the pass finds nothing. Placed
before, each layer's eight ops are one op. On the host the partitioner then leaves the lone
`gelu` to ATen's own kernel (one launch either way, one TVM kernel fewer to build); with
`fuse_regions` disabled, or on a backend that fuses nothing, the pass saves seven launches per
layer (the cost model on this tiny GPT-2: 46 -> 32 launches, 179 -> 116 us predicted).

This file is also a MODEL.py (it re-exports the tiny GPT-2 of `custom_pass_model.py`):

    optimize examples/custom_pass.py --target host --out out/custom_pass
    optimize examples/custom_pass_model.py --pipeline examples/custom_pass.py:pipeline
    python examples/custom_pass.py          # compiler.compile and torch.compile, what changed

docs/passes.md walks through it.
"""

from __future__ import annotations

import math

import torch

from compiler.passes import Match, PatternPass, Pipeline, default_pipeline
from custom_pass_model import calibration_batches, dynamic_shapes, example_inputs, model  # noqa: F401 - a MODEL.py too

GELU_K = 0.044715
GELU_C = math.sqrt(2.0 / math.pi)
# Coefficients within this relative distance of GELU's are GELU's: 0.79788456 (a truncated
# sqrt(2/pi)) is 1e-9 away, far below float32's rounding (6e-8); a different function is not.
COEFFICIENT_RTOL = 1e-6
# Dtypes in which the rewrite is lossless: eager computes each of the eight ops in the dtype
# itself, as aten.gelu does. In float16/bfloat16 eager rounds eight times, aten.gelu once.
EXACT_DTYPES = (torch.float32, torch.float64)


def gelu_tanh_by_hand(x: torch.Tensor, k: float, c: float) -> torch.Tensor:
    """The search: GELU's tanh approximation as `gelu_new` writes it; `k`, `c` are wildcards."""
    return 0.5 * x * (1.0 + torch.tanh(c * (x + k * torch.pow(x, 3.0))))


def gelu_tanh(x: torch.Tensor, k: float, c: float) -> torch.Tensor:
    """The replacement: one ATen op (it gets the bound scalars too, and needs none of them)."""
    return torch.nn.functional.gelu(x, approximate="tanh")


def is_gelu_tanh(m: Match) -> bool | str:
    """Accept a match only where rewriting it keeps the model's outputs: True, or why not."""
    k, c = m.scalars["k"], m.scalars["c"]
    if not (math.isclose(k, GELU_K, rel_tol=COEFFICIENT_RTOL) and math.isclose(c, GELU_C, rel_tol=COEFFICIENT_RTOL)):
        return f"coefficients k={k!r}, c={c!r} are not GELU's ({GELU_K}, sqrt(2/pi)): another function"
    (x,) = m.inputs()
    dtype = x.meta["val"].dtype
    if dtype not in EXACT_DTYPES:
        return f"{dtype}: eager rounds after each of the 8 ops, aten.gelu once; the rewrite would not be lossless"
    return True


def fuse_gelu_tanh() -> PatternPass:
    """The pass. The example input only fixes how the functions trace (one tensor, any shape);
    the pattern matches activations of every shape and dtype, and `is_gelu_tanh` decides."""
    return PatternPass(
        "fuse_gelu_tanh",
        gelu_tanh_by_hand,
        gelu_tanh,
        [torch.empty(8)],
        scalars={"k": GELU_K, "c": GELU_C},
        check=is_gelu_tanh,
    )


def pipeline() -> Pipeline:
    """The default pipeline with `fuse_gelu_tanh` before the first fusion pass."""
    passes = default_pipeline().passes
    at = [p.name for p in passes].index("fuse_attention")
    return Pipeline([*passes[:at], fuse_gelu_tanh(), *passes[at:]], name="default+fuse_gelu_tanh")


def _demo() -> None:
    """Compile the tiny GPT-2 through `compiler.compile` and `torch.compile`, print what changed."""
    import compiler
    import compiler.backend
    from compiler.capture import capture_export, split_example_inputs
    from compiler.ir import op_counts

    net, inputs = model(), example_inputs()
    with torch.no_grad():
        eager = net(**inputs).logits

    # The pass alone, on the captured IR: eight ops per layer become one.
    args, kwargs = split_example_inputs(inputs)
    gm = capture_export(net, args, kwargs).gm
    before = op_counts(gm)
    result = fuse_gelu_tanh().run(gm)
    after = op_counts(gm)
    for op in ("aten.tanh.default", "aten.pow.Tensor_Scalar", "aten.gelu.default"):
        print(f"{op}: {before.get(op, 0)} -> {after.get(op, 0)}")
    print(*result.changes, sep="\n")

    # Front door 1: compiler.compile.
    compiled = compiler.compile(net, inputs, target="host", pipeline=pipeline())
    record = next(r for r in compiled.result.records if r.name == "fuse_gelu_tanh")
    error = (compiled(**inputs).logits - eager).abs().max().item()
    print(f"compiler.compile: fuse_gelu_tanh {record.status}, {record.result.stats}; max |error| vs eager {error:.2g}")

    # Front door 2: torch.compile. A CompilerBackend instance keeps each graph's result.
    backend = compiler.backend.CompilerBackend({"target": "host", "pipeline": pipeline()})
    with torch.no_grad():
        out = torch.compile(net, backend=backend)(**inputs).logits
    matches = [r.result.stats["matches"] for res in backend.results for r in res.records if r.name == "fuse_gelu_tanh"]
    error = (out - eager).abs().max().item()
    print(f"torch.compile: fuse_gelu_tanh matches per graph {matches}; max |error| vs eager {error:.2g}")


if __name__ == "__main__":
    _demo()
