"""Operator fusion passes: rewrite chains of ATen ops into compiler ops or fused regions.

- `fuse_rms_norm()`: the decomposed RMSNorm becomes `compiler::rms_norm` (a pattern pass);
- `FusePartition`: groups elementwise ops and last-dim reductions into `FusedRegion`s
  (pass name "fuse_regions"; see partition.py for the algorithm).
"""

from compiler.passes.fusion.partition import FusePartition
from compiler.passes.fusion.region import FusedRegion, fuse_nodes, regions

__all__ = ["FusePartition", "FusedRegion", "fuse_nodes", "regions"]
