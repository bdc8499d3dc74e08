"""The eval stage: greedy accuracy (pass@1) and majority vote over k samples (maj@k) on held-out problems.

Writes `results.jsonl` (one row per problem: the greedy completion, the k samples, verdicts) and
`summary.json`. Works on a plain model folder or hub id, or on any stage folder (base + adapter).
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from budget_reasoner.config import Preset
from budget_reasoner.eval.generation import chat_prompt, generate_texts, generate_with_budget, prompt_texts
from budget_reasoner.eval.metrics import accuracy_curve, best_of_n, majority_vote, mean, pass_at_k
from budget_reasoner.generate.pipeline import PROBLEM_COLUMNS
from budget_reasoner.hardware import Hardware, hardware_for
from budget_reasoner.io import finished, mark_complete, read_jsonl, write_json, write_jsonl
from budget_reasoner.models import load_model, load_tokenizer
from budget_reasoner.train.common import stage_model_paths
from budget_reasoner.verify import check, extract, grade


def load_for_inference(model_or_stage: str | Path, preset: Preset, hardware: Hardware):
    """A model ready to generate: adapters merged into the base when it is not quantized (faster decoding)."""
    base, adapter = stage_model_paths(Path(model_or_stage))
    model = load_model(base, preset, hardware)
    tokenizer = load_tokenizer(adapter if adapter is not None else base)
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter))
        if not preset.quantization.load_in_4bit:
            model = model.merge_and_unload()
    model.eval()
    return model, tokenizer


def vote_is_correct(domain: str, vote: str | None, reference: str) -> bool:
    """A majority-voted (already extracted) answer graded like a completion that boxes it."""
    return vote is not None and check(domain, f"\\boxed{{{vote}}}", reference)


def evaluate(model_or_stage: str | Path, problems_file: Path, out: Path, preset: Preset, domain: str = "math",
             hardware: Hardware | None = None, name: str | None = None) -> dict:
    """Greedy (or budget-forced) accuracy, and over `eval.maj_k` samples: pass@1, pass@k, maj@k, best-of-k."""
    out = Path(out)
    if (record := finished(out, "eval", "summary.json")) is not None:
        return record
    hardware = hardware or hardware_for(preset)
    problems = read_jsonl(problems_file, PROBLEM_COLUMNS)
    model, tokenizer = load_for_inference(model_or_stage, preset, hardware)
    settings = preset.eval
    label = f"eval {name or ''}".strip()
    prompts = [chat_prompt(p["question"], preset.generate.instruction) for p in problems]
    texts = prompt_texts(tokenizer, prompts)
    started = time.time()
    if settings.think_budget > 0:
        first = generate_with_budget(model, tokenizer, prompts, settings.think_budget, settings.batch_size,
                                     settings.min_think_tokens, settings.max_waits, description=f"{label} budget forcing")
    else:
        first = [g[0].text for g in generate_texts(model, tokenizer, texts, settings.max_new_tokens,
                                                   settings.batch_size, description=f"{label} greedy")]
    k = settings.maj_k
    sampled = [[] for _ in problems]
    if k > 1:
        sampled = generate_texts(model, tokenizer, texts, settings.max_new_tokens, settings.batch_size,
                                 temperature=settings.temperature, num_samples=k, seed=preset.seed, description=f"{label} {k} samples")
    rows, reference_errors = [], 0
    for problem, completion, samples in zip(problems, first, sampled):
        verdict = grade(domain, completion, problem["answer"])
        reference_errors += verdict.error is not None
        answers = [extract(domain, s.text) for s in samples]
        vote = majority_vote(answers)
        row = {"id": problem["id"], "question": problem["question"], "answer": problem["answer"],
               "completion": completion, "correct": verdict.correct, "error": verdict.error}
        if samples:
            best = best_of_n([s.text for s in samples], [s.mean_logprob for s in samples])
            row |= {"samples": [s.text for s in samples],
                    "samples_correct": [check(domain, s.text, problem["answer"]) for s in samples],
                    "sample_answers": answers, "majority_answer": vote,
                    "majority_correct": vote_is_correct(domain, vote, problem["answer"]),
                    "best_of_n_correct": check(domain, best, problem["answer"])}
        rows.append(row)
    summary = {"model": str(model_or_stage), "problems": len(rows), "accuracy": mean([r["correct"] for r in rows]),
               "reference_errors": reference_errors}
    if k > 1:
        summary |= {
            "pass@1": mean([pass_at_k(k, sum(r["samples_correct"]), 1) for r in rows]),
            f"pass@{k}": mean([pass_at_k(k, sum(r["samples_correct"]), k) for r in rows]),
            f"maj@{k}": mean([r["majority_correct"] for r in rows]),
            f"best_of_{k}": mean([r["best_of_n_correct"] for r in rows]),
        }
    if settings.think_budget > 0:
        summary["think_budget"] = settings.think_budget
    summary["seconds"] = time.time() - started
    write_jsonl(out / "results.jsonl", rows)
    write_json(out / "summary.json", summary)
    (out / "summary.md").write_text(summary_table(summary))
    if k > 1:
        plot_samples_curve(rows, domain, out / "accuracy_vs_samples.png")
    mark_complete(out, summary)
    del model
    if hardware.device == "cuda":
        torch.cuda.empty_cache()
    return summary


def summary_table(summary: dict) -> str:
    metrics = [key for key in summary if key not in ("model", "problems", "seconds") and isinstance(summary[key], (int, float))]
    header = "| model | problems | " + " | ".join(metrics) + " |"
    values = " | ".join(f"{summary[m]:.1%}" if isinstance(summary[m], float) else str(summary[m]) for m in metrics)
    return f"{header}\n|---|---|{'---|' * len(metrics)}\n| {summary['model']} | {summary['problems']} | {values} |\n"


def plot_samples_curve(rows: list[dict], domain: str, path: Path) -> None:
    """Accuracy against the number of samples voted over (maj@k for k = 1, 2, 4, ...): the test-time compute trade."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = len(rows[0]["sample_answers"])
    budgets = sorted({1, *[2**i for i in range(1, k.bit_length()) if 2**i <= k], k})
    curve = accuracy_curve([r["sample_answers"] for r in rows], [r["answer"] for r in rows],
                           lambda vote, reference: vote_is_correct(domain, vote, reference), budgets)
    figure, axis = plt.subplots(figsize=(5, 3.5))
    axis.plot(list(curve), list(curve.values()), marker="o")
    axis.set_xscale("log", base=2)
    axis.set_xlabel("samples per problem (majority vote)")
    axis.set_ylabel("accuracy")
    axis.set_ylim(0, 1)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
