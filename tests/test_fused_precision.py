"""Fused vs unfused loss under the precisions training uses, on a tiny Gemma-2-style model with final-logit softcapping.

The reference is always the model's own forward (full logits, `loss_function`), called through the same
wrapper: accelerate's `prepare_model` for bf16 (it enables autocast on the CPU), and for fp16, where
accelerate turns native AMP off on a CPU, the same two decorators it applies on a GPU (`torch.autocast`
inside `convert_outputs_to_fp32`) plus a `torch.amp.GradScaler("cpu")` as the Trainer's backward uses it.
N = 32k label tokens, so an fp16 gradient divided by N before the scaler's factor would underflow.
"""

import copy
import types

import pytest
import torch
from transformers import Gemma2Config, Gemma2ForCausalLM

from budget_reasoner.errors import BudgetReasonerError
from budget_reasoner.kernels import fused_linear_cross_entropy, fused_linear_kd_loss
from budget_reasoner.kernels.patch import add_fused_loss, fused_causal_lm_loss, fused_kd_loss, remove_fused_loss

VOCAB, SOFTCAP = 256, 2.0


def tiny_gemma2(dtype=torch.float32, head_std=0.3):
    torch.manual_seed(0)
    config = Gemma2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                          num_key_value_heads=1, head_dim=16, max_position_embeddings=1024, sliding_window=64,
                          final_logit_softcapping=SOFTCAP, attn_logit_softcapping=50.0, attn_implementation="eager")
    model = Gemma2ForCausalLM(config)
    with torch.no_grad():  # logits of a few units: the cap's tanh is well into its curve, not its linear part
        model.get_output_embeddings().weight.normal_(std=head_std)
    return model.to(dtype)


def batch(rows, length, prompt=8, seed=1):
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(VOCAB, (rows, length), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[-1, length // 2 :] = 0
    labels = input_ids.clone()
    labels[:, :prompt] = -100
    labels[attention_mask == 0] = -100
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def with_lora(model):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(2)
    model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj", "o_proj", "down_proj"]))
    for name, p in model.named_parameters():  # B = 0 at init would make every A gradient 0: nothing to compare
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05)
    return model


def wrap_like_accelerate(model, dtype):
    """What `Accelerator.prepare_model` does to `model.forward` under native AMP (accelerate 1.15, accelerator.py)."""
    from accelerate.utils import convert_outputs_to_fp32

    forward = torch.autocast("cpu", dtype=dtype)(model.forward.__func__)
    model.forward = types.MethodType(convert_outputs_to_fp32(forward), model)
    return model


@pytest.fixture
def bf16_accelerator():
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)  # a Trainer built by an earlier test left its own state
    accelerator = Accelerator(mixed_precision="bf16", cpu=True)
    try:
        assert accelerator.native_amp  # bf16 autocast is real on the CPU: the test uses accelerate's own wrapper
        yield accelerator
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)  # other tests build Trainers with other settings


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


def lora_grads(model):
    return {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.requires_grad}


def fused_and_unfused(model, prepare, inputs, scale=1.0, autocast_dtype=None):
    """Loss and LoRA gradients (unscaled) of the model's own loss and of the fused one, through the same wrapper."""
    results = []
    for fused in (False, True):
        twin = copy.deepcopy(model)
        if fused:
            add_fused_loss(twin)  # before the wrapper, as the trainers do (and required without PEFT)
        twin = prepare(twin)
        # the LoRA matmuls run in the autocast dtype only if the loss runs inside the wrapper's autocast (the
        # loss and gradients alone barely tell: a decoder in fp32 is within bf16's rounding of one in bf16)
        seen = []
        lora_a = next(m for name, m in twin.named_modules() if name.endswith("q_proj.lora_A.default"))
        hook = lora_a.register_forward_hook(lambda module, args, output: seen.append(output.dtype))
        loss = fused_causal_lm_loss(twin, inputs) if fused else twin(**inputs).loss
        hook.remove()
        assert set(seen) == {autocast_dtype}, f"fused={fused}: LoRA ran in {set(seen)}"
        scaler = torch.amp.GradScaler("cpu", init_scale=scale, enabled=scale != 1.0)
        scaler.scale(loss).backward()
        results.append((loss.detach(), {k: g / scale for k, g in lora_grads(twin).items()}))
    return results


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_softcapped_gemma2_fused_equals_its_own_loss_fp32(backend):
    from tests.test_kernel_wiring import assert_fused_equals_the_models_own_loss

    model, inputs = tiny_gemma2(), batch(3, 13)
    expected = assert_fused_equals_the_models_own_loss(model, inputs, backend)
    # the cap is doing real work here: the same head without it gives another loss
    hidden = model.model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).last_hidden_state
    labels = inputs["labels"][:, 1:]
    uncapped = fused_linear_cross_entropy(hidden[:, :-1][labels != -100], model.lm_head.weight, labels[labels != -100])
    assert abs(uncapped.item() - expected.item()) > 0.05


def test_bf16_autocast_fused_matches_unfused_at_32k_tokens(bf16_accelerator):
    model, inputs = with_lora(tiny_gemma2()), batch(256, 129)  # 256 x 128 = 32,768 positions, ~30.5k label tokens
    (loss_ref, grads_ref), (loss, grads) = fused_and_unfused(model, bf16_accelerator.prepare_model, inputs,
                                                              autocast_dtype=torch.bfloat16)
    assert abs(loss.item() - loss_ref.item()) <= 1e-3 * loss_ref.item()
    for name in grads_ref:  # bf16's own noise: the unfused bf16 gradients are 1.4e-2 from fp32 ones here
        assert rel(grads[name], grads_ref[name]) <= 2e-2, name


def test_fp16_autocast_with_grad_scaler_fused_matches_unfused_at_32k_tokens():
    # an fp16 base (hidden states fp16, as Unsloth loads a T4 model) with fp32 LoRA weights, autocast fp16, scale 2^16
    model, inputs = with_lora(tiny_gemma2(torch.float16)), batch(256, 129)
    prepare = lambda m: wrap_like_accelerate(m, torch.float16)  # noqa: E731
    (loss_ref, grads_ref), (loss, grads) = fused_and_unfused(model, prepare, inputs, scale=2.0**16,
                                                              autocast_dtype=torch.float16)
    assert abs(loss.item() - loss_ref.item()) <= 1e-3 * loss_ref.item()
    for name in grads_ref:
        assert torch.isfinite(grads[name]).all() and rel(grads[name], grads_ref[name]) <= 2e-2, name


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_fp16_hidden_gradient_survives_division_by_32k_tokens(backend):
    # |dL/dh| ~ |W| / N ~ 0.02 / 32k = 6e-7: an fp16 subnormal. Reference: the same loss in fp32 math, times the scale.
    # The interpreter runs one Triton program per row: its case is a 512-token micro-batch of a 32k-token
    # accumulated batch (the normalizer gradient accumulation passes), which divides the same way.
    n, tokens, hidden, vocab, scale = 32768, 512 if backend == "triton" else 32768, 16, 256, 2.0**16
    generator = torch.Generator().manual_seed(0)
    h = torch.randn(tokens, hidden, generator=generator).half().requires_grad_()
    w = (torch.randn(vocab, hidden, generator=generator) * 0.02).half().requires_grad_()
    labels = torch.randint(vocab, (tokens,), generator=generator)
    loss = fused_linear_cross_entropy(h, w, labels, backend=backend, softcap=SOFTCAP, chunk_tokens=4096, normalizer=n)
    grad_h, grad_w = torch.autograd.grad(loss * scale, (h, w))
    h32, w32 = h.detach().float().requires_grad_(), w.detach().float().requires_grad_()
    want = fused_linear_cross_entropy(h32, w32, labels, backend="reference", softcap=SOFTCAP, normalizer=n)
    want_h, want_w = torch.autograd.grad(want * scale, (h32, w32))
    assert grad_h.dtype == torch.float16 and abs(loss.item() - want.item()) <= 1e-3 * want.item()
    assert rel(grad_h, want_h) <= 2e-3  # fp16 rounding of the scaled gradient (2^-11), not subnormal steps
    assert rel(grad_w, want_w) <= 2e-3


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("kind", ["ce", "kd"])
def test_softcap_matches_the_reference_forward_and_backward(backend, kind):
    generator = torch.Generator().manual_seed(0)
    h = torch.randn(37, 8, generator=generator).requires_grad_()
    w = torch.randn(301, 8, generator=generator).requires_grad_()  # logits ~ 3 units: against a cap of 2
    labels = torch.randint(301, (37,), generator=generator)
    labels[::4] = -100
    ids = torch.stack([torch.randperm(301, generator=generator)[:5] for _ in range(37)])
    lps = torch.randn(37, 5, generator=generator).log_softmax(-1)
    if kind == "ce":
        loss_fn = lambda **kw: fused_linear_cross_entropy(h, w, labels, softcap=SOFTCAP, **kw)  # noqa: E731
    else:
        loss_fn = lambda **kw: fused_linear_kd_loss(h, w, ids, lps, labels, temperature=2.0, alpha=0.6, softcap=SOFTCAP, **kw)  # noqa: E731
    got = loss_fn(backend=backend, chunk_tokens=16)
    got_grads = torch.autograd.grad(got, (h, w))
    # independent reference: autograd through torch.tanh on the full logits
    logits = SOFTCAP * torch.tanh(h @ w.t() / SOFTCAP)
    valid = labels != -100
    ce = torch.nn.functional.cross_entropy(logits[valid], labels[valid], reduction="sum")
    if kind == "ce":
        want = ce / valid.sum()
    else:
        p = (lps / 2.0).log_softmax(-1)
        q = (logits.gather(1, ids) / 2.0).log_softmax(-1)
        kl = (p.exp() * (p - q)).sum(-1)[valid].sum()
        want = (0.6 * 4.0 * kl + 0.4 * ce) / valid.sum()
    want_grads = torch.autograd.grad(want, (h, w))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    for a, b in zip(got_grads, want_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_kd_through_the_model_forward_equals_the_full_logits_loss():
    model = tiny_gemma2()
    inputs = batch(2, 9)
    labels = torch.cat([inputs["labels"][:, 1:], torch.full((2, 1), -100)], dim=1)  # position t predicts labels[t]
    generator = torch.Generator().manual_seed(3)
    inputs["topk_ids"] = torch.randint(VOCAB, (2, 9, 4), generator=generator)
    inputs["topk_logprobs"] = torch.randn(2, 9, 4, generator=generator).log_softmax(-1)
    got = fused_kd_loss(model, inputs, labels, alpha=0.5, temperature=1.5)
    remove_fused_loss(model)
    logits = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits.float()
    keep = labels != -100
    p = (inputs["topk_logprobs"][keep] / 1.5).log_softmax(-1)
    q = (logits[keep].gather(1, inputs["topk_ids"][keep]) / 1.5).log_softmax(-1)
    kl = (p.exp() * (p - q)).sum(-1)
    ce = torch.nn.functional.cross_entropy(logits[keep], labels[keep], reduction="none")
    want = (0.5 * 1.5**2 * kl + 0.5 * ce).mean()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert model.forward.__func__ is Gemma2ForCausalLM.forward  # the way back


def test_a_cached_id_beyond_the_students_vocabulary_is_refused_naming_both_sizes():
    h, w = torch.randn(3, 4), torch.randn(151936 // 1024, 4)  # a 148-row head stands in for the 1.5B's 151,936
    ids = torch.tensor([[0, 1], [2, 148], [5, 151]])  # a bigger teacher's ids reach row 151
    with pytest.raises(BudgetReasonerError, match=r"at least 152 LM-head rows, the student has 148"):
        fused_linear_kd_loss(h, w, ids, torch.zeros(3, 2), torch.tensor([1, 2, 3]), backend="torch")


def test_the_fused_forward_is_refused_after_accelerate_wrapped_a_bare_model(bf16_accelerator):
    model = bf16_accelerator.prepare_model(tiny_gemma2())
    with pytest.raises(BudgetReasonerError, match="before accelerate prepares"):
        fused_causal_lm_loss(model, batch(1, 5))
