"""The sft stage: (Q)LoRA supervised fine-tuning of the student on verified chains, through TRL's SFTTrainer.

Input: an SFT set in TRL's conversational prompt-completion format (`generate` writes one). The loss
is on the completion only, less the output blocks of its tool calls (tools.py: the runtime wrote them, so the
student is not taught to). Output: a LoRA adapter over the student base, plus `stage.json`.
"""

from __future__ import annotations

from pathlib import Path

from budget_reasoner.config import Preset
from budget_reasoner.distributed import check_enough_examples
from budget_reasoner.hardware import Hardware, hardware_for
from budget_reasoner.io import MODEL_SETTINGS, claim_stage, read_jsonl, settings_of, writes_folder
from budget_reasoner.models import describe_precision
from budget_reasoner.progress import say
from budget_reasoner.stages import tokenizer_of
from budget_reasoner.train.common import (check_prompt_lengths, load_for_training, save_stage, stage_info,
                                          train_with_resume, training_arguments, undo_data_parallel_mean, with_lora)

SFT_COLUMNS = ("prompt", "completion")
SFT_KINDS = {"prompt": "messages", "completion": "messages"}


def fused_sft_trainer_class():
    """SFTTrainer whose loss goes through the chunked fused cross-entropy (preset `sft.fused_loss: true`)."""
    from trl import SFTTrainer

    from budget_reasoner.kernels.patch import fused_causal_lm_loss

    class FusedLossSFTTrainer(SFTTrainer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.loss_is_scaled_for_ga = True  # divided by the accumulated batch's label tokens, not per micro-batch

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            loss = fused_causal_lm_loss(model, inputs, num_items_in_batch)
            loss = undo_data_parallel_mean(self, loss, num_items_in_batch)  # num_items_in_batch is global under DDP
            return (loss, None) if return_outputs else loss

    return FusedLossSFTTrainer


@writes_folder("out")
def sft(sft_file: Path, student: str | Path, out: Path, preset: Preset, hardware: Hardware | None = None,
        report_to: str = "none", overwrite: bool = False) -> dict:
    """Fine-tune `student` (a model path or hub id) with a fresh LoRA adapter on `sft_file` (JSONL); write to `out`.

    `out` resumes only what the same data, student and settings started (io.claim_stage); `overwrite` starts over."""
    out = Path(out)
    rows = read_jsonl(sft_file, SFT_COLUMNS, SFT_KINDS)  # before anything is claimed or loaded
    check_enough_examples(len(rows), f"chains in {sft_file}")
    settings = settings_of(preset, *MODEL_SETTINGS, "lora", "sft")
    if (record := claim_stage(out, "sft", {"data": sft_file, "student": student}, settings, overwrite)) is not None:
        return record
    hardware = hardware or hardware_for(preset)
    trainer, tokenizer, base = build_sft_trainer(rows, sft_file, student, out, preset, hardware, report_to)
    say(f"sft: {len(rows)} chains; {describe_precision(preset, hardware)}; "
        f"{'fused chunked' if preset.sft.fused_loss else 'standard'} cross-entropy"
        f"{'; tool outputs masked out of the loss' if getattr(trainer.data_collator, 'masks_observations', False) else ''}")
    return save_stage(out, trainer.model, tokenizer, base, train_with_resume(trainer, out),
                      stage_info("sft", preset, hardware, examples=len(rows)))


def build_sft_trainer(rows: list[dict], sft_file: Path, student: str | Path, out: Path, preset: Preset,
                      hardware: Hardware, report_to: str = "none"):
    """The SFTTrainer over `rows` (read from `sft_file`) with a fresh LoRA on `student`; returns it with its tokenizer
    and base. TRL builds the labels (-100 off the completion) when it prepares the dataset; when a chain holds tool
    output blocks, its collator is wrapped to set their tokens' labels to -100 as well (tools.mask_observations),
    so the fused loss (kernels/patch.py), which reads the labels, masks them too."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from budget_reasoner.tools import has_observation, mask_observations

    tokenizer = tokenizer_of(student)
    check_prompt_lengths(tokenizer, rows, sft_file, preset.model.max_length, "model.max_length")
    dataset = Dataset.from_list([{"prompt": row["prompt"], "completion": row["completion"]} for row in rows])
    model, base = load_for_training(student, preset, hardware)
    model = with_lora(model, preset, preset.sft.gradient_checkpointing, hardware)
    args = training_arguments(SFTConfig, preset.sft, preset, hardware, out, report_to,
                              max_length=preset.model.max_length, completion_only_loss=True)
    trainer_class = fused_sft_trainer_class() if preset.sft.fused_loss else SFTTrainer
    trainer = trainer_class(model=model, args=args, train_dataset=dataset, processing_class=tokenizer)
    if any(has_observation(row["completion"][0]["content"]) for row in rows):
        trainer.data_collator = mask_observations(trainer.data_collator, tokenizer, "labels", -100)
    return trainer, tokenizer, base
