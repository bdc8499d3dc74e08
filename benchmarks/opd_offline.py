"""On-policy distillation vs offline top-k KD at the same number of teacher-scored tokens, from one SFT student.

    python benchmarks/opd_offline.py --run /tmp/planner-run --out /tmp/opd-offline --seeds 0 1 2 --write opd_offline

`--run` is a finished `quickstart --preset cpu-tiny` folder; every method starts from its `sft` stage and uses its
teacher, and every point is the greedy accuracy on its held-out problems (the same 300 for every point).
- KD (the recipe's distill): the teacher's top-k cache over a seeded prefix of the run's SFT chains (1/8, 1/4, 1/2
  and all of them), then `distill` from sft for the preset's distill.max_steps. Teacher-scored tokens: the cache's
  positions (every chain token the teacher scored once, reused over the distill epochs).
- OPD (train/opd.py) in two variants, each for its opd.max_steps: the preset's ("topk": the bucketed reverse KL
  at each sampled position) and Thinking Machines' per-token advantage ("sampled", at the rate and group size it
  held on a validation split). Each is evaluated when the tokens its teacher has scored (every sampled token, once)
  first reach each KD point's count, and at its last step.
At each KD point the OPD variants are compared with KD on the same problems by McNemar's exact test, pooled over
seeds; `tokens_to_reach_kd` says how many teacher tokens a variant needed to reach the accuracy KD reaches with all
its chains (mean over seeds), or null when it never did; `vs_sft`, each method's last point against the SFT start
(McNemar, pooled). The plot: benchmarks/results/<machine>/opd_offline.png.
"""

import json
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from record import RESULTS, machine_name, seeded_parser, write_result  # noqa: E402
from reproduce import mcnemar, verdicts  # noqa: E402

FRACTIONS = (1 / 8, 1 / 4, 1 / 2, 1.0)
# the OPD variants: preset overrides on top of the preset's opd section
VARIANTS = {"opd-topk": {}, "opd-sampled": {"opd.objective": "sampled", "opd.num_generations": 4, "opd.learning_rate": 1e-4}}


def kd_points(run: Path, out: Path, seed: int, preset, eval_preset, held_out: Path) -> list[dict]:
    """Distill from sft on caches over nested, seeded prefixes of the SFT chains."""
    from budget_reasoner.eval.run import evaluate
    from budget_reasoner.io import read_jsonl, write_jsonl
    from budget_reasoner.train.distill import cache_teacher_topk, distill

    chains = read_jsonl(run / "data" / "sft" / "train.jsonl")
    random.Random(seed).shuffle(chains)
    points = []
    for rank, fraction in enumerate(FRACTIONS):
        folder = out / f"kd-seed{seed}-{len(chains) * fraction:.0f}"
        subset = chains[: round(len(chains) * fraction)]
        folder.mkdir(parents=True, exist_ok=True)
        if not (folder / "train.jsonl").is_file():
            write_jsonl(folder / "train.jsonl", subset)
        cache = cache_teacher_topk(run / "models" / "teacher", folder / "train.jsonl", folder / "cache", preset)
        started = time.time()
        record = distill(folder / "cache", run / "sft", folder / "distill", preset)
        summary = evaluate(folder / "distill", held_out, folder / "eval", eval_preset)
        points.append({"seed": seed, "rank": rank, "chains": len(subset), "teacher_tokens": cache["cached_positions"],
                       "accuracy": summary["accuracy"], "train_seconds": record["seconds"],
                       "verdicts": verdicts(folder / "eval"), "wall_seconds": time.time() - started})
        print(json.dumps({k: v for k, v in points[-1].items() if k != "verdicts"}), flush=True)
    return points


def opd_points(run: Path, out: Path, seed: int, preset, eval_preset, held_out: Path, thresholds: list[int]) -> tuple:
    """OPD from sft for its opd.max_steps, evaluated when its teacher-scored tokens first reach each threshold
    (rank r: KD's r-th point) and at its last step (rank len(thresholds))."""
    from transformers import TrainerCallback

    from budget_reasoner.eval.run import evaluate
    from budget_reasoner.stages import tokenizer_of
    from budget_reasoner.train.opd import COUNTS, opd

    tokenizer = tokenizer_of(run / "sft")
    points, pending = [], list(enumerate(thresholds))  # (rank of the KD point, its tokens), ascending

    class EvaluateAtTokens(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kwargs):
            tokens = state.stateful_callbacks[COUNTS]["attributes"]["teacher_tokens"]
            reached = [rank for rank, threshold in pending if tokens >= threshold]
            if state.global_step == state.max_steps:
                reached.append(len(thresholds))
            if not reached:
                return
            snapshot = out / f"step-{state.global_step}"
            model.save_pretrained(snapshot)  # an adapter folder is a stage eval can load
            tokenizer.save_pretrained(snapshot)
            summary = evaluate(snapshot, held_out, snapshot / "eval", eval_preset)
            for rank in reached:
                points.append({"seed": seed, "rank": rank, "step": state.global_step, "teacher_tokens": tokens,
                               "accuracy": summary["accuracy"], "verdicts": verdicts(snapshot / "eval")})
                print(json.dumps({k: v for k, v in points[-1].items() if k != "verdicts"}), flush=True)
            pending[:] = [(rank, threshold) for rank, threshold in pending if rank not in reached]

    record = opd(run / "data" / "problems" / "train.jsonl", run / "sft", run / "models" / "teacher", out / "stage",
                 preset, callbacks=[EvaluateAtTokens()])
    curve = [{"step": e["step"], "teacher_tokens": e["teacher_tokens_total"], "reverse_kl": e["reverse_kl"]}
             for e in record["history"] if "reverse_kl" in e]
    return points, {"seed": seed, "seconds": record["seconds"], "teacher_tokens": record["teacher_tokens"],
                    "counts": record["opd"], "reverse_kl_curve": curve}


def matched(kd: list[dict], opd: list[dict]) -> list[dict]:
    """KD's and OPD's verdicts on the same problems at each KD point (OPD at its first step past the point's
    tokens), pooled over seeds, with McNemar's exact test."""
    rows = []
    for rank, fraction in enumerate(FRACTIONS):
        before, after, kd_tokens, opd_tokens = [], [], [], []
        for point in (p for p in kd if p["rank"] == rank):
            other = next((p for p in opd if p["seed"] == point["seed"] and p["rank"] == rank), None)
            if other is None:  # OPD's run ended before this many teacher tokens
                continue
            ids = sorted(point["verdicts"])
            before += [point["verdicts"][i] for i in ids]
            after += [other["verdicts"][i] for i in ids]
            kd_tokens.append(point["teacher_tokens"])
            opd_tokens.append(other["teacher_tokens"])
        if before:
            rows.append({"fraction": fraction, "kd_tokens": kd_tokens, "opd_tokens": opd_tokens,
                         "kd_accuracy": sum(before) / len(before), "opd_accuracy": sum(after) / len(after),
                         "opd_vs_kd": mcnemar(before, after)})
    return rows


def versus_sft(sft: dict, points: list[dict]) -> dict:
    """A method's last point (its most teacher tokens) against the SFT start on the same problems, pooled over seeds."""
    last = max(p["rank"] for p in points)
    ids, before, after = sorted(sft), [], []
    for point in (p for p in points if p["rank"] == last):
        before += [sft[i] for i in ids]
        after += [point["verdicts"][i] for i in ids]
    return {"teacher_tokens": statistics.mean(p["teacher_tokens"] for p in points if p["rank"] == last),
            "accuracy": sum(after) / len(after), **mcnemar(before, after)}


def spread(values: list[float]) -> dict:
    return {"mean": statistics.mean(values), "min": min(values), "max": max(values),
            "stdev": statistics.stdev(values) if len(values) > 1 else 0.0, "per_seed": values}


def curve(points: list[dict]) -> list[dict]:
    """Per rank (a KD point, or OPD's last step): tokens and accuracy over seeds."""
    ranks = sorted({p["rank"] for p in points})
    return [{"rank": rank, "seeds": len(group), "teacher_tokens": spread([p["teacher_tokens"] for p in group]),
             "accuracy": spread([p["accuracy"] for p in group])}
            for rank in ranks if (group := [p for p in points if p["rank"] == rank])]


LABELS = {"kd": "offline top-k KD (cache over the SFT chains)", "opd-topk": "OPD, top-k reverse KL (preset)",
          "opd-sampled": "OPD, sampled-token advantage"}


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6.6, 4.3))
    for (name, rows), color in zip(result["curves"].items(), ("tab:blue", "tab:orange", "tab:green")):
        x = [row["teacher_tokens"]["mean"] for row in rows]
        axes.plot(x, [row["accuracy"]["mean"] for row in rows], "o-", color=color, label=LABELS[name])
        axes.fill_between(x, [row["accuracy"]["min"] for row in rows], [row["accuracy"]["max"] for row in rows],
                          color=color, alpha=0.15)
    axes.axhline(result["sft_accuracy"], color="gray", linestyle="--", label="SFT start")
    axes.set_xscale("log")
    axes.set_xlabel("teacher-scored tokens")
    axes.set_ylabel("held-out accuracy (greedy)")
    axes.set_title(f"cpu-tiny, from one SFT student: mean of {len(result['seeds'])} seeds, min-max band", fontsize=10)
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main():
    args = seeded_parser(__doc__.splitlines()[0], run=True).parse_args()

    from budget_reasoner.config import load_preset, parse_overrides
    from budget_reasoner.eval.run import evaluate

    held_out = args.run / "data" / "problems" / "held_out.jsonl"
    eval_preset = load_preset("cpu-tiny", {"eval.maj_k": 1})  # greedy only: every point is greedy accuracy
    sft = evaluate(args.run / "sft", held_out, args.out / "eval-sft", eval_preset)
    points = {"kd": [], **{name: [] for name in VARIANTS}}
    runs, settings = {name: [] for name in VARIANTS}, {}
    for seed in args.seeds:
        preset = load_preset("cpu-tiny", {**parse_overrides(args.overrides), "seed": seed})
        kd = kd_points(args.run, args.out, seed, preset, eval_preset, held_out)
        points["kd"] += kd
        for name, changes in VARIANTS.items():
            variant = load_preset("cpu-tiny", {**parse_overrides(args.overrides), **changes, "seed": seed})
            settings[name] = variant.opd.__dict__
            found, run = opd_points(args.run, args.out / f"{name}-seed{seed}", seed, variant, eval_preset, held_out,
                                    [p["teacher_tokens"] for p in kd])
            points[name] += found
            runs[name].append(run)
    curves = {name: curve(found) for name, found in points.items()}
    kd_best = curves["kd"][-1]["accuracy"]["mean"]
    reach = {name: next((row["teacher_tokens"]["mean"] for row in curves[name] if row["accuracy"]["mean"] >= kd_best), None)
             for name in VARIANTS}
    preset = load_preset("cpu-tiny", parse_overrides(args.overrides))
    sft_verdicts = verdicts(args.out / "eval-sft")
    strip = lambda found: [{k: v for k, v in p.items() if k != "verdicts"} for p in found]  # noqa: E731
    result = {"run": str(args.run), "overrides": args.overrides, "seeds": args.seeds,
              "cpu_shared_with_another_process": True, "opd_settings": settings,
              "distill_settings": preset.distill.__dict__, "held_out_problems": sft["problems"],
              "sft_accuracy": sft["accuracy"], "curves": curves,
              "matched": {name: matched(points["kd"], points[name]) for name in VARIANTS},
              "tokens_to_reach_kd": reach,
              "vs_sft": {name: versus_sft(sft_verdicts, found) for name, found in points.items()},
              "points": {name: strip(found) for name, found in points.items()},
              "opd_runs": runs}
    print(json.dumps({"curves": {n: [(round(r["teacher_tokens"]["mean"]), round(r["accuracy"]["mean"], 3)) for r in c]
                                 for n, c in curves.items()}, "matched": result["matched"]}, indent=1))
    if args.write:
        print("wrote", write_result(args.write, result))
        png = RESULTS / machine_name() / f"{args.write}.png"
        plot(result, png)
        print("wrote", png)


if __name__ == "__main__":
    main()
