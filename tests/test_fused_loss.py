"""The chunked losses against the naive full-logits reference, forward and backward."""

import pytest
import torch

from budget_reasoner.kernels import fused_linear_cross_entropy, fused_linear_kd_loss, linear_topk_logprobs


def make_inputs(tokens, hidden, vocab, k, dtype, seed=0, ignore_every=3):
    generator = torch.Generator().manual_seed(seed)
    h = torch.randn(tokens, hidden, generator=generator).to(dtype).requires_grad_()
    w = (torch.randn(vocab, hidden, generator=generator) * 0.5).to(dtype).requires_grad_()
    labels = torch.randint(vocab, (tokens,), generator=generator)
    labels[::ignore_every] = -100
    topk_ids = torch.stack([torch.randperm(vocab, generator=generator)[:k] for _ in range(tokens)])
    topk_logprobs = torch.randn(tokens, k, generator=generator).log_softmax(-1)
    return h, w, labels, topk_ids, topk_logprobs


def run(loss_fn, h, w, reduction, backend, **kwargs):
    loss = loss_fn(h, w, reduction=reduction, backend=backend, **kwargs)
    upstream = torch.linspace(0.5, 1.5, loss.numel()).reshape(loss.shape).to(loss.dtype)
    grad_h, grad_w = torch.autograd.grad(loss, (h, w), upstream)
    return loss.detach().float(), grad_h.float(), grad_w.float()


def max_rel_error(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("tokens, hidden, vocab", [(37, 16, 53), (64, 8, 100), (5, 24, 7), (9, 8, 5000)])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("kind", ["ce", "kd"])
def test_chunked_backends_match_reference_fp32(backend, tokens, hidden, vocab, reduction, kind):
    h, w, labels, ids, lps = make_inputs(tokens, hidden, vocab, k=min(5, vocab), dtype=torch.float32)
    if kind == "ce":
        loss_fn = lambda h, w, **kw: fused_linear_cross_entropy(h, w, labels, **kw)
    else:
        loss_fn = lambda h, w, **kw: fused_linear_kd_loss(h, w, ids, lps, labels, temperature=2.0, alpha=0.7, **kw)
    chunked = run(loss_fn, h, w, reduction, backend, chunk_tokens=16)  # 16 does not divide the token counts
    reference = run(loss_fn, h, w, reduction, "reference")
    for got, want in zip(chunked, reference):
        assert max_rel_error(got, want) <= 1e-4


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_bf16_gradients_within_2e_2_of_fp32_reference(backend):
    h, w, labels, ids, lps = make_inputs(48, 32, 301, k=8, dtype=torch.bfloat16)
    loss_fn = lambda h, w, **kw: fused_linear_kd_loss(h, w, ids, lps, labels, alpha=0.5, **kw)
    chunked = run(loss_fn, h, w, "mean", backend, chunk_tokens=20)
    h32, w32 = h.detach().float().requires_grad_(), w.detach().float().requires_grad_()
    reference = run(loss_fn, h32, w32, "mean", "reference")
    for got, want in zip(chunked, reference):
        assert max_rel_error(got, want) <= 2e-2


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_all_ignored_rows_give_zero_loss_and_gradient(backend):
    h, w, labels, _, _ = make_inputs(6, 4, 11, k=2, dtype=torch.float32)
    labels[:] = -100
    loss = fused_linear_cross_entropy(h, w, labels, reduction="sum", backend=backend)
    grad_h, grad_w = torch.autograd.grad(loss, (h, w))
    assert loss.item() == 0 and grad_h.abs().max() == 0 and grad_w.abs().max() == 0


def test_known_value():
    # two classes, logits (0, 0): cross-entropy is log 2 for either label
    h = torch.tensor([[1.0, 0.0]], requires_grad=True)
    w = torch.zeros(2, 2)
    loss = fused_linear_cross_entropy(h, w, torch.tensor([1]), backend="torch")
    assert loss.item() == pytest.approx(0.6931471805599453)


def test_triton_kernel_alone_matches_the_torch_row_math():
    from budget_reasoner.kernels.fused_loss import _token_losses
    from budget_reasoner.kernels.fused_loss_triton import row_losses_and_grads

    _, _, labels, ids, lps = make_inputs(13, 4, 4099, k=6, dtype=torch.float32)  # V spans two 4096-wide blocks
    logits = torch.randn(13, 4099) * 3
    want_losses, want_grad = _token_losses(logits.clone(), labels, ids, lps, 0.3, 1.5, -100, need_grad=True, grad_scale=0.5)
    buffer = logits.clone()
    got_losses = row_losses_and_grads(buffer, labels, ids, lps, 0.3, 1.5, -100, normalizer=2.0)
    torch.testing.assert_close(got_losses, want_losses, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(buffer, want_grad, rtol=1e-5, atol=1e-7)


def test_gradient_accumulation_over_uneven_micro_batches_equals_one_batch():
    h, w, labels, ids, lps = make_inputs(40, 8, 29, k=4, dtype=torch.float32)
    labels[:30:2] = -100  # the first micro-batch has far fewer label tokens than the second
    full = fused_linear_kd_loss(h, w, ids, lps, labels, backend="torch")
    full_grad = torch.autograd.grad(full, (h, w))
    total_tokens = (labels != -100).sum().item()
    accumulated = [torch.zeros_like(h), torch.zeros_like(w)]
    for part in (slice(0, 30), slice(30, 40)):
        micro = fused_linear_kd_loss(h[part], w, ids[part], lps[part], labels[part], backend="torch", normalizer=total_tokens)
        for acc, grad in zip(accumulated, torch.autograd.grad(micro, (h, w))):
            acc += grad
    for got, want in zip(accumulated, full_grad):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_kd_alpha_zero_is_cross_entropy_and_alpha_one_ignores_labels():
    h, w, labels, ids, lps = make_inputs(12, 8, 17, k=3, dtype=torch.float32)
    ce = fused_linear_cross_entropy(h, w, labels, backend="torch")
    assert fused_linear_kd_loss(h, w, ids, lps, labels, alpha=0.0, backend="torch").item() == pytest.approx(ce.item(), rel=1e-6)
    # with alpha=1 the label's identity does not matter, only which rows are masked
    shuffled = torch.where(labels == -100, labels, (labels + 1) % 17)
    a = fused_linear_kd_loss(h, w, ids, lps, labels, alpha=1.0, backend="torch")
    b = fused_linear_kd_loss(h, w, ids, lps, shuffled, alpha=1.0, backend="torch")
    assert a.item() == pytest.approx(b.item(), rel=1e-6)


def test_kd_is_zero_when_student_matches_teacher_on_the_support():
    # student logits equal to teacher log-probs on the top-k: renormalized distributions agree, KL = 0
    w = torch.eye(4)
    lps = torch.tensor([[-0.1, -2.0, -3.0]]).log_softmax(-1)
    h = torch.tensor([[lps[0, 0].item(), lps[0, 1].item(), lps[0, 2].item(), -50.0]])
    loss = fused_linear_kd_loss(h, w, torch.tensor([[0, 1, 2]]), lps, torch.tensor([0]), alpha=1.0, backend="torch")
    assert loss.item() == pytest.approx(0.0, abs=1e-6)


def test_unknown_backend_is_refused():
    h, w, labels, _, _ = make_inputs(4, 4, 5, k=2, dtype=torch.float32)
    with pytest.raises(ValueError, match="backend"):
        fused_linear_cross_entropy(h, w, labels, backend="cuda-magic")


@pytest.mark.parametrize("tokens, chunk_tokens", [(37, 5), (8, 64), (0, 4)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_topk_logprobs_match_the_full_log_softmax(tokens, chunk_tokens, dtype):
    generator = torch.Generator().manual_seed(0)
    h = torch.randn(tokens, 16, generator=generator).to(dtype)
    w = (torch.randn(301, 16, generator=generator) * 0.5).to(dtype)
    values, ids = linear_topk_logprobs(h, w, k=6, chunk_tokens=chunk_tokens)
    expected = (h @ w.t()).float().log_softmax(-1).topk(6, dim=-1)
    assert values.shape == (tokens, 6) and values.dtype == torch.float32
    assert torch.equal(ids, expected.indices)
    torch.testing.assert_close(values, expected.values, atol=1e-5, rtol=1e-5)


def test_cpu_chunks_are_larger_than_gpu_chunks_and_bounded():
    from budget_reasoner.kernels.fused_loss import chunk_tokens_for

    assert chunk_tokens_for(151_936) == 128 and chunk_tokens_for(151_936, "cpu") == 512
    assert chunk_tokens_for(400, "cpu") == 4096 and chunk_tokens_for(10**7, "cpu") == 16


@pytest.mark.parametrize("kind", ["ce", "kd"])
def test_compiled_softmax_gradient_matches_reference(monkeypatch, kind):
    """The torch.compile'd per-chunk softmax-gradient (forced here on a small chunk) computes what the eager one does."""
    import budget_reasoner.kernels.fused_loss as fl

    pytest.importorskip("torch._inductor")
    monkeypatch.setattr(fl, "COMPILE_MIN_ELEMENTS", 0)
    monkeypatch.setitem(fl._compiled, "failed", False)
    monkeypatch.setenv("BUDGET_REASONER_COMPILE", "1")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    h, w, labels, ids, lps = make_inputs(50, 16, 300, k=5, dtype=torch.float32)
    if kind == "ce":
        loss_fn = lambda h, w, **kw: fused_linear_cross_entropy(h, w, labels, chunk_tokens=16, **kw)  # uneven last chunk
    else:
        loss_fn = lambda h, w, **kw: fused_linear_kd_loss(h, w, ids, lps, labels, temperature=2.0, alpha=0.7, chunk_tokens=16, **kw)
    compiled = run(loss_fn, h, w, "mean", "torch")
    if fl._compiled["failed"]:
        pytest.skip("torch.compile is unavailable here (the eager fallback ran)")
    assert fl._compiled["fn"] is not None
    reference = run(loss_fn, h, w, "mean", "reference")
    for got, want in zip(compiled, reference):
        assert max_rel_error(got, want) < 1e-5


def test_compile_failure_falls_back_to_eager_once(monkeypatch):
    import budget_reasoner.kernels.fused_loss as fl

    def broken(*args, **kwargs):
        raise RuntimeError("no compiler")

    monkeypatch.setattr(fl, "COMPILE_MIN_ELEMENTS", 0)
    monkeypatch.setattr(fl, "_compiled", {"fn": None, "failed": False})
    monkeypatch.setattr(torch, "compile", broken)
    monkeypatch.setenv("BUDGET_REASONER_COMPILE", "1")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    h, w, labels, _, _ = make_inputs(20, 8, 50, k=5, dtype=torch.float32)
    with pytest.warns(UserWarning, match="torch.compile unavailable"):
        got = run(lambda h, w, **kw: fused_linear_cross_entropy(h, w, labels, **kw), h, w, "mean", "torch")
    assert fl._compiled["failed"]
    want = run(lambda h, w, **kw: fused_linear_cross_entropy(h, w, labels, **kw), h, w, "mean", "reference")
    for a, b in zip(got, want):
        assert max_rel_error(a, b) < 1e-5
