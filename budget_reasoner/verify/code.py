"""Code: the completion's last fenced Python block, run against the reference's tests in the sandbox.

The reference (a problem's `answer` for the code domain) is Python test code, defined here and nowhere else:

    <setup run before the candidate>     optional; only when the reference holds the CANDIDATE_SLOT line
    # <candidate>                        CANDIDATE_SLOT: where the completion's code goes (default: first)
    <tests run after the candidate>      asserts; the program passes when it runs to its end

MBPP (`mbpp_reference`): the candidate, then `test_setup_code`, then each of `test_list`'s asserts on its own line.
HumanEval (`humaneval_reference`): the task's `prompt` (imports, helper functions, and the signature whose
docstring-only body returns None), the candidate (which redefines the function), the task's `test` (it defines
`check(candidate)`) and `check(ENTRY_POINT)`. So a completion that writes only the function still has the prompt's
imports and helpers, and one that never defines it fails against the stub.

The completion's code is its last fenced block tagged python, py or python3, or untagged (```python ... ```),
so a model may think in prose and earlier drafts before its answer. A completion is correct when the program
(setup, candidate, tests) ran to its end in the sandbox within its limits (`verify/sandbox.py`): an assert that
fails, an exception, a timeout, a memory or output flood, or an exit before the tests are all wrong. A reference
that is not text, is empty, does not parse or asserts nothing is not a pass: `grade` reports it as an error
(`Verdict.error`), as the math grader does for an ungradeable answer, and so does a sandbox that cannot start.

Majority vote over code is by exact normalized text: `ballot` is the block's syntax tree printed back
(`ast.unparse`: comments, blank lines, spacing and quote style do not count), or its whitespace-stripped lines
when it does not parse. Two programs that differ in any other way vote apart even when they behave alike.
"""

from __future__ import annotations

import ast
import re
import textwrap
from functools import lru_cache
from typing import Sequence

from budget_reasoner.verify.math import MAX_COMPLETION_CHARS, Verdict
from budget_reasoner.verify.sandbox import SandboxResult, run_many, run_python

CANDIDATE_SLOT = "# <candidate>"
TIMEOUT_S = 5.0  # per program; MBPP's and HumanEval's tests take milliseconds
MEMORY_MB = 1024
OUTPUT_BYTES = 64 << 10  # the output is not graded, only kept for a look
PYTHON_TAGS = {"", "python", "py", "python3"}
# A fence line opens (```tag) and the next fence line closes; `.*?` stops at the first closer, so one pass.
_FENCE = re.compile(r"^[ \t]*```[ \t]*([A-Za-z0-9_+.-]*)[^\n]*\n(.*?)^[ \t]*```", re.DOTALL | re.MULTILINE)


def mbpp_reference(record: dict) -> str:
    """An MBPP row's tests in the reference format: setup code, then the asserts, one per line."""
    tests = record["test_list"]
    if not isinstance(tests, list) or not all(isinstance(test, str) for test in tests):
        raise TypeError(f"test_list must be a list of strings, got {type(tests).__name__}")
    setup = (record.get("test_setup_code") or "").strip()
    tests = "\n".join(test.strip() for test in tests)
    return f"{setup}\n{tests}\n" if setup else f"{tests}\n"


def humaneval_reference(record: dict) -> str:
    """A HumanEval row's tests in the reference format: prompt, candidate slot, `test`, `check(entry_point)`."""
    return f"{record['prompt'].rstrip()}\n\n{CANDIDATE_SLOT}\n\n{record['test'].strip()}\n\ncheck({record['entry_point']})\n"


def extract_code(completion) -> str | None:
    """The last fenced python (or untagged) block's text, or None: not text, too long, or no such block."""
    if not isinstance(completion, str) or len(completion) > MAX_COMPLETION_CHARS:
        return None
    blocks = [match.group(2) for match in _FENCE.finditer(completion) if match.group(1).lower() in PYTHON_TAGS]
    return textwrap.dedent(blocks[-1]) if blocks else None  # a block indented inside a list item runs too


extract = extract_code


def program(code: str, reference: str) -> str:
    """The program the sandbox runs: the reference with the candidate in its slot (or first)."""
    lines = reference.splitlines()
    if CANDIDATE_SLOT in lines:
        at = lines.index(CANDIDATE_SLOT)
        return "\n".join([*lines[:at], code, *lines[at + 1 :]]) + "\n"
    return f"{code}\n\n{reference}"


@lru_cache(maxsize=1024)  # eval grades k samples against one reference
def _text_problem(reference: str) -> str | None:
    if not reference.strip():
        return "empty reference tests"
    if reference.splitlines().count(CANDIDATE_SLOT) > 1:
        return f"reference tests hold {CANDIDATE_SLOT!r} more than once"
    try:
        tree = ast.parse(reference, "reference")  # parsed only: the reference never runs in this process
    except (SyntaxError, ValueError, RecursionError, MemoryError) as error:
        where = f" (line {error.lineno})" if getattr(error, "lineno", None) else ""
        return f"reference tests are not Python: {type(error).__name__}{where}"
    if not any(isinstance(node, ast.Assert) for node in ast.walk(tree)):
        return "reference tests hold no assert"
    return None


def reference_problem(reference) -> str | None:
    """Why `reference` cannot grade anything, or None when it can."""
    if reference is None:
        return "no reference tests"
    if not isinstance(reference, str):
        return f"reference tests are a {type(reference).__name__}, not text"
    return _text_problem(reference)


def run_tests(completion, reference, timeout_s: float = TIMEOUT_S, memory_mb: int = MEMORY_MB) -> SandboxResult | Verdict:
    """The sandbox's full result for this completion (verdict line, seconds, output), or a Verdict when there was
    nothing to run: a bad reference (with its error), or no code block (wrong)."""
    problem = reference_problem(reference)
    if problem:
        return Verdict(False, problem)
    code = extract_code(completion)
    if code is None:
        return Verdict(False)
    return run_python(program(code, reference), timeout_s, memory_mb, OUTPUT_BYTES)


def _verdict(result: SandboxResult) -> Verdict:
    return Verdict(False, result.verdict) if result.sandbox_error else Verdict(result.passed)


def grade_code(completion, reference, timeout_s: float = TIMEOUT_S) -> Verdict:
    result = run_tests(completion, reference, timeout_s)
    return result if isinstance(result, Verdict) else _verdict(result)


grade = grade_code


def grade_many(completions: Sequence, references: Sequence, timeout_s: float = TIMEOUT_S,
               workers: int | None = None) -> list[Verdict]:
    """`grade` over pairs, the programs run `workers` at a time (default: the CPU count), verdicts in order."""
    if len(completions) != len(references):
        raise ValueError("grade_many needs one reference per completion")
    verdicts: list[Verdict | None] = []
    programs, slots = [], []
    for completion, reference in zip(completions, references):
        problem = reference_problem(reference)
        code = None if problem else extract_code(completion)
        verdicts.append(Verdict(False, problem) if problem else Verdict(False) if code is None else None)
        if code is not None:
            programs.append(program(code, reference))
            slots.append(len(verdicts) - 1)
    for slot, result in zip(slots, run_many(programs, timeout_s, MEMORY_MB, OUTPUT_BYTES, workers)):
        verdicts[slot] = _verdict(result)
    return verdicts


def normalize_code(code: str) -> str:
    try:
        return ast.unparse(ast.parse(code))
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return "\n".join(line.rstrip() for line in code.splitlines() if line.strip())


def ballot(completion) -> str | None:
    """The program this completion votes for (normalized text), or None when it has no code block."""
    code = extract_code(completion)
    return None if code is None else normalize_code(code)


def equivalent(first: str, second: str) -> bool:
    """Exact normalized text (see the module docstring): the vote does not run programs."""
    return first == second
