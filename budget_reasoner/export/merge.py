"""Fold a stage's LoRA adapter into a 16-bit (or fp32) copy of its base: a checkpoint plain transformers loads.

Which base weights the adapter is added to matters. On a 4-bit (QLoRA) preset the adapter was trained against
the *dequantized NF4* weights: every forward pass of training computed dequant(NF4(W)) x + B A x. Adding B A to
the original 16-bit W instead gives a model that never existed in training (W - dequant(NF4(W)) is noise of a few
percent of each weight); that is the merge bug Unsloth shipped until 2026. Merging into the 4-bit layer, as peft's
bnb merge does, re-quantizes W' = dequant + B A and rounds the adapter away (peft warns that generations may
differ). So the default here is what the stage trained against: the dequantized NF4 weights when it trained on a
4-bit base, the original weights when it did not (cpu-tiny). `merge_into="original"` stays available, for an
adapter meant to be applied to the full-precision model; the export gate measures how far either is from the
adapter-on-base.

The addition runs in fp32 and rounds once to the export dtype (peft's own merge adds in the weight's dtype).
"""

from __future__ import annotations

from pathlib import Path

import torch

from budget_reasoner.errors import BudgetReasonerError
from budget_reasoner.io import read_json

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
COMPUTE_TO_EXPORT = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
MERGE_TARGETS = ("dequantized", "original")


def export_dtype(requested: str, preset) -> str:
    """'auto' is the dtype the stage computed in (bf16 on bf16 GPUs, fp16 on a T4, fp32 on the CPU preset)."""
    if requested == "auto":
        return COMPUTE_TO_EXPORT[preset.quantization.compute_dtype]
    if requested not in DTYPES:
        raise BudgetReasonerError(f"--dtype must be auto, {', '.join(DTYPES)}; got {requested!r}")
    return requested


def merge_target(requested: str, preset) -> str:
    """'auto': the weights the adapter was trained against (see the module's docstring)."""
    trained_on_4bit = preset.quantization.load_in_4bit
    if requested == "auto":
        return "dequantized" if trained_on_4bit else "original"
    if requested not in MERGE_TARGETS:
        raise BudgetReasonerError(f"--merge-into must be auto, {', '.join(MERGE_TARGETS)}; got {requested!r}")
    if requested == "dequantized" and not trained_on_4bit:
        raise BudgetReasonerError("--merge-into dequantized: this stage trained on the full-precision base (4-bit off), "
                                  "so there are no NF4 weights it was trained against; use auto or original")
    return requested


def check_plain_lora(adapter: Path) -> None:
    config = read_json(Path(adapter) / "adapter_config.json")
    if config.get("use_dora") or config.get("lora_bias"):
        raise BudgetReasonerError(f"{adapter}: DoRA and LoRA biases are not merged by export (this project's stages "
                                  f"train plain LoRA); use --adapter-only")


def merged_model(base: str, adapter: Path, preset, hardware, dtype: str, merge_into: str):
    """The base in `dtype` on the CPU, its weights replaced by the NF4 ones when `merge_into` is 'dequantized',
    with the adapter added in fp32 and rounded once. A plain transformers model, no peft layers left."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    check_plain_lora(adapter)
    try:
        model = AutoModelForCausalLM.from_pretrained(str(base), dtype=DTYPES[dtype])
    except OSError as error:
        raise BudgetReasonerError(f"cannot load base model {base!r}: {str(error).splitlines()[0]}") from None
    if merge_into == "dequantized":
        replaced = copy_dequantized_weights(model, base, preset, hardware)
        if not replaced:
            raise BudgetReasonerError(f"{base}: loading it in 4-bit quantized no layer; nothing to dequantize")
    model = PeftModel.from_pretrained(model, str(adapter))  # LoRA weights stay fp32 (autocast_adapter_dtype)
    add_adapter_in_fp32(model)
    model = model.unload()  # drops the LoRA layers, keeping the (now merged) base layers
    model.eval()
    return model


def copy_dequantized_weights(model, base: str, preset, hardware) -> int:
    """Overwrite every linear weight that training held in NF4 with dequant(NF4(W)), quantized by the same loader
    and settings the stage trained with (models.load_model). Returns how many weights it replaced."""
    import bitsandbytes as bnb

    from budget_reasoner.models import load_model

    quantized = load_model(base, preset, hardware, quantize=True)
    replaced = 0
    for name, module in quantized.named_modules():
        if isinstance(module, bnb.nn.Linear4bit):
            weight = bnb.functional.dequantize_4bit(module.weight.data, module.weight.quant_state)
            target = model.get_submodule(name).weight
            target.data.copy_(weight.to(device=target.device, dtype=target.dtype))
            replaced += 1
    del quantized
    if hardware.device == "cuda":
        torch.cuda.empty_cache()
    return replaced


@torch.no_grad()
def add_adapter_in_fp32(model) -> int:
    """W <- round(W + scale * B A), the sum taken in fp32, on every LoRA layer of the peft model."""
    from peft.tuners.lora import LoraLayer

    merged = 0
    for module in model.modules():
        if isinstance(module, LoraLayer) and "default" in module.lora_A:
            weight = module.get_base_layer().weight
            delta = module.get_delta_weight("default").float()
            weight.data = (weight.data.float() + delta.to(weight.device)).to(weight.dtype)
            merged += 1
    if not merged:
        raise BudgetReasonerError("the adapter has no LoRA layers to merge")
    return merged


def generation_config_for(tokenizer, preset):
    """What a plain `model.generate(**inputs)` should do with the export: what the recipe's eval did (greedy, no
    penalties, stop at the end of the turn), so it reproduces the report's answers. A base checkpoint's sampling
    defaults (Qwen2.5-Instruct ships top_k 20, top_p 0.8, repetition_penalty 1.05) would change them."""
    from transformers import GenerationConfig

    return GenerationConfig(do_sample=False, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                            max_new_tokens=preset.eval.max_new_tokens + preset.eval.think_budget)


# ---- the chat template: a model that thinks should not be shown its old thoughts --------------------------------
# Reasoning models are trained on single turns whose reply is "<think>...</think> answer"; in a conversation their
# earlier replies go back in without the thinking (DeepSeek-R1's and Qwen3's templates drop it). This preamble does
# that to any template: assistant messages before the last one lose everything up to "</think>". A single-turn
# prompt (what the gate and eval render) is untouched; `add_think_handling` checks that on probe conversations and
# keeps the template as it was if rendering changed.

THINK_PREAMBLE = (
    "{%- set ns_think = namespace(messages=[]) -%}"
    "{%- for m in messages -%}"
    "{%- if m['role'] == 'assistant' and m['content'] is string and '</think>' in m['content'] and not loop.last -%}"
    "{%- set ns_think.messages = ns_think.messages + [{'role': 'assistant', "
    "'content': m['content'].split('</think>')[-1].lstrip('\\n')}] -%}"
    "{%- else -%}{%- set ns_think.messages = ns_think.messages + [m] -%}{%- endif -%}"
    "{%- endfor -%}"
    "{%- set messages = ns_think.messages -%}"
)

PROBES = (
    [{"role": "user", "content": "12+7*3"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "12+7*3"}],
    [{"role": "user", "content": "1+1"}, {"role": "assistant", "content": "\\boxed{2}"}, {"role": "user", "content": "2+2"}],
)


def add_think_handling(tokenizer) -> bool:
    """Prepend THINK_PREAMBLE to the tokenizer's chat template when that leaves every probe's rendering the same.
    Returns whether it did."""
    template = tokenizer.chat_template
    if not isinstance(template, str) or THINK_PREAMBLE in template:
        return False

    def render(messages):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    before = [render(probe) for probe in PROBES]
    tokenizer.chat_template = THINK_PREAMBLE + template
    try:
        same = [render(probe) for probe in PROBES] == before
    except Exception:  # a template this preamble does not compose with (jinja error): keep the original
        same = False
    if not same:
        tokenizer.chat_template = template
    return same
