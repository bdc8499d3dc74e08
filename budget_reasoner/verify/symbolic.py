"""The parent's side of the math-verify worker: one warm child process, a deadline on every answer.

Why a child started as `python -m budget_reasoner.verify._worker` rather than a multiprocessing pool:
a spawned pool re-imports the caller's `__main__`, which kills it when the caller is a script without a
main guard, `python -`, or a notebook; a forked one inherits whatever threads and locks the caller holds.
A plain child over pipes depends on nothing of the caller's but `sys.executable`. It is started on first
use (so importing the grader costs nothing), killed when an answer misses its deadline (a pathological
expression costs its timeout, never a hang), started again on next use, and shut down at exit. One lock
makes it safe from any thread; a forked child of the caller (a DataLoader worker, a fork pool) forgets
its parent's worker and starts its own.
"""

from __future__ import annotations

import atexit
import json
import os
import select
import subprocess
import sys
import threading
import time
from pathlib import Path

from budget_reasoner.errors import BudgetReasonerError

STARTUP_TIMEOUT_SECONDS = 60.0  # importing sympy on a loaded machine; not charged to any comparison
_PACKAGE_ROOT = str(Path(__file__).resolve().parents[2])  # the folder that holds `budget_reasoner/`


class SymbolicTimeout(Exception):
    """An answer missed its deadline; `stage` says whether the reference ("gold") or the prediction did."""

    def __init__(self, stage: str):
        super().__init__(stage)
        self.stage = stage


class SymbolicWorker:
    def __init__(self):
        self._lock = threading.Lock()
        self._process: subprocess.Popen | None = None
        self._buffer = b""
        # Per thread, the time spent waiting for the lock (another thread's comparison) or starting a worker:
        # neither is this thread's answers' fault, so `Deadline`s do not count it.
        self._uncharged = threading.local()

    def compare(self, gold: str, pred: str | None, deadline: float) -> tuple[str, bool | None]:
        """(reference kind, equal): kind is "math", "text" or "invalid"; equal is None without `pred`.

        Raises SymbolicTimeout past `deadline` (a `time.monotonic()` value), after killing the worker."""
        waiting = time.monotonic()
        with self._lock:
            for _ in range(2):  # a worker that died between calls is replaced once
                process = self._ensure_started()
                uncharged = time.monotonic() - waiting
                deadline += uncharged
                self._uncharged.seconds = self.uncharged_seconds() + uncharged
                waiting = time.monotonic()
                try:
                    process.stdin.write((json.dumps({"gold": gold, "pred": pred}) + "\n").encode())
                    process.stdin.flush()
                    break
                except BrokenPipeError:
                    self._stop()
            else:
                raise BudgetReasonerError("the math-verify worker keeps exiting as soon as it starts")
            try:
                kind = self._reply(deadline, "gold")["gold"]
            except EOFError:  # the reference crashed the parser (a C stack overflow, say)
                self._stop()
                return "invalid", None
            if pred is None or kind == "invalid":
                return kind, None
            try:
                return kind, self._reply(deadline, "pred")["equal"]
            except EOFError:  # so did the prediction: not equal
                self._stop()
                return kind, False

    def uncharged_seconds(self) -> float:
        """This thread's total of lock waits and worker starts so far."""
        return getattr(self._uncharged, "seconds", 0.0)

    def _ensure_started(self) -> subprocess.Popen:
        if self._process is not None and self._process.poll() is None:
            return self._process
        self._stop()
        # Our package first on the path, so the child imports the same budget_reasoner as this process from
        # any working directory; PYTHONINSPECT would leave it at a prompt after main() returns.
        env = {key: value for key, value in os.environ.items() if key != "PYTHONINSPECT"}
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [_PACKAGE_ROOT, os.environ.get("PYTHONPATH")]))
        self._process = subprocess.Popen(
            [sys.executable, "-m", "budget_reasoner.verify._worker"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL, cwd=_PACKAGE_ROOT, env=env)
        self._buffer = b""
        try:
            ready = self._reply(time.monotonic() + STARTUP_TIMEOUT_SECONDS, "startup")
        except (SymbolicTimeout, EOFError):
            self._stop()
            raise BudgetReasonerError(f"the math-verify worker ({sys.executable} -m budget_reasoner.verify._worker) "
                                      f"did not start within {STARTUP_TIMEOUT_SECONDS:.0f} s") from None
        if "fatal" in ready:
            self._stop()
            raise BudgetReasonerError(f"the math-verify worker cannot run: {ready['fatal']}")
        return self._process

    def _reply(self, deadline: float, stage: str) -> dict:
        """The worker's next line, read without blocking past `deadline`."""
        fd = self._process.stdout.fileno()
        while b"\n" not in self._buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([fd], [], [], remaining)[0]:
                self._stop()
                raise SymbolicTimeout(stage)
            chunk = os.read(fd, 65536)
            if not chunk:
                raise EOFError
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        return json.loads(line)

    def _stop(self) -> None:
        process, self._process, self._buffer = self._process, None, b""
        if process is None:
            return
        if process.poll() is None:
            process.kill()
        process.wait()
        for pipe in (process.stdin, process.stdout):
            try:
                pipe.close()
            except OSError:
                pass  # a broken pipe has nothing left to flush

    def close(self) -> None:
        """Shut the worker down (at exit): closing its stdin ends it; kill it if it is mid-comparison."""
        with self._lock:
            process, self._process = self._process, None
            if process is None:
                return
            try:
                process.stdin.close()
                process.wait(timeout=2)
            except (OSError, subprocess.TimeoutExpired):
                process.kill()
                process.wait()
            process.stdout.close()

    def _forget_after_fork(self) -> None:
        """In a forked child: the worker (and maybe a held lock) belong to the parent; drop our copies."""
        self._lock = threading.Lock()
        process, self._process, self._buffer = self._process, None, b""
        if process is not None:
            for pipe in (process.stdin, process.stdout):
                try:
                    pipe.close()
                except OSError:
                    pass
            process.returncode = 0  # never wait for or kill the parent's child from here


class Deadline:
    """A time limit shared by one thread's comparisons (one grade), which waiting for another thread's
    comparison or for a worker to start does not use up."""

    def __init__(self, seconds: float):
        self._end, self._uncharged = time.monotonic() + seconds, worker.uncharged_seconds()

    def at(self) -> float:
        """The limit as a `time.monotonic()` value, pushed back by this thread's waits since it was set."""
        return self._end + worker.uncharged_seconds() - self._uncharged


worker = SymbolicWorker()
atexit.register(worker.close)
os.register_at_fork(after_in_child=worker._forget_after_fork)
