"""The marks that make a folder pogdiff's own, and which process is writing into one now.

Each command that writes a folder puts its kind's mark there first (:data:`MARKS`): a hidden
``.pogdiff-<kind>`` file. One rule holds for every kind: a folder is the command's own when
its mark is there (:func:`is_marked`); only then may it be replaced, continued or written
into again. A folder that merely looks like a run (it holds ``checkpoint-*``, as every
diffusers training output does) is someone else's. Folders written before the marks were
one scheme carry their first file instead, which is still read as the mark
(:data:`EARLIER_MARKS`).

A mark is also the folder's lock: the writing process holds an exclusive ``flock`` on it
for as long as it writes (:func:`claimed`). The kernel drops that lock when the process
ends, however it ends (SIGKILL included), so a second writer is refused while the first
lives and a killed run never leaves a stuck lock behind.

Some filesystems (Lustre mounted without ``flock``, some FUSE and NFS mounts) answer ``flock`` with
ENOSYS, EOPNOTSUPP or ENOLCK. There the lock is a file created with ``O_CREAT | O_EXCL`` next to the mark
(``.pogdiff-<kind>.lock``, :func:`lock_file`) holding the writer's host and pid, removed when the writer
ends, with a one-time warning: a lock file whose process is gone on this host is stale and taken over; one
left by a process killed on another host is named in the refusal, to be removed by hand.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import warnings
from collections.abc import Iterator
from pathlib import Path

from pogdiff.errors import PogdiffError, PogdiffWarning
from pogdiff.backbones.shipped import MANIFEST_FILE, SHIPPED_NAME

RUN, EVALUATION, BENCHMARK, DEMO, RELEASE, SAMPLES = "run", "evaluation", "benchmark", "demo", "release", "samples"
MARKS = {kind: f".pogdiff-{kind}" for kind in (RUN, EVALUATION, BENCHMARK, DEMO)}
MARK_FILE = MARKS[RUN]
# The first file each kind wrote before it had a mark (a release, shipped inside the package, keeps this one:
# its manifest naming the shipped backbone); `pogdiff sample` owns no folder, only the files it writes.
EARLIER_MARKS = {BENCHMARK: ("benchmark.json", None), DEMO: ("data/synth.json", None),
                 RELEASE: (MANIFEST_FILE, SHIPPED_NAME)}
# flock's answers on a filesystem that does not lock (Lustre without -o flock, some FUSE and NFS mounts)
NO_FLOCK = {errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOLCK}
_warned_no_flock = False  # the fallback's warning is given once per process


def is_marked(folder: str | Path, kind: str = RUN) -> bool:
    """Whether ``folder`` holds the mark of ``kind`` (or the one it had before :data:`MARKS`)."""
    folder = Path(folder)
    if kind in MARKS and (folder / MARKS[kind]).is_file():
        return True
    if kind not in EARLIER_MARKS:
        return False
    file, name = EARLIER_MARKS[kind]
    if name is None:
        return (folder / file).is_file()
    try:
        return json.loads((folder / file).read_text()).get("name") == name
    except (OSError, ValueError, AttributeError):
        return False


def entries(folder: str | Path, kind: str = RUN) -> list[Path]:
    """What a folder holds besides the mark (a marked folder holding nothing else is as good as empty)."""
    folder = Path(folder)
    ours = {MARKS[kind], lock_file(folder, kind).name} if kind in MARKS else set()
    return [p for p in folder.iterdir() if p.name not in ours] if folder.is_dir() else []


def lock_file(folder: str | Path, kind: str = RUN) -> Path:
    """The lock of a folder on a filesystem without ``flock`` (:func:`claimed`)."""
    return Path(folder) / f"{MARKS[kind]}.lock"


def refuse_if_in_use(folder: str | Path, kind: str = RUN, flag: str = "--output-dir") -> None:
    """Raise when another live process holds ``folder``'s lock (``flag``: the option naming it). Writes nothing
    (a stale lock file is left for :func:`claimed` to take over)."""
    path = Path(folder) / MARKS[kind]
    if not path.is_file():
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        locked = _try_lock(fd)
        if locked is None:
            holder = _live_holder(lock_file(folder, kind))
            if holder is not None:
                raise _held_by(Path(folder), lock_file(folder, kind), holder, flag)
        elif not locked:
            raise _in_use(Path(folder), fd, flag)
        else:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


@contextlib.contextmanager
def claimed(folder: str | Path, kind: str = RUN, flag: str = "--output-dir") -> Iterator[Path]:
    """Mark ``folder`` (which must exist) as pogdiff's ``kind`` and hold its lock for the block (where the
    filesystem has no ``flock``: its lock file, :func:`lock_file`)."""
    folder = Path(folder)
    fd = os.open(folder / MARKS[kind], os.O_RDWR | os.O_CREAT, 0o644)
    taken = None
    try:
        locked = _try_lock(fd)
        if locked is None:
            taken = _take_lock_file(folder, kind, flag)
        elif not locked:
            raise _in_use(folder, fd, flag)
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"writer_pid": os.getpid()}).encode())
        yield folder
    finally:
        os.close(fd)  # closing the only descriptor releases the lock
        if taken is not None:
            _release_lock_file(*taken)


def _try_lock(fd: int) -> bool | None:
    """Whether the exclusive lock was taken; None where the filesystem has no ``flock`` (:data:`NO_FLOCK`)."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    except OSError as error:
        if error.errno in NO_FLOCK:
            _warn_no_flock(error)
            return None
        raise
    return True


def _warn_no_flock(error: OSError) -> None:
    global _warned_no_flock
    if not _warned_no_flock:
        _warned_no_flock = True
        warnings.warn(f"this filesystem does not lock files with flock ({error.strerror or error}); a lock file "
                      "holding the writer's host and pid (.pogdiff-<kind>.lock) guards each folder instead, and a "
                      "run killed on another host leaves it behind: remove it once that run is gone",
                      PogdiffWarning)


def _holder(path: Path) -> dict | None:
    """What a lock file says of its writer ({"host", "pid"}); None when it is not there. A file being written
    this instant, or damaged, is {} (taken as held: its remedy, removing it, is in the refusal)."""
    try:
        holder = json.loads(path.read_text() or "{}")
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}
    return holder if isinstance(holder, dict) else {}


def _alive(pid) -> bool:
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, ValueError, TypeError, OverflowError):
        return True  # another user's process; or no pid to tell by
    return True


def _live_holder(path: Path) -> dict | None:
    """The holder of the lock file ``path``, None when there is none or its process is gone from this host."""
    holder = _holder(path)
    if holder is None or (holder.get("host") == socket.gethostname() and not _alive(holder.get("pid"))):
        return None
    return holder


def _take_lock_file(folder: Path, kind: str, flag: str) -> tuple[Path, dict]:
    """Create the lock file of ``folder`` (O_EXCL) with this process's host and pid, taking over a stale one."""
    path, me = lock_file(folder, kind), {"host": socket.gethostname(), "pid": os.getpid()}
    for _ in range(3):
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            holder = _live_holder(path)
            if holder is not None:
                raise _held_by(folder, path, holder, flag) from None
            with contextlib.suppress(FileNotFoundError):
                path.unlink()  # its process is gone: a stale lock
            continue
        try:
            os.write(fd, json.dumps(me).encode())
        finally:
            os.close(fd)
        return path, me
    raise _held_by(folder, path, _holder(path) or {}, flag)


def _release_lock_file(path: Path, me: dict) -> None:
    """Remove the lock file if it is still this process's."""
    if _holder(path) == me:
        with contextlib.suppress(OSError):
            path.unlink()


def _held_by(folder: Path, path: Path, holder: dict, flag: str) -> PogdiffError:
    pid, host = holder.get("pid"), holder.get("host")
    if pid and host == socket.gethostname():
        return PogdiffError(f"{folder}: pogdiff process {pid} is writing into this folder now; wait for it to end, "
                            f"or choose another {flag}")
    who = f"pogdiff process {pid} on {host}" if pid and host else "another pogdiff process"
    return PogdiffError(f"{folder}: {who} is writing into this folder now (its lock: {path}); wait for it to end, "
                        f"or, if it is gone, remove {path.name}; or choose another {flag}")


def _in_use(folder: Path, fd: int, flag: str) -> PogdiffError:
    try:
        pid = json.loads(os.pread(fd, 4096, 0) or b"{}").get("writer_pid")
    except (OSError, ValueError):
        pid = None
    who = f"pogdiff process {pid}" if pid else "another pogdiff process"
    return PogdiffError(f"{folder}: {who} is writing into this folder now; wait for it to end, "
                        f"or choose another {flag}")
