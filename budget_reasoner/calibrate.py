"""The planner on a CPU: time a few steps of each kind of work quickstart does, on this machine, then scale.

A spec sheet says little about a 2-core CPU running a 1M-parameter model, where Python, tokenization and the
Trainer's own overheads weigh as much as the FLOPs. So `plan --preset cpu-tiny` measures instead, in ~1 minute,
with the real code of each stage on randomly initialized models of the preset's shapes:

- bootstrap: 11 full-parameter steps of the teacher and of the student base, and one accuracy check;
- generate / eval: one decode batch of the preset's size, forced to the length a trained model's batch runs
  (the longest worked chain it would write, which the domain knows), and the grading of one shard;
- sft / dpo / distill: the stage functions themselves for a few steps on verified-looking data of the size the
  run will have, giving a per-step time and the fixed cost of each stage (trainer set-up, tokenization, saving);
- cache: the teacher's top-k over a slice of that data.

Each stage's time is then its fixed cost plus its count of units (steps, batches, rows) times the unit's time.
The one count nobody can know beforehand is how many steps the teacher's bootstrap takes to reach its accuracy
target: it is planned at the median of the measured runs (TYPICAL_TEACHER_STEPS), and the plan says so.
"""

from __future__ import annotations

import dataclasses
import math
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from budget_reasoner.config import Preset
from budget_reasoner.domains import Domain, get_domain, problem_id
from budget_reasoner.domains.chain import format_chain, format_direct
from budget_reasoner.errors import BudgetReasonerError
from budget_reasoner.io import write_jsonl
from budget_reasoner.plan import StageTime, TimePlan, workload
from budget_reasoner.progress import say
from budget_reasoner.sampling import chat_prompt

# Steps the cpu-tiny teacher bootstrap took to reach its 97% target: 700-950 over nine runs at 1 and 2 threads
# (benchmarks/results/cpu-2core/reproduce.json), median 800.
TYPICAL_TEACHER_STEPS = 800
CALIBRATION_STEPS = 8  # per training stage: enough for a per-step time past the first step's warm-up
CALIBRATION_SCHEMA = 1  # CpuRates' fields: a cached calibration of another schema is measured again


@dataclass(frozen=True)
class CpuRates:
    """Seconds per unit of work on this machine, and the fixed cost of each stage."""

    teacher_step: float
    student_step: float
    encode_example: float  # the bootstrap tokenizes its pretraining examples once
    check: float  # one teacher accuracy check (all check problems, greedy)
    generate_batch: float  # a full batch of generate.batch_size sequences, decoded to a chain's length
    grade_chain: float
    eval_batch: dict  # role -> a full batch of eval.batch_size sequences: "chain" (students with chains, teacher), "direct"
    step: dict  # stage -> seconds per optimizer step
    fixed: dict  # stage -> seconds in the stage's record beyond its steps (train() set-up, the last save)
    untracked: dict  # stage -> seconds the stage's call takes outside its own record (loading, tokenizing)
    cache_row: float
    seconds: float  # the calibration itself

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def chain_tokens(tokenizer, problems) -> list[int]:
    """Tokens of each problem's worked chain plus the stop token: what a trained teacher (or student) writes."""
    return [len(tokenizer(format_chain(p.steps, p.answer), add_special_tokens=False)["input_ids"]) + 1
            for p in problems]


def _decode_seconds(model, tokenizer, questions: list[str], sequences: int, steps: int, instruction: str) -> float:
    """One batch of `sequences` sampled continuations forced to `steps` tokens: a trained model's batch runs until
    its longest sequence stops, an untrained one would stop anywhere."""
    texts = [tokenizer.apply_chat_template(chat_prompt(q, instruction), tokenize=False, add_generation_prompt=True)
             for q in questions]
    texts = (texts * math.ceil(sequences / len(texts)))[:sequences]
    padding_side, tokenizer.padding_side = tokenizer.padding_side, "left"
    batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    tokenizer.padding_side = padding_side
    started = time.perf_counter()
    with torch.no_grad():
        model.generate(**batch, do_sample=True, max_new_tokens=steps, min_new_tokens=steps,
                       pad_token_id=tokenizer.pad_token_id)
    return time.perf_counter() - started


def _training_rates(record: dict, wall: float, steps: int) -> tuple[float, float, float]:
    """(seconds per step, fixed seconds in the record, seconds outside it) from a calibration run of `steps`."""
    runtimes = [(entry["step"], entry["train_runtime"]) for entry in record["history"] if "train_runtime" in entry
                and "loss" in entry]
    if len(runtimes) >= 2 and runtimes[-1][0] > runtimes[0][0]:
        (first_step, first), (last_step, last) = runtimes[0], runtimes[-1]
        per_step = (last - first) / (last_step - first_step)
    else:
        per_step = record["seconds"] / steps
    return per_step, max(0.0, record["seconds"] - per_step * steps), max(0.0, wall - record["seconds"])


def calibrate(preset: Preset, domain: Domain | str = "math") -> CpuRates:
    """Time each kind of work quickstart does under `preset` (a CPU preset of the offline world) on the domain's
    problems and chains."""
    from budget_reasoner.hardware import hardware_for
    from budget_reasoner.models import build_tiny_model
    from budget_reasoner.train.distill import cache_teacher_topk, distill
    from budget_reasoner.train.dpo import dpo
    from budget_reasoner.train.pretrain import build_offline_tokenizer, teacher_examples, train_from_scratch
    from budget_reasoner.train.common import encode_prompt_completion
    from budget_reasoner.train.sft import sft
    from budget_reasoner.verify import check

    if preset.threads:
        torch.set_num_threads(preset.threads)
    began = time.perf_counter()
    gen, ev, pretrain = preset.generate, preset.eval, preset.pretrain
    hardware, domain = hardware_for(preset), get_domain(domain)
    tokenizer = build_offline_tokenizer(preset, domain)
    positions = preset.model.max_length + gen.max_new_tokens
    problems = domain.draw(max(512, gen.num_train_problems), gen.seed + 101, gen.min_steps, gen.max_steps)
    chain_length = max(chain_tokens(tokenizer, problems))
    direct_length = max(len(tokenizer(format_direct(p.answer), add_special_tokens=False)["input_ids"]) + 1
                        for p in problems)
    questions = [p.question for p in problems]
    say(f"plan: calibrating on this machine (~1 min): chains of up to {chain_length} tokens")
    with tempfile.TemporaryDirectory(prefix="budget-reasoner-calibrate-") as tmp:
        folder = Path(tmp)
        models = {}
        for role, shape in (("teacher", preset.model.tiny_teacher), ("student-base", preset.model.tiny_student)):
            models[role] = build_tiny_model(tokenizer, shape, max_positions=positions, seed=preset.seed)
            models[role].save_pretrained(folder / role)
            tokenizer.save_pretrained(folder / role)

        # bootstrap: per-step from the loop's own log (steps 1 and 11), tokenizing from a timed slice
        examples = teacher_examples(dataclasses.replace(preset, pretrain=dataclasses.replace(pretrain, num_problems=2000)), set(),
                                    domain)
        started = time.perf_counter()
        for question, completion in examples:
            encode_prompt_completion(tokenizer, [{"role": "user", "content": question}], completion)
        encode_example = (time.perf_counter() - started) / len(examples)
        per_step = {}
        for role, model in models.items():  # saved above, so the stages below start from the untrained weights
            history = train_from_scratch(model, tokenizer, examples[:256], 11, pretrain.batch_size, pretrain.learning_rate,
                                         preset.seed, f"calibrate {role}")
            per_step[role] = (history[-1]["seconds"] - history[0]["seconds"]) / (history[-1]["step"] - history[0]["step"])
        check_problems = domain.draw(pretrain.check_problems, preset.seed + 17, gen.min_steps, gen.max_steps)
        check_length = max(chain_tokens(tokenizer, check_problems))
        check_seconds = _decode_seconds(models["teacher"], tokenizer, [p.question for p in check_problems],
                                        len(check_problems), check_length, "")

        generate_batch = _decode_seconds(models["teacher"], tokenizer, questions, gen.batch_size, chain_length, gen.instruction)
        eval_batch = {"chain": _decode_seconds(models["student-base"], tokenizer, questions, ev.batch_size, chain_length,
                                               gen.instruction),
                      "teacher": _decode_seconds(models["teacher"], tokenizer, questions, ev.batch_size, chain_length,
                                                 gen.instruction),
                      "direct": _decode_seconds(models["student-base"], tokenizer, questions, ev.batch_size, direct_length,
                                                gen.instruction)}
        started = time.perf_counter()
        graded = problems[:500]
        for p in graded:
            check(domain, format_chain(p.steps, p.answer), p.answer)
        grade_chain = (time.perf_counter() - started) / len(graded)

        # the training stages themselves, on data of the size the run will have
        work = workload(preset, pass_rate=1.0, kept_per_problem=1)
        sft_rows = [{"id": problem_id(domain.name, p.question), "prompt": chat_prompt(p.question, gen.instruction),
                     "completion": [{"role": "assistant", "content": format_chain(p.steps, p.answer)}]}
                    for p in (problems * math.ceil(work.sft_examples / len(problems)))[: work.sft_examples]]
        pair_rows = [{"id": row["id"], "prompt": row["prompt"], "chosen": row["completion"],
                      "rejected": [{"role": "assistant", "content": format_chain(p.steps, p.answer + "1")}]}
                     for row, p in zip(sft_rows[:200], problems)]
        write_jsonl(folder / "sft.jsonl", sft_rows)
        write_jsonl(folder / "pairs.jsonl", pair_rows)
        write_jsonl(folder / "slice.jsonl", sft_rows[:gen.shard_size])
        short = dataclasses.replace(preset, **{stage: dataclasses.replace(getattr(preset, stage), max_steps=CALIBRATION_STEPS,
                                                                         save_steps=10 * CALIBRATION_STEPS)
                                               for stage in ("sft", "dpo", "distill")})
        step, fixed, untracked = {}, {}, {}
        runs = (("sft", lambda: sft(folder / "sft.jsonl", folder / "student-base", folder / "sft", short, hardware)),
                ("dpo", lambda: dpo(folder / "pairs.jsonl", folder / "sft", folder / "dpo", short, hardware)),
                ("cache", lambda: cache_teacher_topk(folder / "teacher", folder / "slice.jsonl", folder / "cache", short, hardware)),
                ("distill", lambda: distill(folder / "cache", folder / "dpo", folder / "distill", short, hardware)))
        cache_row = 0.0
        for stage, run in runs:
            started = time.perf_counter()
            record = run()
            wall = time.perf_counter() - started
            if stage == "cache":
                cache_row = record["seconds"] / len(sft_rows[:gen.shard_size])
                untracked[stage] = max(0.0, wall - record["seconds"])
                continue
            step[stage], fixed[stage], untracked[stage] = _training_rates(record, wall, CALIBRATION_STEPS)
    return CpuRates(teacher_step=per_step["teacher"], student_step=per_step["student-base"], encode_example=encode_example,
                    check=check_seconds, generate_batch=generate_batch, grade_chain=grade_chain, eval_batch=eval_batch,
                    step=step, fixed=fixed, untracked=untracked, cache_row=cache_row,
                    seconds=time.perf_counter() - began)


def _batches(problems: int, per_problem: int, batch: int) -> float:
    """Decode work in full-batch equivalents for `problems` answered `per_problem` times: the calibration timed a
    batch of `batch` sequences, and on the CPU a tiny model's batch costs about its size, so a part-full batch (the
    last of a shard, or one that `batch // per_problem` prompts do not fill) costs its share."""
    return problems * per_problem / batch


def plan_time_on_cpu(preset: Preset, rates: CpuRates, teacher_steps: int | None = None) -> TimePlan:
    """quickstart of `preset` on this CPU, from its calibration `rates`: each stage's fixed cost plus units x rate."""
    gen, ev, pretrain = preset.generate, preset.eval, preset.pretrain
    work = workload(preset, pass_rate=1.0, kept_per_problem=1)
    stages = []
    if preset.model.teacher == "tiny-teacher" or preset.model.student == "tiny-student":
        targeted = pretrain.teacher_target_accuracy > 0
        steps = teacher_steps or (min(TYPICAL_TEACHER_STEPS, pretrain.teacher_steps) if targeted else pretrain.teacher_steps)
        checks = steps // pretrain.check_every if targeted else 0
        seconds = (steps * rates.teacher_step + checks * rates.check + pretrain.student_steps * rates.student_step
                   + 2 * pretrain.num_problems * rates.encode_example)
        how = (f"teacher {steps} steps{' (the median that reaches its accuracy target)' if targeted else ''} + "
               f"{checks} checks, student {pretrain.student_steps} steps")
        stages.append(StageTime("bootstrap", 0, seconds, how))
    chain_batches = _batches(work.train_problems, gen.samples_per_problem, gen.batch_size)
    stages.append(StageTime("generate", int(work.chains * work.chain_tokens),
                            chain_batches * rates.generate_batch + work.chains * rates.grade_chain,
                            f"{chain_batches:.1f} batches of {gen.batch_size} chains, decoded to the longest chain"))
    for stage in ("sft", "dpo", "distill"):
        settings = getattr(preset, stage)
        if stage == "distill":
            stages.append(StageTime("cache", 0, work.sft_examples * rates.cache_row,
                                    f"teacher top-k over {work.sft_examples:,} verified chains"))
        stages.append(StageTime(stage, 0, rates.fixed[stage] + settings.max_steps * rates.step[stage],
                                f"{settings.max_steps} steps x {rates.step[stage] * 1000:.0f} ms + "
                                f"{rates.fixed[stage]:.1f} s set-up"))
    per_model = 1 + (ev.maj_k if ev.maj_k > 1 else 0)
    greedy = _batches(work.eval_problems, 1, ev.batch_size)
    sampled = _batches(work.eval_problems, ev.maj_k, ev.batch_size) if ev.maj_k > 1 else 0.0
    decode = greedy + sampled
    seconds = decode * (rates.eval_batch["teacher"] + rates.eval_batch["direct"] + 3 * rates.eval_batch["chain"])
    seconds += work.eval_models * work.eval_problems * per_model * rates.grade_chain
    stages.append(StageTime("eval", 0, seconds, f"{work.eval_models} models x {decode:.1f} batches of {ev.batch_size}"))
    other = sum(rates.untracked.values())
    stages.append(StageTime("other", 0, other, "model loads, trainer set-up and tokenizing, outside the stages' records"))
    return TimePlan(preset.name, "this CPU", f"calibrated on this machine in {rates.seconds:.0f} s", tuple(stages))


# ---- One entry point for the CLI's `plan` and quickstart's `--max-hours` -------------------------------------

def calibration_path(preset: Preset, domain: Domain | str = "math") -> Path:
    """Where this machine's calibration of `preset` is kept: per preset content, domain, CPU count and torch version."""
    import os

    from budget_reasoner.io import digest

    from budget_reasoner import __version__

    cache = Path(os.environ.get("BUDGET_REASONER_CACHE", Path.home() / ".cache" / "budget_reasoner"))
    # the rates depend on shapes, lengths and batch sizes, not on how many steps or evaluated problems: a preset with
    # other counts (a --set, or --max-hours' replanning) reuses them. The training problems stay in the key: the
    # calibration's SFT set has the run's size (its tokenizing is timed) and its chains set the decode length.
    counts = {"generate.num_seed_problems": 0, "generate.num_eval_problems": 0, "eval.benchmark_problems": 0,
              "eval.maj_k": 0, "pretrain.teacher_steps": 1, "pretrain.student_steps": 1}
    counts |= {f"{stage}.{name}": 1 for stage in ("sft", "dpo", "distill", "grpo") for name in ("max_steps", "save_steps")}
    settings = load_preset_with(preset, counts).to_dict()
    # per-domain entries are applied (for_domain) before a run is planned; the entries of other domains, or what a
    # --set took out of them, change nothing this calibration measures
    settings.pop("domains", None)
    key = digest({"preset": settings, "cpus": os.cpu_count(), "torch": torch.__version__,
                  "budget_reasoner": __version__, "rates": CALIBRATION_SCHEMA}
                 | ({} if get_domain(domain).name == "math" else {"domain": get_domain(domain).settings()}))
    return cache / "calibration" / f"{preset.name}-{key[:16]}.json"


def cpu_rates(preset: Preset, recalibrate: bool = False, measure: bool = True, domain: Domain | str = "math") -> CpuRates | None:
    """This machine's calibration of `preset`: read from its cache file, else measured (and cached), or None when
    `measure` is off and nothing is cached."""
    import json

    from budget_reasoner.io import write_json

    path = calibration_path(preset, domain)
    if path.is_file() and not recalibrate:
        try:
            return CpuRates(**json.loads(path.read_text()))
        except (ValueError, TypeError):  # cut short, or another version's fields: measure again
            pass
    if not measure:
        return None
    rates = calibrate(preset, domain)
    write_json(path, rates.to_dict())
    return rates


def plan_quickstart(preset: Preset, gpu: str | None = None, vram_gib: float | None = None, teacher: str | None = None,
                    gpu_hour_price: float | None = None, token_price: tuple[float, float] | None = None,
                    recalibrate: bool = False, measure: bool = True, gpus: int = 1, replicas: int = 0,
                    domain: Domain | str = "math") -> TimePlan | None:
    """The time (and cost) plan of quickstart under `preset`: on a named card (`gpu`, or the table's card nearest
    `vram_gib`, or the CUDA card here) from the analytic model; on the CPU, from this machine's calibration
    (None if `measure` is off and none is cached). `gpus`, `replicas`: data-parallel training cards and vLLM
    teacher replicas (plan.plan_time_on_card); GPU plans only."""
    from budget_reasoner.hardware import card, card_for_preset, nearest_card
    from budget_reasoner.plan import plan_time_on_card

    if gpu or vram_gib or (preset.device != "cpu" and preset.vram_gb > 0):
        if gpu:
            chosen = card(gpu)
        elif vram_gib:
            chosen = nearest_card(vram_gib)
        elif torch.cuda.is_available():
            chosen = nearest_card(torch.cuda.get_device_properties(0).total_memory / 2**30,
                                  torch.cuda.get_device_properties(0).name)
        else:
            chosen = card_for_preset(preset)
        return plan_time_on_card(preset, chosen, teacher=teacher, gpu_hour_price=gpu_hour_price, token_price=token_price,
                                 gpus=gpus, replicas=replicas)
    if gpus > 1 or replicas:
        raise BudgetReasonerError(f"--gpus and --replicas plan GPU cards, and preset {preset.name} plans this CPU; add "
                                  f"--gpu NAME (e.g. --gpu a100-80gb) or pick a GPU preset")
    rates = cpu_rates(preset, recalibrate, measure, domain)
    return None if rates is None else plan_time_on_cpu(preset, rates)


# Where quickstart leaves each stage's completion record in a run folder (a resumed run skips those stages)
COMPLETE_RECORDS = {"bootstrap": "models/COMPLETE.json", "generate": "data/COMPLETE.json", "sft": "sft/stage.json",
                    "dpo": "dpo/stage.json", "cache": "distill/cache/COMPLETE.json", "distill": "distill/stage.json"}


def still_to_run(plan: TimePlan, out: Path) -> TimePlan:
    """`plan` without the stages a (resumed) run folder has already completed."""
    done = {stage for stage, record in COMPLETE_RECORDS.items() if (Path(out) / record).is_file()}
    if not done:
        return plan
    kept = tuple(stage for stage in plan.stages if stage.stage not in done)
    return dataclasses.replace(plan, stages=kept, source=f"{plan.source}; {', '.join(sorted(done))} already done in {out}")


# What quickstart can turn down when a plan is over budget: the settings each stage's time scales with
# (none for the bootstrap: its teacher trains to an accuracy target, and fewer steps leave it unable to teach)
KNOBS = {"bootstrap": (), "generate": ("generate.num_train_problems", "generate.num_seed_problems"),
         "cache": ("generate.num_train_problems", "generate.num_seed_problems"), "sft": ("sft.max_steps",),
         "dpo": ("dpo.max_steps",), "distill": ("distill.max_steps",),
         "eval": ("generate.num_eval_problems", "eval.benchmark_problems")}


def over_budget(plan: TimePlan, preset: Preset, max_hours: float, replan) -> str | None:
    """None when `plan` fits `max_hours`; else one line: the total, the stage that dominates, and the settings (with
    values, checked by replanning with `replan(preset) -> TimePlan`) that bring the run under, all else unchanged."""
    from budget_reasoner.plan import format_duration

    budget = max_hours * 3600
    if plan.total_seconds <= budget:
        return None
    top = plan.dominant()
    line = (f"the plan for preset {preset.name} takes {format_duration(plan.total_seconds)}, over --max-hours {max_hours:g}: "
            f"{top.stage} dominates ({format_duration(top.seconds)})")
    knobs = [knob for knob in KNOBS.get(top.stage, ()) if _setting(preset, knob) > 0]
    if top.stage == "generate" and not preset.generate.seed_sets:
        knobs = knobs[:1]
    if not knobs:
        return line + f"; {top.stage} has no setting that shortens it safely: choose a smaller preset or a larger budget"
    if plan.total_seconds - top.seconds >= budget:
        return line + f"; cutting {top.stage} alone cannot bring it under: choose a smaller preset or a larger budget"
    factor = (budget - (plan.total_seconds - top.seconds)) / top.seconds
    for _ in range(20):  # batches and shards round up: shrink until the replanned run fits
        values = {knob: max(1, int(_setting(preset, knob) * factor)) for knob in knobs}
        if replan(load_preset_with(preset, values)).total_seconds <= budget:
            settings = " ".join(f"--set {knob}={value}" for knob, value in values.items())
            return f"{line}; {settings} would bring it under"
        factor *= 0.9
    return line + f"; cutting {top.stage} alone cannot bring it under: choose a smaller preset or a larger budget"


def _setting(preset: Preset, knob: str):
    section, name = knob.split(".")
    value = getattr(getattr(preset, section), name)
    if knob == "generate.num_seed_problems" and value == 0:  # 0 takes every seed problem: count them
        from budget_reasoner.plan import seed_problem_count

        return seed_problem_count(preset)
    if knob == "eval.benchmark_problems" and value == 0:
        from budget_reasoner.plan import benchmark_problem_counts

        return sum(benchmark_problem_counts(preset))
    return value


def load_preset_with(preset: Preset, values: dict) -> Preset:
    """`preset` with dotted settings replaced (a copy)."""
    sections = {}
    for knob, value in values.items():
        section, name = knob.split(".")
        sections.setdefault(section, {})[name] = value
    return dataclasses.replace(preset, **{section: dataclasses.replace(getattr(preset, section), **fields)
                                          for section, fields in sections.items()})
