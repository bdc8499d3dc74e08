"""Local sampling batches prompts by length and gives back what one prompt at a time would, in input order."""

import random

import torch

from budget_reasoner.config import TinyModelConfig
from budget_reasoner.models import build_tiny_model, build_tokenizer
from budget_reasoner.sampling import chat_prompt
from budget_reasoner.sampling.local import generate_texts, prompt_texts

CORPUS = ["3+4*2=11", "(12+7)*3-5=52", "9*2=18", "17-3+8*2=30", "<think>\n3+4=7\n</think>\n\\boxed{7}"] * 20


def test_prompts_are_batched_by_length_and_answered_in_input_order():
    tokenizer = build_tokenizer(CORPUS, vocab_size=300)
    model = build_tiny_model(tokenizer, TinyModelConfig(32, 2, 2, 1, 64), max_positions=512, seed=0).eval()
    torch.manual_seed(0)
    with torch.no_grad():  # large random weights: varied text of varied length (a fresh toy model repeats one token)
        for parameter in model.parameters():
            parameter.normal_(0, 0.5)
    draw = random.Random(0)
    questions = ["+".join(str(draw.randrange(100)) for _ in range(draw.randrange(1, 30))) for _ in range(12)]
    texts = prompt_texts(tokenizer, [chat_prompt(q) for q in questions])
    lengths = [len(tokenizer(text, add_special_tokens=False)["input_ids"]) for text in texts]
    assert lengths != sorted(lengths) and len(set(lengths)) > 6  # mixed, out of order: sorting has work to do

    batches, generate = [], model.generate
    model.generate = lambda **kwargs: batches.append(kwargs["attention_mask"].sum(1).tolist()) or generate(**kwargs)
    batched = generate_texts(model, tokenizer, texts, 10, batch_size=4)
    model.generate = generate
    one_at_a_time = [generate_texts(model, tokenizer, [text], 10, batch_size=1)[0] for text in texts]

    assert [[(g.text, g.tokens) for g in row] for row in batched] == [[(g.text, g.tokens) for g in row] for row in one_at_a_time]
    assert [sorted(batch) for batch in batches] == [sorted(lengths)[start : start + 4] for start in range(0, 12, 4)]
