"""Runs that survive what a machine does to them, and that can move: the run lock, a full disk, a checkpoint
cut off by SIGKILL, an --out that is a file, and a run folder used from another disk and working directory."""

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from budget_reasoner.errors import BudgetReasonerError
from budget_reasoner.io import LOCK, is_complete, read_json, read_shards, run_lock, write_jsonl
from tests.conftest import TINY, TINY_ARGS, ScriptedTeacher, invoke, one_error_line

ROOT = Path(__file__).resolve().parents[1]
OVERRIDES = TINY_ARGS




def snapshot(folder: Path) -> dict:
    return {path.relative_to(folder): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


def scripted_teacher(monkeypatch, teacher=None):
    from budget_reasoner import recipe

    monkeypatch.setattr(recipe, "make_teacher", lambda *args: teacher or ScriptedTeacher())


def python(code: str, *args) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", code, *map(str, args)], cwd=ROOT, stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "BUDGET_REASONER_QUIET": "1"})


# ---- the lock ----------------------------------------------------------------------------------------------

HOLD_LOCK = ("import sys, time\nfrom budget_reasoner.io import run_lock\n"
             "with run_lock(sys.argv[1]):\n    print('held', flush=True)\n    time.sleep(120)\n")


def test_a_second_writer_is_refused_naming_the_first_and_a_dead_ones_lock_is_taken_over(tmp_path, monkeypatch):
    out = tmp_path / "data"
    first = python(HOLD_LOCK, out)
    try:
        assert first.stdout.readline().strip() == "held"
        (out / "notes.txt").write_text("the first writer's\n")
        before = snapshot(out)
        scripted_teacher(monkeypatch)
        for args in (("generate", "--teacher", "t", "--out", out), ("sft", "--data", "x", "--student", "s", "--out", out),
                     ("eval", "--model", "m", "--problems", "p", "--out", out / "eval"),  # inside the held folder
                     ("quickstart", "--out", tmp_path)):  # around it
            line = one_error_line(invoke(*args, *OVERRIDES))
            assert f"PID {first.pid} on " in line and "is being written by" in line, line
        assert snapshot(out) == before  # the refused writers changed nothing
        assert not (out / "eval").exists()
    finally:
        first.kill()  # SIGKILL: the lock file stays behind, naming a dead PID
        first.wait()
    assert read_json(out / LOCK)["pid"] == first.pid
    (out / "notes.txt").unlink()  # files no fingerprint accounts for are refused (test_fingerprints.py); the lock is at issue here
    result = invoke("generate", "--teacher", "t", "--out", out, *OVERRIDES)
    assert result.exit_code == 0, result.output
    assert f"taking over the lock of PID {first.pid}" in result.output
    assert is_complete(out) and not (out / LOCK).exists()


def test_the_lock_nests_within_a_thread_and_refuses_another_thread(tmp_path):
    with run_lock(tmp_path / "run"):
        with run_lock(tmp_path / "run" / "sft"), run_lock(tmp_path / "run"):  # quickstart's stages, and a re-entry
            assert (tmp_path / "run" / "sft" / LOCK).is_file()
        assert not (tmp_path / "run" / "sft" / LOCK).exists() and (tmp_path / "run" / LOCK).is_file()
        refused = []

        def other_thread():
            try:
                with run_lock(tmp_path / "run" / "dpo"):
                    pass
            except BudgetReasonerError as error:
                refused.append(str(error))

        thread = threading.Thread(target=other_thread)
        thread.start()
        thread.join()
        assert len(refused) == 1 and f"PID {os.getpid()}" in refused[0]
    assert not (tmp_path / "run" / LOCK).exists()
    assert not (tmp_path / "run" / "dpo").exists()  # a refused writer leaves no folder of its making


def test_a_lock_from_another_host_is_honoured_while_its_heartbeat_lasts(tmp_path, monkeypatch, capfd):
    from budget_reasoner import io

    lock = tmp_path / "run" / LOCK
    lock.parent.mkdir()
    lock.write_text(json.dumps({"pid": 999999999, "host": "colab-vm", "command": "budget-reasoner sft"}))
    with pytest.raises(BudgetReasonerError, match="PID 999999999 on colab-vm"):  # its PID means nothing here
        with run_lock(tmp_path / "run"):
            pass
    an_hour_ago = lock.stat().st_mtime - 3600
    os.utime(lock, (an_hour_ago, an_hour_ago))  # that VM disconnected long ago
    monkeypatch.setattr(io, "HEARTBEAT_SECONDS", 0.05)
    with run_lock(tmp_path / "run"):
        assert read_json(lock)["pid"] == os.getpid()
        os.utime(lock, (an_hour_ago, an_hour_ago))
        threading.Event().wait(0.5)
        assert lock.stat().st_mtime > an_hour_ago + 3000  # our own heartbeat keeps it fresh
    assert "taking over the lock of PID 999999999" in capfd.readouterr().err


def test_two_generate_runs_at_once_on_one_folder(tmp_path, tiny_preset):
    """The second is refused while the first writes; the first finishes with counts that match its folder."""
    from budget_reasoner.generate import generate

    started, release = threading.Event(), threading.Event()

    class SlowTeacher(ScriptedTeacher):
        def sample(self, *args, **kwargs):
            started.set()
            release.wait(60)
            return super().sample(*args, **kwargs)

    results = {}
    thread = threading.Thread(target=lambda: results.update(first=generate(tmp_path / "data", tiny_preset, SlowTeacher())))
    thread.start()
    assert started.wait(60)
    with pytest.raises(BudgetReasonerError, match=f"being written by PID {os.getpid()}"):
        generate(tmp_path / "data", tiny_preset, ScriptedTeacher())
    release.set()
    thread.join()
    chains = read_shards(tmp_path / "data" / "chains")
    assert results["first"]["chains"] == len(chains) == read_json(tmp_path / "data" / "COMPLETE.json")["chains"]


# ---- --out that is a file ----------------------------------------------------------------------------------

def test_out_naming_a_file_is_one_line(tmp_path):
    file = tmp_path / "notes.txt"
    file.write_text("mine\n")
    for args in (("generate", "--teacher", "t"), ("sft", "--data", "x", "--student", "s"), ("quickstart",),
                 ("eval", "--model", "m", "--problems", "p"), ("bootstrap",)):
        line = one_error_line(invoke(*args, "--out", file, *OVERRIDES))
        assert f"--out {file} is a file, not a folder" in line
        line = one_error_line(invoke(*args, "--out", file / "sub", *OVERRIDES))  # a file where a parent should be
        assert f"--out {file / 'sub'}: cannot create the folder" in line
    assert file.read_text() == "mine\n"


# ---- a full disk -------------------------------------------------------------------------------------------

def test_a_full_disk_during_a_shard_write_keeps_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    path = tmp_path / "shard-00000.jsonl"
    write_jsonl(path, [{"a": 1}])
    opened = Path.open

    class FillsUp:  # a file that takes some bytes, then hits ENOSPC, as a real full disk does
        def __init__(self, handle):
            self.handle, self.room = handle, 100

        def write(self, text):
            if len(text) > self.room:
                raise OSError(errno.ENOSPC, "No space left on device")
            self.room -= len(text)
            return self.handle.write(text)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.handle.close()

    monkeypatch.setattr(Path, "open", lambda self, *a, **k: FillsUp(opened(self, *a, **k)))
    with pytest.raises(BudgetReasonerError, match=f"no space left on the device writing {tmp_path}: finished shards"):
        write_jsonl(path, [{"a": 2}] * 1000)
    monkeypatch.setattr(Path, "open", opened)
    assert path.read_text() == '{"a": 1}\n' and sorted(tmp_path.iterdir()) == [path]  # no half-written temporary


def test_a_full_disk_during_generate_is_one_line_and_the_rerun_resumes(tmp_path, monkeypatch):
    from budget_reasoner.generate import pipeline

    scripted_teacher(monkeypatch)
    written, original = [], pipeline.write_jsonl

    def fills_the_disk(path, rows):
        if path.name == "shard-00001.jsonl":
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        written.append(path.name)
        return original(path, rows)

    monkeypatch.setattr(pipeline, "write_jsonl", fills_the_disk)
    out = tmp_path / "data"
    line = one_error_line(invoke("generate", "--teacher", "t", "--out", out, *OVERRIDES))
    assert f"no space left on the device writing {out}" in line and "run the same command again to resume" in line
    assert "shard-00000.jsonl" in written and "shard-00001.jsonl" not in written
    assert not is_complete(out) and not (out / LOCK).exists() and not list(out.rglob("*.tmp"))
    kept = (out / "chains" / "shard-00000.jsonl").stat().st_mtime_ns
    monkeypatch.setattr(pipeline, "write_jsonl", original)
    result = invoke("generate", "--teacher", "t", "--out", out, *OVERRIDES)
    assert result.exit_code == 0, result.output
    assert (out / "chains" / "shard-00000.jsonl").stat().st_mtime_ns == kept  # resumed, not redone
    summary = read_json(out / "COMPLETE.json")
    assert summary["chains"] == summary["problems"] * TINY["generate.samples_per_problem"] == len(read_shards(out / "chains"))


def test_a_failed_write_on_a_nearly_full_disk_is_one_line_otherwise_a_traceback(tmp_path, monkeypatch):
    """torch.save reports ENOSPC as a RuntimeError without an errno: the free space on --out's disk tells."""
    from budget_reasoner import cli
    from budget_reasoner.train import sft

    def failed_save(*args, **kwargs):
        raise RuntimeError("[enforce fail at inline_container.cc:595] . PytorchStreamWriter failed writing file "
                           "data/0: file write failed")

    monkeypatch.setattr(sft, "sft", failed_save)
    args = ("sft", "--data", "x", "--student", "s", "--out", tmp_path / "sft", "--preset", "cpu-tiny")
    monkeypatch.setattr(cli, "free_bytes", lambda folder: 10_000)
    line = one_error_line(invoke(*args))
    assert f"no space left on the device writing {tmp_path / 'sft'}" in line and "file write failed" in line
    monkeypatch.setattr(cli, "free_bytes", lambda folder: 10 * 2**30)
    result = invoke(*args)
    assert isinstance(result.exception, RuntimeError)  # a bug, not the disk: its traceback is kept


# ---- a checkpoint cut off mid-write ------------------------------------------------------------------------

def test_resume_skips_checkpoints_cut_off_mid_write_and_sets_them_aside(tmp_path, capfd):
    from budget_reasoner.train.common import last_complete_checkpoint

    checkpoints = tmp_path / "checkpoints"
    for step in (3, 6, 9, 12):
        (checkpoints / f"checkpoint-{step}").mkdir(parents=True)
        (checkpoints / f"checkpoint-{step}" / "adapter_model.safetensors").write_bytes(b"weights")
    (checkpoints / "checkpoint-3" / "trainer_state.json").write_text(json.dumps({"global_step": 3}))
    (checkpoints / "checkpoint-6" / "trainer_state.json").write_text(json.dumps({"global_step": 6}))
    (checkpoints / "checkpoint-9" / "trainer_state.json").write_text('{"global_step": 9, "log_hi')  # truncated
    # checkpoint-12: killed before trainer_state.json was written
    assert last_complete_checkpoint(checkpoints) == checkpoints / "checkpoint-6"
    assert sorted(p.name for p in checkpoints.iterdir()) == [
        "checkpoint-3", "checkpoint-6", "incomplete-checkpoint-12", "incomplete-checkpoint-9"]
    assert (checkpoints / "incomplete-checkpoint-12" / "adapter_model.safetensors").read_bytes() == b"weights"  # kept
    err = capfd.readouterr().err
    assert "checkpoint-12 was cut off while being written" in err and "set aside as incomplete-checkpoint-12" in err
    assert "set aside as incomplete-checkpoint-9" in err


KILLED_WHILE_SAVING = """
import os, signal, sys
from transformers.trainer_callback import TrainerState

save = TrainerState.save_to_json

def killed_at_step_6(self, path):  # the Trainer writes trainer_state.json last: die just before it
    if self.global_step == 6:
        os.kill(os.getpid(), signal.SIGKILL)
    return save(self, path)

TrainerState.save_to_json = killed_at_step_6
from budget_reasoner.cli import main
sys.argv = ["budget-reasoner", *sys.argv[1:]]
main()
"""


def test_sft_killed_by_sigkill_while_writing_a_checkpoint_resumes_on_rerun(tiny_run, tmp_path):
    out, _, _ = tiny_run
    args = ["sft", "--data", out / "data" / "sft" / "train.jsonl", "--student", out / "models" / "student-base",
            "--out", tmp_path / "sft", "--preset", "cpu-tiny", *OVERRIDES]
    killed = python(KILLED_WHILE_SAVING, *args)
    killed.communicate(timeout=300)
    assert killed.returncode == -signal.SIGKILL
    checkpoints = tmp_path / "sft" / "checkpoints"
    assert (checkpoints / "checkpoint-3" / "trainer_state.json").is_file()
    assert (checkpoints / "checkpoint-6").is_dir() and not (checkpoints / "checkpoint-6" / "trainer_state.json").exists()
    assert read_json(tmp_path / "sft" / LOCK)["pid"] == killed.pid  # left behind by the kill
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    assert f"taking over the lock of PID {killed.pid}" in result.output
    assert "set aside as incomplete-checkpoint-6" in result.output and "resuming from" in result.output
    record = read_json(tmp_path / "sft" / "stage.json")
    steps = [entry["step"] for entry in record["history"] if "loss" in entry]
    assert steps == sorted(set(steps)) and steps[-1] == TINY["sft.max_steps"]
    assert is_complete(tmp_path / "sft") and not (tmp_path / "sft" / LOCK).exists()


def test_a_full_disk_while_writing_a_checkpoint_is_one_line_and_the_rerun_resumes(tiny_run, tmp_path, monkeypatch):
    from transformers.trainer_callback import TrainerState

    out, _, _ = tiny_run
    save = TrainerState.save_to_json

    def disk_full_at_step_6(self, path):
        if self.global_step == 6:
            raise OSError(errno.ENOSPC, "No space left on device", path)
        return save(self, path)

    monkeypatch.setattr(TrainerState, "save_to_json", disk_full_at_step_6)
    args = ["sft", "--data", out / "data" / "sft" / "train.jsonl", "--student", out / "models" / "student-base",
            "--out", tmp_path / "sft", "--preset", "cpu-tiny", *OVERRIDES]
    line = one_error_line(invoke(*args))
    assert f"no space left on the device writing {tmp_path / 'sft'}" in line
    monkeypatch.setattr(TrainerState, "save_to_json", save)
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    assert "set aside as incomplete-checkpoint-6" in result.output and "checkpoint-3" in result.output
    assert is_complete(tmp_path / "sft")


# ---- a run folder that moves -------------------------------------------------------------------------------

def test_a_run_folder_moved_to_another_disk_is_used_from_another_directory(tiny_run, tmp_path, monkeypatch):
    """Stages trained from one working directory with relative paths; the run then moves and is used from
    elsewhere: eval of a stage, and a next stage trained on top of a moved one."""
    out, preset, _ = tiny_run
    first = tmp_path / "first"
    for part in ("models/student-base", "data/sft", "data/pairs"):
        shutil.copytree(out / part, first / "run" / part)
    monkeypatch.chdir(first)
    result = invoke("sft", "--data", "run/data/sft/train.jsonl", "--student", "run/models/student-base",
                    "--out", "run/sft", "--preset", "cpu-tiny", *OVERRIDES)
    assert result.exit_code == 0, result.output
    assert read_json(first / "run" / "sft" / "stage.json")["base"] == "../models/student-base"

    moved = tmp_path / "other-disk" / "renamed-run"
    moved.parent.mkdir()
    shutil.move(first / "run", moved)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    problems = out / "data" / "problems" / "held_out.jsonl"
    result = invoke("eval", "--model", moved / "sft", "--problems", problems, "--out", "ev", *OVERRIDES)
    assert result.exit_code == 0, result.output
    result = invoke("dpo", "--pairs", moved / "data" / "pairs" / "train.jsonl", "--sft", moved / "sft",
                    "--out", moved / "dpo", "--preset", "cpu-tiny", *OVERRIDES)
    assert result.exit_code == 0, result.output
    assert read_json(moved / "dpo" / "stage.json")["base"] == "../models/student-base"


def test_recorded_bases_inside_outside_and_on_the_hub(tmp_path):
    from budget_reasoner.stages import recorded_base, stage_model_paths

    (tmp_path / "run" / "models" / "base").mkdir(parents=True)
    (tmp_path / "elsewhere" / "model").mkdir(parents=True)
    stage = tmp_path / "run" / "sft"
    assert recorded_base(tmp_path / "run" / "models" / "base", stage) == "../models/base"
    assert recorded_base(tmp_path / "elsewhere" / "model", stage) == str(tmp_path / "elsewhere" / "model")
    assert recorded_base("Qwen/Qwen2.5-0.5B-Instruct", stage) == "Qwen/Qwen2.5-0.5B-Instruct"
    for base, expected in (("../models/base", str(tmp_path / "run" / "models" / "base")),
                           ("Qwen/Qwen2.5-0.5B-Instruct", "Qwen/Qwen2.5-0.5B-Instruct")):
        stage.mkdir(exist_ok=True)
        (stage / "stage.json").write_text(json.dumps({"base": base, "adapter": "adapter"}))
        assert stage_model_paths(stage) == (expected, stage / "adapter")
    shutil.rmtree(tmp_path / "run" / "models")  # a stage moved without its base: one line, not a hub error
    (stage / "stage.json").write_text(json.dumps({"base": "../models/base", "adapter": "adapter"}))
    with pytest.raises(BudgetReasonerError, match=r"base model '../models/base' \(relative to the stage folder\) is not at"):
        stage_model_paths(stage)
