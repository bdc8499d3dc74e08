"""Teacher generation against a real OpenAI-compatible server on loopback (`transformers serve --continuous-batching`,
sampling/loopback.py): one request in flight at a time (what OpenAITeacher did before) against
`generate.concurrency` requests in flight, on the same prompts, greedy, so both must give the same chains.
Then a resume check: a concurrent `generate` killed (SIGKILL) mid-run and run again must end with every chain
exactly once.

    python benchmarks/generation_server.py [--prompts 128] [--new-tokens 48] [--concurrency 64] [--model FOLDER]

The default model is a random-weight model of the cpu-tiny teacher's shape with the offline tokenizer (random
weights seldom stop early, so every request decodes --new-tokens tokens); --model serves a real folder instead
(e.g. OUT/models/teacher of a quickstart). Writes benchmarks/results/<machine>/generation_server.json.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from budget_reasoner.config import load_preset
from budget_reasoner.domains import math as math_domain
from budget_reasoner.generate.pipeline import write_problems
from budget_reasoner.models import build_scripted_model, build_tiny_model
from budget_reasoner.sampling import chat_prompt
from budget_reasoner.sampling.loopback import serve
from budget_reasoner.sampling.server import ServerSampler
from budget_reasoner.train.pretrain import build_offline_tokenizer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from record import write_result  # noqa: E402  (benchmarks/record.py)

RESUME = {"generate.num_train_problems": 96, "generate.num_eval_problems": 8, "generate.samples_per_problem": 2,
          "generate.shard_size": 8, "generate.max_new_tokens": 16, "generate.temperature": 0.0,
          "generate.concurrency": 16, "pretrain.num_problems": 400}


def random_teacher(folder: Path) -> None:
    """The cpu-tiny teacher's shape, random weights large enough to write varied text."""
    preset = load_preset("cpu-tiny")
    tokenizer = build_offline_tokenizer(preset)
    model = build_tiny_model(tokenizer, preset.model.tiny_teacher, max_positions=512, seed=0)
    torch.manual_seed(0)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0, 0.5)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def throughput(url: str, model: str, prompts: list, new_tokens: int, concurrency: int) -> tuple[dict, list[str]]:
    sampler = ServerSampler(model, url, concurrency=concurrency, max_retries=0)
    started = time.perf_counter()
    samples = sampler.sample(prompts, 1, 0.0, new_tokens, seed=0)
    seconds = time.perf_counter() - started
    tokens = sum(row[0].tokens for row in samples)
    return ({"concurrency": concurrency, "seconds": round(seconds, 3), "chains_per_second": round(len(prompts) / seconds, 2),
             "tokens_per_second": round(tokens / seconds, 1), "completion_tokens": tokens,
             "peak_requests_in_flight": sampler.peak_in_flight}, [row[0].text for row in samples])


def resume_check(root: Path) -> dict:
    """A concurrent generate in a child process, SIGKILLed once its first shard is on disk, then run again."""
    preset = load_preset("cpu-tiny", dict(RESUME))
    problems, _ = write_problems(root / "problems", preset)
    answer = collections.Counter(p["answer"] for p in problems).most_common(1)[0][0]
    tokenizer = build_offline_tokenizer(preset)
    build_scripted_model(tokenizer, f"\\boxed{{{answer}}}").save_pretrained(root / "scripted")
    tokenizer.save_pretrained(root / "scripted")
    out = root / "data"
    with serve(root / "scripted", root / "resume-server.log") as url:
        command = [sys.executable, "-c", "from budget_reasoner.cli import app; app()", "generate", "--teacher",
                   f"openai:{root / 'scripted'}", "--preset", "cpu-tiny", "--out", str(out),
                   *[arg for key, value in RESUME.items() for arg in ("--set", f"{key}={value}")]]
        env = {**os.environ, "BUDGET_REASONER_TEACHER_URL": url, "BUDGET_REASONER_QUIET": "1"}
        child = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        while not (out / "chains" / "shard-00000.jsonl").exists() and child.poll() is None:
            time.sleep(0.01)
        child.send_signal(signal.SIGKILL)
        child.wait()
        kept = {path.name: path.read_bytes() for path in (out / "chains").glob("shard-*.jsonl")}
        rerun = subprocess.run(command, env=env, capture_output=True, text=True)
    chains = [json.loads(line) for path in sorted((out / "chains").glob("shard-*.jsonl"))
              for line in path.read_text().splitlines()]
    counts = collections.Counter((row["id"], row["sample_index"]) for row in chains)
    expected = {(p["id"], k) for p in problems for k in range(preset.generate.samples_per_problem)}
    return {"problems": len(problems), "samples_per_problem": preset.generate.samples_per_problem,
            "shards": -(-len(problems) // preset.generate.shard_size), "shards_on_disk_at_kill": len(kept),
            "rerun_exit_code": rerun.returncode, "chains": len(chains), "lost": len(expected - set(counts)),
            "duplicated": sum(count - 1 for count in counts.values()),
            "shards_from_before_the_kill_unchanged": all((out / "chains" / name).read_bytes() == data
                                                         for name, data in kept.items())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--model", type=Path, help="a model folder to serve (default: a random cpu-tiny teacher)")
    parser.add_argument("--server-threads", type=int, default=1, help="the server's torch threads")
    args = parser.parse_args()
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        folder = args.model or root / "teacher"
        if args.model is None:
            random_teacher(folder)
        problems = math_domain.make_problems(args.prompts, 1234, 2, 3)
        prompts = [chat_prompt(problem.question) for problem in problems]
        with serve(folder, root / "server.log", threads=args.server_threads) as url:
            throughput(url, str(folder), prompts[:2], 4, 1)  # the first request starts the batching worker
            sequential, sequential_texts = throughput(url, str(folder), prompts, args.new_tokens, 1)
            concurrent, concurrent_texts = throughput(url, str(folder), prompts, args.new_tokens, args.concurrency)
        resume = resume_check(root / "resume")
    same = sum(a == b for a, b in zip(sequential_texts, concurrent_texts))
    numbers = {
        "server": "transformers serve --continuous-batching --device cpu (sampling/loopback.py), "
                  f"{args.server_threads} torch thread(s)",
        "model": str(args.model) if args.model else "random cpu-tiny teacher shape (offline tokenizer)",
        "prompts": args.prompts, "new_tokens": args.new_tokens, "temperature": 0.0,
        "sequential": sequential, "concurrent": concurrent,
        "speedup_chains_per_second": round(concurrent["chains_per_second"] / sequential["chains_per_second"], 2),
        "speedup_tokens_per_second": round(concurrent["tokens_per_second"] / sequential["tokens_per_second"], 2),
        "identical_chains": f"{same}/{len(prompts)}",
        "resume": resume,
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "note": "shared 2-core machine: other jobs may have been running (see the load averages)",
    }
    print(json.dumps({key: numbers[key] for key in ("sequential", "concurrent", "speedup_chains_per_second",
                                                    "identical_chains", "resume")}, indent=1))
    print("wrote", write_result("generation_server", numbers))


if __name__ == "__main__":
    main()
