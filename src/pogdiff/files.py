"""Writing files and folders so that a reader never finds half of one, and telling a half-written one.

Writers that are not Python's own (safetensors, ``torch.save``) report a full or read-only
disk as ``SafetensorError`` or ``RuntimeError``; :func:`write_errors_as_os_errors` turns
those into the ``OSError`` that every caller already handles (a warning for a cache, a
one-line error for a run), so a full disk is one kind of error wherever it happens.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import secrets
import shutil
import socket
import struct
import zipfile
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from safetensors import SafetensorError, safe_open

# torch.save's zip writer says no more than this when the disk fills ("unexpected pos 576 vs 534")
_TORCH_WRITE_FAILURE = re.compile(r"inline_container|PytorchStreamWriter|file write failed|unexpected pos")
_OS_ERROR_CODE = re.compile(r"os error (\d+)")
_NOT_IN_FILE_NAMES = re.compile(r"[^A-Za-z0-9._-]+")
TORCH_SUFFIXES = (".bin", ".pkl", ".pt", ".pth")  # torch.save writes a zip archive


@contextlib.contextmanager
def atomic_path(target: str | Path) -> Iterator[Path]:
    """A temporary path next to ``target`` to write a file or folder to, renamed onto ``target`` at the end.

    The rename (``os.replace``) happens only when the block finishes; on any error, a
    KeyboardInterrupt included, the temporary file or folder is removed and the error goes
    on (a write error of safetensors or torch as an ``OSError``), so ``target`` is either
    absent, as it was, or complete.
    """
    target = Path(target)
    tmp = temporary_path(target)
    try:
        with write_errors_as_os_errors(target):
            yield tmp
            os.replace(tmp, target)
    finally:
        remove_quietly(tmp)


def temporary_path(target: str | Path) -> Path:
    """A name next to ``target`` that no other writer uses, on this machine or another sharing the folder:
    ``.NAME.HOST.PID.TOKEN.tmp`` (a pid alone repeats across machines and containers; the random token makes it
    unique, the host and pid tell whose it is)."""
    target = Path(target)
    return target.with_name(f".{target.name}.{safe_stem(socket.gethostname(), 40)}.{os.getpid()}."
                            f"{secrets.token_hex(4)}.tmp")


@contextlib.contextmanager
def atomic_folder(target: str | Path, complete: Callable[[Path], bool]) -> Iterator[Path]:
    """:func:`atomic_path` for a folder that other processes, here or on other machines, may be writing at the
    same time: the folder written under :func:`temporary_path` is renamed onto ``target``. When another process
    renamed its own first (ENOTEMPTY or EEXIST), theirs is kept if ``complete(target)`` and this one is removed; a
    ``target`` that is not complete (damaged) is moved aside and replaced. Either way ``target`` is then complete."""
    target = Path(target)
    tmp = temporary_path(target)
    try:
        with write_errors_as_os_errors(target):
            yield tmp
            for _ in range(3):
                try:
                    os.rename(tmp, target)
                    return
                except OSError as error:
                    if error.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                        raise
                if complete(target):
                    return  # another process's, as good as this one's (removed below)
                aside = temporary_path(target)
                try:
                    os.rename(target, aside)
                except FileNotFoundError:  # another process moved it aside first
                    continue
                remove_quietly(aside)
            raise OSError(errno.ENOTEMPTY, "another process keeps writing an incomplete folder here", str(target))
    finally:
        remove_quietly(tmp)


@contextlib.contextmanager
def write_errors_as_os_errors(target: str | Path) -> Iterator[None]:
    """Re-raise a safetensors or torch write failure inside the block as an ``OSError`` about ``target``."""
    try:
        yield
    except SafetensorError as error:
        code = _OS_ERROR_CODE.search(str(error))
        if code is None:
            raise
        number = int(code.group(1))
        raise OSError(number, os.strerror(number), str(target)) from error
    except RuntimeError as error:
        if not _TORCH_WRITE_FAILURE.search(str(error)):
            raise
        number = errno.ENOSPC if _nearly_full(Path(target)) else errno.EIO
        raise OSError(number, os.strerror(number), str(target)) from error


def _nearly_full(target: Path) -> bool:
    """Whether the disk ``target`` is on has less than 1 MiB left (torch's failed write says no more)."""
    folder = next((p for p in (target, *target.parents) if p.is_dir()), Path("."))
    return shutil.disk_usage(folder).free < 2**20


def remove_quietly(path: Path) -> None:
    """Remove a file or folder if it is there; a clean-up that fails (read-only disk, a file for a
    parent folder) must not hide the error that made it necessary."""
    with contextlib.suppress(OSError):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)


def sha256(path: str | Path) -> str:
    """The sha256 of a file's bytes, read a MiB at a time."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def stat_signature(path: str | Path) -> list[int]:
    """What tells a file unchanged since it was read: size, mtime, ctime and inode (a rewrite in place whose mtime
    was put back with ``os.utime`` still changes the ctime)."""
    stat = os.stat(path)
    return [stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns, stat.st_ino]


def remembered_sha256(root: Path, names: list[str], memo_path: Path, what: str, progress: bool = False) -> list[str]:
    """sha256 of each file ``root / name``, remembered in ``memo_path`` by its :func:`stat_signature`: a file is
    read again only when it changes. A memo that cannot be written is a warning; the digests are right either way."""
    import warnings

    from tqdm.auto import tqdm

    from pogdiff.errors import PogdiffWarning

    try:
        memo = json.loads(memo_path.read_text())
    except (OSError, ValueError):
        memo = {}
    memo = memo if isinstance(memo, dict) else {}
    digests, changed = [], False
    for name in tqdm(names, desc=f"hash {what}", unit="file", disable=not progress, dynamic_ncols=True):
        seen = stat_signature(root / name)
        known = memo.get(name)
        if not (isinstance(known, list) and len(known) == len(seen) + 1 and known[:-1] == seen):
            known = [*seen, sha256(root / name)]
            memo[name], changed = known, True
        digests.append(known[-1])
    if changed:
        try:
            memo_path.parent.mkdir(parents=True, exist_ok=True)
            write_text_atomic(memo_path, json.dumps(memo))
        except OSError as error:
            warnings.warn(f"{memo_path}: cannot write ({error.strerror or error}); {what} will be hashed again next "
                          "time (free space or pass --cache-dir)", PogdiffWarning)
    return digests


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` through :func:`atomic_path`."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def incomplete(path: str | Path) -> str | None:
    """Why a safetensors or torch (zip) file is not whole, e.g. cut short by a full disk; None when it is.

    Reads the header and the index only, not the tensors.
    """
    path = Path(path)
    if path.suffix == ".safetensors":
        return _incomplete_safetensors(path)
    with open(path, "rb") as file:
        if path.suffix not in TORCH_SUFFIXES or file.read(1) == b"\x80":  # not torch's, or its pre-zip format
            return None
        try:
            with zipfile.ZipFile(file):
                return None
        except zipfile.BadZipFile as error:
            return f"not a whole torch file ({error})"


def _incomplete_safetensors(path: Path) -> str | None:
    """``safe_open`` checks the header against the file; of a file it refuses, the size the header declares
    (``safe_open`` does not say it) tells how much is missing."""
    try:
        with safe_open(path, "np"):
            return None
    except SafetensorError as error:
        refused = str(error)
    size = path.stat().st_size
    with open(path, "rb") as file:
        start = file.read(8)
        if len(start) < 8:
            return f"{size} bytes, too short for a safetensors header"
        (header_size,) = struct.unpack("<Q", start)
        try:  # the header: 8 bytes of length, then JSON giving each tensor's [start, end) after it
            header = json.loads(file.read(header_size)) if header_size <= size else None
            expected = 8 + header_size + max((e["data_offsets"][1] for n, e in header.items() if n != "__metadata__"),
                                             default=0)
        except (UnicodeDecodeError, ValueError, AttributeError, KeyError, TypeError, IndexError):
            return "its safetensors header is cut short or damaged"
    return f"{size} of its {expected} bytes" if size != expected else f"its safetensors header is damaged ({refused})"


def safe_stem(text: str, limit: int = 80) -> str:
    """``text`` as a file name: each run of characters other than ASCII letters, digits, '.', '_' and '-'
    becomes '_', with no leading dot (so never '..' nor a hidden file), at most ``limit`` characters."""
    return _NOT_IN_FILE_NAMES.sub("_", text).lstrip(".")[:limit] or "_"


def file_stems(names: Iterable[str]) -> dict[str, str]:
    """A distinct, safe file-name stem for each of ``names`` (any strings: 'AC/DC', '../../x', 'Zoë').

    A name that :func:`safe_stem` keeps as it is stays readable; one it changes, or one that
    would differ from another only in letter case (the same file on macOS and Windows), gets
    a short hash of the name appended.
    """
    names = list(dict.fromkeys(names))
    folded = Counter(safe_stem(name).lower() for name in names)
    stems = {}
    for name in names:
        stem = safe_stem(name)
        if stem != name or folded[stem.lower()] > 1:
            stem = f"{stem}-{hashlib.sha256(name.encode()).hexdigest()[:10]}"
        stems[name] = stem
    return stems


def apply_umask(path: str | Path) -> None:
    """Give ``path`` the mode a new file gets under the process's umask (0644 under 022): safetensors writes
    its files 0600, which a team sharing a cache or run folder cannot read."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, 0o666 & ~mask)


def apply_umask_to_tree(path: str | Path) -> None:
    """:func:`apply_umask` on ``path`` or every file under it that safetensors left owner-only (0600)."""
    path = Path(path)
    for path in [path] if path.is_file() else path.rglob("*"):
        if path.is_file() and not path.is_symlink() and path.stat().st_mode & 0o777 == 0o600:
            apply_umask(path)
