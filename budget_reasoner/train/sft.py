"""The sft stage: (Q)LoRA supervised fine-tuning of the student on verified chains, through TRL's SFTTrainer.

Input: an SFT set in TRL's conversational prompt-completion format (`generate` writes one). The loss
is on the completion only. Output: a LoRA adapter over the student base, plus `stage.json`.
"""

from __future__ import annotations

from pathlib import Path

from budget_reasoner.config import Preset
from budget_reasoner.hardware import Hardware, hardware_for
from budget_reasoner.io import finished, read_jsonl, writes_folder
from budget_reasoner.models import describe_precision, load_tokenizer
from budget_reasoner.progress import say
from budget_reasoner.train.common import (load_for_training, save_stage, stage_info, train_with_resume, training_arguments,
                                          with_lora)

SFT_COLUMNS = ("prompt", "completion")


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
            return (loss, None) if return_outputs else loss

    return FusedLossSFTTrainer


@writes_folder("out")
def sft(sft_file: Path, student: str | Path, out: Path, preset: Preset, hardware: Hardware | None = None,
        report_to: str = "none") -> dict:
    """Fine-tune `student` (a model path or hub id) with a fresh LoRA adapter on `sft_file` (JSONL); write to `out`."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    out = Path(out)
    if (record := finished(out, "sft")) is not None:
        return record
    hardware = hardware or hardware_for(preset)
    rows = read_jsonl(sft_file, SFT_COLUMNS)
    dataset = Dataset.from_list([{"prompt": row["prompt"], "completion": row["completion"]} for row in rows])
    model, base = load_for_training(student, preset, hardware)
    model = with_lora(model, preset, preset.sft.gradient_checkpointing, hardware)
    tokenizer = load_tokenizer(base)
    say(f"sft: {len(rows)} chains; {describe_precision(preset, hardware)}; "
        f"{'fused chunked' if preset.sft.fused_loss else 'standard'} cross-entropy")
    args = training_arguments(SFTConfig, preset.sft, preset, hardware, out, report_to,
                              max_length=preset.model.max_length, completion_only_loss=True)
    trainer_class = fused_sft_trainer_class() if preset.sft.fused_loss else SFTTrainer
    trainer = trainer_class(model=model, args=args, train_dataset=dataset, processing_class=tokenizer)
    return save_stage(out, trainer.model, tokenizer, base, train_with_resume(trainer, out),
                      stage_info("sft", preset, hardware, examples=len(rows)))
