"""Where the compiler keeps state between runs: converted model weights, built kernels,
calibration results and host measurements.

One folder, `$COMPILER_CACHE_DIR` or `~/.cache/ml-compiler`, so CI and users can move or wipe it.
"""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir(*parts: str) -> Path:
    """The cache folder (or a subfolder of it), created on first use."""
    root = Path(os.environ.get("COMPILER_CACHE_DIR", Path.home() / ".cache" / "ml-compiler"))
    path = root.joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path
