"""Backend choice in one place: hardware.detect, on a faked CUDA machine with and without Unsloth."""

import types

import pytest

from budget_reasoner import hardware
from budget_reasoner.config import load_preset
from budget_reasoner.errors import BudgetReasonerError


@pytest.fixture
def machine(monkeypatch):
    """Set what is present: `machine(cuda=..., unsloth=...)`; importing Unsloth is recorded, not done."""
    imported = []

    def configure(cuda: bool, unsloth: bool):
        monkeypatch.setattr(hardware.torch.cuda, "is_available", lambda: cuda)
        props = types.SimpleNamespace(name="NVIDIA GeForce RTX 4090", total_memory=24 * 2**30, major=8, minor=9)
        monkeypatch.setattr(hardware.torch.cuda, "get_device_properties", lambda index: props)
        real_find_spec = hardware.importlib.util.find_spec
        monkeypatch.setattr(hardware.importlib.util, "find_spec",
                            lambda name: (object() if unsloth else None) if name == "unsloth" else real_find_spec(name))
        monkeypatch.setattr(hardware, "import_unsloth", lambda: imported.append("unsloth"))
        return imported

    return configure


@pytest.mark.parametrize("cuda, unsloth, requested, expected", [
    (True, True, "auto", "unsloth"),  # a CUDA machine with Unsloth: its fast path
    (True, False, "auto", "bitsandbytes"),
    (False, True, "auto", "cpu"),  # Unsloth's CPU fallback is never chosen by default
    (False, False, "auto", "cpu"),
    (True, True, "bitsandbytes", "bitsandbytes"),  # the preset can opt out of Unsloth
    (False, True, "unsloth", "unsloth"),  # ... or insist on it (how CI runs Unsloth on the CPU)
])
def test_backend_choice(machine, cuda, unsloth, requested, expected):
    imported = machine(cuda, unsloth)
    chosen = hardware.detect("auto", requested)
    assert chosen.backend == expected
    assert chosen.device == ("cuda" if cuda else "cpu")
    assert f"backend {expected}" in chosen.describe()
    assert imported == (["unsloth"] if expected == "unsloth" else [])  # imported before any trainer exists


def test_unsloth_requested_but_missing_names_the_fix(machine):
    machine(cuda=True, unsloth=False)
    with pytest.raises(BudgetReasonerError, match=r"model.backend: unsloth, but unsloth is not installed; pip install"):
        hardware.detect("auto", "unsloth")


def test_preset_backend_is_validated():
    assert load_preset("cpu-tiny", {"model.backend": "unsloth"}).model.backend == "unsloth"
    with pytest.raises(BudgetReasonerError, match=r"model.backend must be one of auto, unsloth, bitsandbytes, got 'vllm'"):
        load_preset("cpu-tiny", {"model.backend": "vllm"})


# Every card of the table: what --preset auto picks from the memory torch reports (old: nominal GB vs GiB).
CHOSEN = {
    "rtx4060": "8gb",  # was cpu-tiny: 7.63 GiB < 8
    "rtx3060": "12gb",  # was 8gb
    "t4": "t4-16gb",  # was 12gb: bf16 compute on a card without bf16
    "rtx4060ti": "16gb",  # was t4-16gb
    "a10g": "24gb", "l4": "24gb", "rtx3090": "24gb", "rtx4090": "24gb",  # were 16gb
    "a100-40gb": "48gb",  # since the 48gb preset decodes 8 sequences at once (sized to a 12 h plan): 86% of it
    "l40s": "48gb",  # was 24gb
    "h100": "80gb", "a100-80gb": "80gb",  # were 48gb
    "h200": "80gb",
}


def test_the_card_table_is_what_torch_reports():
    assert {card.key for card in hardware.CARDS} == set(CHOSEN)
    for card in hardware.CARDS:  # bf16 exactly from sm_80 on
        assert card.hardware().supports_bf16 == (card.capability >= (8, 0))
    assert hardware.card("Tesla T4").total_gib == 14.75 and hardware.card("A100 80GB").key == "a100-80gb"
    assert hardware.card("RTX-4090").capability == (8, 9)
    with pytest.raises(BudgetReasonerError, match=r"--gpu 'v100' is not in the card table; one of"):
        hardware.card("v100")


@pytest.mark.parametrize("key", sorted(CHOSEN))
def test_each_card_gets_the_largest_preset_that_fits_it(key):
    from budget_reasoner.config import available_presets, load_preset
    from budget_reasoner.memory import preset_fits, recommend_preset

    card = hardware.card(key)
    name, why = recommend_preset(card.hardware())
    assert name == CHOSEN[key], why
    preset = load_preset(name)
    assert preset_fits(preset, card.total_gib)[0]  # against the GiB torch reports, not the preset's name
    assert preset.quantization.compute_dtype == ("bfloat16" if card.capability >= (8, 0) else "float16")
    for other in map(load_preset, available_presets()):  # and nothing larger for this kind of card fits it
        if other.vram_gb > preset.vram_gb and (other.quantization.compute_dtype == "bfloat16") == (card.capability >= (8, 0)):
            assert not preset_fits(other, card.total_gib)[0], other.name


def test_presets_recommend_answers_without_a_gpu():
    from typer.testing import CliRunner

    from budget_reasoner.cli import app

    result = CliRunner().invoke(app, ["presets", "recommend", "--gpu", "t4"])
    assert result.exit_code == 0 and result.output.startswith("t4-16gb: Tesla T4 (14.75 GiB"), result.output
    assert CliRunner().invoke(app, ["presets", "recommend", "--vram-gib", "7.6"]).output.startswith("8gb: ")
    assert CliRunner().invoke(app, ["presets", "recommend", "--vram-gib", "3"]).output.startswith("cpu-tiny: ")
    result = CliRunner().invoke(app, ["presets", "recommend", "--gpu", "v100"])
    assert result.exit_code == 2 and "not in the card table" in result.output


def fake_card(monkeypatch, key):
    card = hardware.card(key)
    props = types.SimpleNamespace(name=card.name, total_memory=int(card.total_gib * 2**30), major=card.capability[0],
                                  minor=card.capability[1])
    monkeypatch.setattr(hardware.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(hardware.torch.cuda, "get_device_properties", lambda index: props)
    monkeypatch.setattr(hardware.importlib.util, "find_spec", lambda name: None)  # no Unsloth


def test_a_preset_too_big_for_the_card_is_one_line_before_any_model_loads(monkeypatch):
    from budget_reasoner.config import load_preset

    fake_card(monkeypatch, "rtx3060")
    with pytest.raises(BudgetReasonerError, match=r"preset 24gb does not fit NVIDIA GeForce RTX 3060: its grpo stage is "
                                                  r"estimated at 19\.7 GiB, over 10\.6 of its 11\.8 GiB .*--preset 12gb fits it"):
        hardware.hardware_for(load_preset("24gb"))
    assert hardware.hardware_for(load_preset("12gb")).backend == "bitsandbytes"
    fake_card(monkeypatch, "t4")
    with pytest.raises(BudgetReasonerError, match=r"preset 12gb computes in bfloat16, which Tesla T4 \(sm_75\) lacks; add "
                                                  r"--set quantization.compute_dtype=float16, or use --preset t4-16gb"):
        hardware.hardware_for(load_preset("12gb"))
    assert hardware.hardware_for(load_preset("t4-16gb")).total_memory_gb == pytest.approx(14.75)
