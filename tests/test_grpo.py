"""GRPO: the rewards against hand-checked completions (the traps: unusable references, unclosed chains, format
alone, a reward that raises or returns NaN), and the stage end to end on the toy run's sft student."""

import json
import math

from budget_reasoner.rewards import RewardStats, guarded, reward_functions
from tests.conftest import TINY, invoke

RIGHT = "<think>\n12+7=19\n</think>\n\\boxed{19}"
WRONG = "<think>\n12+7=20\n</think>\n\\boxed{20}"
UNCLOSED = "<think>\n12+7=19 \\boxed{19}"  # cut off at the length limit, a box inside the thinking
NO_THOUGHT = "\\boxed{19}"
TWO_BOXES = "<think>\n12+7=19\n</think>\n\\boxed{19} or \\boxed{20}"
EMPTY_BOX = "<think>\n12+7=19\n</think>\n\\boxed{}"


def rewards_for(completions, answers, format_weight=0.1, length_weight=0.0):
    stats = RewardStats()
    functions = reward_functions("math", format_weight, length_weight, 48, stats)
    ids = [[0] * (4 * (i + 1)) for i in range(len(completions))]
    return [f([None] * len(completions), completions, answer=answers, completion_ids=ids) for f in functions], stats


def test_correctness_and_format_by_hand():
    (correct, shape), stats = rewards_for([RIGHT, WRONG, UNCLOSED, NO_THOUGHT, TWO_BOXES, EMPTY_BOX], ["19"] * 6)
    assert correct == [1.0, 0.0, 0.0, 0.0, 0.0, 0.0]  # two boxes: the grader refuses a hedge
    assert shape == [0.1, 0.1, 0.0, 0.0, 0.0, 0.0]  # format pays only <think>..</think> then one non-empty box
    assert (stats.completions, stats.correct, stats.unclosed_think) == (6, 1, 2)


def test_an_unusable_reference_pays_nothing_and_is_counted():
    (correct, shape, length), stats = rewards_for([RIGHT, RIGHT], ["19", "\\frac{"], length_weight=0.5)
    assert correct == [1.0, None] and shape == [0.1, None] and length[1] is None
    assert length[0] == -0.5 * 4 / 48
    assert stats.unparseable_reference == 1


def test_a_reward_that_raises_or_returns_nan_leaves_the_samples_out():
    stats = RewardStats()

    def broken(prompts, completions, **_):
        raise RuntimeError("boom")

    def nan(prompts, completions, **_):
        return [math.nan, 1.0]

    assert guarded(broken, stats)([None, None], [RIGHT, WRONG]) == [None, None]
    assert guarded(nan, stats)([None, None], [RIGHT, WRONG]) == [None, 1.0]
    assert stats.failed == 2 and stats.by_function == {"broken": 2, "nan": 1}


def test_grpo_stage_from_the_toy_sft_student(tiny_run, tmp_path):
    out, preset, _ = tiny_run
    args = [a for key, value in TINY.items() for a in ("--set", f"{key}={value}")]
    result = invoke("grpo", "--from", out / "sft", "--problems", out / "data" / "problems" / "train.jsonl",
                    "--out", tmp_path / "grpo", "--preset", "cpu-tiny", *args)
    assert result.exit_code == 0, result.output
    record = json.loads((tmp_path / "grpo" / "stage.json").read_text())
    assert record["stage"] == "grpo" and (tmp_path / "grpo" / "adapter" / "adapter_config.json").is_file()
    assert [entry["step"] for entry in record["history"] if "reward" in entry] == [1, 2]
    assert record["rewards"]["completions"] == 2 * 4  # every sampled completion was graded once
    sft_base = json.loads((out / "sft" / "stage.json").read_text())["base"]  # recorded relative to its folder
    assert (tmp_path / "grpo" / record["base"]).resolve() == (out / "sft" / sft_base).resolve()


def test_quickstart_rl_grpo_adds_the_stage_to_a_finished_run(tiny_run, tmp_path, monkeypatch):
    """A finished run rerun with --rl grpo: every earlier stage is skipped, GRPO runs from distill, and the report
    gains its held-out row and its compute line."""
    import shutil

    from budget_reasoner import recipe
    from tests.conftest import stand_in_for

    out, preset, _ = tiny_run
    run = tmp_path / "run"
    shutil.copytree(out, run)  # run folders are relocatable
    sft_written = (run / "sft" / "stage.json").stat().st_mtime_ns
    monkeypatch.setattr(recipe, "make_teacher", lambda teacher, *args: stand_in_for(teacher))
    results = recipe.quickstart(run, preset, rl="grpo")
    assert (run / "sft" / "stage.json").stat().st_mtime_ns == sft_written
    grpo_record = json.loads((run / "grpo" / "stage.json").read_text())
    assert (run / "grpo" / grpo_record["base"]).resolve() == (run / "models" / "student-base").resolve()
    assert 0.0 <= results["stages"]["grpo"]["accuracy"] <= 1.0
    assert [row["stage"] for row in results["compute"]][-2:] == ["grpo", "eval (6 runs)"]
    assert "| grpo |" in (run / "report.md").read_text()
