"""Wiring the fused losses into training without patching any model class.

A trainer that wants the fused loss calls `fused_causal_lm_loss(model, inputs)` from its
`compute_loss`: the decoder runs as usual, but its final hidden states go straight into the chunked
loss with `lm_head.weight`, so the tokens x vocab logits are never built. Nothing global changes;
a model used elsewhere behaves exactly as before.
"""

from __future__ import annotations

import torch

from budget_reasoner.errors import BudgetReasonerError
from budget_reasoner.kernels.fused_loss import fused_linear_cross_entropy


def _unwrap(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def final_hidden_states(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """The decoder's output before the LM head (LoRA layers inside the decoder apply as usual)."""
    # no KV cache: nothing decodes after this forward, and the cache would hold two tensors a layer per token
    return _unwrap(model).model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state


def lm_head_weight(model) -> torch.Tensor:
    """The LM head's weight; a LoRA adapter on the head would be bypassed by the fused loss, so it is refused."""
    head = _unwrap(model).get_output_embeddings()
    if hasattr(head, "lora_A") or hasattr(head, "base_layer"):
        raise BudgetReasonerError("fused_loss with a LoRA adapter on lm_head is not supported; remove 'lm_head' from lora.target_modules")
    return head.weight


def fused_causal_lm_loss(model, inputs: dict, num_items_in_batch=None, backend: str = "auto") -> torch.Tensor:
    """Next-token cross-entropy of a causal LM on `inputs["labels"]` (-100 = ignored), without full logits.

    Normalized by `num_items_in_batch` when given (the label tokens of the whole accumulated batch, as
    transformers' Trainer counts them), else by this batch's label tokens.
    """
    hidden = final_hidden_states(model, inputs["input_ids"], inputs.get("attention_mask"))
    labels = inputs["labels"][:, 1:]
    keep = labels != -100  # only positions that predict a label reach the LM head
    normalizer = float(num_items_in_batch) if num_items_in_batch is not None else keep.sum().clamp_min(1).item()
    return fused_linear_cross_entropy(hidden[:, :-1][keep], lm_head_weight(model), labels[keep],
                                      normalizer=normalizer, backend=backend)
