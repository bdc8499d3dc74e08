"""Folders on disk: JSONL rows with line-numbered errors, atomic shards, and completion markers.

A stage is complete when its folder holds `COMPLETE.json`; a stage without it is resumed. Shards are
written to a temporary name and renamed, so an interrupted write never leaves half a shard behind.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable

from budget_reasoner.errors import BudgetReasonerError

COMPLETE = "COMPLETE.json"


def write_jsonl(path: Path, rows: Iterable[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    with temporary.open("w") as handle:
        for row in rows:
            handle.write(json.dumps(row) + "\n")
    os.replace(temporary, path)


def read_jsonl(path: Path, required: Iterable[str] = ()) -> list[dict]:
    """Rows of a JSONL file; a malformed line or a missing column names the file and line."""
    path = Path(path)
    if not path.is_file():
        raise BudgetReasonerError(f"{path}: file not found")
    rows, required = [], list(required)
    with path.open() as handle:
        for line_number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise BudgetReasonerError(f"{path}: line {line_number}: not valid JSON ({error.msg})") from None
            if not isinstance(row, dict):
                raise BudgetReasonerError(f"{path}: line {line_number}: expected a JSON object")
            missing = [column for column in required if column not in row]
            if missing:
                raise BudgetReasonerError(f"{path}: line {line_number}: missing column(s) {', '.join(missing)}")
            rows.append(row)
    return rows


def read_shards(folder: Path, required: Iterable[str] = ()) -> list[dict]:
    return [row for shard in sorted(Path(folder).glob("shard-*.jsonl")) for row in read_jsonl(shard, required)]


def shard_path(folder: Path, index: int) -> Path:
    return Path(folder) / f"shard-{index:05d}.jsonl"


def is_complete(folder: Path) -> bool:
    return (Path(folder) / COMPLETE).is_file()


def finished(folder: Path, stage: str, record: str = "stage.json") -> dict | None:
    """The saved record of a stage that already completed in `folder` (saying it is skipped), else None."""
    if not is_complete(folder):
        return None
    from budget_reasoner.progress import say

    say(f"{stage}: {folder} is complete, skipping")
    return read_json(Path(folder) / record)


def mark_complete(folder: Path, info: dict) -> None:
    write_json(Path(folder) / COMPLETE, info)


def read_json(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise BudgetReasonerError(f"{path}: file not found") from None
    except json.JSONDecodeError as error:
        raise BudgetReasonerError(f"{path}: not valid JSON ({error.msg})") from None


def write_json(path: Path, data: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(temporary, path)
