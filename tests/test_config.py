import pytest

from budget_reasoner.config import Preset, available_presets, load_preset
from budget_reasoner.errors import BudgetReasonerError


def test_cpu_tiny_loads_into_typed_dataclasses():
    preset = load_preset("cpu-tiny")
    assert isinstance(preset, Preset)
    assert preset.name == "cpu-tiny"
    assert preset.model.tiny_student.hidden_size == 128
    assert preset.pretrain.learning_rate == pytest.approx(3e-3)  # "3.0e-3" in YAML is a float
    assert "cpu-tiny" in available_presets()


def test_any_preset_file_loads(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("sft:\n  max_steps: 7\n  learning_rate: 1e-4\n")
    preset = load_preset(path)
    assert preset.name == "mine"
    assert preset.sft.max_steps == 7
    assert preset.sft.learning_rate == pytest.approx(1e-4)
    assert preset.dpo.beta == Preset().dpo.beta  # untouched sections keep their defaults


def test_dotted_overrides():
    preset = load_preset("cpu-tiny", {"sft.max_steps": 3, "model.tiny_student.num_layers": 1})
    assert preset.sft.max_steps == 3 and preset.model.tiny_student.num_layers == 1


@pytest.mark.parametrize(
    "text, message",
    [
        ("sft:\n  max_stepz: 3\n", "unknown key 'sft.max_stepz'"),
        ("sft:\n  max_steps: many\n", "sft.max_steps must be int, got str 'many'"),
        ("lora:\n  r: true\n", "lora.r must be int, got bool"),
        ("sft: 3\n", "sft must be a mapping"),
        ("lora:\n  target_modules: q_proj\n", "lora.target_modules must be a list"),
        ("sft: [unclosed\n", "is not valid YAML"),
        ("- just\n- a list\n", "a preset must be a mapping"),
    ],
)
def test_bad_preset_is_one_line_naming_file_and_key(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(BudgetReasonerError) as error:
        load_preset(path)
    assert message in str(error.value)
    assert str(path) in str(error.value)
    assert "\n" not in str(error.value)


def test_unknown_preset_name_lists_the_known_ones():
    with pytest.raises(BudgetReasonerError, match="unknown preset 'nope'.*cpu-tiny"):
        load_preset("nope")
    with pytest.raises(BudgetReasonerError, match="preset file not found"):
        load_preset("missing.yaml")


# ---- Ranges and cross-field rules, through the CLI as a user meets them ----------------------------------

CPU_TINY = "presets/cpu-tiny.yaml"


@pytest.mark.parametrize(
    "override, message",
    [
        # before: trained 1 step (0) or 3 epochs (-5) and marked the stage complete
        ("sft.max_steps=0", f"{CPU_TINY} (overridden: sft.max_steps): sft.max_steps must be >= 1, got 0"),
        ("sft.max_steps=-5", "sft.max_steps must be >= 1, got -5"),
        ("dpo.max_steps=0", "dpo.max_steps must be >= 1, got 0"),  # a subclass obeys its base's rules
        # before: passed the validator and died later inside peft, torch or transformers
        ("lora.r=0", "lora.r must be >= 1, got 0"),
        ("sft.batch_size=0", "sft.batch_size must be >= 1, got 0"),
        ("model.max_length=0", "model.max_length must be >= 1, got 0"),
        ("generate.samples_per_problem=0", "generate.samples_per_problem must be >= 1, got 0"),
        ("generate.shard_size=0", "generate.shard_size must be >= 1, got 0"),
        ("generate.temperature=-0.5", "generate.temperature must be >= 0, got -0.5"),
        ("eval.temperature=-1", "eval.temperature must be >= 0, got -1.0"),
        ("distill.temperature=0", "distill.temperature must be > 0, got 0.0"),
        ("lora.dropout=1", "lora.dropout must be in [0, 1), got 1.0"),
        ("sft.optimizer=nonsense", "sft.optimizer must be one of adamw_torch, adamw_torch_fused,"),
        ("model.attention=bogus", "model.attention must be one of sdpa, eager, budget_flash, got 'bogus'"),
        ("quantization.compute_dtype=float8", "quantization.compute_dtype must be one of bfloat16, float16, float32"),
        # cross-field
        ("generate.batch_size=2", f"{CPU_TINY} (overridden: generate.batch_size): generate.batch_size must be "
                                  ">= generate.samples_per_problem, got 2"),
        ("generate.min_steps=5", "generate.max_steps must be >= generate.min_steps, got 3"),
        ("model.tiny_student.num_heads=3", "model.tiny_student.hidden_size must be a multiple of model.tiny_student.num_heads"),
        # before: raw tracebacks (a 75-line YAML one; an AttributeError)
        ("sft.max_steps=[1", "--set 'sft.max_steps=[1': '[1' is not a valid value"),
        ("sft.max_steps.x=1", "cannot set sft.max_steps.x: sft.max_steps is a value (800), not a section"),
        ("=3", "--set '=3': expected KEY=VALUE"),
        ("sft..max_steps=3", "expected KEY=VALUE"),
    ],
)
def test_a_bad_override_is_one_line_naming_the_key_and_the_range(override, message):
    result = _cli("eval", "--model", "none", "--problems", "none.jsonl", "--preset", "cpu-tiny", "--set", override)
    assert message in result.output
    _assert_one_error_line(result)


@pytest.mark.parametrize(
    "options, message",
    [
        # before: --samples 0 and --think-budget -5 were silently ignored
        (("--samples", "0"), "Invalid value for '--samples': Input should be greater than or equal to 1"),
        (("--think-budget", "-5"), "Invalid value for '--think-budget': Input should be greater than or equal to 0"),
        (("--max-waits", "-1"), "Invalid value for '--max-waits'"),
        # options go through the preset's rules too, cross-field ones included
        (("--think-budget", "4", "--min-think", "9"), "eval.min_think_tokens must be <= eval.think_budget, got 9"),
        (("--samples", "1000"), "eval.batch_size must be >= eval.maj_k, got 512"),
    ],
)
def test_eval_options_are_checked(options, message):
    result = _cli("eval", "--model", "none", "--problems", "none.jsonl", "--preset", "cpu-tiny", *options)
    assert message in " ".join(result.output.replace("│", " ").split()), result.output  # typer wraps its usage box
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert isinstance(result.exception, SystemExit)


def test_a_bad_value_in_a_file_names_the_file_not_an_override(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("sft:\n  warmup_ratio: 1.5\n")
    with pytest.raises(BudgetReasonerError, match=rf"^{path}: sft.warmup_ratio must be in \[0, 1\], got 1.5$"):
        load_preset(path)


@pytest.mark.parametrize("name", available_presets())
def test_every_shipped_preset_validates(name):
    preset = load_preset(name)
    assert preset.name == name


def test_optimizer_names_are_ones_transformers_knows():
    from transformers.training_args import OptimizerNames

    from budget_reasoner.config import OPTIMIZERS

    assert set(OPTIMIZERS) <= {name.value for name in OptimizerNames}


def test_max_length_against_the_models_positions():
    from budget_reasoner.config import check_positions

    preset = load_preset("cpu-tiny")
    check_positions(preset, 96, "m")
    with pytest.raises(BudgetReasonerError, match="model.max_length must be <= 64 \\(the positions of m\\), got 96"):
        check_positions(preset, 64, "m")


def _cli(*args):
    from typer.testing import CliRunner

    from budget_reasoner.cli import app

    return CliRunner().invoke(app, list(args))


def _assert_one_error_line(result):
    assert result.exit_code == 2, result.output
    assert isinstance(result.exception, SystemExit), result.exception  # not an uncaught error the runner swallowed
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert "Traceback" not in result.output


def test_loading_a_model_too_short_for_max_length_is_one_line(tmp_path):
    from budget_reasoner.hardware import detect
    from budget_reasoner.models import build_tiny_model, build_tokenizer, load_model

    tokenizer = build_tokenizer(["3+4=7", "9*2=18"] * 10, vocab_size=300)
    build_tiny_model(tokenizer, load_preset("cpu-tiny").model.tiny_student, max_positions=64, seed=0).save_pretrained(tmp_path)
    with pytest.raises(BudgetReasonerError, match=f"model.max_length must be <= 64 \\(the positions of {tmp_path}\\), got 96"):
        load_model(tmp_path, load_preset("cpu-tiny"), detect("cpu"))
    assert load_model(tmp_path, load_preset("cpu-tiny", {"model.max_length": 64}), detect("cpu")).config.max_position_embeddings == 64
