"""Verifiers: did a completion reach the reference answer?

`extract_answer` pulls the final answer out of free text; `check(domain, completion, reference)` grades it;
`grade` does the same and also says when the reference itself could not be graded against.
Rejection sampling keeps what `check` accepts, DPO pairs follow its verdicts, and eval reports it.
"""

from budget_reasoner.verify.choice import extract_choice, grade_choice
from budget_reasoner.verify.math import Verdict, extract_answer, grade_math

__all__ = ["Verdict", "check", "extract", "extract_answer", "grade"]


def extract(domain: str, completion: str) -> str | None:
    """The final answer in the domain's terms (a normalized math answer, or an option letter)."""
    return extract_choice(completion) if domain == "choice" else extract_answer(completion)


def grade(domain: str, completion: str, reference: str) -> Verdict:
    if domain == "math":
        return grade_math(completion, reference)
    if domain == "choice":
        return grade_choice(completion, reference)
    raise ValueError(f"no verifier for domain {domain!r}")


def check(domain: str, completion: str, reference: str) -> bool:
    return grade(domain, completion, reference).correct
