import os
import tempfile
from pathlib import Path

import pytest
import torch

os.environ.setdefault("BUDGET_REASONER_QUIET", "1")
os.environ.setdefault("TRITON_INTERPRET", "1")  # Triton kernels run on CPU tensors (read when a kernel is defined)
os.environ.setdefault("WANDB_MODE", "disabled")
# the planner caches its CPU calibration under ~/.cache: tests keep theirs (and find none of the user's)
os.environ.setdefault("BUDGET_REASONER_CACHE", tempfile.mkdtemp(prefix="budget-reasoner-test-cache-"))
torch.set_num_threads(2)

PROJECT_DATA = Path(__file__).resolve().parents[1] / "data"  # shipped with the project (data/README.md)

# Every stage at toy size: models of a few thousand parameters, a handful of steps. Seconds, not minutes.
TINY = {
    "pretrain.teacher_steps": 30, "pretrain.teacher_target_accuracy": 0.0, "pretrain.student_steps": 20, "pretrain.batch_size": 16, "pretrain.num_problems": 400,
    "model.tiny_student.hidden_size": 32, "model.tiny_student.intermediate_size": 64, "model.tiny_student.num_layers": 1,
    "model.tiny_student.num_heads": 2, "model.tiny_student.num_kv_heads": 1,
    "model.tiny_teacher.hidden_size": 32, "model.tiny_teacher.intermediate_size": 64, "model.tiny_teacher.num_layers": 2,
    "model.tiny_teacher.num_heads": 2, "model.tiny_teacher.num_kv_heads": 1,
    "generate.num_train_problems": 24, "generate.num_eval_problems": 12, "generate.samples_per_problem": 3,
    "generate.shard_size": 10, "generate.max_new_tokens": 24, "generate.batch_size": 32,
    "sft.max_steps": 6, "sft.batch_size": 4, "sft.save_steps": 3,
    "dpo.max_steps": 3, "dpo.batch_size": 2, "dpo.save_steps": 3,
    "distill.max_steps": 3, "distill.batch_size": 4, "distill.save_steps": 3,
    "eval.maj_k": 2, "eval.max_new_tokens": 24, "eval.batch_size": 32,
    "grpo.max_steps": 2, "grpo.batch_size": 4, "grpo.num_generations": 2, "grpo.max_completion_length": 16,
    "grpo.save_steps": 2,
    "opd.max_steps": 4, "opd.batch_size": 4, "opd.num_generations": 2, "opd.max_completion_length": 16, "opd.save_steps": 2,
    "lora.r": 4, "lora.alpha": 8,
}


def qwen7b_by_hand() -> dict:
    """Qwen2.5-7B-Instruct's sizes from its shipped config.json, for the planner's by-hand checks."""
    import json

    config = json.loads((PROJECT_DATA / "model_configs" / "Qwen2.5-7B-Instruct.json").read_text())
    h, i, layers = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
    kv = config["num_key_value_heads"] * h // config["num_attention_heads"]
    return {"hidden": h, "layers": layers, "vocab": config["vocab_size"], "kv_dim": kv,
            "linear": layers * (2 * h * h + 2 * h * kv + 3 * h * i)}


TINY_ARGS = [arg for key, value in TINY.items() for arg in ("--set", f"{key}={value}")]  # TINY as CLI options


def invoke(*args):
    """The CLI, in-process (typer's runner), with every argument as a string."""
    from typer.testing import CliRunner

    from budget_reasoner.cli import app

    return CliRunner().invoke(app, [str(arg) for arg in args])


def one_error_line(result) -> str:
    """The one `error:` line a failed command ends with (after any progress lines), with exit code 2."""
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 2, result.output
    assert [line for line in lines if line.startswith("error: ")] == lines[-1:], result.output
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    return lines[-1]


def interrupt_eval_on_second_shard(monkeypatch) -> list:
    """Eval's shard loop raises KeyboardInterrupt on its second shard; returns the list that counts the shards answered."""
    from budget_reasoner.eval import run

    original, calls = run._generate_answers, []

    def answer(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(run, "_generate_answers", answer)
    return calls


@pytest.fixture
def tiny_preset():
    from budget_reasoner.config import load_preset

    return load_preset("cpu-tiny", dict(TINY))


class ScriptedTeacher:
    """A stand-in teacher for toy-sized tests: a 30-step model verifies nothing, so the chains come from the
    problems' own worked steps. Even samples are right; odd ones end on a wrong answer (so pairs exist)."""

    name = "scripted"

    def sample(self, prompts, num_samples, temperature, max_new_tokens, seed):
        from budget_reasoner.domains.math import format_chain

        completions = []
        for prompt in prompts:
            question = prompt[-1]["content"]
            steps, value = _solve(question)
            completions.append([format_chain(steps, str(value + (k % 2))) for k in range(num_samples)])
        return completions


def stand_in_for(teacher: str) -> ScriptedTeacher:
    """A scripted teacher standing in for the run's own (its `source`, in the generate folder's fingerprint), so the
    tests that rerun the shared quickstart with the real teacher find its data complete, not another teacher's."""
    scripted = ScriptedTeacher()
    scripted.source = teacher
    return scripted


def _solve(question: str):
    """Worked steps of a generated problem by replaying its operators left to right."""
    import re

    tokens = re.findall(r"\d+|[+*-]", question)
    value, steps = int(tokens[0]), []
    for op, operand in zip(tokens[1::2], tokens[2::2]):
        result = {"+": value + int(operand), "-": value - int(operand), "*": value * int(operand)}[op]
        steps.append(f"{value}{op}{operand}={result}")
        value = result
    return steps, value


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """One whole toy quickstart, shared by the tests that inspect its stages."""
    from budget_reasoner import recipe
    from budget_reasoner.config import load_preset

    out = tmp_path_factory.mktemp("run") / "quick"
    preset = load_preset("cpu-tiny", dict(TINY))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(recipe, "make_teacher", lambda teacher, *args: stand_in_for(teacher))
        results = recipe.quickstart(out, preset)
    return out, preset, results
