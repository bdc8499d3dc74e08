"""Measure the whole offline recipe: wall time of `quickstart --domain math` and held-out accuracy per stage.

    python benchmarks/quickstart.py [--out runs/bench-quickstart] [--preset cpu-tiny]

Run on an idle machine (2 torch threads collapse when another process shares the cores).
"""

import argparse
import json
import shutil
import time
from pathlib import Path

from budget_reasoner.config import load_preset
from budget_reasoner.progress import quiet_libraries
from budget_reasoner.recipe import quickstart


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/bench-quickstart")
    parser.add_argument("--preset", default="cpu-tiny")
    args = parser.parse_args()
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)  # a fresh run, or the timing would only measure skipped stages
    quiet_libraries()
    started = time.time()
    results = quickstart(out, load_preset(args.preset))
    wall = time.time() - started
    print(f"\nquickstart --domain math, preset {args.preset}: {wall / 60:.1f} min wall ({results['seconds'] / 60:.1f} min in stages)")
    print(f"{'model':<10}{'accuracy':>10}{'maj@k':>10}")
    for name in ("base", "sft", "dpo", "distill"):
        stage = results["stages"][name]
        majority = next((v for k, v in stage.items() if k.startswith("maj@")), None)
        print(f"{name:<10}{stage['accuracy']:>10.3f}{majority if majority is None else f'{majority:.3f}':>10}")
    print(f"{'teacher':<10}{results['teacher']['accuracy']:>10.3f}")
    generated = results["generate"]
    print(f"chains verified {generated['verified_chains']}/{generated['chains']}, sft examples {generated['sft_examples']}, pairs {generated['pairs']}")
    (out / "benchmark.json").write_text(json.dumps({"wall_seconds": wall, **results}, indent=2))


if __name__ == "__main__":
    main()
