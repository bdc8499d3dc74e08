"""The bignum domain: arithmetic on 3-4 digit numbers, with a calculator. The offline world where tools pay.

A problem composes 1-3 operations, `+` or `*`, on numbers of 3-4 digits (a multiplier of 2-3), written like the
math domain's with the fewest parentheses: `(4821+337)*529`. No tiny model multiplies 5158 by 529 in one forward
pass, nor learns to in minutes; copying numbers into a program and its printed result back out, it does. So the
worked chain (what the offline teacher learns) runs each operation as a tool call (tools.py) and reads the result:

    <think>
    ```python
    print(4821+337)
    ```
    ```output
    5158
    ```
    ```python
    print(5158*529)
    ```
    ```output
    2728582
    ```
    </think>
    \\boxed{2728582}

The output blocks are the runtime's: with generate.tools / eval.tools (`--tools`) the sandbox writes them while the
chain is generated, and training never learns them (tools.mask_observations). `plain_chain` writes the same steps
as head arithmetic (`4821+337=5158`), the chain of a student without tools: benchmarks/tools_offline.py trains one
student on each kind of chain and compares them on held-out problems. The student base knows every single step in
both notations (single_steps), so SFT teaches either student the same thing, composing steps, in its notation.

Sizes: a 3-step chain is ~100 tokens with its output blocks; use model.max_length >= 160 and max_new_tokens >= 96
(benchmarks/tools_offline.py sets them), e.g. `quickstart --domain bignum --set model.max_length=192 ...`.
"""

from __future__ import annotations

import random

from budget_reasoner.domains import Problem
from budget_reasoner.domains.chain import draw_distinct, format_chain
from budget_reasoner.domains.math import _is_product, first_wrong_step

NAME = "bignum"
VERIFIER = "math"  # the boxed integer, exactly
TOOLS = True  # its chains call tools: the offline teacher's check and quickstart run them (domains/__init__.py)
INSTRUCTION = ("Use python for the arithmetic: write each operation as print(...) in a ```python block, read its "
               "```output, and give the final answer in \\boxed{}.")
MAX_VALUE = 9_999_999  # results stay within 7 digits: short chains, still far past what a tiny model computes


def _operand(rng: random.Random, op: str) -> int:
    return rng.randint(10, 999) if op == "*" else rng.randint(100, 9999)


def tool_steps(steps: list[tuple[int, str, int, int]]) -> tuple[str, ...]:
    """The worked chain's lines with a calculator: per operation a python block and its output block."""
    lines: list[str] = []
    for value, op, operand, result in steps:
        lines += ["```python", f"print({value}{op}{operand})", "```", "```output", str(result), "```"]
    return tuple(lines)


def random_problem(rng: random.Random, num_steps: int) -> Problem:
    """A problem of `num_steps` operations on 3-4 digit numbers whose values stay within MAX_VALUE."""
    while True:
        value = rng.randint(100, 9999)
        expression, steps = str(value), []
        for _ in range(num_steps):
            op = rng.choice("+*")
            operand = _operand(rng, op)
            result = value + operand if op == "+" else value * operand
            if result > MAX_VALUE:
                break
            if op == "*" and not expression.isdigit() and not _is_product(expression):
                expression = f"({expression})"
            expression += f"{op}{operand}"
            steps.append((value, op, operand, result))
            value = result
        else:
            assert eval(expression) == value, expression  # the notation must mean what the chain computes
            return Problem(question=expression, answer=str(value), steps=tool_steps(steps))


def make_problems(count: int, seed: int, min_steps: int, max_steps: int, exclude=frozenset()) -> list[Problem]:
    """`count` distinct problems of min_steps..max_steps operations, none whose question is in `exclude`."""
    return draw_distinct(random_problem, count, seed, min_steps, max_steps, exclude, "bignum problems")


def operations(problem: Problem) -> list[str]:
    """A problem's operations as head arithmetic, `5158*529=2728582`, read off its tool chain."""
    lines = problem.steps
    return [f"{lines[i + 1][len('print('):-1]}={lines[i + 4]}" for i in range(0, len(lines), 6)]


def plain_chain(problem: Problem) -> str:
    """The chain without a calculator: one `a op b=c` line per operation, as the math domain writes them."""
    return format_chain(operations(problem), problem.answer)


def single_steps(problems: list[Problem]) -> list[Problem]:
    """Each operation as a one-step problem, twice: with its tool call and as a head-arithmetic line. The student
    base thus knows both notations of a step (and, in its head, gets the big ones wrong)."""
    skills = []
    for problem in problems:
        for line in operations(problem):
            question, answer = line.split("=")
            op = "*" if "*" in question else "+"
            value, operand = (int(part) for part in question.split(op))
            skills.append(Problem(question=question, answer=answer,
                                  steps=tool_steps([(value, op, operand, int(answer))])))
            skills.append(Problem(question=question, answer=answer, steps=(line,)))
    return skills


def rejected_prefix(completion: str) -> str:
    """A rejected chain cut just after its first wrong `a op b=c` line (head arithmetic; a tool chain's numbers are
    the sandbox's, so it is kept whole)."""
    index = first_wrong_step(completion)
    return completion if index is None else "\n".join(completion.split("\n")[: index + 1])
