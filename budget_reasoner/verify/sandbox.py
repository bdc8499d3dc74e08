"""Run untrusted Python (a model's code) in a separate, locked-in process and say how it ended.

    result = run_python("def f(x):\\n    return x + 1\\nassert f(1) == 2\\n", timeout_s=5)
    result.passed, result.verdict, result.seconds      # True, "passed", 0.05

The parent never imports the program: it writes it into a fresh temporary directory and starts
`python -I -S` on `_sandbox_child.py` there, with an almost empty environment (no variable of the caller's,
so no token or key), stdin on /dev/null, its own session (process group), and its output on a pipe. The child
locks itself in before the program runs (see `_sandbox_child.py`): network and mount namespaces where the
kernel allows, every mount read-only but its directory, rlimits (CPU, address space, file size, open files,
processes), as root a uid of its own, and a seccomp filter that refuses forks, threads, sockets, mounts and
signals to other processes. The parent enforces the wall clock (the whole process group is killed at the
deadline) and the output cap (a flood is killed the moment it passes `output_bytes`), and deletes the
directory afterwards.

A run passes only when the program ran to its end: the child then writes a random sentinel on a separate pipe
and exits 0. `os._exit(0)` or `sys.exit(0)` before the asserts therefore fails. Verdicts, one line each:
"passed", "timeout", "memory", "output too large", "cpu time limit", "file size limit", "error: <exception>
(line N: <source>)", "exit(0) before the end", "exited with status N before the end", "killed by SIGNAME",
and "sandbox error: ..." when the sandbox itself could not be set up (the caller's problem, not the program's).

What it is not: a security boundary like a VM or gVisor. It shares the host kernel; a kernel bug, or a
layer the host does not allow (no namespaces in an unprivileged container: then files the caller's uid can
write are writable), leaves less in the way. `SandboxResult.isolation` lists the layers that held.
"""

from __future__ import annotations

import json
import os
import secrets
import selectors
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from budget_reasoner.errors import BudgetReasonerError

CHILD = str(Path(__file__).with_name("_sandbox_child.py"))
TIMEOUT_S = 10.0
MEMORY_MB = 1024
OUTPUT_BYTES = 1 << 20
FILE_BYTES = 16 << 20  # the largest file the program may write in its directory
DISK_BYTES = 64 << 20  # all its files together (its directory is a tmpfs of this size where mounts are allowed)
OPEN_FILES = 64
STATUS_BYTES = 64 << 10  # the child's status lines; more is the program writing on the status pipe
# Layers to leave out ("namespaces", "mount_setattr", "uid", "seccomp", "socket_patch"): the tests of each layer
# alone and of the fallbacks a host without them gets. Never set outside tests.
DISABLE: tuple[str, ...] = ()
_SIGNALS = {signal.SIGXCPU: "cpu time limit", signal.SIGXFSZ: "file size limit"}


@dataclass(frozen=True)
class SandboxResult:
    passed: bool
    verdict: str  # "passed", "timeout", "memory", "output too large", "error: ...", ... (module docstring)
    seconds: float  # wall clock from start to verdict
    output: str = ""  # the first `output_bytes` of stdout and stderr, interleaved as written
    isolation: tuple[str, ...] = ()  # the layers the child reported holding

    @property
    def sandbox_error(self) -> bool:
        """The sandbox could not run the program at all: a fault of the grader, not of the program."""
        return self.verdict.startswith("sandbox error")


def _environment(workdir: str) -> dict:
    """What the program sees of the world: a PATH and its own directory as home. Nothing of the caller's."""
    return {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": workdir, "TMPDIR": workdir, "LANG": "C.UTF-8"}


def run_python(code: str, timeout_s: float = TIMEOUT_S, memory_mb: int = MEMORY_MB,
               output_bytes: int = OUTPUT_BYTES) -> SandboxResult:
    """Run `code` as `__main__` in the sandbox; `passed` when it ran to its end within every limit."""
    if not isinstance(code, str):
        raise BudgetReasonerError(f"the sandbox runs Python source text, not {type(code).__name__}")
    started = time.monotonic()
    workdir = tempfile.mkdtemp(prefix="budget-reasoner-sandbox-")
    status_read, status_write = os.pipe()
    sentinel = secrets.token_hex(16)
    limits = {"cpu_s": max(1, int(timeout_s + 0.999)) + 1, "memory_bytes": int(memory_mb) << 20,
              "file_bytes": FILE_BYTES, "disk_bytes": DISK_BYTES, "open_files": OPEN_FILES}
    try:
        job = {"code": code, "sentinel": sentinel, "status_fd": status_write, "limits": limits, "disable": list(DISABLE)}
        descriptor = os.open(os.path.join(workdir, "job.json"), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "w") as handle:
            json.dump(job, handle)
        try:
            process = subprocess.Popen([sys.executable, "-I", "-S", "-B", "-X", "utf8", CHILD], cwd=workdir,
                                       env=_environment(workdir), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                       stderr=subprocess.STDOUT, pass_fds=(status_write,), start_new_session=True)
        finally:
            os.close(status_write)
        with process:
            output, status, ending = _collect(process, status_read, started + timeout_s, output_bytes)
    finally:
        os.close(status_read)
        _remove(workdir)
    return _result(process.returncode, output, status, ending, sentinel, time.monotonic() - started)


def run_many(codes: Sequence[str], timeout_s: float = TIMEOUT_S, memory_mb: int = MEMORY_MB,
             output_bytes: int = OUTPUT_BYTES, workers: int | None = None) -> list[SandboxResult]:
    """`run_python` over many programs, `workers` at a time (default: the CPU count), results in input order.

    Threads, each waiting on its own child process: the work happens in the children."""
    workers = workers or os.cpu_count() or 1
    if len(codes) <= 1 or workers == 1:
        return [run_python(code, timeout_s, memory_mb, output_bytes) for code in codes]
    with ThreadPoolExecutor(max_workers=min(workers, len(codes))) as pool:
        return list(pool.map(lambda code: run_python(code, timeout_s, memory_mb, output_bytes), codes))


def isolation() -> tuple[str, ...]:
    """The layers the sandbox gets on this machine (runs an empty program)."""
    result = run_python("pass", timeout_s=30)
    if result.sandbox_error:
        raise BudgetReasonerError(f"the code sandbox does not start here: {result.verdict}")
    return result.isolation


def _collect(process: subprocess.Popen, status_fd: int, deadline: float, output_bytes: int):
    """Read output and status until both close and the child exits, or until the deadline or the output cap:
    then the whole process group is killed. Returns (output, status, ending) with ending None, "timeout" or
    "output too large"."""
    output, status = bytearray(), bytearray()
    ending = None
    with selectors.DefaultSelector() as selector:
        selector.register(process.stdout.fileno(), selectors.EVENT_READ, output)
        selector.register(status_fd, selectors.EVENT_READ, status)
        while selector.get_map():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                ending = "timeout"
                break
            for key, _ in selector.select(remaining):
                chunk = os.read(key.fd, 1 << 16)
                if not chunk:
                    selector.unregister(key.fd)
                    continue
                key.data.extend(chunk)
            if len(output) > output_bytes or len(status) > STATUS_BYTES:
                ending = "output too large"
                break
    if ending is None:
        try:
            process.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:  # closed its pipes, then kept running
            ending = "timeout"
    if ending is not None:
        _kill(process)
    return bytes(output[:output_bytes]), bytes(status), ending


def _kill(process: subprocess.Popen) -> None:
    try:
        os.killpg(process.pid, signal.SIGKILL)  # its own session: the group is the child and anything it began
    except ProcessLookupError:
        pass
    process.wait()


def _remove(workdir: str) -> None:
    """Delete the directory even where the program took the write bit off a folder of its own."""
    def unlock(function, path, _):
        parent = os.path.dirname(path)
        os.chmod(parent, os.stat(parent).st_mode | stat.S_IRWXU)
        if os.path.isdir(path) and not os.path.islink(path):
            os.chmod(path, stat.S_IRWXU)
            shutil.rmtree(path, ignore_errors=True)
        else:
            os.unlink(path)

    shutil.rmtree(workdir, onerror=unlock)


def _status_lines(status: bytes) -> dict:
    """The child's status lines merged into one dict (the last of each key wins); junk lines are ignored."""
    merged = {}
    for line in status.decode("utf-8", "replace").splitlines():
        try:
            message = json.loads(line)
        except ValueError:
            continue
        if isinstance(message, dict):
            merged.update(message)
    return merged


def _result(returncode: int, output: bytes, status: bytes, ending: str | None, sentinel: str,
            seconds: float) -> SandboxResult:
    messages = _status_lines(status)
    layers = tuple(str(layer) for layer in messages.get("ready", ()) if isinstance(layer, str))
    text = output.decode("utf-8", "replace")

    def result(verdict: str, passed: bool = False) -> SandboxResult:
        return SandboxResult(passed, verdict, seconds, text, layers)

    if "setup_failed" in messages and "ready" not in messages:
        return result(f"sandbox error: {messages['setup_failed']}")
    if ending is not None:
        return result(ending)
    if "ready" not in messages and returncode != 0:
        return result(f"sandbox error: the child exited with status {returncode} before running the program: "
                      f"{text.strip().splitlines()[-1] if text.strip() else 'no output'}")
    if messages.get("finished") == sentinel and returncode == 0:
        return result("passed", True)
    if returncode is not None and returncode < 0:
        number = -returncode
        try:
            name = signal.Signals(number).name
        except ValueError:
            name = f"signal {number}"
        return result(_SIGNALS.get(number, f"killed by {name}"))
    error = messages.get("error")
    if isinstance(error, str):
        return result("memory" if error.startswith("MemoryError") else f"error: {error}")
    if isinstance(messages.get("exit"), str):
        return result(messages["exit"])
    return result(f"exited with status {returncode} before the end")
