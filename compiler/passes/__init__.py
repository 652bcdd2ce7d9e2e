"""Passes over the IR, and the default pipeline.

The pass-authoring API: `Pass` and `PassResult` (base.py), `PatternPass`/`Pattern` for
rewrites written as two Python functions (pattern.py), `Pipeline`, `PassContext` and
instruments (pipeline.py), and `as_inductor_pass` to hand any pass to Inductor.

`default_pipeline()` builds a fresh pipeline each call: there is no global registry to
mutate, so adding a pass means building your own list (see docs/passes.md).
"""

from __future__ import annotations

from compiler.passes.base import Pass, PassResult
from compiler.passes.fusion.partition import FusePartition
from compiler.passes.pattern import Match, Pattern, PatternPass
from compiler.passes.pipeline import (
    DumpGraphInstrument,
    PassContext,
    PassInstrument,
    Pipeline,
    TimingInstrument,
    VerifyNumericsInstrument,
)


def default_pipeline() -> Pipeline:
    """The built-in passes in order. Lossless canonicalization first; then the lossy passes,
    which run only under a budget that allows loss (or when named in `passes`): sparse
    attention takes the causal attention sites before fusion does; `shift_add` (opt-in: only
    when named in `passes`) reparameterizes the linear layers; then fusion: causal SDPA
    into the flash-attention op, then the partitioner before the RMSNorm pattern, so that a residual add joins its norm in one
    region; `fuse_rms_norm` then takes the norms the partitioner left (with `fuse_regions`
    disabled, all of them)."""
    from compiler.passes.canonicalize.causal_attention import CanonicalizeCausalAttention
    from compiler.passes.fusion.attention import FuseAttention
    from compiler.passes.fusion.partition import FusePartition
    from compiler.passes.fusion.rms_norm import fuse_rms_norm
    from compiler.passes.shift_add import ShiftAdd
    from compiler.passes.sparse import SparseAttention

    passes = [CanonicalizeCausalAttention(), SparseAttention(), ShiftAdd(), FuseAttention(), FusePartition(), fuse_rms_norm()]
    return Pipeline(passes, name="default")


__all__ = [
    "DumpGraphInstrument",
    "FusePartition",
    "Match",
    "Pass",
    "PassContext",
    "PassInstrument",
    "PassResult",
    "Pattern",
    "PatternPass",
    "Pipeline",
    "TimingInstrument",
    "VerifyNumericsInstrument",
    "as_inductor_pass",
    "default_pipeline",
]


def as_inductor_pass(p: Pass, ctx: PassContext | None = None):  # noqa: ANN201 - lazy import
    """Wrap a pass as an Inductor `CustomGraphPass` (imported lazily: Inductor is heavy)."""
    from compiler.passes.inductor import as_inductor_pass as wrap

    return wrap(p, ctx)
