"""The sandbox's child: locks itself in, then runs the untrusted program. Started by `verify/sandbox.py` as

    python -I -S -B -X utf8 .../_sandbox_child.py      (cwd: the throwaway directory, env: almost empty)

never by hand, never imported by the parent. `-I -S` keeps the caller's site-packages, environment variables
and working directory off `sys.path`; only the standard library is importable. It reads `job.json` from its
working directory and deletes it before the program runs (the program never sees the sentinel on disk), then
applies, in this order, whatever the kernel allows:

1. namespaces: a new network namespace (no interface but a down loopback) and a new mount namespace; as root
   directly, otherwise inside a new user namespace;
2. mounts: every mount read-only (`mount_setattr`, or a remount per mount on older kernels) but the working
   directory, a fresh tmpfs of `disk_bytes` (no disk filled, nothing left behind); as root, a Python installed under a directory others cannot enter (`/root/.pyenv`) is
   bound alone into a fresh tmpfs over that directory, so the rest of it (keys, tokens) stays out of sight;
   in a user namespace (same uid as the caller) `/proc` is covered so the caller's `/proc/PID/environ` is too;
3. rlimits: CPU seconds, address space, file size, open files, no core files, processes;
4. as root: a uid of its own (1,000,000,000 + pid) with no groups, so the process limit counts only it and
   it can neither signal nor read what root owns;
5. a seccomp filter (x86_64, aarch64): fork/clone (processes and threads), sockets, mount and namespace
   calls, ptrace and cross-process memory, signals to other processes, io_uring, bpf and keyrings fail with
   EPERM; a syscall of another architecture kills the process.

Then it runs the program as `__main__` and reports on the status pipe (fd `status_fd`), one JSON per line:
`{"ready": [layers]}` after locking in, then `{"finished": SENTINEL}` when the program ran to its end, or
`{"error": ...}` / `{"exit": ...}`. The parent counts a pass only with the sentinel and exit status 0, so
`os._exit(0)` or `sys.exit(0)` before the tests is not a pass. A program that reads this process's own memory
could find the sentinel: this guards against accidents and simple hacks, not a determined attacker.
"""

import ctypes
import errno
import json
import os
import platform
import resource
import signal
import stat
import sys
import traceback

JOB = "job.json"
CANDIDATE = "candidate.py"  # the file name the program's tracebacks show

CLONE_NEWNS, CLONE_NEWUSER, CLONE_NEWNET = 0x00020000, 0x10000000, 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 0x1, 0x2, 0x4, 0x8
MS_REMOUNT, MS_NOATIME, MS_NODIRATIME, MS_BIND, MS_REC, MS_PRIVATE, MS_RELATIME = (
    0x20, 0x400, 0x800, 0x1000, 0x4000, 0x40000, 0x200000)
MOUNT_ATTR_RDONLY, AT_RECURSIVE, AT_FDCWD, SYS_MOUNT_SETATTR = 0x1, 0x8000, -100, 442
PR_SET_PDEATHSIG, PR_SET_NO_NEW_PRIVS, PR_SET_SECCOMP, SECCOMP_MODE_FILTER = 1, 38, 22, 2
SECCOMP_RET_KILL_PROCESS, SECCOMP_RET_ERRNO, SECCOMP_RET_ALLOW = 0x80000000, 0x00050000, 0x7FFF0000

# name -> (x86_64, aarch64) syscall numbers (asm/unistd_64.h, asm-generic/unistd.h); None where absent
DENIED = {
    "clone": (56, 220), "fork": (57, None), "vfork": (58, None),  # no new processes or threads
    "socket": (41, 198),  # no network, no unix sockets to local daemons
    "mount": (165, 40), "umount2": (166, 39), "pivot_root": (155, 41), "unshare": (272, 97), "setns": (308, 268),
    "mount_setattr": (442, 442), "open_tree": (428, 428), "move_mount": (429, 429), "fsopen": (430, 430),
    "fsconfig": (431, 431), "fsmount": (432, 432), "fspick": (433, 433),  # the mounts stay as set
    "ptrace": (101, 117), "process_vm_readv": (310, 270), "process_vm_writev": (311, 271), "pidfd_getfd": (438, 438),
    "kill": (62, 129), "tkill": (200, 130), "tgkill": (234, 131), "rt_sigqueueinfo": (129, 138),
    "rt_tgsigqueueinfo": (297, 240), "pidfd_send_signal": (424, 424),  # a same-uid child could signal its parent
    "io_uring_setup": (425, 425), "io_uring_enter": (426, 426), "io_uring_register": (427, 427),  # bypasses seccomp
    "bpf": (321, 280), "perf_event_open": (298, 241), "userfaultfd": (323, 282),
    "keyctl": (250, 219), "add_key": (248, 217), "request_key": (249, 218),
}
ENOSYS_CALLS = {"clone3": (435, 435)}  # "not implemented" makes libc fall back to clone, which is refused
ARCHES = {"x86_64": (0, 0xC000003E), "amd64": (0, 0xC000003E), "aarch64": (1, 0xC00000B7), "arm64": (1, 0xC00000B7)}

libc = ctypes.CDLL(None, use_errno=True)


def _check(result: int, what: str) -> None:
    if result != 0:
        code = ctypes.get_errno()
        raise OSError(code, f"{what}: {os.strerror(code)}")


def unshare(flags: int) -> None:
    _check(libc.unshare(ctypes.c_int(flags)), "unshare")


def mount(source, target, fstype, flags: int, data=None) -> None:
    encode = lambda text: None if text is None else str(text).encode()  # noqa: E731
    _check(libc.mount(encode(source), encode(target), encode(fstype), ctypes.c_ulong(flags), encode(data)),
           f"mount {target}")


class MountAttr(ctypes.Structure):
    _fields_ = [("attr_set", ctypes.c_uint64), ("attr_clr", ctypes.c_uint64),
                ("propagation", ctypes.c_uint64), ("userns_fd", ctypes.c_uint64)]


def mount_setattr(path: str, attr_set: int, attr_clr: int, recursive: bool) -> None:
    attr = MountAttr(attr_set, attr_clr, 0, 0)
    _check(libc.syscall(ctypes.c_long(SYS_MOUNT_SETATTR), ctypes.c_int(AT_FDCWD), path.encode(),
                        ctypes.c_uint(AT_RECURSIVE if recursive else 0), ctypes.byref(attr),
                        ctypes.c_size_t(ctypes.sizeof(attr))), f"mount_setattr {path}")


def enter_namespaces(as_root: bool) -> list[str]:
    """A new network and mount namespace: as root directly, else through a user namespace mapping our ids."""
    layers = ["network namespace", "mount namespace"]
    if as_root:
        unshare(CLONE_NEWNET | CLONE_NEWNS)
    else:
        uid, gid = os.getuid(), os.getgid()
        unshare(CLONE_NEWUSER | CLONE_NEWNET | CLONE_NEWNS)
        for path, text in (("/proc/self/setgroups", "deny"), ("/proc/self/uid_map", f"{uid} {uid} 1"),
                           ("/proc/self/gid_map", f"{gid} {gid} 1")):
            with open(path, "w") as handle:
                handle.write(text)
        layers.insert(0, "user namespace")
    mount(None, "/", None, MS_REC | MS_PRIVATE)  # before any mount: none may propagate to the caller's (systemd: shared)
    return layers


def _reachable_by_others(path: str) -> bool:
    parts = os.path.abspath(path).split(os.sep)[1:]
    return all(os.stat(os.sep + os.path.join(*parts[:i]) if i else os.sep).st_mode & stat.S_IXOTH
               for i in range(len(parts) + 1))


def expose_python(paths: list[str]) -> list[str]:
    """As root about to become another uid: make the standard library readable to it when it lives under a
    directory others cannot enter. A tmpfs covers that directory and only the library is bound back into it."""
    hidden = []
    for path in sorted({p for p in paths if os.path.isdir(p)}):
        if _reachable_by_others(path) or any(path.startswith(done + os.sep) for done in hidden):
            continue
        parts = path.split(os.sep)
        cover = next(os.sep.join(parts[:i]) for i in range(2, len(parts) + 1)
                     if not os.stat(os.sep.join(parts[:i])).st_mode & stat.S_IXOTH)
        keep = [p for p in paths if os.path.isdir(p) and p.startswith(cover + os.sep)]
        handles = {p: os.open(p, os.O_PATH) for p in keep}  # the originals, reachable after the tmpfs covers them
        try:
            mount("tmpfs", cover, "tmpfs", MS_NOSUID | MS_NODEV, "mode=755,size=1m")
            for target in sorted(keep):
                if any(target.startswith(other + os.sep) for other in keep if other != target):
                    continue  # inside another kept directory, which brings it along
                os.makedirs(target, exist_ok=True)
                mount(f"/proc/self/fd/{handles[target]}", target, None, MS_BIND | MS_REC)
        finally:
            for handle in handles.values():
                os.close(handle)
        hidden.append(cover)
    return [f"{cover} hidden but the Python library" for cover in hidden]


def _remount_each_read_only() -> None:
    """Kernels before 5.12 (no mount_setattr): remount every mount read-only, keeping its other flags
    (a user namespace may not drop nosuid/nodev/noexec from a mount it did not make)."""
    names = {"nosuid": MS_NOSUID, "nodev": MS_NODEV, "noexec": MS_NOEXEC, "noatime": MS_NOATIME,
             "nodiratime": MS_NODIRATIME, "relatime": MS_RELATIME}
    with open("/proc/self/mountinfo") as handle:
        mounts = [line.split() for line in handle]
    for fields in mounts:
        target = fields[4].encode().decode("unicode_escape")  # mountinfo writes spaces as \040
        flags = sum(names.get(option, 0) for option in fields[5].split(","))
        try:
            mount(None, target, None, MS_REMOUNT | MS_BIND | MS_RDONLY | flags)
        except OSError as error:
            if error.errno not in (errno.ENOENT, errno.EACCES):  # a mount covered by a later one
                raise


def read_only_but(workdir: str, disk_bytes: int, disabled: set) -> list[str]:
    """Every mount read-only; the working directory a fresh tmpfs of `disk_bytes` (no disk filled, no file
    left behind) that alone stays writable."""
    mount("tmpfs", workdir, "tmpfs", MS_NOSUID | MS_NODEV, f"size={disk_bytes},mode=700")
    if "mount_setattr" not in disabled:
        try:
            mount_setattr("/", MOUNT_ATTR_RDONLY, 0, recursive=True)
            mount_setattr(workdir, 0, MOUNT_ATTR_RDONLY, recursive=False)
            return ["read-only filesystem"]
        except OSError as error:
            if error.errno not in (errno.ENOSYS, errno.EINVAL):
                raise
    _remount_each_read_only()
    mount(None, workdir, None, MS_REMOUNT | MS_BIND | MS_NOSUID | MS_NODEV)
    return ["read-only filesystem (remounted)"]


class SockFilter(ctypes.Structure):
    _fields_ = [("code", ctypes.c_ushort), ("jt", ctypes.c_ubyte), ("jf", ctypes.c_ubyte), ("k", ctypes.c_uint32)]


class SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(SockFilter))]


def install_seccomp() -> list[str]:
    """A classic-BPF filter: the architecture must be ours, the denied calls return EPERM (clone3 ENOSYS)."""
    arch = ARCHES.get(platform.machine().lower())
    if arch is None:
        return []
    column, audit_arch = arch
    load, jeq, jge, ret = 0x20, 0x15, 0x35, 0x06  # BPF_LD|W|ABS, BPF_JMP|JEQ|K, BPF_JMP|JGE|K, BPF_RET|K
    program = [(load, 0, 0, 4), (jeq, 1, 0, audit_arch), (ret, 0, 0, SECCOMP_RET_KILL_PROCESS), (load, 0, 0, 0)]
    if column == 0:  # x32 calls (nr | 0x40000000) would dodge the numbers below
        program += [(jge, 0, 1, 0x40000000), (ret, 0, 0, SECCOMP_RET_ERRNO | errno.EPERM)]
    for numbers, code in ((DENIED, errno.EPERM), (ENOSYS_CALLS, errno.ENOSYS)):
        for pair in numbers.values():
            if pair[column] is not None:
                program += [(jeq, 0, 1, pair[column]), (ret, 0, 0, SECCOMP_RET_ERRNO | code)]
    program.append((ret, 0, 0, SECCOMP_RET_ALLOW))
    filters = (SockFilter * len(program))(*[SockFilter(*instruction) for instruction in program])
    fprog = SockFprog(len(program), filters)
    _check(libc.prctl(ctypes.c_int(PR_SET_SECCOMP), ctypes.c_ulong(SECCOMP_MODE_FILTER), ctypes.byref(fprog),
                      ctypes.c_ulong(0), ctypes.c_ulong(0)), "seccomp")
    return ["seccomp: no forks, threads, sockets, mounts, signals to others"]


def refuse_sockets_in_python() -> list[str]:
    """Where seccomp is not available: the socket module refuses (a program using ctypes gets past this)."""
    import socket

    def refuse(*args, **kwargs):
        raise PermissionError(errno.EPERM, "network access is disabled in the sandbox")

    socket.socket = socket.create_connection = socket.socketpair = refuse
    return ["socket module refuses"]


def set_limits(limits: dict) -> None:
    for name, value in (("RLIMIT_CPU", (limits["cpu_s"], limits["cpu_s"] + 1)),
                        ("RLIMIT_AS", (limits["memory_bytes"],) * 2), ("RLIMIT_FSIZE", (limits["file_bytes"],) * 2),
                        ("RLIMIT_NOFILE", (limits["open_files"],) * 2), ("RLIMIT_CORE", (0, 0)),
                        ("RLIMIT_NPROC", (1, 1))):  # a uid of its own: no second process (seccomp says so too)
        resource.setrlimit(getattr(resource, name), value)


def lock_in(job: dict) -> list[str]:
    """Apply every layer the kernel allows; a layer it refuses is left out of the list, never silently faked."""
    disabled = set(job.get("disable", ()))
    as_root = os.geteuid() == 0
    workdir = os.getcwd()
    layers = []
    namespaces = False
    if "namespaces" not in disabled:
        try:
            layers += enter_namespaces(as_root)
            namespaces = True
        except OSError:
            pass  # a container without CAP_SYS_ADMIN, a kernel without user namespaces: the other layers hold
    library = [path for path in sys.path if os.path.isdir(path)]
    own_uid = as_root and "uid" not in disabled
    if namespaces:
        if own_uid:
            layers += expose_python(library)
        layers += read_only_but(workdir, job["limits"]["disk_bytes"], disabled)
        os.chdir(workdir)  # the old working directory is on the read-only mount under the new tmpfs
        if not as_root:  # the same uid as the caller could read its /proc/PID/environ
            mount("tmpfs", "/proc", "tmpfs", MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC, "size=4k,mode=555")
            layers.append("/proc hidden")
    elif own_uid and not all(_reachable_by_others(path) for path in library):
        own_uid = False  # another uid could not import the standard library, and no mount namespace can fix it
    set_limits(job["limits"])
    if own_uid:
        uid = 1_000_000_000 + os.getpid()
        os.chown(workdir, uid, uid)
        os.setgroups([])
        os.setgid(uid)
        os.setuid(uid)
        layers.append(f"uid {uid}")
    libc.prctl(ctypes.c_int(PR_SET_PDEATHSIG), ctypes.c_ulong(signal.SIGKILL), 0, 0, 0)  # after setuid, which clears it
    _check(libc.prctl(ctypes.c_int(PR_SET_NO_NEW_PRIVS), ctypes.c_ulong(1), ctypes.c_ulong(0), ctypes.c_ulong(0),
                      ctypes.c_ulong(0)), "no_new_privs")
    seccomp = [] if "seccomp" in disabled else install_seccomp()
    layers += seccomp
    if not seccomp and "socket_patch" not in disabled:
        layers += refuse_sockets_in_python()
    return layers


def describe(error: BaseException, code: str) -> str:
    """`AssertionError (line 12: assert f(3) == 4)`: the exception and the program's line it came from."""
    text = f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
    text = text if len(text) <= 300 else text[:300] + "..."
    summary = traceback.StackSummary.extract(traceback.walk_tb(error.__traceback__), lookup_lines=False)
    frames = [frame for frame in summary if frame.filename == CANDIDATE]
    if frames:
        lines = code.splitlines()
        number = frames[-1].lineno or 0
        source = lines[number - 1].strip() if 0 < number <= len(lines) else ""
        text += f" (line {number}: {source[:200]})" if source else f" (line {number})"
    return text


def flush_quietly() -> None:
    """Flush the program's buffered output; a closed or broken stream is no verdict of its own."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except BaseException:  # noqa: BLE001
            pass


def main() -> None:
    with open(JOB) as handle:
        job = json.load(handle)
    os.unlink(JOB)
    status = job["status_fd"]

    def report(**message) -> None:
        os.write(status, (json.dumps(message) + "\n").encode())

    try:
        layers = lock_in(job)
    except Exception as error:  # noqa: BLE001 - the parent reports it as a sandbox error, not a verdict
        report(setup_failed=f"{type(error).__name__}: {error}")
        os._exit(3)
    report(ready=layers)
    code, sentinel = job["code"], job["sentinel"]
    del job
    sys.argv = [CANDIDATE]
    try:
        exec(compile(code, CANDIDATE, "exec"), {"__name__": "__main__", "__builtins__": __builtins__})
        sys.stdout.flush()
        sys.stderr.flush()
    except SystemExit as error:
        flush_quietly()  # os._exit skips it: what the program printed before it stopped belongs in its output
        report(exit=f"exit({error.code!r}) before the end")
        os._exit(4)
    except MemoryError:
        report(error="MemoryError")
        os._exit(5)
    except BaseException as error:  # noqa: BLE001 - whatever the program raised is its verdict
        flush_quietly()
        report(error=describe(error, code))
        os._exit(1)
    report(finished=sentinel)
    os._exit(0)  # the program's atexit handlers do not run: it is done


if __name__ == "__main__":
    main()
