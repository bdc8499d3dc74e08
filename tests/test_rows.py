"""Input rows are checked where they are read (issue 11.4): a column of the wrong type, text UTF-8 cannot encode
or a prompt too long for the model is one line naming the file and line (or a count), before any model loads,
and nothing is written."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from budget_reasoner.errors import BudgetReasonerError
from budget_reasoner.io import read_jsonl
from tests.conftest import TINY, TINY_ARGS, invoke, one_error_line

ROOT = Path(__file__).resolve().parents[1]
OVERRIDES = TINY_ARGS




@pytest.fixture
def no_model_loads(monkeypatch):
    """Fail the test if any model's weights load: bad rows must be refused before that."""
    from budget_reasoner import models
    from budget_reasoner.eval import run as eval_run
    from budget_reasoner.train import common

    def refuse(*args, **kwargs):
        raise AssertionError("a model loaded before the rows were checked")

    for module in (models, eval_run, common):
        monkeypatch.setattr(module, "load_model", refuse)


USER = [{"role": "user", "content": "1+2"}]
SFT_ROWS = {
    "completion is a string": ({"prompt": USER, "completion": "<think>1+2=3</think> \\boxed{3}"},
                               "column 'completion' must be a non-empty list of chat messages"),
    "content is null": ({"prompt": USER, "completion": [{"role": "assistant", "content": None}]},
                        "column 'completion' message 0 content must be a string, got null"),
    "prompt content is a lone surrogate": ({"prompt": [{"role": "user", "content": "1+\ud800"}],
                                            "completion": [{"role": "assistant", "content": "3"}]},
                                           "column 'prompt' message 0 content holds text UTF-8 cannot encode"),
}


@pytest.mark.parametrize("case", SFT_ROWS)
def test_bad_sft_rows_are_one_line_with_file_and_line(tiny_run, tmp_path, no_model_loads, case):
    out, _, _ = tiny_run
    row, message = SFT_ROWS[case]
    data = tmp_path / "sft.jsonl"
    good = json.loads((out / "data" / "sft" / "train.jsonl").read_text().splitlines()[0])
    data.write_text(json.dumps(good) + "\n" + json.dumps(row) + "\n")  # json.dumps escapes the surrogate as \ud800
    line = one_error_line(invoke("sft", "--data", data, "--student", out / "models" / "student-base",
                                 "--out", tmp_path / "sft", *OVERRIDES))
    assert line.startswith(f"error: {data}: line 2: {message}"), line
    assert not (tmp_path / "sft").exists()  # nothing claimed, nothing written


QUESTIONS = {"null": (None, "must be a string, got null"), "a number": (12, "must be a string, got a number"),
             "a lone surrogate": ("what is 1+\udc80?", "holds text UTF-8 cannot encode ('\\udc80' at character 10")}


@pytest.mark.parametrize("case", QUESTIONS)
def test_a_question_that_is_not_text_is_one_line_before_the_model_loads(tiny_run, tmp_path, no_model_loads, case):
    out, _, _ = tiny_run
    question, message = QUESTIONS[case]
    problems = tmp_path / "problems.jsonl"
    rows = [{"id": "a", "domain": "math", "question": "1+2", "answer": "3", "source": "test"},
            {"id": "b", "domain": "math", "question": question, "answer": "3", "source": "test"}]
    problems.write_text("".join(json.dumps(row) + "\n" for row in rows))
    line = one_error_line(invoke("eval", "--model", out / "sft", "--problems", problems, "--out", tmp_path / "ev", *OVERRIDES))
    assert line == f"error: {problems}: line 2: column 'question' {message}" + \
        ("" if case != "a lone surrogate" else ", surrogates not allowed); fix or drop the row"), line
    assert not (tmp_path / "ev").exists()


def test_bytes_that_are_not_utf8_name_file_and_line(tmp_path):
    path = tmp_path / "problems.jsonl"
    path.write_bytes(b'{"question": "ok"}\n{"question": "caf\xe9"}\n')  # Latin-1, not UTF-8
    with pytest.raises(BudgetReasonerError, match=r"problems.jsonl: line 2: column 'question' holds text UTF-8 cannot"):
        read_jsonl(path, kinds={"question": "text"})


def test_pairs_whose_chosen_is_not_messages_are_refused(tiny_run, tmp_path, no_model_loads):
    out, _, _ = tiny_run
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps({"prompt": USER, "chosen": "3", "rejected": [{"role": "assistant", "content": "4"}]}) + "\n")
    line = one_error_line(invoke("dpo", "--pairs", pairs, "--sft", out / "sft", "--out", tmp_path / "dpo", *OVERRIDES))
    assert f"{pairs}: line 1: column 'chosen' must be a non-empty list of chat messages" in line
    assert not (tmp_path / "dpo").exists()


def test_sft_prompts_longer_than_max_length_are_refused_with_a_count(tiny_run, tmp_path, no_model_loads):
    out, _, _ = tiny_run
    rows = [json.loads(line) for line in (out / "data" / "sft" / "train.jsonl").read_text().splitlines()]
    rows[3]["prompt"] = [{"role": "user", "content": "1+" * 400 + "1"}]
    data = tmp_path / "sft.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    line = one_error_line(invoke("sft", "--data", data, "--student", out / "models" / "student-base",
                                 "--out", tmp_path / "sft", *OVERRIDES))
    assert f"{data}: 1 of {len(rows)} prompts are at least model.max_length (" in line and "example 4" in line, line
    assert not (tmp_path / "sft").exists()


PEAK = """
import json, resource, sys
from budget_reasoner.config import load_preset
from budget_reasoner.eval.run import evaluate
preset = load_preset("cpu-tiny", json.loads(sys.argv[1]))
summary = evaluate(sys.argv[2], sys.argv[3], sys.argv[4], preset)
print(json.dumps({"peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "cut": summary.get("questions_cut"),
                  "problems": summary["problems"]}))
"""


def test_a_100kb_question_is_cut_to_the_models_context_and_memory_stays_bounded(tiny_run, tmp_path):
    """Was: 100,001 tokens through a model of 144 positions, past 6 GiB of RAM in 22 s. Now the question is cut
    (counted) before the model loads, and the process's peak RSS stays that of an ordinary eval."""
    out, _, _ = tiny_run
    problems = tmp_path / "problems.jsonl"
    rows = [{"id": "long", "domain": "math", "question": "1+" * 50_000 + "1", "answer": "50001", "source": "test"},
            {"id": "short", "domain": "math", "question": "1+2", "answer": "3", "source": "test"}]
    problems.write_text("".join(json.dumps(row) + "\n" for row in rows))
    assert len(problems.read_bytes()) > 100_000
    ordinary = tmp_path / "ordinary.jsonl"
    ordinary.write_text(json.dumps(rows[1]) + "\n")

    def peak_of(problems_file, folder):  # an eval in a fresh process: its peak RSS, what it cut, how many it answered
        result = subprocess.run([sys.executable, "-c", PEAK, json.dumps(TINY), str(out / "sft"), str(problems_file),
                                 str(tmp_path / folder)], cwd=ROOT, capture_output=True, text=True, timeout=300,
                                env={"BUDGET_REASONER_QUIET": "1", "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})
        assert result.returncode == 0, result.stderr[-2000:]
        return json.loads(result.stdout.strip().splitlines()[-1])

    measured, baseline = peak_of(problems, "ev"), peak_of(ordinary, "ev-ordinary")
    print(f"eval peak RSS with a 100 KB question: {measured['peak'] / 2**20:.0f} MiB "
          f"(an ordinary question: {baseline['peak'] / 2**20:.0f} MiB)")
    assert measured["cut"] == 1 and measured["problems"] == 2
    # bounded by the model's context: what an ordinary eval takes in the same environment, not the question's length
    assert measured["peak"] < baseline["peak"] + 256 * 2**20  # was > 6 GiB and growing
