"""SFT on two CPU processes (torchrun, gloo) beside one process with twice the accumulation: the same update
(tests/multi_process.py says why), so the adapters must agree; per-rank peak memory and step time beside the
single process's. Writes benchmarks/results/<machine>/multi_process.json.

    python benchmarks/multi_process.py [--steps 30] [--batch 8] [--work /tmp/multi-process]

The cpu-tiny student's real shape (0.8M parameters, 4 layers), LoRA r 32, fused loss, random base weights.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.record import write_result  # noqa: E402
from tests.multi_process import (adapter_weights, build_inputs, cli, max_abs_difference, run, sft_command,  # noqa: E402
                                 step_logs, torchrun)


def session(stage: Path) -> dict:
    return json.loads((stage / "sessions.json").read_text())["sessions"][-1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch", type=int, default=8, help="per-device batch")
    parser.add_argument("--work", type=Path, default=Path("/tmp/multi-process-benchmark"))
    parser.add_argument("--write", default="multi_process", help="result name ('' to skip writing)")
    args = parser.parse_args()
    settings = {"sft.max_steps": args.steps, "sft.batch_size": args.batch, "sft.save_steps": args.steps,
                "sft.fused_loss": True, "sft.warmup_ratio": 0.0, "lora.dropout": 0.0}
    shutil.rmtree(args.work, ignore_errors=True)
    args.work.mkdir(parents=True)
    student, data = build_inputs(args.work, settings, examples=args.steps * args.batch * 2)
    load_before = os.getloadavg()
    runs = {}
    for name, command in (("two_processes", torchrun(2) + cli() + sft_command(student, data, args.work / "two", 1, settings)),
                          ("one_process", cli() + sft_command(student, data, args.work / "one", 2, settings))):
        started = time.time()
        result = run(command, args.work / f"trace-{name}", timeout=1800)
        if result.returncode != 0:
            raise SystemExit(f"{name} failed:\n{result.stderr[-3000:]}")
        stage = args.work / ("two" if name == "two_processes" else "one")
        record, compute = json.loads((stage / "stage.json").read_text()), session(stage)
        ranks = compute.get("per_rank") or [{"peak_memory_bytes": compute["peak_memory_bytes"], "seconds": compute["seconds"]}]
        runs[name] = {"world_size": record["world_size"], "effective_batch": record["effective_batch"],
                      "command_wall_seconds": round(time.time() - started, 2),
                      "train_seconds": round(compute["seconds"], 3),
                      "seconds_per_step": round(compute["seconds"] / args.steps, 4),
                      "peak_memory_mib_per_rank": [round(rank["peak_memory_bytes"] / 2**20, 1) for rank in ranks],
                      "train_seconds_per_rank": [rank["seconds"] for rank in ranks]}
    two, one = adapter_weights(args.work / "two"), adapter_weights(args.work / "one")
    grad_two, grad_one = step_logs(args.work / "two", "grad_norm"), step_logs(args.work / "one", "grad_norm")
    numbers = {
        "settings": {**settings, "per_device_batch": args.batch, "threads_per_process": 1, "backend": "gloo"},
        "adapter_max_abs_difference": max_abs_difference(two, one),
        "adapter_max_abs_value": max(float(weight.abs().max()) for weight in one.values()),
        "grad_norm_max_relative_difference": max(abs(a - b) / b for a, b in zip(grad_two, grad_one)),
        "load_average_before": [round(value, 2) for value in load_before],
        "load_average_after": [round(value, 2) for value in os.getloadavg()],
        **runs,
    }
    print(json.dumps(numbers, indent=2))
    if args.write:
        print(f"written to {write_result(args.write, numbers)}")


if __name__ == "__main__":
    main()
