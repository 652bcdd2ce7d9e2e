"""A tiny GPT-2 as a MODEL.py for the `optimize` CLI: the model that `custom_pass.py` rewrites.

GPT-2's MLP activation (`gelu_new`, Hugging Face's `NewGELUActivation`) is GELU's tanh
approximation written out by hand, `0.5 * x * (1 + tanh(sqrt(2/pi) * (x + 0.044715 * x**3)))`:
eight ATen ops once captured. The weights are random (seeded) and the model has two layers of
width 64, so capturing and compiling it takes seconds on a CPU; nothing is downloaded. The
sequence length is symbolic (`dynamic_shapes()`), so one captured graph serves every prompt
length up to its 4096 positions, and `calibration_batches()` (random tokens) gives `optimize`
an input of `--length` tokens to time eager against compiled on the host.

This file defines no `pipeline()`, so on its own the CLI runs the default passes; add the
custom pass with `--pipeline examples/custom_pass.py:pipeline`.
"""

from __future__ import annotations

import os
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

VOCAB = 128
SEQ_TOKENS = 8
POSITIONS = 4096  # the CLI's default --length


def model() -> torch.nn.Module:
    """A 2-layer GPT-2 (4 heads, width 64), random weights, in eval mode, float32."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=POSITIONS,
                        bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(config).eval()


def example_inputs(length: int = SEQ_TOKENS, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random token ids and an all-ones attention mask, as keyword arguments."""
    gen = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, VOCAB, (1, length), generator=gen)
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}


def dynamic_shapes() -> dict[str, Any]:
    """The sequence dimension of `example_inputs()` is symbolic (2 to 4096 tokens)."""
    seq = torch.export.Dim("seq", min=2, max=POSITIONS)
    return {"input_ids": {1: seq}, "attention_mask": {1: seq}}


def calibration_batches(window: int = SEQ_TOKENS, count: int = 1) -> list[dict[str, torch.Tensor]]:
    """`count` inputs of `window` random tokens (the weights are random too: no text needed)."""
    return [example_inputs(window, seed=1 + i) for i in range(count)]
