"""Stage folders as model sources: what a finished training stage holds and how a later stage finds its model.

A training stage writes `stage.json` (its base model and adapter folder) beside a LoRA adapter; any stage that
starts from a model (train, eval, cache-logits, export, chat) reads a plain model folder, a hub id or such a stage
folder through `stage_model_paths`, and checks an adapter with `check_adapter` before anything loads. Kept apart
from io.py (data files, shards, fingerprints, locks: any folder) because these helpers know what a model stage
holds; and below the stages, so eval and train read each other's folders without importing each other.
"""

from __future__ import annotations

import os
from pathlib import Path

from budget_reasoner.errors import BudgetReasonerError
from budget_reasoner.io import read_json


def check_adapter(adapter: Path) -> None:
    """A LoRA adapter folder peft can load: its config parses and its weights file is whole. Checked before any
    model loads: peft reports a missing or truncated file as a hub 'Repo id' error, after the base has loaded."""
    adapter = Path(adapter)
    config = adapter / "adapter_config.json"
    if not config.is_file():
        raise BudgetReasonerError(f"{adapter}: no adapter_config.json; not a LoRA adapter folder")
    read_json(config)  # one line when it is not valid JSON
    weights = adapter / "adapter_model.safetensors"
    if not weights.is_file():
        if (adapter / "adapter_model.bin").is_file():
            return  # the older torch format: torch.load reports its own damage
        raise BudgetReasonerError(f"{weights}: file not found; the adapter folder is incomplete")
    from safetensors import safe_open

    try:
        with safe_open(str(weights), framework="pt") as handle:
            for key in handle.keys():
                handle.get_slice(key)  # the header names every tensor's byte range: a truncated file fails here
        size, expected = weights.stat().st_size, _safetensors_size(weights)
        if size < expected:
            raise ValueError(f"{size:,} bytes, its header describes {expected:,}")
    except Exception as error:  # safetensors' own error types vary by version
        raise BudgetReasonerError(f"{weights}: not a loadable safetensors file ({str(error).splitlines()[0]}); "
                                  f"the adapter is corrupt or cut short") from None


def _safetensors_size(path: Path) -> int:
    """The bytes a safetensors file must have: 8 + its JSON header + the end of its last tensor."""
    import json
    import struct

    with open(path, "rb") as handle:
        length = struct.unpack("<Q", handle.read(8))[0]
        header = json.loads(handle.read(length))
    ends = [info["data_offsets"][1] for key, info in header.items() if key != "__metadata__"]
    return 8 + length + max(ends, default=0)


def tokenizer_of(model_or_stage: str | Path):
    """The tokenizer of a model or stage folder, loaded alone (seconds) so inputs are checked before the model loads."""
    from budget_reasoner.models import load_tokenizer

    base, adapter = stage_model_paths(Path(model_or_stage))
    if adapter is not None:
        check_adapter(adapter)  # before anything loads (tokenizer_of runs first in every stage)
    try:
        return load_tokenizer(adapter if adapter is not None and (adapter / "tokenizer_config.json").is_file() else base)
    except (OSError, ValueError) as error:
        raise BudgetReasonerError(f"cannot load the tokenizer of {str(model_or_stage)!r}: "
                                  f"{str(error).splitlines()[0] if str(error) else type(error).__name__}") from None


# A stage records its base model so that the run folder can move (another disk, a Drive mounted elsewhere,
# commands run from another directory): a local folder inside the run folder (the folder that holds the
# stage: OUT of a quickstart) is written relative to the stage folder, "../models/student-base"; any other
# local folder as an absolute path (never relative to the working directory, which changes); a hub id as given.

def recorded_base(base: str | Path, stage_dir: Path) -> str:
    """How `stage_dir/stage.json` names its base model (see above)."""
    path = Path(base)
    if not path.exists():
        return str(base)  # a hub id
    path, stage_dir = path.resolve(), Path(stage_dir).resolve()
    if not path.is_relative_to(stage_dir.parent):
        return str(path)
    relative = Path(os.path.relpath(path, stage_dir)).as_posix()
    return relative if relative.startswith("..") else f"./{relative}"


def resolve_recorded_base(value: str, stage_dir: Path) -> str:
    """A recorded base as a name to load: "./" and "../" paths resolve against the stage folder; anything else is
    an absolute path or a hub id (or, in records older than relocatable runs, a path from the working directory)."""
    if not value.startswith(("./", "../")):
        return value
    path = (Path(stage_dir) / value).resolve()
    if not path.exists():
        raise BudgetReasonerError(
            f"{Path(stage_dir) / 'stage.json'}: its base model {value!r} (relative to the stage folder) is not at {path}; "
            f"move a run folder as a whole, or copy the base model back there"
        )
    return str(path)


def stage_model_paths(stage_dir: Path) -> tuple[str, Path]:
    """(base model, adapter folder) of a finished stage; a plain model folder is its own base.

    Local paths come back absolute, so they mean the same from any working directory."""
    stage_dir = Path(stage_dir)
    if (stage_dir / "stage.json").is_file():
        record = read_json(stage_dir / "stage.json")
        return resolve_recorded_base(record["base"], stage_dir), stage_dir / record["adapter"]
    if (stage_dir / "adapter_config.json").is_file():
        return read_json(stage_dir / "adapter_config.json")["base_model_name_or_path"], stage_dir
    return str(stage_dir.resolve()) if stage_dir.exists() else str(stage_dir), None
