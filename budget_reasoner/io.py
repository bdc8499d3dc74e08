"""Folders on disk: JSONL rows with line-numbered errors, atomic shards, completion markers and run locks.

A stage is complete when its folder holds `COMPLETE.json`; a stage without it is resumed. Shards are
written to a temporary name and renamed, so an interrupted write never leaves half a shard behind; a
write stopped by a full disk removes its temporary file and ends in one line saying what was kept.
A folder being written holds `LOCK.json` (PID and host of its writer), so a second writer is refused.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import inspect
import json
import os
import shutil
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Iterable

from budget_reasoner.errors import BudgetReasonerError

COMPLETE = "COMPLETE.json"
LOCK = "LOCK.json"
NO_SPACE = (errno.ENOSPC, errno.EDQUOT)  # a full disk, or a full quota: the same remedy


def disk_full_message(folder: Path) -> str:
    return (f"no space left on the device writing {folder}: finished shards and complete checkpoints there are kept; "
            f"free some space and run the same command again to resume")


@contextlib.contextmanager
def _atomic(path: Path):
    """Write to `path` through a temporary file renamed over it; on any failure the temporary file goes."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    try:
        yield temporary
        os.replace(temporary, path)
    except BaseException as error:
        temporary.unlink(missing_ok=True)  # half a file is worth nothing, and on a full disk it holds the space
        if isinstance(error, OSError) and error.errno in NO_SPACE:
            raise BudgetReasonerError(disk_full_message(path.parent)) from None
        raise


def write_jsonl(path: Path, rows: Iterable[dict]) -> None:
    with _atomic(path) as temporary, temporary.open("w") as handle:
        for row in rows:
            handle.write(json.dumps(row) + "\n")


def read_jsonl(path: Path, required: Iterable[str] = ()) -> list[dict]:
    """Rows of a JSONL file; a malformed line or a missing column names the file and line."""
    path = Path(path)
    if not path.is_file():
        raise BudgetReasonerError(f"{path}: file not found")
    rows, required = [], list(required)
    with path.open() as handle:
        for line_number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise BudgetReasonerError(f"{path}: line {line_number}: not valid JSON ({error.msg})") from None
            if not isinstance(row, dict):
                raise BudgetReasonerError(f"{path}: line {line_number}: expected a JSON object")
            missing = [column for column in required if column not in row]
            if missing:
                raise BudgetReasonerError(f"{path}: line {line_number}: missing column(s) {', '.join(missing)}")
            rows.append(row)
    return rows


def read_shards(folder: Path, required: Iterable[str] = ()) -> list[dict]:
    return [row for shard in sorted(Path(folder).glob("shard-*.jsonl")) for row in read_jsonl(shard, required)]


def shard_path(folder: Path, index: int) -> Path:
    return Path(folder) / f"shard-{index:05d}.jsonl"


def is_complete(folder: Path) -> bool:
    return (Path(folder) / COMPLETE).is_file()


def finished(folder: Path, stage: str, record: str = "stage.json") -> dict | None:
    """The saved record of a stage that already completed in `folder` (saying it is skipped), else None."""
    if not is_complete(folder):
        return None
    from budget_reasoner.progress import say

    say(f"{stage}: {folder} is complete, skipping")
    return read_json(Path(folder) / record)


def mark_complete(folder: Path, info: dict) -> None:
    write_json(Path(folder) / COMPLETE, info)


def read_json(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise BudgetReasonerError(f"{path}: file not found") from None
    except json.JSONDecodeError as error:
        raise BudgetReasonerError(f"{path}: not valid JSON ({error.msg})") from None


def write_json(path: Path, data: dict) -> None:
    with _atomic(path) as temporary:
        temporary.write_text(json.dumps(data, indent=2) + "\n")


def free_bytes(folder: Path) -> int | None:
    """Free space on the disk that holds (or would hold) `folder`; None when it cannot be read."""
    folder = Path(folder).absolute()
    for candidate in (folder, *folder.parents):
        if candidate.exists():
            try:
                return shutil.disk_usage(candidate).free
            except OSError:
                return None
    return None


# ---- one writer per folder ------------------------------------------------------------------------------
# A run folder being written holds LOCK.json: the writer's PID, host and command. A second writer (another
# process, on the folder, inside it or around it) is refused with one line naming the first. A lock whose PID
# is dead on this host was left by a killed run (SIGKILL, OOM, a reboot) and is taken over. Another host's
# processes cannot be seen from here (a run folder on Google Drive, written from a Colab VM that has since
# disconnected), so its holder touches the lock every minute and a lock from another host left untouched for
# ten is taken over too. Within one process the lock nests: quickstart holds its run folder while its stages
# lock their own subfolders under it. Nesting is per thread: another thread is a second writer like any other.

HEARTBEAT_SECONDS = 60
STALE_AFTER_SECONDS = 600  # a lock from another host untouched this long: its machine is gone
_local = threading.local()


def _held() -> dict[Path, int]:
    """The folders this thread holds, with how many nested holders each."""
    if not hasattr(_local, "held"):
        _local.held = {}
    return _local.held


def _process_started(pid: int) -> str | None:
    """When `pid` started (Linux /proc), so a PID reused by a new process is not mistaken for the lock's owner."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]  # field 22, starttime; fields after the ")" of the name start at 3


def _this_process() -> dict:
    return {"pid": os.getpid(), "host": socket.gethostname(), "started": _process_started(os.getpid()),
            "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])[:200] if sys.argv else "python",
            "since": time.strftime("%Y-%m-%d %H:%M:%S")}


def _read_lock(path: Path) -> dict | None:
    """The owner a lock file names; None when it is gone, and {} when it cannot be read (cut off mid-write)."""
    try:
        owner = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}
    return owner if isinstance(owner, dict) and isinstance(owner.get("pid"), int) else {}


def _is_stale(owner: dict, path: Path) -> bool:
    """True when the lock's writer is certainly gone: a dead (or reused) PID on this host."""
    if not owner:  # unreadable: being written this instant, or cut off by a crash long ago
        try:
            return time.time() - path.stat().st_mtime > 10
        except FileNotFoundError:
            return True
    if owner.get("host") != socket.gethostname():  # another machine: only its heartbeat says it is alive
        try:
            return time.time() - path.stat().st_mtime > STALE_AFTER_SECONDS
        except FileNotFoundError:
            return True
    try:
        os.kill(owner["pid"], 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        pass  # alive, another user's
    started = owner.get("started")
    return started is not None and _process_started(owner["pid"]) not in (None, started)


def _refusal(folder: Path, owner: dict, path: Path) -> BudgetReasonerError:
    who = (f"PID {owner['pid']} on {owner.get('host')} (`{owner.get('command')}`, since {owner.get('since')})"
           if owner else "another process")
    return BudgetReasonerError(
        f"{folder} is being written by {who}; wait for it to finish or stop it (two writers would mix their "
        f"outputs), or use another --out; if that process is gone, delete {path}"
        + (" (another machine's lock is taken over after 10 minutes without its heartbeat)"
           if owner and owner.get("host") != socket.gethostname() else "")
    )


def _check_no_other_writer(folder: Path) -> None:
    """Refuse when a live writer of another process holds a folder around this one or inside it."""
    key = folder.resolve()
    around = [parent / LOCK for parent in key.parents]
    inside = [*key.glob(f"*/{LOCK}"), *key.glob(f"*/*/{LOCK}")] if key.is_dir() else []
    for path in around + inside:
        if path.parent.resolve() in _held() or not path.exists():
            continue
        owner = _read_lock(path)
        if owner and not _is_stale(owner, path):  # a stale one is taken over by whoever locks its own folder
            raise _refusal(path.parent, owner, path)


def _take(folder: Path) -> None:
    """Create folder/LOCK.json with this process as owner; a stale lock is taken over, a live one refused."""
    from budget_reasoner.progress import say

    path = folder / LOCK
    for _ in range(3):
        try:
            descriptor = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)  # atomic: of two racers, one wins
        except FileExistsError:
            owner = _read_lock(path)
            if owner is None:
                continue  # released between our two looks
            if not _is_stale(owner, path):
                raise _refusal(folder, owner, path) from None
            say(f"{path}: taking over the lock of PID {owner.get('pid', '?')} on {owner.get('host', '?')}, "
                f"which is no longer running")
            if _read_lock(path) == owner:  # not already taken over by a third process in between
                path.unlink(missing_ok=True)
            continue
        try:
            with os.fdopen(descriptor, "w") as handle:
                json.dump(_this_process(), handle)
        except OSError as error:
            path.unlink(missing_ok=True)
            if error.errno in NO_SPACE:
                raise BudgetReasonerError(disk_full_message(folder)) from None
            raise
        return
    raise BudgetReasonerError(f"{path}: could not take the lock (other processes keep taking it); try again")


def output_folder(folder: Path) -> Path:
    """`folder` as an output folder: refuse one that is a file, or that cannot be created, in one line."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise BudgetReasonerError(f"--out {folder} is a file, not a folder; pass a folder (it is created if missing)")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        if error.errno in NO_SPACE:
            raise BudgetReasonerError(disk_full_message(folder)) from None
        raise BudgetReasonerError(f"--out {folder}: cannot create the folder ({error.strerror})") from None
    return folder


@contextlib.contextmanager
def run_lock(folder: Path):
    """Hold `folder` as its only writer for the block (nested holds in the same thread are free)."""
    folder = Path(folder)
    key, held = folder.resolve(), _held()
    if key in held:
        held[key] += 1
        try:
            yield folder
        finally:
            held[key] -= 1
        return
    created = not folder.exists()
    output_folder(folder)
    try:
        _check_no_other_writer(folder)
        _take(folder)
    except BaseException:
        _remove_if_empty(folder, created)
        raise
    held[key] = 1
    stop = threading.Event()
    threading.Thread(target=_heartbeat, args=(folder / LOCK, stop), daemon=True, name=f"lock {folder}").start()
    try:
        yield folder
    finally:
        stop.set()
        del held[key]
        (folder / LOCK).unlink(missing_ok=True)
        _remove_if_empty(folder, created)


def _heartbeat(path: Path, stop: threading.Event) -> None:
    """Touch the lock while it is held, so another host can tell a live writer from a vanished one."""
    while not stop.wait(HEARTBEAT_SECONDS):
        with contextlib.suppress(OSError):
            os.utime(path)


def _remove_if_empty(folder: Path, created: bool) -> None:
    """A refused or failed command leaves no empty folder of its own making behind."""
    if created:
        with contextlib.suppress(OSError):
            folder.rmdir()  # only succeeds when nothing was written into it


def writes_folder(parameter: str):
    """Decorate a stage function so it holds `run_lock` on its output folder, the argument named `parameter`."""
    def decorate(function):
        signature = inspect.signature(function)

        @functools.wraps(function)
        def wrapper(*args, **kwargs):
            with run_lock(signature.bind(*args, **kwargs).arguments[parameter]):
                return function(*args, **kwargs)

        return wrapper

    return decorate
