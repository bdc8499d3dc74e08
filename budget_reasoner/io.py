"""Folders on disk: JSONL rows with line-numbered errors, atomic shards, completion markers and run locks.

A stage is complete when its folder holds `COMPLETE.json`; a stage without it is resumed. Shards are
written to a temporary name and renamed, so an interrupted write never leaves half a shard behind; a
write stopped by a full disk removes its temporary file and ends in one line saying what was kept.
A folder being written holds `LOCK.json` (PID and host of its writer), so a second writer is refused.
A stage folder holds `fingerprint.json` (what made it: its inputs' content hashes and its settings) from its
first write, so a rerun resumes only what the same inputs and settings started; `COMPLETE.json` lists every
file the stage wrote with its size and sha256, so a reader finds a missing or damaged file before using it.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import gzip
import hashlib
import inspect
import json
import os
import shutil
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Iterable, Iterator

from budget_reasoner.errors import BudgetReasonerError

COMPLETE = "COMPLETE.json"
LOCK = "LOCK.json"
FINGERPRINT = "fingerprint.json"
SESSIONS = "sessions.json"
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


def read_jsonl(path: Path, required: Iterable[str] = (), kinds: dict[str, str] | None = None) -> list[dict]:
    """Rows of a JSONL file; a malformed line, a missing column or a column of the wrong kind names the file and line.

    `kinds` maps columns to what they must hold: "text" (a string UTF-8 can encode), "messages" (a non-empty
    list of {"role": text, "content": text}) or "bool". Checked here, where the file is read, so a bad row is
    one line before any model loads, not a traceback from a tokenizer or a trainer later."""
    path = Path(path)
    if not path.is_file():
        raise BudgetReasonerError(f"{path}: file not found")
    rows, required, kinds = [], list(required), kinds or {}
    for line_number, row in jsonl_records(path):
        missing = [column for column in required if column not in row]
        if missing:
            raise BudgetReasonerError(f"{path}: line {line_number}: missing column(s) {', '.join(missing)}")
        for column, kind in kinds.items():
            if column in row and (problem := _wrong_kind(row[column], kind)):
                raise BudgetReasonerError(f"{path}: line {line_number}: column {column!r} {problem}")
        rows.append(row)
    return rows


def jsonl_records(path: Path, errors: str = "surrogateescape") -> Iterator[tuple[int, dict]]:
    """(line number, object) of each non-blank line of a JSONL file (.gz too: HumanEval is published so); a line
    that is not a JSON object is one error naming the file and line."""
    opener = gzip.open if Path(path).suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8", errors=errors) as handle:
        for line_number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise BudgetReasonerError(f"{path}: line {line_number}: not valid JSON ({error.msg})") from None
            if not isinstance(row, dict):
                raise BudgetReasonerError(f"{path}: line {line_number}: expected a JSON object")
            yield line_number, row


def _wrong_kind(value, kind: str) -> str | None:
    """What is wrong with `value` as a column of `kind`, or None when it is fine."""
    if kind == "bool":
        return None if isinstance(value, bool) else f"must be true or false, got {_json_type(value)}"
    if kind == "text":
        if not isinstance(value, str):
            return f"must be a string, got {_json_type(value)}"
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as error:  # JSON's "\ud800" escapes decode to lone surrogates no encoder accepts
            return (f"holds text UTF-8 cannot encode ({value[error.start]!r} at character {error.start}, "
                    f"{error.reason}); fix or drop the row")
        return None
    if kind == "messages":
        if not isinstance(value, list) or not value:
            return f"must be a non-empty list of chat messages ({{\"role\": ..., \"content\": ...}}), got {_json_type(value)}"
        for index, message in enumerate(value):
            if not isinstance(message, dict) or "content" not in message or "role" not in message:
                return f"message {index} must be an object with \"role\" and \"content\", got {_json_type(message)}"
            for key in ("role", "content"):
                if problem := _wrong_kind(message[key], "text"):
                    return f"message {index} {key} {problem}"
        return None
    raise ValueError(f"unknown column kind {kind!r}")


def _json_type(value) -> str:
    names = {type(None): "null", bool: "a boolean", int: "a number", float: "a number", str: "a string",
             list: "a list", dict: "an object"}
    return names.get(type(value), type(value).__name__)


def read_shards(folder: Path, required: Iterable[str] = (), kinds: dict[str, str] | None = None) -> list[dict]:
    """The rows of a folder's shards: those its COMPLETE.json lists when it has a manifest, else every shard there."""
    folder = Path(folder)
    listed = _manifest(folder)
    names = sorted(name for name in listed if Path(name).parent == Path(".") and name.startswith("shard-")) \
        if listed is not None else sorted(path.name for path in folder.glob("shard-*.jsonl"))
    return [row for name in names for row in read_jsonl(folder / name, required, kinds)]


def shard_path(folder: Path, index: int) -> Path:
    return Path(folder) / f"shard-{index:05d}.jsonl"


def is_complete(folder: Path) -> bool:
    return (Path(folder) / COMPLETE).is_file()


def mark_complete(folder: Path, info: dict) -> None:
    """Write COMPLETE.json: the stage's record plus a manifest of every file it wrote (size and sha256).

    Written last, so it is the proof the stage finished; readers (`verify_complete`) check the manifest, so a
    shard deleted or cut short later is an error, never a smaller dataset."""
    folder = Path(folder)
    files = {name: {"bytes": path.stat().st_size, "sha256": file_sha256(path)} for name, path in _stage_files(folder)}
    write_json(folder / COMPLETE, {**info, "files": files})


def _stage_files(folder: Path) -> list[tuple[str, Path]]:
    """(relative name, path) of the files a stage wrote: not its markers, and not a nested stage's own folder
    (distill/cache, data/problems), which carries its own fingerprint and manifest."""
    found = []
    for root, directories, names in os.walk(folder):
        root = Path(root)
        directories[:] = sorted(d for d in directories if not (root / d / FINGERPRINT).is_file())
        for name in sorted(names):
            if root == folder and name in (COMPLETE, LOCK, FINGERPRINT) or name.endswith(".tmp"):
                continue
            found.append(((root / name).relative_to(folder).as_posix(), root / name))
    return found


def _manifest(folder: Path) -> dict | None:
    """The files COMPLETE.json lists, or None for a folder without one (incomplete, or older than manifests)."""
    if not is_complete(folder):
        return None
    files = read_json(Path(folder) / COMPLETE).get("files")
    return files if isinstance(files, dict) else None


def verify_complete(folder: Path) -> None:
    """Check that every file a complete stage's manifest lists is there, whole and unchanged."""
    folder = Path(folder)
    for name, expected in (_manifest(folder) or {}).items():
        path = folder / name
        if not path.is_file():
            problem = "is missing"
        elif path.stat().st_size != expected.get("bytes"):
            problem = f"has {path.stat().st_size:,} bytes, not the {expected.get('bytes'):,} it was written with"
        elif file_sha256(path) != expected.get("sha256"):
            problem = "has changed since the stage wrote it"
        else:
            continue
        raise BudgetReasonerError(
            f"{path} {problem} (listed in {folder / COMPLETE}): the stage's output is damaged; rerun its command "
            f"with --overwrite (or delete {folder}) to redo it"
        )


def read_record(folder: Path, record: str) -> dict:
    """A stage's saved record, without COMPLETE.json's file manifest (the report has no use for it)."""
    data = read_json(Path(folder) / record)
    return {key: value for key, value in data.items() if key != "files"} if record == COMPLETE else data


def finished(folder: Path, stage: str, record: str = "stage.json") -> dict | None:
    """The saved record of a stage that already completed in `folder` (verified, saying it is skipped), else None.

    Stages call it through `claim_stage`, which first checks that the folder was made by the same fingerprint."""
    if not is_complete(folder):
        return None
    from budget_reasoner.progress import say

    verify_complete(folder)
    say(f"{stage}: {folder} is complete, skipping")
    return read_record(folder, record)


# ---- what made a folder: fingerprints -------------------------------------------------------------------
# A stage's fingerprint is {"stage", "inputs": {role: content digest}, "settings": {preset section: values}}.
# It is written to fingerprint.json before the stage writes anything else, and a rerun resumes (or skips a
# complete stage) only when its own fingerprint is the same; otherwise one line names the keys that differ.
# Digests are of content, never of paths, so a run folder that moves keeps its fingerprints. The settings are
# the preset sections that change the stage's result; recipe.py's run.json hashes the whole preset with the
# same `digest`, so a run folder whose run.json matches has stages whose settings match too.

BIG_FILE = 64 * 2**20  # bytes above which a file is sampled rather than read whole (see file_sha256)
SAMPLE = 2**20


def digest(data) -> str:
    """A short content hash of JSON-able data (keys sorted, so dict order does not matter)."""
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


def file_sha256(path: Path) -> str:
    """sha256 of a file's bytes. Files over BIG_FILE (model weights: a 7B model is 15 GB, minutes to read at each
    stage start) hash their size and three 1 MiB samples (start, middle, end) instead: any re-save of the weights
    changes those, and unlike mtimes they survive a run folder copied to another disk (`cp -r`, Google Drive)."""
    path, hasher = Path(path), hashlib.sha256()
    size = path.stat().st_size
    with path.open("rb") as handle:
        if size <= BIG_FILE:
            for block in iter(lambda: handle.read(SAMPLE), b""):
                hasher.update(block)
        else:
            hasher.update(f"sampled:{size}".encode())
            for offset in (0, size // 2, size - SAMPLE):
                handle.seek(offset)
                hasher.update(handle.read(SAMPLE))
    return hasher.hexdigest()


def input_digest(source: str | Path) -> str:
    """What an input is, as a content digest: a file's bytes; a complete stage folder's fingerprint and manifest
    (its files verified first); any other folder (a model) its files' names and bytes; a name that is no local
    path (a hub id, a server model) the name itself."""
    path = Path(source)
    if not path.exists():
        return f"name:{source}"
    if path.is_file():
        return f"file:{file_sha256(path)[:16]}"
    if (path / FINGERPRINT).is_file():
        if not is_complete(path):
            raise BudgetReasonerError(f"{path} is a stage that has not completed (no {COMPLETE}); run its command "
                                      f"again to finish it before using it as an input")
        verify_complete(path)
        return "stage:" + digest({"fingerprint": read_json(path / FINGERPRINT), "files": _manifest(path)})
    return "folder:" + digest([(name, file_sha256(file)) for name, file in _stage_files(path)])


def claim_stage(folder: Path, stage: str, inputs: dict, settings: dict, overwrite: bool = False,
                record: str = "stage.json", keep: Iterable[str | Path] = ()) -> dict | None:
    """Claim `folder` for a stage made from `inputs` (role -> source: path or name) and `settings`.

    Under a multi-process launch only rank 0 claims (verifies, deletes, writes the fingerprint); every rank gets
    its answer, or its refusal (distributed.main_decides).
    See `_claim_stage` for what a claim does."""
    from budget_reasoner.distributed import main_decides

    return main_decides(_claim_stage, folder, stage, inputs, settings, overwrite, record, keep)


def _claim_stage(folder: Path, stage: str, inputs: dict, settings: dict, overwrite: bool = False,
                 record: str = "stage.json", keep: Iterable[str | Path] = ()) -> dict | None:
    """Claim `folder` for a stage made from `inputs` (role -> source: path or name) and `settings`.

    Returns the stage's record when the folder already completed with this fingerprint (skip it), None when the
    stage should run (fresh, or resuming what the same fingerprint started). A folder made by another fingerprint,
    or holding files without one, is refused in one line unless `overwrite`: then its contents are deleted (not
    moved aside: who asks to overwrite wants the space back) only after the new fingerprint is known, that is after
    every input was verified, and before the new fingerprint is written. `keep` names files inside the folder
    that are this stage's own inputs (eval's problems.jsonl from --benchmark); nested stages' folders are kept."""
    folder = Path(folder)
    claimed = {"stage": stage, "inputs": {role: input_digest(source) for role, source in inputs.items()},
               "settings": settings}
    claimed = json.loads(json.dumps(claimed, default=str))  # as it reads back from disk (tuples as lists)
    path = folder / FINGERPRINT
    existing = _read_fingerprint(path)
    if existing == claimed and not overwrite:
        return finished(folder, stage, record)
    kept = {Path(name).resolve() for name in keep}
    leftovers = [entry for entry in sorted(folder.iterdir()) if folder.is_dir() and entry.name not in (LOCK, FINGERPRINT)
                 and entry.resolve() not in kept and not (entry.is_dir() and (entry / FINGERPRINT).is_file())] \
        if folder.is_dir() else []
    if existing is not None and not leftovers:
        existing = None  # claimed, but nothing written before it stopped (bad rows, a failed load): nothing to lose
    if (existing is not None or leftovers) and not overwrite:
        if existing is None:
            why = ("holds files but no fingerprint.json (written before fingerprints, or by hand), so what made them "
                   "is unknown")
        else:
            why = f"holds {existing.get('stage')} output made from other inputs or settings (differs: {_differences(existing, claimed)})"
        raise BudgetReasonerError(f"{folder} {why}; pass a new --out, or --overwrite to delete it and start over")
    if overwrite and (existing is not None or leftovers):
        from budget_reasoner.progress import say

        path.unlink(missing_ok=True)  # first: a delete cut short leaves files without a fingerprint, refused again
        for entry in leftovers:
            shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
        say(f"{stage}: --overwrite: deleted the previous contents of {folder}")
    write_json(path, claimed)
    return None


def settings_of(preset, *names: str) -> dict:
    """The named preset values (sections like "sft", or dotted fields like "model.max_length"), as plain data."""
    import dataclasses

    settings = {}
    for name in names:
        value = preset
        for part in name.split("."):
            value = getattr(value, part)
        settings[name] = dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value
    return settings


# what changes a model's outputs in every stage that loads one: its length limit, attention, loader and precision
MODEL_SETTINGS = ("seed", "model.max_length", "model.attention", "model.backend", "quantization")


def _read_fingerprint(path: Path) -> dict | None:
    try:
        return read_json(path)
    except BudgetReasonerError:
        return {} if path.exists() else None  # unreadable: differs from every claim


def _differences(old: dict, new: dict) -> str:
    """The dotted keys on which two fingerprints differ (at most eight)."""
    def flat(data, prefix=""):
        if isinstance(data, dict) and data:
            return {k: v for key, value in data.items() for k, v in flat(value, f"{prefix}{key}.").items()}
        return {prefix.rstrip("."): data}

    old, new = flat(old), flat(new)
    keys = sorted(key for key in old.keys() | new.keys() if old.get(key) != new.get(key))
    return ", ".join(keys[:8]) + (f" and {len(keys) - 8} more" if len(keys) > 8 else "") or "unreadable fingerprint"


# ---- compute across sessions ------------------------------------------------------------------------------

def add_session(folder: Path, seconds: float, peak_memory_bytes: int | None, **extra) -> dict:
    """Append one session's wall seconds and peak memory to the stage's sessions.json; returns the totals over
    every session of the stage (a resumed stage's compute is the sum of its sessions', its peak the max)."""
    sessions = read_sessions(folder)["sessions"]
    sessions.append({"seconds": seconds, "peak_memory_bytes": peak_memory_bytes, **extra})
    write_json(Path(folder) / SESSIONS, {"sessions": sessions})
    return session_totals(sessions)


def read_sessions(folder: Path) -> dict:
    """The totals over the sessions recorded so far (none: zero seconds)."""
    path = Path(folder) / SESSIONS
    return session_totals(read_json(path).get("sessions", []) if path.is_file() else [])


def session_totals(sessions: list[dict]) -> dict:
    peaks = [s["peak_memory_bytes"] for s in sessions if s.get("peak_memory_bytes") is not None]
    return {"seconds": sum(s["seconds"] for s in sessions), "peak_memory_bytes": max(peaks) if peaks else None,
            "sessions": sessions}


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
        except OSError as error:
            if not isinstance(error, FileExistsError):  # read-only, no permission, full: before any model loads
                if error.errno in NO_SPACE:
                    raise BudgetReasonerError(disk_full_message(folder)) from None
                raise BudgetReasonerError(f"--out {folder} is not writable ({error.strerror}); pass a folder this user "
                                          f"can write to") from None
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
    """Hold `folder` as its only writer for the block (nested holds in the same thread are free).

    Under a multi-process launch (torchrun, accelerate launch) rank 0 is the run's one writer and holds the
    lock for all of its ranks; the others write nothing, so they take none (taking it too would refuse them:
    rank 0 is a live writer). A refusal on rank 0 ends it with an error, and the launcher stops the others."""
    from budget_reasoner.distributed import is_main_process

    folder = Path(folder)
    if not is_main_process():
        yield folder
        return
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
    """A refused or failed command leaves no empty folder of its own making behind (a fingerprint claimed before
    the failure, with nothing written beside it, goes too)."""
    if created:
        with contextlib.suppress(OSError):
            if [entry.name for entry in folder.iterdir()] == [FINGERPRINT]:
                (folder / FINGERPRINT).unlink()
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
