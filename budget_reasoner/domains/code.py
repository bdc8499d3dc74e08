"""The code domain: write a Python function that passes unit tests, graded by running it in the sandbox.

Problems come from a file (`--problems FILE`), in one of three layouts, told apart by the first record's fields:
- MBPP's (`text`, `test_list`, optional `test_setup_code`): MBPP's own train split, or your tasks written like it;
- HumanEval's (`prompt`, `test`, `entry_point`; JSONL or the published .jsonl.gz);
- the problems contract (`question`, `answer`; .jsonl, .csv or .parquet, names mappable with --columns), whose
  answer is reference test code in verify/code.py's format (asserts run after the candidate).
Every answer must be test code that can grade something (it parses and asserts): a row whose tests cannot is one
line naming the file and the problem, before any teacher is asked. The held-out split is a seeded shuffle of the
file (domains.Domain), and no training problem may share a 13-gram with it or with MBPP's and HumanEval's test
problems (DECONTAMINATE, beside the preset's generate.decontaminate).

The prompt is the question, then this domain's instruction. The question is the task's own text: MBPP's task and
its asserts, which name the function and show its calls (the MBPP paper's prompt), or HumanEval's signature and
docstring to complete (problems.py). The instruction asks for the chain format's thinking and one fenced python
block; it takes the place of the preset's (OWN_INSTRUCTION), which asks math's `\\boxed{}` answer:

    <think>
    ...
    </think>
    ```python
    def remove_Occ(s, ch):
        ...
    ```

Grading (verify/code.py): the completion's last python block runs with the reference's tests in the sandbox
(verify/sandbox.py: its own process, time, memory and output limits, no network, a throwaway directory); the
program passing to its end is correct. Majority vote counts programs by their normalized text (the syntax tree
printed back), so pass@k, maj@k and best-of-k come out of eval as for math. There is no step checker: a chain's
steps are prose and code, not checkable lines, so a DPO pair's rejected chain is kept whole.

No offline world: a model trained from scratch on a CPU in minutes cannot write Python, and a toy language in
its place would measure nothing about writing code. `quickstart --domain code` on cpu-tiny says so in one line
and shows the command for real models (NO_OFFLINE_WORLD).
"""

from __future__ import annotations

import json
from pathlib import Path

from budget_reasoner.domains.chain import THINK_CLOSE, THINK_OPEN
from budget_reasoner.errors import BudgetReasonerError

NAME = "code"
VERIFIER = "code"  # verify/code.py: the last ```python block run against the reference's tests in the sandbox
INSTRUCTION = (f"Think step by step between {THINK_OPEN} and {THINK_CLOSE}. Then answer with the complete Python code "
               f"in one ```python block: the whole function, its def line and any imports included, so that it "
               f"passes the tests or examples above.")
OWN_INSTRUCTION = True  # in place of the preset's generate.instruction (math's \boxed{} answer), not before it
DECONTAMINATE = ("mbpp", "humaneval")  # the code benchmarks eval reports (bundled samples; NAME=HUB_ID for all)
EXAMPLE_COMMAND = ("budget-reasoner quickstart --domain code --problems mbpp_train.jsonl --preset 24gb "
                   "--set model.student=Qwen/Qwen2.5-Coder-1.5B-Instruct --set model.teacher=Qwen/Qwen2.5-Coder-7B-Instruct "
                   "--set 'eval.benchmarks=[mbpp,humaneval]'")
NO_OFFLINE_WORLD = ("the code domain needs a real student and teacher (the tiny models trained from scratch here cannot "
                    f"write Python), e.g. {EXAMPLE_COMMAND}")


def read_problems(path: Path, columns: dict[str, str]) -> list[dict]:
    """an MBPP- or HumanEval-format JSONL (e.g. MBPP's train split), or question/answer rows whose answer is test code

    As problem rows (`id, domain, question, answer, source`): MBPP's and HumanEval's through their loaders
    (problems.load_mbpp, load_humaneval: the answer is the reference tests), the contract's as they are."""
    from budget_reasoner.problems import PROBLEM_COLUMNS, load_humaneval, load_mbpp, load_problem_file
    from budget_reasoner.verify.code import reference_problem

    path = Path(path)
    layout = "problems" if columns else _layout(path)
    if layout == "mbpp":
        rows = load_mbpp(path)
    elif layout == "humaneval":
        rows = load_humaneval(path)
    else:
        rows = load_problem_file(path, columns, NAME)
    for number, row in enumerate(rows, 1):
        if problem := reference_problem(row["answer"]):
            raise BudgetReasonerError(f"{path}: problem {number} (id {row['id']}): its answer must be reference test "
                                      f"code (asserts, see budget_reasoner/verify/code.py), but: {problem}")
    return [{key: row[key] for key in PROBLEM_COLUMNS} | {"domain": NAME} for row in rows]


def _layout(path: Path) -> str:
    """"mbpp" or "humaneval" when the file's first record has that set's fields, else "problems" (question/answer)."""
    if not path.name.lower().endswith((".jsonl", ".jsonl.gz")):
        return "problems"
    import gzip

    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rt", encoding="utf-8") as handle:
            first = next((line for line in handle if line.strip()), "")
        record = json.loads(first) if first else {}
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return "problems"  # the problems-file reader says what is wrong with it, naming the line
    if not isinstance(record, dict):
        return "problems"
    if "test_list" in record:
        return "mbpp"
    if "entry_point" in record or {"prompt", "test"} <= record.keys():
        return "humaneval"
    return "problems"
