"""The eval stage: greedy accuracy (pass@1) and majority vote over k samples (maj@k) on held-out problems.

Writes `results.jsonl` (one row per problem: the greedy completion, the k samples, verdicts) and
`summary.json`. Works on a plain model folder or hub id, or on any stage folder (base + adapter).
"""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path

import torch

from budget_reasoner.config import Preset
from budget_reasoner.eval.generation import chat_prompt, generate_completions
from budget_reasoner.generate.pipeline import PROBLEM_COLUMNS
from budget_reasoner.hardware import Hardware, detect
from budget_reasoner.io import finished, mark_complete, read_jsonl, write_json, write_jsonl
from budget_reasoner.models import load_model, load_tokenizer
from budget_reasoner.train.common import stage_model_paths
from budget_reasoner.verify import check, extract_answer


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


def majority_answer(completions: list[str]) -> str | None:
    """The most common extracted answer (ties go to the first seen); None if no sample has an answer."""
    answers = [answer for answer in (extract_answer(c) for c in completions) if answer is not None]
    return Counter(answers).most_common(1)[0][0] if answers else None


def evaluate(model_or_stage: str | Path, problems_file: Path, out: Path, preset: Preset, domain: str = "math",
             hardware: Hardware | None = None, name: str | None = None) -> dict:
    out = Path(out)
    if (record := finished(out, "eval", "summary.json")) is not None:
        return record
    hardware = hardware or detect(preset.device)
    problems = read_jsonl(problems_file, PROBLEM_COLUMNS)
    model, tokenizer = load_for_inference(model_or_stage, preset, hardware)
    settings = preset.eval
    prompts = [chat_prompt(p["question"], preset.generate.instruction) for p in problems]
    started = time.time()
    greedy = generate_completions(model, tokenizer, prompts, settings.max_new_tokens, settings.batch_size,
                                  description=f"eval {name or ''} greedy")
    sampled = [[] for _ in problems]
    if settings.maj_k > 1:
        sampled = generate_completions(model, tokenizer, prompts, settings.max_new_tokens, settings.batch_size,
                                       temperature=settings.temperature, num_samples=settings.maj_k, seed=preset.seed,
                                       description=f"eval {name or ''} maj@{settings.maj_k}")
    rows = []
    for problem, (greedy_completion,), samples in zip(problems, greedy, sampled):
        vote = majority_answer(samples)
        rows.append({
            "id": problem["id"], "question": problem["question"], "answer": problem["answer"],
            "completion": greedy_completion, "correct": check(domain, greedy_completion, problem["answer"]),
            "samples_correct": [check(domain, s, problem["answer"]) for s in samples],
            "majority_answer": vote,
            "majority_correct": vote is not None and check(domain, f"\\boxed{{{vote}}}", problem["answer"]),
        })
    summary = {
        "model": str(model_or_stage),
        "problems": len(rows),
        "accuracy": sum(r["correct"] for r in rows) / len(rows),
        f"maj@{settings.maj_k}": sum(r["majority_correct"] for r in rows) / len(rows) if settings.maj_k > 1 else None,
        "sample_accuracy": (sum(sum(r["samples_correct"]) for r in rows) / (len(rows) * settings.maj_k)) if settings.maj_k > 1 else None,
        "seconds": time.time() - started,
    }
    write_jsonl(out / "results.jsonl", rows)
    write_json(out / "summary.json", summary)
    mark_complete(out, summary)
    del model
    if hardware.device == "cuda":
        torch.cuda.empty_cache()
    return summary
