"""The report card of a run: report.json (the numbers), report.md (a table to read), report.png (the curves)."""

from __future__ import annotations

from pathlib import Path

from budget_reasoner.io import write_json

STAGE_ORDER = ("base", "sft", "dpo", "distill", "grpo", "opd")
SELF_PLAY = "sft-round-"  # quickstart --rounds: sft-round-2, sft-round-3, ... between sft and dpo


def round_of(stage: str) -> int:
    return int(stage.removeprefix(SELF_PLAY))


def self_play_rounds(stages: dict) -> list[str]:
    """The self-play rounds' stage names in round order."""
    return sorted((name for name in stages if name.startswith(SELF_PLAY)), key=round_of)


def ordered_stages(stages: dict) -> list[str]:
    """The names of `stages` in recipe order: STAGE_ORDER's, the self-play rounds right after sft."""
    names = []
    for name in STAGE_ORDER:
        names += ([name] if name in stages else []) + (self_play_rounds(stages) if name == "sft" else [])
    return names


def _majority_key(summary: dict) -> str | None:
    return next((key for key in summary if key.startswith("maj@")), None)


def write_report(out: Path, results: dict) -> None:
    out = Path(out)
    write_json(out / "report.json", results)
    (out / "report.md").write_text(markdown(results))
    plot(results, out / "report.png")


def markdown(results: dict) -> str:
    lines = [
        f"# budget-reasoner run: preset `{results['preset']}`, domain `{results['domain']}`",
        "",
        f"Hardware: {results['hardware']}. Total compute: {results['seconds'] / 60:.1f} min"
        + (f", ${results['cost_usd']:.4f} at ${results['gpu_hour_price']:g}/GPU-hour." if "cost_usd" in results else "."),
        "",
        "Held-out accuracy on the same problems after each stage (greedy pass@1, and majority vote over samples):",
        "",
        "| model | accuracy | majority vote | train time | tokens | peak memory | cost |",
        "|---|---|---|---|---|---|---|",
    ]
    rows = [(name, results["stages"][name]) for name in ordered_stages(results["stages"])]
    if results.get("teacher"):
        rows.append(("teacher", results["teacher"]))
    for name, summary in rows:
        key = _majority_key(summary)
        vote = f"{summary[key]:.1%} ({key})" if key and summary[key] is not None else "-"
        train = f"{summary['train_seconds']:.0f} s" if "train_seconds" in summary else "-"
        tokens = f"{summary['tokens']:,}" if summary.get("tokens") else "-"
        memory = f"{summary['peak_memory_gb']:.2f} GiB" if summary.get("peak_memory_gb") else "-"
        cost = f"${summary['cost_usd']:.4f}" if "cost_usd" in summary else "-"
        lines.append(f"| {name} | {summary['accuracy']:.1%} | {vote} | {train} | {tokens} | {memory} | {cost} |")
    calls = [(name, summary["tool_calls_per_problem"]) for name, summary in rows if "tool_calls_per_problem" in summary]
    if calls:  # eval.tools: each greedy answer's python blocks ran in the sandbox
        lines += ["", "Tool calls per held-out problem (the greedy answer's): "
                  + ", ".join(f"{name} {count:.2f}" for name, count in calls) + "."]
    for spec, by_stage in (results.get("benchmarks") or {}).items():
        lines += ["", f"Benchmark `{spec}` ({next(iter(by_stage.values()), {}).get('problems', '?')} problems):", "",
                  "| model | accuracy | majority vote |", "|---|---|---|"]
        for name in [*ordered_stages(by_stage), "teacher"]:
            if name in by_stage:
                key = _majority_key(by_stage[name])
                vote = f"{by_stage[name][key]:.1%} ({key})" if key else "-"
                lines.append(f"| {name} | {by_stage[name]['accuracy']:.1%} | {vote} |")
    if results.get("compute"):
        lines += ["", "Compute per stage (this run's records, resumed sessions included):", "",
                  "| stage | wall time | tokens | peak memory | device | cost |", "|---|---|---|---|---|---|"]
        for entry in results["compute"]:
            tokens = f"{entry['tokens']:,}" if entry.get("tokens") else "-"
            memory = f"{entry['peak_memory_gb']:.2f} GiB" if entry.get("peak_memory_gb") else "-"
            cost = f"${entry['cost_usd']:.4f}" if "cost_usd" in entry else "-"
            lines.append(f"| {entry['stage']} | {entry['seconds']:.0f} s | {tokens} | {memory} | {entry.get('device') or '-'} | {cost} |")
    generated = results.get("generate", {})
    if generated:
        lines += ["", f"Generation: {generated.get('chains', 0)} teacher chains for {generated.get('problems', 0)} problems, "
                      f"{generated.get('verified_chains', 0)} verified ({generated.get('teacher_pass_rate', 0):.1%}); "
                      f"{generated.get('sft_examples', 0)} SFT examples, {generated.get('pairs', 0)} preference pairs."]
        if "tool_calls_per_chain" in generated:  # generate.tools
            lines[-1] += (f" Tool calls: {generated['tool_calls_per_chain']:.2f} per chain, "
                          f"{generated['tool_calls_failed']:.1%} of them failed.")
    return "\n".join(lines) + "\n"


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (losses, accuracy) = plt.subplots(1, 2, figsize=(11, 4))
    for name in ordered_stages(results["stages"])[1:]:
        history = results["stages"].get(name, {}).get("loss", [])
        if history:
            losses.plot([h["step"] for h in history], [h["loss"] for h in history], label=name)
    losses.set_xlabel("step")
    losses.set_ylabel("training loss")
    losses.set_title("loss per stage")
    losses.legend()
    names = ordered_stages(results["stages"]) + (["teacher"] if results.get("teacher") else [])
    values = [(results["stages"].get(name) or results["teacher"])["accuracy"] for name in names]
    bars = accuracy.bar(names, values, color=["#999999", "#4c72b0", "#55a868", "#c44e52", "#dd8452", "#8172b2"][: len(names)])
    accuracy.bar_label(bars, labels=[f"{v:.0%}" for v in values])
    accuracy.set_ylim(0, 1)
    accuracy.set_title("held-out accuracy (greedy)")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def log_to_wandb(results: dict) -> None:
    """One wandb run with the held-out accuracies of every stage, the offline bootstrap's loss curves and the
    compute table (the trainers log their own curves as runs of their own)."""
    import wandb

    run = wandb.init(project="budget-reasoner", name=f"{results['preset']}-report", job_type="report", config={"preset": results["preset"]})
    run.log({f"accuracy/{name}": summary["accuracy"] for name, summary in results["stages"].items()}
            | ({"accuracy/teacher": results["teacher"]["accuracy"]} if results.get("teacher") else {}))
    bootstrap = {name: record for name, record in results.get("bootstrap", {}).items() if isinstance(record, dict)}
    if bootstrap:
        curves = wandb.Table(columns=["model", "step", "loss"],
                             data=[[name, point["step"], point["loss"]] for name, record in bootstrap.items()
                                   for point in record.get("loss", [])])
        run.log({"bootstrap/loss": curves})
    for spec, by_stage in (results.get("benchmarks") or {}).items():
        run.log({f"{spec}/accuracy/{name}": summary["accuracy"] for name, summary in by_stage.items()})
    if results.get("compute"):
        columns = ["stage", "seconds", "tokens", "peak_memory_gb", "device", "cost_usd"]
        run.log({"compute": wandb.Table(columns=columns, data=[[row.get(c) for c in columns] for row in results["compute"]])})
    run.summary["seconds"] = results["seconds"]
    run.finish()
