"""The chunked losses against the naive full-logits reference, forward and backward."""

import types

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


# --- KD with the tail bucket (issue #14 item 5): the top-k plus the mass outside it, k+1 buckets ---


def tail_inputs(tokens, hidden, vocab, k, seed=0):
    h, w, labels, ids, lps = make_inputs(tokens, hidden, vocab, k, dtype=torch.float32, seed=seed)
    # cached log-probs of a full-vocabulary teacher leave mass outside the top-k: 1 - exp(-0.4) ~ 0.33 here
    return h, w, labels, ids, lps - 0.4


@pytest.mark.parametrize("tokens, hidden, vocab", [(37, 16, 53), (64, 8, 100), (9, 8, 500)])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("softcap", [None, 3.0])
def test_tail_kd_chunked_matches_autograd_reference_fp32(tokens, hidden, vocab, reduction, softcap):
    h, w, labels, ids, lps = tail_inputs(tokens, hidden, vocab, k=5)
    loss_fn = lambda h, w, **kw: fused_linear_kd_loss(h, w, ids, lps, labels, alpha=0.7, tail=True, softcap=softcap, **kw)
    chunked = run(loss_fn, h, w, reduction, "torch", chunk_tokens=16)  # 16 does not divide the token counts
    reference = run(loss_fn, h, w, reduction, "reference")  # the student's tail summed over a mask, under autograd
    for got, want in zip(chunked, reference):
        assert max_rel_error(got, want) <= 1e-4


def test_tail_kd_hand_computed_vocab_5_k_2():
    import math

    z = [1.0, 0.0, 0.5, -1.0, 2.0]  # logits = h @ I
    h = torch.tensor([z], requires_grad=True)
    ids, p = torch.tensor([[4, 0]]), [0.5, 0.3]
    lps = torch.tensor([p]).log()  # teacher tail 0.2, not renormalized away
    q = [math.exp(v) / sum(math.exp(u) for u in z) for v in z]
    q_tail = q[1] + q[2] + q[3]
    kl = 0.5 * math.log(0.5 / q[4]) + 0.3 * math.log(0.3 / q[0]) + 0.2 * math.log(0.2 / q_tail)
    ce = -math.log(q[2])
    for backend in ("torch", "reference"):
        loss = fused_linear_kd_loss(h, torch.eye(5), ids, lps, torch.tensor([2]), alpha=0.25, tail=True, backend=backend)
        assert loss.item() == pytest.approx(0.25 * kl + 0.75 * ce, rel=1e-6)
        # gradient: alpha * (P q_j - p_j) on the top-k, alpha * q_j (P - p_tail / q_tail) outside, P = 1 here
        (grad,) = torch.autograd.grad(loss, h)
        want = [0.75 * (qj - (j == 2)) + 0.25 * qj * (1 - 0.2 / q_tail) for j, qj in enumerate(q)]
        want[4], want[0] = 0.75 * q[4] + 0.25 * (q[4] - 0.5), 0.75 * q[0] + 0.25 * (q[0] - 0.3)
        torch.testing.assert_close(grad[0], torch.tensor(want), rtol=1e-5, atol=1e-7)


def test_tail_kd_differs_from_top_k_kd_and_is_zero_when_the_student_matches_the_teacher_everywhere():
    h, w, labels, ids, lps = tail_inputs(20, 8, 31, k=4)
    plain = fused_linear_kd_loss(h, w, ids, lps, labels, alpha=1.0, backend="torch")
    tail = fused_linear_kd_loss(h, w, ids, lps, labels, alpha=1.0, tail=True, backend="torch")
    assert abs(plain.item() - tail.item()) > 1e-3
    # the student's log-softmax as the teacher's cache: every bucket agrees, KL = 0 (top-k KD is 0 here too)
    logits = torch.tensor([[2.0, 0.5, -1.0, 0.0, 1.0]])
    log_q = logits.log_softmax(-1)
    top = log_q.topk(2, dim=-1)
    loss = fused_linear_kd_loss(logits, torch.eye(5), top.indices, top.values, torch.tensor([0]), alpha=1.0, tail=True,
                                backend="torch")
    assert loss.item() == pytest.approx(0.0, abs=1e-6)


def test_tail_is_refused_by_triton_and_at_other_temperatures():
    h, w, labels, ids, lps = tail_inputs(6, 4, 11, k=2)
    with pytest.raises(ValueError, match="Triton"):
        fused_linear_kd_loss(h, w, ids, lps, labels, tail=True, backend="triton")
    with pytest.raises(ValueError, match="temperature 1.0"):
        fused_linear_kd_loss(h, w, ids, lps, labels, tail=True, temperature=2.0, backend="torch")
    # auto never picks the kernel that lacks the tail
    from budget_reasoner.kernels.fused_loss import _resolve_backend

    fake_cuda = types.SimpleNamespace(is_cuda=True)
    assert _resolve_backend("auto", fake_cuda, tail=True) == "torch"


def test_kd_tail_config_defaults_off_and_needs_temperature_one():
    from budget_reasoner.config import load_preset
    from budget_reasoner.errors import BudgetReasonerError

    assert load_preset("cpu-tiny").distill.kd_tail is False
    assert load_preset("cpu-tiny", {"distill.kd_tail": True}).distill.kd_tail is True
    with pytest.raises(BudgetReasonerError, match="distill.kd_tail must be false unless distill.temperature is 1.0"):
        load_preset("cpu-tiny", {"distill.kd_tail": True, "distill.temperature": 2.0})


def test_kd_trainer_passes_kd_tail_to_the_loss(monkeypatch):
    import budget_reasoner.train.distill as distill

    seen = {}

    def fake_loss(model, inputs, labels, alpha, temperature, num_items_in_batch, tail=False):
        seen.update(alpha=alpha, temperature=temperature, tail=tail)
        return torch.tensor(1.0)

    monkeypatch.setattr(distill, "fused_kd_loss", fake_loss)
    monkeypatch.setattr(distill, "undo_data_parallel_mean", lambda trainer, loss, n: loss)
    trainer = object.__new__(distill.kd_trainer_class())  # compute_loss alone: no model, no arguments
    trainer.kd_alpha, trainer.kd_temperature, trainer.kd_tail = 0.5, 1.0, True
    trainer.compute_loss(None, {"kd_labels": torch.tensor([[1]])})
    assert seen == {"alpha": 0.5, "temperature": 1.0, "tail": True}


def test_kd_tail_through_the_model_forward_equals_the_full_logits_loss():
    from budget_reasoner.kernels.patch import fused_kd_loss, remove_fused_loss
    from tests.test_fused_precision import VOCAB, batch, tiny_gemma2

    model = tiny_gemma2()
    inputs = batch(2, 9)
    labels = torch.cat([inputs["labels"][:, 1:], torch.full((2, 1), -100)], dim=1)
    generator = torch.Generator().manual_seed(3)
    inputs["topk_ids"] = torch.stack([torch.randperm(VOCAB, generator=generator)[:4] for _ in range(18)]).view(2, 9, 4)
    inputs["topk_logprobs"] = torch.randn(2, 9, 4, generator=generator).log_softmax(-1) - 0.4
    got = fused_kd_loss(model, inputs, labels, alpha=0.5, temperature=1.0, tail=True)
    plain = fused_kd_loss(model, inputs, labels, alpha=0.5, temperature=1.0)
    remove_fused_loss(model)
    logits = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits.float()  # capped
    keep = labels != -100
    log_q = logits[keep].log_softmax(-1)
    ids, lps = inputs["topk_ids"][keep], inputs["topk_logprobs"][keep]
    outside = torch.ones_like(log_q, dtype=torch.bool).scatter_(1, ids, False)
    q_tail = log_q.exp().masked_fill(~outside, 0).sum(-1)
    p_tail = 1 - lps.exp().sum(-1)
    kl = (lps.exp() * (lps - log_q.gather(1, ids))).sum(-1) + p_tail * (p_tail / q_tail).log()
    ce = torch.nn.functional.cross_entropy(logits[keep], labels[keep], reduction="none")
    torch.testing.assert_close(got, (0.5 * kl + 0.5 * ce).mean(), rtol=1e-5, atol=1e-6)
    assert abs(got.item() - plain.item()) > 1e-4  # the option reaches the loss
