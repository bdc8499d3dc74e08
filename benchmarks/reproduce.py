"""Does the offline world reproduce? The quickstart (or the teacher's bootstrap alone) over seeds and thread counts.

    python benchmarks/reproduce.py --seeds 0 1 2 --threads 2                # whole quickstart per seed
    python benchmarks/reproduce.py --seeds 0 1 2 --threads 1 --teacher-only # bootstrap + teacher eval only
    python benchmarks/reproduce.py --aggregate                              # -> benchmarks/results/<machine>/reproduce.json
    python benchmarks/reproduce.py --markdown benchmarks/results/cpu-2core/reproduce.json   # the README's tables

Each run goes into a fresh folder under --out and leaves `reproduce.json` there (so runs can go in separate
processes, one per core); --aggregate collects them: per stage the mean and spread over seeds, and exact
McNemar tests between stages on the same held-out problems (per seed, and pooled over seeds), because a
difference between two stages is a gain only when it clears its uncertainty.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from math import comb
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from record import commit, write_result  # noqa: E402

STAGES = ("base", "sft", "dpo", "distill")


def run_one(out: Path, preset_name: str, seed: int, threads: int, teacher_only: bool) -> dict:
    import torch

    from budget_reasoner.config import load_preset
    from budget_reasoner.eval.run import evaluate
    from budget_reasoner.generate.pipeline import write_problems
    from budget_reasoner.hardware import hardware_for
    from budget_reasoner.progress import quiet_libraries
    from budget_reasoner.recipe import claim_run_folder, quickstart
    from budget_reasoner.train.pretrain import bootstrap as bootstrap_models

    shutil.rmtree(out, ignore_errors=True)
    quiet_libraries()
    preset = load_preset(preset_name, {"seed": seed, "threads": threads})
    started = time.time()
    if teacher_only:  # the teacher's bootstrap alone, and its greedy accuracy on the held-out split
        claim_run_folder(out, preset, "math")
        torch.set_num_threads(threads)
        _, held_out = write_problems(out / "data" / "problems", preset)
        bootstrap = bootstrap_models(preset, out / "models", {row["question"] for row in held_out}, roles=("teacher",))
        teacher = evaluate(out / "models" / "teacher", out / "data" / "problems" / "held_out.jsonl", out / "eval" / "teacher",
                           preset, "math", hardware_for(preset), name="teacher")
        results = {"teacher": teacher, "bootstrap": bootstrap, "stages": {}}
    else:
        results = quickstart(out, preset)
    record = {"seed": seed, "threads": threads, "teacher_only": teacher_only, "commit": commit(),
              "wall_seconds": time.time() - started,
              "teacher_accuracy": results["teacher"]["accuracy"],
              "teacher_steps": results["bootstrap"]["teacher"].get("steps"),
              "teacher_check_accuracy": results["bootstrap"]["teacher"].get("check_accuracy"),
              "accuracy": {name: results["stages"][name]["accuracy"] for name in STAGES if name in results["stages"]},
              "correct": {name: [row["correct"] for row in _rows(out / "eval" / name)]
                          for name in ("teacher", *STAGES) if (out / "eval" / name / "results.jsonl").exists()}}
    (out / "reproduce.json").write_text(json.dumps(record))
    return record


def _rows(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "results.jsonl").read_text().splitlines()]


def verdicts(eval_folder: Path) -> dict[str, bool]:
    """An eval folder's verdict per problem id (its results.jsonl): what McNemar pairs across models."""
    return {row["id"]: bool(row["correct"]) for row in _rows(eval_folder)}


def mcnemar(before: list[bool], after: list[bool]) -> dict:
    """Exact two-sided McNemar test on paired verdicts: only the problems the two disagree on count."""
    gained = sum(1 for a, b in zip(before, after) if b and not a)
    lost = sum(1 for a, b in zip(before, after) if a and not b)
    n, low = gained + lost, min(gained, lost)
    p = min(1.0, 2 * sum(comb(n, i) for i in range(low + 1)) / 2**n) if n else 1.0
    return {"gained": gained, "lost": lost, "p_value": p}


def aggregate(out: Path) -> dict:
    runs = [json.loads(path.read_text()) for path in sorted(out.glob("*/reproduce.json"))]
    if not runs:
        raise SystemExit(f"no runs under {out}")
    teacher = [{"seed": r["seed"], "threads": r["threads"], "accuracy": r["teacher_accuracy"], "steps": r["teacher_steps"],
                "check_accuracy": r["teacher_check_accuracy"], "run": "teacher only" if r["teacher_only"] else "quickstart",
                "commit": r.get("commit", "unknown")} for r in runs]
    full = [r for r in runs if not r["teacher_only"]]
    stages = {}
    for name in ("teacher", *STAGES):
        values = [r["accuracy"].get(name, r["teacher_accuracy"] if name == "teacher" else None) for r in full]
        values = [v for v in values if v is not None]
        if values:
            stages[name] = {"mean": statistics.mean(values), "stdev": statistics.stdev(values) if len(values) > 1 else 0.0,
                            "min": min(values), "max": max(values), "per_seed": values}
    # test-time compute per stage, from each run's eval summaries: the mean over seeds of each metric
    folders = [path.parent for path in sorted(out.glob("*/reproduce.json")) if not json.loads(path.read_text())["teacher_only"]]
    metrics = {}
    for name in ("teacher", *STAGES):
        summaries = [json.loads((f / "eval" / name / "summary.json").read_text()) for f in folders
                     if (f / "eval" / name / "summary.json").exists()]
        keys = [key for key in (summaries[0] if summaries else {}) if key.startswith(("pass@", "maj@", "best_of_"))]
        if summaries:
            metrics[name] = {key: statistics.mean(summary[key] for summary in summaries) for key in keys}
    comparisons = {}
    for before, after in (("base", "sft"), ("sft", "dpo"), ("dpo", "distill"), ("sft", "distill")):
        pairs = [(r["correct"][before], r["correct"][after]) for r in full if before in r["correct"] and after in r["correct"]]
        if pairs:
            comparisons[f"{before}->{after}"] = {
                "per_seed": [mcnemar(a, b) for a, b in pairs],
                "pooled": mcnemar([x for a, _ in pairs for x in a], [x for _, b in pairs for x in b]),
            }
    return {"runs": len(runs), "teacher": teacher, "stages": stages, "metrics": metrics, "comparisons": comparisons,
            "wall_seconds": [{"seed": r["seed"], "threads": r["threads"], "teacher_only": r["teacher_only"],
                              "seconds": r["wall_seconds"]} for r in runs],
            "run_commits": sorted({r.get("commit", "unknown") for r in runs})}


def markdown(record: dict) -> str:
    """The README's tables, from one recorded aggregate."""
    lines = [f"`{record['command']}` over runs at {', '.join(record['run_commits'])} ({record['machine']['cpu']}, "
             f"{record['machine']['cores']} cores):", "",
             "| model | mean | spread (sd) | per seed |", "|---|---|---|---|"]
    for name, stage in record["stages"].items():
        lines.append(f"| {name} | {stage['mean']:.1%} | {stage['stdev']:.1%} | "
                     + ", ".join(f"{value:.1%}" for value in stage["per_seed"]) + " |")
    if record.get("metrics"):
        keys = list(next(iter(record["metrics"].values())))
        lines += ["", "| model (mean over seeds) | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
        for name, values in record["metrics"].items():
            lines.append(f"| {name} | " + " | ".join(f"{values[key]:.1%}" for key in keys) + " |")
    lines += ["", "| change | per seed: gained / lost (McNemar p) | pooled: gained / lost (p) |", "|---|---|---|"]
    for name, test in record["comparisons"].items():
        per_seed = "; ".join(f"{t['gained']} / {t['lost']} ({t['p_value']:.2g})" for t in test["per_seed"])
        pooled = test["pooled"]
        lines.append(f"| {name} | {per_seed} | {pooled['gained']} / {pooled['lost']} ({pooled['p_value']:.2g}) |")
    lines += ["", "| teacher bootstrap | commit | seed | threads | steps | check accuracy | held-out accuracy |",
              "|---|---|---|---|---|---|---|"]
    for run in sorted(record["teacher"], key=lambda r: (r["run"], r["commit"], r["threads"], r["seed"])):
        lines.append(f"| {run['run']} | {run['commit']} | {run['seed']} | {run['threads']} | {run['steps']} | "
                     f"{run['check_accuracy']:.1%} | {run['accuracy']:.1%} |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/reproduce")
    parser.add_argument("--preset", default="cpu-tiny")
    parser.add_argument("--seeds", type=int, nargs="*", default=[0, 1, 2])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--teacher-only", action="store_true")
    parser.add_argument("--aggregate", action="store_true")
    parser.add_argument("--markdown", metavar="RESULT_JSON")
    args = parser.parse_args()
    out = Path(args.out)
    if args.markdown:
        print(markdown(json.loads(Path(args.markdown).read_text())))
        return
    if args.aggregate:
        path = write_result("reproduce", aggregate(out))
        print(json.dumps(json.loads(path.read_text()), indent=1)[:4000])
        print(f"wrote {path}")
        return
    for seed in args.seeds:
        kind = "teacher" if args.teacher_only else "quickstart"
        record = run_one(out / f"{kind}-seed{seed}-threads{args.threads}", args.preset, seed, args.threads, args.teacher_only)
        print(f"seed {seed} threads {args.threads}: teacher {record['teacher_accuracy']:.3f} after {record['teacher_steps']} "
              f"steps; {json.dumps(record['accuracy'])}; {record['wall_seconds'] / 60:.1f} min")


if __name__ == "__main__":
    main()
