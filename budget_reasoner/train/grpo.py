"""grpo: reinforcement learning with verifiable rewards (the R1 route), a thin wrapper over TRL's GRPOTrainer.

The student samples `grpo.num_generations` chains per training problem; each is rewarded by the domain's verifier
(rewards.py: correctness 1/0, a small format reward, an optional length penalty) and pushed toward the chains that
beat their group's mean. It starts from any stage folder (the R1-Zero route from the base, or RL after sft/dpo/
distill) and continues that stage's LoRA adapter, or puts a fresh one on a bare base model.

Settings that matter for small models, as TRL names them: `loss_type` dr_grpo (Dr. GRPO: no length or
standard-deviation bias) or dapo, `epsilon_high` (DAPO's clip-higher), `mask_truncated_completions`, and `beta: 0`
(no KL term, so no reference model is kept). TRL computes the completions' log-probs a chunk at a time, so
batch x group x length x vocabulary logits never exist at once. Generation uses transformers here; on a CUDA
machine where vLLM imports, TRL's colocated vLLM engine instead.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from budget_reasoner.config import Preset
from budget_reasoner.domains import Domain, recorded
from budget_reasoner.errors import BudgetReasonerError
from budget_reasoner.hardware import Hardware, hardware_for
from budget_reasoner.io import MODEL_SETTINGS, claim_stage, read_jsonl, settings_of, writes_folder
from budget_reasoner.problems import PROBLEM_COLUMNS, PROBLEM_KINDS
from budget_reasoner.progress import say
from budget_reasoner.rewards import RewardStats, reward_functions
from budget_reasoner.sampling import chat_prompt
from budget_reasoner.stages import tokenizer_of
from budget_reasoner.train.common import (describe_precision, load_for_training, save_stage, stage_info, train_with_resume,
                                          training_arguments, with_lora)


def grpo_arguments(preset: Preset, hardware: Hardware, out: Path, report_to: str):
    from trl import GRPOConfig

    settings = preset.grpo
    use_vllm = hardware.device == "cuda" and importlib.util.find_spec("vllm") is not None
    return training_arguments(
        GRPOConfig, settings, preset, hardware, out, report_to,
        num_generations=settings.num_generations, max_completion_length=settings.max_completion_length,
        temperature=settings.temperature, beta=settings.beta, loss_type=settings.loss_type, epsilon=settings.epsilon,
        epsilon_high=settings.epsilon_high, mask_truncated_completions=settings.mask_truncated_completions,
        use_vllm=use_vllm, vllm_mode="colocate", log_completions=False, include_num_input_tokens_seen=False,
    )


@writes_folder("out")
def grpo(problems_file: Path, start: str | Path, out: Path, preset: Preset, domain: Domain | str = "math",
         hardware: Hardware | None = None, report_to: str = "none", overwrite: bool = False) -> dict:
    """GRPO on the problems of `problems_file` (JSONL: id, domain, question, answer, source) from `start` (a stage
    folder or a base model); write the adapter to `out`. The stage record's `history` carries each logged step's
    mean `reward`; `rewards` counts what the reward functions could not pay (unusable references, unclosed chains)."""
    from datasets import Dataset
    from trl import GRPOTrainer

    out = Path(out)
    problems = read_jsonl(problems_file, PROBLEM_COLUMNS, PROBLEM_KINDS)  # bad rows: one line, nothing claimed
    if len(problems) < preset.grpo.batch_size // preset.grpo.num_generations:
        raise BudgetReasonerError(f"{problems_file}: {len(problems)} problems, fewer than one step's "
                                  f"{preset.grpo.batch_size // preset.grpo.num_generations} (grpo.batch_size / grpo.num_generations)")
    settings = {**settings_of(preset, *MODEL_SETTINGS, "lora", "grpo", "generate.instruction"), "domain": recorded(domain)}
    if (record := claim_stage(out, "grpo", {"problems": problems_file, "start": start}, settings, overwrite)) is not None:
        return record
    hardware = hardware or hardware_for(preset)
    instruction = preset.generate.instruction
    dataset = Dataset.from_list([{"prompt": chat_prompt(row["question"], instruction), "answer": row["answer"]}
                                 for row in problems])
    model, base = load_for_training(start, preset, hardware)
    if not hasattr(model, "peft_config"):  # a bare base (the R1-Zero route): a fresh adapter
        model = with_lora(model, preset, preset.grpo.gradient_checkpointing, hardware)
    tokenizer = tokenizer_of(start)
    stats = RewardStats()
    rewards = reward_functions(domain, preset.grpo.format_weight, preset.grpo.length_weight,
                               preset.grpo.max_completion_length, stats)
    say(f"grpo: {len(problems)} problems x {preset.grpo.num_generations} completions, loss {preset.grpo.loss_type}, "
        f"beta {preset.grpo.beta}; {describe_precision(preset, hardware)}")
    trainer = GRPOTrainer(model=model, reward_funcs=rewards, args=grpo_arguments(preset, hardware, out, report_to),
                          train_dataset=dataset, processing_class=tokenizer)
    run = train_with_resume(trainer, out)
    say(f"grpo: {stats.correct} of {stats.completions} completions correct; unpaid: {stats.unparseable_reference} with an "
        f"unusable reference, {stats.unclosed_think} without a closed </think>, {stats.failed} the verifier could not grade")
    return save_stage(out, trainer.model, tokenizer, base, run,
                      stage_info("grpo", preset, hardware, problems=len(problems), rewards=stats.to_dict()))
