"""s1-style budget forcing, a test-time compute strategy over local sampling: cap the thinking at a token budget,
or, when the model closes its thought too early, replace the close with "Wait" and let it think on."""

from __future__ import annotations

from budget_reasoner.sampling.local import generate_texts, prompt_texts

THINK_CLOSE = "</think>"


def generate_with_budget(model, tokenizer, prompts: list[list[dict]], think_budget: int, batch_size: int,
                         min_think_tokens: int = 0, max_waits: int = 0, answer_tokens: int = 32,
                         description: str = "budget forcing") -> tuple[list[str], list[int]]:
    """Greedy completions whose thinking is forced into [min_think_tokens, think_budget] tokens (s1), and the
    tokens each generated (thinking and answer; the "Wait"s and the forced close are ours, not counted).

    Thinking stops at `think_budget` tokens (then "</think>" is appended and the model answers); a model
    that closes its thought before `min_think_tokens` gets "Wait" instead, at most `max_waits` times.
    """
    close_ids = tokenizer(THINK_CLOSE, add_special_tokens=False)["input_ids"]
    stop_ids = close_ids[-1:] if len(close_ids) == 1 else []
    bases = prompt_texts(tokenizer, prompts)
    thoughts = ["" for _ in prompts]
    used = [0 for _ in prompts]
    waits = [0 for _ in prompts]
    active = list(range(len(prompts)))
    while active:
        budget = max(think_budget - min(used[i] for i in active), 1)
        outputs = generate_texts(model, tokenizer, [bases[i] + thoughts[i] for i in active], budget, batch_size,
                                 stop_ids=stop_ids, description=description)
        still_thinking = []
        for i, (out,) in zip(active, outputs):
            text = out.text
            used[i] += out.tokens
            closed = THINK_CLOSE in text
            text = text.split(THINK_CLOSE)[0]
            if closed and used[i] < min_think_tokens and waits[i] < max_waits and used[i] < think_budget:
                thoughts[i] += text + "Wait"
                waits[i] += 1
                still_thinking.append(i)
            else:
                thoughts[i] += text
        active = still_thinking
    answers = generate_texts(model, tokenizer, [b + t.rstrip("\n") + f"\n{THINK_CLOSE}\n" for b, t in zip(bases, thoughts)],
                             answer_tokens, batch_size, description="answers")
    texts = [t.rstrip("\n") + f"\n{THINK_CLOSE}\n" + a.text for t, (a,) in zip(thoughts, answers)]
    return texts, [thinking + answer.tokens for thinking, (answer,) in zip(used, answers)]
