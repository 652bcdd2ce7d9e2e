"""Where a generated Triton kernel can run: on a CUDA device, or anywhere under the
interpreter (`TRITON_INTERPRET=1`, which must be set before triton is first imported)."""

from __future__ import annotations

import os
from typing import Any

import torch


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def why_not_runnable(req: Any, device: str) -> str:
    """Empty when a kernel for `req` (a lowering or region request) can run here on tensors of
    `device`, else the reason it cannot."""
    if not req.run_here:
        return "not loaded: the caller asked for source only"
    if interpreting():
        return ""
    if device == "cuda" and torch.cuda.is_available():
        return ""
    if device == "cuda":
        return f"Triton kernel for {req.target.device}: no CUDA device here and TRITON_INTERPRET is not set"
    return f"Triton kernel for {device} tensors: only runs there under TRITON_INTERPRET=1"
