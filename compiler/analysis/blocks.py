"""The block finder: a transformer's residual stream, its sublayers and blocks, in an ATen graph.

Layer-skipping passes (and reports) ask which nodes make up attention sublayer 7 or the MLP of
block 12, and where the residual stream runs past them. A pre-norm transformer (Llama, SmolLM2,
GPT-2, most decoder LMs) adds every sublayer's output to the stream:

    h_{i+1} = h_i + f_i(h_i)        (f_i: norm, then attention or MLP)

so the stream is a chain of `aten.add` nodes, each with one operand the previous stream value
and the other a branch computed from it. The finder takes every floating `add` of two
same-shaped nodes where one operand is an ancestor of the other (a residual link: the other
operand is the branch), chains links whose stream operand is itself a link, and keeps the
longest chain. Its first stream value (the embedding, or GPT-2's dropout of it) is the origin.

A sublayer is one link: its nodes are those that are both descendants of its stream input and
ancestors of its branch (the norm, projections, attention or MLP). It is `attention` when it
holds an attention site (`compiler.analysis.attention`), `mlp` otherwise. Blocks pair each
attention sublayer with the MLP sublayer after it. Graph outputs that depend on a sublayer's
stream input but on no later stream value, and are not the stream itself, are its side outputs:
the keys and values an explicit-cache graph returns (`compiler.generation`), or attention scores.

Post-norm models (BERT: h_{i+1} = LayerNorm(h_i + f_i(h_i))) have no such chain: the norm sits on
the stream, skipping a sublayer would not leave an identity, and the finder reports no blocks.

`bypass` is the one rewrite layer skipping needs: the residual add of a sublayer is replaced by
its stream input, so the branch becomes dead code (removed by dead-code elimination) unless a
side output still reads it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx

aten = torch.ops.aten

_ADDS = {aten.add.Tensor}


@dataclass
class Sublayer:
    """One residual link: stream value `output` = `input` + `branch` (see the module doc)."""

    index: int  # position along the stream: 0 is the first sublayer
    kind: str  # "attention" | "mlp"
    block: int  # the block it belongs to
    input: fx.Node  # the stream before it
    output: fx.Node  # the residual add: the stream after it
    branch: fx.Node  # the add's other operand
    stream_arg: int  # which argument of the add is the stream (0 or 1)
    nodes: list[fx.Node]  # descendants of `input` and ancestors of `branch`, in graph order
    attention: Any = None  # its AttentionSite, for attention sublayers
    side_outputs: list[int] = field(default_factory=list)  # indices into the graph's flat outputs

    @property
    def name(self) -> str:
        return f"{self.kind}{self.block}"


@dataclass
class Block:
    """A transformer block: its attention sublayer and the MLP sublayer after it (either may be
    missing in unusual models)."""

    index: int
    attention: Sublayer | None
    mlp: Sublayer | None

    @property
    def sublayers(self) -> list[Sublayer]:
        return [s for s in (self.attention, self.mlp) if s is not None]


@dataclass
class Blocks:
    """What the finder found: the stream (origin first, then each residual add), its sublayers in
    order, and blocks. Empty when the graph has no residual stream (`reason` says why)."""

    stream: list[fx.Node]
    sublayers: list[Sublayer]
    blocks: list[Block]
    reason: str = ""

    def of_kind(self, kind: str) -> list[Sublayer]:
        """Sublayers of one kind: "attention", "mlp"; "block" gives every sublayer of each block
        (use `blocks` to keep them grouped)."""
        if kind == "block":
            return list(self.sublayers)
        return [s for s in self.sublayers if s.kind == kind]

    def summary(self) -> dict[str, Any]:
        return {
            "blocks": len(self.blocks),
            "sublayers": [s.name for s in self.sublayers],
            "side_outputs": {s.name: s.side_outputs for s in self.sublayers if s.side_outputs},
            "reason": self.reason,
        }


def find_blocks(gm: fx.GraphModule) -> Blocks:
    """The residual stream of `gm` and its sublayers and blocks (see the module doc)."""
    from compiler.analysis.attention import find_attention

    nodes = list(gm.graph.nodes)
    order = {n: i for i, n in enumerate(nodes)}
    links: dict[fx.Node, tuple[int, fx.Node]] = {}  # residual add -> (stream arg, branch)
    for node in nodes:
        link = _residual_link(node, order)
        if link is not None:
            links[node] = link
    if not links:
        return Blocks([], [], [], reason="no residual add (an add of a value and a branch computed from it)")

    depth: dict[fx.Node, int] = {}
    for node in nodes:  # graph order: a link's stream input comes first
        if node in links:
            stream_in = node.args[links[node][0]]
            depth[node] = depth.get(stream_in, 0) + 1
    last = max(depth, key=lambda n: (depth[n], -order[n]))
    chain = [last]
    while chain[-1] in links and chain[-1].args[links[chain[-1]][0]] in links:
        chain.append(chain[-1].args[links[chain[-1]][0]])
    chain.reverse()
    if len(chain) < 2:
        return Blocks([], [], [], reason="no chain of residual adds (a post-norm model, or no repeated blocks)")
    stream = [chain[0].args[links[chain[0]][0]], *chain]

    sites = {site.output: site for site in find_attention(gm)}
    sublayers = []
    for i, add in enumerate(chain):
        arg, branch = links[add]
        inside = _between(stream[i], branch, order)
        site = next((sites[n] for n in inside if n in sites), None)
        sublayers.append(Sublayer(i, "attention" if site is not None else "mlp", 0, stream[i], add, branch, arg, inside, site))
    blocks = _blocks(sublayers)
    _assign_side_outputs(gm, stream, sublayers, order)
    return Blocks(stream, sublayers, blocks)


def bypass(sublayer: Sublayer) -> None:
    """Skip `sublayer`: every use of its residual add reads the add's stream operand instead.
    Reads the operand from the add as it is now, so bypassing consecutive sublayers in any
    order chains correctly. Run dead-code elimination afterwards."""
    add = sublayer.output
    add.replace_all_uses_with(add.args[sublayer.stream_arg])


# -- helpers ------------------------------------------------------------------------------------


def _val(node: Any) -> Any:
    return node.meta.get("val") if isinstance(node, fx.Node) else None


def _residual_link(node: fx.Node, order: dict[fx.Node, int]) -> tuple[int, fx.Node] | None:
    """(which argument is the stream, the branch) when `node` is a residual add."""
    if node.op != "call_function" or node.target not in _ADDS or len(node.args) != 2 or node.kwargs.get("alpha", 1) != 1:
        return None
    a, b = node.args
    va, vb, out = _val(a), _val(b), _val(node)
    if not all(isinstance(v, torch.Tensor) for v in (va, vb, out)):
        return None
    if not out.dtype.is_floating_point or va.shape != vb.shape or va.shape != out.shape or out.dim() < 2:
        return None
    for arg, (stream, branch) in enumerate(((a, b), (b, a))):
        if order[stream] < order[branch] and _reaches(stream, branch, order):
            return arg, branch
    return None


def _reaches(source: fx.Node, target: fx.Node, order: dict[fx.Node, int]) -> bool:
    """Whether `source` is an ancestor of `target` (searching back no further than source)."""
    floor = order[source]
    seen, todo = {target}, [target]
    while todo:
        n = todo.pop()
        for a in n.all_input_nodes:
            if a is source:
                return True
            if a not in seen and order[a] > floor:
                seen.add(a)
                todo.append(a)
    return False


def _between(source: fx.Node, target: fx.Node, order: dict[fx.Node, int]) -> list[fx.Node]:
    """Nodes that are descendants of `source` and ancestors of `target` (target included)."""
    floor = order[source]
    ancestors, todo = {target}, [target]
    while todo:
        n = todo.pop()
        for a in n.all_input_nodes:
            if a not in ancestors and order[a] > floor:
                ancestors.add(a)
                todo.append(a)
    descendants, todo = set(), [source]
    while todo:
        n = todo.pop()
        for u in n.users:
            if u in ancestors and u not in descendants:
                descendants.add(u)
                todo.append(u)
    return sorted(descendants, key=order.__getitem__)


def _blocks(sublayers: list[Sublayer]) -> list[Block]:
    """Each attention sublayer with the MLP sublayers up to the next attention one (a lone MLP
    sublayer before any attention is a block of its own)."""
    blocks: list[Block] = []
    for s in sublayers:
        if s.kind == "attention" or not blocks or blocks[-1].mlp is not None:
            blocks.append(Block(len(blocks), None, None))
        block = blocks[-1]
        if s.kind == "attention":
            block.attention = s
        else:
            block.mlp = s
        s.block = block.index
    return blocks


def _assign_side_outputs(gm: fx.GraphModule, stream: list[fx.Node], sublayers: list[Sublayer], order: dict[fx.Node, int]) -> None:
    """Give each graph output that is not the stream to the sublayer whose stream input is the
    latest stream value it depends on (outputs past the last sublayer, such as logits, to none)."""
    output = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
    flat = fx.node.map_aggregate(output.args[0], lambda x: x)
    leaves: list[Any] = []
    fx.node.map_aggregate(flat, lambda x: leaves.append(x))
    position = {node: i for i, node in enumerate(stream)}
    by_input = {s.input: s for s in sublayers}
    for index, leaf in enumerate(leaves):
        if not isinstance(leaf, fx.Node) or leaf in position:
            continue
        latest = _latest_stream_ancestor(leaf, position, order)
        if latest is not None and latest in by_input:
            by_input[latest].side_outputs.append(index)


def _latest_stream_ancestor(node: fx.Node, position: dict[fx.Node, int], order: dict[fx.Node, int]) -> fx.Node | None:
    best: fx.Node | None = None
    seen, todo = {node}, [node]
    while todo:
        n = todo.pop()
        if n in position:
            if best is None or position[n] > position[best]:
                best = n
            continue  # what the stream value depends on is earlier still
        for a in n.all_input_nodes:
            if a not in seen:
                seen.add(a)
                todo.append(a)
    return best
