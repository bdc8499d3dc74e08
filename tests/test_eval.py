"""Benchmarks, metrics and test-time compute."""

import csv
import json

import pytest
import torch

from budget_reasoner.errors import BudgetReasonerError
from budget_reasoner.eval import majority, majority_correct
from budget_reasoner.eval.metrics import (accuracy_curve, best_of_n, cluster_answers, majority_vote, pass_at_k,
                                          tokens_curve, vote)
from budget_reasoner.problems import load_benchmark, load_multiple_choice
from budget_reasoner.verify import check, extract
from tests.conftest import PROJECT_DATA, interrupt_eval_on_second_shard


def test_pass_at_k_against_hand_computed_values():
    assert pass_at_k(5, 2, 2) == pytest.approx(0.7)  # 1 - C(3,2)/C(5,2) = 1 - 3/10
    assert pass_at_k(4, 1, 1) == pytest.approx(0.25)
    assert pass_at_k(4, 0, 4) == 0.0
    assert pass_at_k(4, 3, 2) == 1.0  # fewer wrong samples than k: a correct one is always drawn
    with pytest.raises(ValueError):
        pass_at_k(3, 1, 4)


def test_majority_vote_and_best_of_n():
    assert majority_vote(["3", "5", "3", None, "5", "3"]) == "3"
    assert majority_vote(["5", "3"]) == "5"  # a tie goes to the first seen
    assert majority_vote([None, None]) is None
    assert best_of_n(["a", "b", "c"], [-2.0, -0.5, -1.0]) == "b"
    # problem 1: "1" wins at k=1 (wrong), "2" at k=3 (right); problem 2: "7" right throughout
    answers = [["1", "2", "2"], ["7", "7", "3"]]
    correct = [[False, True, True], [True, True, False]]
    clusters = [cluster_answers(a, str.__eq__, c) for a, c in zip(answers, correct)]
    assert clusters == [[0, 1, 1], [0, 0, 1]]
    assert accuracy_curve(answers, clusters, correct, [1, 3]) == {1: 0.5, 3: 1.0}
    assert tokens_curve([[3, 5, 7], [10, 0, 2]], [1, 3]) == {1: 6.5, 3: 13.5}  # (3+10)/2, (15+12)/2


def test_answers_that_mean_the_same_vote_together():
    equal = lambda a, b: check("math", f"\\boxed{{{a}}}", b)  # noqa: E731 - the grader's own relation
    assert cluster_answers(["0.5", "\\frac12", "3", "1/2", None, "3"], equal) == [0, 0, 1, 0, None, 1]
    assert majority_vote(["0.5", "\\frac12", "3", "1/2", "3"]) == "3"  # by spelling, 1/2 split three ways and lost
    assert majority_correct("math", ["\\boxed{0.5}", "\\boxed{\\frac12}", "\\boxed{3}", "\\boxed{1/2}", "\\boxed{3}"], "1/2")


def test_the_vote_is_graded_like_its_members():
    # each \\boxed{48} is correct against 48^\\circ; the old vote re-boxed "48" and lost that
    assert majority_correct("math", ["\\boxed{48}"] * 3 + ["\\boxed{47}"] * 2, "48^\\circ")
    # mixed numbers, spaced or not, are one answer: 3 votes against 2
    mixed = ["\\boxed{12 \\frac{3}{5}}", "\\boxed{7}", "\\boxed{12\\frac{3}{5}}", "\\boxed{7}", "\\boxed{\\frac{63}{5}}"]
    result = majority("math", mixed, "12\\frac{3}{5}")
    assert result.correct and result.count == 3 and result.answer == "12 \\frac{3}{5}"
    assert result.tally == {"12 \\frac{3}{5}": 3, "7": 2}
    assert not majority_correct("math", ["\\boxed{5}", "\\boxed{7}", "\\boxed{7}"], "5")


def test_hedged_completions_do_not_vote():
    # three hedges whose last box is the right 5 would have won the old vote; they are not answers
    completions = ["\\boxed{6} or \\boxed{5}"] * 3 + ["\\boxed{6}"] * 2
    result = majority("math", completions, "5")
    assert result.answer == "6" and result.count == 2 and not result.correct
    assert majority("math", ["\\boxed{6} or \\boxed{5}"], "5") == vote([None], [None], [False])  # no vote at all


def test_ties_go_to_the_answer_seen_first_and_prefixes_vote_alone():
    answers, correct = ["4", "5", "5", "4"], [True, False, False, True]
    clusters = cluster_answers(answers, str.__eq__, correct)
    assert vote(answers, clusters, correct).correct  # 2-2: "4" came first
    assert not vote(answers, clusters, correct, k=3).correct  # first three samples: "5" twice
    assert vote(answers, clusters, correct, k=1).answer == "4"


def test_maj_k_never_passes_without_a_correct_sample_on_real_math500_answers():
    """On MATH-500's own answers: k samples that restate the answer in another notation vote for it."""
    problems = load_benchmark("math500", PROJECT_DATA / "math500" / "test.jsonl")
    fractions = [p for p in problems if p["answer"] in ("\\frac{1}{2}", "\\frac{3}{4}", "\\frac{1}{4}")][:2]
    assert fractions
    for problem in fractions:
        numerator, denominator = problem["answer"][6:-1].split("}{")
        decimal = str(int(numerator) / int(denominator))
        completions = [f"\\boxed{{{decimal}}}", f"\\boxed{{{numerator}/{denominator}}}", "\\boxed{2}", "\\boxed{2}"]
        assert majority_correct("math", completions, problem["answer"])  # 2 by meaning, a tie won by the first
        assert not majority_correct("math", ["\\boxed{2}"] + completions, problem["answer"])


def test_eval_rows_and_the_compute_curve_vote_by_meaning():
    from types import SimpleNamespace

    from budget_reasoner.eval.run import compute_curve, result_row

    problem = {"id": "p", "question": "q", "answer": "48^\\circ"}
    texts = ["\\boxed{47}", "\\boxed{48}", "\\boxed{48^\\circ}", "\\boxed{47} or \\boxed{48}", "\\boxed{48 degrees}"]
    samples = [SimpleNamespace(text=text, tokens=10, mean_logprob=-index) for index, text in enumerate(texts)]
    row = result_row("math", problem, "\\boxed{48}", 5, samples)
    assert row["correct"] and row["samples_correct"] == [False, True, True, False, True]  # the hedge is wrong
    assert row["sample_answers"][3] is None and row["sample_clusters"] == [0, 1, 1, None, 1]
    assert row["votes"] == {"48": 3, "47": 1} and row["majority_answer"] == "48" and row["majority_correct"]
    assert row["best_of_n_correct"] is False  # the highest log-prob sample says 47
    # k=1: 47; k=2: a 1-1 tie, won by 47 (seen first); k=4: 48 twice (the hedge abstains); k=5: 48 three times
    assert [point["accuracy"] for point in compute_curve([row], "math")] == [0.0, 0.0, 1.0, 1.0]


@pytest.mark.parametrize("name, file, rows, first_answer", [
    ("gsm8k", "gsm8k/test.jsonl", 1319, "18"),
    ("math500", "math500/test.jsonl", 500, "\\left( 3, \\frac{\\pi}{2} \\right)"),
    ("aime24", "aime24/test.jsonl", 30, None),
    ("amc23", "amc23/test.jsonl", 40, "27"),  # stored as 27.0
])
def test_loaders_on_the_real_files(name, file, rows, first_answer):
    problems = load_benchmark(name, PROJECT_DATA / file)
    assert len(problems) == rows and len({p["id"] for p in problems}) == rows
    assert {"id", "domain", "question", "answer", "source"} <= set(problems[0])
    if first_answer is not None:
        assert problems[0]["answer"] == first_answer
    assert all(p["answer"] for p in problems)


def test_every_aime_answer_is_an_integer_from_0_to_999():
    problems = load_benchmark("aime24", PROJECT_DATA / "aime24" / "test.jsonl")
    assert all(p["answer"].isdigit() and 0 <= int(p["answer"]) <= 999 for p in problems)


@pytest.mark.parametrize("name, file", [("gsm8k", "gsm8k/test.jsonl"), ("math500", "math500/test.jsonl")])
def test_reference_solutions_grade_as_correct_and_others_answers_do_not(name, file):
    problems = load_benchmark(name, PROJECT_DATA / file)
    agreement = sum(check("math", p["solution"], p["answer"]) for p in problems) / len(problems)
    assert agreement >= 0.995
    # each solution against another problem's answer (a fixed shift), where the two answers differ as written
    shifted = [(p, problems[(i + 37) % len(problems)]) for i, p in enumerate(problems)]
    wrong = [(p, q) for p, q in shifted if p["answer"].strip() != q["answer"].strip()]
    assert sum(check("math", p["solution"], q["answer"]) for p, q in wrong) <= 0.005 * len(wrong)


def test_malformed_benchmark_files_name_file_and_line(tmp_path):
    path = tmp_path / "gsm.jsonl"
    path.write_text(json.dumps({"question": "q", "answer": "#### 1"}) + "\n{oops\n")
    with pytest.raises(BudgetReasonerError, match=r"gsm.jsonl: line 2: not valid JSON"):
        load_benchmark("gsm8k", path)
    path.write_text(json.dumps({"question": "q"}) + "\n")
    with pytest.raises(BudgetReasonerError, match=r"gsm.jsonl: line 1: missing column\(s\) answer"):
        load_benchmark("gsm8k", path)
    with pytest.raises(BudgetReasonerError, match="unknown benchmark"):
        load_benchmark("mmlu", path)


def write_choice_csv(path, rows):
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["Question", "Correct Answer", "Incorrect Answer 1", "Incorrect Answer 2", "Incorrect Answer 3"])
        writer.writerows(rows)


def test_multiple_choice_shuffles_with_a_seed_and_grades_letters(tmp_path):
    path = tmp_path / "gpqa.csv"
    write_choice_csv(path, [[f"Q{i}?", f"right{i}", f"w1-{i}", f"w2-{i}", f"w3-{i}"] for i in range(20)])
    problems = load_multiple_choice(path, seed=3)
    assert problems == load_multiple_choice(path, seed=3)
    assert [p["answer"] for p in problems] != [p["answer"] for p in load_multiple_choice(path, seed=4)]
    assert len({p["answer"] for p in problems}) > 1  # the correct option is not always in one place
    for index, problem in enumerate(problems):
        letter = problem["answer"]
        assert f"{letter}) right{index}" in problem["question"]
        assert check("choice", f"... so the answer is ({letter})", letter)
        assert check("choice", f"\\boxed{{{letter}}}", letter)
        other = "A" if letter != "A" else "B"
        assert not check("choice", f"\\boxed{{{other}}}", letter)
        assert not check("choice", f"\\boxed{{{letter}}} \\boxed{{{other}}}", letter)  # hedging
    assert extract("choice", "I pick (C) since") == "C"
    (tmp_path / "bad.csv").write_text("Question,Correct Answer\nq,a\n")
    with pytest.raises(BudgetReasonerError, match="missing column"):
        load_multiple_choice(tmp_path / "bad.csv")


def test_batched_generation_equals_one_prompt_at_a_time(tiny_run):
    from budget_reasoner.sampling import chat_prompt
    from budget_reasoner.sampling.local import generate_texts, prompt_texts
    from budget_reasoner.eval.run import load_for_inference
    from budget_reasoner.hardware import detect

    out, preset, _ = tiny_run
    model, tokenizer = load_for_inference(out / "models" / "teacher", preset, detect("cpu"))
    texts = prompt_texts(tokenizer, [chat_prompt(q) for q in ("3+4", "(12+7)*3-5", "9*2", "17-3+8*2")])
    one = [g[0] for g in generate_texts(model, tokenizer, texts, 12, batch_size=1)]
    batched = [g[0] for g in generate_texts(model, tokenizer, texts, 12, batch_size=8)]
    assert [g.text for g in one] == [g.text for g in batched]


def test_generated_token_counts_match_unbatched_generate(tiny_run):
    """A count is the new tokens up to and including EOS: padding after an early stop is not counted."""
    from budget_reasoner.sampling import chat_prompt
    from budget_reasoner.sampling.local import generate_texts, prompt_texts
    from budget_reasoner.models import build_tiny_model, load_tokenizer

    out, preset, _ = tiny_run
    tokenizer = load_tokenizer(out / "models" / "teacher")
    model = build_tiny_model(tokenizer, preset.model.tiny_teacher, 256, seed=1).eval()
    torch.manual_seed(0)
    with torch.no_grad():  # large random weights: varied greedy text that ends at different lengths (toy models repeat one token)
        for parameter in model.parameters():
            parameter.normal_(0, 0.5)
    texts = prompt_texts(tokenizer, [chat_prompt(q) for q in ("3+4", "(12+7)*3-5", "9*2", "17-3+8*2")])
    expected = []
    for text in texts:
        ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
        new = model.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=tokenizer.pad_token_id)[0, ids.shape[1]:]
        expected.append(len(new))
    assert min(expected) < 12 and min(expected) < max(expected)  # early stops beside longer rows
    batched = [g[0].tokens for g in generate_texts(model, tokenizer, texts, 12, batch_size=8)]
    assert batched == expected


@pytest.mark.parametrize("temperature, samples", [(0.0, 1), (0.7, 2)])
def test_token_logprobs_match_transformers_transition_scores(tiny_run, temperature, samples):
    """Our one-float-per-token recorder against transformers' own compute_transition_scores over the stored
    scores of the same (seeded, identically batched) generation."""
    from budget_reasoner.sampling import chat_prompt
    from budget_reasoner.sampling.local import generate_texts, prompt_texts
    from budget_reasoner.eval.run import load_for_inference
    from budget_reasoner.hardware import detect

    out, preset, _ = tiny_run
    model, tokenizer = load_for_inference(out / "sft", preset, detect("cpu"))
    texts = sorted(prompt_texts(tokenizer, [chat_prompt(q) for q in ("3+4*2", "(12+7)*3-5")]), key=len)
    ours = generate_texts(model, tokenizer, texts, 16, batch_size=8, temperature=temperature, num_samples=samples, seed=3)
    sampling = {"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0} if temperature else {"do_sample": False}
    tokenizer.padding_side = "left"
    batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    torch.manual_seed(3)  # the same draws as ours: one batch of both prompts, shortest first
    output = model.generate(**batch, max_new_tokens=16, num_return_sequences=samples, pad_token_id=tokenizer.pad_token_id,
                            eos_token_id=[tokenizer.eos_token_id], output_scores=True, return_dict_in_generate=True, **sampling)
    scores = model.compute_transition_scores(output.sequences, output.scores, normalize_logits=True)
    rows = [sample for per_prompt in ours for sample in per_prompt]
    assert len(rows) == output.sequences.shape[0]
    for row, sample in enumerate(rows):
        new_tokens = output.sequences[row, batch["input_ids"].shape[1]:]
        assert sample.text == tokenizer.decode(new_tokens, skip_special_tokens=True)
        assert sample.mean_logprob == pytest.approx(scores[row, : sample.tokens].mean().item(), abs=1e-5)
    assert len({round(sample.mean_logprob, 6) for sample in rows}) > 1  # not one constant


def test_budget_forcing_caps_the_thinking(tiny_run):
    from budget_reasoner.eval.budget_forcing import THINK_CLOSE, generate_with_budget
    from budget_reasoner.sampling import chat_prompt
    from budget_reasoner.eval.run import load_for_inference
    from budget_reasoner.hardware import detect

    out, preset, _ = tiny_run
    model, tokenizer = load_for_inference(out / "models" / "teacher", preset, detect("cpu"))
    outputs, tokens = generate_with_budget(model, tokenizer, [chat_prompt("3+4"), chat_prompt("(2+5)*3")], think_budget=6,
                                           batch_size=4, min_think_tokens=4, max_waits=2, answer_tokens=4)
    assert all(0 < count <= 6 + 4 for count in tokens)  # at most the thinking budget plus the answer's tokens
    for text in outputs:
        thought, _, _ = text.partition(THINK_CLOSE)
        assert text.count(THINK_CLOSE) == 1
        assert thought.count("Wait") <= 2
        thought_tokens = len(tokenizer(thought.replace("Wait", ""), add_special_tokens=False)["input_ids"])
        assert thought_tokens <= 6 + 1  # the budget, and the newline written before the forced close


def test_eval_reports_test_time_compute_metrics(tiny_run, tmp_path):
    from budget_reasoner.eval.run import evaluate

    out, preset, _ = tiny_run
    summary = evaluate(out / "sft", out / "data" / "problems" / "held_out.jsonl", tmp_path / "ev", preset)
    k = preset.eval.maj_k
    for key in ("accuracy", "pass@1", f"pass@{k}", f"maj@{k}", f"best_of_{k}"):
        assert 0.0 <= summary[key] <= 1.0
    assert summary[f"pass@{k}"] >= summary["pass@1"]
    rows = [json.loads(line) for line in (tmp_path / "ev" / "results.jsonl").read_text().splitlines()]
    assert summary["pass@1"] == pytest.approx(sum(sum(r["samples_correct"]) for r in rows) / (len(rows) * k))
    assert (tmp_path / "ev" / "test_time_compute.png").read_bytes()[:4] == b"\x89PNG"
    # the accuracy-vs-tokens curve: its last point is maj@k, at the tokens all k samples cost
    last = summary["compute_curve"][-1]
    assert last["samples"] == k and last["accuracy"] == summary[f"maj@{k}"]
    assert last["tokens_per_problem"] == pytest.approx(sum(sum(r["sample_tokens"]) for r in rows) / len(rows))
    assert summary["tokens_per_problem"] == pytest.approx(sum(r["tokens"] for r in rows) / len(rows))
    assert all(0 < count <= preset.eval.max_new_tokens for r in rows for count in [r["tokens"], *r["sample_tokens"]])
    assert "| maj@" in (tmp_path / "ev" / "summary.md").read_text() or f"maj@{k}" in (tmp_path / "ev" / "summary.md").read_text()


def test_eval_command_on_a_benchmark_file(tiny_run, tmp_path):
    from typer.testing import CliRunner

    from budget_reasoner.cli import app
    from tests.conftest import TINY

    out, _, _ = tiny_run
    rows = [json.loads(line) for line in (PROJECT_DATA / "amc23" / "test.jsonl").read_text().splitlines()[:3]]
    small = tmp_path / "amc.jsonl"
    small.write_text("".join(json.dumps(r) + "\n" for r in rows))
    overrides = [arg for key, value in TINY.items() for arg in ("--set", f"{key}={value}")]
    result = CliRunner().invoke(app, ["eval", "--model", str(out / "sft"), "--benchmark", "amc23", "--problems", str(small),
                                      "--out", str(tmp_path / "ev"), "--samples", "2", *overrides])
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "ev" / "summary.json").read_text())
    assert summary["problems"] == 3 and "maj@2" in summary


def test_an_interrupted_eval_resumes_at_its_next_shard(tiny_run, tmp_path, monkeypatch):
    from budget_reasoner.eval import run

    out, preset, _ = tiny_run
    problems = out / "data" / "problems" / "held_out.jsonl"
    assert preset.generate.shard_size < preset.generate.num_eval_problems  # at least two shards
    whole = run.evaluate(out / "sft", problems, tmp_path / "whole", preset)
    calls = interrupt_eval_on_second_shard(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        run.evaluate(out / "sft", problems, tmp_path / "resumed", preset)
    first_shard = tmp_path / "resumed" / "shards" / "shard-00000.jsonl"
    written = first_shard.stat().st_mtime_ns
    calls.clear()
    resumed = run.evaluate(out / "sft", problems, tmp_path / "resumed", preset)
    assert first_shard.stat().st_mtime_ns == written and len(calls) == 1  # only the missing shard was answered
    assert (tmp_path / "resumed" / "results.jsonl").read_text() == (tmp_path / "whole" / "results.jsonl").read_text()
    assert {key: resumed[key] for key in ("accuracy", "pass@1", f"maj@{preset.eval.maj_k}")} == \
        {key: whole[key] for key in ("accuracy", "pass@1", f"maj@{preset.eval.maj_k}")}
