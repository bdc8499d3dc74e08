"""Wiring the fused losses into training: the loss runs inside the model's own forward.

Why inside: under mixed precision, accelerate wraps the *outer* `model.forward` (the PeftModel, or the
model itself) in `torch.autocast` + `convert_outputs_to_fp32`; transformers' Trainer adds no autocast of
its own around `compute_loss`. A loss that calls the inner decoder directly (`model.model(...)`) runs
outside that autocast: LoRA matmuls and attention in fp32 instead of bf16/fp16, so fused and unfused
training compute different things. So, as TRL's `add_fused_lm_head` and Liger's `lce_forward` do,
`add_fused_loss` gives the causal LM *instance* a forward that, only when called with
`fused_loss=FusedLoss(...)`, runs the decoder and then the chunked loss on the final hidden states and
`lm_head.weight`, returning the loss without building tokens x vocab logits. The trainer calls
`model(input_ids=..., attention_mask=..., fused_loss=...)` through every wrapper, autocast included.
Without `fused_loss` the forward is the original one (generation and evaluation are unchanged), nothing
class-wide is touched, and `remove_fused_loss` restores the instance.
"""

from __future__ import annotations

import os
import types
from dataclasses import dataclass

import torch
from transformers.modeling_outputs import CausalLMOutputWithPast

from budget_reasoner.errors import BudgetReasonerError
from budget_reasoner.kernels.fused_loss import fused_linear_cross_entropy, fused_linear_kd_loss

_ORIGINAL = "_budget_reasoner_original_forward"


def _unwrap(model):
    """The causal LM inside any wrappers: DDP's (and accelerate's FSDP/DeepSpeed engines', all holding it as
    `.module`) under a multi-process launch, then PEFT's. Calls still go through the outer wrapper, whose
    forward is what synchronizes gradients; only the attributes are read from the inner model."""
    while not hasattr(model, "get_base_model") and not hasattr(model, "base_model_prefix") \
            and isinstance(getattr(model, "module", None), torch.nn.Module):
        model = model.module
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def final_logit_softcap(model) -> float | None:
    """Gemma 2/3's `final_logit_softcapping` (logits -> cap * tanh(logits / cap)), or None for models without it."""
    config = _unwrap(model).config
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    return getattr(config, "final_logit_softcapping", None) or None


def final_hidden_states(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """The decoder's output before the LM head, for inference (the teacher cache): it bypasses any autocast
    wrapper on `model.forward`, so training losses go through `add_fused_loss` instead."""
    # no KV cache: nothing decodes after this forward, and the cache would hold two tensors a layer per token
    return _unwrap(model).model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state


def lm_head_weight(model) -> torch.Tensor:
    """The LM head's weight; a LoRA adapter on the head would be bypassed by the fused loss, so it is refused."""
    head = _unwrap(model).get_output_embeddings()
    if hasattr(head, "lora_A") or hasattr(head, "base_layer"):
        raise BudgetReasonerError("fused_loss with a LoRA adapter on lm_head is not supported; remove 'lm_head' from lora.target_modules")
    return head.weight


@dataclass
class FusedLoss:
    """What the fused forward computes instead of logits.

    `labels`: unshifted causal-LM labels (position t scores token t, so position t-1 predicts it), or with
    `shifted=True` labels aligned with the hidden states (position t predicts labels[t]); -100 is ignored.
    With `topk_ids`/`topk_logprobs` (aligned like shifted labels) the loss is the KD blend of
    `fused_linear_kd_loss`, else cross-entropy. `normalizer`: the accumulated batch's label tokens, or None
    for this batch's.
    """

    labels: torch.Tensor
    shifted: bool = False
    topk_ids: torch.Tensor | None = None
    topk_logprobs: torch.Tensor | None = None
    alpha: float = 0.5
    temperature: float = 1.0
    normalizer: float | None = None
    backend: str = "auto"
    tail: bool = False  # KD over the top-k plus the mass outside it (fused_linear_kd_loss's `tail`)


def _fused_forward(self, *args, fused_loss: FusedLoss | None = None, **kwargs):
    if fused_loss is None:
        return getattr(self, _ORIGINAL)(*args, **kwargs)
    # what PEFT and the Trainer pass that only the LM-head half of the original forward reads
    for name in ("labels", "return_dict", "logits_to_keep", "num_items_in_batch"):
        kwargs.pop(name, None)
    kwargs = {name: value for name, value in kwargs.items() if value is not None}
    kwargs["use_cache"] = False  # nothing decodes after this forward
    hidden = getattr(self, self.base_model_prefix)(*args, **kwargs).last_hidden_state
    request = fused_loss
    labels = request.labels if request.shifted else request.labels[:, 1:]
    if not request.shifted:
        hidden = hidden[:, :-1]
    keep = labels != -100  # only positions that predict a label reach the LM head: prompt tokens cost nothing
    normalizer = float(request.normalizer) if request.normalizer is not None else keep.sum().clamp_min(1).item()
    weight, softcap = lm_head_weight(self), final_logit_softcap(self)
    if request.topk_ids is None:
        loss = fused_linear_cross_entropy(hidden[keep], weight, labels[keep], normalizer=normalizer,
                                          backend=request.backend, softcap=softcap)
    else:
        loss = fused_linear_kd_loss(hidden[keep], weight, request.topk_ids[keep], request.topk_logprobs[keep], labels[keep],
                                    temperature=request.temperature, alpha=request.alpha, normalizer=normalizer,
                                    backend=request.backend, softcap=softcap, tail=request.tail)
    return CausalLMOutputWithPast(loss=loss)


def add_fused_loss(model):
    """Let `model(..., fused_loss=FusedLoss(...))` return the chunked fused loss; idempotent; returns `model`.

    Must run before accelerate prepares a model that has no PEFT wrapper: accelerate's autocast wrapper
    calls the class's forward, so an instance forward added after it would never be reached.
    """
    base = _unwrap(model)
    if hasattr(base, _ORIGINAL):
        return model
    if os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE") == "3":  # set by accelerate launch for a ZeRO-3 config
        raise BudgetReasonerError(
            "the fused losses read lm_head.weight outside the LM head's own forward, which DeepSpeed ZeRO-3 leaves "
            "partitioned (empty) there; set sft.fused_loss=false, or train on the DDP or FSDP2 route (distill's KD "
            "loss is always fused)")
    if hasattr(base, "_original_forward"):  # accelerate's mark: this instance's forward is already its wrapper
        raise BudgetReasonerError("add_fused_loss(model) must run before accelerate prepares the model (its autocast would be bypassed)")
    if not hasattr(base, base.base_model_prefix or "") or base.get_output_embeddings() is None:
        raise BudgetReasonerError(f"the fused loss needs a causal LM with a decoder and an LM head, got {type(base).__name__}")
    setattr(base, _ORIGINAL, base.forward)
    base.forward = types.MethodType(_fused_forward, base)
    return model


def remove_fused_loss(model):
    """Undo `add_fused_loss`: the instance's forward is the class's again."""
    base = _unwrap(model)
    if hasattr(base, _ORIGINAL):
        del base.forward
        delattr(base, _ORIGINAL)
    return model


def fused_causal_lm_loss(model, inputs: dict, num_items_in_batch=None, backend: str = "auto") -> torch.Tensor:
    """Next-token cross-entropy of a causal LM on `inputs["labels"]` (-100 = ignored), without full logits,
    computed inside `model`'s forward (and so inside whatever autocast wraps it).

    Normalized by `num_items_in_batch` when given (the label tokens of the whole accumulated batch, as
    transformers' Trainer counts them), else by this batch's label tokens.
    """
    add_fused_loss(model)
    request = FusedLoss(labels=inputs["labels"], normalizer=num_items_in_batch, backend=backend)
    return model(input_ids=inputs["input_ids"], attention_mask=inputs.get("attention_mask"), fused_loss=request).loss


def fused_kd_loss(model, inputs: dict, labels: torch.Tensor, alpha: float, temperature: float, num_items_in_batch=None,
                  backend: str = "auto", tail: bool = False) -> torch.Tensor:
    """The distillation loss on the teacher's cached top-k (`inputs["topk_ids"]`, `inputs["topk_logprobs"]`, aligned
    with `labels`: position t predicts labels[t]), computed inside `model`'s forward like `fused_causal_lm_loss`."""
    add_fused_loss(model)
    request = FusedLoss(labels=labels, shifted=True, topk_ids=inputs["topk_ids"], topk_logprobs=inputs["topk_logprobs"],
                        alpha=alpha, temperature=temperature, normalizer=num_items_in_batch, backend=backend,
                        tail=tail)
    return model(input_ids=inputs["input_ids"], attention_mask=inputs.get("attention_mask"), fused_loss=request).loss
