"""`budget-reasoner`: a thin typer shell over the Python API. Each command loads a preset and calls one function."""

from __future__ import annotations

import contextlib
import functools
import signal
from pathlib import Path
from typing import Optional

import typer
import yaml

from budget_reasoner.errors import BudgetReasonerError
from budget_reasoner.io import NO_SPACE, disk_full_message, free_bytes, run_lock

app = typer.Typer(
    help="Turn a small open model into a narrow-domain reasoner on one GPU (or the CPU): "
    "generate verified chains, SFT, DPO, distill, eval.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
presets_app = typer.Typer(help="List and show the presets in presets/.", no_args_is_help=True)
app.add_typer(presets_app, name="presets")

PRESET_HELP = "Preset name (see `budget-reasoner presets list`) or a .yaml file; 'auto' picks one for this machine."
SET_HELP = "Override a preset value, e.g. --set sft.max_steps=50 (repeatable)."
REPORT_HELP = "Where to log training: 'none' or 'wandb' (honours WANDB_MODE=offline)."
DOMAIN_HELP = ("The narrow domain: math, logic, choice (GPQA-style multiple choice, from --problems FILE.csv), code "
               "(functions passing unit tests, from --problems FILE in MBPP's or HumanEval's layout), or the path of a "
               ".py file that defines one (its interface: budget_reasoner/domains/__init__.py).")
PROBLEMS_FILE_HELP = ("Your own problems instead of the domain's: a .jsonl, .csv or .parquet file with question and "
                      "answer columns (see --columns); a seeded held-out split is set aside and never trained on.")
COLUMNS_HELP = "Your file's column names, e.g. question=prompt,answer=solution (default: question, answer)."
VERIFIER_HELP = ("Grade with this verifier instead of the domain's: math, numeric, exact, choice, logic, code, or "
                 "regex:PATTERN (the answer is the pattern's last match, its first group if it has one).")
TOOLS_HELP = ("Chains that call tools: each ```python block a chain writes runs in the code sandbox as it is written, "
              "its output appended in an ```output block before the chain goes on (limits: --set tools.max_calls, "
              "tools.timeout_s, tools.output_bytes). Local models only.")
OVERWRITE_HELP = ("Delete what --out holds and start over. Without it, a rerun resumes only a folder made from the same "
                  "inputs and settings (its fingerprint.json), and refuses any other in one line.")


LOW_SPACE = 64 * 2**20  # bytes free under which a failed write is taken to be the full disk's doing


def friendly_errors(command):
    """Bad input ends in one line, not a traceback; Ctrl-C and a full disk say what was kept.

    A command with an --out folder holds its lock (io.run_lock) from the start, before any model loads: a
    second writer of the same run, or an --out that is a file, is refused in one line straight away."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        out = kwargs.get("out")
        try:
            with run_lock(out) if out is not None else contextlib.nullcontext(), _rank_zero_prints():
                return command(*args, **kwargs)
        except BudgetReasonerError as error:
            typer.echo(f"error: {error}", err=True)
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            typer.echo("interrupted: finished shards and checkpoints are kept; run the same command again to resume", err=True)
            raise typer.Exit(130) from None
        except Exception as error:
            from budget_reasoner.distributed import lost_a_peer

            if (line := lost_a_peer(error)) is not None:  # another rank died: not this one's bug
                signal.signal(signal.SIGTERM, signal.SIG_IGN)  # the launcher's SIGTERM follows: the line is said
                typer.echo(f"error: {line}", err=True)
                raise typer.Exit(2) from None
            if not disk_is_full(error, out):
                raise  # a bug: keep its traceback
            detail = str(error).splitlines()[0] if str(error) else type(error).__name__
            typer.echo(f"error: {disk_full_message(out or getattr(error, 'filename', None) or 'the output folder')} "
                       f"({detail})", err=True)
            raise typer.Exit(2) from None

    return wrapper


def _rank_zero_prints():
    """Under torchrun / accelerate launch, only rank 0's results reach stdout (one line per run, not per rank);
    errors (stderr) are every rank's own, and the launcher stopping a rank is one of them."""
    import os

    from budget_reasoner.distributed import is_main_process, stop_with_the_launcher

    stop_with_the_launcher()
    if is_main_process():
        return contextlib.nullcontext()
    return contextlib.redirect_stdout(open(os.devnull, "w"))  # noqa: SIM115 - closed with the process


def disk_is_full(error: Exception, out: Path | None) -> bool:
    """ENOSPC/EDQUOT, or any failure while the disk holding --out is (nearly) full: torch.save and safetensors
    report a failed write as a RuntimeError without the errno."""
    if isinstance(error, OSError) and error.errno in NO_SPACE:
        return True
    free = free_bytes(out) if out is not None else None
    return free is not None and free < LOW_SPACE


def _preset(name: str, overrides: list[str] | None, options: dict | None = None, runs_models: bool = True):
    """The preset with its --set overrides and a command's own options (dotted keys), all checked by config.py's rules.

    For a command that runs models, the backend is settled here, before the command imports its stage module:
    those import transformers, TRL and peft at their top, and Unsloth must come first (hardware.prepare_backend).
    This module imports none of them at its own top for the same reason; imports stay inside the commands."""
    from budget_reasoner.config import load_preset, parse_overrides

    parsed = {**parse_overrides(overrides), **{key: value for key, value in (options or {}).items() if value is not None}}
    if name == "auto":
        from budget_reasoner.hardware import detect
        from budget_reasoner.memory import recommend_preset

        name, _ = recommend_preset(detect())
    preset = load_preset(name, parsed)
    if runs_models:
        from budget_reasoner.hardware import prepare_backend
        from budget_reasoner.progress import quiet_libraries

        prepare_backend(preset)
        quiet_libraries()  # it imports transformers: after Unsloth
    return preset


def _domain(spec: str, problems: Path | None = None, columns: str | None = None, verifier: str | None = None,
            grading_only: bool = False):
    """The domain (budget_reasoner.domains) a command runs on, with --problems/--columns and --verifier applied."""
    from budget_reasoner.domains import ProblemFile, get_domain
    from budget_reasoner.problems import parse_columns

    if columns and problems is None:
        raise BudgetReasonerError("--columns names the columns of a --problems file; pass --problems FILE too")
    source = ProblemFile(problems, parse_columns(columns)) if problems is not None else None
    return get_domain(spec, source, verifier, grading_only=grading_only)


def _report_to(value: str) -> str:
    import importlib.util

    if value not in ("none", "wandb"):
        raise BudgetReasonerError(f"--report-to must be 'none' or 'wandb', got {value!r}")
    if value == "wandb" and importlib.util.find_spec("wandb") is None:
        raise BudgetReasonerError("--report-to wandb needs wandb: pip install -e '.[wandb]'")
    return value


def _token_price(value: str | None) -> tuple[float, float] | None:
    """--token-price IN,OUT: USD per million prompt tokens and per million completion tokens."""
    if value is None:
        return None
    try:
        prompt, completion = (float(part) for part in value.split(","))
    except ValueError:
        prompt = completion = -1.0
    if not (prompt >= 0 and completion >= 0):
        raise BudgetReasonerError(f"--token-price {value!r}: give two prices in USD per million tokens, prompt then "
                                  f"completion, as IN,OUT (e.g. 0.15,0.60)")
    return prompt, completion


@app.command()
@friendly_errors
def quickstart(
    domain: str = typer.Option("math", help=DOMAIN_HELP),
    problems: Optional[Path] = typer.Option(None, help=PROBLEMS_FILE_HELP),
    columns: Optional[str] = typer.Option(None, help=COLUMNS_HELP),
    verifier: Optional[str] = typer.Option(None, help=VERIFIER_HELP),
    preset: str = typer.Option("auto", help=PRESET_HELP),
    out: Path = typer.Option(Path("runs/quickstart"), help="Run folder; rerun with the same folder to resume."),
    report_to: str = typer.Option("none", help=REPORT_HELP),
    gpu_hour_price: Optional[float] = typer.Option(None, min=0, help="Dollars per GPU-hour: the report prices each stage."),
    set_: Optional[list[str]] = typer.Option(None, "--set", help=SET_HELP),
    overwrite: bool = typer.Option(False, "--overwrite", help=OVERWRITE_HELP),
    max_hours: Optional[float] = typer.Option(None, min=0, help="Stop before anything loads if the plan (`budget-reasoner "
                                              "plan`) takes longer; on the CPU this calibrates first (~1 min)."),
    rl: str = typer.Option("none", help="RL after the recipe, from the last stage on the training problems: none, grpo "
                                        "(verifiable rewards), or opd (on-policy distillation from the scoring teacher)."),
    rounds: int = typer.Option(1, help="Self-play rounds: 1 trains on the teacher's chains alone; each further round "
                                       "samples the last student's chains, keeps the verified ones beside the teacher's "
                                       "and continues SFT on them (OUT/sft-round-N)."),
):
    """Run the whole recipe (bootstrap, generate, sft, dpo, distill, eval) and write report.md/json/png."""
    settings = _preset(preset, set_)  # first: it settles the backend before the stages are imported
    from budget_reasoner.recipe import needs_bootstrap

    if needs_bootstrap(settings):  # a domain without an offline world (code) says so first, not that it needs a file
        _domain(domain, grading_only=True).require_offline()
    domain = _domain(domain, problems, columns, verifier)
    from budget_reasoner.recipe import quickstart as run_quickstart
    from budget_reasoner.report import markdown

    results = run_quickstart(out, settings, domain, _report_to(report_to), gpu_hour_price, overwrite, max_hours, rl,
                             rounds)
    typer.echo(markdown(results))
    typer.echo(f"report: {out / 'report.md'}")


@app.command("bootstrap")
@friendly_errors
def bootstrap_command(
    preset: str = typer.Option("auto", help=PRESET_HELP),
    out: Path = typer.Option(Path("runs/quickstart"), help="Run folder; the models go to OUT/models."),
    domain: str = typer.Option("math", help=DOMAIN_HELP),
    set_: Optional[list[str]] = typer.Option(None, "--set", help=SET_HELP),
):
    """Offline only: train the tiny teacher and student base from scratch (no hub needed)."""
    settings = _preset(preset, set_)
    from budget_reasoner.recipe import claim_run_folder, run_bootstrap

    domain = _domain(domain, grading_only=True)  # asked for its offline world's pieces, not for any problems file
    domain.require_offline()  # before the run folder is claimed
    claim_run_folder(out, settings, domain)
    run_bootstrap(out, settings, domain)
    typer.echo(f"models: {out / 'models'}")


@app.command()
@friendly_errors
def generate(
    teacher: Optional[str] = typer.Option(None, help="Teacher model: a local path, a hub id, or openai:MODEL for an OpenAI-compatible server "
                                          "(BUDGET_REASONER_TEACHER_URL; its key, if any, in BUDGET_REASONER_TEACHER_KEY; "
                                          "requests in flight: --set generate.concurrency=N)."),
    sampler: Optional[Path] = typer.Option(None, help="Self-play: a trained student stage folder (e.g. runs/quick/sft) "
                                                      "samples the chains instead of a teacher, verified the same way."),
    out: Path = typer.Option(Path("runs/data"), help="Output folder: problems/, chains/, sft/, pairs/."),
    domain: str = typer.Option("math", help=DOMAIN_HELP),
    problems: Optional[Path] = typer.Option(None, help=PROBLEMS_FILE_HELP),
    columns: Optional[str] = typer.Option(None, help=COLUMNS_HELP),
    verifier: Optional[str] = typer.Option(None, help=VERIFIER_HELP),
    seed_set: Optional[list[str]] = typer.Option(None, help="Training problems beside the procedural ones: gsm8k (its hub "
                                                           "train split) or gsm8k=PATH_OR_ID (repeatable)."),
    decontaminate: Optional[list[str]] = typer.Option(None, help="A benchmark no training problem may overlap (13-gram): "
                                                                "gsm8k, math500, aime24, amc23, or NAME=PATH_OR_ID (repeatable)."),
    preset: str = typer.Option("auto", help=PRESET_HELP),
    token_price: Optional[str] = typer.Option(None, help="An API teacher's prices, USD per million prompt and completion "
                                                         "tokens, as IN,OUT (e.g. 0.15,0.60): the stage record prices "
                                                         "the tokens the server counted."),
    tools: Optional[bool] = typer.Option(None, "--tools/--no-tools", help=TOOLS_HELP + " Sets generate.tools."),
    set_: Optional[list[str]] = typer.Option(None, "--set", help=SET_HELP),
    overwrite: bool = typer.Option(False, "--overwrite", help=OVERWRITE_HELP),
):
    """Sample chains from a teacher (or a student stage), keep the ones the verifier accepts, and build the SFT set
    and preference pairs."""
    if (teacher is None) == (sampler is None):
        raise BudgetReasonerError("generate needs one of --teacher MODEL or --sampler STAGE_DIR")
    price = _token_price(token_price)
    settings = _preset(preset, set_, {"generate.tools": tools})
    domain = _domain(domain, problems, columns, verifier)
    from budget_reasoner.generate import generate as run_generate
    from budget_reasoner.hardware import hardware_for
    from budget_reasoner.recipe import make_sampler, make_teacher

    settings.generate.seed_sets += seed_set or []
    settings.generate.decontaminate += decontaminate or []
    hardware = hardware_for(settings)
    source = make_teacher(teacher, settings, hardware) if teacher else make_sampler(sampler, settings, hardware)
    summary = run_generate(out, settings, source, domain, overwrite, token_price=price,
                           allow_none_verified=sampler is not None)
    cost = f"; {summary['cost_usd']:.4f} USD for the teacher's tokens" if "cost_usd" in summary else ""
    typer.echo(f"{summary['verified_chains']}/{summary['chains']} chains verified; "
               f"{summary['sft_examples']} SFT examples, {summary['pairs']} pairs -> {out}{cost}")


@app.command("sft")
@friendly_errors
def sft_command(
    data: Path = typer.Option(..., help="SFT set (JSONL, prompt/completion), e.g. runs/data/sft/train.jsonl."),
    student: str = typer.Option(..., help="Student base model: a local path or a hub id."),
    out: Path = typer.Option(Path("runs/sft"), help="Output folder for the LoRA adapter."),
    preset: str = typer.Option("auto", help=PRESET_HELP),
    report_to: str = typer.Option("none", help=REPORT_HELP),
    set_: Optional[list[str]] = typer.Option(None, "--set", help=SET_HELP),
    overwrite: bool = typer.Option(False, "--overwrite", help=OVERWRITE_HELP),
):
    """(Q)LoRA supervised fine-tuning of the student on verified chains."""
    settings = _preset(preset, set_)
    from budget_reasoner.train.sft import sft

    record = sft(data, student, out, settings, report_to=_report_to(report_to), overwrite=overwrite)
    typer.echo(f"sft adapter: {out / 'adapter'} ({record['seconds']:.0f} s)")


@app.command("dpo")
@friendly_errors
def dpo_command(
    pairs: Path = typer.Option(..., help="Preference pairs (JSONL, prompt/chosen/rejected), e.g. runs/data/pairs/train.jsonl."),
    sft_stage: Path = typer.Option(..., "--sft", help="The sft output folder; it is also the DPO reference."),
    out: Path = typer.Option(Path("runs/dpo"), help="Output folder for the DPO adapter."),
    preset: str = typer.Option("auto", help=PRESET_HELP),
    report_to: str = typer.Option("none", help=REPORT_HELP),
    set_: Optional[list[str]] = typer.Option(None, "--set", help=SET_HELP),
    overwrite: bool = typer.Option(False, "--overwrite", help=OVERWRITE_HELP),
):
    """DPO on verified-vs-rejected chains, starting from and anchored to the SFT model."""
    settings = _preset(preset, set_)
    from budget_reasoner.train.dpo import dpo

    record = dpo(pairs, sft_stage, out, settings, report_to=_report_to(report_to), overwrite=overwrite)
    typer.echo(f"dpo adapter: {out / 'adapter'} ({record['seconds']:.0f} s)")


@app.command("grpo")
@friendly_errors
def grpo_command(
    start: str = typer.Option(..., "--from", help="A stage folder (runs/quick/sft: RL after SFT) or a base model (R1-Zero)."),
    problems: Path = typer.Option(..., help="Training problems (JSONL: id, domain, question, answer, source), "
                                            "e.g. runs/quick/data/problems/train.jsonl."),
    out: Path = typer.Option(Path("runs/grpo"), help="Output folder for the GRPO adapter."),
    domain: str = typer.Option("math", help="Whose verifier pays the rewards: " + DOMAIN_HELP.split(": ", 1)[1]),
    verifier: Optional[str] = typer.Option(None, help=VERIFIER_HELP),
    preset: str = typer.Option("auto", help=PRESET_HELP),
    report_to: str = typer.Option("none", help=REPORT_HELP),
    set_: Optional[list[str]] = typer.Option(None, "--set", help=SET_HELP),
    overwrite: bool = typer.Option(False, "--overwrite", help=OVERWRITE_HELP),
):
    """GRPO with verifiable rewards: the student samples chains, the verifier pays the right ones."""
    settings = _preset(preset, set_)
    from budget_reasoner.train.grpo import grpo

    record = grpo(problems, start, out, settings, _domain(domain, verifier=verifier, grading_only=True), report_to=_report_to(report_to), overwrite=overwrite)
    rewards = [entry["reward"] for entry in record["history"] if "reward" in entry]
    trend = f"; mean reward {rewards[0]:.3f} -> {rewards[-1]:.3f}" if rewards else ""
    typer.echo(f"grpo adapter: {out / 'adapter'} ({record['seconds']:.0f} s{trend})")


@app.command("opd")
@friendly_errors
def opd_command(
    start: str = typer.Option(..., "--from", help="The student: a stage folder (runs/quick/sft) or a base model."),
    problems: Path = typer.Option(..., help="Training problems (JSONL: id, domain, question, answer, source) whose "
                                            "questions the student answers, e.g. runs/quick/data/problems/train.jsonl."),
    teacher: str = typer.Option(..., help="Teacher that scores every sampled token, sharing the student's tokenizer: "
                                          "a model path or hub id (--set distill.stream_layers=true: a layer at a time), "
                                          "or openai:MODEL on a server with prompt log-probs (BUDGET_REASONER_TEACHER_URL)."),
    out: Path = typer.Option(Path("runs/opd"), help="Output folder for the OPD adapter."),
    domain: str = typer.Option("math", help="The problems' domain (recorded; OPD reads no answers)."),
    preset: str = typer.Option("auto", help=PRESET_HELP),
    report_to: str = typer.Option("none", help=REPORT_HELP),
    set_: Optional[list[str]] = typer.Option(None, "--set", help=SET_HELP),
    overwrite: bool = typer.Option(False, "--overwrite", help=OVERWRITE_HELP),
):
    """On-policy distillation: the student samples, the teacher scores every sampled token (per-token reverse KL)."""
    settings = _preset(preset, set_)
    from budget_reasoner.train.opd import opd

    record = opd(problems, start, teacher, out, settings, domain, report_to=_report_to(report_to), overwrite=overwrite)
    kl = [entry["reverse_kl"] for entry in record["history"] if "reverse_kl" in entry]
    trend = f"; reverse KL {kl[0]:.3f} -> {kl[-1]:.3f}" if kl else ""
    typer.echo(f"opd adapter: {out / 'adapter'} ({record['seconds']:.0f} s, {record['teacher_tokens']:,} teacher-scored "
               f"tokens{trend})")


@app.command("distill")
@friendly_errors
def distill_command(
    teacher: str = typer.Option(..., help="Teacher model path or hub id (must share the student's tokenizer)."),
    data: Path = typer.Option(..., help="Sequence-level data: the SFT set the teacher's top-k is cached over."),
    student: Path = typer.Option(..., help="The student stage folder to continue (e.g. runs/dpo)."),
    out: Path = typer.Option(Path("runs/distill"), help="Output folder (the cache goes to OUT/cache)."),
    preset: str = typer.Option("auto", help=PRESET_HELP),
    report_to: str = typer.Option("none", help=REPORT_HELP),
    set_: Optional[list[str]] = typer.Option(None, "--set", help=SET_HELP),
    overwrite: bool = typer.Option(False, "--overwrite", help=OVERWRITE_HELP + " (the cache in OUT/cache too)"),
):
    """Logit-level distillation: cache the teacher's top-k log-probs, then train the student with the KD loss."""
    settings = _preset(preset, set_)
    from budget_reasoner.train.distill import cache_teacher_topk, distill

    cache_teacher_topk(teacher, data, out / "cache", settings, overwrite=overwrite,
                       stream_layers=settings.distill.stream_layers)
    record = distill(out / "cache", student, out, settings, report_to=_report_to(report_to), overwrite=overwrite)
    typer.echo(f"distill adapter: {out / 'adapter'} ({record['seconds']:.0f} s)")


@app.command("cache")
@friendly_errors
def cache_command(
    teacher: str = typer.Option(..., help="Teacher model path or hub id (must share the student's tokenizer); with "
                                "--server, or as openai:MODEL, the model's name on the server."),
    data: Path = typer.Option(..., help="Sequence-level data (SFT JSONL): the sequences the teacher scores."),
    out: Path = typer.Option(Path("runs/distill/cache"), help="The cache folder (safetensors shards + COMPLETE.json)."),
    top_k: Optional[int] = typer.Option(None, "--top-k", min=1, help="Log-probs kept per position (default: the preset's distill.top_k)."),
    stream_layers: bool = typer.Option(False, "--stream-layers", help="Read the teacher's decoder layers from its safetensors "
                                       "one at a time (a teacher bigger than the memory); the same cache, slower. "
                                       "Default: the preset's distill.stream_layers."),
    server: Optional[str] = typer.Option(None, "--server", help="Score with TEACHER served at this OpenAI-compatible URL "
                                         "(…/v1) that returns prompt log-probs: `vllm serve TEACHER --max-logprobs K`."),
    tokenizer: Optional[str] = typer.Option(None, "--tokenizer", help="With a server: the tokenizer that makes the ids "
                                            "it scores, which it must share (default: the student's, model.student)."),
    preset: str = typer.Option("auto", help=PRESET_HELP),
    set_: Optional[list[str]] = typer.Option(None, "--set", help=SET_HELP),
    overwrite: bool = typer.Option(False, "--overwrite", help=OVERWRITE_HELP),
):
    """Score the data with the teacher once: its top-k log-probs at the completion positions, in compact shards."""
    settings = _preset(preset, set_)
    if top_k is not None:
        settings.distill.top_k = top_k
    from budget_reasoner.train.distill import cache_teacher_topk

    if server and stream_layers:
        raise BudgetReasonerError("--stream-layers reads a local checkpoint, --server scores on the server: pass one")
    info = cache_teacher_topk(teacher, data, out, settings, overwrite=overwrite,
                              stream_layers=stream_layers or settings.distill.stream_layers, server=server,
                              tokenizer_source=tokenizer)
    typer.echo(f"teacher cache: {out} ({info['examples']} sequences, {info['cached_positions']:,} positions, "
               f"top-{info['top_k']}, {info['bytes_per_token']:.1f} bytes/position)")


@app.command("eval")
@friendly_errors
def eval_command(
    model: str = typer.Option(..., help="A model path or hub id, or a stage folder (sft/dpo/distill)."),
    problems: Optional[Path] = typer.Option(None, help="Problems JSONL (id, domain, question, answer, source), or your "
                                                       "own .jsonl/.csv/.parquet with question and answer columns (see "
                                                       "--columns), or with --benchmark that benchmark's local file "
                                                       "(JSONL; CSV for choice)."),
    columns: Optional[str] = typer.Option(None, help=COLUMNS_HELP),
    verifier: Optional[str] = typer.Option(None, help=VERIFIER_HELP),
    benchmark: Optional[str] = typer.Option(None, help="gsm8k, math500, aime24, amc23, mbpp, humaneval (a local file "
                                                       "via --problems, else the copy in data/, else the hub), or choice "
                                                       "(a GPQA-style CSV via --problems)."),
    out: Path = typer.Option(Path("runs/eval"), help="Output folder: results.jsonl, summary.json, summary.md, curve PNG."),
    domain: str = typer.Option("math", help="The narrow domain (picks the verifier): " + DOMAIN_HELP.split(": ", 1)[1]),
    samples: Optional[int] = typer.Option(None, min=1, help="Samples per problem for pass@k, majority vote and best-of-k."),
    think_budget: Optional[int] = typer.Option(None, min=0, help="Budget forcing: cap the thinking at this many tokens (0: off)."),
    min_think: Optional[int] = typer.Option(None, min=0, help="Budget forcing: append 'Wait' when thinking stops earlier."),
    max_waits: Optional[int] = typer.Option(None, min=0, help="Budget forcing: at most this many 'Wait's."),
    tools: Optional[bool] = typer.Option(None, "--tools/--no-tools", help=TOOLS_HELP + " Sets eval.tools; the summary "
                                                                      "counts the calls per problem."),
    preset: str = typer.Option("auto", help=PRESET_HELP),
    set_: Optional[list[str]] = typer.Option(None, "--set", help=SET_HELP),
    overwrite: bool = typer.Option(False, "--overwrite", help=OVERWRITE_HELP),
):
    """Held-out accuracy with test-time compute: greedy or budget-forced, pass@k, majority vote, best-of-N."""
    settings = _preset(preset, set_, {"eval.maj_k": samples, "eval.think_budget": think_budget,
                                      "eval.min_think_tokens": min_think, "eval.max_waits": max_waits,
                                      "eval.tools": tools})
    from budget_reasoner.eval.run import evaluate
    from budget_reasoner.problems import benchmark_domain, load_benchmark

    if benchmark:
        rows = load_benchmark(benchmark, problems)  # choice: a GPQA-style CSV, options shuffled per problem
        domain = benchmark_domain(benchmark)  # mbpp, humaneval: code; choice: the letter
        problems = _problems_copy(out, rows, overwrite)
    elif problems is None:
        raise BudgetReasonerError("eval needs --problems FILE or --benchmark NAME")
    else:
        domain = _domain(domain, verifier=verifier, grading_only=True)
        if columns or not _is_problems_jsonl(problems):  # the user's own file: read as generate reads it
            from budget_reasoner.problems import parse_columns

            problems = _problems_copy(out, domain.read_problem_file(problems, parse_columns(columns)), overwrite)
    evaluate(model, problems, out, settings, domain, overwrite=overwrite)
    typer.echo((out / "summary.md").read_text())


def _is_problems_jsonl(path: Path) -> bool:
    """Whether `path` is a problems file of the data contract (JSONL whose first row has all PROBLEM_COLUMNS)."""
    import json

    from budget_reasoner.problems import PROBLEM_COLUMNS

    if path.suffix.lower() != ".jsonl" or not path.is_file():
        return path.suffix.lower() == ".jsonl"  # a missing .jsonl: evaluate says so in its own words
    with path.open(encoding="utf-8", errors="replace") as handle:
        first = next((line for line in handle if line.strip()), "")
    try:
        row = json.loads(first)
    except json.JSONDecodeError:
        return True  # evaluate names the bad line
    return isinstance(row, dict) and all(column in row for column in PROBLEM_COLUMNS)


def _problems_copy(out: Path, rows: list[dict], overwrite: bool) -> Path:
    """The problems an eval reads from anything but a problems file, kept in OUT/problems.jsonl (another set there
    is refused)."""
    from budget_reasoner.io import write_jsonl

    problems = out / "problems.jsonl"
    if problems.is_file() and not overwrite and _jsonl_text(rows) != problems.read_text():
        raise BudgetReasonerError(f"{out} was evaluated on other problems ({problems}); pass a new --out, or "
                                  f"--overwrite to delete it and start over")
    write_jsonl(problems, rows)
    return problems


def _jsonl_text(rows: list[dict]) -> str:
    import json

    return "".join(json.dumps(row) + "\n" for row in rows)


@presets_app.command("recommend")
@friendly_errors
def presets_recommend(
    vram_gib: Optional[float] = typer.Option(None, min=0.1, help="Answer for a card with this much memory, in GiB as "
                                             "torch reports it (total_memory / 2**30), assumed to have bf16; no GPU needed."),
    gpu: Optional[str] = typer.Option(None, help="Answer for a card of the table in hardware.py: t4, rtx3060, rtx4060ti, "
                                      "rtx3090, rtx4090, l4, a10g, a100-40gb, a100-80gb, h100, l40s, h200, ..."),
):
    """The preset `--preset auto` picks on this machine (or on the card given), and why."""
    from budget_reasoner.hardware import Hardware, card, detect
    from budget_reasoner.memory import recommend_preset

    if gpu is not None:
        hardware = card(gpu).hardware()
    elif vram_gib is not None:
        hardware = Hardware("cuda", f"a {vram_gib:g} GiB card", vram_gib, (8, 0), "bitsandbytes")
    else:
        hardware = detect()
    name, why = recommend_preset(hardware)
    typer.echo(f"{name}: {why}" + ("" if gpu or vram_gib else f" ({hardware.describe()})"))


@app.command()
@friendly_errors
def vram(
    model: Optional[str] = typer.Option(None, help="Hub id or local folder with config.json (default: the preset's "
                                                   "student, or its teacher for generate and cache)."),
    preset: str = typer.Option("auto", help=PRESET_HELP),
    stage: str = typer.Option("sft", help="sft, dpo, distill, grpo (training), generate, cache (the teacher) or eval."),
    vram_gb: Optional[float] = typer.Option(None, min=0, help="Card memory in GiB (default: the preset's)."),
    gpus: int = typer.Option(1, min=1, help="Training on this many cards: the memory of each (see --strategy)."),
    strategy: str = typer.Option("ddp", help="With --gpus: ddp (a full replica per card) or fsdp (weights, adapter "
                                             "and optimizer state sharded across the cards)."),
    set_: Optional[list[str]] = typer.Option(None, "--set", help=SET_HELP),
):
    """Estimate a stage's peak GPU memory from the model's config (no weights loaded) and say if it fits."""
    from budget_reasoner.memory import (TRAINING_STAGES, estimate_stage, estimate_training_memory_per_gpu, longest_sequence,
                                        read_model_shape, teacher_cache_batch, training_sequence)

    settings = _preset(preset, set_, runs_models=False)
    model, estimate = estimate_stage(settings, stage, model)
    shape = read_model_shape(model)
    if gpus > 1 or strategy != "ddp":
        if stage not in TRAINING_STAGES:
            raise BudgetReasonerError(f"--gpus and --strategy are for the training stages ({', '.join(TRAINING_STAGES)}); "
                                      f"{stage} runs in one process")
        estimate = estimate_training_memory_per_gpu(shape, settings, stage, gpus, strategy)
        typer.echo(f"per GPU, {gpus} GPUs, {strategy}:")
    batch = teacher_cache_batch(settings) if stage == "cache" else getattr(settings, stage).batch_size
    typer.echo(f"{model} ({shape.parameters / 1e9:.2f}B parameters), preset {settings.name}, stage {stage}, "
               f"{training_sequence(settings, stage) if stage in TRAINING_STAGES else settings.model.max_length} tokens "
               f"x batch {batch}")
    card = vram_gb or settings.vram_gb or None
    typer.echo(estimate.table(card))
    if card and stage in TRAINING_STAGES:
        typer.echo(f"longest {stage} sequence at batch {batch} on this card: "
                   f"~{longest_sequence(shape, settings, card, stage):,} tokens")


@app.command("plan")
@friendly_errors
def plan_command(
    preset: str = typer.Option("auto", help=PRESET_HELP),
    gpu: Optional[str] = typer.Option(None, help="Plan for a card of the table in hardware.py (t4, rtx4090, a100-80gb, "
                                      "...); without it, the card here, or the one the preset is sized for."),
    vram_gib: Optional[float] = typer.Option(None, min=0.1, help="Plan for the table's card nearest this memory (GiB)."),
    teacher: Optional[str] = typer.Option(None, help="The teacher quickstart would use (a path, hub id or openai:MODEL)."),
    gpu_hour_price: Optional[float] = typer.Option(None, min=0, help="Dollars per GPU-hour: prices each stage."),
    token_price: Optional[str] = typer.Option(None, help="An API teacher's USD per million tokens, prompt,completion."),
    recalibrate: bool = typer.Option(False, "--recalibrate", help="On the CPU: measure again, not the cached calibration."),
    json_output: bool = typer.Option(False, "--json", help="Print the plan as JSON: {stages: [...], total_seconds}."),
    gpus: int = typer.Option(1, min=1, help="Train data-parallel on this many such cards (accelerate / torchrun): "
                                            "training time divided by it at 90% efficiency (assumed)."),
    replicas: int = typer.Option(0, min=0, help="The teacher served by this many vLLM replicas (each on such a "
                                                "card): generate planned as served, with the concurrency to keep them busy."),
    set_: Optional[list[str]] = typer.Option(None, "--set", help=SET_HELP),
):
    """How long (and how much) quickstart will take on a card, stage by stage, before anything runs."""
    import json

    settings = _preset(preset, set_, runs_models=False)
    from budget_reasoner.calibrate import plan_quickstart

    plan = plan_quickstart(settings, gpu, vram_gib, teacher, gpu_hour_price, _token_price(token_price), recalibrate,
                           gpus=gpus, replicas=replicas)
    typer.echo(json.dumps(plan.to_dict(), indent=2) if json_output else plan.table())


@presets_app.command("list")
@friendly_errors
def presets_list():
    """List the shipped presets."""
    from budget_reasoner.config import available_presets

    for name in available_presets():
        typer.echo(name)


@presets_app.command("show")
@friendly_errors
def presets_show(name: str = typer.Argument(..., help="Preset name or .yaml file.")):
    """Print a preset with every default filled in."""
    typer.echo(yaml.safe_dump(_preset(name, None, runs_models=False).to_dict(), sort_keys=False))


@app.command("export")
@friendly_errors
def export_command(
    source: str = typer.Argument(..., help="A run folder (pick its stage with --stage) or a stage folder (sft, dpo, distill)."),
    # not named `out`: friendly_errors would lock (create) it, and an export is renamed into place whole
    out_dir: Path = typer.Option(..., "--out", help="A new (or empty) folder; it holds the whole export or nothing."),
    stage: Optional[str] = typer.Option(None, help="Of a run folder: sft, dpo or distill (default: the last it finished)."),
    adapter_only: bool = typer.Option(False, "--adapter-only", help="Export the LoRA adapter alone, not merged."),
    dtype: str = typer.Option("auto", help="auto (what the stage computed in: bf16, fp16 on a T4, fp32 on the CPU), "
                                           "bf16, fp16 or fp32."),
    merge_into: str = typer.Option("auto", help="The base weights the adapter is added to: auto (what it trained "
                                                "against), dequantized (NF4, 4-bit stages) or original (16-bit)."),
    gguf: Optional[str] = typer.Option(None, help="Also a GGUF and an Ollama Modelfile: q4_k_m, q8_0 or f16 "
                                                  "(needs llama.cpp: LLAMA_CPP_DIR)."),
    push_to_hub: Optional[str] = typer.Option(None, help="Then upload to this hub repo (token: HF_TOKEN)."),
    gate_problems: int = typer.Option(32, min=0, help="Held-out problems the export gate compares on (0: skip it)."),
    gate_tolerance: Optional[float] = typer.Option(None, min=0, help="Largest mean token log-likelihood difference "
                                                                     "the gate accepts, nats/token (default: by dtype)."),
    problems: Optional[Path] = typer.Option(None, help="Problems JSONL for the gate when the stage has no run around it."),
    preset: Optional[str] = typer.Option(None, help="Preset to load the base with (default: the run's own)."),
):
    """Merge a stage's adapter into a standard checkpoint, check it against the stage (export gate), write a model card."""
    from budget_reasoner.progress import quiet_libraries

    quiet_libraries()
    from budget_reasoner.export import ExportOptions, export_model

    record = export_model(source, out_dir, ExportOptions(
        stage=stage, dtype=dtype, merge_into=merge_into, adapter_only=adapter_only, gguf=gguf, push_to_hub=push_to_hub,
        gate_problems=gate_problems, gate_tolerance=gate_tolerance, problems=problems, preset=preset))
    from budget_reasoner.export.gate import GateResult

    size = f"{record['bytes'] / 2**20:,.1f} MiB, {record['seconds']:.0f} s"
    if record.get("gate"):
        typer.echo(f"{GateResult(**record['gate']).line()} -> {out_dir} ({size})")
    else:
        what = "adapter" if adapter_only else "merged model, gate skipped"
        typer.echo(f"exported the {record['stage']} {what} -> {out_dir} ({size})")


@app.command("chat")
@friendly_errors
def chat_command(
    model: str = typer.Argument(..., help="A run folder, a stage folder, an export folder, or a model path or hub id."),
    stage: Optional[str] = typer.Option(None, help="Of a run folder: sft, dpo or distill (default: the last it finished)."),
    hide_thinking: bool = typer.Option(False, "--hide-thinking", help="Show only the reply after the thinking."),
    think_budget: int = typer.Option(0, min=0, help="Budget forcing: cap the thinking at this many tokens (0: off)."),
    once: Optional[str] = typer.Option(None, help="Answer this one question and exit (for scripts)."),
    max_new_tokens: Optional[int] = typer.Option(None, min=1, help="Longest reply (default: the eval setting)."),
    preset: Optional[str] = typer.Option(None, help="Preset to load the model with (default: the run's or export's)."),
):
    """Chat with the reasoner in the terminal: the reply streams, thinking dimmed, then the extracted answer."""
    from budget_reasoner.progress import quiet_libraries

    quiet_libraries()
    from budget_reasoner.chat import ChatOptions, run_chat

    code = run_chat(model, ChatOptions(stage=stage, hide_thinking=hide_thinking, think_budget=think_budget,
                                       max_new_tokens=max_new_tokens, preset=preset), once)
    raise typer.Exit(code)


def main():
    # transformers' chatter is quieted in _preset, once Unsloth (when it is the backend) has been imported first
    app()


if __name__ == "__main__":
    main()
