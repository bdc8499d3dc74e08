"""Verifiers: did a completion reach the reference answer?

`extract_answer` pulls the final answer out of free text; `check(domain, completion, reference)` grades it.
Rejection sampling keeps what `check` accepts, DPO pairs follow its verdicts, and eval reports it.
"""

from budget_reasoner.verify.math import check_math, extract_answer

__all__ = ["check", "extract_answer"]


def check(domain: str, completion: str, reference: str) -> bool:
    if domain == "math":
        return check_math(completion, reference)
    raise ValueError(f"no verifier for domain {domain!r}")
