"""SkipDecode: decode steps that run fewer blocks as generation goes on.

SkipDecode (Del Corro et al., 2023) gives every generated position an exit point, the number of
blocks it runs before the final norm and LM head, that never increases along the sequence and is
the same for every sequence of a batch at a position. Since a later token runs no deeper than an
earlier one, every key it attends to in the blocks it runs was computed: no KV is recomputed,
and batching keeps working. The model in the paper was fine-tuned with the schedule; SmolLM2 was
not, and the benchmark reports what that costs (`benchmarks/layer_skip.py`, `dynamic` rows).

`ExitSchedule`: the exit falls linearly from `max_blocks` at the first decode step to
`min_blocks` after `span` steps and stays there; `stride` rounds it down to a multiple of stride
below `max_blocks`, so a schedule needs few distinct decode graphs.

`exit_graph(decode_gm, blocks)`: the decode graph with every sublayer of blocks >= `blocks`
bypassed (`compiler.analysis.blocks.bypass`): the hidden state after block `blocks - 1` goes
straight to the final norm. The keys and values of the skipped blocks are still returned, each
computed by its own layer from that hidden state (the state is propagated through the skipped
layers, as CALM and SkipDecode fill them): the cache keeps one entry per position in every
layer, and a prompt that continues the conversation later (exits reset) reads values that came
from the model's own projections. Their cost is the skipped layers' K and V projections.

`compile_skip_decode(lm, schedule)` compiles the prefill once (every block) and one decode graph
per distinct exit; `SkipDecodeLM.session()` is a `compiler.generation.Session` whose decode step
picks the graph by the number of tokens generated so far.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
import torch.fx as fx

from compiler.analysis.blocks import find_blocks
from compiler.errors import UserInputError
from compiler.generation import CachedLM, Session
from compiler.ir import copy_graph_module
from compiler.passes.layer_skip.static import apply_skips


@dataclass(frozen=True)
class ExitSchedule:
    """Blocks run by the t-th decode step (t = 0 is the first token after the prompt)."""

    max_blocks: int
    min_blocks: int
    span: int
    stride: int = 1

    def __post_init__(self) -> None:
        if not 1 <= self.min_blocks <= self.max_blocks:
            raise UserInputError(f"exit schedule: need 1 <= min_blocks <= max_blocks, got {self.min_blocks} and {self.max_blocks}")
        if self.span < 0 or self.stride < 1:
            raise UserInputError(f"exit schedule: span must be >= 0 and stride >= 1, got {self.span} and {self.stride}")

    def blocks_at(self, step: int) -> int:
        """Monotone non-increasing in `step`: the linear decay, rounded down to the stride grid
        (never below `min_blocks`)."""
        if step <= 0 or self.span == 0:
            exact = float(self.max_blocks if step <= 0 else self.min_blocks)
        else:
            exact = self.max_blocks - (self.max_blocks - self.min_blocks) * min(step, self.span) / self.span
        drop = self.max_blocks - int(exact + 1e-9)
        drop = -(-drop // self.stride) * self.stride  # round the dropped count up to the stride
        return max(self.min_blocks, self.max_blocks - drop)

    def exits(self) -> list[int]:
        """Every exit the schedule uses, deepest first."""
        return sorted({self.blocks_at(t) for t in range(self.span + 1)}, reverse=True)

    def mean_blocks(self, steps: int) -> float:
        """Mean blocks per step over the first `steps` decode steps."""
        return sum(self.blocks_at(t) for t in range(steps)) / max(steps, 1)


def exit_graph(decode: fx.GraphModule, blocks: int) -> fx.GraphModule:
    """A copy of `decode` that runs its first `blocks` blocks (the rest bypassed, their keys and
    values filled from the propagated hidden state; see the module doc)."""
    gm = copy_graph_module(decode)
    found = find_blocks(gm)
    if not found.blocks:
        raise UserInputError(f"SkipDecode needs a graph with transformer blocks: {found.reason}")
    if not 1 <= blocks <= len(found.blocks):
        raise UserInputError(f"SkipDecode: the graph has {len(found.blocks)} blocks; an exit after {blocks} is not one of them")
    apply_skips(gm, [s for s in found.sublayers if s.block >= blocks], drop_cache=False)
    return gm


class SkipDecodeSession(Session):
    """A `Session` whose decode step runs the graph of the schedule's exit for that step."""

    def __init__(self, prefill_fn: Callable[..., Any], decoders: dict[int, Callable[..., Any]], schedule: ExitSchedule, cache: Any) -> None:
        super().__init__(prefill_fn, decoders[schedule.max_blocks], cache)
        self.decoders, self.schedule = decoders, schedule
        self.generated = 0
        self.exits: list[int] = []  # the exit of every decode step so far

    def prefill(self, input_ids: torch.Tensor) -> torch.Tensor:
        self.generated = 0
        self.exits = []
        return super().prefill(input_ids)

    def step(self, token: torch.Tensor) -> torch.Tensor:
        blocks = self.schedule.blocks_at(self.generated)
        self.decode_fn = self.decoders[blocks]
        self.exits.append(blocks)
        self.generated += 1
        return super().step(token)


@dataclass
class SkipDecodeLM:
    """The prefill (every block) and one decode runner per exit of `schedule`."""

    prefill: Callable[..., Any]
    decoders: dict[int, Callable[..., Any]]
    schedule: ExitSchedule
    layers: int
    graphs: dict[int, fx.GraphModule]

    def session(self) -> SkipDecodeSession:
        from compiler.kv_cache import FullCache

        return SkipDecodeSession(self.prefill, self.decoders, self.schedule, FullCache(self.layers))


def compile_skip_decode(
    lm: CachedLM,
    schedule: ExitSchedule,
    target: str = "host",
    compile: bool = True,
    say: Callable[[str], None] = lambda _: None,
) -> SkipDecodeLM:
    """Exit graphs for every exit of `schedule`, compiled for `target` with the default
    (lossless) pipeline, or run as captured (`compile=False`: eager ATen, for tests)."""
    total = len(find_blocks(lm.decode.gm).blocks)
    if schedule.max_blocks > total:
        raise UserInputError(f"SkipDecode: the schedule starts at {schedule.max_blocks} blocks; the model has {total}")
    graphs = {b: exit_graph(lm.decode.gm, b) for b in schedule.exits()}
    if not compile:
        return SkipDecodeLM(lm.prefill.gm, dict(graphs), schedule, lm.shape.layers, graphs)
    from compiler.driver import CompileOptions, compile_graph

    def build(gm: fx.GraphModule) -> Callable[..., Any]:
        return compile_graph(copy_graph_module(gm), CompileOptions.make(target, "lossless")).executable

    prefill = build(lm.prefill.gm)
    decoders = {}
    for b, gm in graphs.items():
        say(f"compiling the decode graph that exits after {b} of {total} blocks")
        decoders[b] = build(gm)
    return SkipDecodeLM(prefill, decoders, schedule, lm.shape.layers, graphs)


def predicted_decode_speedup(lm: CachedLM, schedule: ExitSchedule, steps: int, cache_length: int, target: str = "host") -> float:
    """The cost model's speedup of `steps` decode steps under `schedule` over as many full steps,
    at a cache of `cache_length` tokens."""
    from compiler.cost_model import CostModel

    model = CostModel(target)

    def seconds(gm: fx.GraphModule) -> float:
        estimate = model.graph(gm)
        return float(estimate.at_length(cache_length).time)

    per_exit = {b: seconds(exit_graph(lm.decode.gm, b)) for b in schedule.exits()}
    full = seconds(lm.decode.gm)
    return steps * full / sum(per_exit[schedule.blocks_at(t)] for t in range(steps))


__all__: Sequence[str] = ("ExitSchedule", "SkipDecodeLM", "SkipDecodeSession", "compile_skip_decode", "exit_graph", "predicted_decode_speedup")
