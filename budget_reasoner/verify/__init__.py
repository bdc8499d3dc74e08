"""Verifiers: did a completion reach the reference answer?

`extract_answer` pulls the final answer out of free text; `check(domain, completion, reference)` grades it;
`grade` does the same and also says when the reference itself could not be graded against.
`ballot` is the answer a completion votes with (None when `grade` would refuse it, e.g. for hedging) and
`equivalent` the relation `grade` uses between two answers: majority vote clusters by meaning with them.
Rejection sampling keeps what `check` accepts, DPO pairs follow its verdicts, and eval reports it.
"""

from budget_reasoner.errors import BudgetReasonerError
from budget_reasoner.verify import choice as _choice, code as _code, logic as _logic, math as _math, plain as _plain
from budget_reasoner.verify.math import Verdict, extract_answer

__all__ = ["VERIFIERS", "Verdict", "ballot", "check", "equivalent", "extract", "extract_answer", "grade", "grade_many",
           "resolve_verifier"]

# the verifiers known by name (`--verifier`, a domain's VERIFIER); also regex:PATTERN
VERIFIERS = ("math", "choice", "logic", "numeric", "exact", "code")


def _module(domain):
    """The grader of `domain`: a verifier's name, a domains.Domain (its verifier), a domain's .py file, or a run's
    record of its domain (domains.recorded: a dict naming the verifier or the module's file)."""
    domain = domain.get("verifier", "") if isinstance(domain, dict) else getattr(domain, "verifier", domain)
    if not isinstance(domain, str):
        return domain  # a domain module's own check (domains.UserVerifier)
    if domain == "math":
        return _math
    if domain == "choice":
        return _choice
    if domain == "logic":
        return _logic
    if domain == "code":
        return _code  # runs the completion's last python block against the reference's tests (verify/code.py)
    if domain == "numeric":
        return _plain.NUMERIC
    if domain == "exact":
        return _plain.EXACT
    if domain.startswith("regex:"):
        return _plain.regex(domain.removeprefix("regex:"))
    if domain.endswith(".py"):
        from budget_reasoner.domains import get_domain

        return _module(get_domain(domain, grading_only=True))
    raise BudgetReasonerError(f"no verifier {domain!r}; available: {', '.join(VERIFIERS)}, regex:PATTERN")


resolve_verifier = _module


def extract(domain: str, completion: str) -> str | None:
    """The final answer in the domain's terms (a normalized math answer, or an option letter)."""
    module = _module(domain)
    if module is _choice:
        return _choice.extract_choice(completion)
    return module.extract(completion) if hasattr(module, "extract") else extract_answer(completion)


def grade(domain: str, completion, reference) -> Verdict:
    return _module(domain).grade(completion, reference)


def check(domain: str, completion, reference) -> bool:
    return grade(domain, completion, reference).correct


def grade_many(domain: str, completions, references) -> list[Verdict]:
    """`grade` over pairs, in order; a grader that runs programs (code) runs them concurrently."""
    module = _module(domain)
    if hasattr(module, "grade_many"):
        return module.grade_many(list(completions), list(references))
    return [module.grade(completion, reference) for completion, reference in zip(completions, references, strict=True)]


def ballot(domain: str, completion) -> str | None:
    """The answer this completion votes for, or None when the grader refuses it (so it does not vote)."""
    return _module(domain).ballot(completion)


def equivalent(domain: str, first: str, second: str) -> bool:
    """Whether two extracted answers mean the same to the domain's grader (`second` plays the reference)."""
    return _module(domain).equivalent(first, second)
