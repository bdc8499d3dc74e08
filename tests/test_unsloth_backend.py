"""The Unsloth backend, run for real: Unsloth 2026.10.9 falls back to the CPU when it finds no accelerator
(installed with `pip install --no-deps unsloth unsloth_zoo`, as .ci/run does). Importing it patches
transformers and TRL for the whole process, so the stages run in a child process, and the trained
adapters are compared here, in a clean process, with the same stages trained through peft (tiny_run)."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

from budget_reasoner.eval.run import load_for_inference
from budget_reasoner.hardware import detect
from budget_reasoner.io import read_json
from budget_reasoner.train.common import encode_prompt_completion

from tests.conftest import TINY

if importlib.util.find_spec("unsloth") is None:
    if os.environ.get("BUDGET_REASONER_REQUIRE_UNSLOTH"):  # CI installs it: there, a missing Unsloth is a failure
        raise RuntimeError("BUDGET_REASONER_REQUIRE_UNSLOTH is set but unsloth is not installed")
    pytest.skip("unsloth is not installed (pip install --no-deps unsloth unsloth_zoo)", allow_module_level=True)

# As a script using the API should: settle the backend (importing Unsloth) before importing a stage module.
CHILD = """
import json, sys
from budget_reasoner.config import load_preset
from budget_reasoner.hardware import prepare_backend

run, out, overrides = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
preset = load_preset("cpu-tiny", {**overrides, "model.backend": "unsloth"})
prepare_backend(preset)
from budget_reasoner.train.dpo import dpo
from budget_reasoner.train.sft import sft

sft(f"{run}/data/sft/train.jsonl", f"{run}/models/student-base", f"{out}/sft", preset)
dpo(f"{run}/data/pairs/train.jsonl", f"{out}/sft", f"{out}/dpo", preset)
import unsloth  # already imported by prepare_backend; report what ran
print("UNSLOTH_VERSION", unsloth.__version__)
"""


@pytest.fixture(scope="module")
def unsloth_run(tiny_run, tmp_path_factory):
    run, preset, _ = tiny_run
    out = tmp_path_factory.mktemp("unsloth")
    child = subprocess.run([sys.executable, "-c", CHILD, str(run), str(out), json.dumps(TINY)],
                           capture_output=True, text=True, timeout=600,
                           env={**os.environ, "UNSLOTH_DISABLE_CPU_FALLBACK": "0"})
    assert child.returncode == 0, child.stdout[-3000:] + child.stderr[-3000:]
    return run, out, preset, child.stdout + child.stderr


def _losses(stage_dir):
    return [entry["loss"] for entry in read_json(stage_dir / "stage.json")["history"] if "loss" in entry]


def test_stages_load_and_train_through_unsloth(unsloth_run):
    _, out, _, log = unsloth_run
    assert "UNSLOTH_VERSION" in log
    assert "Unsloth should be imported before" not in log  # prepare_backend ran before transformers was imported
    assert "Unsloth (CPU): Qwen2ForCausalLM" in log  # Unsloth's own loader built the model, not ours
    for stage in ("sft", "dpo"):
        record = read_json(out / stage / "stage.json")
        assert record["backend"] == "unsloth" and "backend unsloth" in record["device"]


def test_unsloth_sft_trains_the_same_model_as_peft(unsloth_run):
    """Same data, seed and LoRA init: Unsloth's loader, LoRA and chunked loss must give peft's losses and adapter."""
    run, out, preset, _ = unsloth_run
    unsloth_losses, peft_losses = _losses(out / "sft"), _losses(run / "sft")
    assert len(unsloth_losses) == len(peft_losses) == preset.sft.max_steps
    torch.testing.assert_close(torch.tensor(unsloth_losses), torch.tensor(peft_losses), rtol=1e-3, atol=1e-4)
    from safetensors.torch import load_file

    lora_b = [w for key, w in load_file(out / "sft" / "adapter" / "adapter_model.safetensors").items() if "lora_B" in key]
    assert lora_b and any(w.abs().max() > 0 for w in lora_b)  # B starts at zero: nonzero means it trained

    hardware = detect("cpu")
    tokenizer = load_for_inference(run / "sft", preset, hardware)[1]
    ids, _ = encode_prompt_completion(tokenizer, [{"role": "user", "content": "7*3-5"}], "<think>\n7*3=21\n21-5=16\n</think>\n\\boxed{16}")
    logits = {}
    for name, stage in (("unsloth", out / "sft"), ("peft", run / "sft")):
        model, _ = load_for_inference(stage, preset, hardware)  # plain transformers + peft here: the adapter is portable
        with torch.no_grad():
            logits[name] = model(input_ids=torch.tensor([ids])).logits
    torch.testing.assert_close(logits["unsloth"], logits["peft"], rtol=1e-3, atol=1e-3)


def test_unsloth_dpo_continues_the_sft_adapter(unsloth_run):
    """DPO reloads the SFT adapter through Unsloth, trainable, with its frozen copy as reference: at step one the
    policy is the reference, so the DPO term is log 2 and the loss equals peft's run from the same adapter."""
    run, out, preset, _ = unsloth_run
    unsloth_losses, peft_losses = _losses(out / "dpo"), _losses(run / "dpo")
    assert len(unsloth_losses) == preset.dpo.max_steps
    assert unsloth_losses[0] == pytest.approx(peft_losses[0], rel=1e-3)
    from safetensors.torch import load_file

    sft_weights = load_file(out / "sft" / "adapter" / "adapter_model.safetensors")
    dpo_weights = load_file(out / "dpo" / "adapter" / "adapter_model.safetensors")
    assert set(sft_weights) == set(dpo_weights)
    assert any(not torch.equal(sft_weights[key], dpo_weights[key]) for key in sft_weights)  # it trained on
