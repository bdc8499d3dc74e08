"""The planner against the clock: calibrate on this machine, predict quickstart stage by stage, run it, compare.

    python benchmarks/planner.py --out /tmp/planner-run --write planner      # ~1 min calibration + one quickstart

The prediction is made before the run starts, from the calibration alone. The bootstrap's teacher stops at an
accuracy target after a number of steps no one knows beforehand (700-950 in the recorded runs): the plan uses the
median, and the result also shows the prediction with the run's own step count, which isolates the rates' error.
Measured per stage = the run's own records (report.json `compute`); the whole run = the quickstart's wall time.
"""

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from record import write_result  # noqa: E402

REPORT_NAMES = {"bootstrap": "bootstrap", "generate": "generate", "sft": "sft", "dpo": "dpo",
                "teacher top-k cache": "cache", "distill": "distill"}


def measured_stages(report: dict) -> dict[str, float]:
    stages = {}
    for row in report["compute"]:
        name = "eval" if row["stage"].startswith("eval") else REPORT_NAMES.get(row["stage"], row["stage"])
        stages[name] = row["seconds"]
    return stages


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="a new folder for the quickstart run")
    parser.add_argument("--preset", default="cpu-tiny")
    parser.add_argument("--write", metavar="NAME", help="save as benchmarks/results/<machine>/NAME.json")
    parser.add_argument("--label", help="a note saved with --write (e.g. whether other jobs shared the machine)")
    args = parser.parse_args()

    from budget_reasoner.calibrate import cpu_rates, plan_time_on_cpu
    from budget_reasoner.config import load_preset

    preset = load_preset(args.preset)
    rates = cpu_rates(preset, recalibrate=True)
    plan = plan_time_on_cpu(preset, rates)
    print(plan.table(), flush=True)

    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "budget_reasoner.cli", "quickstart", "--preset", args.preset, "--out", str(args.out)],
                   check=True)
    wall = time.perf_counter() - started
    report = json.loads((args.out / "report.json").read_text())
    measured = measured_stages(report)
    teacher_steps = report["bootstrap"]["teacher"]["steps"] if "bootstrap" in report else None
    replanned = plan_time_on_cpu(preset, rates, teacher_steps=teacher_steps)

    rows = []
    for stage, again in zip(plan.stages, replanned.stages):
        if stage.stage not in measured:
            continue
        rows.append({"stage": stage.stage, "predicted_seconds": stage.seconds, "measured_seconds": measured[stage.stage],
                     "error": stage.seconds / measured[stage.stage] - 1,
                     "predicted_with_run_steps_seconds": again.seconds,
                     "error_with_run_steps": again.seconds / measured[stage.stage] - 1})
    total = {"stage": "whole run (wall)", "predicted_seconds": plan.total_seconds, "measured_seconds": wall,
             "error": plan.total_seconds / wall - 1, "predicted_with_run_steps_seconds": replanned.total_seconds,
             "error_with_run_steps": replanned.total_seconds / wall - 1}
    print(f"\n{'stage':<18}{'predicted s':>12}{'measured s':>12}{'error':>8}{'with run steps':>16}")
    for row in rows + [total]:
        print(f"{row['stage']:<18}{row['predicted_seconds']:>12.1f}{row['measured_seconds']:>12.1f}{row['error']:>+8.1%}"
              f"{row['error_with_run_steps']:>+16.1%}")
    if args.write:
        print("wrote", write_result(args.write, {"preset": args.preset, "label": args.label, "calibration": rates.to_dict(),
                                                 "teacher_steps": teacher_steps, "stages": rows, "total": total}))


if __name__ == "__main__":
    main()
