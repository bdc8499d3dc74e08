"""The code verifier on the real MBPP and HumanEval samples under data/: each task's canonical solution (from the
files, the independent reference) passes its own tests, a stub that returns None fails them, and a completion that
exits before the tests is never a pass. Also: block extraction, bad references, the vote's ballots, the loaders,
and eval grading canned completions with pass@k and maj@k."""

import gzip
import json
import re
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from budget_reasoner import verify
from budget_reasoner.errors import BudgetReasonerError
from budget_reasoner.problems import PROBLEM_COLUMNS, load_humaneval, load_mbpp
from budget_reasoner.verify.code import (CANDIDATE_SLOT, extract_code, grade_many, humaneval_reference, mbpp_reference,
                                         program)

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the sandbox's layers are Linux's")
DATA = Path(__file__).resolve().parents[1] / "data"
MBPP = [json.loads(line) for line in (DATA / "mbpp" / "sample.jsonl").read_text().splitlines()]
HUMANEVAL = [json.loads(line) for line in (DATA / "humaneval" / "sample.jsonl").read_text().splitlines()]


def fenced(code: str, tag: str = "python") -> str:
    return f"Let me think about it.\n\n```{tag}\n{code}\n```\n"


def mbpp_function(record: dict) -> str:
    """The function MBPP's first assert calls (its name is nowhere else in a record)."""
    return re.search(r"assert\s*\(?\s*(?:set\(|math\.isclose\()?\s*(\w+)\(", record["test_list"][0]).group(1)


def test_the_last_python_block_is_the_answer():
    completion = ("```python\ndef f():\n    return 1\n```\nno, better:\n```text\nnot code\n```\n"
                  "```py\ndef f():\n    return 2\n```\nand an unclosed one\n```python\ndef f(): return 3\n")
    assert extract_code(completion) == "def f():\n    return 2\n"
    assert extract_code("```\nx = 1\n```") == "x = 1\n"  # untagged
    assert extract_code("1. the code:\n   ```python\n   x = 1\n   y = 2\n   ```\n") == "x = 1\ny = 2\n"  # dedented
    assert extract_code("no code here") is None and extract_code(None) is None
    assert extract_code("```bash\nrm -rf /\n```") is None


def test_check_runs_the_block_against_asserts():
    assert verify.check("code", fenced("def add(a, b):\n    return a + b"), "assert add(2, 3) == 5\n")
    assert not verify.check("code", fenced("def add(a, b):\n    return a - b"), "assert add(2, 3) == 5\n")
    assert not verify.check("code", "def add(a, b): return a + b", "assert add(2, 3) == 5\n")  # no fenced block
    assert verify.extract("code", fenced("x = 1")) == "x = 1\n"


@pytest.mark.parametrize("reference, error", [
    (None, "no reference tests"), (5, "reference tests are a int, not text"), ("", "empty reference tests"),
    ("   \n", "empty reference tests"), ("assert f(1) ==", "reference tests are not Python: SyntaxError (line 1)"),
    ("x = 1\nprint(x)\n", "reference tests hold no assert"),
    (f"{CANDIDATE_SLOT}\nassert 1\n{CANDIDATE_SLOT}\n", f"reference tests hold {CANDIDATE_SLOT!r} more than once"),
])
def test_a_reference_that_cannot_grade_is_an_error_not_a_pass(reference, error):
    verdict = verify.grade("code", fenced("def f(x):\n    return x"), reference)
    assert (verdict.correct, verdict.error) == (False, error)


def test_the_candidate_goes_into_the_references_slot():
    reference = f"import math\n{CANDIDATE_SLOT}\nassert f(4) == 2\n"
    assert program("def f(x):\n    return math.isqrt(x)", reference) == \
        "import math\ndef f(x):\n    return math.isqrt(x)\nassert f(4) == 2\n"
    assert verify.check("code", fenced("def f(x):\n    return math.isqrt(x)"), reference)


def test_canonical_mbpp_solutions_pass_and_stubs_fail():
    references = [mbpp_reference(record) for record in MBPP]
    right = grade_many([fenced(record["code"]) for record in MBPP], references)
    assert [v.correct for v in right] == [True] * len(MBPP)
    stubs = [fenced(f"def {mbpp_function(record)}(*args, **kwargs):\n    return None") for record in MBPP]
    assert [v.correct for v in grade_many(stubs, references)] == [False] * len(MBPP)
    assert all(v.error is None for v in right)


def test_canonical_humaneval_solutions_pass_and_stubs_fail():
    references = [humaneval_reference(record) for record in HUMANEVAL]
    whole = [fenced(record["prompt"] + record["canonical_solution"]) for record in HUMANEVAL]
    assert [v.correct for v in grade_many(whole, references)] == [True] * len(HUMANEVAL)
    stubs = [fenced(f"def {record['entry_point']}(*args, **kwargs):\n    return None") for record in HUMANEVAL]
    assert [v.correct for v in grade_many(stubs, references)] == [False] * len(HUMANEVAL)
    # the prompt's own stub (a docstring, so None) fails when a completion never defines the function
    assert not verify.check("code", fenced("print('hello')"), references[0])


def test_exiting_before_the_tests_is_never_a_pass():
    record = MBPP[0]
    for exit_call in ("import os\nos._exit(0)", "import sys\nsys.exit(0)"):
        completion = fenced(f"{record['code']}\n{exit_call}")
        assert not verify.check("code", completion, mbpp_reference(record))
    wrong = fenced(f"def {mbpp_function(record)}(*a):\n    return None\nimport os\nos._exit(0)")
    assert not verify.check("code", wrong, mbpp_reference(record))


def test_attacks_inside_a_completion_are_wrong_answers_not_crashes():
    attacks = ["while True:\n    pass", "import os\nwhile True:\n    os.fork()", "x = bytearray(10 * 2**30)",
               "print('z' * 100_000_000)", "import socket\nsocket.create_connection(('1.1.1.1', 80))"]
    verdicts = grade_many([fenced(f"{attack}\ndef f():\n    return 1") for attack in attacks],
                          ["assert f() == 1\n"] * len(attacks), timeout_s=2)
    assert [(v.correct, v.error) for v in verdicts] == [(False, None)] * len(attacks)
    assert verify.check("code", fenced("def f():\n    return 1"), "assert f() == 1\n")  # the same, without them


def test_the_vote_is_by_normalized_program_text():
    one = fenced("def f(x):\n    # add one\n    return x+1\n\n")
    same = fenced("def f(x):\n    return (x + 1)")
    other = fenced("def f(x):\n    return 1 + x")
    assert verify.ballot("code", one) == verify.ballot("code", same) == "def f(x):\n    return x + 1"
    assert not verify.equivalent("code", verify.ballot("code", one), verify.ballot("code", other))
    assert verify.ballot("code", "no block") is None
    assert verify.ballot("code", fenced("def f(:\n  pass  ")) == "def f(:\n  pass"  # not Python: whitespace only


def test_the_loaders_read_the_shipped_samples():
    mbpp, humaneval = load_mbpp(), load_humaneval()
    assert (len(mbpp), len(humaneval)) == (30, 40)
    for rows, records in ((mbpp, MBPP), (humaneval, HUMANEVAL)):
        assert all(set(PROBLEM_COLUMNS) <= set(row) and row["domain"] == "code" for row in rows)
        assert len({row["id"] for row in rows}) == len(rows)
    assert mbpp[0]["answer"] == mbpp_reference(MBPP[0]) and MBPP[0]["text"] in mbpp[0]["question"]
    assert all(test in mbpp[0]["question"] for test in MBPP[0]["test_list"])  # the tests name the function
    assert humaneval[0]["answer"] == humaneval_reference(HUMANEVAL[0])
    assert HUMANEVAL[0]["prompt"].rstrip() in humaneval[0]["question"]
    # the loaders' own solution column is the canonical code, and it passes
    assert verify.check("code", fenced(humaneval[5]["solution"]), humaneval[5]["answer"])
    assert verify.check("code", fenced(mbpp[5]["solution"]), mbpp[5]["answer"])


def test_the_published_gz_file_reads_like_the_jsonl(tmp_path):
    packed = tmp_path / "HumanEval.jsonl.gz"
    packed.write_bytes(gzip.compress((DATA / "humaneval" / "sample.jsonl").read_bytes()))
    assert [row["answer"] for row in load_humaneval(packed)] == [row["answer"] for row in load_humaneval()]


def test_malformed_code_files_name_the_file_and_row(tmp_path):
    missing = tmp_path / "mbpp.jsonl"
    missing.write_text(json.dumps({"text": "t", "code": "c"}) + "\n")
    with pytest.raises(BudgetReasonerError, match=r"mbpp.jsonl: line 1: missing column\(s\) test_list"):
        load_mbpp(missing)
    wrong = tmp_path / "wrong.jsonl"
    wrong.write_text(json.dumps(MBPP[0]) + "\n" + json.dumps({**MBPP[1], "test_list": "assert f() == 1"}) + "\n")
    with pytest.raises(BudgetReasonerError, match=r"wrong.jsonl: row 2: not a mbpp record .*test_list must be a list"):
        load_mbpp(wrong)
    with pytest.raises(BudgetReasonerError, match=r"humaneval.jsonl: line 1: missing column\(s\) test, entry_point"):
        (tmp_path / "humaneval.jsonl").write_text(json.dumps({"prompt": "def f():\n"}) + "\n")
        load_humaneval(tmp_path / "humaneval.jsonl")


def test_eval_grades_canned_code_completions_with_pass_at_k(tmp_path, monkeypatch, tiny_preset):
    """eval's whole grading path, no model: generation replaced by canned completions, k = 4 samples per problem."""
    from budget_reasoner.eval import run
    from budget_reasoner.io import write_jsonl

    rows = load_mbpp()[:3] + load_humaneval()[:2]
    problems = tmp_path / "problems.jsonl"
    write_jsonl(problems, [{key: row[key] for key in PROBLEM_COLUMNS} for row in rows])
    right = [fenced(row["solution"]) for row in rows]
    wrong = [fenced(f"def {mbpp_function(record)}(*a):\n    return None") for record in MBPP[:3]] + \
            [fenced(f"def {record['entry_point']}(*a):\n    return None") for record in HUMANEVAL[:2]]
    # problem i: greedy right for i even; samples right: 4, 2, 1, 0, 0 of 4 (the majority is right for the first two)
    counts = [4, 2, 1, 0, 0]
    canned = {row["question"]: (right[i] if i % 2 == 0 else wrong[i],
                                [right[i]] * counts[i] + [wrong[i]] * (4 - counts[i])) for i, row in enumerate(rows)}

    def answers(model, tokenizer, prompts, texts, preset, label, seed):
        picked = [canned[_question(prompt)] for prompt in prompts]
        samples = [[SimpleNamespace(text=text, tokens=7, mean_logprob=-float(j)) for j, text in enumerate(drawn)]
                   for _, drawn in picked]
        return [first for first, _ in picked], [5] * len(picked), samples

    def _question(prompt):
        content = prompt[-1]["content"]
        return next(question for question in canned if question in content)

    monkeypatch.setattr(run, "_generate_answers", answers)
    monkeypatch.setattr(run, "fit_questions", lambda model, problems, source, preset: [p["question"] for p in problems])
    monkeypatch.setattr(run, "prompt_texts", lambda tokenizer, prompts: ["" for _ in prompts])
    tiny_preset.eval.maj_k = 4
    summary = run.evaluate("canned", problems, tmp_path / "ev", tiny_preset, domain="code", load=lambda: (None, None))
    assert summary["accuracy"] == pytest.approx(3 / 5)  # greedy right on problems 0, 2, 4
    # pass@1 = mean of c/k; pass@4 = share with any right sample; maj@4: 4/4 and 2/2-tie (right first) win
    assert summary["pass@1"] == pytest.approx((4 + 2 + 1 + 0 + 0) / 20)
    assert summary["pass@4"] == pytest.approx(3 / 5)
    assert summary["maj@4"] == pytest.approx(2 / 5)
    results = [json.loads(line) for line in (tmp_path / "ev" / "results.jsonl").read_text().splitlines()]
    assert [r["samples_correct"].count(True) for r in results] == counts
    assert summary["reference_errors"] == 0


def test_eval_benchmark_mbpp_grades_with_the_code_verifier(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from budget_reasoner.cli import app
    from budget_reasoner.eval import run

    seen = {}

    def evaluate(model, problems, out, settings, domain, overwrite=False):
        seen["domain"] = getattr(domain, "verifier", domain)
        seen["rows"] = [json.loads(line) for line in Path(problems).read_text().splitlines()]
        (Path(out) / "summary.md").write_text("graded\n")

    monkeypatch.setattr(run, "evaluate", evaluate)
    for name, count in (("mbpp", 30), ("humaneval", 40)):
        result = CliRunner().invoke(app, ["eval", "--model", "unused", "--benchmark", name, "--preset", "cpu-tiny",
                                          "--out", str(tmp_path / name)])
        assert result.exit_code == 0, result.output
        assert seen["domain"] == "code" and len(seen["rows"]) == count
        assert all(row["domain"] == "code" for row in seen["rows"])
