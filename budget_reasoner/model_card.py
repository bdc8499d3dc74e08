"""The model card: what a trained model is, how it was made, how well it does, how to prompt it, whose licences apply.

Written as MODEL_CARD.md into every run folder (at the end of quickstart) and as README.md into every export (the
file the Hugging Face hub shows, with its YAML header). Everything in it is read from what the run wrote: run.json
and the preset, each stage's stage.json (data sizes, tokens, wall time), report.json (held-out accuracy per stage
and the compute table). Accuracies carry a 95% Wilson interval over the held-out problems.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path

from budget_reasoner.io import read_json

STAGES = ("sft", "dpo", "distill")
DATA_LICENCES = {  # data/README.md: the seed sets the project ships or names
    "gsm8k": "MIT (openai/grade-school-math)",
    "math500": "MIT (openai/prm800k; problems from MATH, MIT)",
}
PROJECT_LICENCE = "Apache-2.0"
TINY_BASE = "tiny-student"


def wilson_interval(accuracy: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """The 95% Wilson score interval of a proportion: sound near 0% and 100%, where the normal one is not."""
    if n <= 0:
        return 0.0, 1.0
    centre = (accuracy + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(accuracy * (1 - accuracy) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def base_licence(base: str, preset) -> str:
    """The base model's licence: the offline student has none but the project's; a local or cached model card's
    `license:` field; else where to look."""
    if preset is not None and preset.model.student == TINY_BASE:
        return f"{PROJECT_LICENCE} (built from scratch by this run's bootstrap: no third-party weights)"
    card = Path(base) / "README.md"
    if not card.is_file():
        try:
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(base, "README.md")
            card = Path(cached) if isinstance(cached, str) else card
        except Exception:  # not a hub id (a local folder without a card)
            pass
    if card.is_file():
        match = re.search(r"^license:\s*(\S+)", card.read_text(errors="replace"), re.MULTILINE)
        if match:
            return match.group(1)
    return f"not found offline; see https://huggingface.co/{base}" if not Path(base).exists() else "not stated in its folder"


def _stage_rows(run_dir: Path | None, report: dict) -> list[str]:
    rows = []
    stages = report.get("stages", {})
    compute = {row["stage"]: row for row in report.get("compute", [])}
    for name in ("base", *STAGES):
        if name not in stages and not (run_dir and (run_dir / name / "stage.json").is_file()):
            continue
        record = read_json(run_dir / name / "stage.json") if run_dir and (run_dir / name / "stage.json").is_file() else {}
        data = (f"{record['examples']:,} chains" if "examples" in record
                else f"{record['pairs']:,} pairs" if "pairs" in record else "-")
        tokens = f"{record['tokens']:,}" if record.get("tokens") else "-"
        seconds = f"{record['seconds']:.0f} s" if record.get("seconds") else "-"
        cost = f"${compute[name]['cost_usd']:.4f}" if "cost_usd" in compute.get(name, {}) else "-"
        held_out = "-"
        if name in stages and "accuracy" in stages[name]:
            accuracy, n = stages[name]["accuracy"], stages[name].get("problems", 0)
            low, high = wilson_interval(accuracy, n)
            held_out = f"{accuracy:.1%} [{low:.1%}, {high:.1%}] of {n}"
        rows.append(f"| {name} | {data} | {tokens} | {seconds} | {cost} | {held_out} |")
    return rows


def model_card(run_dir: Path | None, stage: str, base: str, preset, export: dict | None = None) -> str:
    """The card's markdown. `export` (export.json's record) adds the export's own section and the hub header."""
    report = read_json(run_dir / "report.json") if run_dir and (run_dir / "report.json").is_file() else {}
    licence = base_licence(base, preset)
    base_name = ("the offline tiny student (Qwen2 architecture, trained from scratch by `budget-reasoner bootstrap`)"
                 if preset is not None and preset.model.student == TINY_BASE else f"`{base}`")
    lines = []
    if export is not None:
        header = ["---", f"license: {licence if re.fullmatch(r'[a-z0-9.-]+', licence) else 'other'}",
                  "library_name: transformers", "pipeline_tag: text-generation",
                  "tags: [budget-reasoner, reasoning, chain-of-thought]"]
        if not Path(base).exists() and preset is not None and preset.model.student != TINY_BASE:
            header.append(f"base_model: {base}")
        lines += [*header, "---", ""]
    domain = report.get("domain", "math")
    lines += [f"# budget-reasoner: {stage} stage, {domain} reasoner", "",
              f"A narrow-domain reasoning model made by budget-reasoner from {base_name}, "
              f"preset `{getattr(preset, 'name', '?')}`: teacher chains verified by the {domain} grader, then the "
              f"stages below (each a LoRA adapter over the base; this card's model is the `{stage}` one).", ""]
    if report.get("hardware"):
        lines += [f"Trained on {report['hardware']}; whole run {report.get('seconds', 0) / 60:.1f} min of compute"
                  + (f", ${report['cost_usd']:.4f} at ${report['gpu_hour_price']:g}/GPU-hour" if "cost_usd" in report else "")
                  + ".", ""]
    lines += ["## Stages and held-out results", "",
              "Greedy accuracy on the same held-out problems after each stage (never trained on), with its 95% "
              "Wilson interval:", "",
              "| stage | data | tokens trained | wall time | cost | held-out accuracy |", "|---|---|---|---|---|---|",
              *_stage_rows(run_dir, report)]
    if not report:
        lines += ["", "No run report beside this stage: measure it with `budget-reasoner eval --model STAGE_DIR`."]
    generated = report.get("generate") or {}
    if generated.get("chains"):
        lines += ["", f"Data: {generated['chains']:,} teacher chains for {generated.get('problems', 0):,} problems, "
                      f"{generated.get('verified_chains', 0):,} verified; {generated.get('sft_examples', 0):,} SFT "
                      f"examples and {generated.get('pairs', 0):,} preference pairs."]
    instruction = getattr(getattr(preset, "generate", None), "instruction", "")
    lines += ["", "## How to prompt it", "",
              "One question per user turn, in the tokenizer's chat template"
              + (f", followed on a new line by: `{instruction}`" if instruction else "") + ". "
              "The model thinks between `<think>` and `</think>`, then gives its final answer as `\\boxed{...}`:", "",
              "```", "<think>", "12+7=19", "19-5=14", "</think>", "\\boxed{14}", "```", "",
              "Decode greedily (the export's generation_config.json does: that is how the results above were measured):", "",
              "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
              "model = AutoModelForCausalLM.from_pretrained(PATH)", "tokenizer = AutoTokenizer.from_pretrained(PATH)",
              'messages = [{"role": "user", "content": "(12+7-5)*3"}]',
              "inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors=\"pt\", "
              "return_dict=True)",
              "reply = model.generate(**inputs)[0, inputs[\"input_ids\"].shape[1]:]",
              "print(tokenizer.decode(reply, skip_special_tokens=True))", "```", "",
              "or `budget-reasoner chat PATH` in a terminal (thinking dimmed, final answer extracted).", ""]
    if export is not None:
        lines += _export_section(export)
    seeds = getattr(getattr(preset, "generate", None), "seed_sets", []) or []
    teacher = getattr(getattr(preset, "model", None), "teacher", "?")
    lines += ["## Licences", "", f"- Base model: {licence}.",
              f"- Problems: the {domain} domain's procedural problems (generated by budget-reasoner, {PROJECT_LICENCE})"
              + "".join(f"; seed set {s.split('=')[0]}: {DATA_LICENCES.get(s.split('=')[0], 'see its source')}" for s in seeds)
              + ".",
              f"- Chains: written by the teacher `{teacher}`; its licence's terms on outputs apply.",
              f"- budget-reasoner itself: {PROJECT_LICENCE}.", ""]
    return "\n".join(lines)


def _export_section(export: dict) -> list[str]:
    gate = export.get("gate") or {}
    lines = ["## This export", "",
             f"- Merged: the `{export['stage']}` adapter added to the {export['merged_into']} base weights "
             f"({export['why_merged_into']}), saved in {export['dtype']}." if not export.get("adapter_only") else
             f"- The `{export['stage']}` LoRA adapter alone, over `{export['base']}`.",
             f"- Size: {export['bytes'] / 2**20:,.1f} MiB; export took {export['seconds']:.1f} s."]
    if gate:
        lines.append(f"- Export gate ({gate['problems']} held-out problems, merged checkpoint vs the adapter on its "
                     f"training base): {gate['equal_answers']}/{gate['problems']} greedy answers equal, "
                     f"{gate['identical_completions']} identical completions; the mean token log-likelihood of "
                     f"{gate['completions_from']} differs by {gate['mean_loglik_diff']:.2g} nats/token on average "
                     f"(tolerance {gate['tolerance']:g}, at most {gate['max_loglik_diff']:.2g}).")
    if export.get("gguf"):
        lines.append(f"- GGUF: {export['gguf']}")
    return lines + [""]


def write_run_card(run_dir: Path, preset) -> Path:
    """MODEL_CARD.md in a quickstart folder, about its last trained stage."""
    run_dir = Path(run_dir)
    stage = next((name for name in reversed(STAGES) if (run_dir / name / "stage.json").is_file()), "base")
    base = read_json(run_dir / stage / "stage.json").get("base", "?") if stage != "base" else preset.model.student
    path = run_dir / "MODEL_CARD.md"
    write_text(path, model_card(run_dir, stage, base, preset))
    return path


def write_text(path: Path, text: str) -> None:
    """Through a temporary file renamed over `path`: a card is whole or absent."""
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(text)
    os.replace(temporary, path)
