"""The choice domain: GPQA-style multiple choice (the seed's other named benchmark), four options, one right.

Problems come from a CSV in GPQA's column layout (`Question`, `Correct Answer`, `Incorrect Answer 1..3`), read by
problems.load_multiple_choice: each problem's options are shuffled with a seed made of the problem's own text,
so its order is the same in generate and eval and the correct letter is uniform over A-D; the question lists
them as `A) ...` lines and asks for one letter in \\boxed{}. The verifier (verify/choice.py) grades that letter;
a completion that boxes two different letters is hedging and neither counts nor votes, and majority vote counts
letters (the same letter in either case is one answer). There is no step checker: a chain's steps are prose,
and a DPO pair's rejected chain is kept whole.

Nothing ships: GPQA is gated by its authors (they ask that its questions stay off the open web), so bring its
CSV: `--domain choice --problems gpqa_diamond.csv`. Or keep another domain's run and list `choice=PATH.csv`
in eval.benchmarks: every stage is then graded on it too, in the report beside the run's own held-out set.
"""

from __future__ import annotations

from pathlib import Path

from budget_reasoner.errors import BudgetReasonerError

NAME = "choice"
VERIFIER = "choice"  # verify/choice.py: the boxed letter (or "answer is (X)") against the reference letter
NO_OFFLINE_WORLD = ("its questions are graduate-level science in English, which the tiny models trained from scratch "
                    "here cannot read, and a toy stand-in would measure nothing about the domain; use a preset with a "
                    "real model (e.g. --preset 24gb) and --problems FILE.csv in GPQA's layout")


def read_problems(path: Path, columns: dict[str, str]) -> list[dict]:
    """a CSV in GPQA's layout: Question, Correct Answer, Incorrect Answer 1-3

    As problem rows (problems.load_multiple_choice: options shuffled per problem, answer a letter A-D)."""
    from budget_reasoner.problems import load_multiple_choice

    if columns:
        raise BudgetReasonerError(f"--columns {','.join(f'{k}={v}' for k, v in columns.items())}: the choice domain "
                                  f"reads GPQA's own column names (Question, Correct Answer, Incorrect Answer 1-3); "
                                  f"rename your file's columns, or for questions that already list lettered options "
                                  f"use your file with --verifier choice")
    if Path(path).suffix.lower() != ".csv":
        raise BudgetReasonerError(f"{path}: the choice domain reads a CSV in GPQA's layout (Question, Correct Answer, "
                                  f"Incorrect Answer 1-3); for a file whose questions already list lettered options, "
                                  f"use --verifier choice instead of --domain choice")
    return load_multiple_choice(path)
