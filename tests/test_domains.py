"""The domain interface: the README's custom domain run as written, a module's missing pieces each one line, and
--problems files (JSONL, CSV, Parquet) with mapped columns and their bad rows."""

import json
import re
from pathlib import Path

import pytest

from budget_reasoner import verify
from budget_reasoner.domains import ProblemFile, get_domain, recorded
from budget_reasoner.errors import BudgetReasonerError
from budget_reasoner.eval.metrics import majority
from budget_reasoner.generate import generate
from budget_reasoner.generate.pipeline import write_problems
from budget_reasoner.io import read_jsonl, read_shards
from tests.conftest import invoke, one_error_line

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_domain(tmp_path) -> Path:
    """The custom domain exactly as the README shows it: the first python block of its "Domains" section."""
    section = README.read_text().split("## Domains:", 1)[1].split("\n## ", 1)[0]
    code = re.search(r"```python\n(.*?)```", section, re.DOTALL).group(1)
    assert len(code.splitlines()) < 60  # the README promises a complete domain in under 60 lines
    path = tmp_path / "clock.py"
    path.write_text(code)
    return path


def clock(question: str) -> int:
    """An independent reading of a clock question: start hour, then signed moves, on a 12-hour dial."""
    start, *moves = re.findall(r"[+-]?\d+", question)
    return (int(start) + sum(map(int, moves)) - 1) % 12 + 1


class ClockTeacher:
    """Right on even samples, an hour late on odd ones (so both verdicts and pairs exist)."""

    name = "clock-teacher"

    def sample(self, prompts, num_samples, temperature, max_new_tokens, seed):
        return [[f"<think>\n</think>\n\\boxed{{{clock(prompt[-1]['content'].split(chr(10))[0]) % 12 + k % 2}}}"
                 for k in range(num_samples)] for prompt in prompts]


def test_the_readme_domain_runs_through_generate_and_eval_grading(tmp_path, tiny_preset):
    path = readme_domain(tmp_path)
    domain = get_domain(str(path))
    assert domain.name == "clock" and domain.origin == str(path)
    summary = generate(tmp_path / "data", tiny_preset, ClockTeacher(), domain)
    problems = read_jsonl(tmp_path / "data" / "problems" / "train.jsonl")
    held_out = read_jsonl(tmp_path / "data" / "problems" / "held_out.jsonl")
    assert {p["domain"] for p in problems + held_out} == {"clock"}
    assert all(int(p["answer"]) == clock(p["question"]) for p in problems + held_out)
    assert not {p["question"] for p in problems} & {p["question"] for p in held_out}
    chains = read_shards(tmp_path / "data" / "chains")
    # the module's own check decided: even samples right (12 written as 0 included), odd ones an hour late
    assert all(row["correct"] == (row["sample_index"] % 2 == 0) for row in chains)
    assert summary["sft_examples"] > 0 and summary["pairs"] > 0
    # eval grades through verify with the same domain: extract, and equivalent for majority vote (0 = 12)
    assert verify.extract(domain, "so \\boxed{3} then \\boxed{12}") == "12"
    assert verify.check(str(path), "\\boxed{0}", "12") and not verify.check(domain, "\\boxed{1}", "12")
    assert verify.check(recorded(domain), "\\boxed{0}", "12")  # what run.json keeps: chat and export grade with it
    vote = majority(domain, ["\\boxed{12}", "\\boxed{0}", "\\boxed{5}"], "12")
    assert vote.correct
    # its offline world: the pieces pretrain draws on are there, with worked steps
    domain.require_offline()
    skills = domain.skills(domain.draw(3, 0, 2, 2))
    assert len(skills) == 6 and all(len(skill.steps) == 1 and skill.steps[0].endswith("=" + skill.answer)
                                     for skill in skills)


def module(tmp_path, text: str, name: str = "mine.py") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_a_module_without_a_verifier_is_one_line_naming_the_file(tmp_path):
    path = module(tmp_path, "def make_problems(count, seed, min_steps, max_steps, exclude):\n    return []\n")
    with pytest.raises(BudgetReasonerError) as error:
        get_domain(path)
    assert str(error.value) == (f"{path}: no verifier: set VERIFIER to a verifier's name (math, logic, choice, numeric, "
                                f"exact, regex:PATTERN, code) or define check(completion, reference) -> bool")


def test_each_missing_or_malformed_piece_is_its_own_line(tmp_path):
    path = module(tmp_path, "NAME = 'has space'\nVERIFIER = 'nope'\nrejected_prefix = 3\n")
    with pytest.raises(BudgetReasonerError) as error:
        get_domain(path)
    lines = str(error.value).splitlines()
    assert len(lines) == 4 and all(line.startswith(f"{path}: ") for line in lines)
    assert "NAME must be" in lines[0] and "VERIFIER: no verifier 'nope'" in lines[1]
    assert "no problem source" in lines[2] and "rejected_prefix must be a function" in lines[3]
    both = module(tmp_path, "VERIFIER = 'exact'\ndef check(c, r):\n    return True\nPROBLEMS = 'gone.csv'\n", "both.py")
    with pytest.raises(BudgetReasonerError) as error:
        get_domain(both)
    assert [line.split(": ", 1)[1] for line in str(error.value).splitlines()] == [
        "defines both VERIFIER and check(); keep one", f"PROBLEMS file {tmp_path / 'gone.csv'} not found"]


def test_a_module_that_fails_to_import_names_its_line(tmp_path):
    path = module(tmp_path, "VERIFIER = 'exact'\n\nraise ValueError('boom')\n")
    with pytest.raises(BudgetReasonerError, match=re.escape(f"{path}:3: the domain module failed to import (ValueError: boom)")):
        get_domain(path)
    with pytest.raises(BudgetReasonerError, match="unknown domain 'chess'"):
        get_domain("chess")
    with pytest.raises(BudgetReasonerError, match="domain file .*nothere.py not found"):
        get_domain(str(tmp_path / "nothere.py"))


def test_the_cli_says_a_bad_domain_in_one_line(tmp_path):
    path = module(tmp_path, "def make_problems(count, seed, min_steps, max_steps, exclude):\n    return []\n")
    line = one_error_line(invoke("generate", "--teacher", "unused", "--domain", path, "--preset", "cpu-tiny",
                                 "--out", tmp_path / "o"))
    assert line.startswith(f"error: {path}: no verifier")


# ---- --problems: a user's file with question and answer columns -----------------------------------------------

ROWS = [{"prompt": f"What is {i} + {i}?", "solution": str(2 * i), "extra": "x"} for i in range(1, 41)]


def write_table(path: Path, rows: list[dict]) -> Path:
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    elif path.suffix == ".csv":
        import csv

        with path.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)
    return path


@pytest.mark.parametrize("suffix", [".jsonl", ".csv", ".parquet"])
def test_problems_file_with_mapped_columns_is_split_and_decontaminated(tmp_path, tiny_preset, suffix):
    rows = ROWS + [ROWS[0]]  # one repeat, dropped like the built-ins' (it may also sit in the held-out split)
    path = write_table(tmp_path / f"qa{suffix}", rows)
    domain = get_domain("math", ProblemFile(path, {"question": "prompt", "answer": "solution"}), verifier="numeric")
    tiny_preset.generate.num_eval_problems, tiny_preset.generate.num_train_problems = 10, 100
    train, held_out = write_problems(tmp_path / "problems", tiny_preset, domain)
    questions = [row["question"] for row in train]
    assert len(held_out) == 10 and not set(questions) & {row["question"] for row in held_out}
    assert len(questions) == len(set(questions)) and set(questions) | {r["question"] for r in held_out} == {
        row["prompt"] for row in ROWS}
    assert all(row["answer"] == str(2 * int(row["question"].split()[2])) for row in train + held_out)
    assert verify.check(domain, "\\boxed{4.0}", "4") and not verify.check(domain, "\\boxed{5}", "4")
    again, _ = write_problems(tmp_path / "again", tiny_preset, domain)
    assert again == train  # the same seed, the same split


def test_problems_file_bad_input_is_one_line_each(tmp_path):
    csv_path = write_table(tmp_path / "qa.csv", ROWS[:3] + [{"prompt": "What?", "solution": "", "extra": ""}])
    mapping = {"question": "prompt", "answer": "solution"}
    cases = [
        (lambda: get_domain("math", ProblemFile(csv_path, mapping))._file_splits(1, 1, 0),
         f"{csv_path}: row 4: answer (column 'solution') must be non-empty text, got ''"),
        (lambda: get_domain("math", ProblemFile(csv_path))._file_splits(1, 1, 0),
         f"{csv_path}: missing column(s) 'question' (for question), 'answer' (for answer); it has prompt, solution, "
         f"extra; map yours with --columns question=NAME,answer=NAME"),
        (lambda: get_domain("math", ProblemFile(csv_path, mapping), verifier="fuzzy"),
         "no verifier 'fuzzy'; available: math, choice, logic, numeric, exact"),
        (lambda: get_domain("math", ProblemFile(csv_path, mapping), verifier="regex:(unclosed"),
         "verifier regex:(unclosed: not a valid regular expression"),
        (lambda: get_domain("math", ProblemFile(tmp_path / "none.csv")), f"--problems {tmp_path / 'none.csv'}: file not found"),
    ]
    jsonl = tmp_path / "qa.jsonl"
    jsonl.write_text('{"question": "a", "answer": "1"}\n\n{"question": "b", "answer": null}\n')
    cases.append((lambda: get_domain("math", ProblemFile(jsonl))._file_splits(1, 1, 0),
                  f"{jsonl}: line 3: answer (column 'answer') must be non-empty text, got None"))
    for call, message in cases:
        with pytest.raises(BudgetReasonerError) as error:
            call()
        assert str(error.value).startswith(message) and "\n" not in str(error.value), str(error.value)


def test_the_cli_reads_problems_and_columns(tmp_path):
    path = write_table(tmp_path / "qa.csv", ROWS)
    line = one_error_line(invoke("generate", "--teacher", "unused", "--problems", path, "--verifier", "sloppy",
                                 "--preset", "cpu-tiny", "--out", tmp_path / "o"))
    assert line.startswith("error: no verifier 'sloppy'; available: math, choice, logic, numeric, exact")
    line = one_error_line(invoke("generate", "--teacher", "unused", "--columns", "question=prompt", "--preset", "cpu-tiny",
                                 "--out", tmp_path / "o"))
    assert "pass --problems FILE too" in line
    line = one_error_line(invoke("generate", "--teacher", "unused", "--problems", path, "--columns", "prompt",
                                 "--preset", "cpu-tiny", "--out", tmp_path / "o"))
    assert "expected OURS=THEIRS pairs" in line


def test_plain_verifiers_by_hand():
    # numeric: the boxed number (or the last number when there is no box), to a relative 1e-6
    assert verify.check("numeric", "so it costs \\boxed{\\$1,000.00}", "1000")
    assert verify.check("numeric", "The answer is 45%", "45")
    assert verify.check("numeric", "\\boxed{1/3}", "0.3333333333")
    assert not verify.check("numeric", "\\boxed{0.34}", "1/3")
    assert not verify.check("numeric", "\\boxed{3} or \\boxed{4}", "4")  # hedging
    assert verify.grade("numeric", "\\boxed{4}", "four").error == "reference answer 'four' is not a number"
    # exact: the boxed text, whitespace squeezed, case kept
    assert verify.check("exact", "\\boxed{ New  York }", "New York")
    assert not verify.check("exact", "\\boxed{new york}", "New York")
    assert verify.extract("exact", "The answer is Paris.") == "Paris"
    # regex: the pattern's last match, its first group
    assert verify.check("regex:Answer: (\\w+)", "Answer: no\nAnswer: yes", "yes")
    assert not verify.check("regex:Answer: (\\w+)", "\\boxed{yes}", "yes")
    assert verify.check("regex:[A-D]$", "I pick C", "C")


# ---- a preset's per-domain settings ------------------------------------------------------------------------------

def test_a_presets_domain_entry_applies_to_that_domain_only_and_set_wins(tmp_path):
    from budget_reasoner.config import PRESETS_DIR, for_domain, load_preset

    text = (PRESETS_DIR / "cpu-tiny.yaml").read_text().split("\ndomains:")[0]  # cpu-tiny without its entries
    plain = tmp_path / "plain.yaml"
    plain.write_text(text)
    with_entries = tmp_path / "entries.yaml"
    with_entries.write_text(text + "\ndomains:\n  logic: {sft.max_steps: 77, dpo.beta: 0.2}\n")
    preset = load_preset(with_entries)
    assert for_domain(preset, "logic").sft.max_steps == 77 and for_domain(preset, "logic").dpo.beta == 0.2
    # another domain's run (math) is the preset as if it had no entries: same values, same fingerprint
    assert for_domain(preset, "math").to_dict() == load_preset(plain).to_dict()
    assert for_domain(load_preset(with_entries, {"sft.max_steps": 5}), "logic").sft.max_steps == 5  # --set wins
    bad = tmp_path / "bad.yaml"
    bad.write_text(text + "\ndomains:\n  logic: {sft.max_stepz: 77}\n")
    with pytest.raises(BudgetReasonerError, match=r"bad.yaml \(domains.logic\): unknown key 'sft.max_stepz'"):
        load_preset(bad)
