"""The chain format every stage writes and every verifier reads: reasoning between `<think>` and `</think>`, then
the final answer as `\\boxed{...}`. One definition, shared by all domains."""

from __future__ import annotations

import random

from budget_reasoner.errors import BudgetReasonerError

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


def format_chain(steps, answer: str) -> str:
    """A worked chain: one step per line inside the thought, then the boxed answer."""
    return f"{THINK_OPEN}\n" + "".join(step + "\n" for step in steps) + f"{THINK_CLOSE}\n\\boxed{{{answer}}}"


def format_direct(answer: str) -> str:
    """An answer with an empty thought: how the offline student base is taught to reply."""
    return format_chain([], answer)


def draw_distinct(random_problem, count: int, seed: int, min_steps: int, max_steps: int, exclude=frozenset(),
                  what: str = "problems") -> list:
    """`count` problems from a procedural family (`random_problem(rng, steps)`, steps drawn from min_steps..max_steps)
    with distinct questions, none in `exclude`; the same seed gives the same list. A family with fewer distinct
    questions than asked is one line after 50 draws a problem, not an endless loop."""
    rng = random.Random(seed)
    seen, problems, attempts = set(exclude), [], 0
    while len(problems) < count:
        attempts += 1
        if attempts > 50 * count + 1000:
            raise BudgetReasonerError(f"could not draw {count} distinct {what} with {min_steps}-{max_steps} steps")
        problem = random_problem(rng, rng.randint(min_steps, max_steps))
        if problem.question not in seen:
            seen.add(problem.question)
            problems.append(problem)
    return problems
