"""Fused attention, FlashAttention-2 style: forward and backward in Triton, beside a PyTorch reference.

Forward: each program owns a block of queries of one head and streams the key/value blocks through an
online softmax, keeping only the running max, the running sum and the output accumulator; it writes
the output and the log-sum-exp per query, never the T x T scores. Causal masking stops the stream at
the diagonal (fully masked blocks are skipped, not computed). Backward recomputes the scores blockwise
from the saved log-sum-exp: one kernel per key block accumulates dK and dV over the query blocks, one
per query block accumulates dQ, so memory stays linear in T.

Grouped-query attention: query head h reads key/value head h // (heads / kv_heads). dK and dV are
computed per query head and summed over each group (an H/KV-times larger buffer than the keys; it
keeps the kernels free of atomics). Head dims up to 256 that are not powers of two are padded with a
masked tail. fp16, bf16 and fp32 inputs; softmax statistics and accumulators in fp32.

`flash_attention(..., backend="auto")` runs the Triton kernels on a CUDA GPU of compute capability
8.0 or newer (or 7.5 for fp16/fp32: the T4 has no bf16), and on CPU tensors under TRITON_INTERPRET=1;
anywhere else it falls back to PyTorch's SDPA and says so once.
"""

from __future__ import annotations

import logging
import os

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)
BACKENDS = ("auto", "triton", "sdpa", "reference")
MAX_HEAD_DIM = 256
_warned: set[str] = set()


def attention_reference(q, k, v, causal: bool = True, softmax_scale: float | None = None) -> torch.Tensor:
    """The naive computation (full T x T scores in fp32), for tests and benchmarks."""
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    scale = softmax_scale if softmax_scale is not None else q.shape[-1] ** -0.5
    scores = (q.float() @ k.float().transpose(-1, -2)) * scale
    if causal:
        t_q, t_k = q.shape[2], k.shape[2]
        mask = torch.ones(t_q, t_k, dtype=torch.bool, device=q.device).tril(t_k - t_q)
        scores = scores.masked_fill(~mask, float("-inf"))
    return (scores.softmax(-1) @ v.float()).to(q.dtype)


def _sdpa(q, k, v, causal, softmax_scale):
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=softmax_scale,
                                          enable_gqa=q.shape[1] != k.shape[1])


def _say_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        log.warning(message)


def _triton_unsupported_reason(q: torch.Tensor) -> str | None:
    if q.shape[-1] > MAX_HEAD_DIM:
        return f"head dim {q.shape[-1]} > {MAX_HEAD_DIM}"
    if q.is_cuda:
        major, minor = torch.cuda.get_device_capability(q.device)
        if (major, minor) < (7, 5):
            return f"compute capability {major}.{minor} < 7.5"
        if q.dtype == torch.bfloat16 and major < 8:
            return f"bf16 on compute capability {major}.{minor} (no bf16 units)"
        return None
    if os.environ.get("TRITON_INTERPRET") == "1":
        return None
    return "CPU tensors without TRITON_INTERPRET=1"


def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True,
                    softmax_scale: float | None = None, backend: str = "auto") -> torch.Tensor:
    """Attention of q (batch, heads, T, D) over k, v (batch, kv_heads, T, D); heads a multiple of kv_heads."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if q.shape[1] % k.shape[1] != 0:
        raise ValueError(f"query heads ({q.shape[1]}) must be a multiple of key/value heads ({k.shape[1]})")
    if backend == "reference":
        return attention_reference(q, k, v, causal, softmax_scale)
    if backend == "sdpa":
        return _sdpa(q, k, v, causal, softmax_scale)
    reason = _triton_unsupported_reason(q)
    if reason is not None:
        if backend == "triton":
            raise ValueError(f"the Triton attention kernel cannot run here: {reason}")
        if q.is_cuda:
            _say_once(f"budget_flash: {reason}; using PyTorch SDPA instead")
        return _sdpa(q, k, v, causal, softmax_scale)
    from budget_reasoner.kernels.attention_triton import FlashAttentionFunction

    scale = softmax_scale if softmax_scale is not None else q.shape[-1] ** -0.5
    return FlashAttentionFunction.apply(q, k, v, causal, scale)


def budget_flash_attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0,
                                   scaling: float | None = None, is_causal: bool | None = None, **kwargs):
    """transformers' attention interface for the fused kernel (see `register_attention`).

    The fused kernel handles causal attention over whole sequences (training, prefill). With padding
    masks or a KV cache (queries fewer than keys) it hands over to SDPA, which is what those need.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    if attention_mask is not None or query.shape[2] != key.shape[2] or dropout > 0.0 or not causal:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    output = flash_attention(query, key, value, causal=True, softmax_scale=scaling)
    return output.transpose(1, 2).contiguous(), None


REGISTERED_NAME = "budget_fused_attention"


def register_attention(name: str = REGISTERED_NAME) -> str:
    """Register the fused kernel with transformers' attention interface and return the name to pass as
    `attn_implementation`; idempotent. A preset says `attention: budget_flash`, but the registered name
    must not contain "flash": transformers routes every such name to its flash-attn/hub-kernel loader."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(name, budget_flash_attention_forward)
    if name not in ALL_MASK_ATTENTION_FUNCTIONS._global_mapping:
        AttentionMaskInterface.register(name, sdpa_mask)  # None when purely causal: then the kernel runs
    return name


def block_sizes(head_dim: int, device: torch.device) -> tuple[int, int]:
    """(BLOCK_M, BLOCK_N): sized for 64 KB of shared memory (a T4's per-block limit) at head dim 128."""
    if device.type != "cuda":
        return 16, 16  # the interpreter: small blocks keep tests fast
    return (64, 64) if head_dim <= 64 else (64, 32) if head_dim <= 128 else (32, 32)
