"""quickstart: every stage in order into one run folder; finished stages are skipped, interrupted ones resume.

    OUT/run.json            the preset this folder belongs to (another preset's run is refused)
    OUT/models/             offline only: the tiny teacher and student base, trained from scratch
    OUT/data/               generate: problems, teacher chains, the SFT set, preference pairs
    OUT/sft/ dpo/ distill/  one LoRA adapter over the student base each (distill/cache: teacher top-k)
    OUT/selfplay-R/         --rounds N, round R > 1: the previous round's student's chains on the training problems
                            (a generate folder), and merged/ the SFT set of the teacher's and its verified chains
    OUT/sft-round-R/        SFT continued from the previous round's adapter on that set; dpo starts from the last
    OUT/eval/NAME/          held-out accuracy of base, teacher, sft, dpo, distill
    OUT/report.{md,json,png}
    OUT/MODEL_CARD.md       the model card (model_card.py): results per stage, how to prompt it, licences
"""

from __future__ import annotations

import functools
import random
import shutil
import time
from pathlib import Path

import torch

from budget_reasoner.calibrate import over_budget, plan_quickstart, still_to_run
from budget_reasoner.config import Preset, for_domain
from budget_reasoner.domains import Domain, get_domain, recorded, with_instruction, with_tools
from budget_reasoner.errors import BudgetReasonerError
from budget_reasoner.eval.run import evaluate, load_for_inference
from budget_reasoner.generate import generate
from budget_reasoner.generate.pipeline import merge_chains, problem_settings, write_problems
from budget_reasoner.generate.teachers import OpenAITeacher, TransformersTeacher, is_server_teacher
from budget_reasoner.hardware import Hardware, hardware_for
from budget_reasoner.io import (COMPLETE, LOCK, claim_stage, digest, mark_complete, read_json, settings_of, write_json,
                                write_jsonl, writes_folder)
from budget_reasoner.model_card import write_run_card
from budget_reasoner.problems import PROBLEM_COLUMNS, benchmark_domain, load_benchmark, parse_problem_source
from budget_reasoner.progress import quiet_libraries, say
from budget_reasoner.report import log_to_wandb, round_of, self_play_rounds, write_report
from budget_reasoner.sampling.server import redact
from budget_reasoner.train.distill import cache_teacher_topk, distill
from budget_reasoner.train.dpo import dpo
from budget_reasoner.train.grpo import grpo
from budget_reasoner.train.opd import opd
from budget_reasoner.train.pretrain import bootstrap
from budget_reasoner.train.sft import sft

STAGES = ("bootstrap", "generate", "sft", "dpo", "distill")
RL_STAGES = ("none", "grpo", "opd")  # quickstart --rl: what runs after distill


def preset_fingerprint(preset: Preset) -> str:
    """The whole preset's digest; each stage's fingerprint.json hashes its own sections with the same io.digest,
    so a run folder whose run.json matches holds stages whose settings match."""
    return digest(preset.to_dict())


def claim_run_folder(out: Path, preset: Preset, domain: str, overwrite: bool = False, rounds: int | None = None) -> None:
    """Write run.json, or check that an existing run folder was made by the same preset and domain (and, once a
    quickstart recorded them, the same self-play `rounds`: dpo and what follows it train from the last round).

    With `overwrite`, a folder of another run (or of no run) is emptied first: deleted, not moved aside, and only
    once this process holds its lock (quickstart's caller took it), so a refused run deletes nothing."""
    preset = for_domain(preset, get_domain(domain, grading_only=True).name)  # as the run uses it
    record = {"preset": preset.name, "domain": recorded(domain), "fingerprint": preset_fingerprint(preset)}
    path = out / "run.json"
    if path.exists() and not overwrite:
        existing = read_json(path)
        if existing.get("fingerprint") != record["fingerprint"] or existing.get("domain") != record["domain"]:
            raise BudgetReasonerError(
                f"{out} holds a run of preset {existing.get('preset')!r} (domain {existing.get('domain')!r}) with other "
                f"settings; pass a new --out folder, or --overwrite to delete it and start over"
            )
        if rounds is not None and existing.get("rounds", rounds) != rounds:
            raise BudgetReasonerError(f"{out} holds a run of {existing['rounds']} self-play round(s) (--rounds); pass "
                                      f"--rounds {existing['rounds']} to resume it, or a new --out folder")
        if rounds is not None and "rounds" not in existing:
            write_json(path, {**existing, "rounds": rounds})
        return
    if out.exists() and any(path.name != LOCK for path in out.iterdir()):
        if not overwrite:
            raise BudgetReasonerError(f"{out} is not empty and holds no run.json; pass a new --out folder, or "
                                      f"--overwrite to delete its contents and start over")
        path.unlink(missing_ok=True)  # first: a delete cut short leaves no run.json, so it is refused, not resumed
        for entry in out.iterdir():
            if entry.name != LOCK:
                shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
        say(f"quickstart: --overwrite: deleted the previous contents of {out}")
    write_json(path, record | ({"rounds": rounds} if rounds is not None else {}))


def model_paths(out: Path, preset: Preset) -> tuple[str, str, str | None]:
    """(student base, chain teacher, scoring teacher or None): offline names resolve into OUT/models, anything
    else is a hub id, a path or an openai: server."""
    def resolve(name: str | None) -> str | None:
        offline = {"tiny-student": "student-base", "tiny-teacher": "teacher"}
        return str(out / "models" / offline[name]) if name in offline else name

    return resolve(preset.model.student), resolve(preset.chain_teacher), resolve(preset.scoring_teacher)


def needs_bootstrap(preset: Preset) -> bool:
    return "tiny-student" == preset.model.student or "tiny-teacher" in (preset.chain_teacher, preset.scoring_teacher)


@writes_folder("out")
def run_bootstrap(out: Path, preset: Preset, domain: Domain | str = "math") -> dict:
    """The offline world's tiny teacher and student base, trained on the domain's problems and steps."""
    preset = for_domain(preset, get_domain(domain, grading_only=True).name)  # the preset's settings for this domain
    models_dir = out / "models"
    settings = {**settings_of(preset, "seed", "pretrain", "model.tiny_student", "model.tiny_teacher", "model.max_length",
                              "generate.max_new_tokens"), "problems": problem_settings(preset, domain)}
    if (record := claim_stage(models_dir, "bootstrap", {}, settings, record=COMPLETE)) is not None:
        return record
    _, held_out = write_problems(out / "data" / "problems", preset, domain)
    started = time.time()
    log = bootstrap(preset, models_dir, {row["question"] for row in held_out}, domain=domain)
    summary = {role: {key: info[key] for key in ("parameters", "seconds", "loss", "steps", "check_accuracy") if key in info}
               for role, info in log.items()}
    summary["seconds"] = time.time() - started
    mark_complete(models_dir, summary)
    return summary


def make_teacher(teacher: str, preset: Preset, hardware: Hardware):
    if is_server_teacher(teacher):
        gen = preset.generate
        return OpenAITeacher(teacher.removeprefix("openai:"), timeout=gen.request_timeout, concurrency=gen.concurrency,
                             max_retries=gen.max_retries)
    return LocalTeacher(teacher, preset, hardware)


def make_sampler(stage: str | Path, preset: Preset, hardware: Hardware):
    """A trained student stage (base + its LoRA adapter, loaded as eval loads it) sampling chains in the teacher's
    place (self-play, `generate --sampler`); its chains' `teacher` column names the stage folder."""
    stage = Path(stage)
    if not (stage / "stage.json").is_file():
        raise BudgetReasonerError(f"--sampler {stage}: not a trained stage folder (no stage.json); pass the folder of an "
                                  f"sft, dpo, distill or grpo stage, or a plain model with --teacher")
    return LocalTeacher(stage, preset, hardware)


class LocalTeacher:
    """A local teacher model (or a student stage folder) that loads on its first sample: a generate refused
    (another run's folder) or already complete never loads it. `source` is the model, so its content is part of
    the generate folder's fingerprint."""

    def __init__(self, path: str | Path, preset: Preset, hardware: Hardware):
        self.source, self.name, self.device = str(path), redact(Path(path).name), hardware.device
        self._preset, self._hardware, self._teacher = preset, hardware, None

    def sample(self, *args, **kwargs):
        return self._loaded().sample(*args, **kwargs)

    def sample_with_tools(self, *args, **kwargs):
        return self._loaded().sample_with_tools(*args, **kwargs)

    def _loaded(self) -> TransformersTeacher:
        if self._teacher is None:
            model, tokenizer = load_for_inference(self.source, self._preset, self._hardware)
            self._teacher = TransformersTeacher(model, tokenizer, self.name, self._preset.generate.batch_size)
            self.device = self._teacher.device
        return self._teacher


@writes_folder("out")
def quickstart(out: Path, preset: Preset, domain: Domain | str = "math", report_to: str = "none",
               gpu_hour_price: float | None = None, overwrite: bool = False, max_hours: float | None = None,
               rl: str = "none", rounds: int = 1) -> dict:
    """Run the whole recipe into `out` and write the report. Returns the report as a dict.

    Each training stage records its wall time, device, tokens and peak memory; with `gpu_hour_price`
    (dollars per GPU-hour) the report prices every stage and the whole run.

    `rl="grpo"` adds GRPO (train/grpo.py) on the training problems after the last stage, with its own eval row;
    `rl="opd"` adds on-policy distillation (train/opd.py) there instead: the scoring teacher scores the student's samples.

    `rounds` > 1 adds self-play rounds (expert iteration) after sft: round R samples the round R-1 student's
    chains on the training problems, keeps the verified ones beside the teacher's (generate.merge_chains states
    the rule) and continues SFT from the previous adapter into OUT/sft-round-R; dpo then starts from the last.

    The time plan (calibrate.py) is said first: on a GPU preset always; on the CPU when this machine's calibration
    is cached or `max_hours` asks for one. A plan over `max_hours` stops here, before anything loads or is written."""
    out = Path(out)
    domain = get_domain(domain)  # a name, a .py file, or a Domain built with --problems/--verifier (domains/)
    preset = for_domain(preset, domain.name)  # the preset's settings for this domain (its `domains:` entry)
    if needs_bootstrap(preset):
        domain.require_offline()  # a domain without an offline world (choice) is refused before anything runs
    preset = with_tools(with_instruction(preset, domain), domain)  # bignum's chains call tools: generate and eval run them
    if rl not in RL_STAGES:
        raise BudgetReasonerError(f"--rl must be one of {', '.join(RL_STAGES)}, got {rl!r}")
    if rounds < 1:
        raise BudgetReasonerError(f"--rounds must be at least 1 (1: the teacher's chains alone), got {rounds}")
    plan = plan_quickstart(preset, gpu_hour_price=gpu_hour_price, measure=max_hours is not None, domain=domain)
    if plan is not None:
        plan = still_to_run(plan, out)
        say(plan.table())

        def replan(changed: Preset):
            return still_to_run(plan_quickstart(changed, gpu_hour_price=gpu_hour_price, measure=True, domain=domain), out)

        if max_hours is not None and (verdict := over_budget(plan, preset, max_hours, replan)):
            raise BudgetReasonerError(verdict)
    claim_run_folder(out, preset, domain, overwrite, rounds)
    quiet_libraries()
    if preset.threads:
        torch.set_num_threads(preset.threads)
    hardware = hardware_for(preset)
    say(f"budget-reasoner quickstart: preset {preset.name} on {hardware.describe()} -> {out}")
    student, teacher, scorer = model_paths(out, preset)
    held_out = out / "data" / "problems" / "held_out.jsonl"
    results: dict = {"preset": preset.name, "domain": domain.name, "hardware": hardware.describe(), "stages": {}}
    if needs_bootstrap(preset):
        results["bootstrap"] = run_bootstrap(out, preset, domain)
    write_problems(out / "data" / "problems", preset, domain)

    benchmarks = {spec: benchmark_problems_file(out, spec, preset) for spec in preset.eval.benchmarks}
    results["benchmarks"] = {spec: {} for spec in benchmarks}

    def held_out_eval(name: str, model: str | Path) -> dict:
        load = functools.cache(lambda: load_for_inference(model, preset, hardware))  # one load for all its evals
        for spec, problems in benchmarks.items():  # the same model on each benchmark named by the preset
            # graded by the benchmark's own verifier (gsm8k: math, mbpp: code, choice: the letter), not the run's
            grader = benchmark_domain(parse_problem_source(spec)[0])
            summary = evaluate(model, problems, out / "eval" / f"{problems.stem}-{name}", preset, grader, hardware,
                               name=f"{name} {problems.stem}", load=load)
            results["benchmarks"][spec][name] = {key: summary[key] for key in summary
                                                 if key in ("accuracy", "problems") or key.startswith("maj@")}
        return evaluate(model, held_out, out / "eval" / name, preset, domain, hardware, name=name, load=load)

    results["teacher"] = held_out_eval("teacher", teacher) if not is_server_teacher(teacher) else {}
    results["stages"]["base"] = {**held_out_eval("base", student)}
    # a complete data folder is verified and skipped; a local teacher loads only if chains remain to be sampled
    results["generate"] = generate(out / "data", preset, make_teacher(teacher, preset, hardware), domain)
    sft_rounds = [("sft", lambda: sft(out / "data" / "sft" / "train.jsonl", student, out / "sft", preset, hardware, report_to))]
    for round_ in range(2, rounds + 1):  # self-play: each round from the one before it
        sft_rounds.append((f"sft-round-{round_}", functools.partial(self_play_round, out, round_, out / sft_rounds[-1][0],
                                                                    preset, hardware, domain, report_to)))
    stage_runs = [
        *sft_rounds,
        ("dpo", lambda: dpo(out / "data" / "pairs" / "train.jsonl", out / sft_rounds[-1][0], out / "dpo", preset, hardware,
                            report_to)),
        ("distill", lambda: distill_with_cache(out, scorer, student, preset, hardware, report_to)),
    ]
    if scorer is None:
        stage_runs.pop()
        say("distill: skipped, the chain teacher is a server and no distill.teacher can score its chains (a local "
            "checkpoint of the same tokenizer, streamed a layer at a time if it is bigger than the card, or a vLLM "
            "server with prompt log-probs); its chains already taught the student sequence-level through sft")
    if rl == "grpo":  # RL after the recipe: from the last stage, on the same training problems
        start = out / stage_runs[-1][0]
        stage_runs.append(("grpo", lambda: grpo(out / "data" / "problems" / "train.jsonl", start, out / "grpo", preset,
                                                domain, hardware, report_to)))
    if rl == "opd":  # on-policy distillation after the recipe: the last stage samples, the scoring teacher scores
        if scorer is None:
            raise BudgetReasonerError("--rl opd: the teacher must score the student's tokens here (a local checkpoint of "
                                      "the same tokenizer); set distill.teacher, or use --rl grpo")
        opd_start = out / stage_runs[-1][0]
        stage_runs.append(("opd", lambda: opd(out / "data" / "problems" / "train.jsonl", opd_start, scorer, out / "opd",
                                              preset, getattr(domain, "name", domain), hardware, report_to)))
    for name, run_stage in stage_runs:
        record = run_stage()
        results["stages"][name] = {
            **held_out_eval(name, out / name), "train_seconds": record["seconds"], "loss": _losses(record["history"]),
            "device": record.get("device", hardware.describe()), "tokens": record.get("tokens"),
            "peak_memory_gb": record["peak_memory_bytes"] / 2**30 if record.get("peak_memory_bytes") else None,
        }
    results["compute"] = compute_per_stage(out, results, gpu_hour_price)
    results["seconds"] = sum(row["seconds"] for row in results["compute"])
    if gpu_hour_price is not None:
        for stage in results["stages"].values():
            if "train_seconds" in stage:
                stage["cost_usd"] = stage["train_seconds"] / 3600 * gpu_hour_price
        results["gpu_hour_price"] = gpu_hour_price
        results["cost_usd"] = results["seconds"] / 3600 * gpu_hour_price
    write_report(out, results)
    write_run_card(out, preset)  # MODEL_CARD.md: the run's model, its results, how to prompt it, its licences
    if report_to == "wandb":
        log_to_wandb(results)
    return results


def self_play_round(out: Path, round_: int, previous: Path, preset: Preset, hardware: Hardware, domain,
                    report_to: str) -> dict:
    """Self-play round `round_`: the `previous` stage samples chains on the run's training problems as the teacher
    did (OUT/selfplay-R, a generate folder: same problems, samples, temperature, verifier), its verified chains join
    the teacher's (OUT/selfplay-R/merged), and SFT continues `previous`'s adapter on them (OUT/sft-round-R).
    Each of the three is a stage that a rerun skips when complete and resumes when interrupted."""
    sampled = out / f"selfplay-{round_}"
    generate(sampled, preset, make_sampler(previous, preset, hardware), domain, allow_none_verified=True)
    merged = merge_chains(sampled / "merged", [out / "data", sampled], preset.generate.instruction)
    say(f"self-play round {round_}: {merged['sft_examples']} SFT examples ({merged['examples_alone'][0]} from the "
        f"teacher's chains, {merged['examples_alone'][1]} from {previous.name}'s alone)")
    return sft(sampled / "merged" / "train.jsonl", previous, out / f"sft-round-{round_}", preset, hardware, report_to)


def benchmark_problems_file(out: Path, spec: str, preset: Preset) -> Path:
    """A benchmark's problems as a problems file in the run (a seeded sample of `eval.benchmark_problems`)."""
    name, where = parse_problem_source(spec)
    path = out / "data" / "benchmarks" / f"{name}.jsonl"
    # a folder of its own fingerprint inside data/, so generate's claim on data/ counts it as another stage's
    claim_stage(path.parent, "benchmarks", {}, settings_of(preset, "seed", "eval.benchmarks", "eval.benchmark_problems"))
    if not path.exists():
        rows = [{key: row[key] for key in PROBLEM_COLUMNS} for row in load_benchmark(name, where)]
        if 0 < preset.eval.benchmark_problems < len(rows):
            rows = random.Random(preset.seed).sample(rows, preset.eval.benchmark_problems)
        write_jsonl(path, rows)
    return path


def distill_with_cache(out: Path, teacher: str, student: str, preset: Preset, hardware: Hardware, report_to: str) -> dict:
    """Cache the scoring teacher's top-k over the verified chains, then distill the dpo student against it. A
    server teacher (openai:MODEL) is sent token ids made with the student's tokenizer, which it must share."""
    cache = out / "distill" / "cache"
    cache_teacher_topk(teacher, out / "data" / "sft" / "train.jsonl", cache, preset, hardware,
                       stream_layers=preset.distill.stream_layers, tokenizer_source=student)
    return distill(cache, out / "dpo", out / "distill", preset, hardware, report_to)


def _losses(history: list[dict]) -> list[dict]:
    return [{"step": entry["step"], "loss": entry["loss"]} for entry in history if "loss" in entry]


def compute_per_stage(out: Path, results: dict, gpu_hour_price: float | None = None) -> list[dict]:
    """What every stage of the run spent, across all its sessions' records: wall seconds, tokens processed
    (generated, or trained on), peak memory and device; priced when `gpu_hour_price` is given."""
    def row(stage: str, record: dict, seconds_key: str = "seconds") -> dict:
        peak = record.get("peak_memory_bytes")
        return {"stage": stage, "seconds": record.get(seconds_key) or 0.0, "tokens": record.get("tokens"),
                "peak_memory_gb": peak / 2**30 if peak else None, "device": record.get("device")}

    rows = [row("bootstrap", results["bootstrap"])] if "bootstrap" in results else []
    rows.append(row("generate", results["generate"]))
    cache = out / "distill" / "cache" / "COMPLETE.json"
    for name in ("sft", "dpo", "distill", "grpo", "opd"):
        if name == "distill" and cache.exists():
            rows.append(row("teacher top-k cache", read_json(cache)))
        if name in results["stages"]:
            rows.append(row(name, results["stages"][name], "train_seconds")
                        | {"peak_memory_gb": results["stages"][name].get("peak_memory_gb")})
        for stage in self_play_rounds(results["stages"]) if name == "sft" else ():  # each: the sampling, then its SFT
            rows.append(row(f"self-play sampling ({stage})", read_json(out / f"selfplay-{round_of(stage)}" / COMPLETE)))
            rows.append(row(stage, results["stages"][stage], "train_seconds")
                        | {"peak_memory_gb": results["stages"][stage].get("peak_memory_gb")})
    evals = [read_json(path) for path in sorted((out / "eval").glob("*/summary.json"))]
    if evals:
        rows.append({"stage": f"eval ({len(evals)} runs)", "seconds": sum(e["seconds"] for e in evals),
                     "tokens": sum(e.get("tokens") or 0 for e in evals) or None,
                     "peak_memory_gb": max((e.get("peak_memory_bytes") or 0) for e in evals) / 2**30 or None,
                     "device": evals[-1].get("device")})
    if gpu_hour_price is not None:
        for entry in rows:
            entry["cost_usd"] = entry["seconds"] / 3600 * gpu_hour_price
    return rows
