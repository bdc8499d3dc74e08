"""sft under torchrun with two real CPU processes (gloo) against the single-process run it must equal
(tests/multi_process.py says why the two are the same update), and a launch that cannot work refused in one line."""

import json
from pathlib import Path

import pytest

from tests.multi_process import (EXAMPLES, PROCESSES, adapter_weights, batches, build_inputs, cli, max_abs_difference,
                                 run, sft_command, step_logs, torchrun)

# Both runs add the same per-rank gradients, in the same order up to gloo's all-reduce; on this machine the two
# adapters come out bit-identical. The tolerance leaves room for another machine's reduction order.
TOLERANCE = 1e-6


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("multi-process")
    student, data = build_inputs(root)
    two = run(torchrun(PROCESSES) + cli() + sft_command(student, data, root / "two", grad_accum=1), root / "trace-two")
    assert two.returncode == 0, two.stderr[-3000:]
    one = run(cli() + sft_command(student, data, root / "one", grad_accum=PROCESSES), root / "trace-one")
    assert one.returncode == 0, one.stderr[-3000:]
    return root, two, one


def test_two_processes_really_ran_and_recorded_it(two_runs):
    root, two, _ = two_runs
    record = json.loads((root / "two" / "stage.json").read_text())
    assert record["world_size"] == PROCESSES  # not one process that believed it was a launch
    assert record["effective_batch"] == 2 * PROCESSES * 1
    session = json.loads((root / "two" / "sessions.json").read_text())["sessions"][-1]
    assert len(session["per_rank"]) == PROCESSES and all(rank["peak_memory_bytes"] > 0 for rank in session["per_rank"])
    assert "x 2 process(es) x 1 accumulation = 4 examples" in two.stderr
    assert two.stdout.count("sft adapter:") == 1  # rank 0 reports; rank 1 prints nothing of its own
    assert (root / "trace-two" / "rank-1.jsonl").is_file()
    assert not (root / "two" / "LOCK.json").exists() and (root / "two" / "COMPLETE.json").is_file()


def test_the_ranks_saw_different_halves_of_each_step(two_runs):
    root, _, _ = two_runs
    rank0, rank1, single = batches(root / "trace-two", 0), batches(root / "trace-two", 1), batches(root / "trace-one", 0)
    seen0, seen1 = {row for batch in rank0 for row in batch}, {row for batch in rank1 for row in batch}
    assert not seen0 & seen1 and len(seen0 | seen1) == EXAMPLES
    # step k: rank 0's batch and rank 1's are the single process's micro-batches 2k and 2k+1
    assert [batch for pair in zip(rank0, rank1) for batch in pair] == single


def test_two_processes_equal_one_with_twice_the_accumulation(two_runs):
    root, _, _ = two_runs
    two, one = adapter_weights(root / "two"), adapter_weights(root / "one")
    changed = max(float(weight.abs().max()) for name, weight in one.items() if "lora_B" in name)
    assert changed > 1e-3  # lora_B starts at zero: the runs trained
    assert max_abs_difference(two, one) <= TOLERANCE
    # the gradient norm before clipping sees a wrong normalization that Adam's update would hide (it is
    # invariant to a constant factor): the token count must be global and the ranks' mean undone
    assert step_logs(root / "two", "grad_norm") == pytest.approx(step_logs(root / "one", "grad_norm"), rel=1e-5)
    assert step_logs(root / "two", "loss") == pytest.approx(step_logs(root / "one", "loss"), rel=1e-5)


def test_more_processes_than_examples_is_refused_in_one_line(two_runs, tmp_path):
    import shutil

    root, _, _ = two_runs
    few = tmp_path / "one-example.jsonl"
    few.write_text((root / "sft.jsonl").read_text().splitlines()[0] + "\n")
    result = run(torchrun(PROCESSES) + cli() + sft_command(root / "student-base", few, tmp_path / "out", grad_accum=1),
                 tmp_path / "trace")
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert errors and all(line == errors[0] for line in errors), result.stderr[-2000:]
    assert "1 chains in" in errors[0] and "cannot feed 2 processes" in errors[0]
    assert "budget_reasoner/" not in result.stderr  # no traceback through our code (torchrun prints its own summary)
    shutil.rmtree(tmp_path / "out", ignore_errors=True)


def test_a_rank_killed_mid_run_stops_the_other_with_one_line_and_the_run_resumes(two_runs, tmp_path):
    import os
    import signal
    import subprocess
    import time

    from tests.multi_process import SETTINGS

    root, _, _ = two_runs
    out = tmp_path / "killed"
    settings = {**SETTINGS, "sft.max_steps": 80, "sft.save_steps": 20}
    command = torchrun(PROCESSES) + cli() + sft_command(root / "student-base", root / "sft.jsonl", out, 1, settings)
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "BUDGET_REASONER_QUIET": "1"}
    launch = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=environment)
    checkpoint = out / "checkpoints" / "checkpoint-20" / "trainer_state.json"
    while not checkpoint.exists() and launch.poll() is None:
        time.sleep(0.1)
    assert launch.poll() is None, "the run ended before its first checkpoint"
    os.kill(rank_pid(1, out), signal.SIGKILL)  # as the OOM killer would
    _, stderr = launch.communicate(timeout=120)
    assert launch.returncode != 0
    # rank 0 learns it in the all-reduce (gloo: connection reset) or from the launcher's SIGTERM, whichever first
    stopped = [line for line in stderr.splitlines()
               if line.startswith(("error: rank 0 lost another process", "error: rank 0 stopped by the launcher"))]
    assert len(stopped) == 1 and "run the same command again to resume" in stopped[0], stderr[-3000:]
    assert "budget_reasoner/" not in stderr  # no traceback through our code
    session = json.loads((out / "sessions.json").read_text())["sessions"][-1]  # rank 0 recorded its session
    assert session["reached_step"] >= 20
    result = run(command, tmp_path / "trace")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resuming from" in result.stderr and json.loads((out / "stage.json").read_text())["world_size"] == PROCESSES


def rank_pid(rank: int, out) -> int:
    """The PID of the launched process of `rank` writing to `out` (from /proc: its RANK and its command line)."""
    from pathlib import Path

    for entry in Path("/proc").iterdir():
        try:
            environment = (entry / "environ").read_bytes().split(b"\0")
            command = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if f"RANK={rank}".encode() in environment and str(out).encode() in command and b"torch.distributed.run" not in command:
            return int(entry.name)
    raise AssertionError(f"no process of rank {rank} for {out}")


def test_ranks_with_different_presets_are_refused_on_every_rank(tmp_path):
    """Two ranks that loaded different presets (here sft.max_steps differs by rank) both refuse in one line."""
    import sys

    script = tmp_path / "two_presets.py"
    script.write_text(
        "import os\n"
        "from budget_reasoner import distributed\n"
        "from budget_reasoner.config import load_preset\n"
        "from budget_reasoner.errors import BudgetReasonerError\n"
        "preset = load_preset('cpu-tiny', {'sft.max_steps': 10 + distributed.rank()})\n"
        "distributed.join(cpu=True)\n"
        "try:\n"
        "    distributed.check_same_preset(preset)\n"
        "except BudgetReasonerError as error:\n"
        "    print(f'rank {distributed.rank()} refused: {error}', flush=True)\n"
    )
    result = run(torchrun(PROCESSES) + [str(script)], tmp_path / "trace", env={"PYTHONPATH": str(Path(__file__).parents[1])})
    # both ranks print to the one pipe at once: their lines may interleave, so count rather than split
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.count(" refused: the 2 processes of this run loaded different presets") == PROCESSES
