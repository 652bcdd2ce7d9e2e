"""Tests of compiler.evaluation: exact perplexity and agreement on fake models, windows from a
stub tokenizer, and one check on the real SmolLM2 (examples/smollm2.py, cached after one run)."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

from compiler.errors import UserInputError
from compiler.evaluation import (
    QualityReport,
    compare,
    load_text,
    next_token_agreement,
    perplexity,
    token_windows,
)

REPO = Path(__file__).resolve().parents[1]
V = 7


class _StubTokenizer:
    """One token per whitespace-separated word: its length mod 50 (enough for window tests)."""

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
        assert add_special_tokens is False
        return {"input_ids": [len(word) % 50 for word in text.split()]}


def _windows(count: int = 3, length: int = 6, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, V, (1, length), generator=gen) for _ in range(count)]


def _uniform(input_ids, attention_mask=None):
    return torch.zeros(input_ids.shape[0], input_ids.shape[1], V)


def _argmax_is(next_of):
    """A model whose argmax at each position is next_of(input token), returned as a tuple."""

    def fn(input_ids, attention_mask=None):
        logits = torch.zeros(*input_ids.shape, V)
        logits.scatter_(-1, next_of(input_ids).unsqueeze(-1), 5.0)
        return (logits, "ignored")

    return fn


class _TrueTokenModel(torch.nn.Module):
    """Puts probability p on the true next token (uniform rest), returned as `.logits`.

    Built for a known set of windows: it looks up the next token of each position.
    """

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, input_ids, attention_mask=None):
        rest = (1.0 - self.p) / (V - 1)
        logp = torch.full((*input_ids.shape, V), math.log(rest), dtype=torch.float64)
        nxt = torch.roll(input_ids, -1, dims=1)  # the last position's "next" is never scored
        logp.scatter_(-1, nxt.unsqueeze(-1), math.log(self.p))

        class Out:
            logits = logp.float()

        return Out()


def test_uniform_logits_give_perplexity_of_vocab_size():
    assert perplexity(_uniform, _windows()) == pytest.approx(V, rel=1e-12)
    as_dict = lambda input_ids, attention_mask: {"logits": _uniform(input_ids)}  # noqa: E731
    assert perplexity(as_dict, _windows()) == pytest.approx(V, rel=1e-12)


def test_perplexity_matches_hand_computed_mean_nll():
    # Probability p on the true token at every scored position: NLL = -log p each, so ppl = 1/p.
    assert perplexity(_TrueTokenModel(0.6), _windows()) == pytest.approx(1 / 0.6, rel=1e-6)
    # Two windows of different length and confidence: pool the NLL over all 3 + 5 predictions.
    a, b = _TrueTokenModel(0.5), _TrueTokenModel(0.2)
    w1, w2 = _windows(1, 4, seed=1), _windows(1, 6, seed=2)

    def both(input_ids, attention_mask=None):
        return (a if input_ids.shape[1] == 4 else b)(input_ids).logits

    expected = math.exp((3 * -math.log(0.5) + 5 * -math.log(0.2)) / 8)
    assert perplexity(both, w1 + w2) == pytest.approx(expected, rel=1e-6)


def test_agreement_with_itself_is_one_and_with_a_shift_is_known():
    windows = [torch.tensor([[0, 1, 2, 3, 4, 5, 6, 0, 1]])]
    ident = _argmax_is(lambda x: x)
    assert next_token_agreement(ident, ident, windows) == 1.0
    # Differs from `ident` where the input token is 1 or 2 (both mapped to 0). Of the 8 scored
    # positions (the last has no next token in the window) those are 2, so 6 of 8 agree; the
    # unscored last position (token 1) disagrees too but must not count.
    clamp = _argmax_is(lambda x: torch.where(x <= 2, torch.zeros_like(x), x))
    assert next_token_agreement(ident, clamp, windows) == pytest.approx(6 / 8)
    shifted = _argmax_is(lambda x: (x + 1) % V)
    assert next_token_agreement(ident, shifted, windows) == 0.0


def test_compare_reports_both_models_in_one_pass():
    windows = _windows(count=2, length=5)
    report = compare(_TrueTokenModel(0.5), _uniform, windows)
    assert isinstance(report, QualityReport)
    assert report.ppl_reference == pytest.approx(2.0, rel=1e-6)
    assert report.ppl_candidate == pytest.approx(V, rel=1e-9)
    assert report.ppl_increase == pytest.approx(V / 2 - 1, rel=1e-6)
    assert report.tokens == 2 * 4
    assert 0.0 <= report.top1_agreement <= 1.0
    assert json.loads(json.dumps(report.as_dict())) == report.as_dict()


def test_bad_model_output_and_windows_are_user_errors():
    with pytest.raises(UserInputError, match="logits of shape"):
        perplexity(lambda input_ids, attention_mask: torch.zeros(V), _windows())
    with pytest.raises(UserInputError, match=r"\[1, T\]"):
        perplexity(_uniform, [torch.zeros(6, dtype=torch.int64)])
    with pytest.raises(UserInputError, match="no windows"):
        perplexity(_uniform, [])


def test_token_windows_shapes_stride_and_determinism():
    text = " ".join("x" * (i % 13 + 1) for i in range(100))  # 100 tokens
    tok = _StubTokenizer()
    windows = token_windows(tok, text, window=16, count=None)
    assert len(windows) == 6  # 100 // 16, the tail of 4 tokens dropped
    assert all(w.shape == (1, 16) and w.dtype == torch.int64 for w in windows)
    flat = torch.cat(windows, dim=1)[0].tolist()
    assert flat == tok(text, add_special_tokens=False)["input_ids"][:96]  # adjacent, no overlap
    again = token_windows(tok, text, window=16, count=3)
    assert all(torch.equal(a, b) for a, b in zip(again, windows[:3], strict=True))
    strided = token_windows(tok, text, window=16, count=None, stride=10)
    assert len(strided) == 9 and torch.equal(strided[1][0, :6], windows[0][0, 10:])
    with pytest.raises(UserInputError, match="only 6 windows"):
        token_windows(tok, text, window=16, count=7)


def test_load_text_reads_data_folder_and_names_the_fix(tmp_path, monkeypatch):
    (tmp_path / "tiny_evaluation.txt").write_text("Some words.\n\nMore words.\n")
    monkeypatch.setenv("COMPILER_DATA_DIR", str(tmp_path))
    assert load_text("tiny_evaluation") == "Some words.\n\nMore words.\n"
    assert load_text("tiny_evaluation.txt") == load_text("tiny_evaluation")
    with pytest.raises(UserInputError, match="known texts: tiny_evaluation"):
        load_text("novel_evaluation")
    monkeypatch.setenv("COMPILER_DATA_DIR", str(tmp_path / "missing"))
    with pytest.raises(UserInputError, match="COMPILER_DATA_DIR"):
        load_text("tiny_evaluation")


# --- the real model -------------------------------------------------------------------------


def test_smollm2_perplexity_on_real_text_is_plausible(smollm2):
    windows = token_windows(smollm2.tokenizer(), load_text("abstracts_evaluation"), 128, count=2)
    ppl = perplexity(smollm2.model(), windows)
    # Measured 129 here: the first two abstracts are dense jargon (MLA, DeepSeek-V2, TP) for a
    # 135M model without a BOS token; over 16 windows it is 62, on the novel about 35. A broken
    # model or a mismatched tokenizer lands in the thousands (the vocabulary is 49152).
    assert math.isfinite(ppl) and 5 < ppl < 250, ppl


def test_smollm2_example_inputs_and_batches(smollm2):
    inputs = smollm2.example_inputs()
    assert set(inputs) == {"input_ids", "attention_mask"}
    assert all(t.shape == (1, 64) and t.dtype == torch.int64 for t in inputs.values())
    with torch.no_grad():
        logits = smollm2.model()(**inputs).logits
    assert logits.shape == (1, 64, 49152)
    assert smollm2.model() is smollm2.model() and not smollm2.model().training
    calib, evals = smollm2.calibration_batches(count=4), smollm2.evaluation_batches(count=4)
    assert len(calib) == len(evals) == 4
    # Calibration and evaluation windows come from different texts: no window is shared.
    seen = {tuple(b["input_ids"][0].tolist()) for b in calib}
    assert not seen & {tuple(b["input_ids"][0].tolist()) for b in evals}
