"""grpo: reinforcement learning with verifiable rewards (the R1 route), a thin wrapper over TRL's GRPOTrainer.

The student samples `grpo.num_generations` chains per training problem; each is rewarded by the domain's verifier
(rewards.py: correctness 1/0, a small format reward, an optional length penalty) and pushed toward the chains that
beat their group's mean. It starts from any stage folder (the R1-Zero route from the base, or RL after sft/dpo/
distill) and continues that stage's LoRA adapter, or puts a fresh one on a bare base model.

Settings that matter for small models, as TRL names them: `loss_type` dr_grpo (Dr. GRPO: no length or
standard-deviation bias) or dapo, `epsilon_high` (DAPO's clip-higher), `mask_truncated_completions`, and `beta: 0`
(no KL term, so no reference model is kept). TRL computes the completions' log-probs a chunk at a time, so
batch x group x length x vocabulary logits never exist at once. Generation uses transformers here; on a CUDA
machine where vLLM imports, TRL's colocated vLLM engine instead, in `grpo.vllm_gpu_memory_utilization` of the card.
A problem whose prompt is longer than `grpo.max_prompt_length` is left out (counted), so every sequence fits the
length the estimator (memory.py) sized the step for.

Bad input does not end the run (rewards.py): an unusable reference, a reward function that raises or returns NaN,
a verifier that fails: the completion is left out (advantage 0); a chain that never closes `</think>`: reward 0;
a group whose rewards are all equal: no advantage. Each is counted, at every logged step and in the stage record,
and the counts survive a resume from the last checkpoint.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from budget_reasoner.config import Preset
from budget_reasoner.domains import Domain, recorded
from budget_reasoner.errors import BudgetReasonerError
from budget_reasoner.hardware import Hardware, hardware_for
from budget_reasoner.io import MODEL_SETTINGS, claim_stage, read_json, read_jsonl, settings_of, write_json, writes_folder
from budget_reasoner.problems import PROBLEM_COLUMNS, PROBLEM_KINDS
from budget_reasoner.progress import say
from budget_reasoner.rewards import RewardStats, leave_out_unscored, reward_functions
from budget_reasoner.sampling import chat_prompt
from budget_reasoner.stages import tokenizer_of
from budget_reasoner.train.common import (describe_precision, load_for_training, save_stage, stage_info, train_with_resume,
                                          training_arguments, with_lora)


def grpo_arguments(preset: Preset, hardware: Hardware, out: Path, report_to: str):
    from trl import GRPOConfig

    settings = preset.grpo
    use_vllm = (hardware.device == "cuda" and settings.vllm_gpu_memory_utilization > 0
                and importlib.util.find_spec("vllm") is not None)
    return training_arguments(
        GRPOConfig, settings, preset, hardware, out, report_to,
        num_generations=settings.num_generations, max_completion_length=settings.max_completion_length,
        temperature=settings.temperature, beta=settings.beta, loss_type=settings.loss_type, epsilon=settings.epsilon,
        epsilon_high=settings.epsilon_high, mask_truncated_completions=settings.mask_truncated_completions,
        use_vllm=use_vllm, vllm_mode="colocate", vllm_gpu_memory_utilization=settings.vllm_gpu_memory_utilization,
        vllm_max_model_length=settings.max_prompt_length + settings.max_completion_length,
        log_completions=False, include_num_input_tokens_seen=False,
    )


def counting_trainer(stats: RewardStats):
    """TRL's GRPOTrainer with our bookkeeping of rewards, through trl 1.16's `_calculate_rewards` and `log`: a
    completion missing any reward is left out whole and equal-reward groups are counted (rewards.leave_out_unscored);
    every logged step carries the counts so far; they are saved with each checkpoint and read back on a resume."""
    from transformers import TrainerCallback
    from trl import GRPOTrainer

    class CountingGRPOTrainer(GRPOTrainer):
        def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
            rewards = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
            return leave_out_unscored(rewards, self.reward_weights, self.num_generations, stats)

        def log(self, logs, start_time=None):
            logs.update(stats.log_fields())
            super().log(logs, start_time)

    class KeepCounts(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            saved = Path(args.output_dir) / f"checkpoint-{state.global_step}" / REWARD_COUNTS
            if state.global_step and saved.is_file():  # resumed: count on from the checkpoint's counts
                stats.__dict__.update(RewardStats.from_dict(read_json(saved)).__dict__)

        def on_save(self, args, state, control, **kwargs):
            write_json(Path(args.output_dir) / f"checkpoint-{state.global_step}" / REWARD_COUNTS, stats.to_dict())

    return CountingGRPOTrainer, KeepCounts()


REWARD_COUNTS = "reward_counts.json"


def fit_prompts(tokenizer, problems: list[dict], instruction: str, limit: int) -> tuple[list[dict], int]:
    """The problems whose chat prompt has at most `limit` tokens (grpo.max_prompt_length), and how many were left out."""
    prompts = [tokenizer.apply_chat_template(chat_prompt(row["question"], instruction), add_generation_prompt=True,
                                             tokenize=False) for row in problems]
    lengths = [len(ids) for ids in tokenizer(prompts, add_special_tokens=False)["input_ids"]]
    kept = [row for row, length in zip(problems, lengths) if length <= limit]
    return kept, len(problems) - len(kept)


@writes_folder("out")
def grpo(problems_file: Path, start: str | Path, out: Path, preset: Preset, domain: Domain | str = "math",
         hardware: Hardware | None = None, report_to: str = "none", overwrite: bool = False) -> dict:
    """GRPO on the problems of `problems_file` (JSONL: id, domain, question, answer, source) from `start` (a stage
    folder or a base model); write the adapter to `out`. The stage record's `history` carries each logged step's
    mean `reward`; `rewards` counts what the reward functions could not pay (unusable references, unclosed chains)."""
    from datasets import Dataset

    out = Path(out)
    longest = preset.grpo.max_prompt_length + preset.grpo.max_completion_length
    if longest > preset.model.max_length:  # the model is trained (and a tiny one built) for model.max_length positions
        raise BudgetReasonerError(f"grpo.max_prompt_length + grpo.max_completion_length ({longest}) must be at most "
                                  f"model.max_length ({preset.model.max_length}): lower one of them")
    problems = read_jsonl(problems_file, PROBLEM_COLUMNS, PROBLEM_KINDS)  # bad rows: one line, nothing claimed
    tokenizer = tokenizer_of(start)
    problems, too_long = fit_prompts(tokenizer, problems, preset.generate.instruction, preset.grpo.max_prompt_length)
    if too_long:
        say(f"grpo: {too_long} problems left out, their prompts longer than grpo.max_prompt_length "
            f"({preset.grpo.max_prompt_length} tokens)")
    per_step = preset.grpo.batch_size * preset.grpo.grad_accum // preset.grpo.num_generations
    if len(problems) < per_step:
        raise BudgetReasonerError(f"{problems_file}: {len(problems)} problems{' with prompts that fit' if too_long else ''}, "
                                  f"fewer than one step's {per_step} (grpo.batch_size x grpo.grad_accum / grpo.num_generations)")
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
    stats = RewardStats()
    rewards = reward_functions(domain, preset.grpo.format_weight, preset.grpo.length_weight,
                               preset.grpo.max_completion_length, stats)
    say(f"grpo: {len(problems)} problems x {preset.grpo.num_generations} completions, loss {preset.grpo.loss_type}, "
        f"beta {preset.grpo.beta}; {describe_precision(preset, hardware)}")
    trainer_class, keep_counts = counting_trainer(stats)
    trainer = trainer_class(model=model, reward_funcs=rewards, args=grpo_arguments(preset, hardware, out, report_to),
                            train_dataset=dataset, processing_class=tokenizer, callbacks=[keep_counts])
    run = train_with_resume(trainer, out)
    say(f"grpo: {stats.correct} of {stats.completions} completions correct; unpaid: {stats.unparseable_reference} with an "
        f"unusable reference, {stats.unclosed_think} without a closed </think> (reward 0), {stats.failed} a reward function "
        f"or the verifier could not grade; {stats.left_out} left out (a reward missing); {stats.equal_reward_groups} of {stats.groups} "
        f"groups with one reward for all (no advantage)")
    return save_stage(out, trainer.model, tokenizer, base, run,
                      stage_info("grpo", preset, hardware, problems=len(problems), prompts_too_long=too_long,
                                 rewards=stats.to_dict()))
