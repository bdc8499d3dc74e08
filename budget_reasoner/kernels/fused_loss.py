"""Linear + cross-entropy and linear + top-k distillation losses that never hold the full logits.

Strategy (Liger's): the tokens are cut into chunks; for each chunk the forward computes the chunk's
logits, their log-sum-exp, the loss, and right away the gradient of the loss with respect to the
chunk's hidden states and (accumulated) the weight, then drops the logits. Backward only scales the
stored gradients by the incoming scalar. We pick this over recomputing in the backward (CCE's
strategy) because training always calls backward right after forward, so the logits are computed
once instead of twice; the price is that `reduction="none"` cannot precompute a weight gradient,
so that reduction falls back to the same chunks under autograd (still chunked, still exact).

Numerics: the logits matmul runs in whatever dtype the caller's autocast (or the weight) gives, as the
model's own `lm_head` would, so fused and unfused losses see the same rounded logits; from there on,
softcapping, log-sum-exp and `softmax - onehot` are fp32. The gradient matmuls take the *unnormalized*
`softmax - onehot` (entries in [-1, 1]) in the same compute dtype, and 1/normalizer and the incoming
grad_output are applied in fp32: under fp16 with a GradScaler, grad_output is the scaler's factor
(e.g. 65,536) and arrives only in backward, so a gradient divided by N = 32k tokens and rounded to fp16
in the forward would already have underflowed (|W|/N is ~1e-6 for a 0.02-scale head: fp16 subnormal).
Stored gradients are therefore fp32 whenever the tensor is fp16 and cast after the scaling.

`softcap` (Gemma 2/3's `final_logit_softcapping`) replaces logits z by cap * tanh(z / cap) before the
softmax; the gradient picks up d/dz = 1 - tanh^2(z / cap).

The KD loss is forward KL from the teacher's top-k distribution (its cached log-probs renormalized over
its top-k tokens, at `temperature`) to the student's distribution restricted to the same k tokens,
scaled by temperature**2 (Hinton et al.), blended with the cross-entropy on the labels:
    loss = alpha * T^2 * KL(p_teacher^k || q_student^k) + (1 - alpha) * CE(labels)
Both are summed over label tokens and divided by `normalizer` (default: the number of label tokens),
so gradient accumulation over micro-batches of different sizes can pass the global token count.

With `tail=True` (config `distill.kd_tail`) the KD term also sees the mass outside the top-k: KL over k+1
buckets, the teacher's cached top-k probabilities as they are (not renormalized) plus its tail
1 - sum(p_topk), against the student's full-vocabulary softmax at those k ids plus its own tail
1 - sum(q_topk) = sum of q outside the top-k, from the log-sum-exp the chunked loss computes anyway:
    KL = sum_i p_i (log p_i - log q_i) + p_tail (log p_tail - log q_tail)
Both tails are clamped to >= TAIL_EPS (the cache's log-probs are fp16-rounded, so sum(p_topk) can exceed 1).
Only at temperature 1: the cache holds the teacher's log-probs at temperature 1 (`linear_topk_logprobs`), and
its tempered tail would need the teacher's full log-sum-exp at T, which the cache does not keep. The
Triton kernel does not implement the tail: backend="triton" refuses it, and "auto" picks the torch chunks.
"""

from __future__ import annotations

import importlib.util
import math
import os

import torch
import torch.nn.functional as F

from budget_reasoner.errors import BudgetReasonerError

BACKENDS = ("auto", "triton", "torch", "reference")
CHUNK_LOGITS_BYTES = 2**27  # fp32 logits per chunk: 128 MiB is 128 tokens at V=151,936 (rounded down), 2,048 at V=16k
# On the CPU a small chunk starves the matmuls (K = chunk tokens in the weight-gradient product, and every chunk
# streams the whole V x H weight twice and its gradient once): with the vocab-major layout below, 512 tokens at
# V=151,936 ran a 4,096-token step 12% faster than 256 (10.2 s vs 11.6 s, 2 cores), for 148 MiB more.
CPU_CHUNK_LOGITS_BYTES = 2**29
# With BUDGET_REASONER_COMPILE=1 the softmax-gradient of a chunk is compiled (torch.compile: three passes over the
# chunk instead of five) on the CPU, for chunks at least this large (an LM head's; never test-sized ones). Off by
# default: the three matmuls are ~90% of a step, and compiling it measured no faster (10.4 s vs 10.2 s above)
# while costing ~5-30 s per process.
COMPILE_MIN_ELEMENTS = 2**24
# floor of the teacher's and the student's tail bucket (probabilities) under `tail=True`
TAIL_EPS = 1e-6


def chunk_tokens_for(vocab: int, device: str = "cuda") -> int:
    """Tokens per chunk so that a chunk's logits stay near CHUNK_LOGITS_BYTES (CPU_CHUNK_LOGITS_BYTES on the CPU),
    a power of two, 16 to 4,096."""
    budget = CPU_CHUNK_LOGITS_BYTES if device == "cpu" else CHUNK_LOGITS_BYTES
    tokens = max(1, budget // (4 * vocab))
    return max(16, min(4096, 1 << (tokens.bit_length() - 1)))


def _softmax_scaled_(logits: torch.Tensor, coef: torch.Tensor) -> torch.Tensor:
    """logits <- softmax(logits) * coef in place (fp32); returns the rows' log-sum-exp."""
    row_max = logits.amax(dim=-1, keepdim=True)
    sum_exp = (logits - row_max).exp().sum(dim=-1, keepdim=True)
    logits.copy_((logits - row_max).exp() * (coef / sum_exp))
    return (row_max + sum_exp.log()).squeeze(1)


def _softmax_scaled_eager_(logits: torch.Tensor, coef: torch.Tensor) -> torch.Tensor:
    """The same in eager PyTorch without a second vocab-sized buffer: five passes over the chunk. (amax, not
    max(...).values: on the CPU's vocab-major chunk, max with its indices is 10x slower.)"""
    row_max = logits.amax(dim=-1, keepdim=True)
    probs = logits.sub_(row_max).exp_()
    sum_exp = probs.sum(dim=-1, keepdim=True)
    probs.mul_(coef / sum_exp)
    return (row_max + sum_exp.log()).squeeze(1)


_compiled = {"fn": None, "failed": False}


def _softmax_scaled(logits: torch.Tensor, coef: torch.Tensor) -> torch.Tensor:
    """With BUDGET_REASONER_COMPILE=1, the compiled softmax-gradient for a large CPU chunk; else (and if compiling
    fails: once, with a warning) eager. Never under TRITON_INTERPRET=1 (the interpreter's tests)."""
    if (os.environ.get("BUDGET_REASONER_COMPILE") != "1" or _compiled["failed"] or logits.device.type != "cpu"
            or logits.numel() < COMPILE_MIN_ELEMENTS or os.environ.get("TRITON_INTERPRET") == "1"):
        return _softmax_scaled_eager_(logits, coef)
    try:
        if _compiled["fn"] is None:
            # dynamic: one compiled kernel serves every chunk height (the last chunk of each batch differs)
            _compiled["fn"] = torch.compile(_softmax_scaled_, dynamic=True, fullgraph=True)
        return _compiled["fn"](logits, coef)
    except Exception as error:  # no C++ compiler, an unsupported torch build: the eager passes compute the same
        import warnings

        _compiled["failed"] = True
        warnings.warn(f"fused loss: torch.compile unavailable ({type(error).__name__}); using eager chunks", stacklevel=2)
        return _softmax_scaled_eager_(logits, coef)


def _resolve_backend(backend: str, hidden: torch.Tensor, tail: bool = False) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    triton_ready = hidden.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"
    if backend == "auto":
        # the Triton kernel has no tail bucket (the KD tail is torch-only): "auto" takes the torch chunks for it
        return "triton" if hidden.is_cuda and importlib.util.find_spec("triton") and not tail else "torch"
    if backend == "triton" and tail:
        raise ValueError("tail=True (distill.kd_tail) is not implemented in the Triton kernel; use backend='torch' or 'auto'")
    if backend == "triton" and not triton_ready:
        raise ValueError("backend='triton' needs CUDA tensors, or TRITON_INTERPRET=1 (set before import) for CPU tensors")
    return backend


def _softcap_(logits: torch.Tensor, softcap: float | None, need_grad: bool):
    """logits <- cap * tanh(logits / cap) in place; returns d(capped)/d(logits) = 1 - tanh^2 when `need_grad`."""
    if not softcap:
        return None
    tanh = logits.div(softcap).tanh_()  # the one extra vocab-sized buffer softcapping costs
    logits.copy_(tanh).mul_(softcap)
    return tanh.square_().neg_().add_(1.0) if need_grad else None


def _tail_kd(student_topk: torch.Tensor, log_z: torch.Tensor, topk_logprobs: torch.Tensor):
    """The (k+1)-bucket KD pieces at temperature 1: the teacher's top-k p (cached, not renormalized) and tail
    p_tail, the student's top-k q = exp(z - lse) and log q_tail = log1p(-sum q_topk), both tails >= TAIL_EPS;
    returns (kl per row, p, p_tail, q, q_tail)."""
    teacher_log_p = topk_logprobs.float()
    teacher_p = teacher_log_p.exp()
    teacher_tail = (1.0 - teacher_p.sum(-1)).clamp_min(TAIL_EPS)
    student_log_q = student_topk - log_z[:, None]
    student_q = student_log_q.exp()
    # log1p(-S), S clamped below 1: accurate for a small S, finite when the top-k holds (nearly) all the mass; for
    # a tail q_tail near fp32's 1e-7 it carries a relative error ~1e-7 / q_tail (the reference sums the tail directly)
    student_log_tail = torch.log1p(-student_q.sum(-1).clamp_max(1.0 - TAIL_EPS))
    kl = ((teacher_p * (teacher_log_p - student_log_q)).sum(-1)
          + teacher_tail * (teacher_tail.log() - student_log_tail))
    return kl, teacher_p, teacher_tail, student_q, student_log_tail.exp()


def _token_losses(logits: torch.Tensor, labels: torch.Tensor, topk_ids, topk_logprobs, alpha: float,
                  temperature: float, ignore_index: int, need_grad: bool, grad_scale: float = 1.0,
                  softcap: float | None = None, tail: bool = False):
    """Per-token loss of one chunk of fp32 logits, and (with `need_grad`) d(loss)/d(logits) * grad_scale.

    With `need_grad` the gradient is written into the logits buffer itself, so a chunk costs one
    vocab-sized buffer, not three (two with `softcap`). Ignored tokens get a loss and a gradient of 0.
    """
    cap_grad = _softcap_(logits, softcap, need_grad)
    valid = labels != ignore_index
    safe_labels = torch.where(valid, labels, 0)
    label_logits = logits.gather(1, safe_labels[:, None]).squeeze(1)
    student_topk = logits.gather(1, topk_ids) if alpha > 0.0 else None  # read before the buffer is overwritten
    grad = None
    if tail and alpha > 0.0:
        return _token_losses_tail(logits, labels, valid, safe_labels, label_logits, student_topk, topk_ids,
                                  topk_logprobs, alpha, need_grad, grad_scale, cap_grad)
    if need_grad:  # softmax computed in place: the chunk's logits buffer is the only vocab-sized one
        coef = torch.tensor((1.0 - alpha) * grad_scale, dtype=torch.float32, device=logits.device)
        log_z = _softmax_scaled(logits, coef)  # logits <- (1 - alpha) * softmax, scaled
        grad = logits
        grad.scatter_add_(1, safe_labels[:, None], torch.full_like(log_z[:, None], -(1.0 - alpha) * grad_scale))
    else:
        log_z = torch.logsumexp(logits, dim=-1)
    losses = (1.0 - alpha) * (log_z - label_logits)
    if alpha > 0.0:
        teacher_log_p = torch.log_softmax(topk_logprobs.float() / temperature, dim=-1)
        student_log_q = torch.log_softmax(student_topk / temperature, dim=-1)
        teacher_p = teacher_log_p.exp()
        losses = losses + alpha * temperature**2 * (teacher_p * (teacher_log_p - student_log_q)).sum(-1)
        if need_grad:  # d(T^2 KL)/d(logit_j) = T * (q_j - p_j) on the top-k support, 0 elsewhere
            grad.scatter_add_(1, topk_ids, alpha * temperature * grad_scale * (student_log_q.exp() - teacher_p))
    losses = torch.where(valid, losses, torch.zeros_like(losses))
    if cap_grad is not None:
        grad.mul_(cap_grad)  # chain rule through the cap, after every term has been added
    if grad is not None and not valid.all():
        grad[~valid] = 0.0
    return losses, grad


def _token_losses_tail(logits, labels, valid, safe_labels, label_logits, student_topk, topk_ids, topk_logprobs,
                       alpha, need_grad, grad_scale, cap_grad):
    """`_token_losses` with the KD tail bucket (temperature 1; `logits` already capped).

    Gradient of KL_tail = -sum_i p_i log q_i - p_tail log q_tail + const, with P = sum_i p_i + p_tail (1 up to
    the cache's rounding and the clamp), q the full-vocabulary softmax, K the top-k ids:
        d log q_i / dz_j    = [j = i] - q_j
        d log q_tail / dz_j = [j not in K] q_j / q_tail - q_j      (q_tail = sum of q_m, m not in K)
    so  dKL/dz_j = q_j * (P - p_tail / q_tail)   for j outside the top-k (the tail bucket pulls every such
        logit up or down together, in proportion to q_j),
        dKL/dz_j = P * q_j - p_j                 for j in the top-k.
    The top-k entries are written from q_j and p_j directly, not as the first formula plus a correction, which
    would cancel catastrophically when q_tail is tiny. (Where q_tail is clamped to TAIL_EPS this uses the clamped
    value, where autograd through the clamp would give 0: a direction toward the tail, not a vanishing one.)"""
    if need_grad:
        # pass 1 (as without the tail): logits <- softmax * grad_scale, and the rows' log-sum-exp
        log_z = _softmax_scaled(logits, torch.tensor(grad_scale, dtype=torch.float32, device=logits.device))
    else:
        log_z = torch.logsumexp(logits, dim=-1)
    kl, teacher_p, teacher_tail, student_q, student_tail = _tail_kd(student_topk, log_z, topk_logprobs)
    losses = torch.where(valid, (1.0 - alpha) * (log_z - label_logits) + alpha * kl, torch.zeros_like(kl))
    if not need_grad:
        return losses, None
    mass = teacher_p.sum(-1) + teacher_tail  # P
    grad = logits
    # every entry: (1 - alpha) * q_j (cross-entropy) + alpha * q_j * (P - p_tail / q_tail) (the tail bucket's)
    grad.mul_(((1.0 - alpha) + alpha * (mass - teacher_tail / student_tail))[:, None])
    # the top-k entries, overwritten: (1 - alpha) * q_j + alpha * (P * q_j - p_j)
    grad.scatter_(1, topk_ids, grad_scale * (((1.0 - alpha) + alpha * mass[:, None]) * student_q - alpha * teacher_p))
    grad.scatter_add_(1, safe_labels[:, None], torch.full_like(log_z[:, None], -(1.0 - alpha) * grad_scale))
    if cap_grad is not None:
        grad.mul_(cap_grad)
    if not valid.all():
        grad[~valid] = 0.0
    return losses, grad


def _grad_dtype(dtype: torch.dtype) -> torch.dtype:
    # fp16 cannot hold a gradient divided by the token count before the GradScaler's factor arrives; bf16 can
    return torch.float32 if dtype == torch.float16 else dtype


def _compute_dtype(tensor: torch.Tensor) -> torch.dtype:
    """The dtype `hidden @ weight.T` runs in here: the ambient autocast's, as for the model's own lm_head."""
    device = tensor.device.type
    if torch.is_autocast_enabled(device) and tensor.is_floating_point():
        return torch.get_autocast_dtype(device)
    return tensor.dtype


class _ChunkedLinearLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, topk_ids, topk_logprobs, alpha, temperature, ignore_index, normalizer,
                chunk_tokens, backend, softcap, tail=False):
        compute = _compute_dtype(weight)
        weight_c = weight.to(compute)  # once, not per chunk: autocast would cast the weight again in every matmul
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_hidden = (torch.zeros(hidden.shape, dtype=_grad_dtype(hidden.dtype), device=hidden.device)
                       if hidden.requires_grad else None)
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if weight.requires_grad else None
        # Ignored tokens (a prompt's, padding) have a loss and a gradient of 0: gather the others first, so they
        # cost no matmul at all (SFT masks every prompt token, often half a batch or more)
        kept = (labels != ignore_index).nonzero().squeeze(1)
        every_token_kept = kept.numel() == labels.numel()
        if not every_token_kept:
            labels = labels.index_select(0, kept)
            topk_ids = None if topk_ids is None else topk_ids.index_select(0, kept)
            topk_logprobs = None if topk_logprobs is None else topk_logprobs.index_select(0, kept)
        hidden_kept = hidden if every_token_kept else hidden.index_select(0, kept)
        tokens = hidden_kept.shape[0]
        # One logits buffer for every chunk: a fresh tokens x V buffer per chunk is, on the CPU, a fresh mmap whose
        # pages are faulted in (and zeroed) anew each time, which costs more than the softmax does
        vocab = weight.shape[0]
        logits_buffer = torch.empty(min(chunk_tokens, tokens) * vocab, dtype=torch.float32, device=hidden.device)
        # On the CPU the logits are laid out vocab-major (V x chunk, used through its transpose): BLAS then streams
        # the big weight once as a plain (NN) product in the forward and the weight-gradient product, where the
        # token-major `hidden @ weight.T` re-packs the whole weight every chunk; measured ~15% off a step at
        # 4,096 x 896 x 151,936. The Triton kernel wants token-major rows, as does a GPU.
        vocab_major = backend != "triton" and hidden.device.type == "cpu"
        # the matmuls below are placed by hand (compute dtype in, fp32 out); autocast must not re-cast them
        with torch.autocast(hidden.device.type, enabled=False):
            for start in range(0, tokens, chunk_tokens):
                stop = min(start + chunk_tokens, tokens)
                hidden_chunk = hidden_kept[start:stop].to(compute)
                if vocab_major:
                    logits_t = logits_buffer[: vocab * (stop - start)].view(vocab, stop - start)
                    if compute == torch.float32:
                        torch.mm(weight_c, hidden_chunk.t(), out=logits_t)
                    else:
                        logits_t.copy_(weight_c @ hidden_chunk.t())
                    logits = logits_t.t()  # tokens x V, as the loss reads it
                else:
                    logits = logits_buffer[: vocab * (stop - start)].view(stop - start, vocab)
                    if compute == torch.float32:
                        torch.mm(hidden_chunk, weight_c.t(), out=logits)
                    else:
                        logits.copy_(hidden_chunk @ weight_c.t())
                chunk_ids = None if topk_ids is None else topk_ids[start:stop]
                chunk_lps = None if topk_logprobs is None else topk_logprobs[start:stop]
                # gradients come back unnormalized (entries in [-1, 1]): 1/normalizer is applied in fp32 below
                if backend == "triton":
                    from budget_reasoner.kernels.fused_loss_triton import row_losses_and_grads

                    losses = row_losses_and_grads(logits, labels[start:stop].contiguous(), chunk_ids, chunk_lps, alpha,
                                                  temperature, ignore_index, 1.0, softcap=softcap)
                    grad_logits = logits  # the kernel overwrote the logits with the gradient
                else:
                    losses, grad_logits = _token_losses(logits, labels[start:stop], chunk_ids, chunk_lps, alpha,
                                                        temperature, ignore_index, need_grad=True, softcap=softcap,
                                                        tail=tail)
                total += losses.sum()
                if grad_hidden is not None:
                    rows = ((grad_logits.to(compute) @ weight_c).float() / normalizer).to(grad_hidden.dtype)
                    if every_token_kept:
                        grad_hidden[start:stop] = rows
                    else:
                        grad_hidden.index_copy_(0, kept[start:stop], rows)
                if grad_weight is not None:
                    # fp32: this sum runs over a whole chunk of tokens, which fp16 could overflow unnormalized
                    grad_weight.addmm_(grad_logits.t(), hidden_chunk.float(), alpha=1.0 / normalizer)
                del logits, grad_logits
        ctx.save_for_backward(grad_hidden, None if grad_weight is None else grad_weight.to(_grad_dtype(weight.dtype)))
        ctx.dtypes = (hidden.dtype, weight.dtype)
        return total / normalizer

    @staticmethod
    def backward(ctx, grad_output):
        # scale in place: a copy of the weight's gradient would double the memory this op is there to save
        # (so, like Liger's, this backward can run only once per forward). The stored gradients are fp32 where
        # the inputs are fp16, so the scaler's factor lands before the cast to fp16, not after an underflow.
        grads = []
        for grad, dtype in zip(ctx.saved_tensors, ctx.dtypes):
            if grad is not None:
                grad = grad.mul_(grad_output.to(grad.dtype)).to(dtype)
            grads.append(grad)
        return (*grads, None, None, None, None, None, None, None, None, None, None, None)


def _chunked_none(hidden, weight, labels, topk_ids, topk_logprobs, alpha, temperature, ignore_index, chunk_tokens, softcap,
                  tail=False):
    """`reduction="none"`: per-token losses, chunk by chunk under autograd with each chunk's logits checkpointed."""
    from torch.utils.checkpoint import checkpoint

    def chunk_loss(hidden_chunk, labels_chunk, ids_chunk, lps_chunk):
        logits = (hidden_chunk @ weight.t()).float()
        if softcap:  # out of place: autograd differentiates through it
            logits = softcap * torch.tanh(logits / softcap)
        return _token_losses(logits, labels_chunk, ids_chunk, lps_chunk, alpha, temperature, ignore_index, need_grad=False,
                             tail=tail)[0]

    pieces = []
    for start in range(0, hidden.shape[0], chunk_tokens):
        part = slice(start, start + chunk_tokens)
        pieces.append(checkpoint(chunk_loss, hidden[part], labels[part],
                                 None if topk_ids is None else topk_ids[part],
                                 None if topk_logprobs is None else topk_logprobs[part], use_reentrant=False))
    return torch.cat(pieces)


def _reference(hidden, weight, labels, topk_ids, topk_logprobs, alpha, temperature, ignore_index, reduction, normalizer,
               softcap=None, tail=False):
    """The naive computation with the full tokens x V logits, for tests and benchmarks. With `tail`, the student's
    tail is summed over the ids outside the top-k explicitly (a mask), not derived from the top-k's sum."""
    logits = (hidden @ weight.t()).float()
    if softcap:
        logits = softcap * torch.tanh(logits / softcap)
    valid = labels != ignore_index
    losses = torch.zeros(hidden.shape[0], dtype=torch.float32, device=hidden.device)
    if alpha < 1.0:
        losses = losses + (1.0 - alpha) * F.cross_entropy(logits, torch.where(valid, labels, 0), reduction="none")
    if alpha > 0.0 and tail:
        log_q = F.log_softmax(logits, dim=-1)
        outside = torch.ones_like(log_q, dtype=torch.bool).scatter_(1, topk_ids, False)
        student_log_tail = torch.logsumexp(log_q.masked_fill(~outside, float("-inf")), dim=-1).clamp_min(math.log(TAIL_EPS))
        teacher_log_p = topk_logprobs.float()
        teacher_tail = (1.0 - teacher_log_p.exp().sum(-1)).clamp_min(TAIL_EPS)
        kl = ((teacher_log_p.exp() * (teacher_log_p - log_q.gather(1, topk_ids))).sum(-1)
              + teacher_tail * (teacher_tail.log() - student_log_tail))
        losses = losses + alpha * kl
    elif alpha > 0.0:
        teacher_log_p = F.log_softmax(topk_logprobs.float() / temperature, dim=-1)
        student_log_q = F.log_softmax(logits.gather(1, topk_ids) / temperature, dim=-1)
        kl = (teacher_log_p.exp() * (teacher_log_p - student_log_q)).sum(-1)
        losses = losses + alpha * temperature**2 * kl
    losses = torch.where(valid, losses, torch.zeros_like(losses))
    return _reduce(losses, reduction, normalizer)


def _reduce(losses, reduction, normalizer):
    if reduction == "none":
        return losses
    if reduction == "sum":
        return losses.sum()
    return losses.sum() / normalizer


def _linear_loss(hidden, weight, labels, topk_ids, topk_logprobs, alpha, temperature, ignore_index, reduction,
                 normalizer, backend, chunk_tokens, softcap=None, tail=False):
    backend = _resolve_backend(backend, hidden, tail and alpha > 0.0)
    if tail and alpha > 0.0 and temperature != 1.0:
        raise ValueError(f"tail=True needs temperature 1.0 (the cached teacher log-probs are at temperature 1), got {temperature}")
    if softcap is not None and not softcap > 0:
        raise ValueError(f"softcap must be a positive number or None, got {softcap!r}")
    chunk_tokens = chunk_tokens or chunk_tokens_for(weight.shape[0], hidden.device.type)
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    if normalizer is None:
        normalizer = (labels != ignore_index).sum().clamp_min(1).item() if reduction == "mean" else 1.0
    if backend == "reference":
        return _reference(hidden, weight, labels, topk_ids, topk_logprobs, alpha, temperature, ignore_index, reduction, normalizer,
                          softcap, tail)
    if reduction == "none":
        return _chunked_none(hidden, weight, labels, topk_ids, topk_logprobs, alpha, temperature, ignore_index, chunk_tokens,
                             softcap, tail)
    return _ChunkedLinearLoss.apply(hidden, weight, labels, topk_ids, topk_logprobs, alpha, temperature, ignore_index,
                                    float(normalizer), chunk_tokens, backend, softcap, tail)


def fused_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100,
                               reduction: str = "mean", backend: str = "auto", normalizer: float | None = None,
                               chunk_tokens: int | None = None, softcap: float | None = None) -> torch.Tensor:
    """Cross-entropy of `hidden @ weight.T` (tokens x H, V x H) against `labels`, without the full logits.

    `softcap`: the model's `final_logit_softcapping` (logits -> cap * tanh(logits / cap)), or None.
    """
    return _linear_loss(hidden, weight, labels, None, None, 0.0, 1.0, ignore_index, reduction, normalizer, backend,
                        chunk_tokens, softcap)


def fused_linear_kd_loss(hidden: torch.Tensor, weight: torch.Tensor, topk_ids: torch.Tensor, topk_logprobs: torch.Tensor,
                         labels: torch.Tensor, temperature: float = 1.0, alpha: float = 0.5, ignore_index: int = -100,
                         reduction: str = "mean", backend: str = "auto", normalizer: float | None = None,
                         chunk_tokens: int | None = None, softcap: float | None = None, tail: bool = False) -> torch.Tensor:
    """Distillation loss against a teacher's cached top-k log-probs (tokens x k), blended with CE on `labels`.

    `tail`: KL over k+1 buckets, the top-k plus the mass outside it (module docstring); temperature 1.0 only,
    torch backends only.

    A cached id the student's LM head has no row for is refused here, on the host, with both sizes named:
    on a GPU, `gather` would stop the process with a device-side assert that names neither.
    """
    check_topk_ids(topk_ids, weight.shape[0])
    return _linear_loss(hidden, weight, labels, topk_ids, topk_logprobs, alpha, temperature, ignore_index, reduction,
                        normalizer, backend, chunk_tokens, softcap, tail)


def check_topk_ids(topk_ids: torch.Tensor, student_rows: int) -> None:
    """Refuse teacher top-k ids outside [0, student_rows), e.g. a Qwen2.5-7B cache (152,064 rows) for the 1.5B (151,936)."""
    if topk_ids.numel() == 0:
        return
    low, high = int(topk_ids.min()), int(topk_ids.max())  # one host sync per batch, cheap beside the forward
    if low < 0 or high >= student_rows:
        bad = low if low < 0 else high
        raise BudgetReasonerError(
            f"teacher top-k id {bad} is outside the student's vocabulary: the cache needs at least {high + 1} LM-head "
            f"rows, the student has {student_rows}; re-cache with a teacher whose ids the student has, or sequence-level data"
        )


@torch.no_grad()
def linear_topk_logprobs(hidden: torch.Tensor, weight: torch.Tensor, k: int, chunk_tokens: int | None = None,
                         softcap: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The k largest log-probs of softmax(hidden @ weight.T) per row (tokens x k, fp32) and their token ids,
    a chunk of rows at a time: what the distillation cache keeps, without the tokens x vocab logits.
    `softcap`: the teacher's `final_logit_softcapping`, which its own forward would apply."""
    chunk_tokens = chunk_tokens or chunk_tokens_for(weight.shape[0], hidden.device.type)
    values, indices = [], []
    for start in range(0, hidden.shape[0], chunk_tokens):
        logits = (hidden[start : start + chunk_tokens] @ weight.t()).float()
        _softcap_(logits, softcap, need_grad=False)
        top = logits.topk(k, dim=-1)
        values.append(top.values - logits.logsumexp(-1, keepdim=True))
        indices.append(top.indices)
    if not values:
        return hidden.new_zeros((0, k), dtype=torch.float32), torch.zeros((0, k), dtype=torch.long, device=hidden.device)
    return torch.cat(values), torch.cat(indices)
