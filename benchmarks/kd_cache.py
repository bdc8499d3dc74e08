"""The compact top-k cache (issue #14 item 1): bytes per cached token, and distill's peak host RAM at 1x and 10x the
offline cache.

The offline world's data, without the 10-minute quickstart: cpu-tiny's tokenizer, a random teacher and student of
its shapes (RAM and bytes depend on shapes and lengths, not on what the weights learned), and one worked chain per
problem for `generate.num_train_problems` multi-step problems (1x), then ten times as many (10x). Each cache is written
by the real `cache_teacher_topk`; each distill runs in its own process for the same steps and batch (enough for one
pass over the 10x cache), and reports its own high-water RSS (VmHWM).

    python benchmarks/kd_cache.py [--shared-cpu] [--scale 10] [--batch 64]
writes benchmarks/results/<machine>/kd_cache.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def offline_sft_rows(count: int, seed: int, preset) -> list[dict]:
    from budget_reasoner.domains import math as math_domain
    from budget_reasoner.sampling import chat_prompt

    problems = math_domain.make_problems(count, seed, preset.generate.min_steps, preset.generate.max_steps)
    return [{"prompt": chat_prompt(p.question), "completion": [{"role": "assistant",
             "content": math_domain.format_chain(p.steps, p.answer)}]} for p in problems]


def build_world(folder: Path, preset, scale: int) -> dict:
    """Teacher, student stage (an SFT adapter of one step), and the 1x and `scale`x SFT files and caches."""
    from budget_reasoner.hardware import detect
    from budget_reasoner.io import write_jsonl
    from budget_reasoner.models import build_tiny_model
    from budget_reasoner.train.distill import cache_teacher_topk
    from budget_reasoner.train.pretrain import build_offline_tokenizer
    from budget_reasoner.train.sft import sft

    tokenizer = build_offline_tokenizer(preset)
    for name, shape in (("teacher", preset.model.tiny_teacher), ("student", preset.model.tiny_student)):
        build_tiny_model(tokenizer, shape, preset.model.max_length, seed=0).save_pretrained(folder / name)
        tokenizer.save_pretrained(folder / name)
    base = preset.generate.num_train_problems
    caches = {}
    for factor in (1, scale):
        rows = offline_sft_rows(base * factor, seed=factor, preset=preset)
        write_jsonl(folder / f"sft-{factor}x.jsonl", rows)
        started = time.time()
        info = cache_teacher_topk(folder / "teacher", folder / f"sft-{factor}x.jsonl", folder / f"cache-{factor}x",
                                  preset, detect("cpu"))
        caches[factor] = {key: info[key] for key in ("examples", "tokens", "cached_positions", "bytes",
                                                     "bytes_per_token", "top_k")} | {"seconds": time.time() - started}
    one_step = __import__("copy").deepcopy(preset)
    one_step.sft.max_steps, one_step.sft.save_steps = 1, 1
    sft(folder / "sft-1x.jsonl", folder / "student", folder / "student-sft", one_step, detect("cpu"))
    return caches


def distill_in_child(cache: Path, student: Path, out: Path, steps: int, batch: int) -> dict:
    """Run distill in a fresh process; its VmHWM is then distill's alone."""
    command = [sys.executable, __file__, "--child", str(cache), str(student), str(out), str(steps), str(batch)]
    result = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "BUDGET_REASONER_QUIET": "1"})
    if result.returncode != 0:
        raise SystemExit(result.stderr[-3000:])
    return json.loads(result.stdout.strip().splitlines()[-1])


def child(cache: str, student: str, out: str, steps: str, batch: str) -> None:
    from budget_reasoner.config import load_preset
    from budget_reasoner.hardware import detect
    from budget_reasoner.train.distill import distill

    preset = load_preset("cpu-tiny")
    preset.distill.max_steps, preset.distill.batch_size, preset.distill.save_steps = int(steps), int(batch), int(steps)
    started = time.time()
    distill(Path(cache), Path(student), Path(out), preset, detect("cpu"))
    status = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in Path("/proc/self/status").read_text().splitlines()
              if line.split(":")[0] in ("VmHWM", "RssAnon", "RssFile")}
    print(json.dumps({"peak_rss_bytes": status["VmHWM"], "rss_anon_end_bytes": status["RssAnon"],
                      "rss_file_end_bytes": status["RssFile"], "seconds": time.time() - started}))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--scale", type=int, default=10)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--shared-cpu", action="store_true", help="another process used the CPUs during the run")
    args = parser.parse_args()
    from benchmarks.record import write_result
    from budget_reasoner.config import load_preset

    preset = load_preset("cpu-tiny")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        caches = build_world(folder, preset, args.scale)
        steps = -(-caches[args.scale]["examples"] // args.batch)  # one pass over the large cache
        runs = {factor: distill_in_child(folder / f"cache-{factor}x", folder / "student-sft", folder / f"distill-{factor}x",
                                         steps, args.batch) for factor in caches}
    k = preset.distill.top_k
    small, large = runs[1]["peak_rss_bytes"], runs[args.scale]["peak_rss_bytes"]
    numbers = {
        "cpu_shared_with_another_process": args.shared_cpu,
        "top_k": k,
        "bytes_per_token_target": k * 6 * 1.05,
        "bytes_per_token": caches[1]["bytes_per_token"],
        "bytes_per_token_note": "shard bytes (ids, offsets, headers included) / cached (completion) positions",
        "caches": {f"{factor}x": caches[factor] for factor in caches},
        "distill": {f"{factor}x": runs[factor] for factor in runs},
        "distill_steps": steps, "distill_batch": args.batch,
        "peak_rss_ratio_large_over_small": large / small,
    }
    path = write_result("kd_cache", numbers)
    print(json.dumps(numbers, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(*sys.argv[2:7])
    else:
        main()
