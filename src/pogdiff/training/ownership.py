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
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from collections.abc import Iterator
from pathlib import Path

from pogdiff.errors import PogdiffError
from pogdiff.backbones.shipped import MANIFEST_FILE, SHIPPED_NAME

RUN, EVALUATION, BENCHMARK, DEMO, RELEASE, SAMPLES = "run", "evaluation", "benchmark", "demo", "release", "samples"
MARKS = {kind: f".pogdiff-{kind}" for kind in (RUN, EVALUATION, BENCHMARK, DEMO)}
MARK_FILE = MARKS[RUN]
# The first file each kind wrote before it had a mark (a release, shipped inside the package, keeps this one:
# its manifest naming the shipped backbone); `pogdiff sample` owns no folder, only the files it writes.
EARLIER_MARKS = {BENCHMARK: ("benchmark.json", None), DEMO: ("data/synth.json", None),
                 RELEASE: (MANIFEST_FILE, SHIPPED_NAME)}


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
    return [p for p in folder.iterdir() if p.name != MARKS.get(kind)] if folder.is_dir() else []


def refuse_if_in_use(folder: str | Path, kind: str = RUN, flag: str = "--output-dir") -> None:
    """Raise when another live process holds ``folder``'s lock (``flag``: the option naming it). Writes nothing."""
    path = Path(folder) / MARKS[kind]
    if not path.is_file():
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        if not _try_lock(fd):
            raise _in_use(Path(folder), fd, flag)
        fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


@contextlib.contextmanager
def claimed(folder: str | Path, kind: str = RUN, flag: str = "--output-dir") -> Iterator[Path]:
    """Mark ``folder`` (which must exist) as pogdiff's ``kind`` and hold its lock for the block."""
    folder = Path(folder)
    fd = os.open(folder / MARKS[kind], os.O_RDWR | os.O_CREAT, 0o644)
    try:
        if not _try_lock(fd):
            raise _in_use(folder, fd, flag)
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


def _in_use(folder: Path, fd: int, flag: str) -> PogdiffError:
    try:
        pid = json.loads(os.pread(fd, 4096, 0) or b"{}").get("writer_pid")
    except (OSError, ValueError):
        pid = None
    who = f"pogdiff process {pid}" if pid else "another pogdiff process"
    return PogdiffError(f"{folder}: {who} is writing into this folder now; wait for it to end, "
                        f"or choose another {flag}")
