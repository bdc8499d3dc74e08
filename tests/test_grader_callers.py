"""The grader works from any caller, each started here as its own process the way a user would start it.

A symbolic comparison (`\\sqrt{12}` = `2\\sqrt{3}`: no string or number rule decides it) must come back
True, fast, with nothing on stderr, and leave no worker process behind. Before the worker was a plain
`python -m` child, a script without a main guard, `python -` and `python -c` got False after a 5 s
wait (the spawned worker re-imported the caller's `__main__` and died, with a traceback).
"""

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Prints one JSON line: what the grader said, how long it took, and the worker's pid (to check it is gone).
GRADE = textwrap.dedent("""\
    import json, time
    from budget_reasoner.verify import check
    from budget_reasoner.verify.symbolic import worker
    started = time.monotonic()
    results = [check("math", "\\\\boxed{\\\\sqrt{12}}", "2\\\\sqrt{3}"), check("math", "\\\\boxed{3\\\\sqrt{2}}", "2\\\\sqrt{3}")]
    print(json.dumps({"results": results, "seconds": time.monotonic() - started, "pid": worker._process.pid}))
""")

THREADS = GRADE.replace("results = [", "results = []\nimport threading\ndef one():\n    results.append([") \
    .replace('"2\\\\sqrt{3}")]\n', '"2\\\\sqrt{3}")])\n'
             'threads = [threading.Thread(target=one) for _ in range(4)]\n'
             '[t.start() for t in threads]; [t.join() for t in threads]\n'
             'results = [all(r[0] for r in results) and len(results) == 4, any(r[1] for r in results)]\n')

POOL = GRADE + textwrap.dedent("""\
    # a fork pool after the parent's worker is warm: each child must start its own, not share the parent's pipes
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor
    def grade(pair):
        return check("math", *pair)
    with ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("fork")) as pool:
        pooled = list(pool.map(grade, [("\\\\boxed{\\\\sqrt{12}}", "2\\\\sqrt{3}"), ("\\\\boxed{\\\\pi}", "2\\\\pi")] * 2))
    assert pooled == [True, False, True, False], pooled
    assert check("math", "\\\\boxed{\\\\sqrt{8}}", "2\\\\sqrt{2}")  # and the parent's worker still answers
""")

DATALOADER = GRADE + textwrap.dedent("""\
    import torch
    from torch.utils.data import DataLoader, Dataset
    class Graded(Dataset):
        def __len__(self):
            return 4
        def __getitem__(self, index):
            return torch.tensor(check("math", f"\\\\boxed{{\\\\sqrt{{{4 * index * index}}}}}", f"{2 * index}\\\\sqrt{{1}}"))
    assert [bool(x) for batch in DataLoader(Graded(), batch_size=1, num_workers=2) for x in batch] == [True] * 4
""")


def run(args, stdin=None, script=None, tmp_path=None):
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    if script is not None:
        path = tmp_path / "plain_script.py"  # no `if __name__ == "__main__":` guard
        path.write_text(script)
        args = [*args, str(path)]
    done = subprocess.run(args, input=stdin, capture_output=True, text=True, timeout=120, cwd=tmp_path, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    return done


def outcome(done) -> dict:
    found = [line for line in done.stdout.splitlines() if line.lstrip().startswith('{"results"')]
    assert found, done.stdout[-2000:]
    return json.loads(found[-1].strip())


def worker_is_gone(pid: int) -> bool:
    for _ in range(50):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.1)
    return False


@pytest.mark.parametrize("kind", ["script", "stdin", "dash_c", "threads", "fork_pool"])
def test_each_caller_kind_grades_symbolically(kind, tmp_path):
    python = [sys.executable]
    if kind == "script":
        done = run(python, script=GRADE, tmp_path=tmp_path)
    elif kind == "stdin":
        done = run([*python, "-"], stdin=GRADE, tmp_path=tmp_path)
    elif kind == "dash_c":
        done = run([*python, "-c", GRADE], tmp_path=tmp_path)
    elif kind == "threads":
        done = run(python, script=THREADS, tmp_path=tmp_path)
    else:
        done = run(python, script=POOL, tmp_path=tmp_path)
    result = outcome(done)
    assert result["results"] == [True, False]
    assert result["seconds"] < 4  # the old failure cost the full 5 s timeout per comparison
    assert done.stderr == ""  # no traceback, no "leaked semaphore" or ResourceWarning at exit
    assert worker_is_gone(result["pid"])


def test_a_notebook_kernel_grades_symbolically(tmp_path):
    pytest.importorskip("IPython")
    done = run([sys.executable, "-m", "IPython", "--quick", "--no-banner", "--colors=NoColor", "-c", GRADE],
               tmp_path=tmp_path)
    result = outcome(done)
    assert result["results"] == [True, False] and result["seconds"] < 4
    assert worker_is_gone(result["pid"])


def test_dataloader_workers_grade_symbolically(tmp_path):
    done = run([sys.executable], script=DATALOADER, tmp_path=tmp_path)
    assert outcome(done)["results"] == [True, False]
    assert done.stderr == ""


def test_the_worker_imports_this_checkout_from_any_directory(tmp_path):
    """A caller in a folder with its own `budget_reasoner/` still gets this package's worker."""
    (tmp_path / "budget_reasoner" / "verify").mkdir(parents=True)
    (tmp_path / "budget_reasoner" / "__init__.py").write_text("raise ImportError('the wrong package')\n")
    code = f"import sys; sys.path.insert(0, {str(ROOT)!r})\n" + GRADE
    assert outcome(run([sys.executable, "-c", code], tmp_path=tmp_path))["results"] == [True, False]
