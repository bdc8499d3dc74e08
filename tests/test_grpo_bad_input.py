"""GRPO's bad input (issue #15): a reward function that raises or returns NaN, an unclosed chain, an unparseable
reference, a group whose rewards are all equal, a prompt too long to size: the step goes on, each is counted (every
logged step and the stage record), and a run interrupted mid-step resumes from its last checkpoint, counts too."""

import json
import math

import pytest
import torch

from budget_reasoner.io import write_jsonl
from budget_reasoner.rewards import RewardStats, leave_out_unscored
from tests.conftest import TINY

NAN = math.nan


def test_a_completion_missing_any_reward_is_left_out_whole_and_equal_groups_are_counted():
    # 3 groups of 2 completions x (correctness, format, a third reward); weights 1, 1, 0.5
    rewards = torch.tensor([[1.0, 0.1, 0.0], [0.0, 0.1, 0.0],  # totals 1.1, 0.1: a spread
                            [0.0, 0.1, NAN], [1.0, 0.1, 0.0],  # the first misses one reward: left out, one scored
                            [0.0, 0.0, 1.0], [0.0, 0.0, 1.0]])  # totals 0.5, 0.5: no advantage
    stats = RewardStats()
    kept = leave_out_unscored(rewards, torch.tensor([1.0, 1.0, 0.5]), 2, stats)
    # the row TRL would have paid 0.1 for format alone is all NaN now (TRL: unscorable, advantage 0)
    assert torch.isnan(kept[2]).all() and not torch.isnan(kept[[0, 1, 3, 4, 5]]).any()
    assert torch.equal(kept[[0, 1, 3, 4, 5]], rewards[[0, 1, 3, 4, 5]])
    assert (stats.left_out, stats.groups, stats.equal_reward_groups) == (1, 3, 2)  # one scored of two is no spread
    assert stats.log_fields()["counts/left_out"] == 1
    assert RewardStats.from_dict(stats.to_dict()) == stats


def problems(tmp_path, rows):
    path = tmp_path / "problems.jsonl"
    write_jsonl(path, [{"id": str(i), "domain": "math", "question": q, "answer": a, "source": "test"}
                       for i, (q, a) in enumerate(rows)])
    return path


def test_the_step_goes_on_through_every_bad_input_and_counts_each(tiny_run, tmp_path, monkeypatch):
    """Three problems a step: A's third reward is NaN (after a first call that raises for all), B is fine, C's
    reference cannot be parsed; D's prompt is too long for grpo.max_prompt_length and is left out before training."""
    from budget_reasoner.config import load_preset
    from budget_reasoner.rewards import guarded
    from budget_reasoner.train import grpo as grpo_module

    out, _, _ = tiny_run
    preset = load_preset("cpu-tiny", {**TINY, "grpo.batch_size": 6, "grpo.num_generations": 2})
    file = problems(tmp_path, [("2+3*1", "5"), ("4*2-1", "7"), ("1+1*2", "\\frac{"), ("(1+2)*" * 40 + "1", "3")])
    real, calls = grpo_module.reward_functions, []

    def with_a_broken_one(domain, format_weight, length_weight, max_tokens, stats):
        def broken(prompts, completions, answer, **_):
            calls.append(len(completions))
            if len(calls) == 1:
                raise RuntimeError("a reward function with a bug")
            return [NAN if reference == "5" else 1.0 for reference in answer]

        return real(domain, format_weight, length_weight, max_tokens, stats) + [guarded(broken, stats)]

    monkeypatch.setattr(grpo_module, "reward_functions", with_a_broken_one)
    record = grpo_module.grpo(file, out / "sft", tmp_path / "grpo", preset)
    counts = record["rewards"]
    assert record["prompts_too_long"] == 1 and record["problems"] == 3
    assert counts["completions"] == 12 and counts["groups"] == 6
    assert counts["failed"] == 6  # the first call raised: its 6 completions
    # step 1: all 6 (a reward missing everywhere); step 2: A's two (NaN) and C's two (unusable reference)
    assert counts["left_out"] == 10
    assert counts["unparseable_reference"] + counts["unclosed_think"] >= 2  # C's chains: graded against nothing
    assert counts["equal_reward_groups"] >= 5  # the five groups with nothing scored; B's group when no chain differs
    logged = [entry for entry in record["history"] if "reward" in entry]  # the steps' logs (not the run's summary)
    assert [entry["counts/left_out"] for entry in logged] == [6, 10]  # cumulative at each logged step


def test_an_interrupted_run_resumes_from_its_last_checkpoint_and_keeps_its_counts(tiny_run, tmp_path, monkeypatch):
    from budget_reasoner.config import load_preset
    from budget_reasoner.io import read_json
    from budget_reasoner.train import grpo as grpo_module

    out, _, _ = tiny_run
    preset = load_preset("cpu-tiny", {**TINY, "grpo.max_steps": 4, "grpo.save_steps": 2})
    file = out / "data" / "problems" / "train.jsonl"
    real, calls = grpo_module.reward_functions, []

    def interrupted_at_step_three(*args):
        functions = real(*args)
        first = functions[0]

        def correctness(prompts, completions, **columns):
            calls.append(1)
            if len(calls) == 3:  # step 3, after checkpoint-2 was written
                raise KeyboardInterrupt
            return first(prompts, completions, **columns)

        correctness.__name__ = first.__name__
        return [correctness, *functions[1:]]

    with monkeypatch.context() as patch:
        patch.setattr(grpo_module, "reward_functions", interrupted_at_step_three)
        with pytest.raises(KeyboardInterrupt):
            grpo_module.grpo(file, out / "sft", tmp_path / "grpo", preset)
    assert (tmp_path / "grpo" / "checkpoints" / "checkpoint-2" / grpo_module.REWARD_COUNTS).is_file()
    record = grpo_module.grpo(file, out / "sft", tmp_path / "grpo", preset)
    sessions = read_json(tmp_path / "grpo" / "sessions.json")["sessions"]
    assert [(s["resumed_from_step"], s["reached_step"]) for s in sessions] == [(0, 2), (2, 4)]
    assert [entry["step"] for entry in record["history"] if "reward" in entry] == [1, 2, 3, 4]
    # 4 steps x 2 problems x 2 completions: the first session's counts came back from checkpoint-2
    assert (record["rewards"]["completions"], record["rewards"]["groups"]) == (16, 8)
    assert json.loads((tmp_path / "grpo" / "stage.json").read_text())["rewards"]["groups"] == 8
