"""How far the math grader agrees with reference solutions, and how often it accepts a wrong answer.

    python benchmarks/grader.py [--data data]

Agreement: `check("math", solution, answer)` on every GSM8K test and MATH-500 reference solution.
False accepts: each solution checked against another problem's answer from the same set (a fixed
derangement); pairs whose two answers are the same string are left out, since accepting those is right.
"""

import argparse
import random
import time
from pathlib import Path

from budget_reasoner.eval.benchmarks import load_benchmark
from budget_reasoner.verify import grade


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(Path(__file__).resolve().parents[1] / "data"))
    args = parser.parse_args()
    print(f"{'set':<10}{'rows':>6}{'agree':>9}{'errors':>8}{'shuffled':>10}{'false acc.':>11}{'seconds':>9}")
    for name, file in (("gsm8k", "gsm8k/test.jsonl"), ("math500", "math500/test.jsonl")):
        rows = load_benchmark(name, Path(args.data) / file)
        started = time.time()
        verdicts = [grade("math", row["solution"], row["answer"]) for row in rows]
        disagreements = [row for row, verdict in zip(rows, verdicts) if not verdict.correct]
        shift = random.Random(0).randrange(1, len(rows))
        pairs = [(row, rows[(index + shift) % len(rows)]) for index, row in enumerate(rows)]
        pairs = [(row, other) for row, other in pairs if other["answer"].strip() != row["answer"].strip()]
        false_accepts = [(row, other) for row, other in pairs if grade("math", row["solution"], other["answer"]).correct]
        print(f"{name:<10}{len(rows):>6}{1 - len(disagreements) / len(rows):>9.2%}{sum(v.error is not None for v in verdicts):>8}"
              f"{len(pairs):>10}{len(false_accepts) / len(pairs):>11.2%}{time.time() - started:>9.1f}")
        for row in disagreements[:8]:
            print(f"   disagree: answer {row['answer']!r}  solution ends {row['solution'][-80:]!r}")
        for row, other in false_accepts[:5]:
            print(f"   false accept: {other['answer']!r} for a solution of {row['answer']!r}")


if __name__ == "__main__":
    main()
