"""Verifiers: did a completion reach the reference answer?

`extract_answer` pulls the final answer out of free text; `check(domain, completion, reference)` grades it;
`grade` does the same and also says when the reference itself could not be graded against.
`ballot` is the answer a completion votes with (None when `grade` would refuse it, e.g. for hedging) and
`equivalent` the relation `grade` uses between two answers: majority vote clusters by meaning with them.
Rejection sampling keeps what `check` accepts, DPO pairs follow its verdicts, and eval reports it.
"""

from budget_reasoner.errors import BudgetReasonerError
from budget_reasoner.verify import choice as _choice, math as _math
from budget_reasoner.verify.math import Verdict, extract_answer

__all__ = ["Verdict", "ballot", "check", "equivalent", "extract", "extract_answer", "grade"]


def _module(domain: str):
    if domain == "math":
        return _math
    if domain == "choice":
        return _choice
    raise BudgetReasonerError(f"no verifier for domain {domain!r}; available: math, choice")


def extract(domain: str, completion: str) -> str | None:
    """The final answer in the domain's terms (a normalized math answer, or an option letter)."""
    return _choice.extract_choice(completion) if _module(domain) is _choice else extract_answer(completion)


def grade(domain: str, completion, reference) -> Verdict:
    return _module(domain).grade(completion, reference)


def check(domain: str, completion, reference) -> bool:
    return grade(domain, completion, reference).correct


def ballot(domain: str, completion) -> str | None:
    """The answer this completion votes for, or None when the grader refuses it (so it does not vote)."""
    return _module(domain).ballot(completion)


def equivalent(domain: str, first: str, second: str) -> bool:
    """Whether two extracted answers mean the same to the domain's grader (`second` plays the reference)."""
    return _module(domain).equivalent(first, second)
