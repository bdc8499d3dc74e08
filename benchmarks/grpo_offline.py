"""GRPO after SFT on the offline world: held-out accuracy of the SFT student and of GRPO from it, on the same problems.

    python benchmarks/grpo_offline.py --run /tmp/planner-run --out /tmp/grpo-offline --seeds 0 1 2 --write grpo_offline

`--run` is a finished `quickstart --preset cpu-tiny` folder: GRPO starts from its `sft` stage on its training problems,
each seed its own stage folder, then eval answers the run's held-out problems greedily, as the run's own eval did for
the SFT student (its `eval/sft/results.jsonl`). Per seed: the mean reward of the first and last logged steps, the
held-out accuracy, and McNemar's exact test against SFT on the same problems (only the problems the two disagree on
count); pooled over seeds as well.
"""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from record import write_result  # noqa: E402
from reproduce import mcnemar  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, required=True, help="a finished cpu-tiny quickstart folder")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--set", dest="overrides", nargs="*", default=[], help="preset overrides, key=value")
    parser.add_argument("--write", metavar="NAME")
    args = parser.parse_args()

    from budget_reasoner.config import load_preset, parse_overrides
    from budget_reasoner.eval.run import evaluate
    from budget_reasoner.io import read_jsonl
    from budget_reasoner.train.grpo import grpo

    sft_rows = {row["id"]: row["correct"] for row in read_jsonl(args.run / "eval" / "sft" / "results.jsonl")}
    problems, held_out = args.run / "data" / "problems" / "train.jsonl", args.run / "data" / "problems" / "held_out.jsonl"
    rows, pooled_before, pooled_after = [], [], []
    for seed in args.seeds:
        preset = load_preset("cpu-tiny", {**parse_overrides(args.overrides), "seed": seed})
        stage = args.out / f"grpo-seed{seed}"
        record = grpo(problems, args.run / "sft", stage, preset)
        # the run's own eval settings (seed 0's sampling), so greedy answers compare like for like
        summary = evaluate(stage, held_out, args.out / f"eval-grpo-seed{seed}", load_preset("cpu-tiny"))
        after = {row["id"]: row["correct"] for row in read_jsonl(args.out / f"eval-grpo-seed{seed}" / "results.jsonl")}
        ids = sorted(sft_rows)
        before_list, after_list = [sft_rows[i] for i in ids], [after[i] for i in ids]
        pooled_before += before_list
        pooled_after += after_list
        rewards = [entry["reward"] for entry in record["history"] if "reward" in entry]
        rows.append({"seed": seed, "steps": len(rewards) and record["history"][-1].get("step"),
                     "reward_first": rewards[0] if rewards else None, "reward_last": rewards[-1] if rewards else None,
                     "reward_curve": rewards, "sft_accuracy": sum(before_list) / len(ids),
                     "grpo_accuracy": summary["accuracy"], "mcnemar": mcnemar(before_list, after_list),
                     "rewards": record.get("rewards"), "seconds": record["seconds"]})
        print(json.dumps({k: v for k, v in rows[-1].items() if k != "reward_curve"}), flush=True)
    result = {"run": str(args.run), "overrides": args.overrides, "seeds": rows,
              "pooled": mcnemar(pooled_before, pooled_after)}
    print(json.dumps(result["pooled"]))
    if args.write:
        print("wrote", write_result(args.write, result))


if __name__ == "__main__":
    main()
