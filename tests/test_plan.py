"""The precision plan against the real thing: peft's prepare_model_for_kbit_training and our loader on a tiny
4-bit Qwen2 on the CPU (bitsandbytes 4-bit runs there), and the estimator's bytes by hand from the plan."""

import pytest
import torch

from budget_reasoner.config import load_preset
from budget_reasoner.memory import CUDA_CONTEXT_BYTES, ModelShape, estimate_training_memory
from budget_reasoner.plan import peft_kbit_plan, plan_for, prepare_for_kbit_training

BF16_QLORA = {"quantization.load_in_4bit": True, "quantization.compute_dtype": "bfloat16", "model.attention": "sdpa",
              "lora.target_modules": ["q_proj", "v_proj"]}


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    folder = tmp_path_factory.mktemp("tiny4bit")
    config = Qwen2Config(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, tie_word_embeddings=False, max_position_embeddings=128)
    torch.manual_seed(0)
    Qwen2ForCausalLM(config).to(torch.bfloat16).save_pretrained(folder)
    return folder


def load_4bit(folder):
    """What models.load_model does on a GPU with a bf16 preset (4-bit NF4, bf16 compute), here on the CPU."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                      bnb_4bit_compute_dtype=torch.bfloat16)
    return AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.bfloat16, quantization_config=quantization,
                                                device_map="cpu")


def dtypes_of(model) -> dict[str, torch.dtype]:
    return {name: p.dtype for name, p in model.named_parameters() if p.__class__.__name__ != "Params4bit"}


def residual_dtype(model) -> torch.dtype:
    ids = torch.tensor([[1, 2, 3, 4]])
    model.train()  # bitsandbytes repacks 4-bit weights for CPU inference on an eval forward, and then cannot train
    with torch.no_grad():
        return model(ids, output_hidden_states=True).hidden_states[1].dtype  # after the first decoder layer


def test_peft_kbit_plan_says_what_peft_really_does(tiny_folder):
    from peft import prepare_model_for_kbit_training

    plan = peft_kbit_plan(plan_for(load_preset("cpu-tiny", BF16_QLORA), "sft"))
    model = prepare_model_for_kbit_training(load_4bit(tiny_folder), use_gradient_checkpointing=False)
    dtypes = dtypes_of(model)
    assert dtypes["model.embed_tokens.weight"] == dtypes["lm_head.weight"] == torch.float32  # the 150k-row upcast
    assert dtypes["model.norm.weight"] == dtypes["model.layers.0.self_attn.q_proj.bias"] == torch.float32
    assert dtypes == {name: getattr(torch, plan.dtype_for(name)) for name in dtypes}
    assert residual_dtype(model) == getattr(torch, plan.residual_dtype) == torch.float32  # the residual stream follows


def test_our_prepare_keeps_the_compute_dtype_and_lora_trains_in_fp32(tiny_folder):
    from peft import LoraConfig, get_peft_model

    plan = plan_for(load_preset("cpu-tiny", BF16_QLORA), "sft")
    model = prepare_for_kbit_training(load_4bit(tiny_folder), plan)
    dtypes = dtypes_of(model)
    assert set(dtypes.values()) == {torch.bfloat16}  # embeddings, LM head, norms, biases: nothing upcast
    assert dtypes == {name: getattr(torch, plan.dtype_for(name)) for name in dtypes}
    assert not any(p.requires_grad for p in model.parameters())
    assert residual_dtype(model) == getattr(torch, plan.residual_dtype) == torch.bfloat16
    model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    trainable = {p.dtype for p in model.parameters() if p.requires_grad}
    assert trainable == {getattr(torch, plan.lora_dtype)} == {torch.float32}
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    model(ids, labels=ids).loss.backward()  # a QLoRA step runs on this layout
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad)


def test_the_training_loader_applies_the_plan(tiny_folder, monkeypatch):
    """load_for_training on a 4-bit preset gives the model the plan's dtypes (bf16 forced here, as on a GPU)."""
    from budget_reasoner import models
    from budget_reasoner.hardware import detect
    from budget_reasoner.train import common

    preset = load_preset("cpu-tiny", BF16_QLORA)
    plan = plan_for(preset, "sft")
    monkeypatch.setattr(models, "torch_dtype", lambda preset, hardware: torch.bfloat16)
    monkeypatch.setattr(common, "training_plan", lambda preset, hardware, stage="sft": plan)
    model, _ = common.load_for_training(tiny_folder, preset, detect("cpu"))
    dtypes = dtypes_of(model)
    assert dtypes["lm_head.weight"] == dtypes["model.embed_tokens.weight"] == torch.bfloat16
    assert dtypes == {name: getattr(torch, plan.dtype_for(name)) for name in dtypes}


def test_autocast_and_logits_per_card_and_stage():
    t4 = load_preset("t4-16gb")
    assert plan_for(t4, "sft", supports_bf16=False).autocast_dtype == "float16"
    assert plan_for(load_preset("12gb"), "sft", supports_bf16=False).autocast_dtype is None  # bf16 where there is none
    assert plan_for(load_preset("12gb"), "sft", device="cpu").compute_dtype == "float32"
    assert plan_for(t4, "dpo").logits == "chunked" and plan_for(t4, "sft").logits == "chunked"
    assert plan_for(load_preset("t4-16gb", {"sft.fused_loss": False}), "sft").logits == "full"
    assert plan_for(t4, "generate").lora_dtype is None and plan_for(t4, "sft").optimizer_state_bytes == 2
    assert plan_for(t4, "sft", backend="unsloth").offload_checkpoints
    assert not plan_for(t4, "sft").offload_checkpoints


SHAPE = ModelShape(hidden=64, intermediate=128, layers=2, heads=4, kv_heads=2, vocab=100, tied=False)  # kv_dim 32


def small_preset():
    return load_preset("12gb", {"model.max_length": 16, "sft.batch_size": 2, "sft.fused_loss": False, "lora.r": 4,
                                "lora.target_modules": ["q_proj", "v_proj"], "model.attention": "sdpa"})


def test_estimate_by_hand_from_the_plan():
    """Every part of a small config's sft estimate, counted by hand; then what peft's upcast would add."""
    preset = small_preset()
    linear = 2 * (64 * 64 + 64 * 32 + 64 * 32 + 64 * 64 + 3 * 64 * 128)  # q k v o gate up down, 2 layers
    tokens = 2 * 16
    allocated = {
        "base weights (NF4)": linear * 4.127 / 8,
        "embeddings / LM head": 2 * 100 * 64 * 2,  # untied, bf16
        "dequantized layer (transient)": 64 * 128 * 2,
        "LoRA weights + grads + optimizer": 2 * 4 * ((64 + 64) + (64 + 32)) * (4 + 4 + 2),  # fp32 + 8-bit Adam
        # one bf16 hidden vector per layer, then one layer: 8 hidden-sized + 2 kv + 4 intermediate values, bf16
        "activations (checkpointed)": tokens * 2 * 64 * 2 + tokens * (8 * 64 * 2 + (2 * 32 + 4 * 128) * 2),
        "logits + loss": tokens * 100 * (2 + 4 + 4 + 4),
    }
    parts = estimate_training_memory(SHAPE, preset, "sft").parts
    assert {k: parts[k] for k in allocated} == pytest.approx(allocated)
    assert parts["allocator slack (5%)"] == pytest.approx(0.05 * sum(allocated.values()))
    assert parts["CUDA context + workspaces"] == CUDA_CONTEXT_BYTES

    upcast = estimate_training_memory(SHAPE, preset, "sft", plan=peft_kbit_plan(plan_for(preset, "sft"))).parts
    assert upcast["embeddings / LM head"] == 2 * 100 * 64 * 4
    assert upcast["LM head cast (autocast)"] == 100 * 64 * 2  # autocast's bf16 copy of the fp32 head
    assert upcast["activations (checkpointed)"] == tokens * 2 * 64 * 4 + tokens * (8 * 64 * 4 + (2 * 32 + 4 * 128) * 2)
    assert upcast["logits + loss"] == allocated["logits + loss"]  # autocast: the head's matmul is bf16 either way


@pytest.mark.parametrize("name, gib", [("12gb", 0.43), ("24gb", 2.03), ("80gb", 2.90)])
def test_what_the_upcast_would_cost_the_presets_in_weights(name, gib):
    """peft's upcast of embeddings + LM head: 1.5B (tied) +0.4 GiB, 7B +2.0, 32B +2.9 (vocab x hidden x 2 bytes each)."""
    from budget_reasoner.memory import GIB, read_model_shape

    preset = load_preset(name)
    shape = read_model_shape(preset.model.student)
    kept = estimate_training_memory(shape, preset, "sft").parts["embeddings / LM head"]
    upcast = estimate_training_memory(shape, preset, "sft", plan=peft_kbit_plan(plan_for(preset, "sft"))).parts
    assert (upcast["embeddings / LM head"] - kept) / GIB == pytest.approx(gib, abs=0.01)
