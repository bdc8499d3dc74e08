"""Fused attention, FlashAttention-2 style: forward and backward in Triton, beside a PyTorch reference.

Forward: each program owns a block of queries of one head and streams the key/value blocks through an
online softmax, keeping only the running max, the running sum and the output accumulator; it writes
the output and the log-sum-exp per query, never the T x T scores. Causal masking stops the stream at
the diagonal (fully masked blocks are skipped, not computed). Backward recomputes the scores blockwise
from the saved log-sum-exp: one kernel per key block accumulates dK and dV over the query blocks, one
per query block accumulates dQ, so memory stays linear in T.

Key padding: an optional (batch, T) bool mask of the keys that exist (True) is applied inside the
kernels, so a right- or left-padded batch runs fused: causal AND key-valid is exactly the 4D mask
transformers builds for a padded batch. A query row that sees no valid key (a left-padding query)
gets a zero output and zero gradients, never NaN.

Grouped-query attention: query head h reads key/value head h // (heads / kv_heads). dK and dV are
computed per query head and summed over each group (an H/KV-times larger buffer than the keys; it
keeps the kernels free of atomics). Head dims up to 256 that are not powers of two are padded with a
masked tail. fp16, bf16 and fp32 inputs; softmax statistics and accumulators in fp32.

Block sizes, warps and pipeline stages come from a small table per head dim and shared-memory size
(`kernel_configs`); a configuration that fails to compile falls back to a smaller one, said once.

`flash_attention(..., backend="auto")` runs the Triton kernels on a CUDA GPU of compute capability
8.0 or newer (or 7.5 for fp16/fp32: the T4 has no bf16), and on CPU tensors under TRITON_INTERPRET=1;
anywhere else it falls back to PyTorch's SDPA and says so once.
"""

from __future__ import annotations

import logging
import os
import weakref
from collections import Counter
from dataclasses import dataclass

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)
BACKENDS = ("auto", "triton", "sdpa", "reference")
MAX_HEAD_DIM = 256
_warned: set[str] = set()


def _allowed(t_q: int, t_k: int, causal: bool, key_padding_mask: torch.Tensor | None, device) -> torch.Tensor | None:
    """(batch or 1, 1, t_q, t_k) bool: which keys each query may see; None when every key is visible."""
    allowed = None
    if causal:  # lower-right aligned: the last query sees every key (a KV cache's queries are the last ones)
        allowed = torch.ones(t_q, t_k, dtype=torch.bool, device=device).tril(t_k - t_q)[None, None]
    if key_padding_mask is not None:
        keys = key_padding_mask[:, None, None, :].bool()
        allowed = keys if allowed is None else allowed & keys
    return allowed


def attention_reference(q, k, v, causal: bool = True, softmax_scale: float | None = None,
                        key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
    """The naive computation (full T x T scores in fp32), for tests and benchmarks. Rows that see no key give 0."""
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    scale = softmax_scale if softmax_scale is not None else q.shape[-1] ** -0.5
    scores = (q.float() @ k.float().transpose(-1, -2)) * scale
    allowed = _allowed(q.shape[2], k.shape[2], causal, key_padding_mask, q.device)
    if allowed is None:
        return (scores.softmax(-1) @ v.float()).to(q.dtype)
    # an empty row's softmax would be 0/0: give it finite scores, then zero it (its gradient is zero too)
    seen = allowed.any(-1, keepdim=True)
    scores = scores.masked_fill(~allowed, float("-inf")).masked_fill(~seen, 0.0)
    return ((scores.softmax(-1) * allowed) @ v.float()).to(q.dtype)


def _sdpa(q, k, v, causal, softmax_scale, key_padding_mask=None):
    if key_padding_mask is None and (not causal or q.shape[2] == k.shape[2]):
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=softmax_scale,
                                              enable_gqa=q.shape[1] != k.shape[1])
    # SDPA's is_causal is upper-left aligned and knows no padding: pass the mask itself (SDPA zeroes empty rows)
    allowed = _allowed(q.shape[2], k.shape[2], causal, key_padding_mask, q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=softmax_scale,
                                          enable_gqa=q.shape[1] != k.shape[1])


def _say_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        log.warning(message)


# ---------------------------------------------------------------------------------------------------------
# Block sizes per head dim and GPU. Shared memory a configuration needs, estimated from its tiles:
#   forward:  stages x (BLOCK_M + 2 BLOCK_N) x D x bytes   (the Q tile, the K and V tiles)
#   backward: stages x 2 (BLOCK_M + BLOCK_N) x D x bytes   (Q and dO tiles, K and V tiles, in both kernels)
#   plus BLOCK_M x BLOCK_N x bytes for the probability tile that feeds the second dot.
# D is the head dim padded to a power of two, bytes the input dtype's (the table is sized for bf16/fp16).
# Counting every tile as pipelined overestimates (Triton multi-buffers only the loads inside the loop),
# which leaves room for the compiler's own scratch. sm75 runs one stage: asynchronous copies into shared
# memory (cp.async), which software pipelining needs, start at sm80; so there the tiles get the space.
# Rule: the largest tiles that fit with 2+ stages at BLOCK_M >= 64, BLOCK_N >= 32; else the largest at 1.
# ---------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class BlockConfig:
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int

    def __str__(self) -> str:
        return f"{self.block_m}x{self.block_n} blocks, {self.num_warps} warps, {self.num_stages} stage(s)"


KB = 1024
# shared memory one block may use (the opt-in maximum) per compute capability
SHARED_MEMORY = {(7, 5): 64 * KB, (8, 0): 163 * KB, (8, 6): 99 * KB, (8, 7): 163 * KB, (8, 9): 99 * KB,
                 (9, 0): 227 * KB, (10, 0): 227 * KB, (12, 0): 99 * KB}
INTERPRETER_CAPABILITY = (8, 6)  # CPU tensors under TRITON_INTERPRET=1 run a consumer card's configuration


def _c(block_m, block_n, num_warps, num_stages) -> BlockConfig:
    return BlockConfig(block_m, block_n, num_warps, num_stages)


# (padded head dim, shared memory) -> (forward, backward); bytes for bf16/fp16, budget in parentheses
CONFIGS = {
    # 64 KB (sm75, T4): one stage
    (64, 64 * KB): (_c(128, 64, 4, 1),   # 1 x (128 + 128) x 64 x 2 + 128 x 64 x 2 = 49,152
                    _c(64, 64, 4, 1)),   # 1 x 2 (64 + 64) x 64 x 2 + 64 x 64 x 2 = 40,960
    (128, 64 * KB): (_c(64, 64, 4, 1),   # 1 x (64 + 128) x 128 x 2 + 8,192 = 57,344
                     _c(64, 32, 4, 1)),  # 1 x 2 (64 + 32) x 128 x 2 + 4,096 = 53,248
    (256, 64 * KB): (_c(32, 32, 4, 1),   # 1 x (32 + 64) x 256 x 2 + 2,048 = 51,200
                     _c(32, 16, 4, 1)),  # 1 x 2 (32 + 16) x 256 x 2 + 1,024 = 50,176
    # 99 KB (sm86 RTX 30xx/A10, sm89 RTX 40xx/L4, sm120 RTX 50xx)
    (64, 99 * KB): (_c(128, 64, 4, 2),   # 2 x (128 + 128) x 64 x 2 + 16,384 = 81,920
                    _c(64, 64, 4, 2)),   # 2 x 2 (64 + 64) x 64 x 2 + 8,192 = 73,728
    (128, 99 * KB): (_c(64, 32, 4, 2),   # 2 x (64 + 64) x 128 x 2 + 4,096 = 69,632 (64x64: 106,496 > 101,376)
                     _c(64, 64, 4, 1)),  # 1 x 2 (64 + 64) x 128 x 2 + 8,192 = 73,728 (64x32 at 2 stages: 102,400)
    (256, 99 * KB): (_c(64, 32, 4, 1),   # 1 x (64 + 64) x 256 x 2 + 4,096 = 69,632
                     _c(32, 32, 4, 1)),  # 1 x 2 (32 + 32) x 256 x 2 + 2,048 = 67,584
    # 163 KB (sm80 A100, sm87 Orin)
    (64, 163 * KB): (_c(128, 64, 4, 3),  # 3 x (128 + 128) x 64 x 2 + 16,384 = 114,688
                     _c(64, 64, 4, 3)),  # 3 x 2 (64 + 64) x 64 x 2 + 8,192 = 106,496
    (128, 163 * KB): (_c(128, 64, 8, 2),  # 2 x (128 + 128) x 128 x 2 + 16,384 = 147,456
                      _c(64, 64, 4, 2)),  # 2 x 2 (64 + 64) x 128 x 2 + 8,192 = 139,264
    (256, 163 * KB): (_c(64, 32, 4, 2),   # 2 x (64 + 64) x 256 x 2 + 4,096 = 135,168
                      _c(64, 64, 4, 1)),  # 1 x 2 (64 + 64) x 256 x 2 + 8,192 = 139,264
    # 227 KB (sm90 H100/H200, sm100 B200)
    (64, 227 * KB): (_c(128, 64, 4, 3),   # 3 x (128 + 128) x 64 x 2 + 16,384 = 114,688
                     _c(128, 64, 8, 3)),  # 3 x 2 (128 + 64) x 64 x 2 + 16,384 = 163,840
    (128, 227 * KB): (_c(128, 64, 8, 3),  # 3 x (128 + 128) x 128 x 2 + 16,384 = 212,992
                      _c(128, 64, 8, 2)),  # 2 x 2 (128 + 64) x 128 x 2 + 16,384 = 212,992
    (256, 227 * KB): (_c(64, 64, 4, 2),   # 2 x (64 + 128) x 256 x 2 + 8,192 = 204,800
                      _c(64, 32, 4, 2)),  # 2 x 2 (64 + 32) x 256 x 2 + 4,096 = 200,704
}
# smaller and smaller, for fp32 inputs (twice the bytes) and for a configuration that fails to compile
FALLBACKS = (_c(64, 64, 4, 1), _c(64, 32, 4, 1), _c(32, 32, 4, 1), _c(32, 16, 4, 1), _c(16, 16, 4, 1))


def padded_head_dim(head_dim: int) -> int:
    return max(16, 1 << (head_dim - 1).bit_length())


def shared_memory_bytes(config: BlockConfig, head_dim: int, element_bytes: int, backward: bool) -> int:
    """The estimate above, in bytes."""
    rows = 2 * (config.block_m + config.block_n) if backward else config.block_m + 2 * config.block_n
    tiles = config.num_stages * rows * padded_head_dim(head_dim) * element_bytes
    return tiles + config.block_m * config.block_n * element_bytes


def shared_memory_budget(capability: tuple[int, int]) -> int:
    """Bytes of shared memory per block on this compute capability; unknown ones get the nearest older known one."""
    known = [c for c in sorted(SHARED_MEMORY) if c <= tuple(capability)]
    return SHARED_MEMORY[known[-1]] if known else 48 * KB


def _budget_class(budget: int) -> int:
    classes = sorted({b for _, b in CONFIGS})
    fitting = [b for b in classes if b <= budget]
    return fitting[-1] if fitting else classes[0]


def fallback_configs(config: BlockConfig, head_dim: int, element_bytes: int, backward: bool, budget: int) -> list[BlockConfig]:
    """The configurations to try, in order, after `config` fails: smaller tiles that fit the budget."""
    area = config.block_m * config.block_n
    return [c for c in FALLBACKS if c.block_m * c.block_n < area
            and shared_memory_bytes(c, head_dim, element_bytes, backward) <= budget]


def kernel_configs(head_dim: int, capability: tuple[int, int], dtype: torch.dtype) -> tuple[BlockConfig, BlockConfig]:
    """(forward, backward) block configuration for this head dim, GPU and input dtype."""
    budget = shared_memory_budget(capability)
    element_bytes = torch.empty((), dtype=dtype).element_size()
    bucket = max(64, padded_head_dim(head_dim))
    chosen = []
    for backward, config in enumerate(CONFIGS[(bucket, _budget_class(budget))]):
        if shared_memory_bytes(config, head_dim, element_bytes, bool(backward)) > budget:  # fp32 inputs
            config = (fallback_configs(config, head_dim, element_bytes, bool(backward), budget) or [FALLBACKS[-1]])[0]
        chosen.append(config)
    return chosen[0], chosen[1]


def device_capability(device: torch.device) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device) if device.type == "cuda" else INTERPRETER_CAPABILITY


# ---------------------------------------------------------------------------------------------------------


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
                    softmax_scale: float | None = None, backend: str = "auto",
                    key_padding_mask: torch.Tensor | None = None,
                    configs: tuple[BlockConfig, BlockConfig] | None = None) -> torch.Tensor:
    """Attention of q (batch, heads, T, D) over k, v (batch, kv_heads, T, D); heads a multiple of kv_heads.

    key_padding_mask: (batch, T) bool, True where the key exists. configs: the (forward, backward) blocks to
    run instead of `kernel_configs`' pick for this device (the interpreter tests run every GPU's)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if q.shape[1] % k.shape[1] != 0:
        raise ValueError(f"query heads ({q.shape[1]}) must be a multiple of key/value heads ({k.shape[1]})")
    if key_padding_mask is not None and tuple(key_padding_mask.shape) != (k.shape[0], k.shape[2]):
        raise ValueError(f"key_padding_mask must be (batch, keys) = {(k.shape[0], k.shape[2])}, "
                         f"got {tuple(key_padding_mask.shape)}")
    if backend == "reference":
        return attention_reference(q, k, v, causal, softmax_scale, key_padding_mask)
    if backend == "sdpa":
        return _sdpa(q, k, v, causal, softmax_scale, key_padding_mask)
    reason = _triton_unsupported_reason(q)
    if reason is None and q.shape[2] != k.shape[2]:
        reason = f"{q.shape[2]} queries over {k.shape[2]} keys (the kernels take whole sequences)"
    if reason is not None:
        if backend == "triton":
            raise ValueError(f"the Triton attention kernel cannot run here: {reason}")
        if q.is_cuda:
            _say_once(f"budget_flash: {reason}; using PyTorch SDPA instead")
        return _sdpa(q, k, v, causal, softmax_scale, key_padding_mask)
    from budget_reasoner.kernels.attention_triton import FlashAttentionFunction

    scale = softmax_scale if softmax_scale is not None else q.shape[-1] ** -0.5
    keys = None if key_padding_mask is None else key_padding_mask.to(device=q.device, dtype=torch.int8).contiguous()
    configs = configs or kernel_configs(q.shape[-1], device_capability(q.device), q.dtype)
    return FlashAttentionFunction.apply(q, k, v, keys, causal, scale, configs)


# ---------------------------------------------------------------------------------------------------------
# transformers' attention interface
# ---------------------------------------------------------------------------------------------------------
_usage: Counter = Counter()
_mask_memo: list = [None, None, None]  # (weakref to the last 4D mask, its version, what it said)
KERNEL, KERNEL_PADDED = "kernel", "kernel, key padding"


def attention_usage() -> dict[str, int]:
    """Forward passes so far by where attention ran: "kernel", "kernel, key padding", or "SDPA: <why>"."""
    return dict(_usage)


def reset_attention_usage() -> None:
    _usage.clear()


def usage_line() -> str:
    fused = _usage[KERNEL] + _usage[KERNEL_PADDED]
    fallback = {name: n for name, n in _usage.items() if name not in (KERNEL, KERNEL_PADDED)}
    why = "".join(f"; {n} {name}" for name, n in sorted(fallback.items()))
    return (f"budget_flash: {fused + sum(fallback.values())} forward passes, {fused} on the fused kernel "
            f"({_usage[KERNEL_PADDED]} with key padding), {sum(fallback.values())} on SDPA{why}")


def _record(module, outcome: str) -> None:
    # one count per forward pass: only the first layer counts (a checkpointed recompute counts again)
    if getattr(module, "layer_idx", 0) not in (0, None):
        return
    _usage[outcome] += 1
    total = sum(_usage.values())
    if total & (total - 1) == 0:  # 1, 2, 4, 8, ...: a few lines over a whole run
        from budget_reasoner.progress import say

        say(usage_line())


def key_padding_from_mask(mask: torch.Tensor, batch: int, length: int) -> tuple[torch.Tensor | None, str | None]:
    """Read a key-padding mask out of the 4D mask transformers made: (key_valid or None when all keys are valid, None)
    when the mask is causal AND key padding, else (None, why not). Bool masks (sdpa_mask) and additive float
    masks (eager_mask: 0 or the dtype's minimum) both read."""
    if mask.dim() != 4 or mask.shape[1] != 1 or mask.shape[0] not in (1, batch) or tuple(mask.shape[2:]) != (length, length):
        return None, "a mask that is not causal + key padding"
    if mask.dtype == torch.bool:
        allowed = mask[:, 0]
    else:
        allowed = mask[:, 0] == 0
        if not (allowed | (mask[:, 0] <= torch.finfo(mask.dtype).min)).all():
            return None, "an additive mask with biases"
    key_valid = allowed[:, -1, :]  # the last query sees every earlier key: its row is the key-padding mask
    causal = torch.ones(length, length, dtype=torch.bool, device=mask.device).tril()
    if not torch.equal(allowed, causal[None] & key_valid[:, None, :]):
        return None, "a mask that is not causal + key padding (packed sequences, sliding window, ...)"
    if bool(key_valid.all()):
        return None, None
    return key_valid.expand(batch, length).contiguous(), None


def _key_padding(mask: torch.Tensor, batch: int, length: int):
    # every layer of one forward pass gets the same mask object: read it once
    ref, version, said = _mask_memo
    if ref is not None and ref() is mask and version == mask._version:
        return said
    said = key_padding_from_mask(mask, batch, length)
    _mask_memo[:] = [weakref.ref(mask), mask._version, said]
    return said


def budget_flash_attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0,
                                   scaling: float | None = None, is_causal: bool | None = None, **kwargs):
    """transformers' attention interface for the fused kernel (see `register_attention`).

    Runs the kernel for causal attention over whole sequences (training, prefill), padded or not: the 4D
    mask of a padded batch is read back into a key-padding mask. Anything else (KV-cache decoding,
    dropout, packed sequences, sliding windows) goes to SDPA; `attention_usage()` counts both.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    key_valid, reason = None, None
    if query.shape[2] != key.shape[2]:
        reason = "KV-cache decoding"
    elif dropout > 0.0:
        reason = "dropout"
    elif not causal:
        reason = "non-causal"
    elif kwargs.get("position_bias") is not None:
        reason = "position bias"
    elif (unsupported := _triton_unsupported_reason(query)) is not None:
        reason = unsupported
    elif attention_mask is not None:
        key_valid, reason = _key_padding(attention_mask, query.shape[0], query.shape[2])
    if reason is not None:
        _record(module, f"SDPA: {reason}")
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    _record(module, KERNEL if key_valid is None else KERNEL_PADDED)
    output = flash_attention(query, key, value, causal=True, softmax_scale=scaling, backend="triton",
                             key_padding_mask=key_valid)
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
        # SDPA's masks: None when purely causal; a 4D bool mask for a padded batch, read back into key padding
        AttentionMaskInterface.register(name, sdpa_mask)
    return name
