"""Multiple choice (GPQA-style): the chosen letter against the reference letter."""

from __future__ import annotations

import re

from budget_reasoner.verify.math import MAX_COMPLETION_CHARS, Verdict, boxed_contents

_PATTERNS = (
    re.compile(r"[Aa]nswer(?: is)?\s*[:：]?\s*\(?([A-D])\)?\b"),
    re.compile(r"\(([A-D])\)"),
    re.compile(r"\b([A-D])\)"),
)


def extract_choice(completion: str) -> str | None:
    if not isinstance(completion, str):
        return None
    boxes = [re.sub(r"[^A-D]", "", box) for box in boxed_contents(completion)]
    if boxes and len(boxes[-1]) == 1:
        return boxes[-1]
    for pattern in _PATTERNS:
        found = pattern.findall(completion)
        if found:
            return found[-1]
    return None


def grade_choice(completion: str, reference: str) -> Verdict:
    if not isinstance(completion, str) or len(completion) > MAX_COMPLETION_CHARS:
        return Verdict(False)
    letters = {re.sub(r"[^A-D]", "", box) for box in boxed_contents(completion)}
    if len(letters) > 1:
        return Verdict(False)  # boxing several options is not an answer
    return Verdict(extract_choice(completion) == reference.strip().upper())
