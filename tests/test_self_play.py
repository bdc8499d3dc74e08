"""Self-play (expert iteration): `generate --sampler STAGE` samples chains from a trained student, verified as the
teacher's are; `quickstart --rounds N` alternates the student's sampling and SFT, each round resumable on its own."""

import json
import shutil

import pytest

from budget_reasoner.io import read_jsonl, read_shards, write_jsonl
from budget_reasoner.verify import check
from tests.conftest import TINY, TINY_ARGS, invoke, one_error_line, stand_in_for


def chain(problem: str, completion: str, correct: bool, source: str) -> dict:
    return {"id": problem, "question": f"question {problem}", "answer": "7", "completion": completion,
            "correct": correct, "teacher": source, "sample_index": 0}


def test_the_merge_rule_by_hand(tmp_path):
    """Per problem: distinct verified chains, the teacher's before the student's, at most two."""
    from budget_reasoner.generate.pipeline import merge_chains

    teacher, student = tmp_path / "teacher", tmp_path / "student"
    write_jsonl(teacher / "chains" / "shard-00000.jsonl", [
        chain("a", "t1", True, "teacher"), chain("a", "t1", True, "teacher"), chain("a", "w", False, "teacher"),
        chain("b", "w", False, "teacher"), chain("c", "t2", True, "teacher"), chain("c", "t3", True, "teacher")])
    write_jsonl(student / "chains" / "shard-00000.jsonl", [
        chain("a", "t1", True, "sft"), chain("a", "s1", True, "sft"), chain("a", "s2", True, "sft"),
        chain("b", "s3", True, "sft"), chain("b", "w2", False, "sft"), chain("c", "s4", True, "sft")])
    summary = merge_chains(tmp_path / "merged", [teacher, student])
    kept = [(row["id"], row["completion"][0]["content"]) for row in read_jsonl(tmp_path / "merged" / "train.jsonl")]
    # a: the teacher's t1 (its repeat dropped), then the student's first new chain; b: the student's alone (the
    # teacher never solved it); c: the teacher's two fill it
    assert kept == [("a", "t1"), ("a", "s1"), ("b", "s3"), ("c", "t2"), ("c", "t3")]
    assert summary["examples_alone"] == [3, 4] and summary["sft_examples"] == 5
    assert merge_chains(tmp_path / "merged", [teacher, student]) == summary  # complete: skipped on a rerun


@pytest.fixture(scope="module")
def two_rounds(tmp_path_factory):
    """A toy quickstart with --rounds 2, interrupted in round 2's sampling after its first shard, then rerun."""
    from budget_reasoner import recipe
    from budget_reasoner.config import load_preset

    out = tmp_path_factory.mktemp("self-play") / "quick"
    preset = load_preset("cpu-tiny", dict(TINY))
    real_sampler, calls = recipe.make_sampler, []

    def interrupted_sampler(*args):
        sampler = real_sampler(*args)
        sample = sampler.sample

        def sample_twice(*a, **k):
            calls.append(1)
            if len(calls) == 2:
                raise KeyboardInterrupt
            return sample(*a, **k)

        sampler.sample = sample_twice
        return sampler

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(recipe, "make_teacher", lambda teacher, *args: stand_in_for(teacher))
        patch.setattr(recipe, "make_sampler", interrupted_sampler)
        with pytest.raises(KeyboardInterrupt):
            recipe.quickstart(out, preset, rounds=2)
    first_shard = out / "selfplay-2" / "chains" / "shard-00000.jsonl"
    stamps = {path: path.stat().st_mtime_ns for path in (first_shard, out / "sft" / "stage.json")}
    assert not (out / "sft-round-2").exists()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(recipe, "make_teacher", lambda teacher, *args: stand_in_for(teacher))
        results = recipe.quickstart(out, preset, rounds=2)
    return out, preset, results, stamps


def test_round_two_samples_the_round_one_student_and_trains_on_from_it(two_rounds):
    from budget_reasoner.io import input_digest, read_json

    out, _, results, stamps = two_rounds
    assert all(path.stat().st_mtime_ns == stamp for path, stamp in stamps.items())  # resumed, not redone
    chains = read_shards(out / "selfplay-2" / "chains")
    problems = read_jsonl(out / "data" / "problems" / "train.jsonl")
    assert len(chains) == len(problems) * TINY["generate.samples_per_problem"]
    assert {row["teacher"] for row in chains} == {"sft"}  # the stage that sampled them
    assert [row["correct"] for row in chains] == [check("math", row["completion"], row["answer"]) for row in chains]
    round_two = read_json(out / "sft-round-2" / "fingerprint.json")
    assert round_two["inputs"]["student"] == input_digest(out / "sft")  # continued from round 1's adapter
    assert round_two["inputs"]["data"] == input_digest(out / "selfplay-2" / "merged" / "train.jsonl")
    assert read_json(out / "dpo" / "fingerprint.json")["inputs"]["sft"] == input_digest(out / "sft-round-2")
    stage = read_json(out / "sft-round-2" / "stage.json")
    assert (out / "sft-round-2" / stage["base"]).resolve() == (out / "models" / "student-base").resolve()
    # the report: a row per round, the round's sampling and training in the compute table
    assert list(results["stages"])[:3] == ["base", "sft", "sft-round-2"]
    assert 0.0 <= results["stages"]["sft-round-2"]["accuracy"] <= 1.0
    assert [row["stage"] for row in results["compute"]][2:5] == ["sft", "self-play sampling (sft-round-2)", "sft-round-2"]
    assert "| sft-round-2 |" in (out / "report.md").read_text()
    assert json.loads((out / "run.json").read_text())["rounds"] == 2


def test_a_rerun_skips_finished_rounds_and_other_rounds_are_refused(two_rounds):
    from budget_reasoner import recipe
    from budget_reasoner.errors import BudgetReasonerError

    out, preset, _, _ = two_rounds
    written = (out / "sft-round-2" / "stage.json").stat().st_mtime_ns
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(recipe, "make_teacher", lambda teacher, *args: stand_in_for(teacher))
        recipe.quickstart(out, preset, rounds=2)
        assert (out / "sft-round-2" / "stage.json").stat().st_mtime_ns == written
        with pytest.raises(BudgetReasonerError, match="2 self-play round"):
            recipe.quickstart(out, preset, rounds=3)
        with pytest.raises(BudgetReasonerError, match="--rounds must be at least 1"):
            recipe.quickstart(out, preset, rounds=0)


def test_generate_sampler_writes_the_stages_verified_chains(two_rounds, tmp_path):
    out, _, _, _ = two_rounds
    result = invoke("generate", "--sampler", out / "sft-round-2", "--out", tmp_path / "data", "--preset", "cpu-tiny",
                    *TINY_ARGS)
    assert result.exit_code == 0, result.output
    chains = read_shards(tmp_path / "data" / "chains")
    assert chains and {row["teacher"] for row in chains} == {"sft-round-2"}
    assert [row["correct"] for row in chains] == [check("math", row["completion"], row["answer"]) for row in chains]
    assert all(row["tokens"] for row in chains)  # a local sampler counts its tokens
    summary = json.loads((tmp_path / "data" / "summary.json").read_text())
    assert summary["verified_chains"] == sum(row["correct"] for row in chains)


def test_generate_needs_exactly_one_source_and_a_stage_for_sampler(two_rounds, tmp_path):
    out, _, _, _ = two_rounds
    line = one_error_line(invoke("generate", "--out", tmp_path / "a", "--preset", "cpu-tiny", *TINY_ARGS))
    assert "--teacher MODEL or --sampler STAGE_DIR" in line
    line = one_error_line(invoke("generate", "--teacher", out / "models" / "teacher", "--sampler", out / "sft",
                                 "--out", tmp_path / "b", "--preset", "cpu-tiny", *TINY_ARGS))
    assert "one of --teacher" in line
    line = one_error_line(invoke("generate", "--sampler", out / "models" / "teacher", "--out", tmp_path / "c",
                                 "--preset", "cpu-tiny", *TINY_ARGS))
    assert "not a trained stage folder" in line
    shutil.rmtree(tmp_path, ignore_errors=True)
