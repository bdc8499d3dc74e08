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
