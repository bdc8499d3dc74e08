"""One precision-and-memory plan per stage: what is 4-bit, what is upcast and to what, the autocast dtype,
whether logits are full or chunked, what the optimizer holds. The loaders (train/common.py), the trainers'
mixed-precision flags and the estimator (memory.py) all read it, so none of them can restate it differently.

What each backend really does to a QLoRA base (read at the installed versions):
- peft 0.21 `prepare_model_for_kbit_training` (utils/other.py) freezes every parameter and casts every fp16/bf16
  parameter that is not `Params4bit` to fp32: the embeddings, the LM head, the norms and the linear biases.
  fp32 norm weights then promote each norm's output to fp32, bitsandbytes' Linear4bit returns its input's
  dtype, and so the residual stream between layers becomes fp32 too. On the 152k-row Qwen2.5 vocabulary that
  is +0.4 GiB of weights on the tied 1.5B, +2.0 GiB on the 7B and +2.9 GiB on the 32B, and twice the bytes
  for every hidden state that gradient checkpointing keeps.
- Unsloth 2026.10.9 (`unsloth_zoo.training_utils.prepare_model_for_training`, reached through its own
  `prepare_model_for_kbit_training` from `get_peft_model`) casts only the trainable parameters: LoRA A/B to
  fp32; the frozen embeddings, norms and LM head keep the dtype they were loaded in (its fp32 norm upcast is
  for full fine-tuning only). Its "unsloth" gradient checkpointing keeps the checkpointed hidden states in
  host RAM.
- peft's `get_peft_model` / `PeftModel.from_pretrained` keep LoRA adapters in fp32 over a bf16/fp16 base
  (autocast_adapter_dtype=True); TRL 1.16's SFT and DPO trainers do not call prepare_model_for_kbit_training.

Our choice on the bitsandbytes path: no peft upcast. `prepare_for_kbit_training` below freezes the base and
keeps the frozen non-4-bit parameters in the compute dtype, as Unsloth and TRL's QLoRA recipes do. Why that is
safe for training: nothing frozen is ever updated, so fp32 storage buys no optimizer precision; under the
Trainer's autocast the LM head and every matmul run in the compute dtype anyway (an fp32 LM head is only cast
down again, a transient 150k x hidden copy per forward); Qwen2/Llama RMSNorm already normalizes in fp32
internally; the embedding lookup is exact in the dtype the checkpoint was stored in. The trainable LoRA
weights stay fp32, which is where precision matters (Adam's updates, fp16's GradScaler). The two backends
then run the same numerics, so a trainer sees one dtype layout on either.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
TRAINING_STAGES = ("sft", "dpo", "distill")
INFERENCE_STAGES = ("generate", "cache", "eval")


@dataclass(frozen=True)
class Plan:
    stage: str
    backend: str  # "unsloth" | "bitsandbytes" | "cpu"
    device: str  # "cuda" | "cpu"
    compute_dtype: str  # what the base loads in and bitsandbytes dequantizes to
    autocast_dtype: str | None  # the Trainer's mixed precision (its bf16/fp16 flag); None: none
    four_bit: bool  # the decoder's linear weights are NF4 (Params4bit); never cast
    embeddings_dtype: str  # embed_tokens and an untied lm_head
    norms_dtype: str  # norm weights and linear biases
    residual_dtype: str  # hidden states between layers: what gradient checkpointing keeps
    lora_dtype: str | None  # trainable adapters (None: an inference stage)
    optimizer_state_bytes: int  # per trainable parameter: 8-bit Adam keeps 2 bytes, fp32 Adam 8
    logits: str  # "full" (tokens x vocab at once) | "chunked" (one chunk of fp32 logits at a time)
    offload_checkpoints: bool  # checkpointed hidden states live in host RAM (Unsloth's checkpointing)

    @property
    def training(self) -> bool:
        return self.lora_dtype is not None

    @property
    def logits_dtype(self) -> str:
        """The dtype the LM head's matmul produces: autocast's, else the head's own."""
        return self.autocast_dtype or self.embeddings_dtype

    def dtype_for(self, name: str) -> str | None:
        """The dtype this plan gives the non-4-bit base parameter `name` (None: a LoRA or 4-bit one, not ours)."""
        if "lora_" in name:
            return None
        if "embed_tokens" in name or "lm_head" in name:
            return self.embeddings_dtype
        if "norm" in name or name.endswith(".bias"):
            return self.norms_dtype
        return self.compute_dtype  # a full-precision linear weight (4-bit off)


def autocast_dtype(compute_dtype: str, device: str, supports_bf16: bool) -> str | None:
    """The Trainer's mixed precision: bf16 only where the card has it, fp16 on CUDA, none on the CPU (fp32)."""
    if device != "cuda":
        return None
    if compute_dtype == "bfloat16":
        return "bfloat16" if supports_bf16 else None
    return "float16" if compute_dtype == "float16" else None


def plan_for(preset, stage: str, device: str = "cuda", backend: str = "bitsandbytes", supports_bf16: bool = True) -> Plan:
    """The plan of `stage` under `preset` on a device/backend (the estimator's default: a bf16-capable card on the
    bitsandbytes path, which keeps every checkpointed hidden state on the card: the conservative one)."""
    if stage not in TRAINING_STAGES + INFERENCE_STAGES:
        from budget_reasoner.errors import BudgetReasonerError

        raise BudgetReasonerError(f"stage must be one of {', '.join(TRAINING_STAGES + INFERENCE_STAGES)}, got {stage!r}")
    # on the CPU every weight is fp32: bf16 matmuls are ~13x slower on its class of CPU (models.torch_dtype)
    compute = "float32" if device == "cpu" else preset.quantization.compute_dtype
    training = stage in TRAINING_STAGES
    settings = getattr(preset, stage) if training else None
    return Plan(
        stage=stage, backend=backend, device=device, compute_dtype=compute,
        autocast_dtype=autocast_dtype(compute, device, supports_bf16) if training else None,
        four_bit=preset.quantization.load_in_4bit,
        embeddings_dtype=compute, norms_dtype=compute, residual_dtype=compute,  # no upcast (module docstring)
        lora_dtype="float32" if training else None,
        optimizer_state_bytes=(2 if "8bit" in settings.optimizer else 8) if training else 0,
        # TRL's DPO and our distill always go through a chunked LM head; sft when the preset asks
        logits="chunked" if training and (stage != "sft" or settings.fused_loss) else "full",
        offload_checkpoints=training and backend == "unsloth" and device == "cuda" and settings.gradient_checkpointing,
    )


def training_plan(preset, hardware, stage: str = "sft") -> Plan:
    """The plan on this machine (hardware.Hardware). The loader and the Trainer's mixed-precision flags read its
    dtypes, which are the same for every training stage; only logits and the optimizer differ by stage."""
    return plan_for(preset, stage, hardware.device, hardware.backend, hardware.supports_bf16)


def peft_kbit_plan(plan: Plan) -> Plan:
    """What peft's prepare_model_for_kbit_training would have made of `plan`: every fp16/bf16 base parameter
    that is not 4-bit in fp32, and the residual stream with it. Kept to measure what not calling it saves."""
    if not plan.four_bit:
        return plan  # we call it (and peft casts) only on a 4-bit base
    return dataclasses.replace(plan, embeddings_dtype="float32", norms_dtype="float32", residual_dtype="float32")


def prepare_for_kbit_training(model, plan: Plan):
    """Our replacement for peft's prepare_model_for_kbit_training (without gradient checkpointing, which the
    trainers turn on): freeze the base and give each non-4-bit parameter the plan's dtype."""
    import torch

    for name, param in model.named_parameters():
        param.requires_grad = False
        wanted = plan.dtype_for(name)
        if param.__class__.__name__ == "Params4bit" or wanted is None or not param.is_floating_point():
            continue
        dtype = getattr(torch, wanted)
        if param.dtype != dtype:
            param.data = param.data.to(dtype)
    return model
