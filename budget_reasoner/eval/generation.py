"""Batched generation on the transformers backend: left padding, KV cache, many prompts per forward."""

from __future__ import annotations

import torch

from budget_reasoner.progress import progress_bar


def chat_prompt(question: str, instruction: str = "") -> list[dict]:
    content = f"{question}\n{instruction}".strip() if instruction else question
    return [{"role": "user", "content": content}]


@torch.no_grad()
def generate_completions(model, tokenizer, prompts: list[list[dict]], max_new_tokens: int, batch_size: int,
                         temperature: float = 0.0, num_samples: int = 1, seed: int = 0,
                         description: str = "generate") -> list[list[str]]:
    """`num_samples` completions per chat prompt (greedy when temperature is 0), as decoded text.

    Prompts are sorted by length so each batch pads little, and results come back in the input order.
    """
    texts = [tokenizer.apply_chat_template(p, add_generation_prompt=True, tokenize=False) for p in prompts]
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    results: list[list[str]] = [[] for _ in texts]
    padding_side, tokenizer.padding_side = tokenizer.padding_side, "left"
    was_training = model.training
    model.eval()
    torch.manual_seed(seed)
    device = next(model.parameters()).device
    prompts_per_batch = max(1, batch_size // num_samples)
    try:
        with progress_bar() as bar:
            task = bar.add_task(description, total=len(texts))
            for start in range(0, len(order), prompts_per_batch):
                chunk = order[start : start + prompts_per_batch]
                batch = tokenizer([texts[i] for i in chunk], return_tensors="pt", padding=True, add_special_tokens=False).to(device)
                sampling = {"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0} if temperature > 0 else {"do_sample": False}
                output = model.generate(
                    **batch,
                    max_new_tokens=max_new_tokens,
                    num_return_sequences=num_samples,
                    pad_token_id=tokenizer.pad_token_id,
                    eos_token_id=tokenizer.eos_token_id,
                    **sampling,
                )
                decoded = tokenizer.batch_decode(output[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
                for offset, index in enumerate(chunk):
                    results[index] = decoded[offset * num_samples : (offset + 1) * num_samples]
                bar.advance(task, len(chunk))
    finally:
        tokenizer.padding_side = padding_side
        model.train(was_training)
    return results
