"""The distill stage: the student learns the teacher's distribution, not only its sampled chains.

1. `cache_teacher_topk`: the teacher scores each sequence-level example (the verified chains) once, through
   `budget_reasoner.scoring`, which keeps its top-k log-probs at the completion positions only, in compact
   binary shards (k x 6 bytes a position). The cache is what makes 70B -> 7B KD affordable: the teacher runs
   once (on any machine), the student trains against a few numbers a token.
2. `distill`: continues the student's adapter with `fused_linear_kd_loss` (forward KL on the teacher's
   top-k, blended with cross-entropy on the chain), computed in chunks from the final hidden states
   so the full logits never exist. The cache is memory-mapped and read a batch at a time (scoring.TopKCache),
   so host RAM does not grow with it.
The cache's COMPLETE.json names the teacher, k, the tokenizer hash, the vocabulary size and the source data's
hash; the tokenizer must match the student's and every cached id must be a row of the student's LM head,
both checked before training starts.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch

from budget_reasoner.config import Preset
from budget_reasoner.distributed import is_distributed
from budget_reasoner.errors import BudgetReasonerError
from budget_reasoner.hardware import Hardware, PeakMemory, hardware_for
from budget_reasoner.io import (MODEL_SETTINGS, add_session, claim_stage, input_digest, mark_complete, read_jsonl,
                                settings_of, writes_folder)
from budget_reasoner.kernels.patch import fused_kd_loss
from budget_reasoner.memory import teacher_cache_batch
from budget_reasoner.models import describe_precision, load_model, load_tokenizer
from budget_reasoner.progress import progress_bar, say
from budget_reasoner.sampling.server import redact, server_url
from budget_reasoner.scoring import (CACHE_FORMAT, DamagedShard, LayerStreamedScorer, LocalScorer, ServerScorer, TopKCache,
                                     read_cache_manifest, shard_counts, shard_file, tokenizer_hash, write_shard)
from budget_reasoner.stages import tokenizer_of
from budget_reasoner.train.common import (encode_prompt_completion, load_for_training, save_stage, stage_info,
                                          tokens_across_ranks, train_with_resume, training_arguments,
                                          undo_data_parallel_mean, with_lora)
from budget_reasoner.train.sft import SFT_COLUMNS, SFT_KINDS

__all__ = ["cache_teacher_topk", "distill", "collate_kd", "tokenizer_hash"]


@writes_folder("cache_dir")
@torch.no_grad()
def cache_teacher_topk(teacher_path: str | Path, sft_file: Path, cache_dir: Path, preset: Preset,
                       hardware: Hardware | None = None, overwrite: bool = False, stream_layers: bool = False,
                       server: str | None = None, tokenizer_source: str | Path | None = None) -> dict:
    """Score every example of `sft_file` with the teacher once; save its top-k at the completion positions.

    The teacher loads as the preset loads models (4-bit on the GPU presets, so a 7B teacher fits a T4) and
    its LM head runs a chunk of positions at a time, so no tokens x vocab logits exist. Rows go to disk a
    shard (`generate.shard_size` examples) at a time; a rerun skips finished shards and writes a damaged one again.
    `stream_layers`: never load the teacher whole; read its decoder layers from the checkpoint one at a time
    (scoring.LayerStreamedScorer), for a teacher bigger than the memory. `server` (or a teacher named
    `openai:MODEL`, the URL then from BUDGET_REASONER_TEACHER_URL): the model served there by vLLM scores through
    its prompt log-probs (scoring.ServerScorer); the ids are made with `tokenizer_source` (default: the student's,
    model.student), which the served model must share. All sources write the same cache.
    """
    cache_dir = Path(cache_dir)
    rows = read_jsonl(sft_file, SFT_COLUMNS, SFT_KINDS)
    serving = server is not None or is_server_name(str(teacher_path))
    inputs = {"teacher": teacher_path, "data": sft_file}
    if serving:  # named as the chains teacher names a server; the tokenizer that makes the ids is an input too
        teacher_path = "openai:" + str(teacher_path).removeprefix("openai:")
        tokenizer_source = str(tokenizer_source or preset.model.student)
        inputs = {"teacher": teacher_path, "data": sft_file, "tokenizer": tokenizer_source}
    if is_distributed() and not (cache_dir / "COMPLETE.json").is_file():
        # every rank would score the same sequences and write the same shards at once
        raise BudgetReasonerError(f"{cache_dir}: the teacher's top-k cache is built in one process: run `budget-reasoner "
                                  f"cache --teacher {teacher_path} --data {sft_file} --out {cache_dir}` first, then the launch")
    # the shard size sets which examples each shard holds, so a resume with another one would mix layouts;
    # the format, so a cache an older version wrote is refused in one line rather than misread
    settings = {**settings_of(preset, *MODEL_SETTINGS, "distill.top_k", "generate.shard_size"), "cache.format": CACHE_FORMAT}
    if (info := claim_stage(cache_dir, "teacher top-k cache", inputs, settings, overwrite,
                            record="COMPLETE.json")) is not None:
        return info
    hardware = hardware or hardware_for(preset)
    if serving:
        scorer, tokenizer = server_scorer(str(teacher_path), server, tokenizer_source, preset, rows, sft_file)
    else:
        tokenizer = tokenizer_of(teacher_path)
        check_sequence_lengths(tokenizer, rows, sft_file, teacher_path)
    started = time.time()
    top_k, shard_size, batch_size = preset.distill.top_k, preset.generate.shard_size, teacher_cache_batch(preset)
    if serving:  # (a preset's distill.stream_layers is about a local checkpoint: not this one)
        stream_layers = False
        batch_size, vocab_size = preset.generate.concurrency, len(tokenizer)  # a batch: the requests in flight at once
    elif stream_layers:
        scorer = LayerStreamedScorer(teacher_path, tokenizer.pad_token_id, preset.model.attention, device=hardware.device)
        vocab_size = scorer.weights.shape(scorer.head_name)[0]
    else:
        scorer = LocalScorer(load_model(teacher_path, preset, hardware), tokenizer.pad_token_id)
        vocab_size = scorer.head.shape[0]
    totals = {"sequences": 0, "tokens": 0, "positions": 0, "max_topk_id": -1, "max_input_id": -1}
    with progress_bar() as bar, PeakMemory(scorer.device.type) as peak:
        task = bar.add_task("cache teacher top-k", total=len(rows))
        for index, shard_start in enumerate(range(0, len(rows), shard_size)):
            path = shard_file(cache_dir, index)
            counts = finished_shard(path)
            if counts is None:
                encoded_shard = [encode_prompt_completion(tokenizer, row["prompt"], row["completion"][0]["content"])
                                 for row in rows[shard_start : shard_start + shard_size]]
                scored = []
                for batch in (token_batches(encoded_shard, preset.distill.stream_tokens) if stream_layers
                              else [encoded_shard[i : i + batch_size] for i in range(0, len(encoded_shard), batch_size)]):
                    scored += scorer.score(batch, top_k)
                    bar.advance(task, len(batch))
                counts = write_shard(path, scored, vocab_size)
            else:
                bar.advance(task, counts["sequences"])
            for key in totals:
                totals[key] = max(totals[key], counts[key]) if key.startswith("max_") else totals[key] + counts[key]
    compute = add_session(cache_dir, time.time() - started, peak.bytes)  # summed over the sessions that wrote shards
    shard_bytes = sum(path.stat().st_size for path in cache_dir.glob("shard-*.safetensors"))
    info = {"format": CACHE_FORMAT, "teacher": scorer.name if serving else str(teacher_path), "top_k": top_k, "temperature": 1.0,
            "tokenizer_hash": tokenizer_hash(tokenizer), "vocab_size": vocab_size, "source_data": input_digest(sft_file),
            "examples": totals["sequences"], "tokens": totals["tokens"], "cached_positions": totals["positions"],
            "max_topk_id": totals["max_topk_id"], "max_input_id": totals["max_input_id"], "bytes": shard_bytes,
            # per cached position, everything in the shards included (ids, offsets, headers): the figure to hold to k x 6
            "bytes_per_token": shard_bytes / max(totals["positions"], 1),
            "device": f"server {redact(scorer.base_url)}" if serving else hardware.describe(), **compute}
    mark_complete(cache_dir, info)
    return info


def token_batches(encoded: list, max_tokens: int) -> list[list]:
    """Consecutive sequences in batches whose padded size (sequences x the longest) stays within `max_tokens`
    (a longer sequence alone): with layer streaming each batch is one read of the whole checkpoint from disk,
    so a batch must hold as many tokens as the memory for its hidden states allows."""
    batches, current, longest = [], [], 0
    for item in encoded:
        length = len(item[0])
        if current and (len(current) + 1) * max(longest, length) > max_tokens:
            batches.append(current)
            current, longest = [], 0
        current.append(item)
        longest = max(longest, length)
    return batches + [current] if current else batches


def is_server_name(teacher: str) -> bool:
    """`openai:MODEL` names a model on a server, as for the chains teacher (generate/teachers.is_server_teacher)."""
    return teacher.startswith("openai:")


def server_scorer(teacher: str, server: str | None, tokenizer_source: str, preset: Preset, rows: list[dict],
                  sft_file: Path) -> tuple[ServerScorer, object]:
    """The served teacher (its requests paced by generate.concurrency, max_retries and request_timeout, as the
    chains teacher's) and the local tokenizer that makes the ids it scores; the sequences checked against the
    served context length first."""
    tokenizer = tokenizer_of(tokenizer_source)
    settings = preset.generate
    scorer = ServerScorer(teacher.removeprefix("openai:"), server_url(server), tokenizer,
                          os.environ.get("BUDGET_REASONER_TEACHER_KEY", "EMPTY"), settings.request_timeout,
                          settings.concurrency, settings.max_retries)
    say(f"cache: {scorer.name} at {redact(scorer.base_url)} scores ids made with the tokenizer of {tokenizer_source}"
        f"{'' if tokenizer_source != preset.model.student else ' (the student: model.student)'}; the served model "
        f"must share it (--tokenizer to name another)")
    if (length := scorer.max_model_len()) is not None:  # the prompt and the one token vLLM must generate
        check_sequence_lengths(tokenizer, rows, sft_file, teacher, positions=length - 1)
    return scorer, tokenizer


def finished_shard(path: Path) -> dict | None:
    """A shard an earlier session finished (its counts), or None to write it: absent, or damaged (said, then redone)."""
    if not path.is_file():
        return None
    try:
        return shard_counts(path)
    except DamagedShard as error:
        say(f"{path}: not a readable top-k cache shard ({error.why}); scoring its sequences again")
        return None


def check_sequence_lengths(tokenizer, rows: list[dict], sft_file: Path, teacher_path: str | Path,
                           positions: int | None = None) -> None:
    """The teacher scores whole sequences (nothing is cut): refuse, with a count, any longer than its positions
    (`positions`, else its config's)."""
    from transformers import AutoConfig

    if positions is None:
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
    """Pad cached sequences into a batch; a cached position p gets the label input_ids[p + 1] (already shifted) and
    the teacher's top-k, every other position -100 and zeros."""
    length = max(len(e["input_ids"]) for e in examples)
    k = examples[0]["topk_ids"].shape[1]
    batch = {
        "input_ids": torch.full((len(examples), length), pad_id),
        "attention_mask": torch.zeros((len(examples), length), dtype=torch.long),
        "kd_labels": torch.full((len(examples), length), -100),
        "topk_ids": torch.zeros((len(examples), length, k), dtype=torch.long),
        "topk_logprobs": torch.zeros((len(examples), length, k)),
    }
    for i, e in enumerate(examples):
        ids, positions = torch.from_numpy(e["input_ids"]), torch.from_numpy(e["positions"])
        batch["input_ids"][i, : len(ids)] = ids
        batch["attention_mask"][i, : len(ids)] = 1
        batch["kd_labels"][i, positions] = ids[positions + 1]
        batch["topk_ids"][i, positions] = torch.from_numpy(e["topk_ids"]).long()
        batch["topk_logprobs"][i, positions] = torch.from_numpy(e["topk_logprobs"]).float()
    return batch


def kd_trainer_class():
    """A transformers Trainer whose loss is the chunked KD loss on the final hidden states.

    Built when called, from the `transformers.Trainer` bound then, not when this module is imported: on the
    Unsloth backend the class must come after `import unsloth` (hardware.prepare_backend), like TRL's
    trainers, which `train/sft.py` and `train/dpo.py` also look up only when they build one."""
    from transformers import Trainer

    class KDTrainer(Trainer):
        def __init__(self, *args, kd_alpha: float, kd_temperature: float, kd_tail: bool = False, **kwargs):
            super().__init__(*args, **kwargs)
            self.kd_alpha, self.kd_temperature, self.kd_tail = kd_alpha, kd_temperature, kd_tail
            self.loss_is_scaled_for_ga = True  # compute_loss already divides by the accumulated batch's token count

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            # through model(...), so the loss runs inside the autocast accelerate wraps around the forward;
            # normalized by the label tokens of the whole accumulated batch, not this micro-batch
            loss = fused_kd_loss(model, inputs, inputs["kd_labels"], self.kd_alpha, self.kd_temperature, num_items_in_batch,
                                 tail=self.kd_tail)
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
    from transformers import TrainingArguments

    out = Path(out)
    info = read_cache_manifest(cache_dir)  # before the claim: an old-format cache is one line, with nothing written
    settings = settings_of(preset, *MODEL_SETTINGS, "lora", "distill")
    if (record := claim_stage(out, "distill", {"cache": cache_dir, "student": student_stage}, settings,
                              overwrite)) is not None:
        return record
    hardware = hardware or hardware_for(preset)
    cache = TopKCache(cache_dir)  # the shards the manifest lists, verified by claim_stage above; mapped, not loaded
    if len(cache) != info["examples"]:
        raise BudgetReasonerError(f"{cache_dir}: its shards hold {len(cache)} examples, its COMPLETE.json says "
                                  f"{info['examples']}; the cache is damaged: rerun with --overwrite")
    model, base = load_for_training(student_stage, preset, hardware)
    tokenizer = load_tokenizer(base)
    check_vocabulary(cache_dir, info, tokenizer, model.get_output_embeddings().weight.shape[0])
    model = with_lora(model, preset, preset.distill.gradient_checkpointing, hardware)
    settings = preset.distill
    args = training_arguments(TrainingArguments, settings, preset, hardware, out, report_to, remove_unused_columns=False)
    trainer = kd_trainer_class()(model=model, args=args, train_dataset=cache,
                                 data_collator=lambda examples: collate_kd(examples, tokenizer.pad_token_id),
                                 kd_alpha=settings.alpha, kd_temperature=settings.temperature, kd_tail=settings.kd_tail)
    say(f"distill: {len(cache)} cached sequences, top-{info['top_k']} from {info['teacher']}, alpha {settings.alpha}; "
        f"{describe_precision(preset, hardware)}")
    return save_stage(out, trainer.model, tokenizer, base, train_with_resume(trainer, out),
                      stage_info("distill", preset, hardware, examples=len(cache)))


def check_vocabulary(cache_dir: Path, info: dict, tokenizer, student_rows: int) -> None:
    """Before any training: the student must read the cache's tokens as the teacher did (the same tokenizer) and
    have an LM-head row for every cached id (Qwen2.5 checkpoints of one tokenizer have 151,936 or 152,064 rows)."""
    student_hash = tokenizer_hash(tokenizer)
    if student_hash != info["tokenizer_hash"]:
        raise BudgetReasonerError(
            f"{cache_dir}: cached with tokenizer {info['tokenizer_hash']} of {info['teacher']}, but the student's is "
            f"{student_hash}; logit-level KD needs a shared vocabulary (use sequence-level data only)"
        )
    needed = max(info["max_topk_id"], info["max_input_id"]) + 1
    if needed > student_rows:
        raise BudgetReasonerError(
            f"{cache_dir}: the teacher {info['teacher']} ({info['vocab_size']:,} LM-head rows) cached token id "
            f"{needed - 1:,}, but the student's LM head has {student_rows:,} rows; re-cache with a teacher whose ids "
            f"the student has, or use sequence-level data only"
        )
