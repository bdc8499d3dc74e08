"""Problems: the problem-file contract and the benchmark loaders, read by generate (seed sets, decontamination)
and eval (held-out and benchmark problems) alike.

A problems file is JSONL with `id, domain, question, answer, source` (PROBLEM_COLUMNS). The loaders read GSM8K,
MATH-500, AIME24, AMC23, and MBPP and HumanEval (domain "code": the answer is the reference test code of
verify/code.py) from a local JSONL file or a hub id, and GPQA-style multiple choice from the user's CSV;
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
from budget_reasoner.verify.code import humaneval_reference, mbpp_reference

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
    domain: str = "math"  # whose verifier grades its answers
    question: Callable[[dict], str] | None = None  # the question from a raw record (default: its question_field)


# A code question is the task's own text; how to answer (think, then one ```python block) is the code domain's
# instruction (domains/code.py), put after it in the prompt. Wording shared by every question would be a 13-token
# n-gram (decontaminate.NGRAM) common to all of them: every training problem would overlap every held-out one.


def mbpp_question(record: dict) -> str:
    """The task and its tests, as the MBPP paper prompts (Austin et al., 2021): the tests name the function and
    show how it is called."""
    tests = "\n".join(test.strip() for test in record["test_list"])
    return f"{record['text'].strip()}\nTests:\n{tests}"


def humaneval_question(record: dict) -> str:
    """The signature and docstring to complete (imports and helpers included); the answer writes the whole function."""
    return f"Complete this Python function:\n\n{record['prompt'].strip()}"


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
    # Code (verify/code.py): the answer is the reference test code, run after the completion's last python block
    "mbpp": Benchmark("text", mbpp_reference, ("text", "test_list"), ("google-research-datasets/mbpp", "full", "test"),
                      {"test": "mbpp/sample.jsonl"}, solution=lambda r: r.get("code"), train_split="train", domain="code",
                      question=mbpp_question),
    "humaneval": Benchmark("prompt", humaneval_reference, ("prompt", "test", "entry_point"),
                           ("openai/openai_humaneval", None, "test"), {"test": "humaneval/sample.jsonl"},
                           solution=lambda r: r["prompt"] + r["canonical_solution"] if r.get("canonical_solution") else None,
                           domain="code", question=humaneval_question),
}


def load_benchmark(name: str, path_or_id: str | Path | None = None, train: bool = False) -> list[dict]:
    """Problems of a named benchmark, from `path_or_id` (a local JSONL file or a hub id; default: the copy the
    project ships under data/, else the hub's).

    `train=True` reads the set's training split (seed problems for generate); a local file is read as it is."""
    if name == "choice":
        return _choice_benchmark(path_or_id, train)
    if name not in BENCHMARKS:
        raise BudgetReasonerError(f"unknown benchmark {name!r}; available: {', '.join(BENCHMARK_NAMES)}")
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
    for number, record in enumerate(records, 1):
        try:
            question = spec.question(record) if spec.question else record[spec.question_field]
            answer, solution = spec.answer(record), spec.solution(record)
        except (KeyError, TypeError, AttributeError) as error:  # a field of the wrong kind (a test_list that is a string)
            raise BudgetReasonerError(f"{source}: row {number}: not a {name} record ({type(error).__name__}: {error})") from None
        rows.append({
            "id": f"{name}-" + hashlib.sha1(question.encode()).hexdigest()[:12],
            "domain": spec.domain, "question": question, "answer": answer,
            "source": f"{name}:{source}", "solution": solution,
        })
    return rows


def load_mbpp(path_or_id: str | Path | None = None, train: bool = False) -> list[dict]:
    """MBPP-format problems (`text`, `test_list`, `test_setup_code`, `code`) for the code domain: the question is
    the task and its asserts, the answer the reference tests (verify/code.py). Default: the sample under data/mbpp."""
    return load_benchmark("mbpp", path_or_id, train)


def load_humaneval(path_or_id: str | Path | None = None) -> list[dict]:
    """HumanEval-format problems (`prompt`, `test`, `entry_point`, `canonical_solution`; JSONL or the published
    .jsonl.gz) for the code domain. Default: the sample under data/humaneval."""
    return load_benchmark("humaneval", path_or_id)


LETTERS = "ABCD"
GPQA_COLUMNS = ("Question", "Correct Answer", "Incorrect Answer 1", "Incorrect Answer 2", "Incorrect Answer 3")
# What every choice question ends with. Under 13 tokens (decontaminate.NGRAM): a longer sentence shared by all
# of them would make every training question overlap every held-out one and be dropped.
CHOICE_ASK = "Answer with one letter in \\boxed{}."


def load_multiple_choice(path: str | Path, seed: int = 0) -> list[dict]:
    """A CSV in GPQA's column layout (`Question`, `Correct Answer`, `Incorrect Answer 1..3`; GPQA's other columns
    may be there and are not read, except `Record ID`, kept as the id) as lettered problems of the choice domain.

    Each problem's options are shuffled by a generator seeded with `seed` and the problem's own text, so the
    order is the same wherever the problem appears (another file, another position, eval or generate) and the
    correct letter is uniform over A-D across problems. The question lists the options as `A) ...` lines and asks
    for the letter in \\boxed{}; the answer is the correct option's letter. A missing column, or a row with an
    empty question or option, or a correct option that is also listed as incorrect, is one line naming the file
    and the row. GPQA itself is gated: download its CSV (e.g. gpqa_diamond.csv) yourself and pass the path.
    """
    path = Path(path)
    if not path.is_file():
        raise BudgetReasonerError(f"{path}: file not found")
    rows = []
    try:
        with path.open(newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            missing = [name for name in GPQA_COLUMNS if name not in (reader.fieldnames or [])]
            if missing:
                raise BudgetReasonerError(f"{path}: missing column(s) {', '.join(missing)} of GPQA's layout (Question, "
                                          f"Correct Answer, Incorrect Answer 1-3); it has "
                                          f"{', '.join(reader.fieldnames or []) or 'none'}")
            for number, record in enumerate(reader, 1):  # rows counted after the header, as a spreadsheet shows them
                rows.append(_choice_row(record, seed, f"{path}: row {number}", path))
    except (UnicodeDecodeError, csv.Error) as error:
        raise BudgetReasonerError(f"{path}: not a readable UTF-8 CSV ({type(error).__name__}: {error})") from None
    if not rows:
        raise BudgetReasonerError(f"{path}: no problems in it")
    return rows


def _choice_row(record: dict, seed: int, where: str, path: Path) -> dict:
    texts = {}
    for name in GPQA_COLUMNS:
        value = record.get(name)
        if not isinstance(value, str) or not value.strip():  # None: the row has fewer cells than the header
            raise BudgetReasonerError(f"{where}: {name} is empty")
        texts[name] = value.strip()
    stem, correct, *wrong = texts.values()
    if correct in wrong:  # two letters would be right
        raise BudgetReasonerError(f"{where}: the correct answer is also listed as {GPQA_COLUMNS[2 + wrong.index(correct)]}")
    # sha256 of the problem's text, not Python's hash(): the same order on every machine and run
    key = hashlib.sha256("\x00".join([str(seed), *texts.values()]).encode()).digest()
    order = [0, 1, 2, 3]  # 0 is the correct option
    random.Random(int.from_bytes(key[:8], "big")).shuffle(order)
    options = [correct, *wrong]
    listed = "\n".join(f"{LETTERS[slot]}) {options[option]}" for slot, option in enumerate(order))
    record_id = (record.get("Record ID") or "").strip()
    return {"id": f"choice-{record_id}" if record_id else "choice-" + hashlib.sha1(stem.encode()).hexdigest()[:12],
            "domain": "choice", "question": f"{stem}\n\n{listed}\n\n{CHOICE_ASK}", "answer": LETTERS[order.index(0)],
            "source": f"choice:{path.name}"}


def _choice_benchmark(path: str | Path | None, train: bool) -> list[dict]:
    """`choice=PATH.csv` as a benchmark (eval.benchmarks, generate.decontaminate): the user's GPQA-style CSV."""
    if train:
        raise BudgetReasonerError("choice has no training split to seed problems from; train on a choice file with "
                                  "--domain choice --problems FILE.csv")
    if not path:
        raise BudgetReasonerError("choice needs its file, a CSV in GPQA's layout (eval --benchmark choice --problems "
                                  "FILE.csv, or choice=FILE.csv in a preset's list); GPQA is gated, so none ships")
    return load_multiple_choice(path)


BENCHMARK_NAMES = (*BENCHMARKS, "choice")  # what eval.benchmarks, generate.decontaminate and eval --benchmark take


def benchmark_domain(name: str) -> str:
    """The verifier that grades a benchmark's answers, whatever domain the run trains on."""
    return "choice" if name == "choice" else BENCHMARKS[name].domain


def parse_problem_source(spec: str) -> tuple[str, str | None]:
    """`NAME` or `NAME=PATH_OR_HUB_ID` (a preset's generate.seed_sets / generate.decontaminate entry)."""
    name, _, where = spec.partition("=")
    if name.strip() not in BENCHMARK_NAMES:
        raise BudgetReasonerError(f"problem set {spec!r}: unknown name {name.strip()!r}; use one of {', '.join(BENCHMARK_NAMES)}, "
                                  f"optionally as NAME=PATH_OR_HUB_ID")
    return name.strip(), where.strip() or None


PROBLEM_FILE_COLUMNS = ("question", "answer", "id")  # what --columns may map; id is optional
PROBLEM_FILE_KINDS = (".jsonl", ".csv", ".parquet")


def parse_columns(text: str | None) -> dict[str, str]:
    """`--columns question=prompt,answer=solution`: our column -> the file's."""
    mapping = {}
    for item in (text or "").split(","):
        if not item.strip():
            continue
        ours, separator, theirs = (part.strip() for part in item.partition("="))
        if not separator or not theirs or ours not in PROBLEM_FILE_COLUMNS:
            raise BudgetReasonerError(f"--columns {text!r}: expected OURS=THEIRS pairs with OURS one of "
                                      f"{', '.join(PROBLEM_FILE_COLUMNS)}, e.g. question=prompt,answer=solution")
        mapping[ours] = theirs
    return mapping


def load_problem_file(path: str | Path, columns: dict[str, str] | None = None, domain: str = "math") -> list[dict]:
    """A user's problems (`--problems`): JSONL, CSV or Parquet with a question and an answer column (named by
    `columns`, default `question` and `answer`; an `id` column is kept), as problem rows. A missing column, or a
    row without a question or answer, is one line naming the file and the row (JSONL: its line)."""
    path, given = Path(path), bool(columns)
    columns = {"question": "question", "answer": "answer", **(columns or {})}
    if not path.is_file():
        raise BudgetReasonerError(f"{path}: file not found")
    if path.suffix.lower() not in PROBLEM_FILE_KINDS:
        raise BudgetReasonerError(f"{path}: a problems file must be {', '.join(PROBLEM_FILE_KINDS)}, got {path.suffix or 'no suffix'}")
    try:
        where, records, names = _read_table(path)
    except (UnicodeDecodeError, csv.Error) as error:  # not UTF-8 text, or a CSV its reader cannot split
        raise BudgetReasonerError(f"{path}: not readable as {path.suffix.lower()[1:].upper()} ({error})") from None
    missing = [f"{theirs!r} (for {ours})" for ours, theirs in columns.items() if ours != "id" and theirs not in names]
    if missing:
        mapping = "" if given else "; map yours with --columns question=NAME,answer=NAME"
        raise BudgetReasonerError(f"{path}: missing column(s) {', '.join(missing)}; it has {', '.join(map(str, names)) or 'none'}{mapping}")
    rows = []
    for number, record in records:
        row = {}
        for ours in ("question", "answer"):
            value = record.get(columns[ours])
            if isinstance(value, float) and value != value:  # a CSV's or Parquet's empty cell read as NaN
                value = None
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                value = _number_text(value)
            if not isinstance(value, str) or not value.strip():
                raise BudgetReasonerError(f"{path}: {where} {number}: {ours} (column {columns[ours]!r}) must be "
                                          f"non-empty text, got {value!r}")
            row[ours] = value.strip()
        given_id = record.get(columns.get("id", "id"))
        rows.append({"id": str(given_id) if given_id not in (None, "") else
                     f"{domain}-" + hashlib.sha1(row["question"].encode()).hexdigest()[:12],
                     "domain": domain, "question": row["question"], "answer": row["answer"], "source": f"file:{path.name}"})
    if not rows:
        raise BudgetReasonerError(f"{path}: no problems in it")
    return rows


def _read_table(path: Path) -> tuple[str, list[tuple[int, dict]], list[str]]:
    """(what a row is called in errors, the numbered records, the column names) of a JSONL, CSV or Parquet file."""
    kind = path.suffix.lower()
    if kind == ".jsonl":
        from budget_reasoner.io import jsonl_records

        records = list(jsonl_records(path, errors="strict"))
        return "line", records, list(dict.fromkeys(name for _, record in records for name in record))
    if kind == ".csv":
        with path.open(newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            records = list(enumerate(reader, 1))  # rows counted after the header
        return "row", records, list(reader.fieldnames or [])
    try:
        import pyarrow.parquet as parquet

        table = parquet.read_table(path)
    except Exception as error:  # not Parquet, or damaged: say so in one line
        raise BudgetReasonerError(f"{path}: not a readable Parquet file ({type(error).__name__}: {error})") from None
    return "row", list(enumerate(table.to_pylist(), 1)), table.column_names
