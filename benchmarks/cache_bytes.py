"""Bytes per cached position of the top-k cache at several k, on a finished cpu-tiny quickstart's verified chains.

    python benchmarks/cache_bytes.py --run /tmp/planner-run --out /tmp/cache-bytes --top-k 8 20 --write cache_bytes

Each cache is written by the real `cache_teacher_topk` with the run's own teacher; the target is k x 6 bytes + 5%.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from record import write_result  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, required=True, help="a finished cpu-tiny quickstart folder")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--top-k", type=int, nargs="+", default=[8, 20])
    parser.add_argument("--write", metavar="NAME")
    args = parser.parse_args()

    from budget_reasoner.config import load_preset
    from budget_reasoner.train.distill import cache_teacher_topk

    caches = {}
    for k in args.top_k:
        info = cache_teacher_topk(args.run / "models" / "teacher", args.run / "data" / "sft" / "train.jsonl",
                                  args.out / f"k{k}", load_preset("cpu-tiny", {"distill.top_k": k}))
        caches[k] = {"examples": info["examples"], "tokens": info["tokens"], "cached_positions": info["cached_positions"],
                     "bytes": info["bytes"], "bytes_per_token": info["bytes_per_token"],
                     "target_bytes_per_token": k * 6 * 1.05, "within_target": info["bytes_per_token"] <= k * 6 * 1.05}
        print(k, caches[k], flush=True)
    if args.write:
        print("wrote", write_result(args.write, {"run": str(args.run), "caches": caches,
                                                 "note": "bytes: shard files (top-k ids and log-probs, the sequences' own "
                                                         "token ids, offsets, headers) / cached positions"}))


if __name__ == "__main__":
    main()
