"""The fused attention kernel under TRITON_INTERPRET=1 against the PyTorch reference, forward and backward."""

import pytest
import torch

from budget_reasoner.kernels.attention import attention_reference, flash_attention, register_attention


def inputs(batch, heads, kv_heads, length, dim, dtype=torch.float32, seed=0):
    generator = torch.Generator().manual_seed(seed)
    make = lambda h: torch.randn(batch, h, length, dim, generator=generator).to(dtype).requires_grad_()  # noqa: E731
    return make(heads), make(kv_heads), make(kv_heads)


def forward_backward(backend, q, k, v, causal):
    out = flash_attention(q, k, v, causal=causal, backend=backend)
    upstream = torch.linspace(-1, 1, out.numel()).reshape(out.shape).to(out.dtype)
    return (out, *torch.autograd.grad(out, (q, k, v), upstream))


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("heads, kv_heads, length, dim", [
    (2, 2, 19, 32),   # odd T, not a multiple of the 16-wide blocks
    (4, 2, 33, 32),   # grouped-query attention
    (4, 1, 16, 64),   # multi-query, T exactly one block
    (2, 1, 7, 24),    # head dim not a power of two, T shorter than a block
])
def test_triton_matches_reference_fp32(causal, heads, kv_heads, length, dim):
    q, k, v = inputs(2, heads, kv_heads, length, dim)
    got = forward_backward("triton", q, k, v, causal)
    want = forward_backward("reference", q, k, v, causal)
    assert (got[0] - want[0]).abs().max() <= 2e-3
    for g, w in zip(got[1:], want[1:]):
        assert (g - w).abs().max() <= 1e-2


def test_triton_bf16_close_to_fp32_reference():
    q, k, v = inputs(1, 4, 2, 21, 32, dtype=torch.bfloat16)
    got = forward_backward("triton", q, k, v, True)
    q32, k32, v32 = (t.detach().float().requires_grad_() for t in (q, k, v))
    want = forward_backward("reference", q32, k32, v32, True)
    assert (got[0].float() - want[0]).abs().max() <= 3e-2
    for g, w in zip(got[1:], want[1:]):
        assert (g.float() - w).abs().max() <= 6e-2


def test_sdpa_backend_and_reference_agree():
    q, k, v = inputs(1, 4, 2, 10, 16)
    torch.testing.assert_close(flash_attention(q, k, v, backend="sdpa"), attention_reference(q, k, v), rtol=1e-5, atol=1e-5)


def test_bad_head_counts_are_refused():
    q, k, v = inputs(1, 3, 2, 4, 16)
    with pytest.raises(ValueError, match="multiple of key/value heads"):
        flash_attention(q, k, v)


def test_a_tiny_qwen2_with_budget_flash_equals_eager():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    name = register_attention()
    config = Qwen2Config(vocab_size=61, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    eager = Qwen2ForCausalLM._from_config(config, attn_implementation="eager")
    fused = Qwen2ForCausalLM._from_config(config, attn_implementation=name)
    fused.load_state_dict(eager.state_dict())
    input_ids = torch.randint(61, (2, 23))
    want = eager(input_ids=input_ids, labels=input_ids)
    got = fused(input_ids=input_ids, labels=input_ids)
    assert (got.logits - want.logits).abs().max() <= 2e-3
    want.loss.backward()
    got.loss.backward()
    for (param_name, p), (_, q) in zip(eager.named_parameters(), fused.named_parameters()):
        assert (p.grad - q.grad).abs().max() <= 1e-3, param_name


def test_a_preset_selects_the_kernel_by_name(tiny_run):
    import copy

    from budget_reasoner.hardware import detect
    from budget_reasoner.kernels.attention import REGISTERED_NAME
    from budget_reasoner.models import load_model

    out, preset, _ = tiny_run
    fused_preset = copy.deepcopy(preset)
    fused_preset.model.attention = "budget_flash"
    fused = load_model(out / "models" / "teacher", fused_preset, detect("cpu"))
    stock = load_model(out / "models" / "teacher", preset, detect("cpu"))
    assert fused.config._attn_implementation == REGISTERED_NAME
    input_ids = torch.randint(len(fused.get_input_embeddings().weight), (2, 17))
    with torch.no_grad():
        assert (fused(input_ids=input_ids).logits - stock(input_ids=input_ids).logits).abs().max() <= 2e-3
