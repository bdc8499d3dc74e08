"""opd: on-policy distillation. The student samples, the teacher scores every sampled token, the student moves
toward the teacher where it disagrees on its own samples.

Each step (Thinking Machines, "On-Policy Distillation", 2025; Agarwal et al., GKD, 2024):
1. the student (its LoRA adapter on) samples `opd.num_generations` completions for each of the step's training
   problems through the sampling service (`sampling.local.generate_texts`), keeping the sampled token ids;
2. the teacher scores every sampled position through the scoring service (`scoring.LocalScorer` on a local
   teacher, `LayerStreamedScorer` with distill.stream_layers, `ServerScorer` for openai:MODEL; any object with
   `.score(encoded, top_k)` works): its top-k and its log-prob of the token the student actually sampled;
3. the student is trained on the reverse KL, KL(student || teacher), at those positions, by one of two objectives
   (`opd.objective`):
   - "sampled" (Thinking Machines'): policy gradient with the per-token advantage
         A_t = log p_teacher(x_t) - log p_student(x_t)        (x_t the sampled token, discount 0)
     loss = mean_t sg(-A_t) * (log p_student(x_t) - sg(log p_student(x_t))) + mean_t sg(-A_t): its gradient is
     -mean_t A_t grad log p_student(x_t) (tokens the teacher likes more than the student are pushed up, the others
     down), its value the sampled reverse KL per token. The samples come from the weights being trained, one
     optimizer step per batch, so the importance ratio is 1 and nothing is clipped. The teacher's log-prob is of
     the sampled token itself, in its top-k or not (`ScoredSequence.token_logprobs`); from a scorer that cannot
     give it, a token outside the top-k gets the log of the teacher's mass outside it, an upper bound, counted
     (`outside_topk`).
   - "topk" (GKD's on-policy reverse KL, over buckets): at every sampled position, the exact KL(student || teacher)
     over the teacher's top-k tokens and the mass outside them (k + 1 buckets, as distill's kd_tail), differentiated
     through the student's whole softmax: no sampling noise within a position, a lower bound of the full reverse KL.
   `log p_student` is the model's own distribution (temperature 1) in the training forward; `opd.temperature`
   only changes which tokens are sampled. The LM head runs over completion positions only, a chunk at a time under
   activation checkpointing, so no tokens x vocabulary logits are kept for the backward.

Teacher-scored tokens (every sampled completion token, one position each) are counted per logged step
(`teacher_tokens`, and `teacher_tokens_total` so far) and in all (the record's `teacher_tokens`); the counts live
in the Trainer's state, so a run resumed from a checkpoint continues them. Sampling seeds follow the step, so a
resumed run samples what the uninterrupted one would have. One process only (the samples, the teacher and the
student share a device).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from budget_reasoner.config import Preset
from budget_reasoner.distributed import is_distributed
from budget_reasoner.errors import BudgetReasonerError
from budget_reasoner.hardware import Hardware, hardware_for
from budget_reasoner.io import MODEL_SETTINGS, claim_stage, read_jsonl, settings_of, writes_folder
from budget_reasoner.memory import teacher_cache_batch
from budget_reasoner.problems import PROBLEM_COLUMNS, PROBLEM_KINDS
from budget_reasoner.progress import say
from budget_reasoner.sampling import chat_prompt
from budget_reasoner.scoring import tokenizer_hash
from budget_reasoner.stages import tokenizer_of
from budget_reasoner.train.common import (describe_precision, load_for_training, pad_batch, save_stage, stage_info,
                                          train_with_resume, training_arguments, with_lora)

COUNTS = "OpdCounts"  # the key of the running counts in the Trainer state (saved with every checkpoint)


# ---- the objective ---------------------------------------------------------------------------------------------

def reverse_kl_advantages(student_logprobs: torch.Tensor, teacher_logprobs: torch.Tensor) -> torch.Tensor:
    """A_t = log p_teacher(x_t) - log p_student(x_t) on each sampled token: minus the sampled reverse KL."""
    return teacher_logprobs.float() - student_logprobs.detach().float()


def opd_loss(student_logprobs: torch.Tensor, teacher_logprobs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, per-token reverse KL) over the sampled tokens (1-D, one entry a token). The loss's gradient is
    -mean(A_t * grad log p_student(x_t)), its value the mean sampled reverse KL."""
    reverse_kl = -reverse_kl_advantages(student_logprobs, teacher_logprobs)
    surrogate = student_logprobs.float() - student_logprobs.detach().float()  # value 0, gradient grad log p
    return (reverse_kl * surrogate).mean() + reverse_kl.mean(), reverse_kl


def topk_reverse_kl(student_topk: torch.Tensor, teacher_topk: torch.Tensor) -> torch.Tensor:
    """Per position, KL(student || teacher) over k + 1 buckets: the teacher's top-k tokens (log-probs positions x k,
    the student's at the same ids) and the mass outside them, each tail at least TAIL_EPS (as distill's kd_tail)."""
    from budget_reasoner.kernels.fused_loss import TAIL_EPS

    student_topk, teacher_topk = student_topk.float(), teacher_topk.float()
    student_tail = (1 - student_topk.exp().sum(-1)).clamp_min(TAIL_EPS)
    teacher_tail = (1 - teacher_topk.exp().sum(-1)).clamp_min(TAIL_EPS)
    return ((student_topk.exp() * (student_topk - teacher_topk)).sum(-1)
            + student_tail * (student_tail.log() - teacher_tail.log()))


def _logprobs_at(hidden: torch.Tensor, weight: torch.Tensor, tokens: torch.Tensor, softcap: float | None):
    logits = (hidden @ weight.t()).float()
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    return logits.gather(1, tokens) - logits.logsumexp(-1, keepdim=True)


def student_logprobs(hidden: torch.Tensor, weight: torch.Tensor, tokens: torch.Tensor,
                     softcap: float | None = None, chunk_tokens: int | None = None) -> torch.Tensor:
    """log softmax(hidden @ weight.T) at `tokens` (rows x m ids; 1-D: one id a row, one value a row back), with
    gradient to `hidden`, a chunk of rows at a time under activation checkpointing: the backward recomputes a
    chunk's logits rather than keeping them, so no rows x vocabulary logits are held."""
    from torch.utils.checkpoint import checkpoint

    from budget_reasoner.kernels.fused_loss import chunk_tokens_for

    one = tokens.dim() == 1
    tokens = tokens[:, None] if one else tokens
    chunk = chunk_tokens or chunk_tokens_for(weight.shape[0], hidden.device.type)
    parts = [checkpoint(_logprobs_at, hidden[first : first + chunk], weight, tokens[first : first + chunk], softcap,
                        use_reentrant=False) for first in range(0, hidden.shape[0], chunk)]
    values = torch.cat(parts) if parts else hidden.new_zeros((0, tokens.shape[1]), dtype=torch.float32)
    return values[:, 0] if one else values


def teacher_token_logprobs(scored, counts: dict) -> torch.Tensor:
    """The teacher's log-prob of every sampled token, sequences concatenated: the scorer's `token_logprobs`, or
    (a scorer that has none) its top-k's entry for the token, else the log of its mass outside the top-k."""
    values = []
    for sequence in scored:
        if sequence.token_logprobs is not None:
            values.append(sequence.token_logprobs.float())
            continue
        start, ids = sequence.first_position, torch.as_tensor(sequence.input_ids)
        tokens = ids[start + 1 : start + 1 + sequence.topk_ids.shape[0]]
        topk_ids, topk_logprobs = sequence.topk_ids.long(), sequence.topk_logprobs.float()
        hit = topk_ids == tokens[:, None]
        tail = torch.log1p(-topk_logprobs.exp().sum(-1).clamp(max=1 - 1e-6))
        values.append(torch.where(hit.any(-1), (topk_logprobs * hit).sum(-1), tail))
        counts["outside_topk"] += int((~hit.any(-1)).sum())
    return torch.cat(values)


# ---- the trainer ----------------------------------------------------------------------------------------------

def opd_trainer_class():
    """A transformers Trainer whose step samples, scores and trains; built when called (as distill's KDTrainer), so
    the `Trainer` it subclasses is the one bound after the backend was prepared."""
    from transformers import Trainer

    class OPDTrainer(Trainer):
        def __init__(self, *args, scorer, tokenizer, settings, seed: int, score_batch: int, **kwargs):
            super().__init__(*args, **kwargs)
            self.scorer, self.tokenizer, self.settings, self.seed = scorer, tokenizer, settings, seed
            self.score_batch = score_batch
            self.since_log = {"kl_sum": 0.0, "teacher_tokens": 0, "completions": 0}
            self.last_step, self.micro_step = -1, 0  # which micro-batch of the optimizer step this is

        @property
        def counts(self) -> dict:
            """The stage's running counts, kept in the Trainer state so every checkpoint saves them."""
            entry = self.state.stateful_callbacks.setdefault(COUNTS, {"args": {}, "attributes": {}})
            for key in ("teacher_tokens", "completions", "sequence_tokens", "truncated", "outside_topk"):
                entry["attributes"].setdefault(key, 0)
            return entry["attributes"]

        def sample(self, model, prompts: list[str]) -> tuple[list[tuple[list[int], list[int]]], int]:
            """The student's completions for `prompts` as (prompt + completion ids, completion mask) and how many
            stopped at the length limit. The seed follows the step, so a resumed run samples the same."""
            from budget_reasoner.sampling.local import generate_texts

            settings, step = self.settings, self.state.global_step
            self.micro_step = self.micro_step + 1 if step == self.last_step else 0
            self.last_step = step
            seed = (self.seed * 1_000_003 + step * 1_009 + self.micro_step) % 2**31
            generated = generate_texts(self.accelerator.unwrap_model(model), self.tokenizer, prompts,
                                       settings.max_completion_length, len(prompts) * settings.num_generations,
                                       temperature=settings.temperature, num_samples=settings.num_generations, seed=seed,
                                       description="opd: sample")
            prompt_ids = self.tokenizer(prompts, add_special_tokens=False)["input_ids"]
            encoded, truncated = [], 0
            for ids, samples in zip(prompt_ids, generated):
                for sample in samples:
                    tokens = sample.token_ids  # at least one: the sampler generates until a stop or the limit
                    truncated += tokens[-1] != self.tokenizer.eos_token_id
                    encoded.append((ids + tokens, [0] * len(ids) + [1] * len(tokens)))
            return encoded, truncated

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            from budget_reasoner.kernels.patch import final_hidden_states, final_logit_softcap, lm_head_weight

            encoded, truncated = self.sample(model, inputs["prompts"])
            with torch.no_grad():
                scored = [row for first in range(0, len(encoded), self.score_batch)
                          for row in self.scorer.score(encoded[first : first + self.score_batch], self.settings.top_k)]
            counts, device = self.counts, self.args.device
            input_ids, attention_mask, labels = pad_batch(encoded, self.tokenizer.pad_token_id)
            with self.accelerator.autocast():
                hidden = final_hidden_states(model, input_ids.to(device), attention_mask.to(device))[:, :-1]
                targets = labels[:, 1:].to(device)
                keep = targets != -100  # positions whose next token was sampled: row by row, as the scorer's
                hidden, weight, softcap = hidden[keep], lm_head_weight(model), final_logit_softcap(model)
                if self.settings.objective == "sampled":
                    teacher = teacher_token_logprobs(scored, counts).to(device)
                    student = student_logprobs(hidden, weight, targets[keep], softcap)
                else:  # "topk": the student's log-probs at the teacher's top-k ids
                    teacher = torch.cat([row.topk_logprobs for row in scored]).float().to(device)
                    student = student_logprobs(hidden, weight, torch.cat([row.topk_ids for row in scored]).long().to(device),
                                               softcap)
            if student.shape != teacher.shape:
                raise BudgetReasonerError(f"opd: the teacher scored {teacher.shape[0]} positions, the student sampled "
                                          f"{student.shape[0]}; the scorer must score every completion position")
            if self.settings.objective == "sampled":
                loss, reverse_kl = opd_loss(student, teacher)
            else:
                reverse_kl = topk_reverse_kl(student, teacher)
                loss = reverse_kl.mean()
            tokens = int(keep.sum())
            counts["teacher_tokens"] += tokens
            counts["completions"] += len(encoded)
            counts["sequence_tokens"] += int(attention_mask.sum())
            counts["truncated"] += truncated
            self.since_log["kl_sum"] += float(reverse_kl.sum())
            self.since_log["teacher_tokens"] += tokens
            self.since_log["completions"] += len(encoded)
            return (loss, None) if return_outputs else loss

        def log(self, logs: dict, start_time: float | None = None) -> None:
            if "loss" in logs:  # a training log: what the teacher scored since the last one, and so far
                since = self.since_log
                logs["reverse_kl"] = since["kl_sum"] / max(since["teacher_tokens"], 1)
                logs["teacher_tokens"] = since["teacher_tokens"]
                logs["teacher_tokens_total"] = self.counts["teacher_tokens"]
                logs["completion_length"] = since["teacher_tokens"] / max(since["completions"], 1)
                self.since_log = {"kl_sum": 0.0, "teacher_tokens": 0, "completions": 0}
            super().log(logs, start_time)

    return OPDTrainer


# ---- the stage ------------------------------------------------------------------------------------------------

def teacher_scorer(teacher, student_tokenizer, preset: Preset, hardware: Hardware):
    """A scorer for `teacher`: any object with `.score` as it is; `openai:MODEL` a served teacher (ServerScorer, at
    BUDGET_REASONER_TEACHER_URL, sent the student's token ids: it must share the tokenizer, which it checks); else
    a local checkpoint, whole (LocalScorer) or a decoder layer at a time with distill.stream_layers
    (LayerStreamedScorer), after checking it reads tokens as the student does."""
    if hasattr(teacher, "score"):
        return teacher
    from budget_reasoner.scoring import LayerStreamedScorer, LocalScorer, ServerScorer

    teacher = str(teacher)
    if teacher.startswith("openai:"):
        import os

        from budget_reasoner.sampling.server import server_url

        settings = preset.generate
        return ServerScorer(teacher.removeprefix("openai:"), server_url(), student_tokenizer,
                            os.environ.get("BUDGET_REASONER_TEACHER_KEY", "EMPTY"), settings.request_timeout,
                            settings.concurrency, settings.max_retries)
    teacher_tokenizer = tokenizer_of(teacher)
    if tokenizer_hash(teacher_tokenizer) != tokenizer_hash(student_tokenizer):
        raise BudgetReasonerError(f"--teacher {teacher}: its tokenizer is not the student's; on-policy distillation scores "
                                  f"the student's own tokens, so the two must share one vocabulary")
    if preset.distill.stream_layers:
        return LayerStreamedScorer(teacher, teacher_tokenizer.pad_token_id, preset.model.attention, device=hardware.device)
    from budget_reasoner.models import load_model

    return LocalScorer(load_model(teacher, preset, hardware), teacher_tokenizer.pad_token_id)


def check_prompt_room(tokenizer, prompts: list[str], problems_file: Path, preset: Preset) -> None:
    """Refuse, with a count, prompts that leave no room for `opd.max_completion_length` tokens in model.max_length."""
    room = preset.model.max_length - preset.opd.max_completion_length
    lengths = [len(ids) for ids in tokenizer(prompts, add_special_tokens=False)["input_ids"]]
    too_long = [number for number, length in enumerate(lengths, 1) if length > room]
    if too_long:
        raise BudgetReasonerError(
            f"{problems_file}: {len(too_long)} of {len(prompts)} prompts are longer than model.max_length - "
            f"opd.max_completion_length ({room} tokens; the longest {max(lengths)}; first: problem {too_long[0]}); "
            f"shorten or drop them, or lower opd.max_completion_length"
        )


@writes_folder("out")
def opd(problems_file: Path, start: str | Path, teacher, out: Path, preset: Preset, domain: str = "math",
        hardware: Hardware | None = None, report_to: str = "none", overwrite: bool = False,
        callbacks: list | None = None) -> dict:
    """On-policy distillation on the problems of `problems_file` (JSONL: id, domain, question, answer, source; the
    answers are not read) from `start` (a stage folder or a base model) against `teacher` (a model path or hub id
    sharing the student's tokenizer, or any scorer object with `.score(encoded, top_k)`); the adapter goes to `out`.
    The record's `history` carries each logged step's `loss` (= `reverse_kl`, per sampled token) and
    `teacher_tokens` (since the previous log) / `teacher_tokens_total`; `teacher_tokens` at the top is the total.
    `callbacks`: extra Trainer callbacks (a benchmark's evaluations along the way)."""
    from datasets import Dataset
    from transformers import TrainingArguments

    out = Path(out)
    settings = preset.opd
    problems = read_jsonl(problems_file, PROBLEM_COLUMNS, PROBLEM_KINDS)  # bad rows: one line, nothing claimed
    per_step = settings.batch_size // settings.num_generations
    if len(problems) < per_step:
        raise BudgetReasonerError(f"{problems_file}: {len(problems)} problems, fewer than one step's {per_step} "
                                  f"(opd.batch_size / opd.num_generations)")
    if is_distributed():
        raise BudgetReasonerError("opd runs in one process (the student samples, the teacher scores and the student "
                                  "trains on one device); launch it without torchrun / accelerate launch")
    tokenizer = tokenizer_of(start)
    prompts = [tokenizer.apply_chat_template(chat_prompt(row["question"], preset.generate.instruction),
                                             add_generation_prompt=True, tokenize=False) for row in problems]
    check_prompt_room(tokenizer, prompts, problems_file, preset)
    teacher_name = teacher if isinstance(teacher, (str, Path)) else getattr(teacher, "source", type(teacher).__name__)
    fingerprint = {**settings_of(preset, *MODEL_SETTINGS, "lora", "opd", "generate.instruction")}
    if (record := claim_stage(out, "opd", {"problems": problems_file, "start": start, "teacher": teacher_name},
                              fingerprint, overwrite)) is not None:
        return record
    hardware = hardware or hardware_for(preset)
    model, base = load_for_training(start, preset, hardware)
    if not hasattr(model, "peft_config"):  # a bare base: a fresh adapter
        model = with_lora(model, preset, settings.gradient_checkpointing, hardware)
    scorer = teacher_scorer(teacher, tokenizer, preset, hardware)
    # the dataloader hands out problems; each becomes num_generations completions, so a device batch of
    # `batch_size` completions is batch_size / num_generations problems
    args = training_arguments(TrainingArguments, dataclasses.replace(settings, batch_size=per_step), preset,
                              hardware, out, report_to, remove_unused_columns=False, include_num_input_tokens_seen=False)
    trainer = opd_trainer_class()(
        model=model, args=args, train_dataset=Dataset.from_list([{"prompt": text} for text in prompts]),
        data_collator=lambda rows: {"prompts": [row["prompt"] for row in rows]}, callbacks=callbacks,
        scorer=scorer, tokenizer=tokenizer, settings=settings, seed=preset.seed, score_batch=teacher_cache_batch(preset))
    say(f"opd: {len(problems)} problems x {settings.num_generations} completions of up to "
        f"{settings.max_completion_length} tokens, teacher {teacher_name}; {describe_precision(preset, hardware)}")
    run = train_with_resume(trainer, out)
    counts = dict(trainer.counts)
    say(f"opd: the teacher scored {counts['teacher_tokens']:,} sampled tokens of {counts['completions']:,} completions "
        f"({counts['truncated']} cut at the length limit"
        + (f"; {counts['outside_topk']} outside the teacher's top-{settings.top_k}, scored by its tail" if counts["outside_topk"] else "")
        + ")")
    return save_stage(out, trainer.model, tokenizer, base, run,
                      stage_info("opd", preset, hardware, problems=len(problems), domain=domain,
                                 teacher=str(teacher_name), teacher_tokens=counts["teacher_tokens"],
                                 tokens=counts["sequence_tokens"], opd=counts))
