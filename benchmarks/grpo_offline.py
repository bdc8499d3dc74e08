"""GRPO on the offline world: held-out accuracy of its start and of GRPO from it, on the same problems.

    python benchmarks/grpo_offline.py --run /tmp/planner-run --out /tmp/grpo-offline --seeds 0 1 2 --write grpo_offline
    python benchmarks/grpo_offline.py --run /tmp/planner-run --out /tmp/grpo-zero --from-base --snapshot-every 25 \
        --set threads=1 grpo.max_steps=200 --write grpo_zero

`--run` is a finished `quickstart --preset cpu-tiny` folder: GRPO starts from its `sft` stage on its training problems,
each seed its own stage folder, then eval answers the run's held-out problems greedily, as the run's own eval did for
the SFT student (its `eval/sft/results.jsonl`). Per seed: the mean reward of the first and last logged steps, the
held-out accuracy, and McNemar's exact test against SFT on the same problems (only the problems the two disagree on
count); pooled over seeds as well.

`--from-base` is the R1-Zero route: GRPO from the untrained student base (single-step answers, empty thinking), with
a fresh LoRA, against the base's own held-out answers. `--snapshot-every N` keeps the adapter of every Nth step
(its checkpoint) and answers the held-out problems with each, so accuracy, the share of answers whose thinking is not
empty (did it discover chains?) and their length are curves over steps, beside the training reward, its correctness
and format parts and the completions' mean length from the stage's log.
"""

import contextlib
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from record import seeded_parser, write_result  # noqa: E402
from reproduce import mcnemar, verdicts  # noqa: E402


def main():
    parser = seeded_parser(__doc__.splitlines()[0], run=True)
    parser.add_argument("--from-base", action="store_true", help="R1-Zero: start from the untrained student base")
    parser.add_argument("--snapshot-every", type=int, default=0, help="evaluate the adapter every N steps (0: only the end)")
    args = parser.parse_args()

    import torch

    from budget_reasoner.config import load_preset, parse_overrides
    from budget_reasoner.eval.run import evaluate
    from budget_reasoner.train.grpo import grpo

    start_name = "base" if args.from_base else "sft"
    start = args.run / "models" / "student-base" if args.from_base else args.run / "sft"
    sft_rows = verdicts(args.run / "eval" / start_name)
    problems, held_out = args.run / "data" / "problems" / "train.jsonl", args.run / "data" / "problems" / "held_out.jsonl"
    rows, pooled_before, pooled_after = [], [], []
    for seed in args.seeds:
        preset = load_preset("cpu-tiny", {**parse_overrides(args.overrides), "seed": seed})
        if args.snapshot_every:
            preset.grpo.save_steps = args.snapshot_every
        torch.set_num_threads(preset.threads or 2)
        stage = args.out / f"grpo-seed{seed}"
        with snapshots(args.out / f"snapshots-seed{seed}") as kept:
            record = grpo(problems, start, stage, preset)
        # the run's own eval settings (seed 0's sampling), so greedy answers compare like for like
        summary = evaluate(stage, held_out, args.out / f"eval-grpo-seed{seed}", load_preset("cpu-tiny"))
        after = verdicts(args.out / f"eval-grpo-seed{seed}")
        ids = sorted(sft_rows)
        before_list, after_list = [sft_rows[i] for i in ids], [after[i] for i in ids]
        pooled_before += before_list
        pooled_after += after_list
        rewards = [entry["reward"] for entry in record["history"] if "reward" in entry]
        curve = [{"step": 0, **answered(args.run / "eval" / start_name)}] if args.snapshot_every else []
        for step, folder in sorted(kept.items()):
            evaluate(folder, held_out, args.out / f"eval-seed{seed}-step{step}", load_preset("cpu-tiny"))
            curve.append({"step": step, **answered(args.out / f"eval-seed{seed}-step{step}")})
        logged = [{key: entry.get(key) for key in ("step", "reward", "rewards/correctness/mean",
                                                    "rewards/chain_format/mean", "completions/mean_length")}
                  for entry in record["history"] if "reward" in entry]
        rows.append({"seed": seed, "start": start_name, "steps": len(rewards) and record["history"][-1].get("step"),
                     "reward_first": rewards[0] if rewards else None, "reward_last": rewards[-1] if rewards else None,
                     "reward_curve": rewards, f"{start_name}_accuracy": sum(before_list) / len(ids),
                     "grpo_accuracy": summary["accuracy"], "mcnemar": mcnemar(before_list, after_list),
                     "rewards": record.get("rewards"), "seconds": record["seconds"],
                     **({"held_out_curve": curve, "training_log": logged} if args.snapshot_every else {})})
        print(json.dumps({k: v for k, v in rows[-1].items() if k not in ("reward_curve", "training_log")}), flush=True)
    result = {"run": str(args.run), "start": start_name, "overrides": args.overrides, "seeds": rows,
              "pooled": mcnemar(pooled_before, pooled_after), "cpu_shared_with_another_process": True}
    print(json.dumps(result["pooled"]))
    if args.write:
        print("wrote", write_result(args.write, result))


def answered(eval_folder: Path) -> dict:
    """Of an eval's greedy answers: accuracy, the share whose thinking is not empty, the mean tokens per answer."""
    import re

    from budget_reasoner.io import read_jsonl

    rows = read_jsonl(eval_folder / "results.jsonl")
    thought = [bool(re.search(r"<think>\s*\S.*?</think>", row["completion"], re.DOTALL)) for row in rows]
    return {"accuracy": sum(row["correct"] for row in rows) / len(rows), "thinking": sum(thought) / len(rows),
            "tokens": sum(row["tokens"] for row in rows) / len(rows)}


@contextlib.contextmanager
def snapshots(folder: Path):
    """While GRPO trains: a copy of each checkpoint's adapter and tokenizer (not its optimizer state) in
    folder/step-N, so the curve can be evaluated after the stage has removed its checkpoints. Yields {step: folder}."""
    import shutil

    from transformers import TrainerCallback

    from budget_reasoner.train import grpo as grpo_module

    kept, original = {}, grpo_module.train_with_resume

    class Snapshot(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            target = folder / f"step-{state.global_step}"
            shutil.copytree(Path(args.output_dir) / f"checkpoint-{state.global_step}", target, dirs_exist_ok=True,
                            ignore=shutil.ignore_patterns("optimizer.pt", "scheduler.pt", "rng_state*", "*.json.tmp"))
            kept[state.global_step] = target

    def with_snapshots(trainer, out):
        trainer.add_callback(Snapshot())
        return original(trainer, out)

    grpo_module.train_with_resume = with_snapshots
    try:
        yield kept
    finally:
        grpo_module.train_with_resume = original


if __name__ == "__main__":
    main()
