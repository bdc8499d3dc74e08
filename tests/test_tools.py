"""Chains that call tools (tools.py, issue 16 item 6): the call/observation loop on a scripted "model", calls that hang,
flood or come too often; the local stop at a call's closing fence; output blocks out of SFT's and DPO's loss (labels
built the way the stages build them, checked against the tokenizer's own character offsets); eval --tools counting
the calls; the bignum domain's chains."""

import json
import re

import pytest
import torch

from budget_reasoner.sampling import Generated
from budget_reasoner.tools import (ToolSettings, calls_in, complete_with_tools, find_call, observation_tokens)
from tests.conftest import TINY, invoke

FAST = ToolSettings(max_calls=3, timeout_s=1.0, output_bytes=64)


def scripted(segments: dict[str, list[str]], log: list | None = None):
    """A fake `generate`: a text's next segment is its script's (the text's first character picks the script), the
    one after as many output blocks as the text holds. Counts its tokens as characters."""

    def generate(texts, budgets, num_samples, seed):
        if log is not None:
            log.append(list(zip(texts, budgets)))
        answers = []
        for text in texts:
            script = segments[text[0]]
            segment = script[min(text.count("```output\n"), len(script) - 1)]
            answers.append([Generated(segment, -0.25, len(segment)) for _ in range(num_samples)])
        return answers

    return generate


def test_a_call_runs_its_output_is_appended_and_generation_goes_on():
    log = []
    generate = scripted({"Q": ["<think>\n```python\nx = 6\nprint(x*7)\n```\nnever kept: the model's guess", "</think>\n\\boxed{42}"]},
                        log)
    (chain,), = complete_with_tools(generate, ["Q:"], 1, 200, seed=0, settings=FAST)
    assert chain.text == "<think>\n```python\nx = 6\nprint(x*7)\n```\n```output\n42\n```\n</think>\n\\boxed{42}"
    assert (chain.tool_calls, chain.tool_failures) == (1, 0)
    # the second segment continued the prompt + first segment (cut at its call) + the output block, with what was left
    first = len("<think>\n```python\nx = 6\nprint(x*7)\n```\nnever kept: the model's guess")
    assert log[1] == [("Q:<think>\n```python\nx = 6\nprint(x*7)\n```\n```output\n42\n```\n", 200 - first)]
    assert chain.tokens == first + len("</think>\n\\boxed{42}") and chain.mean_logprob == pytest.approx(-0.25)
    assert calls_in(chain.text) == 1


def test_a_hanging_call_a_flood_an_error_and_backticks_each_become_an_output_block():
    generate = scripted({"H": ["```python\nprint('started')\nwhile True: pass\n```\n",
                               "```python\nprint('x' * 10**7)\n```\n",
                               "```python\nprint('```')\nprint(1/0)\n```\n", "end"]})
    (chain,), = complete_with_tools(generate, ["H"], 1, 500, seed=0, settings=FAST)
    blocks = re.findall(r"```output\n(.*?)\n```\n", chain.text, re.DOTALL)
    assert blocks[0] == "started\ntimeout after 1 s"  # what it printed before the wall clock, then the verdict
    flood, cut = blocks[1].rsplit("\n", 1)
    assert cut == "output cut at 64 bytes" and set(flood) == {"x"} and len(flood) <= 64
    assert blocks[2].splitlines() == ["` ` `", "error: ZeroDivisionError: division by zero (line 2: print(1/0))"]
    assert chain.text.endswith("```\nend") and (chain.tool_calls, chain.tool_failures) == (3, 3)


def test_calls_past_max_calls_are_refused_and_end_the_chain():
    log = []
    generate = scripted({"L": ["```python\nprint(1)\n```\n"]}, log)  # calls forever
    (chain,), = complete_with_tools(generate, ["L"], 1, 10_000, seed=0, settings=FAST)
    assert chain.tool_calls == FAST.max_calls and len(log) == FAST.max_calls + 1
    assert chain.text.endswith("```output\nnot run: this chain already made 3 tool calls\n```\n")
    assert calls_in(chain.text) == 3


def test_the_token_budget_covers_all_segments_and_samples_keep_their_own_chains():
    generate = scripted({"B": ["```python\nprint(2)\n```\n", "more"]})
    budget = len("```python\nprint(2)\n```\n")  # spent by the call itself: it runs, and the chain ends after it
    (chain,), = complete_with_tools(generate, ["B"], 1, budget, seed=0, settings=FAST)
    assert chain.text == "```python\nprint(2)\n```\n```output\n2\n```\n" and chain.tokens == budget
    both, = complete_with_tools(generate, ["B"], 2, 100, seed=0, settings=FAST)
    assert [sample.text for sample in both] == ["```python\nprint(2)\n```\n```output\n2\n```\nmore"] * 2


def test_find_call_needs_a_closed_python_block():
    assert find_call("```python\nprint(1)\n") is None  # still open
    assert find_call("```\nprint(1)\n```\n") is None  # not tagged python
    assert find_call("a\n```python\nprint(1)\n```").group(1) == "print(1)\n"  # closed by the end of the text


@pytest.fixture(scope="module")
def tokenizer():
    from budget_reasoner.domains import get_domain
    from budget_reasoner.domains.chain import format_chain
    from budget_reasoner.models import build_tokenizer

    corpus = [f"<|im_start|>user\n{p.question}<|im_end|>\n<|im_start|>assistant\n{format_chain(p.steps, p.answer)}<|im_end|>\n"
              for p in get_domain("bignum").draw(300, 0, 1, 2)]
    return build_tokenizer(corpus + ["zw xy\n\n"] * 100)  # "\n\n": a newline token the chat prompt does not end on


def test_local_generation_stops_where_its_text_closes_a_call(tokenizer):
    from budget_reasoner.models import build_scripted_model
    from budget_reasoner.sampling.local import generate_texts, prompt_texts

    completion = "zw xy\n\n"
    ids = tokenizer(completion, add_special_tokens=False)["input_ids"]
    pieces = [tokenizer.decode([token]) for token in ids]
    assert "\n\n" in pieces and len(set(ids)) == len(ids)  # the scripted model writes each token once
    model = build_scripted_model(tokenizer, completion)
    texts = prompt_texts(tokenizer, [[{"role": "user", "content": "1"}]])
    (whole,), = generate_texts(model, tokenizer, texts, 20, 4)
    assert (whole.text, whole.tokens) == (completion, len(ids) + 1)  # and the stop token
    (cut,), = generate_texts(model, tokenizer, texts, 20, 4, stop_when=lambda text: text.endswith("y\n\n"))
    assert (cut.text, cut.tokens) == (completion, len(ids))  # stopped by its text, before the stop token
    assert cut.mean_logprob == pytest.approx(0.0, abs=1e-3)  # the scripted tokens' log-probs, not the padding's


def expected_observation_mask(tokenizer, text: str) -> list[bool]:
    """Independent reference: the tokenizer's own character offsets, a token in a block when its first character is."""
    spans = [(m.start(), m.end()) for m in re.finditer(r"```output\n.*?\n```\n", text, re.DOTALL)]
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    return [any(a <= start < b for a, b in spans) for start, _ in encoding["offset_mapping"]]


CHAIN = ("<think>\n```python\nprint(4821+337)\n```\n```output\n5158\n```\n```python\nprint(5158*529)\n```\n```output\n"
         "2728582\n```\n</think>\n\\boxed{2728582}")
WRONG = "<think>\n```python\nprint(4821+337)\n```\n```output\n5158\n```\n</think>\n\\boxed{5158}"


@pytest.fixture(scope="module")
def student(tmp_path_factory, tokenizer):
    from budget_reasoner.config import load_preset
    from budget_reasoner.models import build_tiny_model

    folder = tmp_path_factory.mktemp("student")
    preset = load_preset("cpu-tiny", {**TINY, "model.max_length": 160})
    build_tiny_model(tokenizer, preset.model.tiny_student, 256, seed=0).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder, preset


def sft_rows():
    prompt = [{"role": "user", "content": "(4821+337)*529"}]
    return [{"prompt": prompt, "completion": [{"role": "assistant", "content": CHAIN}]},
            {"prompt": [{"role": "user", "content": "1+2"}], "completion": [{"role": "assistant", "content": "<think>\n1+2=3\n</think>\n\\boxed{3}"}]}]


@pytest.mark.parametrize("fused", [False, True])
def test_sft_gives_output_blocks_no_loss(student, tokenizer, tmp_path, fused):
    from budget_reasoner.hardware import hardware_for
    from budget_reasoner.train.sft import build_sft_trainer

    folder, preset = student
    preset.sft.fused_loss = fused
    trainer, _, _ = build_sft_trainer(sft_rows(), tmp_path / "sft.jsonl", folder, tmp_path / "out", preset,
                                      hardware_for(preset))
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(2)])
    ids, labels = batch["input_ids"][0], batch["labels"][0]
    text = tokenizer.decode(ids[batch["attention_mask"][0].bool()])
    start = text.index("<think>")  # the completion
    hidden = torch.tensor(expected_observation_mask(tokenizer, text))
    completion = torch.tensor([offset >= start for offset, _ in
                               tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]])
    length = len(hidden)
    assert hidden.sum() >= 10  # both output blocks' tokens
    assert (labels[:length][hidden] == -100).all()
    trained = completion & ~hidden
    assert torch.equal(labels[:length][trained], ids[:length][trained])  # every other completion token is trained
    assert (labels[:length][~completion] == -100).all()
    plain = batch["labels"][1][batch["attention_mask"][1].bool()]
    assert (plain != -100).sum() == len(tokenizer("<think>\n1+2=3\n</think>\n\\boxed{3}<|im_end|>\n",
                                                  add_special_tokens=False)["input_ids"])  # no block, nothing masked
    # the loss the trainer computes (fused or not) reads those labels: equal to a reference cross-entropy on them
    trainer.model.eval()
    with torch.no_grad():
        loss = trainer.compute_loss(trainer.model, dict(batch), num_items_in_batch=(batch["labels"] != -100).sum())
        logits = trainer.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    reference = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten(),
                                                  ignore_index=-100)
    assert loss.item() == pytest.approx(reference.item(), rel=1e-4)


def test_dpo_gives_output_blocks_no_loss_in_either_chain(student, tokenizer, tmp_path):
    from budget_reasoner.hardware import hardware_for
    from budget_reasoner.io import write_jsonl
    from budget_reasoner.train.dpo import build_dpo_trainer
    from budget_reasoner.train.sft import sft

    folder, preset = student
    preset.sft.fused_loss = False
    write_jsonl(tmp_path / "sft.jsonl", sft_rows())
    sft(tmp_path / "sft.jsonl", folder, tmp_path / "sft", preset)  # the stage DPO starts from (6 toy steps)
    prompt = [{"role": "user", "content": "(4821+337)*529"}]
    write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": prompt, "chosen": [{"role": "assistant", "content": CHAIN}],
                                            "rejected": [{"role": "assistant", "content": WRONG}]}] * 2)
    trainer, *_ = build_dpo_trainer(tmp_path / "pairs.jsonl", tmp_path / "sft", tmp_path / "dpo", preset,
                                    hardware_for(preset))
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(2)])
    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)  # as DPOTrainer builds them
    for row in (0, 2):  # a chosen and a rejected chain
        ids = batch["input_ids"][row][batch["attention_mask"][row].bool()]
        text = tokenizer.decode(ids)
        hidden = torch.tensor(expected_observation_mask(tokenizer, text))
        assert hidden.sum() >= 5
        assert (labels[row][: len(hidden)][hidden] == -100).all()
        start = text.index("<think>")
        offsets = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
        trained = torch.tensor([offset >= start for offset, _ in offsets]) & ~hidden
        assert torch.equal(labels[row][: len(hidden)][trained], ids[trained])


def test_eval_tools_runs_the_calls_and_counts_them_per_problem(student, tmp_path, monkeypatch):
    from budget_reasoner import tools
    from budget_reasoner.io import write_jsonl

    folder, _ = student
    problems = [{"id": f"p{i}", "domain": "bignum", "question": q, "answer": a, "source": "test"}
                for i, (q, a) in enumerate([("4821*529", "2550309"), ("111+222", "333"), ("9*9", "81")])]
    write_jsonl(tmp_path / "problems.jsonl", problems)
    segments = {  # per question: the scripted model calls the tool 2, 1 and 0 times, then answers from the output
        "4821*529": ["```python\nprint(4821*5)\n```\n", "```python\nprint(4821*529)\n```\n", "\\boxed{2550309}"],
        "111+222": ["```python\nprint(111+222)\n```\n", "\\boxed{333}"],
        "9*9": ["\\boxed{80}"],
    }

    def fake_local_generator(model, tokenizer, batch_size, temperature, description="generate"):
        def generate(texts, budgets, num_samples, seed):
            answers = []
            for text in texts:
                script = next(s for q, s in segments.items() if q in text)
                segment = script[min(text.count("```output\n"), len(script) - 1)]
                answers.append([Generated(segment, -0.1, 3) for _ in range(num_samples)])
            return answers
        return generate

    monkeypatch.setattr(tools, "local_generator", fake_local_generator)
    result = invoke("eval", "--model", folder, "--problems", tmp_path / "problems.jsonl", "--domain", "bignum",
                    "--tools", "--samples", "2", "--out", tmp_path / "eval", "--preset", "cpu-tiny",
                    *[arg for key, value in TINY.items() for arg in ("--set", f"{key}={value}")],
                    "--set", "model.max_length=160")
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "eval" / "summary.json").read_text())
    rows = [json.loads(line) for line in (tmp_path / "eval" / "results.jsonl").read_text().splitlines()]
    assert [row["tool_calls"] for row in rows] == [2, 1, 0]
    assert [row["sample_tool_calls"] for row in rows] == [[2, 2], [1, 1], [0, 0]]
    assert summary["tool_calls_per_problem"] == pytest.approx(1.0) and summary["accuracy"] == pytest.approx(2 / 3)
    assert "```output\n2550309\n```\n" in rows[0]["completion"]  # the sandbox's, not the script's
    assert "tool_calls_per_problem" in result.output


def test_generate_with_tools_needs_a_teacher_that_runs_them(tmp_path):
    from budget_reasoner.config import load_preset
    from budget_reasoner.errors import BudgetReasonerError
    from budget_reasoner.generate import generate

    class ServerLike:
        name = "openai:big"

        def sample(self, *args, **kwargs):
            raise AssertionError("never asked")

    preset = load_preset("cpu-tiny", {**TINY, "generate.tools": True})
    with pytest.raises(BudgetReasonerError, match="cannot run tool calls"):
        generate(tmp_path / "data", preset, ServerLike(), "bignum")
    assert not (tmp_path / "data" / "chains").exists()


def test_generate_with_tools_records_calls_per_chain(tmp_path, monkeypatch):
    from budget_reasoner import tools
    from budget_reasoner.config import load_preset
    from budget_reasoner.domains import get_domain
    from budget_reasoner.domains.chain import format_chain
    from budget_reasoner.generate import generate
    from budget_reasoner.io import read_jsonl

    domain = get_domain("bignum")
    answers = {}

    class ToolTeacher:  # writes the domain's own chains, one call at a time, through the real loop and sandbox
        name = "scripted-tools"

        def sample_with_tools(self, prompts, num_samples, temperature, max_new_tokens, seed, tools):
            def generate_segment(texts, budgets, n, seed):
                out = []
                for text in texts:
                    question = text.split("\n")[0]
                    chain = answers[question]
                    done = text.count("```output\n")
                    calls = chain.split("```output\n")
                    segment = calls[done].split("```\n", 1)[-1] if done else calls[0]
                    out.append([Generated(segment, -0.1, 4)] * n)
                return out
            return complete_with_tools(generate_segment, [p[-1]["content"] + "\n" for p in prompts], num_samples,
                                       max_new_tokens, seed, tools)

    preset = load_preset("cpu-tiny", {**TINY, "generate.tools": True, "generate.samples_per_problem": 1,
                                      "generate.num_train_problems": 4, "generate.min_steps": 1, "generate.max_steps": 2,
                                      "generate.max_new_tokens": 200})
    gen = preset.generate
    _, held_out = domain.splits(gen.num_train_problems, gen.num_eval_problems, gen.seed, 1, 2)
    for problem in domain.draw(4, gen.seed, 1, 2, exclude={row["question"] for row in held_out}):  # the training split
        answers[problem.question] = format_chain(problem.steps, problem.answer)
    summary = generate(tmp_path / "data", preset, ToolTeacher(), domain)
    chains = read_jsonl(tmp_path / "data" / "chains" / "shard-00000.jsonl")
    assert all(row["correct"] for row in chains)  # the sandbox's outputs are the domain's own
    assert [row["tool_calls"] for row in chains] == [answers[row["question"]].count("```python") for row in chains]
    assert summary["tool_calls_per_chain"] == pytest.approx(sum(r["tool_calls"] for r in chains) / len(chains))
    assert summary["tool_calls_failed"] == 0


def test_bignum_chains_are_tool_calls_whose_outputs_the_sandbox_reproduces():
    from budget_reasoner.domains import bignum, get_domain
    from budget_reasoner.domains.chain import format_chain
    from budget_reasoner.tools import run_calls

    problems = get_domain("bignum").draw(20, 3, 1, 3)
    for problem in problems:
        assert eval(problem.question) == int(problem.answer)
        assert len(problem.question.replace("(", "").replace(")", "").split("*")[0]) >= 3
    chain = format_chain(problems[0].steps, problems[0].answer)
    codes = re.findall(r"```python\n(.*?)```\n", chain, re.DOTALL)
    blocks = [block for block, passed in run_calls(codes, FAST)]
    assert "".join(blocks) == "".join(re.findall(r"```output\n.*?```\n", chain, re.DOTALL))
    assert bignum.plain_chain(problems[0]).count("=") == len(codes)
    assert get_domain("bignum").tools
