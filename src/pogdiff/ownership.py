"""Which folders are pogdiff's to replace, and which process is writing into one now.

``pogdiff train`` puts a mark file, :data:`MARK_FILE`, into the run folder it creates, before
anything else. Only a marked folder may be replaced (``--overwrite``) or continued
(``--resume-from-checkpoint``): a folder that merely looks like a run (it holds
``checkpoint-*``, as every diffusers training output does) is someone else's.

The mark file is also the run's lock: the writing process holds an exclusive ``flock`` on
it for as long as it writes. The kernel drops that lock when the process ends, however it
ends (SIGKILL included), so a second writer is refused while the first lives and a killed
run never leaves a stuck lock behind.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from collections.abc import Iterator
from pathlib import Path

from pogdiff.errors import PogdiffError

MARK_FILE = ".pogdiff-run"


def is_marked(folder: str | Path) -> bool:
    return (Path(folder) / MARK_FILE).is_file()


def entries(folder: str | Path) -> list[Path]:
    """What a folder holds besides the mark (a marked folder holding nothing else is as good as empty)."""
    folder = Path(folder)
    return [p for p in folder.iterdir() if p.name != MARK_FILE] if folder.is_dir() else []


def refuse_if_in_use(folder: str | Path) -> None:
    """Raise when another live process holds ``folder``'s lock. Writes nothing."""
    if not is_marked(folder):
        return
    fd = os.open(Path(folder) / MARK_FILE, os.O_RDONLY)
    try:
        if not _try_lock(fd):
            raise _in_use(Path(folder), fd)
        fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


@contextlib.contextmanager
def claimed(folder: str | Path) -> Iterator[Path]:
    """Mark ``folder`` (which must exist) as pogdiff's run and hold its lock for the block."""
    folder = Path(folder)
    fd = os.open(folder / MARK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        if not _try_lock(fd):
            raise _in_use(folder, fd)
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"writer_pid": os.getpid()}).encode())
        yield folder
    finally:
        os.close(fd)  # closing the only descriptor releases the lock


def _try_lock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _in_use(folder: Path, fd: int) -> PogdiffError:
    try:
        pid = json.loads(os.pread(fd, 4096, 0) or b"{}").get("writer_pid")
    except (OSError, ValueError):
        pid = None
    who = f"pogdiff process {pid}" if pid else "another pogdiff process"
    return PogdiffError(f"{folder}: {who} is writing into this folder now; wait for it to end, "
                        "or choose another --output-dir")
