"""Triton kernel for the row-wise half of the fused linear losses (its PyTorch twin: `fused_loss._token_losses`).

For a chunk of fp32 logits (rows x V) the kernel computes, one program per row, in two sweeps over V:
the log-sum-exp (online max/sum), the loss of the row (cross-entropy on the label blended with the
top-k KD term), and overwrites the logits with d(loss)/d(logits) divided by the normalizer. The
matmuls on either side (hidden @ W.T, grad @ W, grad.T @ hidden) stay with cuBLAS, which beats
anything hand-written for them; what the kernel saves is every softmax-sized temporary, since the
gradient is written where the logits were. Everything inside is fp32 whatever the model's dtype:
`softmax - onehot` in bf16 cancels catastrophically for the label's probability.

With `softcap` > 0 (Gemma 2/3's `final_logit_softcapping`) each logit z is read as cap * tanh(z / cap),
recomputed in both sweeps rather than stored, and the gradient is multiplied by 1 - tanh^2(z / cap).

Runs on CUDA, or on CPU tensors when TRITON_INTERPRET=1 is set before this module is imported.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _tanh(x):
    # tanh from exp (no libdevice: the same code runs under TRITON_INTERPRET=1); saturates to +-1 without inf/inf
    return 1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)


@triton.jit
def _row_loss_and_grad_kernel(
    logits_ptr, logits_stride, labels_ptr, loss_ptr, vocab, ignore_index, ce_weight, inv_normalizer, softcap,
    BLOCK: tl.constexpr, SOFTCAP: tl.constexpr,
):
    """Cross-entropy part: ce_weight * (lse - logit[label]) per row; logits overwritten by its gradient / N."""
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * logits_stride
    label = tl.load(labels_ptr + row)
    offsets = tl.arange(0, BLOCK)

    if label == ignore_index:
        for start in range(0, vocab, BLOCK):
            tl.store(row_ptr + start + offsets, tl.zeros([BLOCK], tl.float32), mask=start + offsets < vocab)
        tl.store(loss_ptr + row, 0.0)
    else:
        # sweep 1: log-sum-exp with a running max
        running_max = float("-inf")
        running_sum = 0.0
        for start in range(0, vocab, BLOCK):
            x = tl.load(row_ptr + start + offsets, mask=start + offsets < vocab, other=float("-inf"))
            if SOFTCAP:
                x = softcap * _tanh(x / softcap)  # -inf padding maps to -cap: masked out of the sum below
                x = tl.where(start + offsets < vocab, x, float("-inf"))
            new_max = tl.maximum(running_max, tl.max(x, axis=0))
            running_sum = running_sum * tl.exp(running_max - new_max) + tl.sum(tl.exp(x - new_max), axis=0)
            running_max = new_max
        lse = running_max + tl.log(running_sum)
        label_logit = tl.load(row_ptr + label)
        if SOFTCAP:
            label_logit = softcap * _tanh(label_logit / softcap)
        loss = ce_weight * (lse - label_logit)

        # sweep 2: overwrite logits with the cross-entropy gradient, (1 - alpha) * (softmax - onehot) / N
        for start in range(0, vocab, BLOCK):
            mask = start + offsets < vocab
            x = tl.load(row_ptr + start + offsets, mask=mask, other=float("-inf"))
            if SOFTCAP:
                tanh = _tanh(x / softcap)
                x = softcap * tanh
            grad = ce_weight * tl.exp(x - lse)
            grad = tl.where(start + offsets == label, grad - ce_weight, grad)
            if SOFTCAP:
                grad = grad * (1.0 - tanh * tanh)
            tl.store(row_ptr + start + offsets, grad * inv_normalizer, mask=mask)

        tl.store(loss_ptr + row, loss)


@triton.jit
def _topk_kd_kernel(
    grad_ptr, grad_stride, labels_ptr, topk_ids_ptr, topk_stride, student_ptr, teacher_lp_ptr, loss_ptr,
    ignore_index, alpha, temperature, inv_normalizer, softcap, K: tl.constexpr, K_BLOCK: tl.constexpr, SOFTCAP: tl.constexpr,
):
    """KD term on the teacher's top-k: adds alpha * T^2 * KL to the row loss and alpha * T * (q - p) / N to the gradient.

    `student_ptr` holds the student's top-k logits already capped; with SOFTCAP the gradient goes through the cap
    as 1 - (capped / cap)^2."""
    row = tl.program_id(0).to(tl.int64)
    label = tl.load(labels_ptr + row)
    if label != ignore_index:
        k_offsets = tl.arange(0, K_BLOCK)
        k_mask = k_offsets < K
        ids = tl.load(topk_ids_ptr + row * topk_stride + k_offsets, mask=k_mask, other=0)
        capped = tl.load(student_ptr + row * topk_stride + k_offsets, mask=k_mask, other=-1e30)
        student = capped / temperature
        teacher = tl.load(teacher_lp_ptr + row * topk_stride + k_offsets, mask=k_mask, other=-1e30) / temperature
        student_log_q = student - (tl.max(student, axis=0) + tl.log(tl.sum(tl.exp(student - tl.max(student, axis=0)), axis=0)))
        teacher_log_p = teacher - (tl.max(teacher, axis=0) + tl.log(tl.sum(tl.exp(teacher - tl.max(teacher, axis=0)), axis=0)))
        teacher_p = tl.where(k_mask, tl.exp(teacher_log_p), 0.0)
        kl = tl.sum(tl.where(k_mask, teacher_p * (teacher_log_p - student_log_q), 0.0), axis=0)
        tl.store(loss_ptr + row, tl.load(loss_ptr + row) + alpha * temperature * temperature * kl)
        kd_grad = alpha * temperature * (tl.where(k_mask, tl.exp(student_log_q), 0.0) - teacher_p) * inv_normalizer
        if SOFTCAP:
            tanh = tl.where(k_mask, capped / softcap, 0.0)
            kd_grad = kd_grad * (1.0 - tanh * tanh)
        current = tl.load(grad_ptr + row * grad_stride + ids, mask=k_mask, other=0.0)
        tl.store(grad_ptr + row * grad_stride + ids, current + kd_grad, mask=k_mask)


def row_losses_and_grads(logits: torch.Tensor, labels: torch.Tensor, topk_ids, topk_logprobs, alpha: float,
                         temperature: float, ignore_index: int, normalizer: float, softcap: float | None = None) -> torch.Tensor:
    """Per-row losses of an fp32 logits chunk; the chunk is overwritten with d(sum of losses / normalizer)/d(logits).
    `softcap` (or None): the logits are read as softcap * tanh(logits / softcap)."""
    rows, vocab = logits.shape
    losses = torch.empty(rows, dtype=torch.float32, device=logits.device)
    if rows == 0:
        return losses
    student_topk = None
    if alpha > 0.0:
        student_topk = logits.gather(1, topk_ids)  # read before the logits become gradients
        if softcap:
            student_topk = softcap * torch.tanh(student_topk / softcap)
        student_topk = student_topk.contiguous()
    block = min(4096, triton.next_power_of_2(vocab))
    _row_loss_and_grad_kernel[(rows,)](
        logits, logits.stride(0), labels, losses, vocab, ignore_index, 1.0 - alpha, 1.0 / normalizer, float(softcap or 1.0),
        BLOCK=block, SOFTCAP=bool(softcap),
    )
    if alpha > 0.0:
        k = topk_ids.shape[1]
        _topk_kd_kernel[(rows,)](
            logits, logits.stride(0), labels, topk_ids.contiguous(), k, student_topk, topk_logprobs.float().contiguous(), losses,
            ignore_index, alpha, temperature, 1.0 / normalizer, float(softcap or 1.0), K=k, K_BLOCK=triton.next_power_of_2(k),
            SOFTCAP=bool(softcap),
        )
    return losses
