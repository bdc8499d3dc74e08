"""The time-and-money planner: the analytic plan on a card (checked by hand on one case), the preset headers it
keeps true, the over-budget line of quickstart --max-hours, and a real calibration on this CPU."""

import json
import re
import time

import pytest

from budget_reasoner.calibrate import cpu_rates, over_budget, plan_quickstart, plan_time_on_cpu
from budget_reasoner.config import available_presets, load_preset, resolve_preset_path
from budget_reasoner.hardware import PRESET_CARDS, card
from budget_reasoner.plan import plan_time_on_card
from tests.conftest import TINY, invoke, one_error_line, qwen7b_by_hand


def test_generate_time_by_hand_on_a_t4():
    """Qwen2.5-7B, NF4, fp16 on a T4 (320 GB/s, 65 TFLOP/s): 10 problems x 4 samples in batches of 5 problems
    (20 sequences), 10 steps each, from its config.json by hand."""
    preset = load_preset("t4-16gb", {"generate.num_train_problems": 10, "generate.num_seed_problems": 0,
                                     "generate.seed_sets": [], "generate.samples_per_problem": 4,
                                     "generate.batch_size": 22, "generate.max_new_tokens": 10})
    model = qwen7b_by_hand()
    h, layers, v, kv, linear = model["hidden"], model["layers"], model["vocab"], model["kv_dim"], model["linear"]
    weight_bytes = linear * 4.127 / 8 + v * h * 2  # NF4 layers + the fp16 LM head (the embedding is only looked up)
    kv_bytes = 20 * (120 + 10 / 2) * 2 * layers * kv * 2  # 20 sequences at a mean context of prompt + 5
    step = (weight_bytes + kv_bytes) / (320e9 * 0.37) + 0.02  # bandwidth-bound: 2 x params x 20 FLOPs is far less
    prefill = 2 * (linear + 2 * v * h) * 40 * 120 / (65e12 * 0.35)
    plan = plan_time_on_card(preset, card("t4"))
    generate = next(stage for stage in plan.stages if stage.stage == "generate")
    assert generate.seconds == pytest.approx(2 * 10 * step + prefill, rel=1e-9)  # batch 22 holds 5 problems' 20
    assert generate.tokens == int(40 * 10 * 0.4)
    assert "vLLM server" in generate.how


def test_eval_batches_follow_the_files_and_shards_eval_answers():
    from budget_reasoner.plan import decode_batches

    # held-out 300 + a benchmark's 200, shards of 250, batch 64: greedy 64 prompts a batch, 4 samples 16 prompts
    assert decode_batches([300, 200], 250, 64, 1) == (4 + 1 + 4, 64)  # 250 -> 4, 50 -> 1, 200 -> 4
    assert decode_batches([300, 200], 250, 64, 4) == (16 + 4 + 13, 64)
    assert decode_batches([10], 250, 3, 4) == (10, 4)  # a batch smaller than the samples still holds one problem


@pytest.mark.parametrize("name", sorted(PRESET_CARDS))
def test_every_gpu_preset_header_states_its_planned_time_within_its_budget(name):
    header = resolve_preset_path(name).read_text()
    key, stated, budget = re.search(r"# Planned time on (\S+) \(budget-reasoner plan --preset \S+\): ([\d.]+) h, "
                                    r"within a (\d+) h budget", header).groups()
    assert key == PRESET_CARDS[name]
    hours = plan_time_on_card(load_preset(name), card(key)).total_seconds / 3600
    assert abs(hours - float(stated)) <= 0.05, f"{name}: header says {stated} h, the planner {hours:.2f} h"
    assert hours <= float(budget)


def test_every_gpu_preset_has_a_card():
    assert sorted(PRESET_CARDS) == sorted(name for name in available_presets() if load_preset(name).vram_gb > 0)


def test_plan_json_and_a_server_teacher_priced_by_its_tokens():
    result = invoke("plan", "--preset", "24gb", "--teacher", "openai:Qwen/Qwen2.5-72B-Instruct",
                    "--token-price", "0.5,2", "--gpu-hour-price", "1.0", "--json")
    assert result.exit_code == 0, result.output
    plan = json.loads(result.output[result.output.index("{"):])
    # the 24gb preset scores with its own distill.teacher (the 72B, streamed), so a server chain teacher keeps distill
    assert [stage["stage"] for stage in plan["stages"]] == ["generate", "sft", "dpo", "cache", "distill", "eval"]
    assert "streamed a layer at a time" in plan["stages"][3]["how"]
    without_scorer = invoke("plan", "--preset", "24gb", "--teacher", "openai:Qwen/Qwen2.5-72B-Instruct", "--json",
                            "--set", "distill.teacher=''", "--set", "distill.stream_layers=false")
    assert without_scorer.exit_code == 0, without_scorer.output
    stages = json.loads(without_scorer.output[without_scorer.output.index("{"):])["stages"]
    assert [stage["stage"] for stage in stages] == ["generate", "sft", "dpo", "eval"]  # nothing here can score
    assert plan["total_seconds"] == pytest.approx(sum(stage["seconds"] for stage in plan["stages"]))
    generate = plan["stages"][0]
    preset = load_preset("24gb")
    chains = (preset.generate.num_train_problems + preset.generate.num_seed_problems) * preset.generate.samples_per_problem
    expected = (chains * 120 * 0.5 + generate["tokens"] * 2.0) / 1e6
    assert generate["cost_usd"] == pytest.approx(expected)
    sft = plan["stages"][1]
    assert sft["cost_usd"] == pytest.approx(sft["seconds"] / 3600 * 1.0)


def test_over_budget_names_the_dominant_stage_and_settings_that_fit():
    preset = load_preset("t4-16gb")
    plan = plan_quickstart(preset)
    assert over_budget(plan, preset, plan.total_seconds / 3600 + 1, plan_quickstart) is None
    line = over_budget(plan, preset, 6, plan_quickstart)
    assert f"{plan.dominant().stage} dominates" in line and "over --max-hours 6:" in line
    settings = dict(re.findall(r"--set (\S+)=(\d+)", line))
    assert settings, line
    fixed = load_preset("t4-16gb", {key: int(value) for key, value in settings.items()})
    assert plan_quickstart(fixed).total_seconds <= 6 * 3600
    assert "alone cannot" in over_budget(plan, preset, 0.5, plan_quickstart)


def test_unknown_card_is_one_line():
    line = one_error_line(invoke("plan", "--preset", "t4-16gb", "--gpu", "voodoo3"))
    assert "voodoo3" in line and "t4" in line


def test_cpu_calibration_measures_this_machine_and_gates_quickstart(tmp_path):
    """A real calibration (toy shapes): every rate measured, cached and reused; quickstart --max-hours under the
    plan stops before its folder exists."""
    preset = load_preset("cpu-tiny", dict(TINY))
    rates = cpu_rates(preset)
    assert all(value > 0 for value in (rates.teacher_step, rates.student_step, rates.check, rates.generate_batch,
                                       rates.cache_row, *rates.step.values(), *rates.eval_batch.values()))
    started = time.perf_counter()
    assert cpu_rates(load_preset("cpu-tiny", {**TINY, "sft.max_steps": 99})) == rates  # counts do not recalibrate
    assert time.perf_counter() - started < 5
    plan = plan_time_on_cpu(preset, rates)
    sft = next(stage for stage in plan.stages if stage.stage == "sft")
    assert sft.seconds == pytest.approx(rates.fixed["sft"] + TINY["sft.max_steps"] * rates.step["sft"])
    out = tmp_path / "run"
    line = one_error_line(invoke("quickstart", "--preset", "cpu-tiny", *[a for k, v in TINY.items() for a in ("--set", f"{k}={v}")],
                                 "--out", out, "--max-hours", "0.00001"))
    assert "over --max-hours" in line and "dominates" in line
    assert not out.exists()


def test_the_calibration_is_reused_for_other_counts_and_redone_for_other_shapes():
    from budget_reasoner.calibrate import calibration_path

    preset = load_preset("cpu-tiny")
    same = [load_preset("cpu-tiny", {"sft.max_steps": 5}), load_preset("cpu-tiny", {"generate.num_eval_problems": 7}),
            load_preset("cpu-tiny", {"pretrain.teacher_steps": 900})]
    other = [load_preset("cpu-tiny", {"generate.batch_size": 256}), load_preset("cpu-tiny", {"model.max_length": 80}),
             load_preset("cpu-tiny", {"generate.num_train_problems": 500}), load_preset("cpu-tiny", {"lora.r": 8})]
    assert all(calibration_path(p) == calibration_path(preset) for p in same)
    assert all(calibration_path(p) != calibration_path(preset) for p in other)


def test_a_resumed_run_is_planned_without_its_finished_stages(tmp_path):
    from budget_reasoner.calibrate import still_to_run

    plan = plan_time_on_card(load_preset("t4-16gb"), card("t4"))
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "COMPLETE.json").write_text("{}")
    (tmp_path / "sft").mkdir()
    (tmp_path / "sft" / "stage.json").write_text("{}")
    left = still_to_run(plan, tmp_path)
    assert [stage.stage for stage in left.stages] == ["dpo", "cache", "distill", "eval"]
    assert left.total_seconds == pytest.approx(plan.total_seconds - sum(s.seconds for s in plan.stages
                                                                        if s.stage in ("generate", "sft")))
