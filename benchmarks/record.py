"""Benchmarks write what they measured as data: benchmarks/results/<machine>/<name>.json, with the command that
made it, the commit it ran at and the machine it ran on. The README's tables are made from these files."""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def commit() -> str:
    """HEAD, with "+dirty" when tracked files differ from it (the numbers then describe uncommitted code)."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], capture_output=True, text=True, cwd=RESULTS.parent).stdout.strip()

    head = git("rev-parse", "--short", "HEAD") or "unknown"
    return head + ("+dirty" if git("status", "--porcelain", "--untracked-files=no") else "")


def machine() -> dict:
    import torch

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else platform.processor()
    info = {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def machine_name() -> str:
    import torch

    return torch.cuda.get_device_name(0).replace(" ", "-") if torch.cuda.is_available() else f"cpu-{os.cpu_count()}core"


def write_result(name: str, numbers: dict) -> Path:
    """Save `numbers` with their provenance; returns the file written."""
    path = RESULTS / machine_name() / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {"command": " ".join([Path(sys.executable).name, *sys.argv]), "commit": commit(), "machine": machine(),
              "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), **numbers}
    path.write_text(json.dumps(record, indent=2) + "\n")
    return path


def seeded_parser(description: str, run: bool = False) -> argparse.ArgumentParser:
    """The options the offline benchmarks share: --out, --seeds, --set (preset overrides) and --write, and with `run`
    --run, the finished cpu-tiny quickstart folder they start from."""
    parser = argparse.ArgumentParser(description=description)
    if run:
        parser.add_argument("--run", type=Path, required=True, help="a finished cpu-tiny quickstart folder")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--set", dest="overrides", nargs="*", default=[], help="preset overrides, key=value")
    parser.add_argument("--write", metavar="NAME")
    return parser
