"""Quality evaluation: how much a lossy pass changed what a language model predicts.

Lossy passes (quantization, sparse attention, layer dropping) and the CLI report compare a
reference model with the optimized one on the same windows of real text: perplexity of both
and how often their top-1 next-token predictions agree. The text comes from the shared data
folder (`*_calibration.txt` to calibrate, `*_evaluation.txt` to judge; never mix them).

A "model function" here is anything called as `model_fn(input_ids=ids, attention_mask=mask)`,
the keyword form of a MODEL.py's example inputs: an HF `nn.Module` (its output has `.logits`),
or a compiled callable returning the logits tensor, a dict holding "logits", or a tuple whose
first item is the logits.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from compiler.errors import UserInputError

ModelFn = Callable[..., Any]

DATA_DIR_ENV = "COMPILER_DATA_DIR"

# Positions whose log-softmax is taken in float64 at once: an 8k-token window over a 49k-token
# vocabulary would need 3 GiB in one go.
_CHUNK = 512


def data_dir() -> Path:
    """The folder of real text: `$COMPILER_DATA_DIR`, else `../shared/data` beside the repo."""
    override = os.environ.get(DATA_DIR_ENV)
    repo = Path(__file__).resolve().parents[1]
    path = Path(override) if override else repo.parent / "shared" / "data"
    if not path.is_dir():
        raise UserInputError(
            f"data folder {path} not found; set {DATA_DIR_ENV} to the folder holding "
            "abstracts_calibration.txt, novel_evaluation.txt, ..."
        )
    return path


def load_text(name: str) -> str:
    """The text of data file `name` (e.g. "novel_evaluation"; a ".txt" suffix is optional)."""
    folder = data_dir()
    stem = name.removesuffix(".txt")
    path = folder / f"{stem}.txt"
    # A bare name only: the data folder is the one place texts come from.
    if "/" in stem or "\\" in stem or not path.is_file():
        known = ", ".join(sorted(p.stem for p in folder.glob("*.txt")))
        raise UserInputError(f"no text {name!r} in {folder}; known texts: {known}")
    return path.read_text(encoding="utf-8")


def token_windows(
    tokenizer: Any, text: str, window: int, count: int | None, stride: int | None = None
) -> list[torch.Tensor]:
    """Windows of `window` token ids ([1, window] int64 each) taken from the start of `text`.

    The text is tokenized once, without special tokens, as
    `tokenizer(text, add_special_tokens=False)["input_ids"]` (the HF tokenizer interface), so the
    windows are deterministic. Windows start every `stride` tokens (default `window`: adjacent,
    non-overlapping). `count=None` takes every full window; asking for more windows than the text
    holds is an error rather than a silently smaller sample.
    """
    if window < 2:
        raise UserInputError(f"window must be at least 2 tokens (one to predict), got {window}")
    stride = window if stride is None else stride
    if stride < 1:
        raise UserInputError(f"stride must be at least 1 token, got {stride}")
    if count is not None and count < 0:
        raise UserInputError(f"count must be >= 0 or None, got {count}")
    ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.int64)
    available = 0 if ids.numel() < window else (ids.numel() - window) // stride + 1
    if count is None:
        count = available
    elif count > available:
        raise UserInputError(
            f"the text has {ids.numel()} tokens: only {available} windows of {window} "
            f"(stride {stride}), {count} asked for; ask for fewer or shorter windows"
        )
    # Clone so each window owns its storage: callers may keep or edit one without the others.
    return [ids[i * stride : i * stride + window].clone().unsqueeze(0) for i in range(count)]


@dataclasses.dataclass(frozen=True)
class QualityReport:
    """Reference vs candidate on the same windows; `tokens` is how many predictions were scored."""

    ppl_reference: float
    ppl_candidate: float
    ppl_increase: float  # relative: ppl_candidate / ppl_reference - 1 (0.02 means +2 %)
    top1_agreement: float  # fraction of scored positions where both predict the same token
    tokens: int

    def as_dict(self) -> dict[str, float | int]:
        return dataclasses.asdict(self)


def perplexity(
    model_fn: ModelFn, windows: Sequence[torch.Tensor], device: torch.device | str | None = None
) -> float:
    """exp(total next-token NLL / predicted tokens) over all windows; T-1 predictions each.

    `device` is where the inputs go; by default the device of an `nn.Module`'s parameters, or
    the CPU for other callables.
    """
    nll, tokens = 0.0, 0
    for ids, logits in _run(model_fn, windows, device):
        nll += _nll(logits, ids)
        tokens += ids.shape[1] - 1
    return math.exp(nll / tokens)


def next_token_agreement(
    model_a: ModelFn,
    model_b: ModelFn,
    windows: Sequence[torch.Tensor],
    device: torch.device | str | None = None,
) -> float:
    """Fraction of scored positions (the first T-1 of each window) where the argmaxes agree."""
    agree = tokens = 0
    outputs = zip(_run(model_a, windows, device), _run(model_b, windows, device), strict=True)
    for (_, a), (_, b) in outputs:
        agree += _agreeing(a, b)
        tokens += a.shape[1] - 1
    return agree / tokens


def compare(
    reference_fn: ModelFn,
    candidate_fn: ModelFn,
    windows: Sequence[torch.Tensor],
    device: torch.device | str | None = None,
) -> QualityReport:
    """Perplexity of both models and their top-1 agreement, running each once per window.

    Agreement is counted over the same T-1 positions per window as perplexity (those whose next
    token is in the window), so `tokens` describes both numbers.
    """
    nll_ref = nll_cand = 0.0
    tokens = agree = 0
    outputs = zip(
        _run(reference_fn, windows, device), _run(candidate_fn, windows, device), strict=True
    )
    for (ids, ref), (_, cand) in outputs:
        agree += _agreeing(ref, cand)
        nll_ref += _nll(ref, ids)
        nll_cand += _nll(cand, ids)
        tokens += ids.shape[1] - 1
    ppl_ref, ppl_cand = math.exp(nll_ref / tokens), math.exp(nll_cand / tokens)
    return QualityReport(
        ppl_reference=ppl_ref,
        ppl_candidate=ppl_cand,
        ppl_increase=ppl_cand / ppl_ref - 1.0,
        top1_agreement=agree / tokens,
        tokens=tokens,
    )


def _run(
    model_fn: ModelFn, windows: Sequence[torch.Tensor], device: torch.device | str | None
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yields (input_ids on the CPU, logits [1, T, V] on the CPU) for each window, in order."""
    if not windows:
        raise UserInputError("no windows to evaluate on; pass at least one [1, T] tensor of ids")
    if device is None:
        param = next(model_fn.parameters(), None) if isinstance(model_fn, torch.nn.Module) else None
        device = param.device if param is not None else torch.device("cpu")
    # no_grad rather than inference_mode: inference tensors may not be saved or edited in place
    # later, which a compiled callable holding caches between calls may need.
    with torch.no_grad():
        for ids in windows:
            if ids.dim() != 2 or ids.shape[0] != 1 or ids.shape[1] < 2:
                raise UserInputError(
                    "a window must be token ids of shape [1, T] with T >= 2, "
                    f"got {tuple(ids.shape)}"
                )
            ids = ids.to(torch.int64)
            on_device = ids.to(device)
            out = model_fn(input_ids=on_device, attention_mask=torch.ones_like(on_device))
            yield ids.cpu(), _logits(out, ids.shape[1]).cpu()


def _logits(out: Any, length: int) -> torch.Tensor:
    """The logits in a model's output: `.logits`, a dict's "logits", the tensor itself, or a
    tuple's first item."""
    if hasattr(out, "logits"):
        out = out.logits
    elif isinstance(out, Mapping) and "logits" in out:
        out = out["logits"]
    elif isinstance(out, (tuple, list)) and out:
        out = out[0]
    if not isinstance(out, torch.Tensor) or out.dim() != 3 or out.shape[:2] != (1, length):
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise UserInputError(
            f"model output must be logits of shape [1, {length}, vocab] (a tensor, an object with "
            f".logits, a dict with 'logits', or a tuple starting with them), got {got}"
        )
    return out


def _agreeing(a: torch.Tensor, b: torch.Tensor) -> int:
    """How many of positions 0..T-2 have the same argmax in both logits."""
    if a.shape != b.shape:
        raise UserInputError(
            f"logits of shapes {tuple(a.shape)} and {tuple(b.shape)} cannot be compared; "
            "both models must share the vocabulary"
        )
    return int((a[0, :-1].argmax(-1) == b[0, :-1].argmax(-1)).sum())


def _nll(logits: torch.Tensor, ids: torch.Tensor) -> float:
    """Sum of -log p(next token) over positions 0..T-2, computed in float64."""
    total = 0.0
    steps = ids.shape[1] - 1
    for start in range(0, steps, _CHUNK):
        stop = min(start + _CHUNK, steps)
        logp = torch.log_softmax(logits[0, start:stop].to(torch.float64), dim=-1)
        target = ids[0, start + 1 : stop + 1]
        total -= float(logp.gather(-1, target.unsqueeze(-1)).sum())
    return total


PASSKEY_INTRO = "There is an important pass key hidden inside a lot of irrelevant text. Find it and remember it. "
PASSKEY_QUESTION = "What is the pass key? The pass key is "
# The classic filler of passkey retrieval evaluations.
PASSKEY_FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "


def passkey_filler_ids(tokenizer: Any, length: int) -> list[int]:
    """At least `length` token ids of the classic repeated filler."""
    return tokenizer(PASSKEY_FILLER * (length // 8 + 1), add_special_tokens=False)["input_ids"]


def passkey_prompt(tokenizer: Any, filler_ids: Sequence[int], length: int, depth: float, key: str) -> tuple[torch.Tensor, list[int]]:
    """A passkey-retrieval prompt of exactly `length` tokens (Mohtashami & Jaggi, 2023):
    an intro, filler with the needle "The pass key is KEY. Remember it." at `depth` (0..1) of
    it, the question, then the key's own tokens. Returns (ids [1, length], the positions of the
    key's tokens at the end): a model retrieves the key when its greedy prediction at each
    position before them is the next key token.

    `filler_ids` are token ids to fill with (the classic repeated "The grass is green..." for
    evaluation, calibration text for calibration); they must hold at least `length` tokens.
    """
    if not 0.0 <= depth <= 1.0:
        raise UserInputError(f"passkey depth is a fraction of the filler in [0, 1], got {depth}")

    def ids(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    needle = f"The pass key is {key}. Remember it. {key} is the pass key. "
    key_ids, intro, needle_ids, question = ids(key), ids(PASSKEY_INTRO), ids(needle), ids(PASSKEY_QUESTION)
    room = length - len(intro) - len(needle_ids) - len(question) - len(key_ids)
    if room < 0 or len(filler_ids) < room:
        raise UserInputError(f"a {length}-token passkey prompt needs {max(room, 0)} filler tokens, {len(filler_ids)} given")
    filler = list(filler_ids[:room])
    before = int(room * depth)
    out = intro + filler[:before] + needle_ids + filler[before:] + question + key_ids
    start = length - len(key_ids)
    return torch.tensor([out]), list(range(start, length))
