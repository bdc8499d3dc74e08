"""What machine this is, and which training backend follows from it. One place decides."""

from __future__ import annotations

import importlib.util
import os
import sys
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Hardware:
    device: str  # "cuda" | "cpu"
    name: str
    total_memory_gb: float | None  # VRAM in GiB as torch reports it (get_device_properties().total_memory); None on CPU
    compute_capability: tuple[int, int] | None
    backend: str  # "unsloth" | "bitsandbytes" | "cpu"

    @property
    def supports_bf16(self) -> bool:
        return self.device == "cuda" and self.compute_capability is not None and self.compute_capability >= (8, 0)

    def describe(self) -> str:
        if self.device == "cuda":
            return f"{self.name} ({self.total_memory_gb:.2f} GiB, sm_{self.compute_capability[0]}{self.compute_capability[1]}), backend {self.backend}"
        return f"CPU ({os.cpu_count()} cores), backend {self.backend}"


def detect(requested: str = "auto", backend: str = "auto") -> Hardware:
    """Detect the device and choose the training backend.

    `requested` is a preset's `device` ("auto", "cpu", "cuda"); `backend` its `model.backend`:
    "auto" picks Unsloth on a CUDA machine where `unsloth` is importable, else transformers + peft +
    bitsandbytes ("bitsandbytes" on CUDA, "cpu" on the CPU: the same code, 4-bit included). "unsloth"
    insists on Unsloth, which also runs on the CPU through its own fallback (how CI tests this path).
    """
    from budget_reasoner.errors import BudgetReasonerError

    use_cuda = torch.cuda.is_available() and requested in ("auto", "cuda")
    if requested == "cuda" and not torch.cuda.is_available():
        raise BudgetReasonerError("the preset asks for device: cuda, but no CUDA GPU is visible; use --preset cpu-tiny")
    has_unsloth = importlib.util.find_spec("unsloth") is not None
    if backend == "unsloth" and not has_unsloth:
        raise BudgetReasonerError(
            "model.backend: unsloth, but unsloth is not installed; pip install -e '.[unsloth]' && pip install "
            "--no-deps unsloth==2026.10.9 unsloth_zoo==2026.10.9 (README: Backends), or --set model.backend=auto"
        )
    if backend == "unsloth" or (backend == "auto" and use_cuda and has_unsloth):
        chosen = "unsloth"
        import_unsloth()
    else:
        chosen = "bitsandbytes" if use_cuda else "cpu"
    if use_cuda:
        props = torch.cuda.get_device_properties(0)
        return Hardware("cuda", props.name, props.total_memory / 2**30, (props.major, props.minor), chosen)
    return Hardware("cpu", "cpu", None, None, chosen)


def hardware_for(preset) -> Hardware:
    """The machine a preset runs on: its device and backend settings resolved against what is present. On a GPU
    a preset sized for one (vram_gb > 0) must fit this card: checked here, before any model loads."""
    hardware = detect(preset.device, preset.model.backend)
    if hardware.device == "cuda" and preset.vram_gb > 0:
        from budget_reasoner.memory import check_preset_fits

        check_preset_fits(preset, hardware)
    return hardware


@dataclass(frozen=True)
class Card:
    """A GPU as torch sees it: the name and total memory of get_device_properties(0), its compute capability."""

    key: str  # what `presets recommend --gpu` takes
    name: str
    total_gib: float  # total_memory / 2**30: below the nominal GB (GB vs GiB, and memory the driver reserves)
    capability: tuple[int, int]
    bandwidth_gbs: float  # memory bandwidth, GB/s (spec sheet): what bounds decoding
    tflops16: float  # dense fp16/bf16 tensor-core TFLOP/s with fp32 accumulation (spec sheet): what bounds training

    def hardware(self, backend: str = "bitsandbytes") -> Hardware:
        return Hardware("cuda", self.name, self.total_gib, self.capability, backend)


# What torch.cuda.get_device_properties(0).total_memory reports on common cards (GiB), well-known figures; a
# preset is chosen by what the estimator says fits this, not by the GB on the box. bf16 needs sm_80 or later.
# Bandwidth and dense 16-bit tensor TFLOP/s (fp32 accumulate; GeForce cards run that at half their fp16-accumulate
# rate) from NVIDIA's datasheets and architecture whitepapers (Turing, Ampere GA102, Ada, A100, H100/H200, L4, L40S).
CARDS = (
    Card("rtx4060", "NVIDIA GeForce RTX 4060", 7.63, (8, 9), 272, 30),  # an 8 GB card
    Card("rtx3060", "NVIDIA GeForce RTX 3060", 11.76, (8, 6), 360, 25),  # the 12 GB one
    Card("t4", "Tesla T4", 14.75, (7, 5), 320, 65),  # Colab's free card: no bf16; 70 W, so it rarely holds its clocks
    Card("rtx4060ti", "NVIDIA GeForce RTX 4060 Ti", 15.6, (8, 9), 288, 44),  # the 16 GB one
    Card("a10g", "NVIDIA A10G", 21.99, (8, 6), 600, 70),  # AWS's A10 variant, clocked below the A10's 125
    Card("l4", "NVIDIA L4", 22.18, (8, 9), 300, 121),
    Card("rtx3090", "NVIDIA GeForce RTX 3090", 23.69, (8, 6), 936, 71),
    Card("rtx4090", "NVIDIA GeForce RTX 4090", 23.99, (8, 9), 1008, 165),
    Card("a100-40gb", "NVIDIA A100-SXM4-40GB", 39.39, (8, 0), 1555, 312),
    Card("l40s", "NVIDIA L40S", 44.53, (8, 9), 864, 362),
    Card("h100", "NVIDIA H100 80GB HBM3", 79.11, (9, 0), 3350, 989),
    Card("a100-80gb", "NVIDIA A100-SXM4-80GB", 79.25, (8, 0), 2039, 312),
    Card("h200", "NVIDIA H200", 139.8, (9, 0), 4800, 989),
)


def card(name: str) -> Card:
    """A card of the table by its key or its torch name, spaces, dashes and case aside ("A100 80GB", "rtx-4090")."""
    from budget_reasoner.errors import BudgetReasonerError

    def squash(text: str) -> str:
        return "".join(ch for ch in text.lower() if ch.isalnum())

    wanted = squash(name)
    for entry in CARDS:
        if wanted in (squash(entry.key), squash(entry.name), squash(entry.name.replace("NVIDIA ", "").replace("GeForce ", ""))):
            return entry
    raise BudgetReasonerError(f"--gpu {name!r} is not in the card table; one of {', '.join(c.key for c in CARDS)}, "
                              f"or pass --vram-gib with what torch.cuda.get_device_properties(0).total_memory / 2**30 says")


def nearest_card(total_gib: float, name: str | None = None) -> Card:
    """The table's card of this name (torch's), else the one whose memory is nearest `total_gib`."""
    if name:
        from budget_reasoner.errors import BudgetReasonerError

        try:
            return card(name)
        except BudgetReasonerError:  # a card the table does not have: its nearest in memory stands in
            pass
    return min(CARDS, key=lambda entry: abs(entry.total_gib - total_gib))


# The card each GPU preset is sized for: its plan's figures (preset headers, `plan` without --gpu) are on this card.
PRESET_CARDS = {"8gb": "rtx4060", "12gb": "rtx3060", "t4-16gb": "t4", "16gb": "rtx4060ti", "24gb": "rtx4090",
                "48gb": "l40s", "80gb": "a100-80gb"}


def card_for_preset(preset) -> Card:
    """The card a GPU preset is sized for (by its name, else the table's card nearest its vram_gb)."""
    if preset.name in PRESET_CARDS:
        return card(PRESET_CARDS[preset.name])
    return nearest_card(preset.vram_gb)


# Unsloth patches transformers, TRL and peft as it is imported (its kernels on CUDA; on the CPU its fallback's
# SFTTrainer), and its docs ask for `import unsloth` before any of them: a class bound earlier (`from trl import
# SFTTrainer` at a module's top, a Trainer subclass defined at import time) keeps the unpatched version.
PATCHED_BY_UNSLOTH = ("transformers", "trl", "peft")


def prepare_backend(preset) -> str:
    """Decide a preset's backend before any model code is imported, and import Unsloth now when it is the one.

    Call it first: the CLI does, before it imports a stage module (they import transformers, TRL and peft at
    their top), and a script using the API should too (or `import unsloth` itself, first). Returns the backend."""
    return detect(preset.device, preset.model.backend).backend


def import_unsloth():
    """Import Unsloth (once; later calls are free). Imported after transformers, TRL or peft, it still loads, but
    whatever was bound before it is unpatched: Unsloth's own warning then shows, not silenced, with ours naming
    the fix in this project."""
    if "unsloth" in sys.modules:
        return
    late = [name for name in PATCHED_BY_UNSLOTH if name in sys.modules]
    if late:
        import warnings

        warnings.warn(f"unsloth is imported after {', '.join(late)}: call budget_reasoner.hardware.prepare_backend(preset) "
                      f"(or `import unsloth`) before importing budget_reasoner's stage modules; the CLI does this itself",
                      stacklevel=3)
    importlib.import_module("unsloth")


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
