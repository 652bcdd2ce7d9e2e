"""How much each sublayer or block changes the residual stream, on calibration inputs.

"What Matters in Transformers? Not All Attention is Needed" (He et al., 2024) ranks attention
sublayers, MLP sublayers and whole blocks by the cosine similarity of their input and output
hidden states: a unit whose output is nearly its input adds little and is the first to drop.
Here the input and output are consecutive values of the residual stream (`find_blocks`), and the
similarity is the mean over every calibration token of cos(h_in, h_out).
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.fx as fx

from compiler.analysis.blocks import Blocks
from compiler.calibration import record


def stream_similarity(gm: fx.GraphModule, blocks: Blocks, batches: Sequence[Sequence[Any]]) -> tuple[list[float], list[float]]:
    """(per sublayer, per block) the mean cosine similarity of the stream before and after it,
    over every token of every batch (flat graph inputs)."""
    stream = blocks.stream
    position = {node: i for i, node in enumerate(stream)}
    sums = torch.zeros(len(stream), len(stream), dtype=torch.float64)  # [from, to]
    counts = torch.zeros(len(stream), len(stream), dtype=torch.float64)
    pairs = [(s.index, s.index + 1) for s in blocks.sublayers]
    pairs += [(b.sublayers[0].index, b.sublayers[-1].index + 1) for b in blocks.blocks if b.sublayers]
    wanted: dict[int, list[int]] = {}  # stream position -> earlier positions to compare with
    for a, b in pairs:
        wanted.setdefault(b, []).append(a)
    held: dict[int, torch.Tensor] = {}
    keep = {a for a, _ in pairs}

    def report(batch: int, node: fx.Node, value: Any) -> None:
        i = position[node]
        h = value.detach().float().reshape(-1, value.shape[-1])
        for a in wanted.get(i, []):
            cos = torch.nn.functional.cosine_similarity(held[a], h, dim=-1)
            sums[a, i] += cos.double().sum()
            counts[a, i] += cos.numel()
        if i in keep:
            held[i] = h
        if i == len(stream) - 1:
            held.clear()

    record(gm, stream, batches, report)
    mean = sums / counts.clamp(min=1)
    per_sublayer = [float(mean[a, b]) for a, b in pairs[: len(blocks.sublayers)]]
    per_block = [float(mean[a, b]) for a, b in pairs[len(blocks.sublayers) :]]
    return per_sublayer, per_block
