"""The GPU presets' whole combination, run end to end through the real Trainers on the CPU: an NF4 4-bit base,
bf16 autocast, gradient checkpointing, the fused loss, LoRA, the budget_flash attention kernel and the preset's
paged 8-bit AdamW, for sft, dpo and distill (teacher cache included), on random weights of Qwen2.5-0.5B's real
shape cut to 2 layers (its 151,936-token vocabulary and 896 hidden kept: the LM head is the part the fused loss
exists for).

Named stand-ins, because this is a CPU:
- the precision plan is the CUDA one (bf16 compute and autocast, as on a bf16 card) while tensors stay on the
  CPU: plan.py gives the CPU fp32 and no autocast only because bf16 matmuls are slow on some CPUs;
- budget_flash's Triton kernel runs under TRITON_INTERPRET=1 (tests/conftest.py), at the interpreter's block table;
- paged_adamw_8bit runs as bitsandbytes' 8-bit AdamW with its paging off (paged buffers need CUDA's unified memory);
- the tokenizer is a small offline BPE: its ids are a subset of the model's 151,936-row head, which is whole.
"""

import dataclasses
import json

import pytest
import torch

from budget_reasoner import plan as plan_module
from budget_reasoner.config import load_preset
from budget_reasoner.hardware import Hardware
from budget_reasoner.io import write_jsonl
from budget_reasoner.kernels import attention, patch

from tests.conftest import PROJECT_DATA

# Few steps: the attention kernel under the Triton interpreter costs ~1 s a layer call at these shapes.
STEPS = {"sft": 2, "dpo": 1, "distill": 1}
OVERRIDES = {
    "model.max_length": 128,
    "sft.max_steps": STEPS["sft"], "sft.batch_size": 2, "sft.grad_accum": 1, "sft.save_steps": 100,
    "dpo.max_steps": STEPS["dpo"], "dpo.batch_size": 1, "dpo.grad_accum": 1, "dpo.save_steps": 100,
    "distill.max_steps": STEPS["distill"], "distill.batch_size": 2, "distill.grad_accum": 1, "distill.save_steps": 100,
    "sft.learning_rate": 1e-3, "dpo.learning_rate": 1e-3, "distill.learning_rate": 1e-3,  # a visible move in few steps
    "lora.dropout": 0.0,  # the budget_flash kernel takes no dropout: with it the attention would fall back to SDPA
}


# What the LoRA weights train in: fp32, as plan.py says, in every stage. TRL 1.16's SFTTrainer and DPOTrainer cast
# a quantized model's trainable weights to bf16 (their QLoRA recipe); train_with_resume casts them back.
LORA_DTYPE = {"sft": torch.float32, "dpo": torch.float32, "distill": torch.float32}


def qwen_cut_to_two_layers(folder, tokenizer):
    """Random weights in Qwen2.5-0.5B-Instruct's shape (data/model_configs), 2 of its 24 layers, saved in bf16."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    shape = json.loads((PROJECT_DATA / "model_configs" / "Qwen2.5-0.5B-Instruct.json").read_text())
    config = Qwen2Config(**{**{key: value for key, value in shape.items() if key != "model_type"}, "num_hidden_layers": 2})
    config.pad_token_id, config.eos_token_id, config.bos_token_id = tokenizer.pad_token_id, tokenizer.eos_token_id, None
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    from budget_reasoner.models import build_tokenizer

    root = tmp_path_factory.mktemp("combo")
    chains = [(a, b) for a in range(2, 9) for b in range(1, 4)]
    answer = lambda a, b, wrong=0: f"<think>\n{a}*{b}={a * b}\n</think>\n\\boxed{{{a * b + wrong}}}"
    prompt = lambda a, b: [{"role": "user", "content": f"{a}*{b}"}]
    sft_rows = [{"prompt": prompt(a, b), "completion": [{"role": "assistant", "content": answer(a, b)}]} for a, b in chains]
    pairs = [{"prompt": prompt(a, b), "chosen": [{"role": "assistant", "content": answer(a, b)}],
              "rejected": [{"role": "assistant", "content": answer(a, b, 1)}]} for a, b in chains]
    write_jsonl(root / "sft.jsonl", sft_rows[:4])
    write_jsonl(root / "pairs.jsonl", pairs[:2])
    tokenizer = build_tokenizer([row["prompt"][0]["content"] + row["completion"][0]["content"] for row in sft_rows])
    qwen_cut_to_two_layers(root / "qwen-2l", tokenizer)
    return root


class Probe:
    """What one stage's training did, seen from hooks on its model (installed when its trainer is built)."""

    def __init__(self, trainer):
        self.trainer, self.mlp_calls, self.recomputes, self.autocast, self.lora_dtypes = trainer, 0, 0, set(), set()
        self.gradient_checkpointing = set()
        model = trainer.model
        layers = [m for m in model.modules() if type(m).__name__.endswith("DecoderLayer")]
        self.lora = [m for m in model.modules() if hasattr(m, "lora_A") and hasattr(m, "base_layer")]
        layers[0].register_forward_hook(self.on_layer)
        self.lora[0].lora_A["default"].register_forward_hook(lambda module, args, out: self.lora_dtypes.add(out.dtype))

    def on_layer(self, module, args, output):
        # the condition under which transformers 5's GradientCheckpointingLayer hands its forward to torch's
        # checkpoint (a recompute count is not observable from hooks: torch's non-reentrant recompute runs none)
        self.gradient_checkpointing.add(module.gradient_checkpointing and module.training and torch.is_grad_enabled())
        self.autocast.add(torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None)


@pytest.fixture(scope="module")
def combo(workspace):
    """sft -> dpo (from sft) -> teacher cache + distill (from dpo), the '12gb' preset on the CPU with stand-ins."""
    from budget_reasoner.train import common, distill as distill_module, dpo as dpo_module, sft as sft_module

    root, preset = workspace, load_preset("12gb", dict(OVERRIDES))
    assert preset.model.attention == "budget_flash" and preset.sft.fused_loss and preset.quantization.load_in_4bit
    hardware = Hardware("cpu", "cpu", None, None, "cpu")
    probes, fused_calls = {}, {"cross_entropy": 0, "kd": 0}
    real_plan_for, real_train = plan_module.plan_for, common.train_with_resume
    real_ce, real_kd = patch.fused_linear_cross_entropy, patch.fused_linear_kd_loss

    def cuda_plan_on_cpu(preset, stage, device="cuda", backend="bitsandbytes", supports_bf16=True):
        return dataclasses.replace(real_plan_for(preset, stage, "cuda", backend, True), device=device)

    def train_with_probe(stage):
        def train(trainer, out):
            probes[stage] = Probe(trainer)
            return real_train(trainer, out)
        return train

    def counting(name, function):
        def wrapped(*args, **kwargs):
            fused_calls[name] += 1
            return function(*args, **kwargs)
        return wrapped

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(plan_module, "plan_for", cuda_plan_on_cpu)
        mp.setattr(patch, "fused_linear_cross_entropy", counting("cross_entropy", real_ce))
        mp.setattr(patch, "fused_linear_kd_loss", counting("kd", real_kd))
        for module, stage in ((sft_module, "sft"), (dpo_module, "dpo"), (distill_module, "distill")):
            mp.setattr(module, "train_with_resume", train_with_probe(stage))
        attention.reset_attention_usage()
        records = {"sft": sft_module.sft(root / "sft.jsonl", root / "qwen-2l", root / "sft", preset, hardware)}
        records["dpo"] = dpo_module.dpo(root / "pairs.jsonl", root / "sft", root / "dpo", preset, hardware)
        distill_module.cache_teacher_topk(root / "qwen-2l", root / "sft.jsonl", root / "cache", preset, hardware)
        records["distill"] = distill_module.distill(root / "cache", root / "dpo", root / "distill", preset, hardware)
    return root, records, probes, fused_calls, attention.attention_usage()


def _adapter(stage_dir):
    from safetensors.torch import load_file

    return load_file(stage_dir / "adapter" / "adapter_model.safetensors")


@pytest.mark.parametrize("stage", ["sft", "dpo", "distill"])
def test_each_stage_trains_the_adapter_over_a_4bit_base_in_bf16_autocast(combo, stage):
    root, records, probes, _, _ = combo
    probe = probes[stage]
    losses = [entry["loss"] for entry in records[stage]["history"] if "loss" in entry]
    assert len(losses) == STEPS[stage] and all(torch.isfinite(torch.tensor(losses)))
    base = probe.lora[0].base_layer
    assert type(base.weight).__name__ == "Params4bit" and base.weight.quant_type == "nf4"
    assert all(type(m.base_layer.weight).__name__ == "Params4bit" for m in probe.lora)  # every adapted linear is NF4
    assert probe.autocast == {torch.bfloat16}  # every decoder-layer call ran inside bf16 autocast
    assert probe.lora_dtypes == {torch.bfloat16}  # the LoRA matmuls too, though their weights are fp32
    trainable = {p.dtype for p in probe.trainer.model.parameters() if p.requires_grad}
    assert trainable == {LORA_DTYPE[stage]}, trainable
    assert True in probe.gradient_checkpointing  # every training forward (dpo's reference runs without grad)
    assert callable(getattr(probe.lora[0], "_gradient_checkpointing_func", None)) or any(
        callable(getattr(m, "_gradient_checkpointing_func", None)) for m in probe.trainer.model.modules())
    before = {"sft": None, "dpo": root / "sft", "distill": root / "dpo"}[stage]
    after = _adapter(root / stage)
    if before is None:  # fresh LoRA: B starts at zero
        assert any(w.abs().max() > 0 for key, w in after.items() if "lora_B" in key)
    else:
        previous = _adapter(before)
        assert set(previous) == set(after) and any(not torch.equal(previous[k], after[k]) for k in after)


def test_sft_checkpoints_every_training_forward(combo):
    assert combo[2]["sft"].gradient_checkpointing == {True}


def test_the_fused_losses_ran_in_sft_and_distill(combo):
    """sft's cross-entropy and distill's KD blend went through the chunked fused losses, once per forward; DPO uses
    TRL's own chunked LM head (plan.py), so it adds none."""
    fused_calls = combo[3]
    assert fused_calls == {"cross_entropy": STEPS["sft"], "kd": STEPS["distill"]}


def test_the_paged_8bit_optimizer_that_ran(combo):
    """The preset names paged_adamw_8bit: bitsandbytes' AdamW with 8-bit state ran; on the CPU its paging is off."""
    probes = combo[2]
    for stage, probe in probes.items():
        optimizer = probe.trainer.optimizer.optimizer  # accelerate's wrapper around the real one
        assert type(optimizer).__module__.startswith("bitsandbytes.optim"), type(optimizer)
        assert type(optimizer).__name__ in ("AdamW", "PagedAdamW8bit", "PagedAdamW", "AdamW8bit")
        assert optimizer.args.optim_bits == 8 and optimizer.is_paged
        states = [optimizer.state[p] for group in optimizer.param_groups for p in group["params"] if optimizer.state[p]]
        assert states and any(state["state1"].dtype == torch.uint8 for state in states), stage  # 8-bit moments
        assert not any(getattr(state["state1"], "is_paged", False) for state in states)  # the CPU stand-in


def test_attention_ran_on_the_budget_flash_kernel(combo):
    usage = combo[4]
    kernel = usage.get(attention.KERNEL, 0) + usage.get(attention.KERNEL_PADDED, 0)
    assert kernel > 0, usage
    assert not [name for name in usage if name.startswith("SDPA") and "decoding" not in name], usage
