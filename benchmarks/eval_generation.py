"""Batched generation (left padding, KV cache, many prompts per forward) vs one prompt at a time.

    python benchmarks/eval_generation.py [--prompts 128] [--new-tokens 48]

The cpu-tiny student's shape with the offline tokenizer; every completion is forced to the same length
(min_new_tokens), so both ways generate exactly the same number of tokens.
"""

import argparse
import time

import torch

from budget_reasoner.config import load_preset
from budget_reasoner.domains import math as math_domain
from budget_reasoner.sampling import chat_prompt
from budget_reasoner.sampling.local import prompt_texts
from budget_reasoner.models import build_tiny_model
from budget_reasoner.train.pretrain import build_offline_tokenizer


def tokens_per_second(model, tokenizer, texts, new_tokens, batch_size) -> float:
    tokenizer.padding_side = "left"
    started = time.perf_counter()
    with torch.no_grad():
        for start in range(0, len(texts), batch_size):
            batch = tokenizer(texts[start : start + batch_size], return_tensors="pt", padding=True, add_special_tokens=False)
            model.generate(**batch, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                           pad_token_id=tokenizer.pad_token_id)
    return len(texts) * new_tokens / (time.perf_counter() - started)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--batch-size", type=int, default=128)
    args = parser.parse_args()
    torch.set_num_threads(2)
    preset = load_preset("cpu-tiny")
    tokenizer = build_offline_tokenizer(preset)
    model = build_tiny_model(tokenizer, preset.model.tiny_student, 256, seed=0).eval()
    problems = math_domain.make_problems(args.prompts, seed=1, min_steps=2, max_steps=3)
    texts = prompt_texts(tokenizer, [chat_prompt(p.question) for p in problems])
    one = tokens_per_second(model, tokenizer, texts, args.new_tokens, 1)
    batched = tokens_per_second(model, tokenizer, texts, args.new_tokens, args.batch_size)
    print(f"{args.prompts} prompts x {args.new_tokens} new tokens, {model.num_parameters() / 1e6:.2f}M-parameter model")
    print(f"one prompt at a time: {one:>8.0f} tokens/s")
    print(f"batched ({args.batch_size}/forward): {batched:>8.0f} tokens/s  ({batched / one:.1f}x)")


if __name__ == "__main__":
    main()
