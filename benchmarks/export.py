"""Take the model home, measured on cpu-tiny: train, export, reload with plain transformers, compare with the run's eval.

    python benchmarks/export.py --run runs/export-bench [--threads 1] [--problems 50] [--qlora-steps 200]

1. The run: the offline quickstart into --run (skipped stage by stage when it is already complete there).
2. Export of its last stage (distill) at the stage's own dtype (fp32 on the CPU) and in bf16: size, wall time, and
   the export gate's result (greedy answers and mean token log-likelihood, merged checkpoint vs adapter on its base).
3. Round trip: each export reloaded with nothing but transformers (AutoModelForCausalLM, AutoTokenizer, the
   export's generation_config.json), one problem at a time, on a seeded sample of --problems held-out problems;
   its completions and final answers against the run's own eval rows of the same stage.
4. The 4-bit question: a QLoRA SFT stage (NF4 base) trained --qlora-steps on the run's data, exported merged into
   the dequantized NF4 weights (the default) and into the original weights; the gate's log-likelihood difference
   of each against the adapter on the 4-bit base it trained on.

Writes benchmarks/results/<machine>/export.json.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from record import write_result  # noqa: E402


def train_run(run: Path, threads: int) -> dict:
    """The quickstart into `run`, unless it already holds a finished one (report.json): that one is measured as it
    is, even when made by an older commit whose settings the current preset no longer matches."""
    from budget_reasoner.config import load_preset
    from budget_reasoner.model_card import write_run_card
    from budget_reasoner.recipe import quickstart

    preset = load_preset("cpu-tiny", {"threads": threads})
    started = time.time()
    if (run / "report.json").is_file():
        results, trained = json.loads((run / "report.json").read_text()), "before this script (report.json found)"
        if not (run / "MODEL_CARD.md").is_file():
            write_run_card(run, preset)  # a run older than model cards
    else:
        results, trained = quickstart(run, preset), "by this script"
    return {"folder": str(run), "trained": trained, "seconds_this_session": time.time() - started,
            "run_compute_seconds": results["seconds"], "teacher": round(results["teacher"]["accuracy"], 4),
            "stages": {name: round(stage["accuracy"], 4) for name, stage in results["stages"].items()}}


def export(source: Path, out: Path, **options) -> dict:
    from budget_reasoner.export import ExportOptions, export_model

    shutil.rmtree(out, ignore_errors=True)
    started = time.time()
    record = export_model(source, out, ExportOptions(**options))
    return {"seconds": time.time() - started, "bytes": record["bytes"], "dtype": record.get("dtype"),
            "merged_into": record.get("merged_into"), "gate": record.get("gate"),
            "merge_seconds": record.get("merge_seconds"), "gate_seconds": record.get("gate_seconds")}


def round_trip(folder: Path, rows: list[dict]) -> dict:
    """Plain transformers on the export, greedy from its own generation config, against the eval rows."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from budget_reasoner.verify import check, extract

    model, tokenizer = AutoModelForCausalLM.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(folder)
    identical = same_answer = correct = 0
    differing = []
    with torch.no_grad():
        for row in rows:
            inputs = tokenizer.apply_chat_template([{"role": "user", "content": row["question"]}],
                                                   add_generation_prompt=True, return_tensors="pt", return_dict=True)
            reply = tokenizer.decode(model.generate(**inputs)[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
            identical += reply == row["completion"]
            same_answer += extract("math", reply) == extract("math", row["completion"])
            correct += check("math", reply, row["answer"])
            if reply != row["completion"]:
                differing.append(row["id"])
    return {"problems": len(rows), "identical_completions": identical, "equal_answers": same_answer,
            "accuracy_reloaded": correct / len(rows), "accuracy_in_eval": sum(r["correct"] for r in rows) / len(rows),
            "differing_ids": differing}


def qlora_stage(run: Path, steps: int, threads: int) -> Path:
    from budget_reasoner.config import load_preset
    from budget_reasoner.train.sft import sft

    stage = run / f"sft-qlora-{steps}"
    preset = load_preset("cpu-tiny", {"threads": threads, "quantization.load_in_4bit": True, "sft.max_steps": steps,
                                      "sft.save_steps": steps})
    sft(run / "data" / "sft" / "train.jsonl", run / "models" / "student-base", stage, preset)  # skipped when complete
    return stage


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, default=Path("runs/export-bench"))
    parser.add_argument("--exports", type=Path, default=None, help="Where the exports go (default: RUN-exports).")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--problems", type=int, default=50)
    parser.add_argument("--qlora-steps", type=int, default=200)
    parser.add_argument("--note", default="", help="Said in the JSON, e.g. whether the CPU was shared.")
    args = parser.parse_args()

    import torch

    from budget_reasoner.progress import quiet_libraries

    quiet_libraries()
    torch.set_num_threads(args.threads)
    exports = args.exports or args.run.with_name(args.run.name + "-exports")
    numbers = {"threads": args.threads, "note": args.note, "run": train_run(args.run, args.threads)}
    rows = [json.loads(line) for line in (args.run / "eval" / "distill" / "results.jsonl").read_text().splitlines()]
    sample = random.Random(0).sample(rows, min(args.problems, len(rows)))
    for dtype in ("auto", "bf16"):
        folder = exports / f"distill-{dtype}"
        numbers[f"export_{dtype}"] = export(args.run, folder, stage="distill", dtype=dtype, gate_problems=args.problems)
        numbers[f"round_trip_{dtype}"] = round_trip(folder, sample)
        print(dtype, json.dumps({k: v for k, v in numbers[f"round_trip_{dtype}"].items() if k != "differing_ids"}))
    if args.qlora_steps:
        stage = qlora_stage(args.run, args.qlora_steps, args.threads)
        numbers["qlora"] = {"steps": args.qlora_steps,
                            "train_seconds": json.loads((stage / "stage.json").read_text())["seconds"]}
        problems = args.run / "data" / "problems" / "held_out.jsonl"
        from budget_reasoner.export.gate import thresholds

        for target in ("dequantized", "original"):
            for dtype in ("fp32", "bf16"):
                result = export(stage, exports / f"qlora-{target}-{dtype}", merge_into=target, dtype=dtype,
                                problems=problems, gate_problems=args.problems, gate_tolerance=10.0,
                                min_answer_agreement=0.0)  # measured with the gate wide open; its default verdict:
                tolerance, agreement = thresholds(dtype, reference_in_4bit=True)
                gate = result["gate"]
                result["default_gate_passes"] = (gate["mean_loglik_diff"] <= tolerance
                                                 and gate["equal_answers"] >= agreement * gate["problems"])
                numbers["qlora"][f"{target}_{dtype}"] = result
                print(target, dtype, result["default_gate_passes"], json.dumps(gate))
    print("wrote", write_result("export", numbers))


if __name__ == "__main__":
    main()
