"""Hand any of our passes to Inductor as a `CustomGraphPass`.

    torch._inductor.config.post_grad_custom_post_pass = as_inductor_pass(fuse_rms_norm())

Inductor caches compiled graphs keyed partly by the custom pass's `uuid()`; ours hashes the
pass's name, its options (`Pass.config()`) and the source of its class's module, so editing
the pass invalidates the cache and two configurations never share an entry.
"""

from __future__ import annotations

import hashlib
import inspect
import json
from typing import Any

import torch.fx as fx
from torch._inductor.custom_graph_pass import CustomGraphPass

from compiler.passes.base import Pass
from compiler.passes.pipeline import PassContext


class InductorPass(CustomGraphPass):
    """A compiler pass running inside Inductor on its post-grad ATen graph."""

    def __init__(self, p: Pass, ctx: PassContext | None = None) -> None:
        self.p = p
        self.ctx = ctx or PassContext()
        self.last_result: Any = None

    def __call__(self, graph: fx.Graph) -> None:
        gm = graph.owning_module
        if gm is None:
            gm = fx.GraphModule({}, graph)
        self.last_result = self.p.run(gm, self.ctx)
        graph.lint()

    def __deepcopy__(self, memo: dict[int, Any]) -> InductorPass:
        # Inductor deep-copies its config; a pass is immutable configuration (its traced
        # patterns hold FakeTensors, which cannot be copied), so share it.
        return self

    def uuid(self) -> str:
        module = inspect.getmodule(type(self.p))
        source = inspect.getsource(module) if module is not None else ""
        payload = json.dumps([self.p.name, self.p.config(), source], sort_keys=True, default=str)
        return hashlib.sha256(payload.encode()).hexdigest()


def as_inductor_pass(p: Pass, ctx: PassContext | None = None) -> InductorPass:
    return InductorPass(p, ctx)
