"""Dedup and decontamination of training problems, on hand-made cases and on the real GSM8K files."""

import pytest

from budget_reasoner.config import load_preset
from budget_reasoner.errors import BudgetReasonerError
from budget_reasoner.problems import load_benchmark, parse_problem_source
from budget_reasoner.generate.decontaminate import decontaminate, deduplicate
from budget_reasoner.io import read_json
from tests.conftest import PROJECT_DATA

GSM8K_TRAIN, GSM8K_TEST = PROJECT_DATA / "gsm8k" / "train.jsonl", PROJECT_DATA / "gsm8k" / "test.jsonl"
# a hand-checked template pair in the real files: GSM8K train reuses a test question with other numbers
TRAIN_TWIN = "A train travels 270 miles in 3 hours. At the same rate, how many additional hours would it take to travel an additional 180 miles?"
TEST_TWIN = "A plane travels 1200 miles in 3 hours. At the same rate, how many additional hours would it take to travel an additional 2000 miles?"


def rows(*questions):
    return [{"id": str(i), "question": q} for i, q in enumerate(questions)]


def test_short_expressions_keep_their_operators_and_lose_spacing():
    kept, dropped = deduplicate(rows("3+4*2", "3 + 4 * 2", "3-4*2", "3+4*2"))
    assert [r["question"] for r in kept] == ["3+4*2", "3-4*2"] and dropped == 2
    kept, removed = decontaminate(rows("3+4*2", "(3+4)*2", "12-5"), {"held-out": ["3 + 4*2"]})
    assert [r["question"] for r in kept] == ["(3+4)*2", "12-5"] and removed == {"held-out": 1}


def test_a_question_with_other_numbers_is_still_contamination():
    kept, removed = decontaminate(rows(TRAIN_TWIN, "Natalia sold clips to 48 of her friends in April."),
                                  {"gsm8k-test": [TEST_TWIN]})
    assert [r["question"] for r in kept] == ["Natalia sold clips to 48 of her friends in April."]
    assert removed == {"gsm8k-test": 1}


def test_gsm8k_train_against_its_own_test_split():
    train = load_benchmark("gsm8k", GSM8K_TRAIN, train=True)
    test = [row["question"] for row in load_benchmark("gsm8k", GSM8K_TEST)]
    kept, removed = decontaminate(train, {"gsm8k-test": test})
    questions = {row["question"] for row in kept}
    assert len(train) == 7473 and TRAIN_TWIN in {row["question"] for row in train}
    assert TRAIN_TWIN not in questions and train[0]["question"] in questions
    assert 1 <= removed["gsm8k-test"] < 0.01 * len(train)  # a handful of templates, not a leak of the split
    assert len(kept) + removed["gsm8k-test"] == len(train)


def test_generate_draws_seed_problems_without_the_eval_sets(tmp_path):
    from budget_reasoner.generate.pipeline import write_problems

    preset = load_preset("cpu-tiny", {"generate.num_train_problems": 50, "generate.num_eval_problems": 10,
                                      "generate.seed_sets": [f"gsm8k={GSM8K_TRAIN}"],
                                      "generate.decontaminate": [f"gsm8k={GSM8K_TEST}"]})
    train, held_out = write_problems(tmp_path / "problems", preset)
    sources = [row["source"] for row in train]
    assert sources.count("procedural") == 50 and len(held_out) == 10
    assert all(set(row) == {"id", "domain", "question", "answer", "source"} for row in train)
    assert TRAIN_TWIN not in {row["question"] for row in train}
    record = read_json(tmp_path / "problems" / "COMPLETE.json")
    dropped = record["contaminated_dropped"][f"gsm8k={GSM8K_TEST}"]
    assert dropped >= 1 and len(train) == 50 + 7473 - dropped - record["duplicates_dropped"]
    preset.generate.seed_sets = []
    with pytest.raises(BudgetReasonerError, match="made from other inputs or settings .differs: settings.problems.seed_sets"):
        write_problems(tmp_path / "problems", preset)
    preset.generate.seed_sets, preset.generate.num_seed_problems = [f"gsm8k={GSM8K_TRAIN}"], 100
    train, _ = write_problems(tmp_path / "sampled", preset)
    seeded = [row for row in train if row["source"] != "procedural"]
    assert 95 <= len(seeded) <= 100  # a sample of 100, less any that overlap the test split
    assert seeded == [row for row in write_problems(tmp_path / "again", preset)[0] if row["source"] != "procedural"]


def test_an_unknown_problem_set_is_one_line():
    assert parse_problem_source("gsm8k") == ("gsm8k", None)
    assert parse_problem_source("gsm8k = data/train.jsonl") == ("gsm8k", "data/train.jsonl")
    with pytest.raises(BudgetReasonerError, match="unknown name 'gsm9k'"):
        parse_problem_source("gsm9k=x.jsonl")
