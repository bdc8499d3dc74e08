"""Narrow domains: each module generates problems with checkable answers and formats their chains."""

from budget_reasoner.domains import math as math_domain
from budget_reasoner.errors import BudgetReasonerError

DOMAINS = {"math": math_domain}


def get_domain(name: str):
    if name not in DOMAINS:
        raise BudgetReasonerError(f"unknown domain {name!r}; available: {', '.join(DOMAINS)}")
    return DOMAINS[name]
