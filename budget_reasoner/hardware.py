"""What machine this is, and which training backend follows from it. One place decides."""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Hardware:
    device: str  # "cuda" | "cpu"
    name: str
    total_memory_gb: float | None  # VRAM for CUDA; None on CPU
    compute_capability: tuple[int, int] | None
    backend: str  # "unsloth" | "bitsandbytes" | "cpu"

    @property
    def supports_bf16(self) -> bool:
        return self.device == "cuda" and self.compute_capability is not None and self.compute_capability >= (8, 0)

    def describe(self) -> str:
        if self.device == "cuda":
            return f"{self.name} ({self.total_memory_gb:.0f} GB, sm_{self.compute_capability[0]}{self.compute_capability[1]}), backend {self.backend}"
        return f"CPU ({os.cpu_count()} cores), backend {self.backend}"


def detect(requested: str = "auto") -> Hardware:
    """Detect the device. `requested` is a preset's `device`: "auto", "cpu" or "cuda"."""
    use_cuda = torch.cuda.is_available() and requested in ("auto", "cuda")
    if requested == "cuda" and not torch.cuda.is_available():
        from budget_reasoner.errors import BudgetReasonerError

        raise BudgetReasonerError("the preset asks for device: cuda, but no CUDA GPU is visible; use --preset cpu-tiny")
    if use_cuda:
        props = torch.cuda.get_device_properties(0)
        backend = "unsloth" if importlib.util.find_spec("unsloth") else "bitsandbytes"
        return Hardware("cuda", props.name, props.total_memory / 2**30, (props.major, props.minor), backend)
    return Hardware("cpu", "cpu", None, None, "cpu")


class PeakMemory:
    """Peak memory of a block: CUDA's max_memory_allocated, or on Linux CPUs the high-water RSS (reset on entry)."""

    def __init__(self, device: str):
        self.device, self.bytes = device, 0

    def __enter__(self):
        if self.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        else:
            try:
                with open("/proc/self/clear_refs", "w") as handle:
                    handle.write("5")
            except OSError:  # not Linux: the high-water mark then covers the whole process
                pass
        return self

    def __exit__(self, *exc):
        if self.device == "cuda":
            self.bytes = torch.cuda.max_memory_allocated()
        else:
            import resource

            self.bytes = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
            try:
                with open("/proc/self/status") as handle:
                    self.bytes = next(int(line.split()[1]) * 1024 for line in handle if line.startswith("VmHWM:"))
            except OSError:
                pass
        return False
