"""Hardware cost model: roofline estimates over FLOPs, bytes and launch overhead, per target,
symbolic in shape symbols such as sequence length.

- `work`: `Work` (what a kernel computes and moves) and `roofline(work, hardware)`;
- `rules`: the `Work` of each ATen op and compiler op, from argument shapes;
- `model`: `CostModel(target)` with node / region / graph estimates, comparisons, summaries;
- `symbolic`: closed-form attention costs and crossover lengths between two formulas;
- `calibrate`: measures the host CPU's figures (cached);
- `report`: the cost table and roofline plot written by `optimize`.
"""

from compiler.cost_model.model import Comparison, CostModel, Estimate, GraphEstimate, shape_symbols
from compiler.cost_model.rules import CATEGORIES, OpCost, TensorInfo, attention_work
from compiler.cost_model.work import Roofline, Work, roofline

__all__ = [
    "CATEGORIES",
    "Comparison",
    "CostModel",
    "Estimate",
    "GraphEstimate",
    "OpCost",
    "Roofline",
    "TensorInfo",
    "Work",
    "attention_work",
    "roofline",
    "shape_symbols",
]
