"""The code sandbox: what each attack of issue #16's list gets and how long it takes to stop, and how fast the code
verifier grades the shipped MBPP and HumanEval samples.

    python benchmarks/sandbox.py [--repeats 3]

Attacks run one at a time (timeout 3 s, memory 512 MB, output cap 1 MB); each line is the verdict and the wall
seconds from start to verdict, min/median/max over the repeats. Grading: every canonical solution of
data/mbpp/sample.jsonl and data/humaneval/sample.jsonl, then a None-returning stub of each, through
`verify.code.grade_many` with 1 worker and with the CPU count, in programs per second.
Writes benchmarks/results/<machine>/sandbox.json (command, commit, machine, numbers).
"""

import argparse
import json
import os
import re
import secrets
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from record import write_result  # noqa: E402  (benchmarks/record.py)

from budget_reasoner.verify.code import grade_many, humaneval_reference, mbpp_reference  # noqa: E402
from budget_reasoner.verify.sandbox import isolation, run_python  # noqa: E402

DATA = Path(__file__).resolve().parents[1] / "data"
OUTSIDE = Path(tempfile.gettempdir()) / f"outside-{secrets.token_hex(6)}"
ATTACKS = {
    "loops forever": "while True:\n    pass\n",
    "allocates 10 GB": "block = bytearray(10 * 2**30)\n",
    "forks repeatedly": "import os\nwhile True:\n    os.fork()\n",
    "opens a socket": "import socket\nsocket.create_connection(('1.1.1.1', 80), timeout=1)\n",
    "writes outside its directory": f"open({str(OUTSIDE)!r}, 'w').write('escaped')\n",
    "reads environment variables": "import os\nassert 'BENCH_SECRET' not in os.environ, 'saw the secret'\n"
                                   "open(f'/proc/{os.getppid()}/environ').read()\n",
    "prints 100 MB": "print('x' * 100_000_000)\n",
    "calls os._exit(0) before the tests": "import os\nos._exit(0)\nassert False\n",
    "signals its parent": "import os, signal\nos.kill(os.getppid(), signal.SIGKILL)\n",
}


def attacks(repeats: int) -> dict:
    os.environ["BENCH_SECRET"] = secrets.token_hex(8)
    rows = {}
    for name, code in ATTACKS.items():
        results = [run_python(code, timeout_s=3, memory_mb=512, output_bytes=1 << 20) for _ in range(repeats)]
        seconds = [result.seconds for result in results]
        rows[name] = {"verdicts": sorted({result.verdict for result in results}),
                      "passed": any(result.passed for result in results),
                      "seconds_min": round(min(seconds), 3), "seconds_median": round(statistics.median(seconds), 3),
                      "seconds_max": round(max(seconds), 3)}
        print(f"{name:38s} {rows[name]['verdicts'][0][:70]:70s} {rows[name]['seconds_median']:.3f} s")
    rows["writes outside its directory"]["file_exists_after"] = OUTSIDE.exists()
    return rows


def grading(workers: int) -> dict:
    mbpp = [json.loads(line) for line in (DATA / "mbpp" / "sample.jsonl").read_text().splitlines()]
    humaneval = [json.loads(line) for line in (DATA / "humaneval" / "sample.jsonl").read_text().splitlines()]
    fence = "```python\n{}\n```"
    right = [fence.format(r["code"]) for r in mbpp] + [fence.format(r["prompt"] + r["canonical_solution"]) for r in humaneval]
    names = [re.search(r"assert\s*\(?\s*(?:set\(|math\.isclose\()?\s*(\w+)\(", r["test_list"][0]).group(1) for r in mbpp]
    stubs = [fence.format(f"def {name}(*a, **k):\n    return None") for name in names] + \
            [fence.format(f"def {r['entry_point']}(*a, **k):\n    return None") for r in humaneval]
    references = [mbpp_reference(r) for r in mbpp] + [humaneval_reference(r) for r in humaneval]
    started = time.monotonic()
    verdicts = grade_many(right + stubs, references + references, workers=workers)
    seconds = time.monotonic() - started
    half = len(right)
    return {"workers": workers, "programs": len(verdicts), "canonical_passed": sum(v.correct for v in verdicts[:half]),
            "canonical": half, "stubs_passed": sum(v.correct for v in verdicts[half:]),
            "seconds": round(seconds, 2), "programs_per_second": round(len(verdicts) / seconds, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    layers = isolation()
    print("layers:", ", ".join(layers))
    numbers = {"cpu_shared_with_another_process": True, "running_as_root": os.geteuid() == 0, "layers": list(layers),
               "repeats": args.repeats, "limits": {"timeout_s": 3, "memory_mb": 512, "output_bytes": 1 << 20},
               "attacks": attacks(args.repeats),
               "grading": [grading(1), grading(os.cpu_count() or 1)]}
    for row in numbers["grading"]:
        print(f"grading, {row['workers']} worker(s): {row['canonical_passed']}/{row['canonical']} canonical pass, "
              f"{row['stubs_passed']} stubs pass, {row['programs_per_second']} programs/s")
    print("wrote", write_result("sandbox", numbers))


if __name__ == "__main__":
    main()
