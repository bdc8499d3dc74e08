"""The math domain: procedural multi-step arithmetic problems with exact answers. (Seed sets such as GSM8K's
training split come in through `generate.seed_sets`, read by problems.py.)

A problem composes 2-3 operations, written in ordinary notation with the fewest parentheses:
`(12+7-5)*3`. Its worked chain does one operation per line, so each line is a single-step skill:

    <think>
    12+7=19
    19-5=14
    14*3=42
    </think>
    \\boxed{42}

Answering such a problem directly means composing the operations in one forward pass, which a small
model does badly; writing the chain reduces it to steps it knows. That gap is what the recipe closes.
"""

from __future__ import annotations

import hashlib
import operator
import random
import re
from dataclasses import dataclass
from fractions import Fraction

from budget_reasoner.domains.chain import THINK_CLOSE, THINK_OPEN, draw_distinct, format_chain, format_direct  # noqa: F401 (re-exported: the math helpers callers use)

DOMAIN = NAME = "math"  # the domain interface (domains/__init__.py): NAME, VERIFIER, make_problems, ...
VERIFIER = "math"  # verify/math.py: exact numbers, then symbolic equality
MAX_VALUE = 99  # every value stays in 0..99: arithmetic a tiny model learns in minutes, composition it does not


@dataclass(frozen=True)
class Problem:
    question: str
    answer: str
    steps: tuple[str, ...]  # "12+7=19", one per operation

    @property
    def id(self) -> str:
        return problem_id(self.question)

    def to_row(self, source: str) -> dict:
        return {"id": self.id, "domain": DOMAIN, "question": self.question, "answer": self.answer, "source": source}


def problem_id(question: str) -> str:
    return "math-" + hashlib.sha1(question.encode()).hexdigest()[:12]


def _apply(value: int, op: str, operand: int) -> int:
    return value + operand if op == "+" else value - operand if op == "-" else value * operand


def random_problem(rng: random.Random, num_steps: int) -> Problem:
    """Draw a problem of `num_steps` operations whose intermediate values stay in 0..MAX_VALUE."""
    while True:
        value = rng.randint(2, 20)
        expression, steps = str(value), []
        for _ in range(num_steps):
            op = rng.choice("+-*")
            operand = rng.randint(2, 4) if op == "*" else rng.randint(2, 9)
            result = _apply(value, op, operand)
            if not 0 <= result <= MAX_VALUE:
                break
            if op == "*" and not expression.isdigit() and not _is_product(expression):
                expression = f"({expression})"
            expression += f"{op}{operand}"
            steps.append(f"{value}{op}{operand}={result}")
            value = result
        else:
            assert eval(expression) == value, expression  # the notation must mean what the chain computes
            return Problem(question=expression, answer=str(value), steps=tuple(steps))


def _is_product(expression: str) -> bool:
    """True when the expression's top level is already a product, so `a*b*c` needs no parentheses."""
    depth = 0
    for char in expression:
        depth += char == "("
        depth -= char == ")"
        if depth == 0 and char in "+-":
            return False
    return True


def make_problems(count: int, seed: int, min_steps: int, max_steps: int, exclude: set[str] = frozenset()) -> list[Problem]:
    """`count` distinct problems, none of whose questions is in `exclude`; the same seed gives the same list."""
    return draw_distinct(random_problem, count, seed, min_steps, max_steps, exclude)


def single_steps(problems: list[Problem]) -> list[Problem]:
    """Each step of `problems` as a one-operation problem: the skills their chains use, in their proportions."""
    skills = []
    for problem in problems:
        for step in problem.steps:
            question, answer = step.split("=")
            skills.append(Problem(question=question, answer=answer, steps=(step,)))
    return skills


def make_splits(num_train: int, num_eval: int, seed: int, min_steps: int, max_steps: int) -> tuple[list[Problem], list[Problem]]:
    """Train and held-out problems that never share a question (the held-out split is drawn first)."""
    held_out = make_problems(num_eval, seed + 1_000_003, min_steps, max_steps)
    train = make_problems(num_train, seed, min_steps, max_steps, exclude={p.question for p in held_out})
    return train, held_out


_OPERATORS = {"Add": operator.add, "Sub": operator.sub, "Mult": operator.mul, "Div": operator.truediv}
_STEP = re.compile(r"^\s*([\d+\-*/(). ]+?)\s*=\s*(-?\d+(?:\.\d+)?)\s*$")


def _evaluate_arithmetic(expression: str) -> Fraction | None:
    """Exact value of + - * / arithmetic on numbers (no names, no calls); None when it is anything else."""
    import ast

    def walk(node):
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)):
            return Fraction(str(node.value))
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            return -walk(node.operand)
        if isinstance(node, ast.BinOp) and type(node.op).__name__ in _OPERATORS:
            return _OPERATORS[type(node.op).__name__](walk(node.left), walk(node.right))
        raise ValueError(node)

    try:
        return walk(ast.parse(expression, mode="eval").body)
    except (SyntaxError, ValueError, ZeroDivisionError, RecursionError):
        return None


def first_wrong_step(completion: str) -> int | None:
    """Index of the first line of the form `expression=number` whose arithmetic is false (a step-level check)."""
    for index, line in enumerate(completion.split("\n")):
        match = _STEP.match(line)
        if match:
            value = _evaluate_arithmetic(match.group(1))
            if value is not None and value != Fraction(match.group(2)):
                return index
    return None


def rejected_prefix(completion: str) -> str:
    """A rejected chain cut just after its first wrong step (Step-DPO style).

    The steps after an error are often right given the wrong value; pushing their likelihood down
    would teach the student that correct arithmetic is bad. Cut there, DPO lowers only the error.
    A chain without a checkable wrong step is kept whole.
    """
    index = first_wrong_step(completion)
    return completion if index is None else "\n".join(completion.split("\n")[: index + 1])
