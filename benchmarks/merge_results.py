"""Merge the JSON files the GPU checks wrote into one: benchmarks/results/<machine>/<commit>.json.

    python benchmarks/merge_results.py memory_nf4_bf16 memory_generate fused_precision fused_loss_gpu attention \
        [--exit-codes OUT/exit_codes.txt] [--prefix dryrun_]

Each named result (benchmarks/results/<machine>/<prefix><name>.json, as record.write_result saved it) goes in under
its name, with its own command, commit and date; a name with no file is listed under "missing" with the exit code
of the step that should have written it (124: cut off by its time limit).
"""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from record import RESULTS, commit, machine_name, write_result  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="+")
    parser.add_argument("--exit-codes", type=Path, help="lines of 'NAME CODE' (gpu_checks.sh writes them)")
    parser.add_argument("--prefix", default="", help="read <prefix><name>.json and write <prefix><commit>.json")
    args = parser.parse_args()
    folder = RESULTS / machine_name()
    codes = {}
    if args.exit_codes and args.exit_codes.is_file():
        codes = dict(line.split() for line in args.exit_codes.read_text().splitlines() if line.strip())
    steps, missing = {}, {}
    for name in args.names:
        path = folder / f"{args.prefix}{name}.json"
        if path.is_file():
            steps[name] = json.loads(path.read_text())
        else:
            missing[name] = {"exit_code": codes.get(name), "file": str(path)}
    path = write_result(f"{args.prefix}{commit()}", {"steps": steps, "missing": missing, "exit_codes": codes})
    print(f"wrote {path}: {len(steps)} results, missing {sorted(missing) or 'none'}")
    return 1 if missing else 0


if __name__ == "__main__":
    sys.exit(main())
