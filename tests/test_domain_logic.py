"""The logic domain: every puzzle has exactly one solution (an independent brute force is the reference), its chain
is sound line by line, and the verifier agrees with hand-checked verdicts."""

import itertools
import re

from budget_reasoner import verify
from budget_reasoner.domains import get_domain, logic
from budget_reasoner.domains.chain import format_chain


def says(statement: str, knights: dict[str, bool]) -> bool:
    """An independent reading of one statement's content ("Y", "y", "x|Y", "x&y": capital = knight)."""
    parts = re.split(r"([|&])", statement)
    values = [knights[atom.upper()] == atom.isupper() for atom in parts[::2]]
    return all(values) if "&" in parts else any(values)


def brute_force(question: str) -> list[dict[str, bool]]:
    """All assignments under which every knight's statement is true and every knave's false."""
    statements = [clue.split(":") for clue in question.split()]
    names = sorted({c.upper() for c in question if c.isalpha()})
    found = []
    for kinds in itertools.product((True, False), repeat=len(names)):
        knights = dict(zip(names, kinds))
        if all(says(statement, knights) == knights[speaker] for speaker, statement in statements):
            found.append(knights)
    return found


def test_every_puzzle_has_exactly_the_one_solution_it_states():
    for steps in (1, 2, 3, 4):
        for problem in logic.make_problems(150, seed=steps, min_steps=steps, max_steps=steps):
            (solution,) = brute_force(problem.question)  # exactly one
            assert problem.answer == ",".join(n if k else n.lower() for n, k in sorted(solution.items()))
            assert len(problem.question.split()) == len(problem.steps) == steps
            assert len(solution) == steps + 1


def test_chains_settle_one_statement_per_line_each_true():
    for problem in logic.make_problems(200, seed=7, min_steps=2, max_steps=3):
        (solution,) = brute_force(problem.question)
        clues = set(problem.question.split())
        for index, line in enumerate(problem.steps):
            start, rest = (line.split(",", 1) if index else (None, line))
            clue, concluded = rest.split(">")
            assert clue in clues  # a statement of the puzzle
            for fact in ([start] if start else []) + concluded.split(","):
                assert solution[fact.upper()] == fact.isupper()  # every fact it writes is true
        assert logic.first_wrong_step(format_chain(problem.steps, problem.answer)) is None


def test_statements_are_listed_by_speaker_and_splits_never_overlap():
    domain = get_domain("logic")
    train, held_out = domain.splits(500, 100, seed=0, min_steps=2, max_steps=3)
    assert not {row["question"] for row in train} & {row["question"] for row in held_out}
    for row in train[:50]:
        speakers = [clue[0] for clue in row["question"].split()]
        assert speakers == sorted(speakers)
    assert [row["question"] for row in domain.splits(500, 100, 0, 2, 3)[0]] == [row["question"] for row in train]


def test_single_steps_are_one_line_puzzles_with_their_answers():
    problem = logic.Problem("A:C B:b&d C:d", "a,b,c,D", ("B:b&d>b,D", "D,C:d>c", "c,A:C>a"))
    assert [(s.question, s.answer, s.steps) for s in logic.single_steps([problem])] == [
        ("B:b&d", "b,D", ("B:b&d>b,D",)), ("D C:d", "c,D", ("D,C:d>c",)), ("c A:C", "a,c", ("c,A:C>a",))]


def test_the_step_checker_cuts_after_the_first_wrong_line():
    good = "<think>\nB:b&d>b,D\nD,C:d>c\nc,A:C>a\n</think>\n\\boxed{a,b,c,D}"
    assert logic.first_wrong_step(good) is None
    misread = good.replace("D,C:d>c", "D,C:d>C")  # a knight C would say the truth: D is a knight, not a knave
    assert logic.first_wrong_step(misread) == 2
    assert logic.rejected_prefix(misread) == "<think>\nB:b&d>b,D\nD,C:d>C"
    contradicts = good.replace("D,C:d>c", "d,C:d>C")  # starts from a fact the line before settled the other way
    assert logic.first_wrong_step(contradicts) == 2
    assert logic.first_wrong_step(good.replace("B:b&d>b,D", "B:b&d>B,D")) == 1  # "I am a knave and ..." from a knight


def test_the_verifier_by_hand():
    reference = "a,b,c,D"
    right = ["\\boxed{a,b,c,D}", "\\boxed{D, c, b, a}", "\\boxed{A=knave, B=knave, C=knave, D=knight}",
             "\\boxed{a=n;b=n;c=n;d=k}", "<think>\nB:b&d>b,D\n</think>\n\\boxed{a b c D}"]
    wrong = ["\\boxed{a,b,c,d}", "\\boxed{a,b,D}", "\\boxed{a,b,c,D,E}", "\\boxed{a,A,b,c,D}", "\\boxed{a,b,c,D} \\boxed{a,b,C,D}",
             "a,b,c,D", "\\boxed{a,b,c,D=maybe}", "\\boxed{}", ""]
    assert all(verify.check("logic", text, reference) for text in right)
    assert not any(verify.check("logic", text, reference) for text in wrong)
    assert verify.extract("logic", right[2]) == "a,b,c,D"
    assert verify.equivalent("logic", "D,a,b,c", "A=n,B=n,C=n,D=k")
    assert verify.grade("logic", "\\boxed{a}", "nobody").error is not None
