"""One run, several processes: who this process is under `torchrun` / `accelerate launch`, and the few
collectives the stages need so that the run behaves as one.

The rule: rank 0 decides and writes (claims the stage folder, takes its lock, resumes from a checkpoint,
writes adapters, records and sessions), the other ranks follow its decision and write nothing. A decision
rank 0 refuses (a folder of other settings, a damaged checkpoint) is refused on every rank with the same
line, so no rank waits forever at a collective for one that has already left. Training itself is the
Trainer's: accelerate wraps the model in DDP (or FSDP, DeepSpeed) and shards the batches across ranks.

Who we are comes from the launcher's environment (RANK, WORLD_SIZE), which torchrun and accelerate launch
both set before Python starts, so logging can be quieted before any process group exists.
"""

from __future__ import annotations

import atexit
import dataclasses
import os
import signal

from budget_reasoner.errors import BudgetReasonerError


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def is_distributed() -> bool:
    return world_size() > 1


def is_main_process() -> bool:
    """Rank 0: the process that logs and writes. True in a single-process run."""
    return rank() == 0


def join(cpu: bool | None = None) -> None:
    """Join the launcher's process group through accelerate's PartialState, the same (shared) state the
    Trainer builds later, so our collectives and its DDP share one group. `cpu` None: the CPU (gloo) unless
    CUDA is present (nccl with a gloo side for Python objects, as accelerate sets it up)."""
    if not is_distributed():
        return
    import torch
    from accelerate import PartialState
    from accelerate.utils import DistributedType

    want_cpu = (not torch.cuda.is_available()) if cpu is None else cpu
    state = PartialState(cpu=want_cpu)
    atexit.unregister(leave)  # join runs before every collective: keep one exit hook, not one per call
    atexit.register(leave)
    if want_cpu and state.distributed_type != DistributedType.MULTI_CPU:
        raise BudgetReasonerError(
            f"this run was launched as {world_size()} GPU processes ({state.distributed_type.value}) but its preset "
            f"trains on the CPU; pick a GPU preset, or launch on the CPU (CUDA_VISIBLE_DEVICES= torchrun ...)"
        )


def leave() -> None:
    """Tear the process group down before the interpreter does. Left to interpreter shutdown, gloo's worker
    threads are destroyed still joinable and the process aborts ("terminate called without an active
    exception", SIGABRT) in about one exit in six on this machine, failing a run that had finished."""
    import torch.distributed as dist

    # leaving already (the CLI has said its one line): the launcher's SIGTERM, sent once another rank failed, must
    # not raise from stop() in here and print a traceback after that line
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def gather(value) -> list:
    """`value` from every rank, in rank order (any picklable object); [value] in a single process."""
    if not is_distributed():
        return [value]
    import torch.distributed as dist

    join()
    gathered = [None] * world_size()
    dist.all_gather_object(gathered, value)
    return gathered


def barrier() -> None:
    if is_distributed():
        import torch.distributed as dist

        join()
        dist.barrier()


def main_decides(function, *args, **kwargs):
    """Run `function` on rank 0 only and give every rank its result; a BudgetReasonerError there is raised on
    every rank with the same line. For what writes (claiming a folder) or must be seen the same way by all
    ranks (which checkpoint to resume). Any other exception on rank 0 is its own bug: the others are told in
    one line and stop, rather than wait at the next collective."""
    if not is_distributed():
        return function(*args, **kwargs)
    import torch.distributed as dist

    join()
    outcome, crash = [None], None
    if is_main_process():
        try:
            outcome = [("ok", function(*args, **kwargs))]
        except BudgetReasonerError as error:
            outcome = [("refused", str(error))]
        except BaseException as error:  # noqa: BLE001 - re-raised below, after the others heard of it
            outcome, crash = [("crashed", f"{type(error).__name__}: {error}")], error
    dist.broadcast_object_list(outcome, src=0)
    kind, value = outcome[0]
    if crash is not None:
        raise crash
    if kind == "refused":
        raise BudgetReasonerError(value)
    if kind == "crashed":
        raise BudgetReasonerError(f"rank 0 failed ({value}); this rank stops with it")
    return value


def check_same_preset(preset) -> None:
    """Refuse, on every rank, a launch whose ranks loaded different presets (another --preset or --set on one
    node, another file at the same path): their gradients would be averaged over different models or settings."""
    if not is_distributed():
        return
    from budget_reasoner.io import digest

    digests = gather(digest(dataclasses.asdict(preset)))
    if len(set(digests)) > 1:
        ranks = ", ".join(f"rank {index}: {value}" for index, value in enumerate(digests))
        raise BudgetReasonerError(
            f"the {len(digests)} processes of this run loaded different presets (digests {ranks}); start every rank "
            f"with the same --preset, --set options and preset files"
        )


def check_enough_examples(count: int, what: str) -> None:
    """Refuse a launch with more processes than examples: a rank without one of its own would train on
    repeats (accelerate's even batches loop the data) while saying it trained on the whole set."""
    if count < world_size():
        raise BudgetReasonerError(
            f"{count} {what} cannot feed {world_size()} processes (each needs at least one of its own); launch at most "
            f"{count} processes, or use more data"
        )


def stop_with_the_launcher() -> None:
    """Under a launch, end with one line when the launcher stops this process. torchrun (and accelerate launch,
    which runs it) sends SIGTERM to every process once one of them failed or was killed, and waits ~30 s before
    SIGKILL: raised as an error, the stage's session is still recorded and the CLI says what was kept. A
    checkpoint being written at that moment is left incomplete, and set aside when the run resumes."""
    if not is_distributed():
        return

    def stop(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM ends the process at once
        raise BudgetReasonerError(
            f"rank {rank()} stopped by the launcher: another process of this run failed or was killed (the "
            f"launcher's report names it); complete checkpoints are kept: run the same command again to resume"
        )

    signal.signal(signal.SIGTERM, stop)


# What gloo and NCCL raise in a collective whose peer is gone (killed, crashed, its machine lost)
PEER_LOST = ("Connection reset by peer", "Connection closed by peer", "Broken pipe", "NCCL communicator was aborted",
             "Socket Timeout", "Timed out waiting")


def lost_a_peer(error: BaseException) -> str | None:
    """One line for a collective that failed because another process of the run is gone, else None (a bug)."""
    if not is_distributed():
        return None
    import torch.distributed as dist

    message = str(error)
    if not (isinstance(error, dist.DistBackendError) or isinstance(error, RuntimeError)
            and any(sign in message for sign in PEER_LOST)):
        return None
    first = message.splitlines()[0] if message else type(error).__name__
    return (f"rank {rank()} lost another process of this run mid-step ({first[:160]}); the launcher's report names "
            f"it; complete checkpoints are kept: run the same command again to resume")
