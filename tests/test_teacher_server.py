"""The server teacher against a real OpenAI-compatible server: `transformers serve` (continuous batching) on a
loopback port, serving a tiny model folder saved with its tokenizer and chat template.

The model is a scripted one (models.build_scripted_model), so that the generate stage can finish and the chains can
be checked against what a reader predicts: whatever the question, it answers "\\boxed{N}" and stops, N being the
most common answer among the training problems: some chains are verified, the rest rejected. The server, not we,
tokenizes, decodes and counts.
"""

import collections
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from budget_reasoner.config import load_preset
from budget_reasoner.generate import generate
from budget_reasoner.generate.pipeline import write_problems
from budget_reasoner.generate.teachers import OpenAITeacher
from budget_reasoner.io import read_shards
from budget_reasoner.sampling import chat_prompt
from budget_reasoner.sampling.loopback import serve
from tests.conftest import TINY

SETTINGS = {**TINY, "generate.num_train_problems": 48, "generate.samples_per_problem": 2, "generate.shard_size": 8,
            "generate.max_new_tokens": 16, "generate.temperature": 0.0, "generate.concurrency": 16}


def scripted_teacher(folder, completion: str):
    """Save models.build_scripted_model (see the module docstring) with the offline tokenizer; return the tokenizer."""
    from budget_reasoner.models import build_scripted_model
    from budget_reasoner.train.pretrain import build_offline_tokenizer

    tokenizer = build_offline_tokenizer(load_preset("cpu-tiny"))
    build_scripted_model(tokenizer, completion).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return tokenizer


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """(base URL, model folder, tokenizer, the scripted answer, preset) of a running server."""
    root = tmp_path_factory.mktemp("served")
    preset = load_preset("cpu-tiny", dict(SETTINGS))
    problems, _ = write_problems(root / "problems", preset)
    answer = collections.Counter(p["answer"] for p in problems).most_common(1)[0][0]
    tokenizer = scripted_teacher(root / "teacher", f"\\boxed{{{answer}}}")
    with serve(root / "teacher", root / "server.log") as url:
        yield url, str(root / "teacher"), tokenizer, answer, preset


def test_generate_through_a_real_server(server, tmp_path, capfd):
    url, model, tokenizer, answer, preset = server
    teacher = OpenAITeacher(model, base_url=url, concurrency=preset.generate.concurrency, max_retries=0)
    summary = generate(tmp_path / "data", preset, teacher)
    chains = read_shards(tmp_path / "data" / "chains")
    problems = {p["id"]: p for p in write_problems(tmp_path / "data" / "problems", preset)[0]}
    k = preset.generate.samples_per_problem
    assert sorted((row["id"], row["sample_index"]) for row in chains) == sorted((i, s) for i in problems for s in range(k))
    assert {row["completion"] for row in chains} == {f"\\boxed{{{answer}}}"}
    assert [row["correct"] for row in chains] == [problems[row["id"]]["answer"] == answer for row in chains]
    assert summary["verified_chains"] == k * sum(p["answer"] == answer for p in problems.values()) > 0

    # the server's usage, against our own count with the same tokenizer: the answer's tokens and the stop token
    completion_tokens = len(tokenizer(f"\\boxed{{{answer}}}", add_special_tokens=False)["input_ids"]) + 1
    assert {row["tokens"] for row in chains} == {completion_tokens}
    for row in chains:
        prompt = tokenizer.apply_chat_template(chat_prompt(row["question"], preset.generate.instruction),
                                               add_generation_prompt=True, tokenize=False)
        assert row["prompt_tokens"] == len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    assert summary["tokens"] == completion_tokens * len(chains)

    # transformers serve answers n > 1 with one choice: found on the first request, said once
    assert capfd.readouterr().err.count("answered 1 of 2 choices") == 1
    assert 1 < teacher.peak_in_flight <= preset.generate.concurrency  # requests overlapped, within the limit


def test_a_killed_concurrent_generation_resumes_with_no_chain_lost_or_repeated(server, tmp_path):
    """generate in a child process, killed (SIGKILL) once a shard is on disk and before the last; the same command
    again finishes the rest: every (problem, sample) exactly once, and the shards written before the kill unchanged."""
    url, model, _, _, preset = server
    out = tmp_path / "data"
    overrides = [arg for key, value in SETTINGS.items() for arg in ("--set", f"{key}={value}")]
    command = [sys.executable, "-c", "from budget_reasoner.cli import app; app()", "generate", "--teacher",
               f"openai:{model}", "--preset", "cpu-tiny", "--out", str(out), *overrides,
               "--set", "generate.concurrency=4"]  # slower, so the kill lands mid-run
    env = {"BUDGET_REASONER_TEACHER_URL": url, "BUDGET_REASONER_QUIET": "1", "OMP_NUM_THREADS": "1"}
    child = subprocess.Popen(command, env={**os.environ, **env}, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE)
    shards = preset.generate.num_train_problems // preset.generate.shard_size
    deadline = time.monotonic() + 60
    while not (out / "chains" / "shard-00000.jsonl").exists() and child.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    child.send_signal(signal.SIGKILL)
    child.wait()
    written = {path.name: path.read_bytes() for path in (out / "chains").glob("shard-*.jsonl")}
    assert 1 <= len(written) < shards, f"the kill should land mid-run: {sorted(written)}"
    assert not (out / "COMPLETE.json").exists()

    rerun = subprocess.run(command, env={**os.environ, **env}, capture_output=True, text=True, timeout=120)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert {name: (out / "chains" / name).read_bytes() for name in written} == written
    chains = read_shards(out / "chains")
    keys = collections.Counter((row["id"], row["sample_index"]) for row in chains)
    problems = [json.loads(line)["id"] for line in (out / "problems" / "train.jsonl").read_text().splitlines()]
    expected = {(problem, k) for problem in problems for k in range(preset.generate.samples_per_problem)}
    assert set(keys) == expected and set(keys.values()) == {1}  # none lost, none twice
