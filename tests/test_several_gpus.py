"""The planner and the memory estimator on several GPUs: training split over data-parallel cards at the stated
efficiency, the teacher's chains from vLLM replicas, and each card's memory under DDP and FSDP, by hand."""

import pytest

from budget_reasoner.config import load_preset
from budget_reasoner.hardware import card
from budget_reasoner.memory import (estimate_training_memory, estimate_training_memory_per_gpu, lora_parameters,
                                    read_model_shape)
from budget_reasoner.plan import DATA_PARALLEL_EFFICIENCY, plan_time_on_card
from tests.conftest import invoke, one_error_line, qwen7b_by_hand

OVERHEADS = ("allocator slack (5%)", "CUDA context + workspaces")


def by_stage(plan):
    return {stage.stage: stage for stage in plan.stages}


def test_training_is_split_over_the_cards_and_every_card_is_paid_for():
    preset = load_preset("24gb")
    one = by_stage(plan_time_on_card(preset, card("a100-80gb"), gpu_hour_price=2.0))
    four = by_stage(plan_time_on_card(preset, card("a100-80gb"), gpu_hour_price=2.0, gpus=4))
    for stage in ("sft", "dpo", "distill"):
        assert four[stage].seconds == pytest.approx(one[stage].seconds / (4 * DATA_PARALLEL_EFFICIENCY), rel=1e-12)
        assert four[stage].cost_usd == pytest.approx(four[stage].seconds / 3600 * 2.0 * 4, rel=1e-12)
        assert four[stage].tokens == one[stage].tokens and "4 GPUs" in four[stage].how
    for stage in ("generate", "cache", "eval"):  # one process, as the stages run them
        assert four[stage].seconds == one[stage].seconds


def test_generate_from_vllm_replicas_by_hand():
    """Qwen2.5-7B (NF4 as the t4 preset loads it) on T4s: 40 chains of ~4 tokens, generate.concurrency 16 split over
    2 replicas (8 in flight each, 20 chains each); vLLM: no step overhead, only the tokens asked for."""
    preset = load_preset("t4-16gb", {"generate.num_train_problems": 10, "generate.num_seed_problems": 0,
                                     "generate.seed_sets": [], "generate.samples_per_problem": 4,
                                     "generate.max_new_tokens": 10, "generate.concurrency": 16})
    model = qwen7b_by_hand()
    h, layers, v, kv, linear = model["hidden"], model["layers"], model["vocab"], model["kv_dim"], model["linear"]
    parameters = linear + 2 * v * h  # untied
    mean_new, in_flight, chains = 10 * 0.4, 8, 20
    weight_bytes = linear * 4.127 / 8 + v * h * 2
    kv_bytes = in_flight * (120 + mean_new / 2) * 2 * layers * kv * 2
    step = max((weight_bytes + kv_bytes) / (320e9 * 0.60), 2 * parameters * in_flight / (65e12 * 0.35))
    prefill = 2 * parameters * chains * 120 / (65e12 * 0.35)
    plan = plan_time_on_card(preset, card("t4"), teacher="Qwen/Qwen2.5-7B-Instruct", replicas=2, gpu_hour_price=1.0)
    generate = by_stage(plan)["generate"]
    assert generate.seconds == pytest.approx(chains * mean_new / in_flight * step + prefill, rel=1e-9)
    assert generate.cost_usd == pytest.approx(generate.seconds / 3600 * 2, rel=1e-12)  # two replicas' cards
    # busy from where a step's FLOPs take as long as its weight read: more in flight is then no longer free
    busy = int(weight_bytes / (320e9 * 0.60) * 65e12 * 0.35 / (2 * parameters))
    assert f"busy from ~{busy}" in generate.how and "2 vLLM replica(s)" in generate.how


def test_ddp_holds_a_full_replica_plus_the_gradient_buckets():
    preset = load_preset("24gb")
    shape = read_model_shape(preset.model.student)
    one = estimate_training_memory(shape, preset, "sft")
    two = estimate_training_memory_per_gpu(shape, preset, "sft", gpus=2, strategy="ddp")
    buckets = lora_parameters(shape, preset) * 4  # fp32 adapter gradients
    allocated = sum(value for name, value in one.parts.items() if name not in OVERHEADS) + buckets
    assert two.total == pytest.approx(allocated * 1.05 + one.parts["CUDA context + workspaces"], rel=1e-12)


@pytest.mark.parametrize("gpus", [2, 8])
def test_fsdp_shards_the_layers_and_the_adapter_state(gpus):
    preset = load_preset("24gb")
    shape = read_model_shape(preset.model.student)
    one = estimate_training_memory(shape, preset, "sft")
    sharded = estimate_training_memory_per_gpu(shape, preset, "sft", gpus=gpus, strategy="fsdp")
    layers = shape.linear_parameters * 4.127 / 8  # NF4 decoder layers
    adapter = one.parts["LoRA weights + grads + optimizer"]
    allocated = (sum(value for name, value in one.parts.items() if name not in OVERHEADS)
                 - layers * (1 - 1 / gpus) + 2 * layers / shape.layers - adapter * (1 - 1 / gpus))
    assert sharded.total == pytest.approx(allocated * 1.05 + one.parts["CUDA context + workspaces"], rel=1e-12)
    assert sharded.total < estimate_training_memory_per_gpu(shape, preset, "sft", gpus=gpus, strategy="ddp").total


def test_vram_and_plan_commands_take_the_cards():
    result = invoke("vram", "--preset", "24gb", "--gpus", "4", "--strategy", "fsdp")
    assert result.exit_code == 0 and "per GPU, 4 GPUs, fsdp" in result.output and "1/4 shard" in result.output
    assert "for the training stages" in one_error_line(invoke("vram", "--preset", "24gb", "--stage", "eval", "--gpus", "2"))
    assert "ddp, fsdp" in one_error_line(invoke("vram", "--preset", "24gb", "--gpus", "2", "--strategy", "zero"))
    assert "--gpu NAME" in one_error_line(invoke("plan", "--preset", "cpu-tiny", "--gpus", "2"))
    result = invoke("plan", "--preset", "24gb", "--gpus", "2", "--replicas", "2")
    assert result.exit_code == 0 and "split over 2 GPUs" in result.output and "2 vLLM replica(s)" in result.output
