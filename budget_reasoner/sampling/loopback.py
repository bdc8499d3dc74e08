"""A real OpenAI-compatible server on this machine: `transformers serve` with continuous batching, on a free
loopback port, serving a local model folder. For trying the server path offline (the tiny teacher behind
`--teacher openai:FOLDER`), for the tests that need a real server and for benchmarks/generation_server.py.

Needs the `transformers[serving]` extra (fastapi, uvicorn, openai: `pip install -e '.[dev]'` brings it).

Without `--continuous-batching`, `transformers serve` runs one `generate()` at a time on one thread, so requests
in flight only queue. With it, the first request's generation settings (temperature, top-p) are the server's for
its whole life (transformers 5.24, serving/utils.py `CBGenerateManager.init_cb`): send one temperature per server.
Its KV cache is sized here (`cache_blocks`, `max_batch_tokens`) because left to itself it sizes the cache from the
machine's free memory, which on a CPU is most of the RAM and takes tens of seconds to allocate.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from budget_reasoner.errors import BudgetReasonerError


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextlib.contextmanager
def serve(model_folder: str | Path, log: str | Path, start_timeout: float = 90, threads: int = 1,
          cache_blocks: int = 64, max_batch_tokens: int = 2048):
    """`transformers serve MODEL_FOLDER` on 127.0.0.1, yielding its base URL (…/v1) once /v1/models answers.

    The server runs in its own process group, killed as a whole on exit; its output goes to `log`. A server that
    exits or does not answer within `start_timeout` seconds is a BudgetReasonerError quoting the log's end."""
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_UPDATE_CHECK": "1"}
    command = [sys.executable, "-c", "from transformers.cli.transformers import main; main()", "serve", str(model_folder),
               "--host", "127.0.0.1", "--port", str(port), "--device", "cpu", "--continuous-batching",
               "--cb-num-blocks", str(cache_blocks), "--cb-max-batch-tokens", str(max_batch_tokens)]
    with open(log, "wb") as output:
        process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}/v1"
    try:
        _wait_until_serving(url, process, Path(log), start_timeout)
        yield url
    finally:
        _stop(process)


def _wait_until_serving(url: str, process: subprocess.Popen, log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise BudgetReasonerError(f"transformers serve exited with code {process.returncode}: {_tail(log)}")
        try:
            with urllib.request.urlopen(f"{url}/models", timeout=2) as response:
                if json.loads(response.read()).get("data"):
                    return
        except (OSError, ValueError):
            pass
        time.sleep(0.5)
    raise BudgetReasonerError(f"transformers serve did not answer {url}/models within {timeout:g} s: {_tail(log)}")


def _stop(process: subprocess.Popen) -> None:
    """SIGTERM to the server's process group, SIGKILL if it is still there after 5 s."""
    for sent in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, sent)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=5)
            return


def _tail(log: Path) -> str:
    lines = log.read_text(errors="replace").strip().splitlines() if log.exists() else []
    return " | ".join(lines[-3:]) or "(no output)"
