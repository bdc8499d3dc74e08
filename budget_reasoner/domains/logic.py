"""The logic domain: knights and knaves, procedural, with exactly one solution each.

Every islander is a knight, who says only true things, or a knave, who says only false ones. The notation is
compact (a tiny model's tokens are characters): an islander's letter in capitals means a knight, in lower case
a knave. A puzzle is a line of statements, `X:...` meaning "X says ...", listed by speaker:

    A:C B:b&d C:d

Two kinds of statement:
- `X:Y` (or `X:y`): X says Y is a knight (a knave). Knowing X tells Y (a knight's Y is as said, a knave's is
  not); knowing Y tells whether X spoke the truth, hence what X is.
- `X:x|Y` and `X:x&Y` (any case for Y): X speaks of himself and Y, which settles both alone. "I am a knave or
  ..." is true from a knave, which cannot be: X is a knight and the rest is true. "I am a knave and ..." is false
  from a knight, which cannot be: X is a knave and the rest is false.
A puzzle of s steps has one self-statement and s-1 others, each bringing in one new islander tied to one
already settled, so exactly one assignment fits (checked against all 2^n by brute force). The worked chain
settles one statement per line, restating the fact it starts from, in the order they resolve:

    <think>
    B:b&d>b,D
    D,C:d>c
    c,A:C>a
    </think>
    \\boxed{a,b,c,D}

The answer lists every islander by name. Each line is a one-step skill; answering directly means following
the ties through statements listed out of resolving order in one pass, which a small model does badly. As in
math, the chain reduces it to steps it knows.
"""

from __future__ import annotations

import itertools
import random
import re

from budget_reasoner.domains import Problem
from budget_reasoner.domains.chain import draw_distinct
from budget_reasoner.errors import BudgetReasonerError

NAME = "logic"
VERIFIER = "logic"  # verify/logic.py: the assignment, in any order and either notation, against the reference's
INSTRUCTION = ("Knights always tell the truth and knaves always lie. A capital letter is a knight, a small one a "
               "knave: `A:b` means A says B is a knave; `|` is or, `&` is and. Answer with every islander, e.g. "
               "\\boxed{A,b,C}.")
NAMES = "ABCDEFGH"
_CLUE = re.compile(r"^([A-Z]):([A-Za-z])(?:([|&])([A-Za-z]))?$")


def fact(name: str, knight: bool) -> str:
    """`A` (a knight) or `a` (a knave)."""
    return name.upper() if knight else name.lower()


def format_assignment(types: dict[str, bool]) -> str:
    """`a,B,c`: every islander by name, capital for a knight: the answer's one written form."""
    return ",".join(fact(name, types[name]) for name in sorted(types))


def parse_clue(clue: str) -> tuple[str, list[tuple[str, bool]], str | None]:
    """`X:y` or `X:x|Y` -> (speaker, [(name, knight?), ...], "|" or "&" or None)."""
    match = _CLUE.match(clue)
    if not match:
        raise ValueError(f"not a statement: {clue!r}")
    speaker, first, op, second = match.groups()
    atoms = [(first.upper(), first.isupper())] + ([(second.upper(), second.isupper())] if op else [])
    return speaker, atoms, op


def holds(clue: str, types: dict[str, bool]) -> bool:
    """Whether the statement is consistent with `types` (name -> knight?): a knight's is true, a knave's false."""
    speaker, atoms, op = parse_clue(clue)
    values = [types[name] == knight for name, knight in atoms]
    said = all(values) if op == "&" else any(values)
    return said == types[speaker]


def solutions(clues: list[str]) -> list[dict[str, bool]]:
    """Every assignment of the islanders named in `clues` that they are all consistent with (brute force)."""
    names = sorted({name.upper() for clue in clues for name in re.findall(r"[A-Za-z]", clue)})
    found = []
    for kinds in itertools.product((True, False), repeat=len(names)):
        types = dict(zip(names, kinds))
        if all(holds(clue, types) for clue in clues):
            found.append(types)
    return found


def random_problem(rng: random.Random, num_steps: int) -> Problem:
    """A puzzle of `num_steps` statements over num_steps + 1 islanders, with its worked chain."""
    people = rng.sample(NAMES, num_steps + 1)
    types = {name: rng.random() < 0.5 for name in people}
    speaker, other = people[0], people[1]
    if types[speaker]:  # "I am a knave or Y is ..." settles a knight, and Y as said
        clue = f"{speaker}:{speaker.lower()}|{fact(other, types[other])}"
    else:  # "I am a knave and Y is ..." settles a knave, and Y as not said
        clue = f"{speaker}:{speaker.lower()}&{fact(other, not types[other])}"
    clues = [clue]
    steps = [f"{clue}>{fact(speaker, types[speaker])},{fact(other, types[other])}"]
    for index in range(2, num_steps + 1):
        new = people[index]
        # tied to the one settled last (a chain of ties: each step needs the step before), now and then to another
        known = people[index - 1] if rng.random() < 0.7 else rng.choice(people[:index])
        if rng.random() < 0.5:  # the settled one speaks of the new one: a knight says the truth, a knave not
            clue = f"{known}:{fact(new, types[new] == types[known])}"
        else:  # the new one speaks of the settled one
            clue = f"{new}:{fact(known, types[known] == types[new])}"
        clues.append(clue)
        steps.append(f"{fact(known, types[known])},{clue}>{fact(new, types[new])}")
    found = solutions(clues)
    assert found == [types], (clues, found)  # the construction must leave exactly one solution
    question = " ".join(sorted(clues))  # by speaker, not in the order they resolve
    return Problem(question=question, answer=format_assignment(types), steps=tuple(steps))


def make_problems(count: int, seed: int, min_steps: int, max_steps: int, exclude=frozenset()) -> list[Problem]:
    """`count` distinct puzzles of min_steps..max_steps statements, none whose question is in `exclude`."""
    if max_steps >= len(NAMES):
        raise BudgetReasonerError(f"logic puzzles have at most {len(NAMES) - 1} steps ({len(NAMES)} islanders), "
                                  f"got max_steps {max_steps}")
    return draw_distinct(random_problem, count, seed, min_steps, max_steps, exclude, "logic puzzles")


def _step_parts(line: str) -> tuple[str | None, str, str] | None:
    """A chain line `[FACT,]STATEMENT>FACTS` as (the fact it starts from or None, the statement, what it concludes)."""
    match = re.fullmatch(r"(?:([A-Za-z]),)?([A-Z]:[^,>]+)>([A-Za-z](?:,[A-Za-z])*)", line.strip())
    return match.groups() if match else None


def _facts(text: str) -> dict[str, bool]:
    return {item.upper(): item.isupper() for item in text.split(",") if item}


def single_steps(problems: list[Problem]) -> list[Problem]:
    """Each line of the problems' chains as a one-step puzzle: the fact it starts from (if any) and the
    statement as the question, the islanders it settles as the answer."""
    skills = []
    for problem in problems:
        for line in problem.steps:
            start, clue, concluded = _step_parts(line)
            types = _facts(start or "") | _facts(concluded)
            skills.append(Problem(question=f"{start} {clue}" if start else clue, answer=format_assignment(types),
                                  steps=(line,)))
    return skills


def first_wrong_step(completion: str) -> int | None:
    """Index of the first chain line that does not follow: a statement it misreads, or a fact that contradicts
    what an earlier line settled."""
    settled: dict[str, bool] = {}
    for index, line in enumerate(completion.split("\n")):
        parts = _step_parts(line)
        if parts is None:
            continue
        start, clue, concluded = parts
        try:
            parse_clue(clue)
        except ValueError:
            return index
        start, conclusions = _facts(start or ""), _facts(concluded)
        if any(settled.get(name, knight) != knight for name, knight in (start | conclusions).items()):
            return index
        # the assignments of the line's islanders that the statement and the starting fact allow
        names = sorted({name.upper() for name in re.findall(r"[A-Za-z]", clue)} | set(start))
        allowed = [types for kinds in itertools.product((True, False), repeat=len(names))
                   if holds(clue, types := dict(zip(names, kinds)))
                   and all(types[name] == knight for name, knight in start.items())]
        if not allowed or any(any(types.get(name) != knight for types in allowed) for name, knight in conclusions.items()):
            return index
        settled.update(start | conclusions)
    return None


def rejected_prefix(completion: str) -> str:
    """A rejected chain cut just after its first wrong line (see math.rejected_prefix); kept whole without one."""
    index = first_wrong_step(completion)
    return completion if index is None else "\n".join(completion.split("\n")[: index + 1])
