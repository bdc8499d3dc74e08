"""Bootstrap of the offline world: train the tiny teacher and student base from scratch.

With no weights to download, the later stages need models that already know something. The teacher
learns multi-step problems with worked chains; the student base learns to answer directly, without
chains (single-step problems, which it masters, and multi-step ones, which it mostly cannot do in one
pass). The domain (domains/__init__.py: make_problems with `steps`, single_steps) says what a problem, a
step and a chain are. A plain PyTorch loop: full-parameter training of a few-million-parameter model needs
nothing more.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Callable

import torch

from budget_reasoner.config import Preset
from budget_reasoner.domains import Domain, get_domain
from budget_reasoner.domains.chain import format_chain, format_direct
from budget_reasoner.models import build_tiny_model, build_tokenizer
from budget_reasoner.progress import progress_bar, say
from budget_reasoner.sampling.local import generate_texts, prompt_texts
from budget_reasoner.tools import (ToolSettings, complete_with_tools, has_observation, local_generator, mask_encoded,
                                   settings_of)
from budget_reasoner.train.common import encode_prompt_completion, pad_batch
from budget_reasoner.verify import extract_answer

TOKENIZER_SEED = 12345


def build_offline_tokenizer(preset: Preset, domain: Domain | str = "math"):
    """One tokenizer for teacher and student (logit-level KD needs a shared vocabulary), from the domain's text."""
    problems = get_domain(domain).draw(2000, TOKENIZER_SEED, 1, preset.generate.max_steps)
    corpus = [
        f"<|im_start|>user\n{p.question}<|im_end|>\n<|im_start|>assistant\n{format_chain(p.steps, p.answer)}<|im_end|>\n"
        for p in problems
    ]
    return build_tokenizer(corpus)


def teacher_examples(preset: Preset, exclude: set[str], domain: Domain | str = "math") -> list[tuple[str, str]]:
    """Multi-step problems (1 to max_steps operations) with their worked chains."""
    gen = preset.generate
    problems = get_domain(domain).draw(preset.pretrain.num_problems, preset.seed + 7, 1, gen.max_steps, exclude)
    return [(p.question, format_chain(p.steps, p.answer)) for p in problems]


def student_examples(preset: Preset, exclude: set[str], domain: Domain | str = "math") -> list[tuple[str, str]]:
    """Single-step skills (stated as one equation) plus multi-step problems answered directly, with no chain.

    The student thus knows each operation and the notation of a step, but has never composed steps:
    the chains it will learn from the teacher are what teach it to.
    """
    gen, domain = preset.generate, get_domain(domain)
    half = preset.pretrain.num_problems // 2
    multi = domain.draw(half, preset.seed + 13, gen.min_steps, gen.max_steps, exclude)
    # skills drawn from other problems' chains, so they cover the values that steps really meet
    donors = domain.draw(half // 2, preset.seed + 11, gen.min_steps, gen.max_steps, exclude)
    single = domain.skills(donors)[:half]
    return [(p.question, format_chain(p.steps, p.answer)) for p in single] + [
        (p.question, format_direct(p.answer)) for p in multi
    ]


def train_from_scratch(model, tokenizer, examples: list[tuple[str, str]], steps: int, batch_size: int,
                       learning_rate: float, seed: int, description: str, check: Callable | None = None,
                       target: float = 0.0, cooldown_at: float = 0.0, check_every: int = 100,
                       cooldown_steps: int = 100) -> list[dict]:
    """Full-parameter training on prompt -> completion pairs (loss on the completion). Returns the log.

    Without `check`: `steps` steps, linear warmup then cosine decay to 10%. With `check(model) -> accuracy`,
    the schedule follows what the model can do (warmup-stable-decay): a constant rate until a check (every
    `check_every` steps) reaches `cooldown_at`, the model being past its learning transition; a linear
    cool-down to 10% over `cooldown_steps`; then 10% until a check reaches `target`, at most `steps` in all
    (the cool-down starts early enough to end by then). At the constant rate a tiny model plateaus below
    its best (the offline teacher wobbles around 90%); the cool-down is what settles it. Stopping on
    accuracy, not on a step count, is what makes the bootstrap reproduce across machines whose rounding
    moves the step at which a small model "gets" a task.
    """
    encoded = [encode_prompt_completion(tokenizer, [{"role": "user", "content": q}], c) for q, c in examples]
    # a tool call's output block is the runtime's, not the model's to write (tools.py): no loss on it
    encoded = [mask_encoded(tokenizer, *pair) if has_observation(c) else pair for pair, (_, c) in zip(encoded, examples)]
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=0.01, betas=(0.9, 0.98))
    warmup = max(1, steps // 20)
    cooldown_from: int | None = None  # with a check: the step the cool-down began

    def lr_at(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if check is None:  # cosine decay to 10%
            return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))
        if cooldown_from is None:
            return 1.0
        return max(0.1, 1.0 - 0.9 * (step - cooldown_from) / max(1, cooldown_steps))

    def check_now(done: int) -> bool:
        if cooldown_from is None:  # climbing: every check_every steps, and where the cool-down must start at the latest
            return done % check_every == 0 or done == steps - cooldown_steps
        cooled = cooldown_from + cooldown_steps
        return done == cooled or (done > cooled and (done - cooled) % check_every == 0) or done == steps

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
            done = step + 1
            if step % 20 == 0 or done == steps:
                history.append({"step": done, "loss": loss.item(), "seconds": time.time() - started})
                bar.update(task, description=f"{description} loss {loss.item():.3f}")
            bar.advance(task)
            if check is None or not check_now(done):
                continue
            accuracy = check(model)
            model.train()
            history.append({"step": done, "check_accuracy": accuracy, "seconds": time.time() - started})
            bar.update(task, description=f"{description} check {accuracy:.1%}")
            say(f"{description}: step {done}, {accuracy:.1%} greedy on the check problems")  # a log, not only a bar
            if cooldown_from is None:
                if accuracy >= cooldown_at or done >= steps - cooldown_steps:
                    cooldown_from = done
            elif accuracy >= target:
                break
    model.eval()
    return history


def greedy_accuracy(tokenizer, problems: list, tools: ToolSettings | None = None) -> Callable:
    """check(model) -> the share of `problems` the model answers right, greedy, in the chain format (with `tools`,
    its tool calls run as it writes them: a domain whose chains call tools)."""
    texts = prompt_texts(tokenizer, [[{"role": "user", "content": p.question}] for p in problems])
    longest = max(len(format_chain(p.steps, p.answer)) for p in problems)  # characters >= tokens

    def check(model) -> float:
        if tools is not None:
            outputs = complete_with_tools(local_generator(model, tokenizer, len(texts), 0.0, "check"), texts, 1,
                                          longest, 0, tools)
        else:
            outputs = generate_texts(model, tokenizer, texts, max_new_tokens=longest, batch_size=len(texts),
                                     description="check")
        # The offline answers are integers: an exact match is the whole verdict, and a half-trained model's
        # garbage never reaches the symbolic grader's timeouts.
        return sum(extract_answer(out.text) == p.answer for (out,), p in zip(outputs, problems)) / len(problems)

    return check


def bootstrap(preset: Preset, models_dir: Path, held_out_questions: set[str],
              roles: tuple[str, ...] = ("teacher", "student-base"), domain: Domain | str = "math") -> dict:
    """Build the shared tokenizer and train the teacher and student base (or only the `roles` named) on the
    domain's offline world; save them under `models_dir`."""
    domain = get_domain(domain)
    domain.require_offline()
    tokenizer = build_offline_tokenizer(preset, domain)
    pretrain, gen = preset.pretrain, preset.generate
    # The teacher's check: multi-step problems drawn like the held-out split (not from what training left over:
    # the small problems are few, and training would have used up most of them, leaving the check only larger
    # numbers; a teacher 98.5% right on such a check was 88.7% right on the held-out split), then kept out of
    # the teacher's training like the held-out split is.
    check_problems = domain.draw(pretrain.check_problems, preset.seed + 17, gen.min_steps, gen.max_steps,
                                 held_out_questions)
    teacher_data = teacher_examples(preset, held_out_questions | {p.question for p in check_problems}, domain)
    log = {}
    for role, examples, steps, shape, check in (
        ("teacher", teacher_data, pretrain.teacher_steps, preset.model.tiny_teacher,
         greedy_accuracy(tokenizer, check_problems, settings_of(preset.tools) if domain.tools else None)
         if pretrain.teacher_target_accuracy > 0 else None),
        ("student-base", student_examples(preset, held_out_questions, domain), pretrain.student_steps,
         preset.model.tiny_student, None),
    ):
        if role not in roles:
            continue
        model = build_tiny_model(tokenizer, shape, max_positions=preset.model.max_length + gen.max_new_tokens, seed=preset.seed)
        started = time.time()
        history = train_from_scratch(model, tokenizer, examples, steps, pretrain.batch_size, pretrain.learning_rate,
                                     preset.seed, f"bootstrap {role}", check, pretrain.teacher_target_accuracy,
                                     pretrain.cooldown_at_accuracy, pretrain.check_every, pretrain.cooldown_steps)
        model.save_pretrained(models_dir / role)
        tokenizer.save_pretrained(models_dir / role)
        log[role] = {"parameters": model.num_parameters(), "loss": history, "seconds": time.time() - started,
                     "steps": max(entry["step"] for entry in history)}
        checks = [entry["check_accuracy"] for entry in history if "check_accuracy" in entry]
        if checks:
            log[role]["check_accuracy"] = checks[-1]
            say(f"bootstrap {role}: {checks[-1]:.1%} greedy on {len(check_problems)} held-aside problems after "
                f"{log[role]['steps']} steps")
            if checks[-1] < pretrain.teacher_target_accuracy:
                say(f"bootstrap {role}: below the target {pretrain.teacher_target_accuracy:.0%} after the most steps "
                    f"allowed (pretrain.teacher_steps {steps}); later stages learn from a weaker teacher")
    return log
