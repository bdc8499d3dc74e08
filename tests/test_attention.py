"""The fused attention kernel under TRITON_INTERPRET=1 against the PyTorch reference, forward and backward,
at the block configurations a GPU would pick (the interpreter runs the real tile shapes; warps and stages
only matter to the compiler), and wired into a Qwen2 model with padded batches."""

import copy
import json
import logging

import pytest
import torch

from budget_reasoner.kernels import attention as attn
from budget_reasoner.kernels.attention import (
    BlockConfig, CONFIGS, FALLBACKS, SHARED_MEMORY, attention_reference, flash_attention, kernel_configs, register_attention,
    shared_memory_budget, shared_memory_bytes,
)
from tests.conftest import PROJECT_DATA

# (forward atol, rtol), (backward atol, rtol) against the fp32 reference on the same (rounded) inputs.
# fp32: the interpreter's error is ~1e-6 (see the README); bf16/fp16: the output's and dK/dV's rounding
# (8 and 11 mantissa bits) on values of a few units, about twice the largest error measured.
TOLERANCES = {
    torch.float32: ((1e-5, 1e-5), (1e-5, 1e-5)),
    torch.float16: ((2e-3, 2e-3), (6e-3, 2e-3)),
    torch.bfloat16: ((3e-2, 1.6e-2), (8e-2, 1.6e-2)),
}
CAPABILITIES = {"sm75": (7, 5), "sm86": (8, 6), "sm80": (8, 0), "sm90": (9, 0)}


def inputs(batch, heads, kv_heads, length, dim, dtype=torch.float32, seed=0):
    generator = torch.Generator().manual_seed(seed)
    make = lambda h: torch.randn(batch, h, length, dim, generator=generator).to(dtype).requires_grad_()  # noqa: E731
    return make(heads), make(kv_heads), make(kv_heads)


def forward_backward(backend, q, k, v, causal=True, keys=None, configs=None):
    out = flash_attention(q, k, v, causal=causal, backend=backend, key_padding_mask=keys, configs=configs)
    upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(7)).to(out.dtype)
    return (out, *torch.autograd.grad(out, (q, k, v), upstream))


def compare(q, k, v, causal=True, keys=None, configs=None):
    """Max abs errors (out, dq, dk, dv) of the kernel vs the fp32 reference; asserts the dtype's tolerances."""
    got = forward_backward("triton", q, k, v, causal, keys, configs)
    q32, k32, v32 = (t.detach().float().requires_grad_() for t in (q, k, v))
    want = forward_backward("reference", q32, k32, v32, causal, keys)
    (fwd_atol, fwd_rtol), (bwd_atol, bwd_rtol) = TOLERANCES[q.dtype]
    for i, (g, w) in enumerate(zip(got, want)):
        assert torch.isfinite(g).all()
        atol, rtol = (fwd_atol, fwd_rtol) if i == 0 else (bwd_atol, bwd_rtol)
        torch.testing.assert_close(g.float(), w, atol=atol, rtol=rtol, msg=lambda m: f"{'out dq dk dv'.split()[i]}: {m}")
    return [(g.float() - w).abs().max().item() for g, w in zip(got, want)]


def padded_keys(batch, length):
    """Row 0 right-padded, row 1 left-padded (its first queries see no key at all)."""
    keys = torch.ones(batch, length, dtype=torch.bool)
    keys[0, length - 11:] = False
    if batch > 1:
        keys[1, :5] = False
    return keys


def length_for(configs):
    """Odd, and at least two blocks of the larger tile in both passes."""
    forward, backward = configs
    return max(forward.block_m, forward.block_n, backward.block_m, backward.block_n) + 17


@pytest.mark.parametrize("arch", CAPABILITIES)
@pytest.mark.parametrize("dim", [64, 128, 256])
def test_every_gpu_configuration_matches_the_reference_fp32(dim, arch):
    configs = kernel_configs(dim, CAPABILITIES[arch], torch.bfloat16)  # what a bf16/fp16 run there picks
    length = length_for(configs)
    q, k, v = inputs(2, 2, 1, length, dim)  # GQA 2:1 here; every ratio of the presets' models below
    errors = compare(q, k, v, keys=padded_keys(2, length), configs=configs)
    assert max(errors) <= 1e-5, errors


@pytest.mark.parametrize("dtype, arch", [(torch.bfloat16, "sm86"), (torch.float16, "sm75")])
@pytest.mark.parametrize("dim", [64, 128, 256])
def test_half_precision_within_its_tolerance(dim, dtype, arch):
    configs = kernel_configs(dim, CAPABILITIES[arch], dtype)
    length = length_for(configs)
    q, k, v = inputs(2, 2, 1, length, dim, dtype=dtype)
    compare(q, k, v, keys=padded_keys(2, length), configs=configs)


def model_shapes():
    """(heads, kv heads, head dim) of every model the presets name."""
    shapes = set()
    for path in sorted((PROJECT_DATA / "model_configs").glob("*.json")):
        config = json.loads(path.read_text())
        if "num_attention_heads" in config:
            heads = config["num_attention_heads"]
            shapes.add((heads, config["num_key_value_heads"], config.get("head_dim") or config["hidden_size"] // heads))
    return sorted(shapes)


@pytest.mark.parametrize("heads, kv_heads, dim", model_shapes())
def test_every_gqa_ratio_of_the_presets_models(heads, kv_heads, dim):
    # one kv head with its group of heads / kv_heads query heads: the ratio is what the kernel sees
    q, k, v = inputs(1, heads // kv_heads, 1, 71, dim)
    assert max(compare(q, k, v, configs=kernel_configs(dim, (8, 6), torch.bfloat16))) <= 1e-5


@pytest.mark.parametrize("heads, kv_heads, length, dim", [
    (2, 2, 19, 32),   # odd T, shorter than a block
    (4, 1, 64, 64),   # multi-query, T exactly one forward block
    (2, 1, 7, 24),    # head dim not a power of two
])
def test_non_causal_and_odd_shapes(heads, kv_heads, length, dim):
    q, k, v = inputs(2, heads, kv_heads, length, dim)
    for causal in (True, False):
        assert max(compare(q, k, v, causal=causal, keys=padded_keys(2, length) if causal else None)) <= 1e-5


def test_queries_that_see_no_key_give_zeros_and_zero_gradients():
    q, k, v = inputs(1, 2, 1, 21, 32)
    keys = torch.ones(1, 21, dtype=torch.bool)
    keys[0, :6] = False  # left padding: queries 0..5 see only padding keys
    out, dq, dk, dv = forward_backward("triton", q, k, v, keys=keys)
    assert torch.isfinite(out).all() and torch.isfinite(dq).all()
    assert (out[:, :, :6] == 0).all() and (dq[:, :, :6] == 0).all()
    assert (dk[:, :, :6] == 0).all() and (dv[:, :, :6] == 0).all()  # padding keys get no gradient


def test_the_table_fits_each_gpus_shared_memory():
    for (dim, budget), (forward, backward) in CONFIGS.items():
        assert shared_memory_bytes(forward, dim, 2, backward=False) <= budget
        assert shared_memory_bytes(backward, dim, 2, backward=True) <= budget
        assert forward.block_m >= forward.block_n  # causal forward: a query block's last key block ends at the diagonal
    for capability in SHARED_MEMORY:
        for dim in (16, 64, 96, 128, 256):
            for dtype in (torch.float32, torch.bfloat16):
                forward, backward = kernel_configs(dim, capability, dtype)
                size = torch.empty((), dtype=dtype).element_size()
                budget = shared_memory_budget(capability)
                assert shared_memory_bytes(forward, dim, size, backward=False) <= budget
                # fp32 at head dim 256 on a T4 estimates over 64 KB even at 16x16, the smallest tile tl.dot takes
                assert shared_memory_bytes(backward, dim, size, backward=True) <= budget or backward == FALLBACKS[-1]


def test_a_configuration_that_fails_to_compile_falls_back_to_a_smaller_one(monkeypatch, caplog):
    from triton.runtime.errors import OutOfResources

    from budget_reasoner.kernels import attention_triton

    real = attention_triton._forward_kernel

    class TooBig:  # a compiler that refuses 128-row blocks, like a card short of shared memory
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                if kwargs["BLOCK_M"] == 128:
                    raise OutOfResources(131072, 101376, "shared memory")
                return real[grid](*args, **kwargs)
            return launch

    monkeypatch.setattr(attention_triton, "_forward_kernel", TooBig())
    monkeypatch.setattr(attention_triton, "_compiled", {})
    monkeypatch.setattr(attn, "_warned", set())
    q, k, v = inputs(1, 2, 1, 70, 64)
    with caplog.at_level(logging.WARNING, logger="budget_reasoner.kernels.attention"):
        assert max(compare(q, k, v, configs=(BlockConfig(128, 64, 4, 2), BlockConfig(64, 64, 4, 2)))) <= 1e-5
    assert [r.getMessage() for r in caplog.records] == [
        "budget_flash: forward at 128x64 blocks, 4 warps, 2 stage(s) does not compile on sm86 (head dim 64, "
        "float32: OutOfResources); using 64x64 blocks, 4 warps, 1 stage(s)"]


def test_key_padding_is_read_back_from_transformers_masks():
    from transformers.masking_utils import and_masks, causal_mask_function, eager_mask, packed_sequence_mask_function, sdpa_mask

    padding = torch.tensor([[1, 1, 1, 0, 0], [0, 1, 1, 1, 1]], dtype=torch.bool)
    for make in (sdpa_mask, eager_mask):
        mask = make(batch_size=2, q_length=5, kv_length=5, attention_mask=padding, allow_is_causal_skip=False)
        keys, reason = attn.key_padding_from_mask(mask, 2, 5)
        assert reason is None and torch.equal(keys, padding)
    causal_only = sdpa_mask(batch_size=2, q_length=5, kv_length=5, allow_is_causal_skip=False)
    assert attn.key_padding_from_mask(causal_only, 2, 5) == (None, None)
    packed = sdpa_mask(batch_size=1, q_length=5, kv_length=5, allow_is_causal_skip=False, mask_function=and_masks(
        causal_mask_function, packed_sequence_mask_function(torch.tensor([[0, 0, 1, 1, 1]]))))
    assert attn.key_padding_from_mask(packed, 1, 5)[1].startswith("a mask that is not causal + key padding")


def tiny_qwen2(name):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    # head dim 16: the D<=64 row of the table (128x64 forward blocks, 64x64 backward on the interpreter's sm86)
    config = Qwen2Config(vocab_size=61, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    torch.manual_seed(0)
    # each its own config: _from_config writes the implementation into the config it is given, so a shared
    # one would make the "eager" model run the kernel too
    eager = Qwen2ForCausalLM._from_config(copy.deepcopy(config), attn_implementation="eager")
    fused = Qwen2ForCausalLM._from_config(copy.deepcopy(config), attn_implementation=name)
    fused.load_state_dict(eager.state_dict())
    assert (eager.config._attn_implementation, fused.config._attn_implementation) == ("eager", name)
    return eager, fused


def test_a_tiny_qwen2_with_budget_flash_equals_eager():
    eager, fused = tiny_qwen2(register_attention())
    input_ids = torch.randint(61, (2, 23))
    want = eager(input_ids=input_ids, labels=input_ids)
    got = fused(input_ids=input_ids, labels=input_ids)
    torch.testing.assert_close(got.logits, want.logits, atol=1e-5, rtol=1e-5)
    want.loss.backward()
    got.loss.backward()
    for (param_name, p), (_, q) in zip(eager.named_parameters(), fused.named_parameters()):
        torch.testing.assert_close(q.grad, p.grad, atol=1e-5, rtol=1e-4, msg=param_name)


def test_a_padded_batch_runs_the_kernel_and_equals_eager(capsys):
    eager, fused = tiny_qwen2(register_attention())
    attn.reset_attention_usage()
    input_ids = torch.randint(61, (3, 75), generator=torch.Generator().manual_seed(3))  # T past one 64-key block
    attention_mask = torch.ones_like(input_ids)
    attention_mask[0, 50:] = 0   # right padding, as TRL's collator makes it
    attention_mask[1, :9] = 0    # left padding: its first queries see no key
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    labels[1, 9] = -100  # predicted from a padding position's logits, which differ: eager averages all keys there
    want = eager(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
    got = fused(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
    valid = attention_mask.bool()
    assert torch.isfinite(got.logits).all()
    torch.testing.assert_close(got.logits[valid], want.logits[valid], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got.loss, want.loss, atol=1e-6, rtol=1e-6)
    want.loss.backward()
    got.loss.backward()
    for (param_name, p), (_, q) in zip(eager.named_parameters(), fused.named_parameters()):
        torch.testing.assert_close(q.grad, p.grad, atol=1e-5, rtol=1e-4, msg=param_name)
    # packed sequences (TRL's padding_free: position ids restart, no mask) are not key padding: SDPA, counted
    with torch.no_grad():
        fused(input_ids=input_ids[:1], position_ids=torch.cat([torch.arange(40), torch.arange(35)])[None], use_cache=False)
    assert attn.attention_usage() == {
        "kernel, key padding": 1, "SDPA: a mask that is not causal + key padding (packed sequences, sliding window, ...)": 1}
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("budget_flash:")]
    assert lines == [
        "budget_flash: 1 forward passes, 1 on the fused kernel (1 with key padding), 0 on SDPA",
        "budget_flash: 2 forward passes, 1 on the fused kernel (1 with key padding), 1 on SDPA; 1 SDPA: a mask that "
        "is not causal + key padding (packed sequences, sliding window, ...)"]


def test_sdpa_backend_and_reference_agree():
    q, k, v = inputs(2, 4, 2, 10, 16)
    keys = padded_keys(2, 10)
    want = attention_reference(q, k, v, key_padding_mask=keys)
    torch.testing.assert_close(flash_attention(q, k, v, backend="sdpa", key_padding_mask=keys), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(flash_attention(q, k, v, backend="sdpa"), attention_reference(q, k, v), rtol=1e-5, atol=1e-5)


def test_bad_head_counts_are_refused():
    q, k, v = inputs(1, 3, 2, 4, 16)
    with pytest.raises(ValueError, match="multiple of key/value heads"):
        flash_attention(q, k, v)


def test_a_preset_selects_the_kernel_by_name(tiny_run):
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
        assert (fused(input_ids=input_ids).logits - stock(input_ids=input_ids).logits).abs().max() <= 1e-5
