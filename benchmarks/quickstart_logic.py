"""`quickstart --domain logic` on the offline world: wall time, time per stage, held-out accuracy per stage.

    python benchmarks/quickstart_logic.py --seeds 0 1 2 [--threads 1] [--out runs/bench-logic]
    python benchmarks/quickstart_logic.py --collect runs/bench-logic/seed-0 ...   # record finished run folders

Each seed runs the whole recipe into a fresh folder (--out/seed-N). The record (benchmarks/results/<machine>/
quickstart_logic.json) holds per seed the wall time, every stage's seconds (the run's compute table), the held-out
accuracy of teacher, base, sft, dpo and distill on the same 300 puzzles, and exact McNemar tests between stages on
those puzzles (per seed and pooled): SFT's gain over the base counts only when it clears its uncertainty. The
figure to reach (issue #16): the whole run within 15 minutes on cpu-tiny, SFT at least 20 points above the base.
The load average during the run is recorded too: on a shared machine wall time is inflated.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from record import write_result  # noqa: E402
from reproduce import mcnemar  # noqa: E402

STAGES = ("base", "sft", "dpo", "distill")
WALL = "benchmark_wall.json"  # what run_seed leaves in the run folder: its wall seconds and the load around it
TARGET_MINUTES, TARGET_GAIN = 15, 0.20


def run_seed(out: Path, preset_name: str, seed: int, threads: int) -> float:
    """A fresh quickstart --domain logic into `out`; returns its wall seconds."""
    from budget_reasoner.config import load_preset
    from budget_reasoner.progress import quiet_libraries
    from budget_reasoner.recipe import quickstart

    shutil.rmtree(out, ignore_errors=True)  # a fresh run, or the timing would only measure skipped stages
    quiet_libraries()
    started, load = time.time(), [os.getloadavg()[0]]
    quickstart(out, load_preset(preset_name, {"seed": seed, "threads": threads}), "logic")
    wall = time.time() - started
    (out / WALL).write_text(json.dumps({"wall_seconds": wall, "threads": threads,
                                        "load_average_1min": load + [os.getloadavg()[0]]}))
    return wall


def summarize(folder: Path) -> dict:
    """One finished run folder: its per-stage accuracy, seconds and verdicts (and the wall time run_seed kept)."""
    report = json.loads((folder / "report.json").read_text())
    timing = json.loads((folder / WALL).read_text()) if (folder / WALL).exists() else {}
    wall_seconds, load = timing.get("wall_seconds"), timing.get("load_average_1min")
    run = json.loads((folder / "run.json").read_text())
    if report.get("domain") != "logic":
        raise SystemExit(f"{folder} is a run of domain {report.get('domain')!r}, not logic")
    verdicts = {name: [json.loads(line)["correct"] for line in (folder / "eval" / name / "results.jsonl").read_text().splitlines()]
                for name in ("teacher", *STAGES) if (folder / "eval" / name / "results.jsonl").exists()}
    stage_seconds = {row["stage"]: round(row["seconds"], 1) for row in report["compute"]}
    bootstrap = report.get("bootstrap", {})
    return {
        "folder": str(folder), "preset": run["preset"],
        "seed": json.loads((folder / "models" / "fingerprint.json").read_text()).get("settings", {}).get("seed")
        if (folder / "models" / "fingerprint.json").exists() else None,
        "wall_seconds": round(wall_seconds, 1) if wall_seconds is not None else None,
        "threads": timing.get("threads"),
        "stage_seconds_sum": round(sum(stage_seconds.values()), 1),
        "stage_seconds": stage_seconds,
        "load_average_1min": load,
        "teacher_bootstrap": {key: bootstrap.get("teacher", {}).get(key) for key in ("steps", "check_accuracy", "seconds")},
        "accuracy": {"teacher": report["teacher"].get("accuracy"),
                     **{name: report["stages"][name]["accuracy"] for name in STAGES if name in report["stages"]}},
        "problems": len(verdicts.get("base", [])),
        "generate": {key: report["generate"].get(key) for key in ("chains", "verified_chains", "sft_examples", "pairs")},
        "verdicts": verdicts,
    }


def aggregate(runs: list[dict]) -> dict:
    stages = {}
    for name in ("teacher", *STAGES):
        values = [run["accuracy"][name] for run in runs if run["accuracy"].get(name) is not None]
        if values:
            stages[name] = {"mean": statistics.mean(values), "stdev": statistics.stdev(values) if len(values) > 1 else 0.0,
                            "per_seed": values}
    comparisons = {}
    for before, after in (("base", "sft"), ("sft", "dpo"), ("dpo", "distill"), ("base", "distill")):
        pairs = [(run["verdicts"][before], run["verdicts"][after]) for run in runs
                 if before in run["verdicts"] and after in run["verdicts"]]
        if pairs:
            comparisons[f"{before}->{after}"] = {
                "per_seed": [mcnemar(a, b) for a, b in pairs],
                "pooled": mcnemar([x for a, _ in pairs for x in a], [x for _, b in pairs for x in b])}
    gains = [run["accuracy"]["sft"] - run["accuracy"]["base"] for run in runs]
    minutes = [(run["wall_seconds"] or run["stage_seconds_sum"]) / 60 for run in runs]
    return {"stages": stages, "comparisons": comparisons,
            "sft_gain_over_base_points": [round(100 * gain, 1) for gain in gains],
            "wall_minutes": [round(m, 1) for m in minutes],
            "figure": {"target": f"within {TARGET_MINUTES} min on cpu-tiny, SFT >= base + {100 * TARGET_GAIN:.0f} points",
                       "gain_reached": all(gain >= TARGET_GAIN for gain in gains),
                       "time_reached": all(m <= TARGET_MINUTES for m in minutes)}}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/bench-logic")
    parser.add_argument("--preset", default="cpu-tiny")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--threads", type=int, default=2, help="torch threads (1 holds up better on a shared CPU)")
    parser.add_argument("--collect", nargs="+", type=Path, help="record these finished run folders instead of running "
                                                              "(runs of this script keep their wall time in them)")
    parser.add_argument("--note", default="", help="what else to record about the conditions")
    parser.add_argument("--cpu-shared", action="store_true", help="other jobs ran beside it (its wall time is inflated)")
    args = parser.parse_args()
    runs = []
    if args.collect:
        runs = [summarize(folder) for folder in args.collect]
    else:
        for seed in args.seeds:
            folder = Path(args.out) / f"seed-{seed}"
            run_seed(folder, args.preset, seed, args.threads)
            runs.append(summarize(folder))
    record = {"cpu_shared_with_another_process": args.cpu_shared, "note": args.note,
              **aggregate(runs), "runs": runs}
    path = write_result("quickstart_logic", record)
    for run in runs:
        accuracy = ", ".join(f"{name} {value:.1%}" for name, value in run["accuracy"].items())
        print(f"seed {run['seed']}: {(run['wall_seconds'] or run['stage_seconds_sum']) / 60:.1f} min; {accuracy}")
    print(f"figure: {record['figure']}\nwritten: {path}")


if __name__ == "__main__":
    main()
