"""The eval stage: greedy accuracy (pass@1) and majority vote over k samples (maj@k) on held-out problems.

Writes `results.jsonl` (one row per problem: the greedy completion, the k samples, verdicts and token
counts), `summary.json` and, with samples, `test_time_compute.png` (accuracy against samples and tokens). Works on a plain model folder or hub id, or on any stage folder (base + adapter).
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from budget_reasoner.config import Preset
from budget_reasoner.domains import Domain, recorded, with_instruction
from budget_reasoner.eval.budget_forcing import generate_with_budget
from budget_reasoner.eval.metrics import accuracy_curve, best_of_n, cluster_answers, mean, pass_at_k, tokens_curve, vote
from budget_reasoner.errors import BudgetReasonerError
from budget_reasoner.hardware import Hardware, PeakMemory, hardware_for
from budget_reasoner.io import (MODEL_SETTINGS, add_session, claim_stage, mark_complete, read_jsonl, read_sessions,
                                settings_of, shard_path, write_json, write_jsonl)
from budget_reasoner.models import load_model, load_tokenizer
from budget_reasoner.problems import PROBLEM_COLUMNS, PROBLEM_KINDS
from budget_reasoner.progress import say
from budget_reasoner.sampling import chat_prompt
from budget_reasoner.sampling.local import generate_texts, prompt_texts
from budget_reasoner.stages import check_adapter, stage_model_paths, tokenizer_of
from budget_reasoner.tools import calls_in
from budget_reasoner.verify import ballot, equivalent, grade_many


def load_for_inference(model_or_stage: str | Path, preset: Preset, hardware: Hardware):
    """A model ready to generate: adapters merged into the base when it is not quantized (faster decoding)."""
    base, adapter = stage_model_paths(Path(model_or_stage))
    if adapter is not None:
        check_adapter(adapter)  # a damaged adapter is one line before the base loads
    model = load_model(base, preset, hardware)
    tokenizer = load_tokenizer(adapter if adapter is not None else base)
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter))
        if not preset.quantization.load_in_4bit:
            model = model.merge_and_unload()
    model.eval()
    return model, tokenizer


def evaluate(model_or_stage: str | Path, problems_file: Path, out: Path, preset: Preset, domain: Domain | str = "math",
             hardware: Hardware | None = None, name: str | None = None, load=None, overwrite: bool = False) -> dict:
    """Greedy (or budget-forced) accuracy, and over `eval.maj_k` samples: pass@1, pass@k, maj@k, best-of-k.

    Problems are answered and graded a shard (`generate.shard_size` problems) at a time into `out/shards/`;
    an interrupted eval reruns only the shards it had not written. `load` (a callable returning the model and
    tokenizer) lets evaluations of one model on several problem sets share one load.

    The folder's fingerprint holds the model's (io.claim_stage): shards answered by another model, or under other
    settings, are never reused. Questions too long for the model's context are cut to fit (counted, said) before
    the model loads."""
    out = Path(out)
    preset = with_instruction(preset, domain)  # the domain's instruction (code: its own), as generate prompted
    problems = read_jsonl(problems_file, PROBLEM_COLUMNS, PROBLEM_KINDS)  # bad rows: one line, nothing claimed
    settings = {**settings_of(preset, *MODEL_SETTINGS, "eval", "generate.instruction", "generate.shard_size"),
                "domain": recorded(domain)}  # a domain, or a verifier's name: what grades
    if preset.eval.tools:  # how the calls ran changes the answers
        settings |= settings_of(preset, "tools")
    else:
        settings["eval"].pop("tools")  # folders made before tools existed keep their fingerprint
    if (record := claim_stage(out, "eval", {"model": model_or_stage, "problems": problems_file}, settings, overwrite,
                              record="summary.json", keep=[problems_file])) is not None:
        return record
    hardware = hardware or hardware_for(preset)
    load = load or (lambda: load_for_inference(model_or_stage, preset, hardware))
    k, shard_size = preset.eval.maj_k, preset.generate.shard_size
    label = f"eval {name or ''}".strip()
    model = tokenizer = questions = None
    rows, started, peak = [], time.time(), PeakMemory(hardware.device)
    try:
        with peak:
            for index, start in enumerate(range(0, len(problems), shard_size)):
                path = shard_path(out / "shards", index)
                if path.exists():  # answered before an interruption, by this fingerprint's model
                    rows += read_jsonl(path)
                    continue
                if model is None:  # loaded only when some shard still needs answers; lengths checked first
                    questions = fit_questions(model_or_stage, problems, problems_file, preset)
                    model, tokenizer = load()
                shard = problems[start : start + shard_size]
                prompts = [chat_prompt(q, preset.generate.instruction) for q in questions[start : start + shard_size]]
                answers = _generate_answers(model, tokenizer, prompts, prompt_texts(tokenizer, prompts), preset,
                                            label, seed=preset.seed + index)
                shard_rows = result_rows(domain, shard, *answers)
                if preset.eval.tools:  # the calls the first answer ran (its output blocks)
                    for row in shard_rows:
                        row["tool_calls"] = calls_in(row["completion"])
                write_jsonl(path, shard_rows)
                rows += shard_rows
    finally:  # every session that answered is kept, an interrupted one's too; the summary reports the sum and the max
        compute = add_session(out, time.time() - started, peak.bytes) if model is not None else read_sessions(out)
    summary = {"model": str(model_or_stage), "problems": len(rows), "accuracy": mean([r["correct"] for r in rows]),
               "reference_errors": sum(r["error"] is not None for r in rows),
               "tokens_per_problem": mean([r["tokens"] for r in rows])}
    if k > 1:
        summary |= {
            "pass@1": mean([pass_at_k(k, sum(r["samples_correct"]), 1) for r in rows]),
            f"pass@{k}": mean([pass_at_k(k, sum(r["samples_correct"]), k) for r in rows]),
            f"maj@{k}": mean([r["majority_correct"] for r in rows]),
            f"best_of_{k}": mean([r["best_of_n_correct"] for r in rows]),
            "compute_curve": compute_curve(rows, domain),
        }
    if preset.eval.think_budget > 0:
        summary["think_budget"] = preset.eval.think_budget
    if preset.eval.tools:  # the first answer's calls, per problem
        summary["tool_calls_per_problem"] = mean([r.get("tool_calls", 0) for r in rows])
    if questions is not None and (cut := sum(q != p["question"] for q, p in zip(questions, problems))):
        summary["questions_cut"] = cut  # to fit the model's context (fit_questions)
    summary |= {"device": hardware.describe(), **compute,
                "tokens": sum(r["tokens"] + sum(r.get("sample_tokens", [])) for r in rows)}  # generated
    write_jsonl(out / "results.jsonl", rows)
    write_json(out / "summary.json", summary)
    (out / "summary.md").write_text(summary_table(summary))
    if k > 1:
        plot_compute_curve(summary, out / "test_time_compute.png")
    mark_complete(out, summary)
    del model
    if hardware.device == "cuda":
        torch.cuda.empty_cache()
    return summary


def fit_questions(model_or_stage: str | Path, problems: list[dict], source: Path, preset: Preset) -> list[str]:
    """Each problem's question, cut from its start where prompt + the tokens eval generates would pass the model's
    positions (its config's max_position_embeddings), counted with its tokenizer before the model loads: a 100 KB
    question would otherwise run the model over 100,000 positions and take gigabytes of memory for nothing."""
    from transformers import AutoConfig

    base, _ = stage_model_paths(Path(model_or_stage))
    tokenizer = tokenizer_of(model_or_stage)
    try:
        positions = getattr(AutoConfig.from_pretrained(str(base)), "max_position_embeddings", None)
    except (OSError, ValueError) as error:
        raise BudgetReasonerError(f"cannot load model {str(base)!r}: {str(error).splitlines()[0]}") from None
    questions = [problem["question"] for problem in problems]
    if not positions:
        return questions
    generated = preset.eval.max_new_tokens + preset.eval.think_budget
    room = positions - generated
    cut = []
    for index, problem in enumerate(problems):
        question = problem["question"]
        for _ in range(4):  # decoding and re-encoding a cut may differ by a token or two: check again
            length = _prompt_tokens(tokenizer, question, preset)
            if length <= room:
                break
            ids = tokenizer(question, add_special_tokens=False)["input_ids"]
            if length - len(ids) >= room:
                raise BudgetReasonerError(
                    f"{source}: the chat template and instruction alone take {length - len(ids)} of the model's "
                    f"{positions} positions, leaving no room for a question and {generated} generated tokens; lower "
                    f"eval.max_new_tokens or shorten generate.instruction")
            question = tokenizer.decode(ids[length - room + 2 :])
        if question != problem["question"]:
            cut.append(str(problem["id"]))
        questions[index] = question
    if cut:
        say(f"eval: {len(cut)} of {len(problems)} questions in {source} are longer than the model's context "
            f"({positions} positions, {generated} of them kept for generating) and are cut to their last tokens "
            f"(ids: {', '.join(cut[:5])}{', ...' if len(cut) > 5 else ''})")
    return questions


def _prompt_tokens(tokenizer, question: str, preset: Preset) -> int:
    text = prompt_texts(tokenizer, [chat_prompt(question, preset.generate.instruction)])[0]
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def result_rows(domain: str, problems: list[dict], completions: list[str], tokens: list[int], samples: list) -> list[dict]:
    """A shard's rows, every answer graded in one batch: a grader that runs programs (code) runs them concurrently."""
    texts = [[completion, *(sample.text for sample in drawn)] for completion, drawn in zip(completions, samples)]
    verdicts = iter(grade_many(domain, [text for group in texts for text in group],
                               [problem["answer"] for problem, group in zip(problems, texts) for _ in group]))
    return [result_row(domain, problem, completion, count, drawn, [next(verdicts) for _ in group])
            for problem, completion, count, drawn, group in zip(problems, completions, tokens, samples, texts)]


def result_row(domain: str, problem: dict, completion: str, tokens: int, samples: list, verdicts: list | None = None) -> dict:
    """One problem's graded answers: the first (greedy or budget-forced) and, with samples, vote and best-of-n.

    `verdicts` (the first answer's, then each sample's) are graded here when not given."""
    if verdicts is None:
        verdicts = grade_many(domain, [completion, *(s.text for s in samples)], [problem["answer"]] * (1 + len(samples)))
    verdict = verdicts[0]
    row = {"id": problem["id"], "question": problem["question"], "answer": problem["answer"],
           "completion": completion, "tokens": tokens, "correct": verdict.correct, "error": verdict.error}
    if samples:
        # Every sample graded once; the vote clusters answers by meaning and takes its verdict from them,
        # so pass@k, maj@k and best-of-k agree on what a correct sample is (hedged samples do not vote).
        texts = [s.text for s in samples]
        correct = [sample_verdict.correct for sample_verdict in verdicts[1:]]
        answers = [ballot(domain, text) for text in texts]
        clusters = cluster_answers(answers, lambda a, b: equivalent(domain, a, b), correct)
        majority = vote(answers, clusters, correct)
        best = best_of_n(list(range(len(samples))), [s.mean_logprob for s in samples])
        if hasattr(samples[0], "tool_calls"):  # eval.tools
            row["sample_tool_calls"] = [s.tool_calls for s in samples]
        row |= {"samples": texts, "sample_tokens": [s.tokens for s in samples], "samples_correct": correct,
                "sample_answers": answers, "sample_clusters": clusters, "votes": majority.tally,
                "majority_answer": majority.answer, "majority_correct": majority.correct,
                "best_of_n_correct": correct[best]}
    return row


COUNTS = ("tokens_per_problem", "reference_errors", "think_budget", "questions_cut")  # summary numbers that are not fractions
RATES = ("tool_calls_per_problem",)  # ... nor whole numbers


def _generate_answers(model, tokenizer, prompts, texts, preset: Preset, label: str, seed: int):
    """The first answer per problem (greedy, or budget-forced) with its tokens, and `eval.maj_k` samples each; with
    eval.tools, every answer's python blocks run as it writes them (tools.py)."""
    settings = preset.eval
    if settings.tools:  # every answer written with its calls run (tools.py), the samples' too
        from budget_reasoner.tools import complete_with_tools, local_generator, settings_of as tool_settings

        tools = tool_settings(preset.tools)
        greedy = complete_with_tools(local_generator(model, tokenizer, settings.batch_size, 0.0, f"{label} greedy + tools"),
                                     texts, 1, settings.max_new_tokens, seed, tools)
        sampled = [[] for _ in prompts]
        if settings.maj_k > 1:
            sampler = local_generator(model, tokenizer, settings.batch_size, settings.temperature,
                                      f"{label} {settings.maj_k} samples + tools")
            sampled = complete_with_tools(sampler, texts, settings.maj_k, settings.max_new_tokens, seed, tools)
        return [g[0].text for g in greedy], [g[0].tokens for g in greedy], sampled
    if settings.think_budget > 0:
        first, first_tokens = generate_with_budget(model, tokenizer, prompts, settings.think_budget, settings.batch_size,
                                                   settings.min_think_tokens, settings.max_waits,
                                                   description=f"{label} budget forcing")
    else:
        greedy = generate_texts(model, tokenizer, texts, settings.max_new_tokens, settings.batch_size,
                                description=f"{label} greedy")
        first, first_tokens = [g[0].text for g in greedy], [g[0].tokens for g in greedy]
    sampled = [[] for _ in prompts]
    if settings.maj_k > 1:
        sampled = generate_texts(model, tokenizer, texts, settings.max_new_tokens, settings.batch_size,
                                 temperature=settings.temperature, num_samples=settings.maj_k, seed=seed,
                                 description=f"{label} {settings.maj_k} samples")
    return first, first_tokens, sampled


def summary_table(summary: dict) -> str:
    metrics = [key for key in summary if key not in ("model", "problems", "seconds", "tokens", "peak_memory_bytes")
               and isinstance(summary[key], (int, float))]
    header = "| model | problems | " + " | ".join(metrics) + " |"
    values = " | ".join(f"{summary[m]:,.0f}" if m in COUNTS else f"{summary[m]:.2f}" if m in RATES
                        else f"{summary[m]:.1%}" if isinstance(summary[m], float) else str(summary[m]) for m in metrics)
    return f"{header}\n|---|---|{'---|' * len(metrics)}\n| {summary['model']} | {summary['problems']} | {values} |\n"


def compute_curve(rows: list[dict], domain: str) -> list[dict]:
    """maj@k and the tokens generated per problem for k = 1, 2, 4, ..., k: the test-time compute trade."""
    k = len(rows[0]["sample_answers"])
    budgets = sorted({1, *[2**i for i in range(1, k.bit_length()) if 2**i <= k], k})
    # rows written before votes were clustered by meaning (a resumed eval) cluster by spelling
    clusters = [r.get("sample_clusters") or cluster_answers(r["sample_answers"], str.__eq__, r["samples_correct"])
                for r in rows]
    accuracy = accuracy_curve([r["sample_answers"] for r in rows], clusters, [r["samples_correct"] for r in rows],
                              budgets)
    tokens = tokens_curve([r["sample_tokens"] for r in rows], budgets)
    return [{"samples": n, "accuracy": accuracy[n], "tokens_per_problem": tokens[n]} for n in budgets]


def plot_compute_curve(summary: dict, path: Path) -> None:
    """Accuracy against samples voted over, and against the tokens that buys (greedy marked as a reference)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curve = summary["compute_curve"]
    accuracy = [point["accuracy"] for point in curve]
    figure, (by_samples, by_tokens) = plt.subplots(1, 2, figsize=(9, 3.5), sharey=True)
    by_samples.plot([point["samples"] for point in curve], accuracy, marker="o")
    by_samples.set_xscale("log", base=2)
    by_samples.set_xlabel("samples per problem (majority vote)")
    by_samples.set_ylabel("accuracy")
    by_samples.set_ylim(0, 1)
    by_tokens.plot([point["tokens_per_problem"] for point in curve], accuracy, marker="o", label="maj@k, sampled")
    greedy = "budget-forced" if "think_budget" in summary else "greedy"
    by_tokens.scatter([summary["tokens_per_problem"]], [summary["accuracy"]], marker="*", s=120, color="C1", label=greedy)
    by_tokens.set_xscale("log", base=2)
    by_tokens.set_xlabel("generated tokens per problem")
    by_tokens.legend(loc="lower right")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
