"""The stages on a toy quickstart run (tests/conftest.py: tiny_run), and their traps."""

import copy
import json

import pytest
import torch

from budget_reasoner.errors import BudgetReasonerError
from budget_reasoner.eval.run import load_for_inference
from budget_reasoner.hardware import detect
from budget_reasoner.io import is_complete, read_json
from budget_reasoner.scoring import read_cache
from budget_reasoner.train.common import encode_prompt_completion


def test_report_has_every_stage_on_the_same_held_out_problems(tiny_run):
    out, preset, results = tiny_run
    report = json.loads((out / "report.json").read_text())
    assert report["preset"] == "cpu-tiny"
    assert set(report["stages"]) == {"base", "sft", "dpo", "distill"}
    for summary in [*report["stages"].values(), report["teacher"]]:
        assert 0.0 <= summary["accuracy"] <= 1.0
        assert summary["problems"] == preset.generate.num_eval_problems
    assert report["seconds"] > 0
    assert (out / "report.md").read_text().startswith("# budget-reasoner run")
    assert (out / "report.png").read_bytes()[:4] == b"\x89PNG"
    # accuracy is recomputed from the per-problem results, not invented
    rows = [json.loads(line) for line in (out / "eval" / "sft" / "results.jsonl").read_text().splitlines()]
    assert report["stages"]["sft"]["accuracy"] == sum(r["correct"] for r in rows) / len(rows)


def test_every_stage_is_one_adapter_over_the_student_base(tiny_run):
    out, _, _ = tiny_run
    for stage in ("sft", "dpo", "distill"):
        assert is_complete(out / stage)
        record = read_json(out / stage / "stage.json")
        assert record["base"] == "../models/student-base"  # relative to the stage folder: the run folder can move
        assert (out / stage / "adapter" / "adapter_model.safetensors").is_file()
        assert not (out / stage / "checkpoints").exists()
    # each stage trained its adapter further: the weights differ from the previous stage's
    from safetensors.torch import load_file

    sft, dpo, distilled = (load_file(out / s / "adapter" / "adapter_model.safetensors") for s in ("sft", "dpo", "distill"))
    assert set(sft) == set(dpo) == set(distilled)
    assert any(not torch.equal(sft[k], dpo[k]) for k in sft)
    assert any(not torch.equal(dpo[k], distilled[k]) for k in dpo)


def test_rerun_skips_finished_stages(tiny_run):
    from budget_reasoner import recipe

    out, preset, results = tiny_run
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*.safetensors")}
    again = recipe.quickstart(out, preset)  # everything complete: nothing is trained or sampled again
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.safetensors")} == before
    assert again["stages"]["sft"]["accuracy"] == results["stages"]["sft"]["accuracy"]


def test_a_run_folder_of_other_settings_is_refused(tiny_run):
    from budget_reasoner import recipe

    out, preset, _ = tiny_run
    preset = copy.deepcopy(preset)
    preset.sft.max_steps = 99
    with pytest.raises(BudgetReasonerError, match="holds a run of preset 'cpu-tiny'"):
        recipe.quickstart(out, preset)


def test_dpo_reference_is_the_sft_model_not_the_base(tiny_run, tmp_path):
    from trl.trainer.utils import use_adapter

    from budget_reasoner.train.dpo import build_dpo_trainer

    out, preset, _ = tiny_run
    hardware = detect("cpu")
    trainer, tokenizer, _, _ = build_dpo_trainer(out / "data" / "pairs" / "train.jsonl", out / "sft", tmp_path / "dpo", preset, hardware)
    ids, _ = encode_prompt_completion(tokenizer, [{"role": "user", "content": "3+4*2"}], "<think>\n4*2=8\n</think>\n\\boxed{11}")
    input_ids = torch.tensor([ids])
    model = trainer.model
    with torch.no_grad(), use_adapter(model, adapter_name="ref"):  # exactly what DPOTrainer does for the reference
        reference = model(input_ids=input_ids).logits.log_softmax(-1)
    with torch.no_grad(), model.disable_adapter():
        base = model(input_ids=input_ids).logits.log_softmax(-1)
    sft_model, _ = load_for_inference(out / "sft", preset, hardware)
    with torch.no_grad():
        sft = sft_model(input_ids=input_ids).logits.log_softmax(-1)
    torch.testing.assert_close(reference, sft, rtol=1e-5, atol=1e-5)
    assert (reference - base).abs().max() > 1e-3  # the trap (base as reference) would fail the line above


def test_distill_refuses_a_cache_from_another_tokenizer(tiny_run, tmp_path):
    import shutil

    from budget_reasoner.train.distill import distill

    out, preset, _ = tiny_run
    shutil.copytree(out / "distill" / "cache", tmp_path / "cache")
    info = read_json(tmp_path / "cache" / "COMPLETE.json")
    (tmp_path / "cache" / "COMPLETE.json").write_text(json.dumps({**info, "tokenizer_hash": "0123"}))
    with pytest.raises(BudgetReasonerError, match="shared vocabulary"):
        distill(tmp_path / "cache", out / "dpo", tmp_path / "distill", preset)


def test_teacher_cache_holds_the_teachers_top_k(tiny_run):
    from budget_reasoner.models import load_model
    from budget_reasoner.scoring import read_cache

    out, preset, _ = tiny_run
    row = next(read_cache(out / "distill" / "cache"))
    assert row["topk_ids"].shape == (len(row["positions"]), preset.distill.top_k)
    teacher = load_model(out / "models" / "teacher", preset, detect("cpu"))
    with torch.no_grad():
        log_probs = teacher(input_ids=torch.tensor([row["input_ids"]])).logits[0].log_softmax(-1)
    expected = log_probs[row["positions"]].topk(preset.distill.top_k, dim=-1)
    assert row["topk_ids"].tolist() == expected.indices.tolist()
    # float16 log-probs: 11 significant bits
    torch.testing.assert_close(torch.from_numpy(row["topk_logprobs"]).float(), expected.values, rtol=2**-11, atol=1e-6)


def test_teacher_cache_is_sharded_and_resumes(tiny_run, tmp_path):
    from budget_reasoner.scoring import read_cache
    from budget_reasoner.train.distill import cache_teacher_topk

    def rows_of(cache):
        return [{key: value.tolist() for key, value in row.items()} for row in read_cache(cache)]

    out, preset, _ = tiny_run
    preset = copy.deepcopy(preset)
    preset.generate.shard_size = 10
    sft_file, teacher = out / "data" / "sft" / "train.jsonl", out / "models" / "teacher"
    info = cache_teacher_topk(teacher, sft_file, tmp_path / "cache", preset, detect("cpu"))
    shards = sorted((tmp_path / "cache").glob("shard-*.safetensors"))
    examples = len((sft_file).read_text().splitlines())
    assert len(shards) == -(-examples // 10) >= 2 and info["examples"] == examples
    rows = rows_of(tmp_path / "cache")
    # the same rows as the cache the quickstart wrote (an independent earlier run)
    assert rows == rows_of(out / "distill" / "cache")
    # an interrupted run: the last shard and the completion marker are missing; a rerun writes only that shard
    kept = {path: path.stat().st_mtime_ns for path in shards[:-1]}
    shards[-1].unlink()
    (tmp_path / "cache" / "COMPLETE.json").unlink()
    cache_teacher_topk(teacher, sft_file, tmp_path / "cache", preset, detect("cpu"))
    assert {path: path.stat().st_mtime_ns for path in shards[:-1]} == kept
    assert rows_of(tmp_path / "cache") == rows


def test_interrupted_sft_resumes_from_its_checkpoint(tiny_run, tmp_path, monkeypatch, capfd):
    from budget_reasoner.train import common
    from budget_reasoner.train.sft import sft

    out, preset, _ = tiny_run
    original = common.RichProgressCallback.on_step_end

    def interrupt_after_checkpoint(self, args, state, control, **kwargs):
        if state.global_step == 4:  # checkpoint-3 is on disk by now
            raise KeyboardInterrupt
        return original(self, args, state, control, **kwargs)

    monkeypatch.setattr(common.RichProgressCallback, "on_step_end", interrupt_after_checkpoint)
    with pytest.raises(KeyboardInterrupt):
        sft(out / "data" / "sft" / "train.jsonl", out / "models" / "student-base", tmp_path / "sft", preset)
    assert (tmp_path / "sft" / "checkpoints" / "checkpoint-3").is_dir()
    assert not is_complete(tmp_path / "sft")
    monkeypatch.setattr(common.RichProgressCallback, "on_step_end", original)
    record = sft(out / "data" / "sft" / "train.jsonl", out / "models" / "student-base", tmp_path / "sft", preset)
    assert "resuming from" in capfd.readouterr().err
    steps = [entry["step"] for entry in record["history"] if "loss" in entry]
    assert steps == sorted(set(steps)) and steps[-1] == preset.sft.max_steps


def test_qlora_sft_in_4bit_on_the_cpu(tiny_run, tmp_path):
    import bitsandbytes as bnb

    from budget_reasoner.train.common import load_for_training
    from budget_reasoner.train.sft import sft

    out, preset, _ = tiny_run
    preset = copy.deepcopy(preset)
    preset.quantization.load_in_4bit = True
    model, _ = load_for_training(out / "models" / "student-base", preset, detect("cpu"))
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
    record = sft(out / "data" / "sft" / "train.jsonl", out / "models" / "student-base", tmp_path / "qlora", preset)
    assert record["precision"].startswith("QLoRA: NF4 4-bit")
    losses = [entry["loss"] for entry in record["history"] if "loss" in entry]
    assert all(loss == loss and loss < 20 for loss in losses)  # finite, not diverged


def test_lora_on_lm_head_is_refused(tiny_preset):
    from budget_reasoner.train.common import peft_lora_config

    tiny_preset.lora.target_modules = ["q_proj", "lm_head"]
    with pytest.raises(BudgetReasonerError, match="lm_head"):
        peft_lora_config(tiny_preset)


def test_report_accounts_for_cost(tiny_run):
    from budget_reasoner import recipe

    out, preset, _ = tiny_run
    results = recipe.quickstart(out, preset, gpu_hour_price=2.0)  # complete: only the report is rewritten
    for name in ("sft", "dpo", "distill"):
        stage = results["stages"][name]
        assert stage["tokens"] > 0 and stage["peak_memory_gb"] > 0 and stage["device"].startswith("CPU")
        assert stage["cost_usd"] == pytest.approx(stage["train_seconds"] / 3600 * 2.0)
    assert results["cost_usd"] == pytest.approx(results["seconds"] / 3600 * 2.0)
    assert "$" in (out / "report.md").read_text()
    # every stage, not only training: generation, the teacher cache and the evals carry seconds, tokens and memory
    compute = {row["stage"]: row for row in results["compute"]}
    assert list(compute)[:2] == ["bootstrap", "generate"] and "teacher top-k cache" in compute
    assert compute["teacher top-k cache"]["tokens"] == sum(
        len(row["input_ids"]) for row in read_cache(out / "distill" / "cache"))
    evals = [read_json(path) for path in (out / "eval").glob("*/summary.json")]
    assert compute[f"eval ({len(evals)} runs)"]["tokens"] == sum(e["tokens"] for e in evals) > 0
    assert all(e["peak_memory_bytes"] > 0 for e in evals)
    assert results["seconds"] == pytest.approx(sum(row["seconds"] for row in compute.values()))
    assert sum(row["cost_usd"] for row in compute.values()) == pytest.approx(results["cost_usd"])
    assert "| teacher top-k cache |" in (out / "report.md").read_text()


def test_quickstart_evaluates_every_stage_on_the_presets_benchmarks(tmp_path, monkeypatch):
    from budget_reasoner import recipe
    from budget_reasoner.config import load_preset
    from tests.conftest import PROJECT_DATA, TINY, ScriptedTeacher

    preset = load_preset("cpu-tiny", {**TINY, "eval.benchmarks": [f"gsm8k={PROJECT_DATA / 'gsm8k' / 'test.jsonl'}",
                                                                  f"amc23={PROJECT_DATA / 'amc23' / 'test.jsonl'}"],
                                      "eval.benchmark_problems": 3})
    monkeypatch.setattr(recipe, "make_teacher", lambda *args: ScriptedTeacher())
    loads = []
    monkeypatch.setattr(recipe, "load_for_inference", lambda model, *args: loads.append(str(model)) or
                        load_for_inference(model, *args))
    results = recipe.quickstart(tmp_path / "run", preset)
    assert len(loads) == len(set(loads)) == 5  # each model loaded once for its three evaluations
    for spec in preset.eval.benchmarks:
        name = spec.split("=")[0]
        sample = read_json_lines(tmp_path / "run" / "data" / "benchmarks" / f"{name}.jsonl")
        assert len(sample) == 3 and all(row["source"].startswith(f"{name}:") for row in sample)
        assert set(results["benchmarks"][spec]) == {"teacher", "base", "sft", "dpo", "distill"}
        for stage, summary in results["benchmarks"][spec].items():
            rows = read_json_lines(tmp_path / "run" / "eval" / f"{name}-{stage}" / "results.jsonl")
            assert [row["id"] for row in rows] == [row["id"] for row in sample]  # the same sampled problems for all
            assert summary["problems"] == 3 and summary["accuracy"] == sum(row["correct"] for row in rows) / 3
    report = (tmp_path / "run" / "report.md").read_text()
    assert all(f"Benchmark `{spec}` (3 problems)" in report for spec in preset.eval.benchmarks)


def read_json_lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]
