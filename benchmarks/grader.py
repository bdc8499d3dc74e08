"""How far the math grader agrees with reference solutions, how often it accepts a wrong answer, and how fast it is.

    python benchmarks/grader.py [--data data]

Agreement: `check("math", solution, answer)` on every GSM8K test and MATH-500 reference solution.
False accepts: each solution checked against another problem's answer from the same set (a fixed
derangement); pairs whose two answers are the same string are left out, since accepting those is right.
Speed: 800 distinct comparisons that only the symbolic worker can decide, each workload from a cold
worker (see `symbolic_workloads`). Worst case: the slowest grade of 50,000-character adversarial completions.
Writes benchmarks/results/<machine>/grader.json (command, commit, machine, numbers).
"""

import argparse
import json
import os
import platform
import random
import resource
import subprocess
import sys
import time
from pathlib import Path

from budget_reasoner.problems import load_benchmark
from budget_reasoner.verify import grade
from budget_reasoner.verify.math import MAX_COMPLETION_CHARS, SYMBOLIC_TIMEOUT_SECONDS, cheap_equal, grade_math, to_number
from budget_reasoner.verify.symbolic import worker

ADVERSARIAL = {  # each at most 50,000 characters, the longest completion graded at all
    "7,000 unclosed \\boxed{": "\\boxed{" * 7_000,
    "24,000-deep braces in a box": "\\boxed{" + "{" * 24_000 + "1" + "}" * 24_000 + "}",
    "3,800 nested \\boxed{\\frac{": "\\boxed{\\frac{" * 3_800 + "1",
    "5,000 equal boxes": "\\boxed{2}" * 5_000,
    "4,000 different boxes": "".join(f"\\boxed{{{i}}}" for i in range(4_000)),
    "a 48 KB boxed sum": "\\boxed{" + "1+" * 24_000 + "1}",
    "49,000 newlines then A:": "\n" * 49_000 + "A:",
    "#### then 49,000 spaces": "#### " + " " * 49_000,
    "The answer is 1,1,1,...": "The answer is " + "1," * 24_000,
    "49,999 digits": "1" * 49_999,
    "5 boxes equal in meaning": "\\boxed{\\sqrt{4}}\\boxed{2}\\boxed{2.0}\\boxed{\\frac{4}{2}}" + " " * 40_000,
}


def agreement(name: str, rows: list[dict]) -> dict:
    started = time.time()
    verdicts = [grade("math", row["solution"], row["answer"]) for row in rows]
    disagreements = [row for row, verdict in zip(rows, verdicts) if not verdict.correct]
    shift = random.Random(0).randrange(1, len(rows))
    pairs = [(row, rows[(index + shift) % len(rows)]) for index, row in enumerate(rows)]
    pairs = [(row, other) for row, other in pairs if other["answer"].strip() != row["answer"].strip()]
    false_accepts = [(row, other) for row, other in pairs if grade("math", row["solution"], other["answer"]).correct]
    result = {"set": name, "solutions": len(rows), "agree": 1 - len(disagreements) / len(rows),
              "reference_errors": sum(v.error is not None for v in verdicts), "shuffled_pairs": len(pairs),
              "false_accepts": len(false_accepts) / len(pairs), "seconds": time.time() - started,
              "disagreements": [{"answer": r["answer"], "solution_ends": r["solution"][-80:]} for r in disagreements[:8]],
              "false_accepted": [{"accepted": o["answer"], "for": r["answer"]} for r, o in false_accepts[:5]]}
    print(f"{name:<10}{len(rows):>6}{result['agree']:>9.2%}{result['reference_errors']:>8}{len(pairs):>10}"
          f"{result['false_accepts']:>11.2%}{result['seconds']:>9.1f}")
    for row in result["disagreements"]:
        print(f"   disagree: answer {row['answer']!r}  solution ends {row['solution_ends']!r}")
    for pair in result["false_accepted"]:
        print(f"   false accept: {pair['accepted']!r} for a solution of {pair['for']!r}")
    return result


def symbolic_workloads(rows: list[dict], count: int = 800) -> dict[str, list[tuple[str, str]]]:
    """Two sets of `count` distinct (prediction, reference) pairs that only the worker decides.

    "answers": as in eval, predictions are answers of the same kind as references: MATH-500's non-numeric
    answers respelled (`\\frac` as `\\dfrac`) and other problems' answers (shifted by 1, 2, ...), each
    string parsed once and then found in the worker's cache. "fresh": every prediction a string never seen
    before (`a+0`, other answers plus a constant), so every comparison parses and simplifies anew."""
    answers = list(dict.fromkeys(r["answer"] for r in rows if to_number(r["answer"]) is None))
    shifted = lambda shift: zip(answers, answers[shift:] + answers[:shift])  # noqa: E731
    plain = [(a.replace("\\frac", "\\dfrac"), a) for a in answers if "\\frac" in a]
    fresh = [(f"{a}+0", a) for a in answers]
    for shift in range(1, 12):
        plain += [(b, a) for a, b in shifted(shift)]
        fresh += [(f"{b}+{shift}", a) for a, b in shifted(shift)]
    distinct = lambda pairs: [(p, a) for p, a in dict.fromkeys(pairs) if cheap_equal(p, a) is None][:count]  # noqa: E731
    workloads = {"answers": distinct(plain), "fresh": distinct(fresh)}
    assert all(len(pairs) == count for pairs in workloads.values())
    assert len({p for p, _ in workloads["fresh"]}) == count
    return workloads


def cpu_seconds() -> float:
    """CPU time of this process and of its reaped children (the worker, once closed): what the work costs
    whatever else the machine runs; on an idle machine the wall time comes close to it (the two alternate)."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime


def math_verify_alone(pairs: list[tuple[str, str]]) -> float:
    """The floor: the same parses (each string once, as the worker caches them) and verifies, no worker."""
    import logging
    from functools import lru_cache

    from math_verify import parse, verify

    logging.getLogger("math_verify").setLevel(logging.CRITICAL)
    parsed = lru_cache(maxsize=None)(lambda text: parse(f"\\boxed{{{text}}}", parsing_timeout=None))
    parsed("\\frac{\\sqrt{2}}{x}")  # the grammar loaded, as the worker does before it says ready
    started, cpu = time.time(), time.process_time()
    for prediction, reference in pairs:
        verify(parsed(reference), parsed(prediction), timeout_seconds=None)
    return time.time() - started, time.process_time() - cpu


def symbolic_speed(rows: list[dict], count: int = 800) -> dict:
    result = {"comparisons": count}
    for name, pairs in symbolic_workloads(rows, count).items():
        grade_math("\\boxed{\\sqrt{8}}", "2\\sqrt{2}")
        worker.close()  # each workload from a cold worker, whose start is timed apart (not a comparison's cost)
        started = time.time()
        grade_math("\\boxed{\\sqrt{8}}", "2\\sqrt{2}")
        result["worker_start_seconds"] = time.time() - started
        started, cpu = time.time(), cpu_seconds()
        verdicts = [grade_math(f"\\boxed{{{prediction}}}", reference) for prediction, reference in pairs]
        seconds = time.time() - started
        worker.close()  # reaped, so its CPU time is counted
        cpu = cpu_seconds() - cpu
        result[name] = {"seconds": seconds, "cpu_seconds": cpu, "ms_each": 1000 * seconds / count,
                        "equal": sum(v.correct for v in verdicts), "errors": sum(v.error is not None for v in verdicts),
                        "references": len({a for _, a in pairs})}
        print(f"{count} symbolic comparisons ({name}): {seconds:.2f} s, {1000 * seconds / count:.1f} ms each "
              f"({cpu:.2f} s of CPU, this process and the worker); {result[name]['equal']} equal")
    seconds, cpu = math_verify_alone(symbolic_workloads(rows, count)["answers"])
    result["answers"] |= {"in_process_seconds": seconds, "in_process_cpu_seconds": cpu}
    print(f"the same {count} (answers) with math-verify called directly in this process: {seconds:.2f} s "
          f"({cpu:.2f} s of CPU): the difference is what the worker's pipes and deadlines add")
    result["load_average"] = os.getloadavg()[0]
    print(f"starting a worker: {result['worker_start_seconds']:.2f} s; load average {result['load_average']:.1f} "
          f"on {os.cpu_count()} cores")
    return result


def adversarial() -> dict:
    grade("math", "\\boxed{2}", "\\sqrt{4}")  # the worker warm, as in eval
    seconds = {}
    for name, completion in ADVERSARIAL.items():
        assert len(completion) <= MAX_COMPLETION_CHARS, name
        started = time.time()
        grade("math", completion, "\\sqrt{4}")
        seconds[name] = time.time() - started
    worst = max(seconds, key=seconds.get)
    started = time.time()
    grade("math", "\\boxed{9^{9^{9^{9}}}}", "\\sqrt{4}")  # sympy never finishes this: it costs the timeout
    pathological = time.time() - started
    print(f"adversarial 50,000-character completions: worst {seconds[worst]:.3f} s ({worst}); "
          f"9^9^9^9 costs {pathological:.2f} s (timeout {SYMBOLIC_TIMEOUT_SECONDS} s)")
    return {"worst_seconds": seconds[worst], "worst_case": worst, "seconds": seconds,
            "pathological_symbolic_seconds": pathological, "symbolic_timeout_seconds": SYMBOLIC_TIMEOUT_SECONDS}


def write_result(name: str, numbers: dict) -> Path:
    """benchmarks/results/<machine>/<name>.json through the shared recorder when there is one."""
    try:
        from record import write_result as shared  # benchmarks/record.py
        return shared(name, numbers)
    except ImportError:
        root = Path(__file__).resolve().parent
        path = root / "results" / f"cpu-{os.cpu_count()}core" / f"{name}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=root).stdout.strip()
        record = {"command": " ".join(["python", *sys.argv]), "commit": head,
                  "machine": {"cpu": platform.processor(), "cores": os.cpu_count(), "python": platform.python_version()},
                  **numbers}
        path.write_text(json.dumps(record, indent=2) + "\n")
        return path


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(Path(__file__).resolve().parents[1] / "data"))
    args = parser.parse_args()
    sets = {name: load_benchmark(name, Path(args.data) / file)
            for name, file in (("gsm8k", "gsm8k/test.jsonl"), ("math500", "math500/test.jsonl"))}
    numbers = {"speed": symbolic_speed(sets["math500"]), "adversarial": adversarial()}
    print(f"{'set':<10}{'rows':>6}{'agree':>9}{'errors':>8}{'shuffled':>10}{'false acc.':>11}{'seconds':>9}")
    numbers["agreement"] = [agreement(name, rows) for name, rows in sets.items()]
    print("wrote", write_result("grader", numbers))


if __name__ == "__main__":
    main()
