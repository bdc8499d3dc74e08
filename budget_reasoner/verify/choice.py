"""Multiple choice (GPQA-style): the chosen letter against the reference letter."""

from __future__ import annotations

import re

from budget_reasoner.verify.math import MAX_COMPLETION_CHARS, Verdict, boxed_contents, holds_answer

_PATTERNS = (
    re.compile(r"[Aa]nswer(?: is)?[ \t]*[:：]?[ \t]*\(?([A-D])\)?\b"),
    re.compile(r"\(([A-D])\)"),
    re.compile(r"\b([A-D])\)"),
)


def _letters(completion: str) -> list[str]:
    return [re.sub(r"[^A-D]", "", box) for box in boxed_contents(completion) if holds_answer(box)]


def extract_choice(completion: str) -> str | None:
    if not isinstance(completion, str) or len(completion) > MAX_COMPLETION_CHARS:
        return None
    boxes = _letters(completion)
    if boxes and len(boxes[-1]) == 1:
        return boxes[-1]
    for pattern in _PATTERNS:
        found = pattern.findall(completion)
        if found:
            return found[-1]
    return None


def ballot(completion) -> str | None:
    """The letter graded, or None: not text, giant, or boxing several options (not an answer)."""
    if not isinstance(completion, str) or len(completion) > MAX_COMPLETION_CHARS:
        return None
    if len(set(_letters(completion))) > 1:
        return None
    return extract_choice(completion)


def equivalent(first: str, second: str) -> bool:
    return first.strip().upper() == second.strip().upper()


def grade_choice(completion, reference) -> Verdict:
    if not isinstance(reference, str) or not re.fullmatch(r"[A-Da-d]", reference.strip()):
        return Verdict(False, f"reference answer {reference!r} is not an option letter A-D")
    chosen = ballot(completion)
    return Verdict(chosen is not None and equivalent(chosen, reference))


grade = grade_choice
