import json

import pytest

from budget_reasoner.errors import BudgetReasonerError
from budget_reasoner.generate import build_pairs, build_sft_rows, generate
from budget_reasoner.io import read_jsonl, read_shards
from tests.conftest import ScriptedTeacher


def chain(id_, completion, correct, k):
    return {"id": id_, "question": f"q{id_}", "answer": "1", "completion": completion, "correct": correct,
            "teacher": "t", "sample_index": k}


def test_sft_rows_keep_distinct_verified_chains_in_trl_format():
    chains = [chain("a", "good1", True, 0), chain("a", "good1", True, 1), chain("a", "bad", False, 2),
              chain("b", "bad", False, 0)]
    rows = build_sft_rows(chains)
    assert rows == [{"id": "a", "prompt": [{"role": "user", "content": "qa"}],
                     "completion": [{"role": "assistant", "content": "good1"}]}]


def test_pairs_match_verified_against_rejected_for_the_same_problem():
    chains = [chain("a", "good1", True, 0), chain("a", "bad1", False, 1), chain("a", "good2", True, 2),
              chain("a", "bad2", False, 3), chain("b", "good", True, 0), chain("c", "bad", False, 0)]
    rows = build_pairs(chains)
    assert [(r["id"], r["chosen"][0]["content"], r["rejected"][0]["content"]) for r in rows] == [
        ("a", "good1", "bad1"), ("a", "good2", "bad2")]
    assert rows[0]["prompt"] == [{"role": "user", "content": "qa"}]


class InterruptingTeacher(ScriptedTeacher):
    """Answers `calls_before_interrupt` shards, then behaves as if the user pressed Ctrl-C."""

    def __init__(self, calls_before_interrupt):
        self.calls = 0
        self.calls_before_interrupt = calls_before_interrupt

    def sample(self, *args, **kwargs):
        if self.calls == self.calls_before_interrupt:
            raise KeyboardInterrupt
        self.calls += 1
        return super().sample(*args, **kwargs)


def test_generate_writes_the_data_contract(tmp_path, tiny_preset):
    summary = generate(tmp_path / "data", tiny_preset, ScriptedTeacher())
    chains = read_shards(tmp_path / "data" / "chains")
    k = tiny_preset.generate.samples_per_problem
    assert len(chains) == tiny_preset.generate.num_train_problems * k == summary["chains"]
    assert set(chains[0]) == {"id", "question", "answer", "completion", "correct", "teacher", "sample_index", "tokens",
                              "prompt_tokens"}
    # the scripted teacher is right on even samples only, and the verifier must see exactly that
    assert all(row["correct"] == (row["sample_index"] % 2 == 0) for row in chains)
    problems = read_jsonl(tmp_path / "data" / "problems" / "train.jsonl")
    held_out = read_jsonl(tmp_path / "data" / "problems" / "held_out.jsonl")
    assert not {p["question"] for p in problems} & {p["question"] for p in held_out}
    assert summary["pairs"] == len(read_jsonl(tmp_path / "data" / "pairs" / "train.jsonl")) == len(problems)


def test_interrupted_generation_resumes_without_loss_or_duplicates(tmp_path, tiny_preset):
    out = tmp_path / "data"
    with pytest.raises(KeyboardInterrupt):
        generate(out, tiny_preset, InterruptingTeacher(calls_before_interrupt=1))
    first_shard = (out / "chains" / "shard-00000.jsonl").read_text()
    assert not (out / "chains" / "shard-00001.jsonl").exists()
    resumed = InterruptingTeacher(calls_before_interrupt=99)
    generate(out, tiny_preset, resumed)
    num_shards = -(-tiny_preset.generate.num_train_problems // tiny_preset.generate.shard_size)
    assert resumed.calls == num_shards - 1  # the finished shard was not sampled again
    assert (out / "chains" / "shard-00000.jsonl").read_text() == first_shard
    chains = read_shards(out / "chains")
    keys = [(row["id"], row["sample_index"]) for row in chains]
    assert len(keys) == len(set(keys)) == tiny_preset.generate.num_train_problems * tiny_preset.generate.samples_per_problem


def test_problems_drawn_with_other_settings_are_refused(tmp_path, tiny_preset):
    generate(tmp_path / "data", tiny_preset, ScriptedTeacher())
    (tmp_path / "data" / "COMPLETE.json").unlink()
    tiny_preset.generate.num_eval_problems += 1
    with pytest.raises(BudgetReasonerError, match=r"other inputs or settings \(differs: settings.generate.num_eval_problems"):
        generate(tmp_path / "data", tiny_preset, ScriptedTeacher())


def test_a_teacher_that_is_never_right_is_an_error(tmp_path, tiny_preset):
    class WrongTeacher:
        name = "wrong"

        def sample(self, prompts, num_samples, *args, **kwargs):
            return [["\\boxed{-1}"] * num_samples for _ in prompts]

    with pytest.raises(BudgetReasonerError, match="accepted none"):
        generate(tmp_path / "data", tiny_preset, WrongTeacher())


def test_malformed_rows_name_file_and_line(tmp_path):
    path = tmp_path / "sft.jsonl"
    path.write_text(json.dumps({"prompt": []}) + "\n{not json\n")
    with pytest.raises(BudgetReasonerError, match=r"sft.jsonl: line 1: missing column\(s\) completion"):
        read_jsonl(path, ["prompt", "completion"])
    with pytest.raises(BudgetReasonerError, match=r"sft.jsonl: line 2: not valid JSON"):
        read_jsonl(path)


def test_a_local_teachers_chains_carry_their_tokens_and_the_stage_its_cost(tiny_run, tmp_path):
    from budget_reasoner.config import load_preset
    from budget_reasoner.sampling import Generated
    from budget_reasoner.hardware import detect
    from budget_reasoner.recipe import make_teacher
    from tests.conftest import TINY

    out, _, _ = tiny_run
    preset = load_preset("cpu-tiny", {**TINY, "generate.num_train_problems": 4, "generate.num_eval_problems": 2,
                                      "generate.samples_per_problem": 2, "generate.max_new_tokens": 8})
    local = make_teacher(str(out / "models" / "teacher"), preset, detect("cpu"))

    class FirstSampleScripted:  # the toy teacher's real samples and counts; its first answer made right, so pairs exist
        name, device = local.name, local.device

        def sample(self, prompts, *args, **kwargs):
            right = ScriptedTeacher().sample(prompts, 1, 0, 0, 0)
            return [[Generated(right[i][0] if k == 0 else g.text, g.mean_logprob, g.tokens) for k, g in enumerate(row)]
                    for i, row in enumerate(local.sample(prompts, *args, **kwargs))]

    summary = generate(tmp_path / "data", preset, FirstSampleScripted())
    chains = read_shards(tmp_path / "data" / "chains")
    assert len(chains) == 8 and all(0 < row["tokens"] <= 8 for row in chains)
    assert summary["tokens"] == sum(row["tokens"] for row in chains)
    assert summary["device"] == "cpu" and summary["peak_memory_bytes"] > 0
