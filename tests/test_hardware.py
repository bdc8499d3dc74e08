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
