"""Take the model home: a stage's adapter merged into a standard checkpoint, checked, carded, optionally GGUF and pushed.

    export_model("runs/quickstart", "exports/reasoner", ExportOptions(stage="distill"))

writes, into a hidden folder beside `out` that is renamed to `out` only once everything passed:

    config.json, model*.safetensors, generation_config.json   the merged model (AutoModelForCausalLM, vllm serve)
    tokenizer files + chat template                           the stage's own, with earlier turns' thinking dropped
    export.json                                               what was merged into what, the gate's result, size, time
    README.md                                                 the model card (model_card.py)
    gguf/model-<type>.gguf, gguf/Modelfile                    with --gguf (the GGUF when llama.cpp is here)

Any failure (the gate included) removes the hidden folder: `out` holds a whole export or nothing. A hidden folder
left by a killed export is removed by the next export to the same `out`.
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from budget_reasoner.errors import BudgetReasonerError
from budget_reasoner.io import read_json, read_jsonl, write_json
from budget_reasoner.progress import say

EXPORT_RECORD = "export.json"


@dataclass
class ExportOptions:
    stage: str | None = None  # of a run folder: sft, dpo or distill (default: the last one it finished)
    dtype: str = "auto"  # auto (the stage's compute dtype), bf16, fp16 or fp32
    merge_into: str = "auto"  # auto, dequantized (NF4, what a 4-bit stage trained against) or original
    adapter_only: bool = False  # the adapter alone, no merge (no gate: its bytes are the stage's)
    gguf: str | None = None  # f16, q8_0 or q4_k_m
    push_to_hub: str | None = None  # a hub repo id; the token comes from HF_TOKEN (or `hf auth login`)
    gate_problems: int = 32  # held-out problems the gate compares on (0: skip the gate, said in export.json)
    min_answer_agreement: float | None = None  # least fraction of equal greedy answers (default: gate.thresholds)
    gate_tolerance: float | None = None  # on the mean log-likelihood difference, nats/token (default: gate.thresholds)
    problems: Path | None = None  # held-out problems for the gate when the stage has no run around it
    preset: str | None = None  # default: the run's own preset


def export_model(source_path: str | Path, out: str | Path, options: ExportOptions | None = None) -> dict:
    """Export what `source_path` names (run folder, stage folder) to `out`; returns the export record."""
    options = options or ExportOptions()
    out = Path(out)
    started = time.time()
    check_out_folder(out)
    token = hub_token() if options.push_to_hub else None  # before any work: a push without a token is refused first
    from budget_reasoner.export.gguf import missing_tools
    from budget_reasoner.export.source import check_base_available, find_source, source_preset

    if options.gguf:
        missing_tools(options.gguf)  # an unknown type is refused here
    source = find_source(source_path, options.stage, needs_adapter=True)
    preset = source_preset(source, options.preset)
    check_base_available(source.base)
    partial = partial_folder(out)
    try:
        record = {"stage": source.name, "source": str(source_path), "base": source.base,
                  "preset": preset.name, "adapter_only": options.adapter_only}
        if options.adapter_only:
            write_adapter_only(source, partial)
        else:
            record |= merge_and_check(source, preset, partial, options)
        if options.gguf:
            record["gguf"] = gguf_and_modelfile(partial, options.gguf, preset)
        record["bytes"] = sum(path.stat().st_size for path in partial.rglob("*") if path.is_file())
        record["seconds"] = time.time() - started
        write_json(partial / EXPORT_RECORD, record)
        from budget_reasoner.model_card import model_card, write_text

        write_text(partial / "README.md", model_card(source.run_dir, source.name, source.base, preset, export=record))
        try:
            os.rename(partial, out)  # atomic; replaces `out` only when it is an empty folder
        except OSError as error:
            raise BudgetReasonerError(f"--out {out}: could not move the finished export there ({error.strerror}); "
                                      f"was it written by another command meanwhile?") from None
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    if options.push_to_hub:
        record["pushed_to"] = push(out, options.push_to_hub, token, source.name)
    return record


def merge_and_check(source, preset, folder: Path, options: ExportOptions) -> dict:
    """Merge, save the checkpoint into `folder`, and run the gate on it (raises when it fails)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from budget_reasoner.export.gate import gate_sample, run_gate
    from budget_reasoner.export.merge import (DTYPES, add_think_handling, export_dtype, generation_config_for,
                                              merge_target, merged_model)
    from budget_reasoner.hardware import detect
    from budget_reasoner.models import load_tokenizer

    hardware = detect(preset.device, "bitsandbytes")  # export loads through transformers, whatever trained it
    dtype, merge_into = export_dtype(options.dtype, preset), merge_target(options.merge_into, preset)
    why = ("the stage trained on the 4-bit base: these are the weights its adapter learned against"
           if preset.quantization.load_in_4bit else "the stage trained on them (4-bit off)")
    say(f"export: {source.name} adapter + {merge_into} base weights of {source.base} -> {dtype}")
    started = time.time()
    model = merged_model(source.base, source.adapter, preset, hardware, dtype, merge_into)
    tokenizer = load_tokenizer(source.adapter)
    think_handling = add_think_handling(tokenizer)
    model.generation_config = generation_config_for(tokenizer, preset)
    model.save_pretrained(folder, max_shard_size="4GB")
    tokenizer.save_pretrained(folder)
    del model
    merge_seconds = time.time() - started
    record = {"dtype": dtype, "merged_into": merge_into, "why_merged_into": why, "merge_seconds": merge_seconds,
              "think_handling_in_template": think_handling, "preset_overrides": preset_overrides(preset, dtype)}
    if options.gate_problems <= 0:
        say("export: gate skipped (--gate-problems 0); the merge is unchecked")
        return record | {"gate": None}
    problems_file = options.problems or source.held_out_file()
    problems = read_jsonl(problems_file, ("question",), {"question": "text"}) if problems_file else []
    sample = gate_sample(source.eval_rows(), problems, options.gate_problems, preset.seed)
    started = time.time()
    reference = load_reference(source, preset, hardware)
    exported = (AutoModelForCausalLM.from_pretrained(str(folder), dtype=DTYPES[dtype]).to(hardware.device).eval(),
                AutoTokenizer.from_pretrained(str(folder)))
    result = run_gate(reference, exported, sample, preset, source.domain, dtype, options.min_answer_agreement,
                      options.gate_tolerance)
    say(result.line())
    if not result.passed:
        raise BudgetReasonerError(f"{result.line()}: the merged model does not behave like the {source.name} stage, "
                                  f"so nothing was exported (it merged into the {merge_into} weights in {dtype}; "
                                  f"--adapter-only exports the adapter unmerged)")
    return record | {"gate": result.to_dict(), "gate_seconds": time.time() - started}


def preset_overrides(preset, dtype: str) -> dict:
    """What chat (or anyone with this project) needs to load and prompt the export as the run measured it: the
    merged weights as they are (not re-quantized), the instruction after each question, eval's token budgets."""
    from budget_reasoner.export.merge import COMPUTE_TO_EXPORT

    compute = {short: name for name, short in COMPUTE_TO_EXPORT.items()}[dtype]
    return {"quantization.load_in_4bit": False, "quantization.compute_dtype": compute,
            "model.max_length": preset.model.max_length, "generate.instruction": preset.generate.instruction,
            "eval.max_new_tokens": preset.eval.max_new_tokens, "eval.think_budget": preset.eval.think_budget}


def load_reference(source, preset, hardware):
    """The stage as it trained and was evaluated: its base through the project's loader (4-bit when the stage was),
    the adapter on top, unmerged; with the stage's own tokenizer."""
    from peft import PeftModel

    from budget_reasoner.models import load_model, load_tokenizer

    model = load_model(source.base, preset, hardware)
    return PeftModel.from_pretrained(model, str(source.adapter)).eval(), load_tokenizer(source.adapter)


def write_adapter_only(source, folder: Path) -> None:
    """The adapter's files, its config naming the base as a hub id or an absolute path (never a run-relative one)."""
    folder.mkdir(parents=True, exist_ok=True)
    for path in Path(source.adapter).iterdir():
        if path.is_file():
            shutil.copy2(path, folder / path.name)
    config = read_json(folder / "adapter_config.json")
    config["base_model_name_or_path"] = source.base
    write_json(folder / "adapter_config.json", config)


def gguf_and_modelfile(folder: Path, quantization: str, preset) -> str:
    """The GGUF (when llama.cpp's tools are here) and the Modelfile, in folder/gguf/; returns what happened, one line."""
    from transformers import AutoConfig, AutoTokenizer

    from budget_reasoner.export.gguf import gguf_name, missing_tools, modelfile, write_gguf

    target = folder / "gguf"
    target.mkdir(exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(str(folder))  # the export's own (an adapter-only one has it too)
    positions = getattr(AutoConfig.from_pretrained(str(folder)), "max_position_embeddings", None) \
        if (folder / "config.json").is_file() else None
    (target / "Modelfile").write_text(modelfile(tokenizer, quantization, positions or preset.model.max_length))
    if (folder / "adapter_config.json").is_file():
        line = "GGUF: not written for --adapter-only (llama.cpp converts merged checkpoints); Modelfile in gguf/"
    elif (line := missing_tools(quantization)) is None:
        write_gguf(folder, target, quantization)
        line = f"GGUF: gguf/{gguf_name(quantization)} and gguf/Modelfile (`ollama create NAME -f Modelfile` there)"
    say(line)
    return line


# ---- the output folder ----------------------------------------------------------------------------------------

def check_out_folder(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise BudgetReasonerError(f"--out {out} is a file; pass a new folder")
    if out.is_dir() and any(out.iterdir()):
        raise BudgetReasonerError(f"--out {out} exists and is not empty; pass a new folder (export never writes over "
                                  f"files)")


def partial_folder(out: Path) -> Path:
    """A hidden sibling of `out` (same disk, so the final rename is atomic); stale ones of dead exports go first."""
    out.parent.mkdir(parents=True, exist_ok=True)
    for stale in out.parent.glob(f".{out.name}.partial-*"):
        pid = stale.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(stale, ignore_errors=True)
    folder = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir()
    return folder


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# ---- the hub ----------------------------------------------------------------------------------------------------

def hub_token() -> str:
    """The token for a push: HF_TOKEN, or the one `hf auth login` stored. Never written anywhere by this code."""
    from huggingface_hub import get_token

    token = get_token()
    if not token:
        raise BudgetReasonerError("--push-to-hub needs a Hugging Face token with write access: set HF_TOKEN (from "
                                  "https://huggingface.co/settings/tokens) or run `hf auth login`; nothing was exported")
    return token


def push(folder: Path, repo: str, token: str, stage: str) -> str:
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    try:
        api.create_repo(repo, repo_type="model", exist_ok=True)
        info = api.upload_folder(repo_id=repo, folder_path=str(folder), repo_type="model",
                                 commit_message=f"budget-reasoner export of the {stage} stage")
    except Exception as error:  # network, permission, a bad repo id: one line, the token never in it
        message = (str(error).splitlines() or [type(error).__name__])[0].replace(token, "***")
        raise BudgetReasonerError(f"push to {repo} failed: {message[:200]} (the export itself is complete in "
                                  f"{folder})") from None
    say(f"pushed {folder} to https://huggingface.co/{repo}")
    return str(getattr(info, "commit_url", None) or f"https://huggingface.co/{repo}")
