"""Triton kernels of `attention.flash_attention` (forward, dK/dV, dQ) and their autograd Function.

Layout: q, o, do: (B, H, T, D); k, v: (B, KVH, T, D), all contiguous; lse, delta: (B, H, T) fp32.
Import after setting TRITON_INTERPRET=1 to run them on CPU tensors.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from budget_reasoner.kernels.attention import block_sizes


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
def _probabilities(q, k, rows, cols, lse, scale, T, CAUSAL: tl.constexpr):
    """The softmax probabilities of a (rows x cols) block, recomputed from the saved log-sum-exp."""
    s = tl.dot(q, tl.trans(k)).to(tl.float32) * scale
    valid = (rows[:, None] < T) & (cols[None, :] < T)
    if CAUSAL:
        valid = valid & (rows[:, None] >= cols[None, :])
    return tl.where(valid, tl.exp(s - lse[:, None]), 0.0)


@triton.jit
def _forward_kernel(Q, K, V, O, LSE, scale, T, H, GROUPS,
                    CAUSAL: tl.constexpr, UPCAST: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    start_m = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1).to(tl.int64)
    kv_bh = _kv_row(bh, H, GROUPS)
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
        valid = cols[None, :] < T
        if CAUSAL:
            valid = valid & (offs_m[:, None] >= cols[None, :])
        s = tl.where(valid, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows past T see no valid key
        p = tl.exp(s - m_safe[:, None])
        alpha = tl.exp(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v).to(tl.float32)
        m_i = m_new
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    out = acc / l_safe[:, None]
    row_mask = offs_m < T
    tl.store(O + bh * T * D + offs_m[:, None] * D + offs_d[None, :], out.to(O.dtype.element_ty), mask=row_mask[:, None] & d_mask[None, :])
    tl.store(LSE + bh * T + offs_m, m_i + tl.log(l_safe), mask=row_mask)


@triton.jit
def _backward_dkdv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV, scale, T, H, GROUPS,
                          CAUSAL: tl.constexpr, UPCAST: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """One key block of one query head: dV = sum P^T dO, dK = scale * sum dS^T Q over the query blocks."""
    start_n = tl.program_id(0) * BLOCK_N
    bh = tl.program_id(1).to(tl.int64)
    kv_bh = _kv_row(bh, H, GROUPS)
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < D
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
        p = _probabilities(q, k, rows, offs_n, lse, scale, T, CAUSAL)
        dv += tl.dot(tl.trans(p.to(do.dtype)), do).to(tl.float32)
        dp = tl.dot(do, tl.trans(v)).to(tl.float32)
        ds = p * (dp - delta[:, None])
        dk += tl.dot(tl.trans(ds.to(q.dtype)), q).to(tl.float32)
    out_mask = (offs_n[:, None] < T) & d_mask[None, :]
    tl.store(DK + bh * T * D + offs_n[:, None] * D + offs_d[None, :], (dk * scale).to(DK.dtype.element_ty), mask=out_mask)
    tl.store(DV + bh * T * D + offs_n[:, None] * D + offs_d[None, :], dv.to(DV.dtype.element_ty), mask=out_mask)


@triton.jit
def _backward_dq_kernel(Q, K, V, DO, LSE, DELTA, DQ, scale, T, H, GROUPS,
                        CAUSAL: tl.constexpr, UPCAST: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """One query block: dQ = scale * sum dS K over the key blocks."""
    start_m = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1).to(tl.int64)
    kv_bh = _kv_row(bh, H, GROUPS)
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
        p = _probabilities(q, k, offs_m, cols, lse, scale, T, CAUSAL)
        dp = tl.dot(do, tl.trans(v)).to(tl.float32)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k).to(tl.float32)
    tl.store(DQ + bh * T * D + offs_m[:, None] * D + offs_d[None, :], (dq * scale).to(DQ.dtype.element_ty), mask=q_mask)


def _upcast(q: torch.Tensor) -> bool:
    """The interpreter computes bf16/fp16 dots wrongly (numpy has no bf16), so there the tiles go to fp32 first.
    On a GPU the dots stay in the input dtype, on the tensor cores; the accumulators are fp32 either way."""
    return not q.is_cuda and q.dtype != torch.float32


class FlashAttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, causal: bool, scale: float):
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        batch, heads, length, dim = q.shape
        groups = heads // k.shape[1]
        block_m, block_n = block_sizes(dim, q.device)
        out = torch.empty_like(q)
        lse = torch.empty((batch, heads, length), dtype=torch.float32, device=q.device)
        grid = (triton.cdiv(length, block_m), batch * heads)
        _forward_kernel[grid](q, k, v, out, lse, scale, length, heads, groups, CAUSAL=causal, UPCAST=_upcast(q), D=dim,
                              BLOCK_D=max(16, triton.next_power_of_2(dim)), BLOCK_M=block_m, BLOCK_N=block_n)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.causal, ctx.scale = causal, scale
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        batch, heads, length, dim = q.shape
        kv_heads = k.shape[1]
        groups = heads // kv_heads
        block_m, block_n = block_sizes(dim, q.device)
        delta = (grad_out.float() * out.float()).sum(-1)  # rowsum(dO * O), the softmax backward's correction
        dq = torch.empty_like(q)
        dk_per_head = torch.empty((batch, heads, length, dim), dtype=k.dtype, device=k.device)
        dv_per_head = torch.empty((batch, heads, length, dim), dtype=v.dtype, device=v.device)
        common = dict(CAUSAL=ctx.causal, UPCAST=_upcast(q), D=dim, BLOCK_D=max(16, triton.next_power_of_2(dim)), BLOCK_M=block_m, BLOCK_N=block_n)
        _backward_dkdv_kernel[(triton.cdiv(length, block_n), batch * heads)](
            q, k, v, grad_out, lse, delta, dk_per_head, dv_per_head, ctx.scale, length, heads, groups, **common)
        _backward_dq_kernel[(triton.cdiv(length, block_m), batch * heads)](
            q, k, v, grad_out, lse, delta, dq, ctx.scale, length, heads, groups, **common)
        # each key/value head served `groups` query heads: its gradient is their sum
        dk = dk_per_head.view(batch, kv_heads, groups, length, dim).sum(2, dtype=torch.float32).to(k.dtype)
        dv = dv_per_head.view(batch, kv_heads, groups, length, dim).sum(2, dtype=torch.float32).to(v.dtype)
        return dq, dk, dv, None, None
