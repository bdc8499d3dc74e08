"""Rich progress bars and console output shared by every long loop."""

from __future__ import annotations

import os
import sys

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from budget_reasoner.distributed import is_main_process

console = Console(stderr=True)


def progress_bar() -> Progress:
    # Bars redraw in a terminal; under CI or a pipe they would flood the log, so they stay quiet there.
    # Under torchrun / accelerate launch only rank 0 draws (RANK is set by the launcher).
    quiet = not sys.stderr.isatty() or bool(os.environ.get("BUDGET_REASONER_QUIET")) or not is_main_process()
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        disable=quiet,
    )


def say(message: str) -> None:
    if not is_main_process():  # one log per run, not one per rank
        return
    console.print(message, highlight=False, soft_wrap=True)  # a log line: never cut a path at the console's width


def quiet_libraries() -> None:
    """Keep the libraries' own bars and deprecation chatter out of the way of ours."""
    import logging
    import warnings

    import datasets
    import transformers

    transformers.logging.set_verbosity_error()
    logging.getLogger("huggingface_hub").setLevel(logging.ERROR)  # its "Retrying in 8s" lines before our one-line error
    transformers.utils.logging.disable_progress_bar()
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*gradient checkpointing.*")
