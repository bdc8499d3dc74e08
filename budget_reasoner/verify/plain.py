"""Verifiers for a user's own problems, no code needed (`--verifier numeric|exact|regex:PATTERN`).

The final answer is the last `\\boxed{...}` that holds one, else what follows "The answer is", `####` or `A:`;
a completion boxing several different answers gives none (hedging is not an answer). Then:

- `exact`: the answer equals the reference as text, surrounding and repeated whitespace aside;
- `numeric`: both are numbers (`1,000`, `$3.50`, `45%`, `1/2` read as math's grader reads them) and agree to a
  relative 1e-6;
- `regex:PATTERN`: the answer is the pattern's last match in the completion (its first group if it has one),
  compared as `exact` does: for answers written without a box, e.g. `regex:Answer: (\\w+)`.
"""

from __future__ import annotations

import functools
import re
from fractions import Fraction

from budget_reasoner.errors import BudgetReasonerError
from budget_reasoner.verify.math import (_ANSWER_PHRASES, MAX_COMPLETION_CHARS, Verdict, boxed_contents, holds_answer,
                                         normalize, to_number)

RELATIVE_TOLERANCE = 1e-6


def _squeeze(text: str) -> str:
    return " ".join(text.split())


def final_answer(completion) -> str | None:
    """The last boxed answer (None when boxes disagree), else an answer phrase's; whitespace squeezed."""
    if not isinstance(completion, str) or len(completion) > MAX_COMPLETION_CHARS:
        return None
    boxes = [_squeeze(box) for box in boxed_contents(completion) if holds_answer(box)]
    if boxes:
        return boxes[-1] if len(set(boxes)) == 1 else None
    for pattern in _ANSWER_PHRASES:
        found = pattern.findall(completion)
        if found:
            return _squeeze(found[-1]).rstrip(".") or None
    return None


class Exact:
    """The answer as text, equal to the reference."""

    def extract(self, completion) -> str | None:
        return final_answer(completion)

    ballot = extract

    def equivalent(self, first: str, second: str) -> bool:
        return _squeeze(first) == _squeeze(second)

    def grade(self, completion, reference) -> Verdict:
        if reference is None or not _squeeze(str(reference)):
            return Verdict(False, "empty reference answer")
        answer = self.extract(completion)
        return Verdict(answer is not None and self.equivalent(answer, str(reference)))


class Regex(Exact):
    def __init__(self, pattern: str):
        self.pattern = re.compile(pattern)

    def extract(self, completion) -> str | None:
        if not isinstance(completion, str) or len(completion) > MAX_COMPLETION_CHARS:
            return None
        found = [match.group(1) if self.pattern.groups else match.group(0) for match in self.pattern.finditer(completion)]
        return _squeeze(found[-1]) if found and found[-1] is not None else None

    ballot = extract


class Numeric:
    """The answer as a number, equal to the reference's within a relative 1e-6."""

    @staticmethod
    def number(text) -> Fraction | None:
        if isinstance(text, (int, float)) and not isinstance(text, bool):
            text = str(text)
        return to_number(normalize(text)) if isinstance(text, str) else None

    def extract(self, completion) -> str | None:
        answer = final_answer(completion)
        if answer is None and isinstance(completion, str) and not boxed_contents(completion):
            numbers = re.findall(r"-?\d[\d,]*(?:\.\d+)?", completion[-2000:])  # no box, no phrase: the last number
            answer = numbers[-1] if numbers else None
        return answer if answer is not None and self.number(answer) is not None else None

    ballot = extract

    def equivalent(self, first: str, second: str) -> bool:
        left, right = self.number(first), self.number(second)
        return left is not None and right is not None and abs(left - right) <= RELATIVE_TOLERANCE * max(1, abs(right))

    def grade(self, completion, reference) -> Verdict:
        if self.number(reference) is None:
            return Verdict(False, f"reference answer {str(reference)[:40]!r} is not a number")
        answer = self.extract(completion)
        return Verdict(answer is not None and self.equivalent(answer, str(reference)))


EXACT, NUMERIC = Exact(), Numeric()


@functools.lru_cache(maxsize=64)
def regex(pattern: str) -> Regex:
    try:
        return Regex(pattern)
    except re.error as error:
        raise BudgetReasonerError(f"verifier regex:{pattern}: not a valid regular expression ({error})") from None
