"""The built-in code domain (domains/code.py): its problem files, prompt, offline refusal, and generate and eval
through the CLI. The teacher is a loopback server answering in OpenAI's documented chat-completion shape with canned
completions whose correctness is known by construction (a right function, an off-by-one, prose without code, a right
function that exits before the tests run); the sandbox decides which chains are kept."""

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from budget_reasoner.domains import get_domain, with_instruction
from budget_reasoner.errors import BudgetReasonerError
from budget_reasoner.io import read_jsonl, read_shards
from tests.conftest import invoke, one_error_line
from tests.loopback_http import JsonHandler, LoopbackServer

PROJECT_DATA = Path(__file__).resolve().parents[1] / "data"

# Tasks in MBPP's layout, each with a right solution (`body`) and a wrong one (`wrong`: off by a little).
TASKS = [
    ("add_two", "Write a function to add two numbers.", "a, b", "return a + b", "return a + b + 1",
     ["assert add_two(2, 3) == 5", "assert add_two(-1, 1) == 0"]),
    ("is_even", "Write a python function to check whether a number is even.", "n", "return n % 2 == 0",
     "return n % 2 == 1", ["assert is_even(4) == True", "assert is_even(7) == False"]),
    ("reverse_text", "Write a function to reverse a string.", "s", "return s[::-1]", "return s",
     ["assert reverse_text('abc') == 'cba'", "assert reverse_text('') == ''"]),
    ("square_all", "Write a function that squares every number of a list.", "xs", "return [x * x for x in xs]",
     "return [x * 2 for x in xs]", ["assert square_all([1, 2, 3]) == [1, 4, 9]", "assert square_all([]) == []"]),
    ("count_vowels", "Write a function to count the vowels in a lowercase word.", "s",
     "return sum(c in 'aeiou' for c in s)", "return len(s)", ["assert count_vowels('banana') == 3"]),
    ("largest_of_three", "Write a function to find the largest of three numbers.", "a, b, c", "return max(a, b, c)",
     "return min(a, b, c)", ["assert largest_of_three(1, 5, 3) == 5", "assert largest_of_three(9, 2, 4) == 9"]),
    ("factorial_of", "Write a function to compute the factorial of a non-negative integer.", "n",
     "return 1 if n < 2 else n * factorial_of(n - 1)", "return n", ["assert factorial_of(5) == 120"]),
    ("first_letter", "Write a function to get the first character of a non-empty string.", "s", "return s[0]",
     "return s[-1]", ["assert first_letter('hello') == 'h'"]),
]
KINDS = ("right", "wrong", "prose", "exits")  # what a canned completion is; only "right" passes the tests


def mbpp_record(task) -> dict:
    name, text, args, body, _, tests = task
    return {"task_id": name, "text": text, "code": f"def {name}({args}):\n    {body}\n", "test_setup_code": "",
            "test_list": tests, "challenge_test_list": []}


def write_mbpp(path: Path, records) -> Path:
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return path


def completion(task, kind: str) -> str:
    """A chain of the given kind for `task`, in the chain format: thinking, then one python block (or none)."""
    name, _, args, body, wrong, _ = task
    thought = f"<think>\nThe function {name} takes {args}.\n</think>\n"
    if kind == "prose":
        return thought + f"Define {name} and return the result."
    code = f"def {name}({args}):\n    {wrong if kind == 'wrong' else body}\n"
    if kind == "exits":  # right, then leaves before any test runs: the program did not pass
        code += "import os\nos._exit(0)\n"
    return thought + f"```python\n{code}```"


def task_in(text: str):
    return next(task for task in TASKS if f"{task[0]}(" in text)


class CannedCodeServer(LoopbackServer):
    """POST /v1/chat/completions in the shape OpenAI's API reference documents (as tests/test_teachers.py's
    StubServer): `{"id", "object": "chat.completion", "created", "model", "choices": [{"index", "message": {"role",
    "content"}, "finish_reason"}], "usage": {...}}`. Choice i of a request with seed s is KINDS[(s + i) % 4]'s
    completion for the task its prompt names; every request body is kept."""

    def __init__(self):
        self.requests = []
        server = self

        class Handler(JsonHandler):
            def do_POST(self):
                body = self.body()
                server.requests.append(body)
                task = task_in(body["messages"][-1]["content"])
                texts = [completion(task, KINDS[(body["seed"] + i) % len(KINDS)]) for i in range(body["n"])]
                self.reply(200, {
                    "id": f"chatcmpl-{len(server.requests)}", "object": "chat.completion", "created": 0,
                    "model": body["model"], "choices": [{"index": i, "message": {"role": "assistant", "content": text},
                                                         "finish_reason": "stop"} for i, text in enumerate(texts)],
                    "usage": {"prompt_tokens": 10, "completion_tokens": 20 * len(texts),
                              "total_tokens": 10 + 20 * len(texts)}})

        self.start(Handler)


@pytest.fixture
def canned_server(monkeypatch):
    server = CannedCodeServer()
    monkeypatch.setenv("BUDGET_REASONER_TEACHER_URL", server.url)
    yield server
    server.close()


# ------------------------------------------------------------------------------------------- problems and prompt

def test_the_three_layouts_read_as_problem_rows_whose_answers_are_tests(tmp_path):
    domain = get_domain("code", grading_only=True)
    mbpp = domain.read_problem_file(PROJECT_DATA / "mbpp" / "sample.jsonl")
    humaneval = domain.read_problem_file(PROJECT_DATA / "humaneval" / "sample.jsonl")
    assert (len(mbpp), len(humaneval)) == (30, 40)  # the bundled samples, every record
    first = json.loads((PROJECT_DATA / "mbpp" / "sample.jsonl").read_text().splitlines()[0])
    assert mbpp[0]["question"].startswith(first["text"]) and all(t in mbpp[0]["question"] for t in first["test_list"])
    assert mbpp[0]["answer"] == "\n".join(first["test_list"]) + "\n"  # verify/code.py's reference format
    record = json.loads((PROJECT_DATA / "humaneval" / "sample.jsonl").read_text().splitlines()[0])
    assert record["prompt"].strip() in humaneval[0]["question"] and f"check({record['entry_point']})" in humaneval[0]["answer"]
    # the problems contract: question/answer columns (mappable), the answer being test code
    contract = tmp_path / "mine.csv"
    contract.write_text('task,tests\n"Write double(x).","assert double(2) == 4"\n')
    rows = domain.read_problem_file(contract, {"question": "task", "answer": "tests"})
    assert rows == [{"id": rows[0]["id"], "domain": "code", "question": "Write double(x).",
                     "answer": "assert double(2) == 4", "source": "file:mine.csv"}]
    assert all(set(row) == {"id", "domain", "question", "answer", "source"} for row in mbpp + humaneval)


def test_a_row_whose_tests_cannot_grade_is_one_line_naming_the_file_and_problem(tmp_path):
    domain = get_domain("code", grading_only=True)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": "Write f.", "answer": "assert f() == 1"}) + "\n"
                   + json.dumps({"question": "Write g.", "answer": "g() should be 2"}) + "\n")
    with pytest.raises(BudgetReasonerError, match=r"bad.jsonl: problem 2 \(id code-\w+\): its answer must be reference "
                                                  r"test code .*not Python"):
        domain.read_problem_file(bad)
    no_assert = write_mbpp(tmp_path / "empty_tests.jsonl", [{**mbpp_record(TASKS[0]), "test_list": ["add_two(1, 2)"]}])
    with pytest.raises(BudgetReasonerError, match=r"empty_tests.jsonl: problem 1 .*no assert"):
        domain.read_problem_file(no_assert)


def test_without_a_problems_file_the_domain_says_which_file_it_wants():
    with pytest.raises(BudgetReasonerError, match=r"domain code has no problems of its own; pass --problems FILE "
                                                  r"\(an MBPP- or HumanEval-format JSONL"):
        get_domain("code")


def test_held_out_questions_of_real_benchmarks_do_not_overlap_for_their_wording():
    """The question texts carry no sentence common to every problem: one would be a 13-gram shared by all, and
    decontamination against the held-out split would then drop every training problem (it did, before)."""
    from budget_reasoner.generate.decontaminate import decontaminate

    rows = get_domain("code", grading_only=True).read_problem_file(PROJECT_DATA / "mbpp" / "sample.jsonl")
    kept, removed = decontaminate(rows[:15], {"held-out": [row["question"] for row in rows[15:]]})
    assert len(kept) == 15 and removed == {"held-out": 0}


def test_the_instruction_asks_for_thinking_and_one_python_block_in_place_of_the_boxed_answer():
    from budget_reasoner.config import load_preset

    real = load_preset("24gb")
    assert "\\boxed{}" in real.generate.instruction
    prompted = with_instruction(real, get_domain("code", grading_only=True))
    instruction = prompted.generate.instruction
    assert "<think>" in instruction and "</think>" in instruction and "```python" in instruction
    assert "boxed" not in instruction
    assert with_instruction(prompted, "code") == prompted  # by name too (eval --benchmark mbpp), and only once
    assert with_instruction(load_preset("cpu-tiny"), "code").generate.instruction == instruction  # even where empty
    assert with_instruction(real, "math") == real and with_instruction(real, "numeric") == real


# ------------------------------------------------------------------------------------------- the offline world

def test_quickstart_on_cpu_tiny_refuses_in_one_line_with_the_command_for_real_models(tmp_path):
    line = one_error_line(invoke("quickstart", "--domain", "code", "--preset", "cpu-tiny", "--out", tmp_path / "run"))
    assert "domain code has no offline world" in line and "needs a real student and teacher" in line
    assert "quickstart --domain code --problems" in line and "--set model.student=Qwen/Qwen2.5-Coder" in line
    assert not (tmp_path / "run").exists()  # refused before anything is written


# ------------------------------------------------------------------------------------------- generate and eval

def test_generate_keeps_exactly_the_chains_whose_code_passes_the_tests(canned_server, tmp_path, capfd):
    """generate --domain code against a loopback teacher: every chain's verdict is the sandbox's, and it matches
    what each canned completion is; the SFT set holds only right code, the pairs right against the rest. A real
    preset's math settings do not leak in: its \\boxed{} instruction is replaced, its GSM8K seed set left out. A
    training problem that is an MBPP test problem is dropped (the domain decontaminates against MBPP, HumanEval)."""
    copied = json.loads((PROJECT_DATA / "mbpp" / "sample.jsonl").read_text().splitlines()[0])  # an eval problem
    problems = write_mbpp(tmp_path / "train.jsonl", [mbpp_record(task) for task in TASKS] + [copied])
    out = tmp_path / "data"
    result = invoke("generate", "--teacher", "openai:stub-coder", "--domain", "code", "--problems", problems,
                    "--preset", "cpu-tiny", "--out", out,
                    "--set", "generate.instruction=Please reason step by step, and put your final answer within \\boxed{}.",
                    "--set", "generate.seed_sets=[gsm8k]", "--set", "generate.num_train_problems=20",
                    "--set", "generate.num_eval_problems=2", "--set", "generate.samples_per_problem=4",
                    "--set", "generate.shard_size=4")
    assert result.exit_code == 0, result.output
    said = capfd.readouterr()
    assert "seed set(s) gsm8k left out" in said.out + said.err + result.output

    train = read_jsonl(out / "problems" / "train.jsonl")
    held_out = read_jsonl(out / "problems" / "held_out.jsonl")
    assert all(row["domain"] == "code" for row in train + held_out)
    assert not any(row["source"].startswith("gsm8k") for row in train)
    assert copied["text"] not in "".join(row["question"] for row in train)  # never trained on
    dropped = json.loads((out / "problems" / "COMPLETE.json").read_text())["contaminated_dropped"]
    copy_held_out = any(copied["text"] in row["question"] for row in held_out)
    assert dropped["mbpp"] == (0 if copy_held_out else 1) and dropped["held-out"] == 0
    assert len(train) == len(TASKS) + 1 - len(held_out) - dropped["mbpp"]

    # the prompts: the task and its tests, then the code instruction (not the preset's boxed one)
    for body in canned_server.requests:
        content = body["messages"][-1]["content"]
        assert "Tests:\nassert " in content and "```python block" in content and "boxed" not in content

    chains = read_shards(out / "chains")
    assert len(chains) == 4 * len(train)
    kinds = [("prose" if "```python" not in row["completion"] else "exits" if "os._exit" in row["completion"]
              else "wrong" if f"    {task_in(row['completion'])[4]}\n" in row["completion"] else "right")
             for row in chains]
    assert sorted(set(kinds)) == sorted(KINDS)
    assert [row["correct"] for row in chains] == [kind == "right" for kind in kinds]  # the sandbox's verdicts

    sft = read_jsonl(out / "sft" / "train.jsonl")
    assert len(sft) == len(train)  # one distinct right chain per problem
    assert all(row["completion"][0]["content"] == completion(task_in(row["completion"][0]["content"]), "right")
               for row in sft)
    assert all("```python" in row["prompt"][-1]["content"] for row in sft)  # trained with the prompt it is asked with
    pairs = read_jsonl(out / "pairs" / "train.jsonl")
    assert pairs and all(row["chosen"][0]["content"] != row["rejected"][0]["content"] for row in pairs)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["verified_chains"] == len(train) and summary["teacher_pass_rate"] == 0.25


def test_eval_on_an_mbpp_file_reports_pass_at_k_and_votes_by_normalized_program(tmp_path, monkeypatch):
    """eval --domain code --problems FILE.jsonl (MBPP's layout), the model replaced by canned completions: accuracy,
    pass@1 (mean c/k), pass@k (any right) and maj@k from the sandbox's verdicts; two wrong programs that differ only in
    comments and spacing vote together and outvote a single right one."""
    from budget_reasoner.eval import run

    problems = write_mbpp(tmp_path / "mbpp.jsonl", [mbpp_record(task) for task in TASKS[:3]])
    reformatted = {task[0]: completion(task, "wrong").replace(f"def {task[0]}(", f"# a draft\ndef  {task[0]}(")
                   for task in TASKS[:3]}
    plan = {  # task -> (first answer's kind, the 4 samples' kinds; "wrong2" is "wrong" reformatted)
        "add_two": ("right", ["right", "right", "right", "prose"]),  # c = 3: the vote is right
        "is_even": ("wrong", ["right", "wrong", "wrong2", "prose"]),  # c = 1: wrong 2 votes to right's 1
        "reverse_text": ("exits", ["exits", "wrong", "prose", "prose"]),  # c = 0
    }
    prompts_seen = []

    def text(task, kind):
        return reformatted[task[0]] if kind == "wrong2" else completion(task, kind)

    def answers(model, tokenizer, prompts, texts, preset, label, seed):
        prompts_seen.extend(prompt[-1]["content"] for prompt in prompts)
        tasks = [task_in(prompt[-1]["content"]) for prompt in prompts]
        first = [text(task, plan[task[0]][0]) for task in tasks]
        samples = [[SimpleNamespace(text=text(task, kind), tokens=9, mean_logprob=-float(k))
                    for k, kind in enumerate(plan[task[0]][1])] for task in tasks]
        return first, [5] * len(tasks), samples

    monkeypatch.setattr(run, "fit_questions", lambda model, problems, source, preset: [p["question"] for p in problems])
    monkeypatch.setattr(run, "load_for_inference", lambda *args: (None, None))
    monkeypatch.setattr(run, "prompt_texts", lambda tokenizer, prompts: prompts)
    monkeypatch.setattr(run, "_generate_answers", answers)
    result = invoke("eval", "--model", "canned", "--domain", "code", "--problems", problems, "--samples", 4,
                    "--preset", "cpu-tiny", "--out", tmp_path / "ev")
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "ev" / "summary.json").read_text())
    assert summary["problems"] == 3 and summary["accuracy"] == pytest.approx(1 / 3)  # only add_two's first is right
    assert summary["pass@1"] == pytest.approx((3 + 1 + 0) / 12)
    assert summary["pass@4"] == pytest.approx(2 / 3)
    assert summary["maj@4"] == pytest.approx(1 / 3)  # is_even: the two wrong spellings are one program, and win
    assert summary["reference_errors"] == 0
    assert "| pass@4 |" in result.output and "| maj@4 |" in result.output
    rows = {row["id"]: row for row in read_jsonl(tmp_path / "ev" / "results.jsonl")}
    is_even = next(row for row in rows.values() if "is_even(" in row["question"])
    assert is_even["votes"] and max(is_even["votes"].values()) == 2 and not is_even["majority_correct"]
    assert all("```python block" in prompt and "boxed" not in prompt for prompt in prompts_seen)
