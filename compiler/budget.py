"""Quality budgets: how much a lossy pass may cost, as the user writes it.

`lossless` (default), `ppl:+2%` (perplexity may rise by at most 2 percent) or `agreement:98%`
(next-token choices agree with the unmodified model at least 98 percent of the time).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from compiler.errors import UserInputError

_FORMS = "'lossless', 'ppl:+2%' or 'agreement:98%'"


@dataclass(frozen=True)
class Budget:
    kind: str  # "lossless" | "ppl" | "agreement"
    value: float = 0.0  # ppl: allowed relative increase; agreement: required fraction

    @property
    def lossless(self) -> bool:
        return self.kind == "lossless"

    def allows(self, ppl_increase: float, top1_agreement: float) -> bool:
        """Whether a measured quality cost fits the budget."""
        if self.kind == "ppl":
            return ppl_increase <= self.value
        if self.kind == "agreement":
            return top1_agreement >= self.value
        return ppl_increase <= 0.0 and top1_agreement >= 1.0

    def __str__(self) -> str:
        if self.kind == "ppl":
            return f"ppl:+{self.value * 100:g}%"
        if self.kind == "agreement":
            return f"agreement:{self.value * 100:g}%"
        return "lossless"


def parse_budget(text: str | Budget | None) -> Budget:
    """Parse a budget string; a malformed one is a UserInputError naming the accepted forms."""
    if isinstance(text, Budget):
        return text
    if text is None or text.strip().lower() == "lossless":
        return Budget("lossless")
    m = re.fullmatch(r"\s*(ppl|agreement)\s*:\s*\+?\s*([0-9]*\.?[0-9]+)\s*%\s*", text.lower())
    if not m:
        raise UserInputError(f"bad budget {text!r}; write {_FORMS}")
    kind, value = m.group(1), float(m.group(2)) / 100
    if kind == "agreement" and not 0 < value <= 1:
        raise UserInputError(f"bad budget {text!r}: agreement must be in (0%, 100%]")
    return Budget(kind, value)
