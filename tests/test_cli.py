"""The CLI through typer's test runner: help, presets, one-line errors, commands over a toy run."""

import json

from typer.testing import CliRunner

from budget_reasoner.cli import app

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, list(args))


def test_every_command_has_help():
    for command in ("quickstart", "bootstrap", "generate", "sft", "dpo", "distill", "eval"):
        result = invoke(command, "--help")
        assert result.exit_code == 0, result.output
        assert "--preset" in result.output and "--out" in result.output
    assert "presets" in invoke("--help").output


def test_presets_list_and_show():
    assert "cpu-tiny" in invoke("presets", "list").output.split()
    shown = invoke("presets", "show", "cpu-tiny")
    assert shown.exit_code == 0 and "tiny_student:" in shown.output


def test_bad_preset_is_one_line_and_exit_2(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("sft:\n  max_steps: lots\n")
    for args in (("presets", "show", str(bad)), ("quickstart", "--preset", str(bad), "--out", str(tmp_path / "o")),
                 ("quickstart", "--preset", "nope"), ("quickstart", "--set", "sft.max_steps")):
        result = invoke(*args)
        assert result.exit_code == 2, result.output
        lines = [line for line in result.output.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("error: "), result.output
        assert "Traceback" not in result.output


def test_quickstart_refuses_a_folder_of_another_run(tiny_run):
    out, _, _ = tiny_run
    result = invoke("quickstart", "--out", str(out), "--set", "sft.max_steps=1")
    assert result.exit_code == 2 and "holds a run of preset" in result.output


def test_eval_command_on_a_stage_folder(tiny_run, tmp_path):
    from tests.conftest import TINY

    out, _, results = tiny_run
    overrides = [arg for key, value in TINY.items() for arg in ("--set", f"{key}={value}")]
    result = invoke("eval", "--model", str(out / "sft"), "--problems", str(out / "data" / "problems" / "held_out.jsonl"),
                    "--out", str(tmp_path / "ev"), *overrides)
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "ev" / "summary.json").read_text())
    assert summary["accuracy"] == results["stages"]["sft"]["accuracy"]  # greedy decoding is deterministic


def test_missing_columns_in_a_dataset_name_the_file(tiny_run, tmp_path):
    out, _, _ = tiny_run
    broken = tmp_path / "pairs.jsonl"
    broken.write_text(json.dumps({"prompt": [], "chosen": []}) + "\n")
    result = invoke("dpo", "--pairs", str(broken), "--sft", str(out / "sft"), "--out", str(tmp_path / "dpo"))
    assert result.exit_code == 2
    assert f"{broken}: line 1: missing column(s) rejected" in result.output


def test_ctrl_c_during_generation_is_one_line_and_keeps_shards(tiny_run, tmp_path, monkeypatch):
    from budget_reasoner import recipe
    from tests.test_generate import InterruptingTeacher

    teacher = InterruptingTeacher(calls_before_interrupt=1)
    monkeypatch.setattr(recipe, "make_teacher", lambda *args: teacher)
    from tests.conftest import TINY

    overrides = [arg for key, value in TINY.items() for arg in ("--set", f"{key}={value}")]
    result = invoke("generate", "--teacher", "anything", "--out", str(tmp_path / "data"), *overrides)
    assert result.exit_code == 130
    lines = result.output.strip().splitlines()
    assert lines[0].startswith("generate: shard 0 written")
    assert lines[1:] == ["interrupted: finished shards and checkpoints are kept; run the same command again to resume"]
    assert (tmp_path / "data" / "chains" / "shard-00000.jsonl").is_file()


def test_report_to_wandb_offline_writes_an_offline_run(tiny_run, tmp_path, monkeypatch):
    import copy

    from budget_reasoner.train.sft import sft

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    out, preset, _ = tiny_run
    settings = copy.deepcopy(preset)
    settings.sft.max_steps = 2
    sft(out / "data" / "sft" / "train.jsonl", out / "models" / "student-base", tmp_path / "sft", settings, report_to="wandb")
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb"))


def test_the_report_run_logs_accuracies_bootstrap_curves_and_compute(tiny_run, tmp_path, monkeypatch):
    import wandb

    from budget_reasoner import recipe
    from budget_reasoner.report import log_to_wandb

    wandb.teardown()  # wandb keeps its settings (the run folder) per process: start clean, after the other wandb test
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    out, preset, _ = tiny_run
    results = recipe.quickstart(out, preset)  # complete: only the report is rebuilt
    log_to_wandb(results)
    (run,) = (tmp_path / "wandb").glob("offline-run-*")
    media = run / "files" / "media" / "table"
    curves = json.loads(next((media / "bootstrap").glob("loss_*.table.json")).read_text())
    assert {row[0] for row in curves["data"]} == {"teacher", "student-base"}
    compute = json.loads(next(media.glob("compute_*.table.json")).read_text())
    assert [row[0] for row in compute["data"]] == [row["stage"] for row in results["compute"]]
