"""Sharded caches read by row: per-row tables too large to hold in memory (latents, caption states,
image features), written in shards as they are computed and read a batch at a time.

A table lives in ``CACHE_DIR/<kind>-<key>/``, ``key`` a hash of how rows are computed (the encoder, the
transform: :func:`pogdiff.encode.cache.cache_key`; not the shard size). Its shards are files
``shard-<i>-<first>-<count>-<content>.safetensors``, each holding ``count`` consecutive rows: ``content`` a hash
of the table's key and of what those rows are computed from (their image files' or captions' keys),
``first`` a short hash of its first row's key, ``i`` its place when it was written. A shard is found by what
it holds, not by where its rows are: the table's layout (:meth:`ShardedCache.layout`) takes every shard of
the folder whose rows appear, in order, among the table's rows, and cuts the rows left between them into new
shards of ``$POGDIFF_SHARD_ROWS`` rows. So a dataset with one image replaced, one line of metadata.jsonl
removed or a few added recomputes the one shard around the change, and shards written under another
``$POGDIFF_SHARD_ROWS`` are read as they are. Each shard is written to a temporary name and renamed, so a
killed encode leaves only whole shards and the next one computes just the missing ones. Under ``accelerate
launch`` every process plans the layout from the folder before any writes, process 0's plan is used by all,
and process ``r`` of ``P`` computes the shards with ``i % P == r``: all processes encode at once, each its share.
On several machines whose cache folders are their own (process 0 leaves a file of a random name in the cache
folder, which every process looks for: :meth:`ShardedCache.shared`), each machine encodes every shard into its
folder instead, its ``L`` processes the shards with ``i % L == local rank``.

Shards are safetensors files whose header says which table and rows they hold, and the sha256 of their
tensors, checked with their values (a zeroed shard is computed again) once: ``verified.json`` in the table's
folder records each shard verified (or written) with its size, mtime, ctime and inode, and a later start
re-reads only a shard whose stat changed. A read copies just the rows asked for from the file, so reading a
batch touches only its rows and memory stays bounded whatever N is. Before a table's missing shards are
computed, the first one's size times the rows missing tells whether the disk can hold them: when it cannot,
one line says so before the rest are computed; a shard that cannot be written later (disk full, quota,
read-only) stops the encode with one line naming the folder (no shard is ever kept in memory instead). The
rows are one :class:`ShardedTable`, which can also be held whole on a device.
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import re
import secrets
import shutil
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from accelerate.utils import gather_object
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from pogdiff.encode.cache import cache_folder, cache_key, tensors_sha256
from pogdiff.data.dataset import and_more
from pogdiff.errors import DatasetError, PogdiffError, PogdiffWarning
from pogdiff.files import atomic_path, apply_umask, remove_quietly, stat_signature, write_text_atomic
from pogdiff.processes import process_state

Tensors = dict[str, torch.Tensor]

# Rows per shard: the unit of resumption and of the work split over processes. 1,024 rows of Stable
# Diffusion latents in float16 are 64 MiB. $POGDIFF_SHARD_ROWS overrides it (docs/scale.md).
DEFAULT_SHARD_ROWS = 1024
MAX_SHARD_ROWS = 2**31 - 1  # far past any table; a size past int64 overflowed numpy's row arithmetic after encoding
VERIFIED_FILE = "verified.json"  # in a table's folder: the shards whose values were checked, by their stat
_SHARD_NAME = re.compile(r"shard-(\d+)-([0-9a-f]{8})-(\d+)-([0-9a-f]{20})\.safetensors")
_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
_READ_ONLY = (errno.EROFS, errno.EACCES, errno.EPERM)
_SHARD_OVERHEAD = 4096  # a shard's header and its last, partly filled block, in the disk space it needs


def shard_rows() -> int:
    """Rows per shard: $POGDIFF_SHARD_ROWS, else :data:`DEFAULT_SHARD_ROWS`."""
    value = os.environ.get("POGDIFF_SHARD_ROWS", "")
    if not value:
        return DEFAULT_SHARD_ROWS
    # isdigit() alone takes "²", which int() refuses
    if not (value.isascii() and value.isdigit()) or not 1 <= int(value) <= MAX_SHARD_ROWS:
        raise PogdiffError(f"POGDIFF_SHARD_ROWS={value!r}: rows per cache shard must be a whole number from 1 to "
                           f"{MAX_SHARD_ROWS}; unset it or fix it")
    return int(value)


class MappedArray:
    """One tensor of a shard file, its rows read with ``preadv`` when asked for (no map kept: a long-lived map would
    keep every page read so far resident, so a pass over all rows would hold the whole table and count as this
    process's memory).

    ``offset`` is where its bytes start in the file (:func:`_open`).
    """

    def __init__(self, path: Path, dtype: np.dtype, shape: tuple[int, ...], offset: int):
        self.path, self.array_dtype, self.shape, self.offset = path, dtype, shape, offset
        self.dtype, self.device, self.on_disk = torch.from_numpy(np.empty(0, dtype)).dtype, torch.device("cpu"), True

    def __len__(self) -> int:
        return self.shape[0]

    def read(self, index: np.ndarray | torch.Tensor | None = None) -> torch.Tensor:
        """Rows ``index`` (non-negative; all rows when None) as a new tensor, each row read with one ``preadv``
        into the result: a training batch's read sets up no mapping (about 4x faster per row than a map)."""
        rows = range(len(self)) if index is None else index.tolist()
        out = np.empty((len(rows), *self.shape[1:]), self.array_dtype)  # numpy: a third of torch's cost to set up
        if out.size:
            buffer, size = memoryview(out).cast("B"), out[0].nbytes
            with open(self.path, "rb", buffering=0) as file:
                for i, row in enumerate(rows):
                    if os.preadv(file.fileno(), [buffer[i * size:(i + 1) * size]], self.offset + row * size) != size:
                        raise ValueError(f"{self.path}: cut short (row {row} of {self.shape[0]})")
        return torch.from_numpy(out)


class HeldRows:
    """Rows held as a tensor: a whole table held on a device (:meth:`ShardedTable.holding`)."""

    def __init__(self, tensor: torch.Tensor):
        self.tensor, self.on_disk = tensor, False

    def __len__(self) -> int:
        return len(self.tensor)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.tensor.shape)

    @property
    def dtype(self) -> torch.dtype:
        return self.tensor.dtype

    @property
    def device(self) -> torch.device:
        return self.tensor.device

    def read(self, index: np.ndarray | torch.Tensor | None = None) -> torch.Tensor:
        return self.tensor if index is None else self.tensor[torch.as_tensor(index, device=self.device)]


class ShardedTable:
    """(N, ...) rows, read like a tensor: ``table[index]`` (a long tensor, a list, a slice), ``len``, ``shape``,
    ``dtype``, ``device``, ``to(device)``.

    The rows are in consecutive shards (their own lengths say where each starts), each a file read as it is asked for (:class:`MappedArray`); or in one
    tensor on a device (:meth:`held_on`). A read lands on :attr:`device`: the host for shards, the device a
    table is held on.
    """

    def __init__(self, parts: Sequence[MappedArray | HeldRows]):
        self.parts = list(parts)
        self.row_shape, self.dtype, self.device = tuple(parts[0].shape[1:]), parts[0].dtype, parts[0].device
        self.starts = np.cumsum([0] + [len(p) for p in self.parts])  # where each part's rows start
        self.num_rows = int(self.starts[-1])

    @classmethod
    def holding(cls, rows: torch.Tensor) -> "ShardedTable":
        """A table of the rows of one tensor, held where it is."""
        return cls([HeldRows(rows)])

    def __len__(self) -> int:
        return self.num_rows

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.num_rows, *self.row_shape)

    def __getitem__(self, index) -> torch.Tensor:
        if isinstance(index, slice):
            index = torch.arange(self.num_rows)[index]
        index = torch.as_tensor(index, dtype=torch.long).flatten()
        if len(self.parts) == 1:  # a table held on a device is indexed there, without a synchronisation
            return self.parts[0].read(index)
        index = index.cpu().numpy()
        out = torch.empty((len(index), *self.row_shape), dtype=self.dtype)
        shard = np.searchsorted(self.starts, index, side="right") - 1  # right: an empty shard holds no row
        local = index - self.starts[shard]
        for s in np.unique(shard).tolist():  # numpy for the bookkeeping: a batch's rows are in as many shards
            where = np.flatnonzero(shard == s)
            out[torch.from_numpy(where)] = self.parts[s].read(local[where])
        return out

    def read_all(self) -> torch.Tensor:
        """Every row, in one new tensor (each shard read whole)."""
        return torch.cat([p.read() for p in self.parts])

    def held_on(self, device) -> "ShardedTable":
        """This table with every row in one tensor on ``device``: a read is then a gather there."""
        return ShardedTable.holding(self.read_all().to(device))

    def to(self, device) -> "ShardedTable":
        """A table held in memory, moved to ``device``; one with shards on disk stays as it is (its rows are read
        on the host, a batch at a time: :meth:`held_on` loads them all)."""
        return self if any(p.on_disk for p in self.parts) else self.held_on(device)


class CacheWriteError(PogdiffError):
    """A shard that could not be written, or a disk too small for the shards still to write: the encode stops."""


def _short_hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:8]


def _amount(size: float) -> str:
    """A byte count for a message: '19.3 GB', '512.0 MB', '3.1 kB'."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if size >= scale / 10 or unit == "kB":
            return f"{size / scale:.1f} {unit}"
    raise AssertionError  # unreachable


def write_error(folder: Path, error: OSError, what: str) -> CacheWriteError:
    """The one line for a cache ``folder`` that ``what`` could not be written into, with the fix."""
    if error.errno in _FULL:
        fix = "free space or pass --cache-dir on a larger disk"
    elif error.errno in _READ_ONLY:
        fix = "pass --cache-dir on a disk you can write to"
    else:
        fix = "pass another --cache-dir"
    return CacheWriteError(f"{folder}: cannot write {what} ({error.strerror or error}); {fix}")


class ShardedCache:
    """The shards of one table: which are there and whole, computing the missing ones, opening them."""

    def __init__(self, cache_dir: str | Path | None, kind: str, params: dict, row_keys: Sequence[str],
                 rows_per_shard: int | None = None):
        self.kind, self.params, self.row_keys, self.num_rows = kind, params, list(row_keys), len(row_keys)
        self.rows_per_shard = rows_per_shard or shard_rows()
        self.key = cache_key(kind, params)  # not the shard size: a table's shards are read whatever their size
        self.folder = cache_folder(cache_dir) / f"{kind}-{self.key}"
        self._layout: list[tuple[range, str]] | None = None
        self._verified: dict[str, list[int]] | None = None
        self._verified_now: dict[str, list[int]] = {}  # shards this process checked or wrote, not yet recorded

    # --- where the rows are ---

    @property
    def layout(self) -> list[tuple[range, str]]:
        """Each shard's rows and file name, in row order (planned from the folder when first asked: :meth:`plan`)."""
        if self._layout is None:
            self._layout = self.plan()
        return self._layout

    @property
    def num_shards(self) -> int:
        return len(self.layout)

    def rows(self, shard: int) -> range:
        return self.layout[shard][0]

    def path(self, shard: int) -> Path:
        return self.folder / self.layout[shard][1]

    def shard_key(self, shard: int) -> str:
        """What shard ``shard`` holds: the table's key and its rows' keys (not where they are)."""
        return self._content_key(self.rows(shard))

    def _content_key(self, rows: range) -> str:
        return hashlib.sha256(json.dumps([self.key, self.row_keys[rows.start:rows.stop]]).encode()).hexdigest()[:20]

    def _name(self, index: int, rows: range) -> str:
        first = _short_hash(self.row_keys[rows.start]) if len(rows) else "0" * 8
        return f"shard-{index:05d}-{first}-{len(rows)}-{self._content_key(rows)}.safetensors"

    def plan(self) -> list[tuple[range, str]]:
        """The layout: every shard file of the folder whose rows come, in order, among this table's rows (the
        longest first where several start at one row), and the rows between them cut into new shards of
        :attr:`rows_per_shard` rows. Names only are read: a damaged shard is found, then computed again."""
        candidates: dict[str, list[tuple[int, str, str]]] = {}
        try:
            names = [p.name for p in self.folder.iterdir()] if self.folder.is_dir() else []
        except OSError:
            names = []
        for name in names:
            match = _SHARD_NAME.fullmatch(name)
            if match:
                candidates.setdefault(match[2], []).append((int(match[3]), match[4], name))
        for found in candidates.values():
            found.sort(key=lambda c: (-c[0], c[2]))
        spans: list[tuple[range, str | None]] = []
        gap = position = 0

        def cut(stop: int) -> None:
            spans.extend((range(s, min(s + self.rows_per_shard, stop)), None)
                         for s in range(gap, stop, self.rows_per_shard))

        firsts = [_short_hash(k) for k in self.row_keys] if candidates else []
        while candidates and position < self.num_rows:
            found = next(((count, name) for count, key, name in candidates.get(firsts[position], ())
                          if 0 < count <= self.num_rows - position
                          and self._content_key(range(position, position + count)) == key), None)
            if found is None:
                position += 1
                continue
            cut(position)
            spans.append((range(position, position + found[0]), found[1]))
            position = gap = position + found[0]
        cut(self.num_rows)
        if not spans:  # no rows: one empty shard, so that the table has its columns
            spans.append((range(0, 0), None))
        return [(rows, name or self._name(i, rows)) for i, (rows, name) in enumerate(spans)]

    # --- which shards are whole ---

    def _record(self) -> dict[str, list[int]]:
        """The shards verified so far (``verified.json``), by name."""
        if self._verified is None:
            try:
                record = json.loads((self.folder / VERIFIED_FILE).read_text())
            except (OSError, ValueError):
                record = {}
            self._verified = record if isinstance(record, dict) else {}
        return self._verified

    def damage(self, shard: int, check_values: bool = True) -> str | None:
        """Why shard ``shard`` cannot be used ("absent", cut short, another table's; with ``check_values``, bytes
        changed since it was written or NaN or inf), None when whole. Values are checked once per file: a shard
        recorded in ``verified.json`` with its current size, mtime, ctime and inode is not read again."""
        path = self.path(shard)
        if not path.is_file():
            return "absent"
        try:
            signature = stat_signature(path)
            meta, arrays = _open(path)
        except (OSError, SafetensorError) as error:
            return f"unreadable cache shard ({error})"
        rows = self.rows(shard)
        if (meta.get("kind"), meta.get("key"), meta.get("count")) != (self.kind, self.shard_key(shard),
                                                                      str(len(rows))) \
                or any(len(a) != len(rows) for a in arrays.values()):
            return "this cache shard holds other rows or another table (copied or renamed?)"
        if not check_values or self._record().get(path.name) == signature:
            return None
        try:
            values = {name: a.read() for name, a in arrays.items()}
        except (OSError, ValueError) as error:
            return f"unreadable cache shard ({error})"
        if any(not torch.isfinite(v).all() for v in values.values() if v.is_floating_point()):
            return "NaN or inf in this cache shard"
        if meta.get("sha256") != tensors_sha256(values):
            return "this cache shard's bytes changed since it was written (its sha256 differs)"
        self._verified_now[path.name] = signature
        return None

    def complete(self) -> bool:
        """Whether every shard is there and whole (values not read): nothing left to :meth:`fill`."""
        return all(self.damage(s, check_values=False) is None for s in range(self.num_shards))

    # --- computing the missing ones ---

    def fill(self, compute: Callable[[range], Tensors], desc: str, progress: bool = True) -> None:
        """Compute and write this process's missing (or damaged) shards; then wait for the other processes
        (every process must call it: it synchronises them).

        ``compute(rows)`` returns the tensors of those rows. A :class:`~pogdiff.errors.PogdiffError` it raises
        (an unreadable image, NaN from an encoder) leaves that shard unwritten and the others go on; at the
        end every process raises the same one-line error, naming the first file and counting the rest. A disk
        that cannot hold the missing shards (estimated from the first one computed), or a shard that cannot be
        written, stops this process's encoding: every process raises that one line instead.
        """
        state = process_state()
        self._layout = self.plan()
        share, processes, shared = state.process_index, state.num_processes, True
        if state.num_processes > 1:  # every process has planned before any writes: all take process 0's plan
            probe = self._probe() if state.is_main_process else None
            self._layout, probe = gather_object([(self._layout, probe)])[0]
            shared = self.shared(probe)
            if not shared:  # each machine its own cache folder: each machine encodes every shard into its own
                share, processes = state.local_process_index, local_processes()
        mine = [s for s in range(self.num_shards) if s % processes == share]
        damaged = {s: self.damage(s) for s in mine}
        todo = [s for s in mine if damaged[s] is not None]
        for s in todo:
            if damaged[s] != "absent":
                warnings.warn(f"{self.path(s)}: {damaged[s]}; computing it again", PogdiffWarning)
        # what every process still has to write: this one's todo, the others' shards not there yet
        missing = [len(self.rows(s)) for s in range(self.num_shards)
                   if s in damaged and damaged[s] is not None or s not in damaged and not self.path(s).is_file()]
        errors: list[tuple[int, PogdiffError]] = []
        bar = tqdm(total=sum(len(self.rows(s)) for s in todo), desc=desc, unit="row", dynamic_ncols=True,
                   disable=not (progress and state.is_local_main_process and todo))
        checked = False
        for s in todo:
            try:
                tensors = compute(self.rows(s))
            except PogdiffError as error:
                errors.append((s, error))
                bar.update(len(self.rows(s)))
                continue
            try:
                if not checked:
                    self._check_space(tensors, len(self.rows(s)), missing)
                    checked = True
                self._write(s, tensors, f"process {state.process_index} of {state.num_processes}")
            except CacheWriteError as error:  # nothing more can be written: stop, and tell every process
                errors.append((s, error))
                break
            bar.update(len(self.rows(s)))
        bar.close()
        # a collective: it returns once every process has encoded its shards (no barrier needed besides)
        failed = [(s, type(e).__name__, getattr(e, "first_message", str(e)), getattr(e, "files", None))
                  for s, e in errors]
        gathered = gather_object([(failed, self._verified_now)])
        failures = [f for fs, _ in gathered for f in fs]
        verified = {name: sig for _, theirs in gathered for name, sig in theirs.items()}
        if not shared:  # the other machines' shards are their own files: only this machine's are recorded here
            verified = {name: sig for name, sig in verified.items() if _signature_or_none(self.folder / name) == sig}
        self._save_record(verified, state.is_local_main_process, quiet=bool(failures))
        if failures:  # a disk that is full comes first: fixing an image would not help
            raise_first(sorted(failures, key=lambda f: (f[1] != CacheWriteError.__name__, f[0])))

    def _probe(self) -> str | None:
        """A file of a random name in the cache folder (:meth:`shared` looks for it); None if it cannot be made.
        The cache folder, not the table's: another machine may have looked for a new table's folder before it
        was made, and a network filesystem may remember for a while that it was not there."""
        name = f".probe-{secrets.token_hex(8)}"
        try:
            self.folder.parent.mkdir(parents=True, exist_ok=True)
            (self.folder.parent / name).touch()
        except OSError:
            return None
        return name

    def shared(self, probe: str | None) -> bool:
        """Whether every process sees the file ``probe`` that process 0 made in the cache folder (:meth:`_probe`):
        the cache folder is one for all machines. A collective: every process calls it; process 0 removes the file
        once all have looked. A probe that could not be made counts as shared (the shards' writes then say why);
        one a process does not see only costs work (every machine then encodes every shard)."""
        seen = probe is None or (self.folder.parent / probe).is_file()
        everyone = all(gather_object([seen]))
        if probe is not None and process_state().is_main_process:
            remove_quietly(self.folder.parent / probe)
        return everyone

    def _check_space(self, tensors: Tensors, rows: int, missing: list[int]) -> None:
        """Refuse (:class:`CacheWriteError`) when the disk of the folder has less room than the ``missing`` shards
        (their rows) need, at the bytes per row of ``tensors`` (``rows`` rows, the first shard computed), with a
        block per shard for its header."""
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            free = shutil.disk_usage(self.folder).free
        except OSError as error:
            raise write_error(self.folder, error, "the cache folder") from None
        per_row = sum(t.nelement() * t.element_size() for t in tensors.values()) / max(1, rows)
        needed = per_row * sum(missing) + _SHARD_OVERHEAD * len(missing)
        if needed > free:
            raise CacheWriteError(f"{self.folder}: the {sum(missing)} rows left to encode of this {self.kind} cache "
                                  f"need about {_amount(needed)}, {_amount(free)} free; free space or pass --cache-dir "
                                  "on a larger disk")

    def _write(self, shard: int, tensors: Tensors, writer: str) -> None:
        path = self.path(shard)
        rows = self.rows(shard)
        metadata = {"kind": self.kind, "key": self.shard_key(shard), "count": str(len(rows)),
                    "params": json.dumps(self.params), "written_by": writer, "sha256": tensors_sha256(tensors)}
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            with atomic_path(path) as tmp:
                save_file({name: t.contiguous() for name, t in tensors.items()}, tmp, metadata=metadata)
                apply_umask(tmp)
            self._verified_now[path.name] = stat_signature(path)
        except OSError as error:
            raise write_error(self.folder, error, f"cache shard {path.name}") from None

    def _save_record(self, verified: dict[str, list[int]], writer: bool, quiet: bool = False) -> None:
        """Add the shards just verified or written to ``verified.json`` (``writer``: the process that writes it;
        the others only remember them). A record that cannot be written costs a check next time, nothing more: a
        warning (none when ``quiet``: the encode is failing with its own line)."""
        self._verified_now = {}
        if not verified:
            return
        record = {**self._record(), **verified}
        self._verified = record
        if not writer:
            return
        try:
            present = {p.name for p in self.folder.iterdir()}
            write_text_atomic(self.folder / VERIFIED_FILE,
                              json.dumps({name: sig for name, sig in record.items() if name in present}))
        except OSError as error:
            if not quiet:
                warnings.warn(f"{self.folder / VERIFIED_FILE}: cannot write ({error.strerror or error}); the shards "
                              "will be checked again next time", PogdiffWarning)

    def open(self) -> dict[str, ShardedTable]:
        """Every table, its shards read as they are asked for (all must be whole: :meth:`fill` first)."""
        parts: dict[str, list] = {}
        for s in range(self.num_shards):
            problem = self.damage(s, check_values=False)
            if problem is not None:
                raise PogdiffError(f"{self.path(s)}: {problem} after encoding (is another process deleting the "
                                   "cache?); run the command again")
            for name, array in _open(self.path(s))[1].items():
                parts.setdefault(name, []).append(array)
        return {name: ShardedTable(p) for name, p in parts.items()}


def local_processes() -> int:
    """The processes of ``accelerate launch`` on this machine ($LOCAL_WORLD_SIZE, which torchrun and accelerate set;
    1 without it: this process then encodes every shard itself)."""
    value = os.environ.get("LOCAL_WORLD_SIZE", "")
    return int(value) if value.isdigit() and int(value) > 0 else 1


def _signature_or_none(path: Path) -> list[int] | None:
    try:
        return stat_signature(path)
    except OSError:
        return None


def raise_first(failures: list[tuple[int, str, str, list | None]]) -> None:
    """One error for the failures of every process: the first, and a count of the unreadable files after it."""
    _, kind, message, _ = failures[0]
    if kind == "UnreadableImages":
        files = [f for *_, fs in failures for f in fs]
        message = f"{message}{and_more(files[1:], 'unreadable')}; the shards encoded so far are kept"
    raise (DatasetError if kind in ("UnreadableImages", "DatasetError") else PogdiffError)(message)


def _open(path: Path) -> tuple[dict[str, str], dict[str, MappedArray]]:
    """A safetensors file's metadata and its tensors, to be read by row.

    ``safe_open`` reads and checks the header: it refuses a file whose tensors do not lie back to back, in
    offset order, up to its last byte. So each tensor's bytes start where the bytes of those after it, back
    from the end of the file, begin.
    """
    with safe_open(path, "np") as file:
        metadata = file.metadata() or {}
        tensors = {name: file.get_slice(name) for name in file.offset_keys()}
        # an empty slice's dtype: safetensors' own map from its dtype names
        layout = {name: (tuple(t.get_shape()), t[:0].dtype) for name, t in tensors.items()}
    arrays, end = {}, path.stat().st_size
    for name, (shape, dtype) in reversed(layout.items()):
        end -= math.prod(shape) * dtype.itemsize
        arrays[name] = MappedArray(path, dtype, shape, end)
    return metadata, arrays
