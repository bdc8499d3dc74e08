"""The fused loss wired into a model: same loss and gradients as the model's own loss."""

import copy

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from budget_reasoner.errors import BudgetReasonerError
from budget_reasoner.kernels.patch import fused_causal_lm_loss


def tiny_model():
    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return Qwen2ForCausalLM(config)


def batch():
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(97, (3, 11), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[2, 8:] = 0
    labels = input_ids.clone()
    labels[:, :4] = -100  # the prompt
    labels[attention_mask == 0] = -100
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_fused_loss_equals_the_models_own_loss_and_gradients(backend):
    assert_fused_equals_the_models_own_loss(tiny_model(), batch(), backend)


def assert_fused_equals_the_models_own_loss(model, inputs, backend):
    """The fused loss through a copy of `model` against the model's own loss, and every parameter's gradient."""
    twin = copy.deepcopy(model)
    expected = model(**inputs).loss
    expected.backward()
    got = fused_causal_lm_loss(twin, inputs, backend=backend)
    got.backward()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    for (name, p), (_, q) in zip(model.named_parameters(), twin.named_parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-6, msg=name)
    return expected


def test_lora_on_the_lm_head_is_refused():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_model(), LoraConfig(r=2, target_modules=["q_proj", "lm_head"]))
    with pytest.raises(BudgetReasonerError, match="lm_head"):
        fused_causal_lm_loss(model, batch())


def test_fused_sft_starts_from_the_same_loss_as_standard_sft(tiny_run, tmp_path):
    from budget_reasoner.train.sft import sft

    out, preset, _ = tiny_run
    losses = {}
    for fused in (False, True):
        settings = copy.deepcopy(preset)
        settings.sft.fused_loss = fused
        settings.sft.max_steps = 2
        record = sft(out / "data" / "sft" / "train.jsonl", out / "models" / "student-base", tmp_path / f"sft-{fused}", settings)
        losses[fused] = [entry["loss"] for entry in record["history"] if "loss" in entry]
    assert losses[True][0] == pytest.approx(losses[False][0], rel=1e-4)
