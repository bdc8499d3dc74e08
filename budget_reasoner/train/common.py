"""Pieces every training stage shares: encoding chat examples, padding, TrainingArguments from a preset."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import time
from pathlib import Path

import torch
from transformers import TrainerCallback

from budget_reasoner import distributed
from budget_reasoner.errors import BudgetReasonerError
from budget_reasoner.hardware import PeakMemory
from budget_reasoner.io import add_session, mark_complete, read_json, write_json
from budget_reasoner.models import describe_precision, load_model, torch_dtype
from budget_reasoner.plan import prepare_for_kbit_training, training_plan
from budget_reasoner.progress import progress_bar, say
from budget_reasoner.stages import check_adapter, recorded_base, stage_model_paths


def encode_prompt_completion(tokenizer, prompt: list[dict], completion: str) -> tuple[list[int], list[int]]:
    """Token ids of prompt + assistant completion (ending in the EOS) and a mask that is 1 on the completion."""
    prompt_ids = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
    prompt_ids = tokenizer(prompt_ids, add_special_tokens=False)["input_ids"]
    completion_ids = tokenizer(completion + tokenizer.eos_token, add_special_tokens=False)["input_ids"]
    return prompt_ids + completion_ids, [0] * len(prompt_ids) + [1] * len(completion_ids)


def pad_batch(examples: list[tuple[list[int], list[int]]], pad_id: int):
    """Right-pad (ids, completion mask) pairs into input_ids, attention_mask and labels (-100 off the completion)."""
    length = max(len(ids) for ids, _ in examples)
    input_ids = torch.full((len(examples), length), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), length), dtype=torch.long)
    labels = torch.full((len(examples), length), -100, dtype=torch.long)
    for row, (ids, mask) in enumerate(examples):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        attention_mask[row, : len(ids)] = 1
        labels[row, : len(ids)] = torch.where(torch.tensor(mask) == 1, torch.tensor(ids), torch.tensor(-100))
    return input_ids, attention_mask, labels


def training_arguments(config_class, stage, preset, hardware, output_dir: Path, report_to: str, **extra):
    """A TRL/transformers config from a preset's stage section, with the CPU traps handled in one place.

    Under torchrun / accelerate launch every rank joins the process group here (the CPU's gloo, or the GPUs')
    and refuses in one line if the ranks loaded different presets; batch_size is per device, so an optimizer
    step sees batch_size x processes x grad_accum examples (train_with_resume says so)."""
    on_cpu = hardware.device == "cpu"
    distributed.join(cpu=on_cpu)
    distributed.check_same_preset(preset)
    return config_class(
        output_dir=str(output_dir / "checkpoints"),
        max_steps=stage.max_steps,
        per_device_train_batch_size=stage.batch_size,
        gradient_accumulation_steps=stage.grad_accum,
        learning_rate=stage.learning_rate,
        lr_scheduler_type="cosine",
        warmup_steps=int(stage.warmup_ratio * stage.max_steps),
        optim=stage.optimizer,
        logging_steps=max(1, stage.max_steps // 50),
        save_steps=stage.save_steps,
        save_total_limit=1,
        activation_checkpointing=stage.gradient_checkpointing,  # trl turns it on by default; tiny models lose speed
        use_cpu=on_cpu,
        bf16=training_plan(preset, hardware).autocast_dtype == "bfloat16",  # plan.py: the estimator reads the same
        fp16=training_plan(preset, hardware).autocast_dtype == "float16",
        report_to=report_to,
        run_name=output_dir.name,  # the stage's name in wandb
        seed=preset.seed,
        dataloader_num_workers=0,
        disable_tqdm=True,  # our own rich bar (ProgressCallback) reports instead
        # the report's cost accounting counts tokens (GRPO's inputs are prompts it samples from: it counts its own)
        include_num_input_tokens_seen=extra.pop("include_num_input_tokens_seen", True),
        # under DDP: every trainable weight (LoRA, or all of a full fine-tune) gets a gradient each step, so the
        # search for unused ones (the Trainer's default without checkpointing) is an extra graph walk for nothing
        ddp_find_unused_parameters=False,
        **extra,
    )


def checkpoint_is_complete(checkpoint: Path, step: int) -> bool:
    """The Trainer writes trainer_state.json last: a checkpoint is whole when that file is, and names its step."""
    try:
        state = read_json(checkpoint / "trainer_state.json")
    except BudgetReasonerError:  # missing, or cut off mid-write
        return False
    return state.get("global_step") == step


def last_complete_checkpoint(checkpoints: Path) -> Path | None:
    """The newest checkpoint that finished writing. Newer, incomplete ones are set aside (renamed, kept).

    A run killed (SIGKILL, the OOM killer) or stopped by a full disk while saving leaves checkpoint-N without
    its trainer_state.json. transformers' get_last_checkpoint picks the highest N regardless, and resuming
    from it then fails on the missing file on every rerun. The renamed folder no longer matches the Trainer's
    `checkpoint-*` pattern, so neither resuming nor checkpoint rotation touches it."""
    if not checkpoints.is_dir():
        return None
    numbered = sorted(((int(match[1]), path) for path in checkpoints.iterdir()
                       if path.is_dir() and (match := re.fullmatch(r"checkpoint-(\d+)", path.name))), reverse=True)
    for step, path in numbered:
        if checkpoint_is_complete(path, step):
            return path
        aside = path.with_name(f"incomplete-{path.name}")
        while aside.exists():
            aside = aside.with_name(aside.name + "-again")
        os.replace(path, aside)
        say(f"{path} was cut off while being written (killed, or a full disk: no complete trainer_state.json); "
            f"set aside as {aside.name} (removed with the checkpoints once the stage completes; delete it sooner to "
            f"free space)")
    return None


def train_with_resume(trainer, output_dir: Path) -> dict:
    """Train, resuming from the newest complete checkpoint of an interrupted run.

    Returns what the stage record keeps of the run: the log `history`, the input `tokens` seen, and its compute
    over every session that worked on it (sessions.json: one entry per session, interrupted ones included):
    `seconds` summed, `peak_memory_bytes` the highest, and the `sessions` themselves. A session killed outright
    (SIGKILL, the OOM killer) has no chance to write its entry and is missing from the sums."""
    checkpoints = output_dir / "checkpoints"
    had_checkpoints = checkpoints.is_dir() and any(checkpoints.glob("checkpoint-*"))
    last = distributed.main_decides(last_complete_checkpoint, checkpoints)  # rank 0 sets aside; all resume alike
    if last:
        say(f"resuming from {last}")
    elif had_checkpoints:
        say(f"{output_dir}: no complete checkpoint to resume from; training from the start")
    last = str(last) if last else None
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)  # it prints every log dict; the rich bar shows the loss instead
    trainer.add_callback(RichProgressCallback())
    adapters_in_fp32(trainer.model)  # before train() builds the optimizer over them
    if trace := os.environ.get(TRACE_BATCHES):
        trainer.data_collator = traced_collator(trainer.data_collator, Path(trace) / f"rank-{distributed.rank()}.jsonl")
    batch = effective_batch(trainer.args)
    say(f"effective batch {batch['per_device']} per device x {batch['world_size']} process(es) x "
        f"{batch['grad_accum']} accumulation = {batch['examples_per_step']} examples per optimizer step")
    started, peak = time.time(), PeakMemory(trainer.args.device.type)
    per_rank, seconds = None, None
    try:
        with peak:
            trainer.train(resume_from_checkpoint=last)
        seconds = time.time() - started
        # every rank's own peak and wall time (on the CPU each rank is its own process: RSS is per rank);
        # only after a finished train(): a rank that failed is not there to answer a collective
        per_rank = distributed.gather({"peak_memory_bytes": peak.bytes, "seconds": round(seconds, 3)})
    finally:
        compute = {}
        if distributed.is_main_process():  # one sessions.json, written by the run's one writer
            extra = {"per_rank": per_rank} if per_rank and len(per_rank) > 1 else {}
            compute = add_session(output_dir, time.time() - started if seconds is None else seconds, peak.bytes,
                                  resumed_from_step=_step_of(last), reached_step=int(trainer.state.global_step),
                                  world_size=batch["world_size"], **extra)
    compute = distributed.main_decides(lambda: compute)  # the other ranks return the same record as rank 0
    return {"history": trainer.state.log_history, "tokens": int(trainer.state.num_input_tokens_seen),
            "world_size": batch["world_size"], "effective_batch": batch["examples_per_step"], **compute}


# BUDGET_REASONER_TRACE_BATCHES=FOLDER: every rank appends, per micro-batch it trains on, one line listing a digest
# of each example's tokens to FOLDER/rank-R.jsonl. For checking how a launch shards the data (tests, benchmarks).
TRACE_BATCHES = "BUDGET_REASONER_TRACE_BATCHES"


def traced_collator(collate, path: Path):
    """`collate`, also writing the digests of the examples of each batch it builds to `path` (one line a batch)."""
    import hashlib
    import json

    path.parent.mkdir(parents=True, exist_ok=True)

    def collate_and_trace(examples):
        batch = collate(examples)
        if "input_ids" not in batch:  # DPO's batches hold prompt and completion ids apart: not traced
            return batch
        mask = batch.get("attention_mask")
        rows = []
        for index, ids in enumerate(batch["input_ids"]):
            kept = ids[mask[index].bool()] if mask is not None else ids
            rows.append(hashlib.sha256(kept.cpu().numpy().tobytes()).hexdigest()[:12])
        with path.open("a") as handle:
            handle.write(json.dumps(rows) + "\n")
        return batch

    return collate_and_trace


def effective_batch(args) -> dict:
    """Examples per optimizer step: the per-device batch, on every data-parallel process, over the accumulation."""
    world_size = max(1, int(args.world_size))
    return {"per_device": args.per_device_train_batch_size, "world_size": world_size,
            "grad_accum": args.gradient_accumulation_steps,
            "examples_per_step": args.per_device_train_batch_size * world_size * args.gradient_accumulation_steps}


def tokens_across_ranks(trainer, count, device):
    """The accumulated batch's label tokens summed over every data-parallel rank, as transformers' Trainer
    counts them for its own losses (`average_tokens_across_devices`, on by default): each rank's loss then
    divides by the global count, so the gradient is the same whatever the split of tokens across ranks."""
    count = torch.as_tensor(count, device=device)
    if trainer.args.average_tokens_across_devices and trainer.accelerator.num_processes > 1:
        count = trainer.accelerator.gather(count.reshape(1)).sum()
    return count


def undo_data_parallel_mean(trainer, loss, num_items_in_batch):
    """A loss divided by the global token count, scaled back up by the number of ranks.

    DDP averages gradients over ranks, so the sum of per-rank losses each divided by the global token count
    would come out `num_processes` times too small. transformers' Trainer.compute_loss multiplies by the
    ranks for the same reason (5.24: `loss *= num_processes` when average_tokens_across_devices); a
    compute_loss of our own (the fused losses) replaces that one, so it must do the same."""
    if num_items_in_batch is not None and trainer.args.average_tokens_across_devices:
        return loss * trainer.accelerator.num_processes
    return loss


def adapters_in_fp32(model) -> int:
    """Trainable weights back to fp32, as plan.py says LoRA trains (peft's and Unsloth's default too).

    TRL 1.16's SFTTrainer and DPOTrainer cast every trainable weight of a quantized model to bf16 in their
    __init__ (sft_trainer.py, dpo_trainer.py: "to follow the QLoRA paper"). In bf16 storage AdamW updates
    smaller than bf16's resolution are lost, and the T4 preset (fp16, no bf16 on sm_75) would hold bf16
    weights beside fp16 compute. Autocast still runs the adapter matmuls in the compute dtype; the cost is
    4 bytes instead of 2 per adapter weight, which the estimator counts. Returns how many were cast back."""
    import torch

    cast = 0
    for parameter in model.parameters():
        if parameter.requires_grad and parameter.dtype in (torch.bfloat16, torch.float16):
            parameter.data = parameter.data.float()
            cast += 1
    return cast


def _step_of(checkpoint: str | None) -> int:
    return int(Path(checkpoint).name.split("-")[-1]) if checkpoint else 0


def check_prompt_lengths(tokenizer, rows: list[dict], source: Path, limit: int, what: str) -> None:
    """Refuse, with a count, rows whose prompt alone has `limit` tokens or more (`what` names the limit): their
    completion would be cut away entirely, so they would train nothing; say how many others are cut short.
    Counted with the tokenizer before any model loads."""
    prompts = [tokenizer.apply_chat_template(row["prompt"], add_generation_prompt=True, tokenize=False) for row in rows]
    prompt_tokens = [len(ids) for ids in tokenizer(prompts, add_special_tokens=False)["input_ids"]]
    completions = [row["completion"][0]["content"] if "completion" in row else row["chosen"][0]["content"] for row in rows]
    completion_tokens = [len(ids) + 1 for ids in tokenizer(completions, add_special_tokens=False)["input_ids"]]  # + EOS
    too_long = [number for number, count in enumerate(prompt_tokens, 1) if count >= limit]
    longest = max(prompt_tokens, default=0)
    truncated = sum(p < limit < p + c for p, c in zip(prompt_tokens, completion_tokens))
    if too_long:
        raise BudgetReasonerError(
            f"{source}: {len(too_long)} of {len(rows)} prompts are at least {what} ({limit} tokens; the longest "
            f"{longest:,}), so none of their completion would be trained (first: example {too_long[0]}); shorten or "
            f"drop them, or raise {what}"
        )
    if truncated:
        say(f"{source}: {truncated} of {len(rows)} examples are longer than {what} ({limit} tokens) and are cut to it")


def stage_info(stage: str, preset, hardware, **counts) -> dict:
    """What a stage record says about itself beyond the run: its data counts and the machine it trained on."""
    return {"stage": stage, **counts, "device": hardware.describe(), "backend": hardware.backend,
            "precision": describe_precision(preset, hardware)}


def save_stage(output_dir: Path, model, tokenizer, base: str, run: dict, info: dict) -> dict:
    """Write the adapter, tokenizer and stage record, then drop the checkpoints and mark the stage complete.

    Under a multi-process launch rank 0 writes (every rank holds the same, all-reduced adapter) and the others
    wait for it, so none reports the stage done before it is on disk."""
    record = {"base": recorded_base(base, output_dir), "adapter": "adapter", **run, **info}
    with whole_weights(model) as state_dict:  # every rank takes part in gathering sharded weights
        if distributed.is_main_process():
            _write_stage(output_dir, model, tokenizer, record, state_dict)
    distributed.barrier()
    return record


@contextlib.contextmanager
def whole_weights(model):
    """The model's weights whole on rank 0 for saving, when a sharding engine split them: FSDP2's DTensors are
    gathered into a full state dict (yielded; rank 0 holds it, in CPU memory), DeepSpeed ZeRO-3's partitioned
    parameters are gathered in place for the block. Collectives: every rank must enter. Unsharded (one process,
    DDP): nothing to do, None. (Not exercised on the CPU: the GPU routes of presets/accelerate/.)"""
    parameters = list(model.parameters())
    if any(hasattr(parameter, "ds_id") for parameter in parameters):  # ZeRO-3 marks its partitioned parameters
        import deepspeed

        with deepspeed.zero.GatheredParameters(parameters, modifier_rank=None):
            yield None
        return
    from torch.distributed.tensor import DTensor

    if any(isinstance(parameter, DTensor) for parameter in parameters):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        yield get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return
    yield None


def _write_stage(output_dir: Path, model, tokenizer, record: dict, state_dict: dict | None) -> None:
    gathered = {"state_dict": state_dict} if state_dict is not None else {}
    if hasattr(model, "peft_config"):  # DPO holds a frozen "ref" copy beside "default"; only "default" is ours
        model.save_pretrained(output_dir / "adapter", selected_adapters=["default"], **gathered)
    else:
        model.save_pretrained(output_dir / "adapter", **gathered)
    tokenizer.save_pretrained(output_dir / "adapter")
    write_json(output_dir / "stage.json", record)
    shutil.rmtree(output_dir / "checkpoints", ignore_errors=True)
    mark_complete(output_dir, {key: value for key, value in record.items() if key != "history"})


def load_for_training(stage_or_model: str | Path, preset, hardware):
    """The model a stage starts from: a base model, or a base with a previous stage's adapter (trainable)."""
    from peft import PeftModel

    base, adapter = stage_model_paths(Path(stage_or_model))
    if adapter is not None:
        check_adapter(adapter)
    if hardware.backend == "unsloth":
        return load_with_unsloth(base, adapter, preset, hardware), base
    model = load_model(base, preset, hardware)
    if preset.quantization.load_in_4bit:
        # not peft's prepare_model_for_kbit_training, which upcasts embeddings, LM head and norms to fp32 (plan.py)
        model = prepare_for_kbit_training(model, training_plan(preset, hardware))
    if adapter is not None:
        model = PeftModel.from_pretrained(model, str(adapter), is_trainable=True)
    return model, base


def load_with_unsloth(base: str, adapter: Path | None, preset, hardware):
    """Unsloth's FastLanguageModel: its own (4-bit) loader and patched model. A previous stage's adapter goes on
    as peft loads it, then through Unsloth's get_peft_model, which keeps it and adds Unsloth's LoRA patches."""
    from peft import PeftModel
    from unsloth import FastLanguageModel

    try:
        model, _ = FastLanguageModel.from_pretrained(str(base), max_seq_length=preset.model.max_length,
                                                     dtype=torch_dtype(preset, hardware),
                                                     load_in_4bit=preset.quantization.load_in_4bit)
    except OSError as error:
        raise BudgetReasonerError(f"cannot load model {base!r} with unsloth: {str(error).splitlines()[0]}") from None
    if adapter is None:
        return model
    model = PeftModel.from_pretrained(model, str(adapter), is_trainable=True)
    return with_lora(model, preset, gradient_checkpointing=False, hardware=hardware)


def with_lora(model, preset, gradient_checkpointing: bool, hardware):
    """The model with a trainable LoRA adapter: the one it already carries, else a fresh one from the preset."""
    if hardware.backend == "unsloth":
        from unsloth import FastLanguageModel

        # An adapter it carries is passed back with its own settings: Unsloth keeps it only when they match.
        lora = model.peft_config["default"] if hasattr(model, "peft_config") else peft_lora_config(preset)
        return FastLanguageModel.get_peft_model(
            model, r=lora.r, lora_alpha=lora.lora_alpha, lora_dropout=lora.lora_dropout,
            target_modules=sorted(lora.target_modules), random_state=preset.seed,
            # "unsloth" = its checkpointing that offloads activations to host RAM on a GPU
            use_gradient_checkpointing="unsloth" if gradient_checkpointing else False,
        )
    if hasattr(model, "peft_config"):
        return model
    from peft import get_peft_model

    torch.manual_seed(preset.seed)  # LoRA's random A matrices: the same run starts from the same adapter
    return get_peft_model(model, peft_lora_config(preset))


def peft_lora_config(preset):
    from peft import LoraConfig

    if "lm_head" in preset.lora.target_modules:
        raise BudgetReasonerError(
            "lora.target_modules: a LoRA adapter on lm_head is not supported (the chunked losses read lm_head.weight "
            "directly, so the adapter would be silently ignored); remove 'lm_head'"
        )
    return LoraConfig(r=preset.lora.r, lora_alpha=preset.lora.alpha, lora_dropout=preset.lora.dropout,
                      target_modules=preset.lora.target_modules, task_type="CAUSAL_LM")


class RichProgressCallback(TrainerCallback):
    """A rich progress bar over optimizer steps, with the latest loss."""

    def on_train_begin(self, args, state, control, **kwargs):
        self.bar = progress_bar()
        self.bar.start()
        self.task = self.bar.add_task("train", total=state.max_steps, completed=state.global_step)

    def on_step_end(self, args, state, control, **kwargs):
        self.bar.update(self.task, completed=state.global_step)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.bar.update(self.task, description=f"train loss {logs['loss']:.3f}")

    def on_train_end(self, args, state, control, **kwargs):
        self.bar.stop()
