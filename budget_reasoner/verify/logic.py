"""Knights-and-knaves answers: the assignment in the last box against the reference's, in any order.

An answer is a list of islanders (separated by commas, semicolons or spaces), each written as the logic
domain writes it, a capital letter for a knight and a small one for a knave (`a,B`), or spelled out (`A=knave`,
`B=knight`, `A=n`, `B=k`, any case). It is right when it names exactly the reference's islanders with the same
types. An item that is neither, or one islander given two types, makes it no answer; so do boxes that disagree
(hedging).
"""

from __future__ import annotations

import re

from budget_reasoner.verify.math import MAX_COMPLETION_CHARS, Verdict, boxed_contents, holds_answer

_SPELLED = re.compile(r"([A-Za-z][A-Za-z0-9_]*)=(knight|knave|k|n)", re.IGNORECASE)
_SEPARATORS = re.compile(r"[\s,;]+")


def parse_assignment(text) -> dict[str, bool] | None:
    """{"A": False, "B": True} (name -> knight?) from `a,B` or `A=knave, B=knight`; None when not an assignment."""
    if not isinstance(text, str):
        return None
    types: dict[str, bool] = {}
    for item in _SEPARATORS.split(re.sub(r"\s*=\s*", "=", text.strip())):
        if not item:
            continue
        if re.fullmatch(r"[A-Za-z]", item):
            name, knight = item.upper(), item.isupper()
        elif match := _SPELLED.fullmatch(item):
            name, knight = match.group(1).upper(), match.group(2).lower() in ("k", "knight")
        else:
            return None
        if types.setdefault(name, knight) != knight:
            return None
    return types or None


def canonical(types: dict[str, bool]) -> str:
    return ",".join(name.upper() if knight else name.lower() for name, knight in sorted(types.items()))


def extract(completion) -> str | None:
    """The assignment the completion answers with, written canonically (`a,B,c`), or None."""
    if not isinstance(completion, str) or len(completion) > MAX_COMPLETION_CHARS:
        return None
    answers = {canonical(types) if (types := parse_assignment(box)) else None
               for box in boxed_contents(completion) if holds_answer(box)}
    if len(answers) != 1:
        return None  # no box, or boxes that disagree
    return answers.pop()


ballot = extract


def equivalent(first: str, second: str) -> bool:
    left, right = parse_assignment(first), parse_assignment(second)
    return left is not None and left == right


def grade(completion, reference) -> Verdict:
    if parse_assignment(reference) is None:
        return Verdict(False, f"reference answer {str(reference)[:40]!r} is not an assignment like a,B,c")
    answer = extract(completion)
    return Verdict(answer is not None and equivalent(answer, reference))
