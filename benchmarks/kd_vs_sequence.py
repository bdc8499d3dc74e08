"""Logit-level vs sequence-level distillation on the offline world, on the same data and steps, over seeds.

    python benchmarks/kd_vs_sequence.py --run /tmp/planner-run --out /tmp/kd-vs-seq --seeds 0 1 2 --write kd_vs_sequence

`--run` is a finished `quickstart --preset cpu-tiny` folder. Every arm continues its `dpo` student on its verified
chains (`data/sft/train.jsonl`) with the distill stage's trainer, preset and step count; only the loss differs:
- sequence: alpha 0, cross-entropy on the teacher's chains alone (sequence-level distillation);
- kd: the preset's alpha (0.5), KL to the teacher's cached top-k beside the cross-entropy (logit-level);
- kd_only: alpha 1, the KL alone;
- kd_tail: the preset's alpha with the (k+1)-th bucket, the teacher's and student's mass outside the top-k.
Then eval answers the run's held-out problems greedily. Per arm: accuracy per seed, mean and spread; each KD arm
against sequence-level by McNemar's exact test on the pooled paired answers (same problems, same seeds). Also the
teacher's confidence on its own chains (mean top-1 probability in the cache): what the logits can add to the labels.
"""

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from record import write_result  # noqa: E402
from reproduce import mcnemar, verdicts  # noqa: E402

ARMS = {"sequence": {"distill.alpha": 0.0}, "kd": {}, "kd_only": {"distill.alpha": 1.0},
        "kd_tail": {"distill.kd_tail": True}}


def teacher_confidence(cache: Path) -> dict:
    """How much the cached top-k says beyond the label: the teacher's top-1 probability over the cached positions."""
    import numpy as np

    from budget_reasoner.scoring import read_cache

    top1, mass = [], []
    for sequence in read_cache(cache):
        probabilities = np.exp(np.asarray(sequence["topk_logprobs"], dtype=np.float32))
        top1.append(probabilities[:, 0])
        mass.append(probabilities.sum(1))
    top1, mass = np.concatenate(top1), np.concatenate(mass)
    return {"mean_top1_probability": float(top1.mean()), "share_top1_above_0.99": float((top1 > 0.99).mean()),
            "mean_topk_mass": float(mass.mean())}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, required=True, help="a finished cpu-tiny quickstart folder")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    parser.add_argument("--write", metavar="NAME")
    args = parser.parse_args()

    from budget_reasoner.config import load_preset
    from budget_reasoner.eval.run import evaluate
    from budget_reasoner.train.distill import cache_teacher_topk, distill

    held_out = args.run / "data" / "problems" / "held_out.jsonl"
    cache = args.out / "cache"
    cache_teacher_topk(args.run / "models" / "teacher", args.run / "data" / "sft" / "train.jsonl", cache,
                       load_preset("cpu-tiny"))
    arms = {}
    for arm in args.arms:
        answers, seeds = [], []
        for seed in args.seeds:
            preset = load_preset("cpu-tiny", {**ARMS[arm], "seed": seed})
            stage = args.out / f"{arm}-seed{seed}"
            record = distill(cache, args.run / "dpo", stage, preset)
            # the run's own eval settings, so every arm's greedy answers compare like for like
            summary = evaluate(stage, held_out, args.out / f"eval-{arm}-seed{seed}", load_preset("cpu-tiny"))
            by_id = verdicts(args.out / f"eval-{arm}-seed{seed}")
            answers += [by_id[i] for i in sorted(by_id)]
            seeds.append({"seed": seed, "accuracy": summary["accuracy"], "seconds": record["seconds"],
                          "final_loss": next((e["loss"] for e in reversed(record["history"]) if "loss" in e), None)})
            print(json.dumps({"arm": arm, **seeds[-1]}), flush=True)
        accuracies = [s["accuracy"] for s in seeds]
        arms[arm] = {"overrides": ARMS[arm], "seeds": seeds, "mean_accuracy": statistics.mean(accuracies),
                     "stdev_accuracy": statistics.stdev(accuracies) if len(accuracies) > 1 else None,
                     "answers": answers}
    for arm, result in arms.items():
        if arm != "sequence" and "sequence" in arms:
            result["vs_sequence"] = mcnemar(arms["sequence"]["answers"], result["answers"])
    dpo_accuracy = json.loads((args.run / "eval" / "dpo" / "summary.json").read_text())["accuracy"] \
        if (args.run / "eval" / "dpo" / "summary.json").exists() else None
    result = {"run": str(args.run), "start": "dpo", "start_accuracy": dpo_accuracy, "seeds": args.seeds,
              "teacher_distribution": teacher_confidence(cache),
              "held_out_problems": len(arms[args.arms[0]]["answers"]) // len(args.seeds),
              "arms": {arm: {k: v for k, v in r.items() if k != "answers"} for arm, r in arms.items()}}
    print(json.dumps(result["arms"], indent=1))
    if args.write:
        print("wrote", write_result(args.write, result))


if __name__ == "__main__":
    main()
