"""A folder is resumed or skipped only by what made it (issue 11.1 and 11.7): another model, teacher or setting is
refused in one line naming what differs, a damaged complete stage is an error, never a smaller dataset or a
success, and a resumed stage's compute adds up over its sessions. Every refusal leaves what was written as it was."""

import copy
import errno
import json
import os
import shutil

import pytest

from budget_reasoner.errors import BudgetReasonerError
from budget_reasoner.io import FINGERPRINT, claim_stage, mark_complete, read_json, verify_complete, write_jsonl
from tests.conftest import TINY_ARGS, ScriptedTeacher, interrupt_eval_on_second_shard, invoke, one_error_line

OVERRIDES = TINY_ARGS




def snapshot(folder):
    return {path.relative_to(folder): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


def one_line(error: pytest.ExceptionInfo) -> str:
    assert "\n" not in str(error.value)
    return str(error.value)


# ---- the machinery ---------------------------------------------------------------------------------------------

def test_claim_refuses_other_settings_naming_them_and_overwrite_keeps_nested_stages(tmp_path):
    out, data = tmp_path / "stage", tmp_path / "data.jsonl"
    data.write_text('{"a": 1}\n')
    assert claim_stage(out, "demo", {"data": data}, {"demo": {"lr": 1, "steps": 2}}) is None
    write_jsonl(out / "shard-00000.jsonl", [{"x": 1}])
    claim_stage(out / "cache", "inner", {}, {})  # a nested stage has its own fingerprint
    write_jsonl(out / "cache" / "shard-00000.jsonl", [{"y": 2}])
    before = snapshot(out)
    with pytest.raises(BudgetReasonerError) as error:
        claim_stage(out, "demo", {"data": data}, {"demo": {"lr": 2, "steps": 2}})
    assert "(differs: settings.demo.lr)" in one_line(error) and "--overwrite" in str(error.value)
    data.write_text('{"a": 2}\n')  # the same path, other content
    with pytest.raises(BudgetReasonerError, match=r"\(differs: inputs.data\)"):
        claim_stage(out, "demo", {"data": data}, {"demo": {"lr": 1, "steps": 2}})
    assert snapshot(out) == before
    assert claim_stage(out, "demo", {"data": data}, {"demo": {"lr": 2, "steps": 2}}, overwrite=True) is None
    assert not (out / "shard-00000.jsonl").exists()  # deleted: the new fingerprint's stage starts over
    assert (out / "cache" / "shard-00000.jsonl").is_file()  # another stage's folder is not this stage's to delete
    assert read_json(out / FINGERPRINT)["settings"] == {"demo": {"lr": 2, "steps": 2}}


def test_files_without_a_fingerprint_are_refused_and_a_manifest_catches_damage(tmp_path):
    out = tmp_path / "old"
    write_jsonl(out / "shard-00000.jsonl", [{"x": 1}])
    with pytest.raises(BudgetReasonerError, match="holds files but no fingerprint.json"):
        claim_stage(out, "demo", {}, {})
    assert [path.name for path in out.iterdir()] == ["shard-00000.jsonl"]
    shutil.rmtree(out)
    claim_stage(out, "demo", {}, {})
    write_jsonl(out / "shard-00000.jsonl", [{"x": 1}])
    write_jsonl(out / "shard-00001.jsonl", [{"x": 2}])
    mark_complete(out, {"examples": 2})
    verify_complete(out)
    (out / "shard-00001.jsonl").write_text('{"x": 3}\n')  # same size, other bytes
    with pytest.raises(BudgetReasonerError, match="shard-00001.jsonl has changed since the stage wrote it"):
        claim_stage(out, "demo", {}, {})


# ---- the cases of issue 11 ------------------------------------------------------------------------------------

def test_eval_of_another_model_never_reuses_anothers_shards(tiny_run, tmp_path):
    out, _, results = tiny_run
    problems = out / "data" / "problems" / "held_out.jsonl"
    ev = tmp_path / "ev"
    assert invoke("eval", "--model", out / "sft", "--problems", problems, "--out", ev, *OVERRIDES).exit_code == 0
    (ev / "COMPLETE.json").unlink()  # an interrupted-looking folder holding sft's shards
    before = snapshot(ev)
    for model in ("no/such-model", out / "dpo"):  # B's accuracy was reported under A's name, even for no A at all
        line = one_error_line(invoke("eval", "--model", model, "--problems", problems, "--out", ev, *OVERRIDES))
        assert f"{ev} holds eval output made from other inputs or settings (differs: inputs.model)" in line, line
        assert "--overwrite" in line
        assert snapshot(ev) == before
    result = invoke("eval", "--model", out / "dpo", "--problems", problems, "--out", ev, "--overwrite", *OVERRIDES)
    assert result.exit_code == 0, result.output
    summary = read_json(ev / "summary.json")
    assert summary["model"] == str(out / "dpo") and summary["accuracy"] == results["stages"]["dpo"]["accuracy"]


class OtherTeacher(ScriptedTeacher):
    name = "other"


class StopsAfterOneShard(ScriptedTeacher):
    def __init__(self):
        self.calls = 0

    def sample(self, *args, **kwargs):
        self.calls += 1
        if self.calls == 2:
            raise KeyboardInterrupt
        return super().sample(*args, **kwargs)


def test_generate_refuses_another_teacher_and_a_complete_folder_of_other_settings(tmp_path, tiny_preset):
    from budget_reasoner.generate import generate

    out = tmp_path / "data"
    with pytest.raises(KeyboardInterrupt):
        generate(out, tiny_preset, StopsAfterOneShard())  # one shard of the first teacher's chains
    before = snapshot(out)
    with pytest.raises(BudgetReasonerError) as error:  # was: the rest of the shards from this one, rc 0
        generate(out, tiny_preset, OtherTeacher())
    assert "(differs: inputs.teacher)" in one_line(error)
    assert snapshot(out) == before
    generate(out, tiny_preset, ScriptedTeacher())  # the same teacher resumes
    before = snapshot(out)
    other = copy.deepcopy(tiny_preset)
    other.generate.temperature = 0.5
    with pytest.raises(BudgetReasonerError) as error:  # was: "complete, skipping" and the old result
        generate(out, other, ScriptedTeacher())
    assert "(differs: settings.generate.temperature)" in one_line(error)
    assert snapshot(out) == before


def test_sft_into_a_complete_folder_of_other_settings_is_refused(tiny_run, tmp_path):
    out, _, _ = tiny_run
    shutil.copytree(out / "sft", tmp_path / "sft")
    before = snapshot(tmp_path / "sft")
    args = ["sft", "--data", out / "data" / "sft" / "train.jsonl", "--student", out / "models" / "student-base",
            "--out", tmp_path / "sft", "--preset", "cpu-tiny", *OVERRIDES]
    result = invoke(*args)  # the same data, student and settings: complete, skipped (the copy moved nothing)
    assert result.exit_code == 0, result.output
    line = one_error_line(invoke(*args, "--set", "sft.learning_rate=0.01"))
    assert "(differs: settings.sft.learning_rate)" in line, line
    assert snapshot(tmp_path / "sft") == before


def test_a_cache_missing_a_shard_is_an_error_not_a_smaller_dataset(tiny_run, tmp_path):
    from budget_reasoner.train.distill import distill

    out, preset, _ = tiny_run
    shutil.copytree(out / "distill" / "cache", tmp_path / "cache")
    shards = sorted((tmp_path / "cache").glob("shard-*.safetensors"))
    assert len(shards) >= 2
    shards[1].unlink()  # COMPLETE.json kept
    before = snapshot(tmp_path / "cache")
    with pytest.raises(BudgetReasonerError) as error:  # was: trained on the remaining shards, rc 0
        distill(tmp_path / "cache", out / "dpo", tmp_path / "distill", preset)
    assert f"{shards[1]} is missing (listed in" in one_line(error) and "--overwrite" in str(error.value)
    assert snapshot(tmp_path / "cache") == before and not (tmp_path / "distill").exists()


def test_quickstart_with_the_sft_adapter_deleted_fails(tiny_run, tmp_path):
    from budget_reasoner import recipe

    out, preset, _ = tiny_run
    shutil.copytree(out, tmp_path / "run")
    run = tmp_path / "run"
    (run / "sft" / "adapter" / "adapter_model.safetensors").unlink()
    before = snapshot(run)
    with pytest.raises(BudgetReasonerError) as error:  # was: the report, success
        recipe.quickstart(run, preset)
    assert "adapter_model.safetensors is missing" in one_line(error)
    assert snapshot(run) == before


def test_a_truncated_adapter_is_one_line_before_any_model_loads(tiny_run, tmp_path, monkeypatch):
    from budget_reasoner.eval import run as eval_run

    out, _, _ = tiny_run
    shutil.copytree(out / "sft", tmp_path / "sft")
    weights = tmp_path / "sft" / "adapter" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    monkeypatch.setattr(eval_run, "load_model", lambda *args, **kwargs: pytest.fail("a model loaded"))
    problems = out / "data" / "problems" / "held_out.jsonl"
    # a stage folder: its manifest
    line = one_error_line(invoke("eval", "--model", tmp_path / "sft", "--problems", problems, "--out", tmp_path / "a",
                                 *OVERRIDES))
    assert "adapter_model.safetensors has" in line and "bytes, not the" in line and "Repo id" not in line, line
    # a bare adapter folder (no manifest): its safetensors header against its size
    line = one_error_line(invoke("eval", "--model", tmp_path / "sft" / "adapter", "--problems", problems,
                                 "--out", tmp_path / "b", *OVERRIDES))
    assert "not a loadable safetensors file" in line and "Repo id" not in line, line
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_a_read_only_out_is_one_line_before_any_model_loads(tiny_run, tmp_path, monkeypatch):
    from budget_reasoner import io
    from budget_reasoner.eval import run as eval_run

    out, _, _ = tiny_run
    real_open = os.open

    def read_only(path, *args, **kwargs):  # the tests run as root, for whom chmod does not refuse a write
        if str(path).startswith(str(tmp_path / "ro")):
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return real_open(path, *args, **kwargs)

    (tmp_path / "ro").mkdir()
    monkeypatch.setattr(io.os, "open", read_only)
    monkeypatch.setattr(eval_run, "load_model", lambda *args, **kwargs: pytest.fail("a model loaded"))
    line = one_error_line(invoke("eval", "--model", out / "sft", "--problems", out / "data" / "problems" / "held_out.jsonl",
                                 "--out", tmp_path / "ro", *OVERRIDES))
    assert line == f"error: --out {tmp_path / 'ro'} is not writable (Read-only file system); pass a folder this user can write to"
    assert list((tmp_path / "ro").iterdir()) == []


# ---- compute over sessions -----------------------------------------------------------------------------------

def test_a_resumed_evals_compute_adds_up_its_sessions(tiny_run, tmp_path, monkeypatch):
    from budget_reasoner.eval import run

    out, preset, _ = tiny_run
    problems = out / "data" / "problems" / "held_out.jsonl"
    interrupt_eval_on_second_shard(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        run.evaluate(out / "sft", problems, tmp_path / "ev", preset)
    summary = run.evaluate(out / "sft", problems, tmp_path / "ev", preset)
    sessions = read_json(tmp_path / "ev" / "sessions.json")["sessions"]
    assert len(sessions) == 2 == len(summary["sessions"]) and all(s["seconds"] > 0 for s in sessions)
    assert summary["seconds"] == pytest.approx(sum(s["seconds"] for s in sessions))
    assert summary["peak_memory_bytes"] == max(s["peak_memory_bytes"] for s in sessions)


def test_a_resumed_training_stage_keeps_every_sessions_compute(tiny_run):
    out, _, _ = tiny_run
    record = read_json(out / "sft" / "stage.json")
    sessions = record["sessions"]
    assert sessions and record["seconds"] == pytest.approx(sum(s["seconds"] for s in sessions))
    assert record["peak_memory_bytes"] == max(s["peak_memory_bytes"] for s in sessions)
    assert json.loads((out / "sft" / "sessions.json").read_text())["sessions"] == sessions
