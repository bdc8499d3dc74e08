"""What export and chat start from: a run folder (one of its trained stages), a stage folder, or a plain model.

A stage's adapter is only half a model: the settings it trained and was evaluated under (4-bit or not, compute
dtype, context length, the instruction appended to questions, eval's token budgets) live in the fingerprints of
its own folder and of its eval folder. They are read back here and laid over the run's preset, so that export
and chat load the model the way the stage used it, `--set` overrides of the run included.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from budget_reasoner.errors import BudgetReasonerError
from budget_reasoner.io import COMPLETE, FINGERPRINT, is_complete, read_json, read_jsonl, verify_complete
from budget_reasoner.stages import check_adapter, stage_model_paths

TRAINED_STAGES = ("sft", "dpo", "distill")  # the recipe's order: a run's default is the last one it finished
# settings a stage's fingerprint records that say how its model loads and answers (io.MODEL_SETTINGS, eval's)
LOAD_SETTINGS = ("seed", "model.max_length", "model.attention", "quantization")
EVAL_SETTINGS = ("eval", "generate.instruction")


@dataclass
class Source:
    """A model to export or chat with: a base, and the adapter a stage trained over it (None for a plain model)."""

    path: Path | str  # what the user named (run folder, stage folder, model folder or hub id)
    name: str  # the stage's name ("sft", "distill"), or the model's
    base: str  # the base model: a local folder (absolute) or a hub id
    adapter: Path | None
    stage_dir: Path | None = None
    run_dir: Path | None = None  # the quickstart folder that holds the stage, when there is one
    domain: str = "math"

    @property
    def eval_dir(self) -> Path | None:
        """The run's held-out eval of this stage (its rows are the run's own answers), when it is there."""
        if self.run_dir is None:
            return None
        folder = self.run_dir / "eval" / self.name
        return folder if is_complete(folder) else None

    def eval_rows(self) -> list[dict]:
        return read_jsonl(self.eval_dir / "results.jsonl") if self.eval_dir else []

    def held_out_file(self) -> Path | None:
        if self.run_dir is None:
            return None
        path = self.run_dir / "data" / "problems" / "held_out.jsonl"
        return path if path.is_file() else None


def find_source(path: str | Path, stage: str | None = None, needs_adapter: bool = False) -> Source:
    """Resolve what the user named. A run folder gives its stage `stage` (default: the last one it finished);
    a stage folder is used as it is; anything else is a plain model folder or hub id (refused when
    `needs_adapter`). Refuses, in one line, a stage that is unfinished, damaged or without its adapter."""
    folder = Path(path)
    if (folder / "run.json").is_file():
        run = read_json(folder / "run.json")
        finished = [name for name in TRAINED_STAGES if (folder / name / "stage.json").is_file()]
        if stage is None:
            if not finished:
                raise BudgetReasonerError(
                    f"{folder} holds no trained stage with an adapter yet ({', '.join(TRAINED_STAGES)}); run "
                    f"`budget-reasoner quickstart --out {folder}` to finish it")
            stage = finished[-1]
        elif stage not in TRAINED_STAGES:
            raise BudgetReasonerError(f"--stage must be one of {', '.join(TRAINED_STAGES)}, got {stage!r}")
        return _stage_source(folder / stage, folder, run.get("domain", "math"))
    if stage is not None:
        raise BudgetReasonerError(f"--stage picks a stage of a run folder (one with run.json); {folder} is not one")
    if (folder / "stage.json").is_file() or (folder / "adapter_config.json").is_file():
        run = folder.parent if (folder.parent / "run.json").is_file() else None
        return _stage_source(folder, run, read_json(run / "run.json").get("domain", "math") if run else "math")
    if needs_adapter:
        why = "does not exist" if not folder.exists() else "is not a run folder, a stage folder or a LoRA adapter"
        raise BudgetReasonerError(f"{folder} {why}; export takes a run folder (with --stage) or a stage folder "
                                  f"(sft, dpo, distill) that holds an adapter")
    return Source(path, Path(str(path)).name, str(folder.resolve()) if folder.exists() else str(path), None)


def _stage_source(stage_dir: Path, run_dir: Path | None, domain: str) -> Source:
    if not stage_dir.is_dir():
        raise BudgetReasonerError(f"{stage_dir}: no such stage folder")
    if (stage_dir / FINGERPRINT).is_file() and not is_complete(stage_dir):
        raise BudgetReasonerError(f"{stage_dir} has not finished training (no {COMPLETE}); run its command again to "
                                  f"finish it")
    verify_complete(stage_dir)  # a deleted or changed adapter file: one line naming it
    base, adapter = stage_model_paths(stage_dir)
    if adapter is None:
        raise BudgetReasonerError(f"{stage_dir} holds no adapter")
    check_adapter(adapter)
    return Source(stage_dir, stage_dir.name, base, adapter, stage_dir, run_dir, domain)


def recorded_settings(source: Source) -> dict:
    """The dotted preset keys (for `load_preset` overrides) the stage trained with and its eval answered with."""
    settings: dict = {}
    for folder, names in ((source.stage_dir, LOAD_SETTINGS), (source.eval_dir, EVAL_SETTINGS)):
        if folder is None or not (folder / FINGERPRINT).is_file():
            continue
        recorded = read_json(folder / FINGERPRINT).get("settings", {})
        for name in names:
            if name in recorded:
                settings |= _flatten(name, recorded[name])
    return settings


def _flatten(prefix: str, value) -> dict:
    if isinstance(value, dict):
        return {key: inner for name, item in value.items() for key, inner in _flatten(f"{prefix}.{name}", item).items()}
    return {prefix: value}


def source_preset(source: Source, preset_name: str | None = None, overrides: dict | None = None):
    """The preset to load and prompt the source's model with: `preset_name` (default: the run's own preset, else
    what `auto` picks here), then the settings its stage recorded, then the caller's explicit overrides."""
    from budget_reasoner.config import load_preset

    if preset_name is None and source.run_dir is not None:
        preset_name = read_json(source.run_dir / "run.json").get("preset")
    if preset_name in (None, "auto"):
        from budget_reasoner.hardware import detect
        from budget_reasoner.memory import recommend_preset

        preset_name, _ = recommend_preset(detect())
    known = {key: value for key, value in recorded_settings(source).items() if not key.startswith("eval.benchmark")}
    return load_preset(preset_name, {**known, **(overrides or {})})


def check_base_available(base: str) -> None:
    """The base model's config is reachable: a local folder, or a hub id in the local cache (or downloadable).
    Checked before anything heavy loads, so a missing base is one line, not a traceback after minutes."""
    from transformers import AutoConfig

    if Path(base).is_absolute() or base.startswith((".", "~")):
        if not (Path(base).expanduser() / "config.json").is_file():
            raise BudgetReasonerError(f"base model {base} not found (no config.json there); copy it back, or pass a "
                                      f"stage whose base is available")
        return
    try:
        AutoConfig.from_pretrained(base, local_files_only=True)
        return
    except (OSError, ValueError):
        if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false"):
            raise BudgetReasonerError(f"base model {base!r} is not in the local Hugging Face cache and HF_HUB_OFFLINE is "
                                      f"set; download it where the hub is reachable (`hf download {base}`)") from None
    try:
        AutoConfig.from_pretrained(base)
    except (OSError, ValueError) as error:
        raise BudgetReasonerError(f"base model {base!r} cannot be found: not a local folder, not in the Hugging Face "
                                  f"cache, and the hub did not answer ({str(error).splitlines()[0][:160]})") from None
