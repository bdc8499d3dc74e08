"""Problems: the problem-file contract and the benchmark loaders, read by generate (seed sets, decontamination)
and eval (held-out and benchmark problems) alike.

A problems file is JSONL with `id, domain, question, answer, source` (PROBLEM_COLUMNS). The loaders read GSM8K,
MATH-500, AIME24, AMC23 from a local JSONL file or a hub id, and GPQA-style multiple choice from the user's CSV;
each returns such rows (plus `solution` where the set has one).
"""

from __future__ import annotations

import csv
import hashlib
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from budget_reasoner.errors import BudgetReasonerError
from budget_reasoner.io import read_jsonl

PROBLEM_COLUMNS = ("id", "domain", "question", "answer", "source")
PROBLEM_KINDS = {"question": "text", "domain": "text"}  # the answer may be anything: the grader reports a bad one

# The public files the project ships (data/README.md: sources and licences), read when a benchmark is named
# without a path, so eval, seed sets and decontamination need no network. Absent from a wheel install: the hub then.
BUNDLED_DATA = Path(__file__).resolve().parents[1] / "data"


def _number_text(value) -> str:
    """27.0 -> "27"; other values as written."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value).strip()


@dataclass(frozen=True)
class Benchmark:
    question_field: str
    answer: Callable[[dict], str]  # the reference answer from a raw record
    required: tuple[str, ...]
    hub: tuple[str, str | None, str]  # (dataset id, config, split)
    bundled: dict[str, str]  # split -> file under data/ (the same records as the hub split)
    solution: Callable[[dict], str | None] = lambda record: record.get("solution")
    train_split: str | None = None  # the hub split a seed set (training problems) comes from, where there is one


BENCHMARKS = {
    "gsm8k": Benchmark("question", lambda r: r["answer"].split("####")[-1].strip().replace(",", ""),
                       ("question", "answer"), ("openai/gsm8k", "main", "test"),
                       {"test": "gsm8k/test.jsonl", "train": "gsm8k/train.jsonl"}, solution=lambda r: r["answer"],
                       train_split="train"),
    "math500": Benchmark("problem", lambda r: str(r["answer"]).strip(), ("problem", "answer"),
                         ("HuggingFaceH4/MATH-500", None, "test"),
                         {"test": "math500/test.jsonl"}),
    "aime24": Benchmark("problem", lambda r: _number_text(r["answer"]), ("problem", "answer"),
                        ("HuggingFaceH4/aime_2024", None, "train"),
                        {"test": "aime24/test.jsonl"}),
    "amc23": Benchmark("question", lambda r: _number_text(r["answer"]), ("question", "answer"), ("math-ai/amc23", None, "test"),
                       {"test": "amc23/test.jsonl"}),
}


def load_benchmark(name: str, path_or_id: str | Path | None = None, train: bool = False) -> list[dict]:
    """Problems of a named benchmark, from `path_or_id` (a local JSONL file or a hub id; default: the copy the
    project ships under data/, else the hub's).

    `train=True` reads the set's training split (seed problems for generate); a local file is read as it is."""
    if name not in BENCHMARKS:
        raise BudgetReasonerError(f"unknown benchmark {name!r}; available: {', '.join(BENCHMARKS)}")
    spec = BENCHMARKS[name]
    bundled = spec.bundled.get("train" if train else "test")
    if not path_or_id and bundled and (BUNDLED_DATA / bundled).is_file():
        path_or_id = BUNDLED_DATA / bundled
    source = str(path_or_id) if path_or_id else spec.hub[0]
    if path_or_id and Path(path_or_id).exists():
        records = read_jsonl(Path(path_or_id), spec.required)
    else:
        import datasets  # a hub id; needs network access

        if train and spec.train_split is None:
            raise BudgetReasonerError(f"{name} has no training split to seed problems from; pass a local file as {name}=PATH")
        hub_id = source
        config = spec.hub[1] if hub_id == spec.hub[0] else None
        records = list(datasets.load_dataset(hub_id, config, split=spec.train_split if train else spec.hub[2]))
    rows = []
    for record in records:
        question = record[spec.question_field]
        rows.append({
            "id": f"{name}-" + hashlib.sha1(question.encode()).hexdigest()[:12],
            "domain": "math", "question": question, "answer": spec.answer(record),
            "source": f"{name}:{source}", "solution": spec.solution(record),
        })
    return rows


LETTERS = "ABCD"


def load_multiple_choice(path: str | Path, seed: int = 0) -> list[dict]:
    """GPQA-style CSV (`Question`, `Correct Answer`, `Incorrect Answer 1..3`) as lettered problems.

    The options are shuffled with `seed` (the same seed gives the same order), and the answer is the
    correct option's letter. GPQA itself is gated: download its CSV yourself and pass the path.
    """
    path = Path(path)
    if not path.is_file():
        raise BudgetReasonerError(f"{path}: file not found")
    fields = ["Question", "Correct Answer", "Incorrect Answer 1", "Incorrect Answer 2", "Incorrect Answer 3"]
    rows = []
    with path.open(newline="") as handle:
        reader = csv.DictReader(handle)
        missing = [name for name in fields if name not in (reader.fieldnames or [])]
        if missing:
            raise BudgetReasonerError(f"{path}: missing column(s) {', '.join(missing)}")
        for index, record in enumerate(reader):
            options = [record[name].strip() for name in fields[1:]]
            order = list(range(4))
            random.Random(f"{seed}:{index}").shuffle(order)
            shuffled = [options[i] for i in order]
            question = record["Question"].strip() + "\n" + "\n".join(f"{LETTERS[i]}) {text}" for i, text in enumerate(shuffled))
            rows.append({"id": f"choice-{index}", "domain": "choice", "question": question,
                         "answer": LETTERS[order.index(0)], "source": f"choice:{path}"})
    return rows


def parse_problem_source(spec: str) -> tuple[str, str | None]:
    """`NAME` or `NAME=PATH_OR_HUB_ID` (a preset's generate.seed_sets / generate.decontaminate entry)."""
    name, _, where = spec.partition("=")
    if name.strip() not in BENCHMARKS:
        raise BudgetReasonerError(f"problem set {spec!r}: unknown name {name.strip()!r}; use one of {', '.join(BENCHMARKS)}, "
                                  f"optionally as NAME=PATH_OR_HUB_ID")
    return name.strip(), where.strip() or None
