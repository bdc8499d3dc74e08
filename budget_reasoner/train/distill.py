"""The distill stage: the student learns the teacher's distribution, not only its sampled chains.

1. `cache_teacher_topk`: one teacher forward over each sequence-level example (the verified chains),
   keeping the top-k log-probs at every position (training reads the completion ones), in shards. The cache is what makes 70B -> 7B KD
   affordable: the teacher runs once (on any machine), the student trains against a few floats a token.
2. `distill`: continues the student's adapter with `fused_linear_kd_loss` (forward KL on the teacher's
   top-k, blended with cross-entropy on the chain), computed in chunks from the final hidden states
   so the full logits never exist.
Cache columns (data contract): input_ids, completion_mask, topk_ids, topk_logprobs; the teacher name and
tokenizer hash sit in the cache's COMPLETE.json and must match the student's tokenizer.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from budget_reasoner.config import Preset
from budget_reasoner.errors import BudgetReasonerError
from budget_reasoner.hardware import Hardware, PeakMemory, hardware_for
from budget_reasoner.io import (MODEL_SETTINGS, add_session, claim_stage, digest, mark_complete, read_json, read_jsonl,
                                read_shards, settings_of, shard_path, write_jsonl, writes_folder)
from budget_reasoner.kernels import linear_topk_logprobs
from budget_reasoner.kernels.patch import final_hidden_states, final_logit_softcap, fused_kd_loss, lm_head_weight
from budget_reasoner.memory import teacher_cache_batch
from budget_reasoner.models import describe_precision, load_model, load_tokenizer
from budget_reasoner.progress import progress_bar, say
from budget_reasoner.stages import tokenizer_of
from budget_reasoner.train.common import (encode_prompt_completion, load_for_training, pad_batch, save_stage,
                                          stage_info, tokens_across_ranks, train_with_resume, training_arguments,
                                          undo_data_parallel_mean, with_lora)
from budget_reasoner.train.sft import SFT_COLUMNS, SFT_KINDS

CACHE_COLUMNS = ("input_ids", "completion_mask", "topk_ids", "topk_logprobs")


def tokenizer_hash(tokenizer) -> str:
    """Two tokenizers with the same vocabulary and template hash the same; KD needs exactly that."""
    return digest([sorted(tokenizer.get_vocab().items()), tokenizer.chat_template])  # the same value as before


@writes_folder("cache_dir")
@torch.no_grad()
def cache_teacher_topk(teacher_path: str | Path, sft_file: Path, cache_dir: Path, preset: Preset,
                       hardware: Hardware | None = None, overwrite: bool = False) -> dict:
    """Run the teacher once over every example of `sft_file`; save the top-k log-probs at each position.

    The teacher loads as the preset loads models (4-bit on the GPU presets, so a 7B teacher fits a T4) and
    its LM head runs a chunk of positions at a time, so no tokens x vocab logits exist. Rows go to disk a
    shard (`generate.shard_size` examples) at a time; a rerun skips finished shards.
    """
    cache_dir = Path(cache_dir)
    rows = read_jsonl(sft_file, SFT_COLUMNS, SFT_KINDS)
    # the shard size sets which examples each shard holds, so a resume with another one would mix layouts
    settings = settings_of(preset, *MODEL_SETTINGS, "distill.top_k", "generate.shard_size")
    if (info := claim_stage(cache_dir, "teacher top-k cache", {"teacher": teacher_path, "data": sft_file}, settings,
                            overwrite, record="COMPLETE.json")) is not None:
        return info
    hardware = hardware or hardware_for(preset)
    tokenizer = tokenizer_of(teacher_path)
    check_sequence_lengths(tokenizer, rows, sft_file, teacher_path)
    started = time.time()
    teacher = load_model(teacher_path, preset, hardware).eval()
    weight, device = lm_head_weight(teacher), next(teacher.parameters()).device
    top_k, shard_size, batch_size = preset.distill.top_k, preset.generate.shard_size, teacher_cache_batch(preset)
    tokens = 0
    with progress_bar() as bar, PeakMemory(device.type) as peak:
        task = bar.add_task("cache teacher top-k", total=len(rows))
        for index, shard_start in enumerate(range(0, len(rows), shard_size)):
            encoded_shard = [encode_prompt_completion(tokenizer, row["prompt"], row["completion"][0]["content"])
                             for row in rows[shard_start : shard_start + shard_size]]
            tokens += sum(len(ids) for ids, _ in encoded_shard)  # counted here: a finished shard is not reread
            if shard_path(cache_dir, index).is_file():
                bar.advance(task, len(encoded_shard))
                continue
            cached = []
            for start in range(0, len(encoded_shard), batch_size):
                encoded = encoded_shard[start : start + batch_size]
                input_ids, attention_mask, _ = pad_batch(encoded, tokenizer.pad_token_id)
                hidden = final_hidden_states(teacher, input_ids.to(device), attention_mask.to(device))
                for i, (ids, mask) in enumerate(encoded):
                    logprobs, token_ids = linear_topk_logprobs(hidden[i, : len(ids)], weight, top_k,
                                                               softcap=final_logit_softcap(teacher))
                    cached.append({"input_ids": ids, "completion_mask": mask, "topk_ids": token_ids.tolist(),
                                   "topk_logprobs": [[round(v, 5) for v in row] for row in logprobs.tolist()]})
                bar.advance(task, len(encoded))
            write_jsonl(shard_path(cache_dir, index), cached)
    compute = add_session(cache_dir, time.time() - started, peak.bytes)  # summed over the sessions that wrote shards
    info = {"teacher": str(teacher_path), "tokenizer_hash": tokenizer_hash(tokenizer), "top_k": top_k, "examples": len(rows),
            "tokens": tokens, "device": hardware.describe(), **compute}
    mark_complete(cache_dir, info)
    return info


def check_sequence_lengths(tokenizer, rows: list[dict], sft_file: Path, teacher_path: str | Path) -> None:
    """The teacher scores whole sequences (nothing is cut): refuse, with a count, any longer than its positions."""
    from transformers import AutoConfig

    try:
        positions = getattr(AutoConfig.from_pretrained(str(teacher_path)), "max_position_embeddings", None)
    except OSError as error:
        raise BudgetReasonerError(f"cannot load model {str(teacher_path)!r}: {str(error).splitlines()[0]}") from None
    if not positions:
        return
    lengths = [len(encode_prompt_completion(tokenizer, row["prompt"], row["completion"][0]["content"])[0]) for row in rows]
    too_long = [number for number, length in enumerate(lengths, 1) if length > positions]
    if too_long:
        raise BudgetReasonerError(
            f"{sft_file}: {len(too_long)} of {len(rows)} examples are longer than the teacher's {positions} positions "
            f"(the longest {max(lengths):,} tokens; first: example {too_long[0]}); shorten or drop them"
        )


def collate_kd(examples: list[dict], pad_id: int) -> dict:
    """Pad cache rows; labels are the next tokens on completion positions (already shifted), -100 elsewhere."""
    length = max(len(e["input_ids"]) for e in examples)
    k = len(examples[0]["topk_ids"][0])
    batch = {
        "input_ids": torch.full((len(examples), length), pad_id),
        "attention_mask": torch.zeros((len(examples), length), dtype=torch.long),
        "kd_labels": torch.full((len(examples), length), -100),
        "topk_ids": torch.zeros((len(examples), length, k), dtype=torch.long),
        "topk_logprobs": torch.zeros((len(examples), length, k)),
    }
    for i, e in enumerate(examples):
        n = len(e["input_ids"])
        ids = torch.tensor(e["input_ids"])
        batch["input_ids"][i, :n] = ids
        batch["attention_mask"][i, :n] = 1
        next_is_completion = torch.tensor(e["completion_mask"][1:]) == 1
        batch["kd_labels"][i, : n - 1] = torch.where(next_is_completion, ids[1:], torch.tensor(-100))
        batch["topk_ids"][i, :n] = torch.tensor(e["topk_ids"])
        batch["topk_logprobs"][i, :n] = torch.tensor(e["topk_logprobs"])
    return batch


def kd_trainer_class():
    """A transformers Trainer whose loss is the chunked KD loss on the final hidden states.

    Built when called, from the `transformers.Trainer` bound then, not when this module is imported: on the
    Unsloth backend the class must come after `import unsloth` (hardware.prepare_backend), like TRL's
    trainers, which `train/sft.py` and `train/dpo.py` also look up only when they build one."""
    from transformers import Trainer

    class KDTrainer(Trainer):
        def __init__(self, *args, kd_alpha: float, kd_temperature: float, **kwargs):
            super().__init__(*args, **kwargs)
            self.kd_alpha, self.kd_temperature = kd_alpha, kd_temperature
            self.loss_is_scaled_for_ga = True  # compute_loss already divides by the accumulated batch's token count

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            # through model(...), so the loss runs inside the autocast accelerate wraps around the forward;
            # normalized by the label tokens of the whole accumulated batch, not this micro-batch
            loss = fused_kd_loss(model, inputs, inputs["kd_labels"], self.kd_alpha, self.kd_temperature, num_items_in_batch)
            loss = undo_data_parallel_mean(self, loss, num_items_in_batch)  # the count is global under DDP
            return (loss, None) if return_outputs else loss

        def _get_num_items_in_batch(self, batch_samples, device):
            local = sum(int((batch["kd_labels"] != -100).sum()) for batch in batch_samples)
            return tokens_across_ranks(self, local, device)  # every rank divides by the same, global count

    return KDTrainer


@writes_folder("out")
def distill(cache_dir: Path, student_stage: str | Path, out: Path, preset: Preset, hardware: Hardware | None = None,
            report_to: str = "none", overwrite: bool = False) -> dict:
    """Continue the student (a stage folder with an adapter) on the teacher's cached top-k distribution.

    The cache is verified first (every shard its manifest lists present and whole): a missing shard is an error,
    never a smaller dataset. `out` resumes only what the same cache, student and settings started."""
    from datasets import Dataset
    from transformers import TrainingArguments

    out = Path(out)
    if not (Path(cache_dir) / "COMPLETE.json").is_file():
        raise BudgetReasonerError(f"{cache_dir}: not a complete teacher cache (no COMPLETE.json); run the cache first")
    settings = settings_of(preset, *MODEL_SETTINGS, "lora", "distill")
    if (record := claim_stage(out, "distill", {"cache": cache_dir, "student": student_stage}, settings,
                              overwrite)) is not None:
        return record
    hardware = hardware or hardware_for(preset)
    info = read_json(Path(cache_dir) / "COMPLETE.json")
    rows = read_shards(cache_dir, CACHE_COLUMNS)  # the shards the manifest lists, verified by claim_stage above
    if len(rows) != info.get("examples", len(rows)):
        raise BudgetReasonerError(f"{cache_dir}: its shards hold {len(rows)} examples, its COMPLETE.json says "
                                  f"{info['examples']}; the cache is damaged: rerun with --overwrite")
    model, base = load_for_training(student_stage, preset, hardware)
    tokenizer = load_tokenizer(base)
    if tokenizer_hash(tokenizer) != info["tokenizer_hash"]:
        raise BudgetReasonerError(
            f"{cache_dir}: cached with tokenizer {info['tokenizer_hash']} of {info['teacher']}, but the student's is "
            f"{tokenizer_hash(tokenizer)}; logit-level KD needs a shared vocabulary (use sequence-level data only)"
        )
    model = with_lora(model, preset, preset.distill.gradient_checkpointing, hardware)
    settings = preset.distill
    args = training_arguments(TrainingArguments, settings, preset, hardware, out, report_to, remove_unused_columns=False)
    trainer = kd_trainer_class()(model=model, args=args, train_dataset=Dataset.from_list(rows),
                                 data_collator=lambda examples: collate_kd(examples, tokenizer.pad_token_id),
                                 kd_alpha=settings.alpha, kd_temperature=settings.temperature)
    say(f"distill: {len(rows)} cached sequences, top-{info['top_k']} from {info['teacher']}, alpha {settings.alpha}; "
        f"{describe_precision(preset, hardware)}")
    return save_stage(out, trainer.model, tokenizer, base, train_with_resume(trainer, out),
                      stage_info("distill", preset, hardware, examples=len(rows)))
