"""Two self-play rounds vs one on the offline world: held-out accuracy, paired on the same problems.

    python benchmarks/self_play.py --run /tmp/planner-run --out /tmp/self-play --seeds 0 1 2 --set threads=1 \
        --write self_play

`--run` is a finished `quickstart --preset cpu-tiny` folder; its `sft` stage is round 1 (the teacher's chains alone).
Round 2 is what `quickstart --rounds 2` runs after it (recipe.self_play_round): the round-1 student samples
`generate.samples_per_problem` chains per training problem at `generate.temperature`, its verified chains join the
teacher's (generate.merge_chains: per problem, distinct, the teacher's first, at most two), and SFT continues the
round-1 adapter on them for `sft.max_steps`. Sampling is done once (the preset's seed 0); each seed is one SFT run
(its data order). Round 2 also trains `sft.max_steps` more than round 1, so each seed runs a control beside it: the
same continued SFT on the teacher's chains alone. Every model answers the run's held-out problems greedily (its eval
settings); McNemar's exact test on the problems two models disagree on, per seed and pooled over seeds.
"""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from record import seeded_parser, write_result  # noqa: E402
from reproduce import mcnemar, verdicts  # noqa: E402


def main():
    args = seeded_parser(__doc__.splitlines()[0], run=True).parse_args()

    import torch

    from budget_reasoner.config import load_preset, parse_overrides
    from budget_reasoner.eval.run import evaluate
    from budget_reasoner.generate import generate
    from budget_reasoner.generate.pipeline import merge_chains
    from budget_reasoner.hardware import hardware_for
    from budget_reasoner.io import read_jsonl
    from budget_reasoner.recipe import make_sampler
    from budget_reasoner.train.sft import sft

    overrides = parse_overrides(args.overrides)
    preset = load_preset("cpu-tiny", overrides)
    torch.set_num_threads(preset.threads or 2)
    hardware = hardware_for(preset)
    run, out = args.run, args.out
    held_out = run / "data" / "problems" / "held_out.jsonl"
    ids = [row["id"] for row in read_jsonl(held_out)]
    eval_preset = load_preset("cpu-tiny")  # the run's own eval settings, so greedy answers compare like for like

    def held_out_accuracy(stage: Path, name: str) -> list[bool]:
        evaluate(stage, held_out, out / f"eval-{name}", eval_preset, hardware=hardware)
        answers = verdicts(out / f"eval-{name}")
        return [answers[i] for i in ids]

    round_one = held_out_accuracy(run / "sft", "round1")
    sampled = out / "selfplay-2"
    sampling = generate(sampled, preset, make_sampler(run / "sft", preset, hardware), allow_none_verified=True)
    if read_jsonl(sampled / "problems" / "train.jsonl") != read_jsonl(run / "data" / "problems" / "train.jsonl"):
        raise SystemExit(f"{sampled} drew other training problems than {run}: the presets differ")
    merged = merge_chains(sampled / "merged", [run / "data", sampled], preset.generate.instruction)
    print(json.dumps({"student_chains": sampling["chains"], "student_verified": sampling["verified_chains"],
                      **{k: merged[k] for k in ("sft_examples", "examples_alone", "problems")}}), flush=True)

    rows, pooled = [], {"round2": [], "control": [], "round1": []}
    for seed in args.seeds:
        seeded = load_preset("cpu-tiny", {**overrides, "seed": seed})
        trained = {
            "round2": sft(sampled / "merged" / "train.jsonl", run / "sft", out / f"sft-round2-seed{seed}", seeded, hardware),
            "control": sft(run / "data" / "sft" / "train.jsonl", run / "sft", out / f"sft-more-seed{seed}", seeded, hardware),
        }
        answers = {"round2": held_out_accuracy(out / f"sft-round2-seed{seed}", f"round2-seed{seed}"),
                   "control": held_out_accuracy(out / f"sft-more-seed{seed}", f"more-seed{seed}")}
        for name in ("round2", "control"):
            pooled[name] += answers[name]
        pooled["round1"] += round_one
        rows.append({"seed": seed, "round1_accuracy": sum(round_one) / len(ids),
                     "round2_accuracy": sum(answers["round2"]) / len(ids),
                     "control_accuracy": sum(answers["control"]) / len(ids),
                     "round2_vs_round1": mcnemar(round_one, answers["round2"]),
                     "control_vs_round1": mcnemar(round_one, answers["control"]),
                     "round2_vs_control": mcnemar(answers["control"], answers["round2"]),
                     "sft_seconds": {name: record["seconds"] for name, record in trained.items()}})
        print(json.dumps(rows[-1]), flush=True)
    result = {"run": str(run), "overrides": args.overrides, "held_out_problems": len(ids),
              "cpu_shared_with_another_process": True,
              "sampling": {"chains": sampling["chains"], "verified": sampling["verified_chains"],
                           "pass_rate": sampling["teacher_pass_rate"], "seconds": sampling["seconds"]},
              "merged": {key: merged[key] for key in ("sft_examples", "examples_alone", "problems")},
              "seeds": rows,
              "pooled": {"round2_vs_round1": mcnemar(pooled["round1"], pooled["round2"]),
                         "control_vs_round1": mcnemar(pooled["round1"], pooled["control"]),
                         "round2_vs_control": mcnemar(pooled["control"], pooled["round2"])}}
    print(json.dumps(result["pooled"]))
    if args.write:
        print("wrote", write_result(args.write, result))


if __name__ == "__main__":
    main()
