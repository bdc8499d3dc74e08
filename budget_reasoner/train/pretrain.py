"""Bootstrap of the offline world: train the tiny teacher and student base from scratch.

With no weights to download, the later stages need models that already know something. The teacher
learns multi-step problems with worked chains; the student base learns to answer directly, without
chains (single-step problems, which it masters, and multi-step ones, which it mostly cannot do in one
pass). A plain PyTorch loop: full-parameter training of a few-million-parameter model needs nothing more.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch

from budget_reasoner.config import Preset
from budget_reasoner.domains import math as math_domain
from budget_reasoner.models import build_tiny_model, build_tokenizer
from budget_reasoner.progress import progress_bar
from budget_reasoner.train.common import encode_prompt_completion, pad_batch

TOKENIZER_SEED = 12345


def build_offline_tokenizer(preset: Preset):
    """One tokenizer for teacher and student (logit-level KD needs a shared vocabulary)."""
    problems = math_domain.make_problems(2000, TOKENIZER_SEED, 1, preset.generate.max_steps)
    corpus = [
        f"<|im_start|>user\n{p.question}<|im_end|>\n<|im_start|>assistant\n{math_domain.format_chain(p.steps, p.answer)}<|im_end|>\n"
        for p in problems
    ]
    return build_tokenizer(corpus)


def teacher_examples(preset: Preset, exclude: set[str]) -> list[tuple[str, str]]:
    """Multi-step problems (1 to max_steps operations) with their worked chains."""
    gen = preset.generate
    problems = math_domain.make_problems(preset.pretrain.num_problems, preset.seed + 7, 1, gen.max_steps, exclude)
    return [(p.question, math_domain.format_chain(p.steps, p.answer)) for p in problems]


def student_examples(preset: Preset, exclude: set[str]) -> list[tuple[str, str]]:
    """Single-step skills (stated as one equation) plus multi-step problems answered directly, with no chain.

    The student thus knows each operation and the notation of a step, but has never composed steps:
    the chains it will learn from the teacher are what teach it to.
    """
    gen = preset.generate
    half = preset.pretrain.num_problems // 2
    multi = math_domain.make_problems(half, preset.seed + 13, gen.min_steps, gen.max_steps, exclude)
    # skills drawn from other problems' chains, so they cover the values that steps really meet
    donors = math_domain.make_problems(half // 2, preset.seed + 11, gen.min_steps, gen.max_steps, exclude)
    single = math_domain.single_steps(donors)[:half]
    return [(p.question, math_domain.format_chain(p.steps, p.answer)) for p in single] + [
        (p.question, math_domain.format_direct(p.answer)) for p in multi
    ]


def train_from_scratch(model, tokenizer, examples: list[tuple[str, str]], steps: int, batch_size: int,
                       learning_rate: float, seed: int, description: str) -> list[dict]:
    """Full-parameter training on prompt -> completion pairs (loss on the completion). Returns the loss log."""
    encoded = [encode_prompt_completion(tokenizer, [{"role": "user", "content": q}], c) for q, c in examples]
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=0.01, betas=(0.9, 0.98))
    warmup = max(1, steps // 20)

    def lr_at(step: int) -> float:  # linear warmup, cosine decay to 10%
        if step < warmup:
            return (step + 1) / warmup
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_at)
    model.train()
    history, started = [], time.time()
    with progress_bar() as bar:
        task = bar.add_task(description, total=steps)
        for step in range(steps):
            indices = torch.randint(len(encoded), (batch_size,), generator=generator).tolist()
            input_ids, attention_mask, labels = pad_batch([encoded[i] for i in indices], tokenizer.pad_token_id)
            loss = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            if step % 20 == 0 or step == steps - 1:
                history.append({"step": step + 1, "loss": loss.item(), "seconds": time.time() - started})
                bar.update(task, description=f"{description} loss {loss.item():.3f}")
            bar.advance(task)
    model.eval()
    return history


def bootstrap(preset: Preset, models_dir: Path, held_out_questions: set[str]) -> dict:
    """Build the shared tokenizer and train the teacher and student base; save both under `models_dir`."""
    tokenizer = build_offline_tokenizer(preset)
    log = {}
    for role, examples, steps, shape in (
        ("teacher", teacher_examples(preset, held_out_questions), preset.pretrain.teacher_steps, preset.model.tiny_teacher),
        ("student-base", student_examples(preset, held_out_questions), preset.pretrain.student_steps, preset.model.tiny_student),
    ):
        model = build_tiny_model(tokenizer, shape, max_positions=preset.model.max_length + preset.generate.max_new_tokens, seed=preset.seed)
        started = time.time()
        history = train_from_scratch(model, tokenizer, examples, steps, preset.pretrain.batch_size,
                                     preset.pretrain.learning_rate, preset.seed, f"bootstrap {role}")
        model.save_pretrained(models_dir / role)
        tokenizer.save_pretrained(models_dir / role)
        log[role] = {"parameters": model.num_parameters(), "loss": history, "seconds": time.time() - started}
    return log
