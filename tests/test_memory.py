"""The VRAM estimator: parameter counts against known models, the parts' arithmetic, every GPU preset fits."""

import json

import pytest
from typer.testing import CliRunner

from budget_reasoner.cli import app
from budget_reasoner.config import available_presets, load_preset
from budget_reasoner.errors import BudgetReasonerError
from budget_reasoner.memory import (GIB, estimate_inference_memory, estimate_training_memory, lora_parameters, preset_fits,
                                    read_model_shape)


@pytest.mark.parametrize("model, billions", [
    ("Qwen/Qwen2.5-0.5B-Instruct", 0.494),  # the published parameter counts
    ("Qwen/Qwen2.5-7B-Instruct", 7.62),
    ("meta-llama/Llama-3.1-8B-Instruct", 8.03),
    ("meta-llama/Llama-3.2-1B-Instruct", 1.24),
])
def test_parameter_counts_match_the_published_ones(model, billions):
    assert read_model_shape(model).parameters / 1e9 == pytest.approx(billions, rel=0.01)


def test_lora_parameter_count_by_hand():
    shape = read_model_shape("Qwen/Qwen2.5-0.5B-Instruct")
    preset = load_preset("cpu-tiny", {"lora.r": 16, "lora.target_modules": ["q_proj", "v_proj"]})
    # per layer: q 16*(896+896) + v 16*(896+128), 24 layers
    assert lora_parameters(shape, preset) == 24 * (16 * 1792 + 16 * 1024)


def test_the_fused_loss_and_checkpointing_lower_the_estimate():
    shape = read_model_shape("Qwen/Qwen2.5-1.5B-Instruct")
    preset = load_preset("12gb")
    base = estimate_training_memory(shape, preset, "sft").total
    preset.sft.fused_loss = False
    assert estimate_training_memory(shape, preset, "sft").total > base
    preset.sft.gradient_checkpointing = False
    assert estimate_training_memory(shape, preset, "sft").total > base
    # logits without the fused loss: tokens x vocab x (2 + 4 + 4 + 4) bytes in bf16
    tokens = preset.sft.batch_size * preset.model.max_length
    assert estimate_training_memory(shape, preset, "sft").parts["logits + loss"] == tokens * shape.vocab * 14


@pytest.mark.parametrize("name", [name for name in available_presets() if load_preset(name).vram_gb > 0])
def test_every_gpu_preset_fits_its_card_with_10_percent_headroom(name):
    preset = load_preset(name)
    fits, estimates = preset_fits(preset, preset.vram_gb)
    assert set(estimates) == {"sft", "dpo", "distill", "grpo", "opd", "generate", "cache", "eval"}  # the teacher's work too
    assert fits, {stage: round(e.total / GIB, 2) for stage, e in estimates.items()}


def test_kv_cache_by_hand_and_a_server_teacher_costs_this_card_nothing():
    shape = read_model_shape("Qwen/Qwen2.5-7B-Instruct")  # 28 layers, 4 KV heads x 128
    preset = load_preset("t4-16gb", {"generate.batch_size": 16, "generate.max_new_tokens": 1024, "model.max_length": 2048})
    estimate = estimate_inference_memory(shape, preset, "generate")
    # 16 sequences x (1,024 prompt + 1,024 new tokens) x 28 layers x (K and V) x 512 values x 2 bytes (fp16)
    assert estimate.parts["KV cache"] == 16 * 2048 * 28 * 2 * 512 * 2
    preset.model.teacher = "openai:Qwen/Qwen2.5-72B-Instruct"
    assert set(preset_fits(preset, preset.vram_gb)[1]) == {"sft", "dpo", "distill", "grpo", "opd", "eval"}


@pytest.mark.parametrize("name", [name for name in available_presets() if load_preset(name).vram_gb > 0])
def test_each_gpu_preset_states_its_longest_sequence_truly(name):
    """The header of each GPU preset states its longest sequence; the estimator must still agree (within 5%)."""
    import copy
    import re

    from budget_reasoner.config import resolve_preset_path
    from budget_reasoner.memory import longest_sequence

    preset = load_preset(name)
    header = resolve_preset_path(name).read_text()
    at_batch, sft_at_one = map(int, re.search(r"# Longest sequence on this card .*?: (\d+) tokens .*\n# (\d+) for sft", header).groups())
    shape = read_model_shape(preset.model.student)
    assert min(longest_sequence(shape, preset, preset.vram_gb, stage) for stage in ("sft", "dpo", "distill")) == \
        pytest.approx(at_batch, rel=0.05)
    one = copy.deepcopy(preset)
    one.sft.batch_size = 1
    assert longest_sequence(shape, one, preset.vram_gb, "sft") == pytest.approx(sft_at_one, rel=0.05)
    assert at_batch >= preset.model.max_length


def test_a_local_config_is_read_and_a_bad_id_is_one_line(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                                                      "num_attention_heads": 4, "vocab_size": 100}))
    assert read_model_shape(tmp_path).kv_heads == 4
    with pytest.raises(BudgetReasonerError, match="pass a local folder"):
        read_model_shape(str(tmp_path / "nope"))


def test_vram_command_prints_the_breakdown():
    result = CliRunner().invoke(app, ["vram", "--preset", "24gb"])
    assert result.exit_code == 0, result.output
    assert "base weights (NF4)" in result.output and "fits a 24 GiB card" in result.output
    result = CliRunner().invoke(app, ["vram", "--preset", "t4-16gb", "--stage", "generate"])
    assert result.exit_code == 0 and "Qwen/Qwen2.5-7B-Instruct" in result.output and "KV cache" in result.output
    result = CliRunner().invoke(app, ["vram", "--preset", "8gb", "--model", "Qwen/Qwen2.5-32B-Instruct"])
    assert "does NOT fit" in result.output
    assert "cpu-tiny" in CliRunner().invoke(app, ["presets", "recommend"]).output


def test_longest_sequence_brackets_the_fit():
    from budget_reasoner.memory import longest_sequence

    preset = load_preset("24gb")
    shape = read_model_shape(preset.model.student)
    longest = longest_sequence(shape, preset, preset.vram_gb)
    assert longest >= preset.model.max_length  # the preset's own length fits (asserted above too)
    preset.model.max_length = longest
    assert estimate_training_memory(shape, preset, "sft").fits(preset.vram_gb)
    preset.model.max_length = longest + 128
    assert not estimate_training_memory(shape, preset, "sft").fits(preset.vram_gb)


def test_dpo_counts_trls_fused_lm_head_and_its_cpu_fallback_by_hand():
    """DPO's log-probs go through TRL 1.16's fused LM head: one 4,096 x 32,768 tile in the compute dtype, the saved
    hidden states and their fp32 gradient, the frozen "ref" adapter; off CUDA its torch fallback's fp32 copies."""
    shape = read_model_shape("Qwen/Qwen2.5-1.5B-Instruct")
    preset = load_preset("12gb")  # bf16, batch x max_length pairs: twice the sequences
    tokens = 2 * preset.dpo.batch_size * preset.model.max_length
    parts = estimate_training_memory(shape, preset, "dpo").parts
    tile = min(tokens, 4096) * 32768
    assert parts["logits (TRL fused LM head, one tile)"] == tile * 2
    assert parts["TRL head: saved hidden states + fp32 gradient"] == tokens * shape.hidden * (2 + 4)
    assert parts["reference adapter (TRL's frozen copy)"] == lora_parameters(shape, preset) * 4
    assert "logits (fused, one chunk)" not in parts and "TRL torch-fallback tile copies (fp32)" not in parts
    on_cpu = estimate_training_memory(shape, preset, "dpo", device="cpu").parts
    assert on_cpu["TRL torch-fallback tile copies (fp32)"] == tile * 4 * 8


def test_the_chunked_loss_counts_its_16_bit_copy_and_the_cpu_chunk():
    shape = read_model_shape("Qwen/Qwen2.5-1.5B-Instruct")
    preset = load_preset("12gb")
    # bf16: 128 tokens of fp32 logits and the same chunk in bf16 beside them (matmul output, gradient's cast)
    assert estimate_training_memory(shape, preset, "distill").parts["logits (fused, one chunk)"] == 128 * shape.vocab * 6
    # on the CPU the chunks are four times as large (512 MiB of fp32 logits), and its plan computes in fp32: no copy
    assert estimate_training_memory(shape, preset, "distill", device="cpu").parts["logits (fused, one chunk)"] == 512 * shape.vocab * 4


@pytest.mark.parametrize("name", [name for name in available_presets() if load_preset(name).vram_gb > 0])
def test_every_gpu_presets_grpo_fits_by_either_generation_route(name):
    """GRPO's step fits beside the colocated vLLM engine's share, and without vLLM (transformers' generate) too;
    the share holds the engine's weights and one generation batch's KV cache with 25% to spare."""
    import copy

    from budget_reasoner.memory import vllm_engine_needs, vllm_share

    preset = load_preset(name)
    shape = read_model_shape(preset.model.student)
    assert preset.grpo.max_completion_length >= preset.generate.max_new_tokens  # sized for the chains, not shrunk
    assert estimate_training_memory(shape, preset, "grpo").fits(preset.vram_gb)
    assert vllm_share(preset, "cuda") >= 1.25 * vllm_engine_needs(shape, preset)
    without = copy.deepcopy(preset)
    without.grpo.vllm_gpu_memory_utilization = 0.0
    assert estimate_training_memory(shape, without, "grpo").fits(preset.vram_gb)


def test_grpo_counts_the_group_and_its_generation_by_hand():
    """GRPO trains on batch_size sequences of max_prompt_length + max_completion_length through TRL's fused head;
    on CUDA the vLLM engine reserves its share of the card; without it transformers' generate holds the generation
    batch's KV cache, which raises the peak only by what outgrows the step."""
    from budget_reasoner.memory import GIB, grpo_generation_batch

    shape = read_model_shape("Qwen/Qwen2.5-1.5B-Instruct")  # 28 layers, 2 KV heads x 128
    preset = load_preset("12gb", {"grpo.batch_size": 4, "grpo.grad_accum": 8, "grpo.num_generations": 8,
                                  "grpo.max_prompt_length": 256, "grpo.max_completion_length": 768,
                                  "grpo.vllm_gpu_memory_utilization": 0.25})
    tokens = 4 * (256 + 768)
    parts = estimate_training_memory(shape, preset, "grpo").parts
    assert parts["logits (TRL fused LM head, one tile)"] == min(tokens, 4096) * 32768 * 2
    assert parts["TRL head: saved hidden states + fp32 gradient"] == tokens * shape.hidden * (2 + 4)
    assert parts["vLLM engine (colocated, 25% of the card)"] == 0.25 * 12 * GIB
    assert "reference adapter (TRL's frozen copy)" not in parts  # beta 0 and LoRA: no reference copy at all
    assert not any(name.startswith("generation") for name in parts)
    preset.grpo.vllm_gpu_memory_utilization = 0.0
    parts = estimate_training_memory(shape, preset, "grpo").parts
    assert grpo_generation_batch(preset) == 32
    step = sum(value for name, value in parts.items() if name.startswith(("activations", "logits", "TRL")))
    # 32 sequences x 1,024 tokens x 28 layers x (K and V) x 256 values x 2 bytes; a layer of 256-token prefill; scores
    generation = (32 * 1024 * 28 * 2 * 256 * 2 + 32 * 256 * (4 * shape.hidden + 3 * shape.intermediate) * 2
                  + 32 * shape.vocab * 4 * 3)
    assert parts["generation beyond the step (32 sequences' KV cache)"] == pytest.approx(max(0, generation - step))


def test_vram_answers_for_grpo():
    result = CliRunner().invoke(app, ["vram", "--preset", "24gb", "--stage", "grpo"])
    assert result.exit_code == 0, result.output
    assert "vLLM engine (colocated, 34% of the card)" in result.output and "fits a 24 GiB card" in result.output
    assert "longest grpo sequence" in result.output


@pytest.mark.parametrize("name", [name for name in available_presets() if load_preset(name).vram_gb > 0])
def test_every_gpu_presets_opd_fits_beside_its_scoring_teacher(name):
    """On-policy distillation holds the student's step and the teacher that scores its samples at once."""
    preset = load_preset(name)
    estimate = estimate_training_memory(read_model_shape(preset.model.student), preset, "opd")
    assert any(key.startswith("teacher") for key in estimate.parts)  # every GPU preset scores with a local teacher
    assert estimate.fits(preset.vram_gb)


def test_opd_counts_the_teacher_beside_the_step_by_hand():
    """12gb: the 4-bit 7B teacher's weights (as the cache stage loads it) and its no-grad forward over the step's
    completions sit beside the student's step; a server teacher adds nothing to this card."""
    from budget_reasoner.memory import _with_weights, training_sequence
    from budget_reasoner.plan import plan_for

    preset = load_preset("12gb")
    student, teacher = read_model_shape(preset.model.student), read_model_shape(preset.scoring_teacher)
    parts = estimate_training_memory(student, preset, "opd").parts
    weights = sum(_with_weights(teacher, plan_for(preset, "cache")).parts.values())
    assert parts["teacher weights (NF4)"] == pytest.approx(weights)
    assert 4.5 * GIB < weights < 5.5 * GIB  # 7.6B parameters: NF4 layers + 16-bit embeddings and head
    tokens = preset.opd.batch_size * training_sequence(preset, "opd")
    assert tokens == preset.opd.batch_size * (preset.grpo.max_prompt_length + preset.opd.max_completion_length)
    served = load_preset("12gb", {"model.teacher": "openai:Qwen/Qwen2.5-7B-Instruct"})
    served_parts = estimate_training_memory(student, served, "opd").parts
    assert not any(key.startswith("teacher") for key in served_parts)
    assert sum(parts.values()) - sum(served_parts.values()) >= weights


def test_vram_answers_for_opd():
    result = CliRunner().invoke(app, ["vram", "--preset", "24gb", "--stage", "opd"])
    assert result.exit_code == 0, result.output
    assert "teacher (streamed: one layer + blocks)" in result.output  # the 24gb preset's 72B scores streamed
