"""`budget-reasoner chat`: the reply streams with its thinking dimmed, then the extracted answer; checked against plain
transformers' greedy decoding, and in a pseudo-terminal as a user would use it."""

import os
import re
import sys
import time

import pytest
import torch

from tests.conftest import invoke

CHAIN = "<think>\n12+7=19\n19-5=14\n</think>\n\\boxed{14}"


@pytest.fixture(scope="module")
def chain_model(tiny_run, tmp_path_factory):
    """A toy model that learned one chain by heart: chat has something to show (the toy run's models answer in
    newlines). Plain transformers training, a few seconds."""
    from budget_reasoner.config import TinyModelConfig
    from budget_reasoner.models import build_tiny_model, load_tokenizer

    run, _, _ = tiny_run
    tokenizer = load_tokenizer(run / "models" / "student-base")
    model = build_tiny_model(tokenizer, TinyModelConfig(64, 1, 2, 1, 128), 96, seed=0)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "12+7-5"}], add_generation_prompt=True, tokenize=False)
    ids = torch.tensor([tokenizer(prompt + CHAIN + tokenizer.eos_token, add_special_tokens=False)["input_ids"]])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(150):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    folder = tmp_path_factory.mktemp("chain") / "model"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_thinking_display_dims_exactly_the_thought_even_when_tags_arrive_split():
    from rich.console import Console

    from budget_reasoner.chat import ThinkingDisplay

    console = Console(force_terminal=True, color_system="standard", width=200)
    display = ThinkingDisplay(console, hide_thinking=False)
    with console.capture() as captured:
        for piece in ["<th", "ink>\n12+7=19\n</th", "ink>\n\\boxed{1", "9}"]:
            display.feed(piece)
        display.finish()
    output = captured.get()
    assert re.sub(r"\x1b\[[0-9;]*m", "", output) == "<think>\n12+7=19\n</think>\n\\boxed{19}\n"
    dimmed = "".join(re.findall(r"\x1b\[2m(.*?)\x1b\[0m", output, re.DOTALL))
    assert dimmed.replace("\n", "") == "<think>12+7=19</think>"  # rich may close and reopen the style at a newline
    hidden = Console(record=True, width=200)
    display = ThinkingDisplay(hidden, hide_thinking=True)
    display.feed("<think>\n12+7=19\n</think>\n\\boxed{19}")
    display.finish()
    assert hidden.export_text() == "(thinking...)\n\\boxed{19}\n"


def test_chat_once_prints_the_greedy_reply_and_its_answer(chain_model):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, tokenizer = AutoModelForCausalLM.from_pretrained(chain_model), AutoTokenizer.from_pretrained(chain_model)
    inputs = tokenizer.apply_chat_template([{"role": "user", "content": "12+7-5"}], add_generation_prompt=True,
                                           return_tensors="pt", return_dict=True)
    greedy = tokenizer.decode(model.generate(**inputs, do_sample=False, max_new_tokens=48)[0, inputs["input_ids"].shape[1]:],
                              skip_special_tokens=True)
    assert greedy == CHAIN  # the reference: plain transformers' greedy decoding
    result = invoke("chat", chain_model, "--once", "12+7-5")
    assert result.exit_code == 0, result.output
    assert CHAIN in result.output and result.output.strip().splitlines()[-1] == "answer: 14"
    hidden = invoke("chat", chain_model, "--once", "12+7-5", "--hide-thinking")
    assert "12+7=19" not in hidden.output and "\\boxed{14}" in hidden.output and "answer: 14" in hidden.output
    budget = invoke("chat", chain_model, "--once", "12+7-5", "--think-budget", "3")
    assert budget.exit_code == 0, budget.output
    assert "</think>" in budget.output and "19-5=14" not in budget.output  # thinking cut at 3 tokens


def test_chat_in_a_terminal_streams_dims_the_thinking_and_answers(chain_model):
    """As a user would: a pseudo-terminal, type a question, read the reply, leave with Ctrl-D."""
    import pty
    import select

    pid, fd = pty.fork()
    if pid == 0:  # the child: the CLI in a terminal
        env = {**os.environ, "TERM": "xterm-256color", "COLUMNS": "120", "OMP_NUM_THREADS": "1"}
        env.pop("BUDGET_REASONER_QUIET", None)
        os.execve(sys.executable, [sys.executable, "-m", "budget_reasoner.cli", "chat", str(chain_model)], env)
    seen = b""

    def read_until(marker: bytes, after: int = 0, timeout: float = 120) -> None:
        nonlocal seen
        deadline = time.time() + timeout
        while seen.count(marker) <= after and time.time() < deadline:
            ready, _, _ = select.select([fd], [], [], 1)
            if ready:
                try:
                    seen += os.read(fd, 4096)
                except OSError:
                    break
        assert seen.count(marker) > after, seen.decode(errors="replace")

    try:
        read_until(b"question>")
        os.write(fd, b"12+7-5\n")
        read_until(b"question>", after=1)
        os.write(fd, b"\x04")  # Ctrl-D
        _, status = os.waitpid(pid, 0)
    finally:
        os.close(fd)
    text = seen.decode(errors="replace")
    reply = text.split("12+7-5", 1)[1]
    plain = re.sub(r"\x1b\[[0-9;]*m", "", reply).replace("\r\n", "\n")
    assert CHAIN in plain and "answer: 14" in plain
    dim_spans = r"\x1b\[2m(.*?)\x1b\[0m"  # SGR 2: dim; the reply streams in pieces, each piece its own span
    dimmed, undimmed = "".join(re.findall(dim_spans, reply, re.DOTALL)), re.sub(dim_spans, "", reply, flags=re.DOTALL)
    assert "12+7=19" in dimmed.replace("\r\n", "\n") and "19-5=14" in dimmed and "</think>" in dimmed
    assert "12+7" not in undimmed and "\\boxed{14}" in undimmed
    assert os.waitstatus_to_exitcode(status) == 0
