"""Triton kernels of `attention.flash_attention` (forward, dK/dV, dQ) and their autograd Function.

Layout: q, o, do: (B, H, T, D); k, v: (B, KVH, T, D), all contiguous; lse, delta: (B, H, T) fp32;
keys (optional): (B, T) int8, nonzero where the key exists.
Import after setting TRITON_INTERPRET=1 to run them on CPU tensors.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.runtime.errors import InterpreterError, TritonError

from budget_reasoner.kernels.attention import (
    BlockConfig, _say_once, device_capability, fallback_configs, padded_head_dim, shared_memory_budget,
)


@triton.jit
def _kv_row(bh, H, GROUPS):
    """The (batch, kv head) row that serves (batch, query head) row `bh`: query head h reads kv head h // GROUPS."""
    return (bh // H) * (H // GROUPS) + (bh % H) // GROUPS


@triton.jit
def _load_tile(base, rows, offs_d, T, D: tl.constexpr, UPCAST: tl.constexpr):
    """A [rows, BLOCK_D] tile of one head's (T, D) matrix; rows past T and the padded head dims read 0."""
    tile = tl.load(base + rows[:, None] * D + offs_d[None, :], mask=(rows[:, None] < T) & (offs_d[None, :] < D), other=0.0)
    return tile.to(tl.float32) if UPCAST else tile


@triton.jit
def _key_ok(KEYS, b, cols, T, HAS_KEYS: tl.constexpr):
    """Which of these key columns exist: inside T and, with a key-padding mask, not padding."""
    ok = cols < T
    if HAS_KEYS:
        ok = ok & (tl.load(KEYS + b * T + cols, mask=cols < T, other=0) != 0)
    return ok


@triton.jit
def _probabilities(q, k, rows, cols, key_ok, lse, scale, T, CAUSAL: tl.constexpr):
    """The softmax probabilities of a (rows x cols) block, recomputed from the saved log-sum-exp.
    A row that saw no key saved lse = +inf, so its probabilities are exp(-inf) = 0 whatever the mask."""
    s = tl.dot(q, tl.trans(k)).to(tl.float32) * scale
    valid = (rows[:, None] < T) & key_ok[None, :]
    if CAUSAL:
        valid = valid & (rows[:, None] >= cols[None, :])
    return tl.where(valid, tl.exp(s - lse[:, None]), 0.0)


@triton.jit
def _forward_kernel(Q, K, V, O, LSE, KEYS, scale, T, H, GROUPS,
                    CAUSAL: tl.constexpr, HAS_KEYS: tl.constexpr, UPCAST: tl.constexpr, D: tl.constexpr,
                    BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    start_m = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1).to(tl.int64)
    kv_bh = _kv_row(bh, H, GROUPS)
    b = bh // H
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < D
    q = _load_tile(Q + bh * T * D, offs_m, offs_d, T, D, UPCAST)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    end_n = tl.minimum(T, start_m + BLOCK_M) if CAUSAL else T  # causal: blocks past the diagonal are skipped
    for start_n in range(0, end_n, BLOCK_N):
        cols = start_n + offs_n
        k = _load_tile(K + kv_bh * T * D, cols, offs_d, T, D, UPCAST)
        v = _load_tile(V + kv_bh * T * D, cols, offs_d, T, D, UPCAST)
        s = tl.dot(q, tl.trans(k)).to(tl.float32) * scale
        valid = _key_ok(KEYS, b, cols, T, HAS_KEYS)[None, :]
        if CAUSAL:
            valid = valid & (offs_m[:, None] >= cols[None, :])
        s = tl.where(valid, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows past T, or with only padding keys so far
        p = tl.exp(s - m_safe[:, None])
        alpha = tl.exp(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v).to(tl.float32)
        m_i = m_new
    seen = l_i > 0.0
    out = acc / tl.where(seen, l_i, 1.0)[:, None]  # a row that saw no key: 0, not 0/0
    row_mask = offs_m < T
    tl.store(O + bh * T * D + offs_m[:, None] * D + offs_d[None, :], out.to(O.dtype.element_ty), mask=row_mask[:, None] & d_mask[None, :])
    tl.store(LSE + bh * T + offs_m, tl.where(seen, m_i + tl.log(tl.where(seen, l_i, 1.0)), float("inf")), mask=row_mask)


@triton.jit
def _backward_dkdv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV, KEYS, scale, T, H, GROUPS,
                          CAUSAL: tl.constexpr, HAS_KEYS: tl.constexpr, UPCAST: tl.constexpr, D: tl.constexpr,
                          BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """One key block of one query head: dV = sum P^T dO, dK = scale * sum dS^T Q over the query blocks."""
    start_n = tl.program_id(0) * BLOCK_N
    bh = tl.program_id(1).to(tl.int64)
    kv_bh = _kv_row(bh, H, GROUPS)
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < D
    key_ok = _key_ok(KEYS, bh // H, offs_n, T, HAS_KEYS)  # a padding key gets no probability, so dK = dV = 0
    k = _load_tile(K + kv_bh * T * D, offs_n, offs_d, T, D, UPCAST)
    v = _load_tile(V + kv_bh * T * D, offs_n, offs_d, T, D, UPCAST)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    begin_m = (start_n // BLOCK_M) * BLOCK_M if CAUSAL else 0  # causal: earlier queries never see these keys
    for start_m in range(begin_m, T, BLOCK_M):
        rows = start_m + offs_m
        q = _load_tile(Q + bh * T * D, rows, offs_d, T, D, UPCAST)
        do = _load_tile(DO + bh * T * D, rows, offs_d, T, D, UPCAST)
        lse = tl.load(LSE + bh * T + rows, mask=rows < T, other=0.0)
        delta = tl.load(DELTA + bh * T + rows, mask=rows < T, other=0.0)
        p = _probabilities(q, k, rows, offs_n, key_ok, lse, scale, T, CAUSAL)
        dv += tl.dot(tl.trans(p.to(do.dtype)), do).to(tl.float32)
        dp = tl.dot(do, tl.trans(v)).to(tl.float32)
        ds = p * (dp - delta[:, None])
        dk += tl.dot(tl.trans(ds.to(q.dtype)), q).to(tl.float32)
    out_mask = (offs_n[:, None] < T) & d_mask[None, :]
    tl.store(DK + bh * T * D + offs_n[:, None] * D + offs_d[None, :], (dk * scale).to(DK.dtype.element_ty), mask=out_mask)
    tl.store(DV + bh * T * D + offs_n[:, None] * D + offs_d[None, :], dv.to(DV.dtype.element_ty), mask=out_mask)


@triton.jit
def _backward_dq_kernel(Q, K, V, DO, LSE, DELTA, DQ, KEYS, scale, T, H, GROUPS,
                        CAUSAL: tl.constexpr, HAS_KEYS: tl.constexpr, UPCAST: tl.constexpr, D: tl.constexpr,
                        BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """One query block: dQ = scale * sum dS K over the key blocks."""
    start_m = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1).to(tl.int64)
    kv_bh = _kv_row(bh, H, GROUPS)
    b = bh // H
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < D
    q_mask = (offs_m[:, None] < T) & d_mask[None, :]
    q = _load_tile(Q + bh * T * D, offs_m, offs_d, T, D, UPCAST)
    do = _load_tile(DO + bh * T * D, offs_m, offs_d, T, D, UPCAST)
    lse = tl.load(LSE + bh * T + offs_m, mask=offs_m < T, other=0.0)
    delta = tl.load(DELTA + bh * T + offs_m, mask=offs_m < T, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    end_n = tl.minimum(T, start_m + BLOCK_M) if CAUSAL else T
    for start_n in range(0, end_n, BLOCK_N):
        cols = start_n + offs_n
        k = _load_tile(K + kv_bh * T * D, cols, offs_d, T, D, UPCAST)
        v = _load_tile(V + kv_bh * T * D, cols, offs_d, T, D, UPCAST)
        p = _probabilities(q, k, offs_m, cols, _key_ok(KEYS, b, cols, T, HAS_KEYS), lse, scale, T, CAUSAL)
        dp = tl.dot(do, tl.trans(v)).to(tl.float32)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k).to(tl.float32)
    tl.store(DQ + bh * T * D + offs_m[:, None] * D + offs_d[None, :], (dq * scale).to(DQ.dtype.element_ty), mask=q_mask)


def _upcast(q: torch.Tensor) -> bool:
    """The interpreter computes bf16/fp16 dots wrongly (numpy has no bf16), so there the tiles go to fp32 first.
    On a GPU the dots stay in the input dtype, on the tensor cores; the accumulators are fp32 either way."""
    return not q.is_cuda and q.dtype != torch.float32


_compiled: dict[tuple, BlockConfig] = {}  # (pass, head dim, dtype, capability, asked) -> the one that compiled


def _run(which: str, config: BlockConfig, q: torch.Tensor, launch) -> None:
    """launch(config) with the table's configuration; if it fails to compile (shared memory, registers, ptxas),
    the next smaller one that fits, said once. Interpreter errors are bugs and propagate."""
    dim, capability = q.shape[-1], device_capability(q.device)
    key = (which, dim, q.dtype, capability, config)
    if key in _compiled:
        return launch(_compiled[key])
    budget = shared_memory_budget(capability)
    candidates = [config, *fallback_configs(config, dim, q.element_size(), which == "backward", budget)]
    for tried, candidate in enumerate(candidates):
        try:
            launch(candidate)
        except TritonError as error:
            if isinstance(error, InterpreterError) or tried + 1 == len(candidates):
                raise
            _say_once(f"budget_flash: {which} at {candidate} does not compile on sm{capability[0]}{capability[1]} "
                      f"(head dim {dim}, {str(q.dtype).removeprefix('torch.')}: {type(error).__name__}); "
                      f"using {candidates[tried + 1]}")
            continue
        _compiled[key] = candidate
        return


class FlashAttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, keys, causal: bool, scale: float, configs: tuple[BlockConfig, BlockConfig]):
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        batch, heads, length, dim = q.shape
        groups = heads // k.shape[1]
        out = torch.empty_like(q)
        lse = torch.empty((batch, heads, length), dtype=torch.float32, device=q.device)

        def launch(c: BlockConfig):
            _forward_kernel[(triton.cdiv(length, c.block_m), batch * heads)](
                q, k, v, out, lse, q if keys is None else keys, scale, length, heads, groups,
                CAUSAL=causal, HAS_KEYS=keys is not None, UPCAST=_upcast(q), D=dim, BLOCK_D=padded_head_dim(dim),
                BLOCK_M=c.block_m, BLOCK_N=c.block_n, num_warps=c.num_warps, num_stages=c.num_stages)

        _run("forward", configs[0], q, launch)
        ctx.save_for_backward(q, k, v, out, lse, keys)
        ctx.causal, ctx.scale, ctx.configs = causal, scale, configs
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse, keys = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        batch, heads, length, dim = q.shape
        kv_heads = k.shape[1]
        groups = heads // kv_heads
        delta = (grad_out.float() * out.float()).sum(-1)  # rowsum(dO * O), the softmax backward's correction
        dq = torch.empty_like(q)
        dk_per_head = torch.empty((batch, heads, length, dim), dtype=k.dtype, device=k.device)
        dv_per_head = torch.empty((batch, heads, length, dim), dtype=v.dtype, device=v.device)
        key_pointer = q if keys is None else keys

        def launch(c: BlockConfig):
            common = dict(CAUSAL=ctx.causal, HAS_KEYS=keys is not None, UPCAST=_upcast(q), D=dim,
                          BLOCK_D=padded_head_dim(dim), BLOCK_M=c.block_m, BLOCK_N=c.block_n,
                          num_warps=c.num_warps, num_stages=c.num_stages)
            _backward_dkdv_kernel[(triton.cdiv(length, c.block_n), batch * heads)](
                q, k, v, grad_out, lse, delta, dk_per_head, dv_per_head, key_pointer, ctx.scale, length, heads, groups,
                **common)
            _backward_dq_kernel[(triton.cdiv(length, c.block_m), batch * heads)](
                q, k, v, grad_out, lse, delta, dq, key_pointer, ctx.scale, length, heads, groups, **common)

        _run("backward", ctx.configs[1], q, launch)
        # each key/value head served `groups` query heads: its gradient is their sum
        dk = dk_per_head.view(batch, kv_heads, groups, length, dim).sum(2, dtype=torch.float32).to(k.dtype)
        dv = dv_per_head.view(batch, kv_heads, groups, length, dim).sum(2, dtype=torch.float32).to(v.dtype)
        return dq, dk, dv, None, None, None, None
