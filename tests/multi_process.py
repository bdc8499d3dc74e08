"""Two real processes on the CPU: an SFT run under torchrun (gloo) beside the single-process run it must equal.

Shared by tests/test_multi_process.py and benchmarks/multi_process.py. Why the two runs make the same update:
accelerate gives every rank the same seeded permutation of the data (its SeedableRandomSampler) and rank r the
per-device batches r, r + W, r + 2W, ... of it (BatchSamplerShard, even_batches). So with W = 2 processes and
accumulation 1, optimizer step k averages batches 2k and 2k+1 across the ranks, exactly the two micro-batches a
single process with accumulation 2 takes for its step k. With the token count normalized over both ranks
(`average_tokens_across_devices`) the two gradients are the same sum, up to float summation order; dropout is 0.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import TINY

STEPS, PER_DEVICE_BATCH, PROCESSES = 4, 2, 2
EXAMPLES = STEPS * PER_DEVICE_BATCH * PROCESSES  # one epoch exactly: no rank repeats an example
SETTINGS = {**TINY, "sft.max_steps": STEPS, "sft.batch_size": PER_DEVICE_BATCH, "sft.save_steps": STEPS,
            "sft.fused_loss": True, "sft.warmup_ratio": 0.0, "lora.dropout": 0.0}


def build_inputs(folder: Path, settings: dict = SETTINGS, examples: int = EXAMPLES) -> tuple[Path, Path]:
    """A student base model folder (random weights, the preset's student shape) and an SFT set of `examples`
    multi-step chains (of different lengths)."""
    from budget_reasoner.config import load_preset
    from budget_reasoner.domains import math as math_domain
    from budget_reasoner.io import write_jsonl
    from budget_reasoner.models import build_tiny_model
    from budget_reasoner.sampling import chat_prompt
    from budget_reasoner.train.pretrain import build_offline_tokenizer

    preset = load_preset("cpu-tiny", dict(settings))
    tokenizer = build_offline_tokenizer(preset)
    student = folder / "student-base"
    build_tiny_model(tokenizer, preset.model.tiny_student, preset.model.max_length, seed=0).save_pretrained(student)
    tokenizer.save_pretrained(student)
    problems = math_domain.make_problems(examples, 3, 1, 3)
    data = folder / "sft.jsonl"
    write_jsonl(data, [{"prompt": chat_prompt(p.question),
                        "completion": [{"role": "assistant", "content": math_domain.format_chain(p.steps, p.answer)}]}
                       for p in problems])
    return student, data


def cli() -> list[str]:
    """The installed `budget-reasoner` console script, as the launcher runs it."""
    return [str(Path(sys.executable).with_name("budget-reasoner"))]


def sft_command(student: Path, data: Path, out: Path, grad_accum: int, settings: dict = SETTINGS) -> list[str]:
    settings = {**settings, "sft.grad_accum": grad_accum}
    options = [arg for key, value in settings.items() for arg in ("--set", f"{key}={value}")]
    return ["sft", "--data", str(data), "--student", str(student), "--out", str(out), "--preset", "cpu-tiny", *options]


def run(command: list[str], trace: Path, timeout: float = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "BUDGET_REASONER_QUIET": "1", "WANDB_MODE": "disabled",
                   "BUDGET_REASONER_TRACE_BATCHES": str(trace), **(env or {})}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):  # never inherit a launch
        environment.pop(name, None)
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=environment)


def torchrun(processes: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)]


def batches(trace: Path, rank: int) -> list[list[str]]:
    return [json.loads(line) for line in (trace / f"rank-{rank}.jsonl").read_text().splitlines()]


def adapter_weights(stage: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(stage / "adapter" / "adapter_model.safetensors"))


def max_abs_difference(one: dict, other: dict) -> float:
    assert one.keys() == other.keys()
    return max(float((one[name] - other[name]).abs().max()) for name in one)


def step_logs(stage: Path, key: str) -> list[float]:
    history = json.loads((stage / "stage.json").read_text())["history"]
    return [entry[key] for entry in history if key in entry and "train_loss" not in entry]
