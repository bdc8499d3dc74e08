"""The dpo stage: DPO on verified-vs-rejected chain pairs, starting from (and anchored to) the SFT model.

The reference model must be the SFT model, not the untrained base. With LoRA that costs no second copy
of the weights: the SFT adapter is loaded as the trainable "default" adapter, and TRL's DPOTrainer,
given a PEFT model that already has an adapter, adds a frozen copy of it named "ref" and computes the
reference log-probs through that copy. (Disabling the only adapter instead would make the base the
reference, a known trap; tests/test_dpo.py checks the reference log-probs equal the SFT model's.)
"""

from __future__ import annotations

from pathlib import Path

from budget_reasoner.config import Preset
from budget_reasoner.distributed import check_enough_examples
from budget_reasoner.errors import BudgetReasonerError
from budget_reasoner.hardware import Hardware, hardware_for
from budget_reasoner.io import MODEL_SETTINGS, claim_stage, read_jsonl, settings_of, writes_folder
from budget_reasoner.models import describe_precision, load_tokenizer
from budget_reasoner.progress import say
from budget_reasoner.stages import tokenizer_of
from budget_reasoner.train.common import (check_prompt_lengths, load_for_training, save_stage, stage_info,
                                          train_with_resume, training_arguments)

PAIR_COLUMNS = ("prompt", "chosen", "rejected")
PAIR_KINDS = {"prompt": "messages", "chosen": "messages", "rejected": "messages"}


def loss_settings(preset: Preset) -> dict:
    """DPO's sigmoid loss, plus an NLL term on the chosen chain when `dpo.sft_weight` > 0."""
    if preset.dpo.sft_weight > 0:
        return {"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0, preset.dpo.sft_weight]}
    return {"loss_type": ["sigmoid"]}


def read_pairs(pairs_file: Path) -> list[dict]:
    rows = read_jsonl(pairs_file, PAIR_COLUMNS, PAIR_KINDS)
    if not rows:
        raise BudgetReasonerError(f"{pairs_file}: no preference pairs (the teacher was never both right and wrong on a problem)")
    return rows


def build_dpo_trainer(pairs_file: Path, sft_stage: Path, out: Path, preset: Preset, hardware: Hardware, report_to: str = "none"):
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    from budget_reasoner.tools import has_observation, mask_observations

    rows = read_pairs(pairs_file)
    check_prompt_lengths(tokenizer_of(sft_stage), rows, pairs_file, preset.model.max_length, "model.max_length")
    dataset = Dataset.from_list([{key: row[key] for key in PAIR_COLUMNS} for row in rows])
    model, base = load_for_training(sft_stage, preset, hardware)
    if not hasattr(model, "peft_config"):
        raise BudgetReasonerError(f"{sft_stage}: dpo starts from an sft stage folder (base + LoRA adapter)")
    tokenizer = load_tokenizer(base)
    args = training_arguments(DPOConfig, preset.dpo, preset, hardware, Path(out), report_to,
                              beta=preset.dpo.beta, max_length=preset.model.max_length, **loss_settings(preset))
    trainer = DPOTrainer(model=model, ref_model=None, args=args, train_dataset=dataset, processing_class=tokenizer)
    if any(has_observation(row[side][0]["content"]) for row in rows for side in ("chosen", "rejected")):
        # tool output blocks (tools.py) are the runtime's: out of the completion mask, TRL 1.16's DPOTrainer gives
        # them -100 labels and leaves them out of both chains' log-probs
        trainer.data_collator = mask_observations(trainer.data_collator, tokenizer, "completion_mask", 0)
    return trainer, tokenizer, base, len(rows)


@writes_folder("out")
def dpo(pairs_file: Path, sft_stage: Path, out: Path, preset: Preset, hardware: Hardware | None = None,
        report_to: str = "none", overwrite: bool = False) -> dict:
    """Continue the SFT adapter with DPO on `pairs_file`; write the new adapter (same base) to `out`.

    `out` resumes only what the same pairs, sft stage and settings started (io.claim_stage); `overwrite` starts over."""
    out = Path(out)
    check_enough_examples(len(read_pairs(pairs_file)), f"pairs in {pairs_file}")  # one line before anything is claimed
    settings = settings_of(preset, *MODEL_SETTINGS, "lora", "dpo")
    if (record := claim_stage(out, "dpo", {"pairs": pairs_file, "sft": sft_stage}, settings, overwrite)) is not None:
        return record
    hardware = hardware or hardware_for(preset)
    trainer, tokenizer, base, num_pairs = build_dpo_trainer(pairs_file, sft_stage, out, preset, hardware, report_to)
    say(f"dpo: {num_pairs} pairs, beta {preset.dpo.beta}, NLL weight {preset.dpo.sft_weight}, reference = the sft adapter; "
        f"{describe_precision(preset, hardware)}")
    return save_stage(out, trainer.model, tokenizer, base, train_with_resume(trainer, out),
                      stage_info("dpo", preset, hardware, pairs=num_pairs))
