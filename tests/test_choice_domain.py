"""The choice domain (GPQA-style multiple choice): its loader, the per-problem option shuffle, its verifier and
majority vote through the domain, eval of canned completions, and its refusal of the offline world.

GPQA itself is gated (its authors ask that its questions stay off the open web), so nothing ships under data/:
each test writes its own small CSV in GPQA's column layout, with GPQA's other columns beside the five read."""

import csv
import json
import re
from collections import Counter
from itertools import permutations
from types import SimpleNamespace

import pytest

from budget_reasoner.domains import ProblemFile, get_domain
from budget_reasoner.errors import BudgetReasonerError
from budget_reasoner.problems import (CHOICE_ASK, GPQA_COLUMNS, benchmark_domain, load_benchmark, load_multiple_choice,
                                      parse_problem_source)
from budget_reasoner.verify import ballot, check, equivalent
from tests.conftest import TINY_ARGS, invoke, one_error_line

HEADER = ["Pre-Revision Question", *GPQA_COLUMNS, "Explanation", "Record ID", "High-level domain"]  # as GPQA's CSV


def write_gpqa(path, problems, header=HEADER):
    """`problems`: (question, correct, wrong1, wrong2, wrong3) tuples, written in GPQA's layout."""
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        for index, (question, *options) in enumerate(problems):
            record = {"Pre-Revision Question": question, "Question": question, "Explanation": "because",
                      "Record ID": f"rec{index}", "High-level domain": "Physics",
                      **dict(zip(GPQA_COLUMNS[1:], options))}
            writer.writerow([record.get(name, "") for name in header])
    return path


def synthetic(count, start=0):
    return [(f"Which option is right for problem {i}?", f"right {i}", f"wrong one {i}", f"wrong two {i}",
             f"wrong three {i}") for i in range(start, start + count)]


def choice_domain():
    """The built-in choice domain as eval and grpo load it: to grade, or to read a file it is given."""
    return get_domain("choice", grading_only=True)


def options_of(question: str) -> dict[str, str]:
    """The question's `X) text` lines, by letter."""
    return dict(re.findall(r"^([A-D])\) (.*)$", question, flags=re.MULTILINE))


# ---------------------------------------------------------------------------------------------------- the loader

def test_the_question_lists_four_options_and_asks_for_a_boxed_letter(tmp_path):
    path = write_gpqa(tmp_path / "gpqa.csv", [("What is 2+2?", "4", "3", "5", "22")])
    [row] = choice_domain().read_problem_file(path)
    assert set(row) >= {"id", "domain", "question", "answer", "source"} and row["domain"] == "choice"
    assert row["id"] == "choice-rec0"  # GPQA's Record ID
    assert row["question"].startswith("What is 2+2?\n\n") and row["question"].endswith(CHOICE_ASK)
    assert "\\boxed{}" in CHOICE_ASK
    options = options_of(row["question"])
    assert sorted(options) == ["A", "B", "C", "D"] and sorted(options.values()) == ["22", "3", "4", "5"]
    assert options[row["answer"]] == "4"


@pytest.mark.parametrize("content, message", [
    # (the CSV's text, the one line it gives: file and row named)
    ("Question,Correct Answer\nq,a\n", r"bad\.csv: missing column\(s\) Incorrect Answer 1, Incorrect Answer 2, "
                                       r"Incorrect Answer 3 of GPQA's layout"),
    ("Question,Correct Answer,Incorrect Answer 1,Incorrect Answer 2,Incorrect Answer 3\n"
     "q1,a,b,c,d\n,a,b,c,d\n", r"bad\.csv: row 2: Question is empty"),
    ("Question,Correct Answer,Incorrect Answer 1,Incorrect Answer 2,Incorrect Answer 3\n"
     "q1,a,b,c,d\nq2,a,b,  ,d\n", r"bad\.csv: row 2: Incorrect Answer 2 is empty"),
    ("Question,Correct Answer,Incorrect Answer 1,Incorrect Answer 2,Incorrect Answer 3\n"
     "q1,a,b,c,d\nq2,a,b,c,d\nq3,a,b\n", r"bad\.csv: row 3: Incorrect Answer 2 is empty"),  # a short row
    ("Question,Correct Answer,Incorrect Answer 1,Incorrect Answer 2,Incorrect Answer 3\n"
     "q1,a,b,a,d\n", r"bad\.csv: row 1: the correct answer is also listed as Incorrect Answer 2"),
    ("Question,Correct Answer,Incorrect Answer 1,Incorrect Answer 2,Incorrect Answer 3\n",
     r"bad\.csv: no problems in it"),
])
def test_bad_files_and_rows_are_one_line_naming_file_and_row(tmp_path, content, message):
    path = tmp_path / "bad.csv"
    path.write_text(content)
    with pytest.raises(BudgetReasonerError, match=message) as error:
        choice_domain().read_problem_file(path)
    assert "\n" not in str(error.value)


def test_undecodable_and_missing_files_and_other_layouts_are_one_line(tmp_path):
    path = tmp_path / "latin1.csv"
    path.write_bytes("Question,Correct Answer,Incorrect Answer 1,Incorrect Answer 2,Incorrect Answer 3\n"
                     "caf\xe9,a,b,c,d\n".encode("latin-1"))
    with pytest.raises(BudgetReasonerError, match=r"latin1\.csv: not a readable UTF-8 CSV"):
        load_multiple_choice(path)
    with pytest.raises(BudgetReasonerError, match=r"nowhere\.csv: file not found"):
        load_multiple_choice(tmp_path / "nowhere.csv")
    jsonl = tmp_path / "lettered.jsonl"
    jsonl.write_text(json.dumps({"question": "q\nA) x\nB) y", "answer": "A"}) + "\n")
    with pytest.raises(BudgetReasonerError, match=r"lettered\.jsonl: the choice domain reads a CSV in GPQA's layout.*"
                                                  r"--verifier choice"):
        choice_domain().read_problem_file(jsonl)
    good = write_gpqa(tmp_path / "gpqa.csv", synthetic(3))
    with pytest.raises(BudgetReasonerError, match="--columns question=Q: the choice domain reads GPQA's own column"):
        choice_domain().read_problem_file(good, {"question": "Q"})


def test_the_cli_says_a_bad_row_in_one_line(tmp_path):
    path = tmp_path / "bad.csv"
    path.write_text("Question,Correct Answer,Incorrect Answer 1,Incorrect Answer 2,Incorrect Answer 3\nq1,a,b,c,\n")
    # the file is read before any model loads: no model needed to hear about row 1
    result = invoke("eval", "--model", tmp_path / "no-model", "--domain", "choice", "--problems", path,
                    "--out", tmp_path / "ev", "--preset", "cpu-tiny")
    assert one_error_line(result) == f"error: {path}: row 1: Incorrect Answer 3 is empty"


# ----------------------------------------------------------------------------------------------- the shuffle

def test_the_shuffle_is_reproducible_per_problem_wherever_it_appears(tmp_path):
    problems = synthetic(40)
    first = load_multiple_choice(write_gpqa(tmp_path / "a.csv", problems))
    assert first == load_multiple_choice(tmp_path / "a.csv")
    copy = load_multiple_choice(write_gpqa(tmp_path / "b.csv", problems))
    assert [(row["id"], row["question"], row["answer"]) for row in copy] == \
        [(row["id"], row["question"], row["answer"]) for row in first]
    # the same problems reversed, and a subset: each problem keeps its own letters (its seed is its text)
    again = {row["question"]: row["answer"] for row in load_multiple_choice(write_gpqa(tmp_path / "c.csv", problems[::-1]))}
    subset = load_multiple_choice(write_gpqa(tmp_path / "d.csv", problems[7:9]))
    assert {row["question"]: row["answer"] for row in first} == again
    assert [row["question"] for row in subset] == [row["question"] for row in first[7:9]]
    # another seed is another order, for most problems (1/24 of them keep theirs by chance)
    other = load_multiple_choice(tmp_path / "a.csv", seed=1)
    assert sum(a["question"] != b["question"] for a, b in zip(first, other)) > 30


def test_the_correct_letter_is_uniform_and_every_order_occurs(tmp_path):
    count = 2400
    rows = load_multiple_choice(write_gpqa(tmp_path / "many.csv", synthetic(count)))
    letters = Counter(row["answer"] for row in rows)
    expected = count / 4
    chi_square = sum((letters[letter] - expected) ** 2 / expected for letter in "ABCD")
    # 16.27: the 0.1% critical value of chi-square with 3 degrees of freedom. Deterministic (the seeds are the
    # problems' text), so this is no flaky test: it says these 2400 letters look uniform, not that luck held
    assert chi_square < 16.27, letters
    orders = Counter()
    for index, row in enumerate(rows):
        options = options_of(row["question"])
        assert options[row["answer"]] == f"right {index}"  # the letter points at the correct text
        orders[tuple(options[letter].rsplit(" ", 1)[0] for letter in "ABCD")] += 1  # the option without its number
    # the wrong options are shuffled too, not only the right one moved: all 24 orders occur, each about as often
    assert set(orders) == set(permutations(["right", "wrong one", "wrong two", "wrong three"]))
    assert min(orders.values()) > count / 24 / 2


# ----------------------------------------------------------------------------------- the verifier, the vote

def test_the_domain_grades_letters_and_votes_by_letter():
    domain = choice_domain()
    assert domain.verifier == "choice" and domain.rejected_prefix is None  # no step checker: chains are prose
    assert check(domain, "<think>2+2 is 4, option C</think>\n\\boxed{C}", "C")
    assert check(domain, "Working through it... so the answer is (B).", "B")
    assert check(domain, "\\boxed{\\text{(D)}}", "D")
    assert not check(domain, "\\boxed{A}", "C")
    assert not check(domain, "\\boxed{A} or maybe \\boxed{C}", "C")  # hedging is wrong
    assert not check(domain, "no letter here", "C")
    assert ballot(domain, "\\boxed{A} or \\boxed{C}") is None  # and does not vote
    assert equivalent(domain, "c", "C") and not equivalent(domain, "A", "C")
    from budget_reasoner.verify import grade

    verdict = grade(domain, "\\boxed{A}", "E")  # a reference that is no option letter grades nothing, and says so
    assert not verdict.correct and "not an option letter" in verdict.error


def test_majority_vote_through_the_domain():
    from budget_reasoner.eval.run import result_row

    problem = {"id": "p", "question": "q", "answer": "B"}
    texts = ["\\boxed{A}", "\\boxed{B}", "the answer is (B)", "\\boxed{A} \\boxed{B}", "\\boxed{C}"]
    samples = [SimpleNamespace(text=text, tokens=5, mean_logprob=-index) for index, text in enumerate(texts)]
    row = result_row(choice_domain(), problem, "\\boxed{A}", 5, samples)
    assert not row["correct"] and row["samples_correct"] == [False, True, True, False, False]
    assert row["votes"] == {"B": 2, "A": 1, "C": 1} and row["majority_answer"] == "B" and row["majority_correct"]
    assert row["sample_answers"][3] is None  # the hedge abstains
    assert row["best_of_n_correct"] is False  # the highest log-prob sample says A


# ------------------------------------------------------------------------------------ eval, beside math

def canned_eval(monkeypatch, answer_for):
    """Eval's model replaced by canned completions: `answer_for(question, k)` is the first answer (k=None) and
    sample k's. Everything else (reading, grading, voting, the summary) is eval's own."""
    from budget_reasoner.eval import run

    def answers(model, tokenizer, prompts, texts, preset, label, seed):
        questions = [prompt[-1]["content"] for prompt in prompts]
        first = [answer_for(question, None) for question in questions]
        samples = [[SimpleNamespace(text=answer_for(question, k), tokens=7, mean_logprob=-float(k))
                    for k in range(preset.eval.maj_k)] for question in questions]
        return first, [3] * len(questions), samples

    monkeypatch.setattr(run, "fit_questions", lambda model, problems, source, preset: [p["question"] for p in problems])
    monkeypatch.setattr(run, "load_for_inference", lambda *args: (None, None))
    monkeypatch.setattr(run, "prompt_texts", lambda tokenizer, prompts: prompts)
    monkeypatch.setattr(run, "_generate_answers", answers)


def test_eval_of_a_choice_file_reports_accuracy_pass_and_majority_like_math(tmp_path, monkeypatch):
    path = write_gpqa(tmp_path / "gpqa.csv", synthetic(4))
    truth = {row["question"]: row["answer"] for row in load_multiple_choice(path)}
    wrong = {letter: "ABCD"[("ABCD".index(letter) + 1) % 4] for letter in "ABCD"}
    order = [row["question"] for row in load_multiple_choice(path)]

    def answer_for(question, k):
        # problems 0, 1: always right; problem 2: greedy wrong, samples right 2 of 3 (vote right);
        # problem 3: greedy right, samples right 1 of 3 (vote wrong)
        index, letter = order.index(question), truth[question]
        right = {0: True, 1: True, 2: k is not None and k < 2, 3: k is None or k == 0}[index]
        return f"<think>...</think>\n\\boxed{{{letter if right else wrong[letter]}}}"

    canned_eval(monkeypatch, answer_for)
    result = invoke("eval", "--model", "canned", "--domain", "choice", "--problems", path, "--samples", 3,
                    "--out", tmp_path / "choice", "--preset", "cpu-tiny", *TINY_ARGS)
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "choice" / "summary.json").read_text())
    assert summary["problems"] == 4 and summary["accuracy"] == 0.75  # 3 of 4 greedy answers right
    assert summary["maj@3"] == 0.75  # problem 2's vote is right, problem 3's wrong
    assert summary["pass@1"] == pytest.approx((3 + 3 + 2 + 1) / 12)  # mean of each problem's c/k
    assert summary["pass@3"] == 1.0 and summary["reference_errors"] == 0
    assert "| maj@3 |" in result.output and "| pass@3 |" in result.output

    # the same canned eval on a math problems file: the same table, the same metrics
    problems = tmp_path / "math.jsonl"
    problems.write_text("".join(json.dumps({"id": f"m{i}", "domain": "math", "question": f"{i}+1", "answer": str(i + 1),
                                            "source": "test"}) + "\n" for i in range(4)))
    canned_eval(monkeypatch, lambda question, k: f"\\boxed{{{eval(question)}}}")
    result_math = invoke("eval", "--model", "canned", "--domain", "math", "--problems", problems, "--samples", 3,
                         "--out", tmp_path / "math", "--preset", "cpu-tiny", *TINY_ARGS)
    assert result_math.exit_code == 0, result_math.output
    math_summary = json.loads((tmp_path / "math" / "summary.json").read_text())
    assert set(math_summary) == set(summary)
    header = lambda output: next(line for line in output.splitlines() if line.startswith("| model"))  # noqa: E731
    assert header(result.output) == header(result_math.output)


def test_eval_benchmark_choice_reads_the_same_problems(tmp_path, monkeypatch):
    path = write_gpqa(tmp_path / "gpqa.csv", synthetic(3))
    canned_eval(monkeypatch, lambda question, k: "\\boxed{A}")
    result = invoke("eval", "--model", "canned", "--benchmark", "choice", "--problems", path, "--out", tmp_path / "ev",
                    "--preset", "cpu-tiny", *TINY_ARGS)
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in (tmp_path / "ev" / "problems.jsonl").read_text().splitlines()]
    assert rows == load_multiple_choice(path)  # --benchmark choice and --domain choice: one problem, one order
    summary = json.loads((tmp_path / "ev" / "summary.json").read_text())
    assert summary["accuracy"] == pytest.approx(sum(row["answer"] == "A" for row in rows) / 3)


def test_choice_is_a_benchmark_graded_by_its_letter_beside_math(tmp_path, tiny_preset):
    from dataclasses import replace

    from budget_reasoner.recipe import benchmark_problems_file

    path = write_gpqa(tmp_path / "gpqa.csv", synthetic(5))
    assert parse_problem_source(f"choice={path}") == ("choice", str(path))
    assert load_benchmark("choice", path) == load_multiple_choice(path)
    assert benchmark_domain("choice") == "choice" and benchmark_domain("gsm8k") == "math"
    assert benchmark_domain("mbpp") == "code"
    with pytest.raises(BudgetReasonerError, match="choice needs its file"):
        load_benchmark("choice")
    with pytest.raises(BudgetReasonerError, match="choice has no training split"):
        load_benchmark("choice", path, train=True)
    preset = replace(tiny_preset, eval=replace(tiny_preset.eval, benchmarks=["gsm8k", f"choice={path}"]))
    written = benchmark_problems_file(tmp_path / "run", f"choice={path}", preset)
    rows = [json.loads(line) for line in written.read_text().splitlines()]
    assert [row["answer"] for row in rows] == [row["answer"] for row in load_multiple_choice(path)]


# ------------------------------------------------------------------------------- generate, and the offline world

def test_generate_splits_a_choice_file_and_decontamination_keeps_distinct_questions(tmp_path, tiny_preset):
    from budget_reasoner.generate.pipeline import write_problems

    gen = tiny_preset.generate
    path = write_gpqa(tmp_path / "gpqa.csv", synthetic(gen.num_train_problems + gen.num_eval_problems))
    domain = get_domain("choice", ProblemFile(path))
    train, held_out = write_problems(tmp_path / "problems", tiny_preset, domain)
    # every question ends with the same ask: were it 13 tokens or more, each training question would share a
    # 13-gram with every held-out one and all would be dropped as contaminated
    assert len(held_out) == gen.num_eval_problems and len(train) == gen.num_train_problems
    assert {row["domain"] for row in train + held_out} == {"choice"}
    assert not {row["question"] for row in train} & {row["question"] for row in held_out}
    by_question = {row["question"]: row["answer"] for row in load_multiple_choice(path)}
    assert all(by_question[row["question"]] == row["answer"] for row in train + held_out)


def test_without_a_file_the_domain_says_what_file_it_needs():
    with pytest.raises(BudgetReasonerError) as error:
        get_domain("choice")  # generate and quickstart ask for problems
    assert str(error.value) == ("domain choice has no problems of its own; pass --problems FILE (a CSV in GPQA's "
                                "layout: Question, Correct Answer, Incorrect Answer 1-3)")
    choice_domain()  # eval grades a file it is given: no source asked for


def test_the_offline_world_is_refused_in_one_line_before_anything_runs(tmp_path):
    path = write_gpqa(tmp_path / "gpqa.csv", synthetic(30))
    out = tmp_path / "run"
    result = invoke("quickstart", "--domain", "choice", "--problems", path, "--preset", "cpu-tiny", "--out", out,
                    *TINY_ARGS)
    line = one_error_line(result)
    assert line.startswith("error: domain choice has no offline world (preset cpu-tiny): its questions are "
                           "graduate-level science") and "--preset 24gb" in line
    assert not out.exists() or [p.name for p in out.iterdir() if not p.name.startswith(".")] == []
    result = invoke("bootstrap", "--domain", "choice", "--preset", "cpu-tiny", "--out", out, *TINY_ARGS)
    assert one_error_line(result) == line
    assert not out.exists() or [p.name for p in out.iterdir() if not p.name.startswith(".")] == []
