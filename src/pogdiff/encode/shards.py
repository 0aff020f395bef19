"""Sharded caches read by row: per-row tables too large to hold in memory (latents, caption states,
image features), written in shards as they are computed and read a batch at a time.

A table of N rows lives in ``CACHE_DIR/<kind>-<key>/shard-<i>-<content>.safetensors``:
``key`` a hash of how rows are computed (the encoder, the transform: :func:`pogdiff.encode.cache.cache_key`),
shard ``i`` holding rows ``i * shard_rows`` to ``(i + 1) * shard_rows``, ``content`` a hash of
what those rows are computed from (their image files' or captions' keys). So a shard is reused
whenever its own rows are unchanged: a dataset with one image replaced, or with a corrupt image
fixed, recomputes one shard. Each shard is written to a temporary name and renamed, so a killed
encode leaves only whole shards and the next one computes just the missing ones. Under ``accelerate launch`` process ``r`` of ``P`` computes the shards with
``i % P == r``: all processes encode at once, each its share of the rows.

Shards are safetensors files whose header says which table and rows they hold, and the sha256 of
their tensors, checked with their values before each encode (a zeroed shard is computed again); a read copies
just the rows asked for from the file, so reading a batch touches only its rows and memory stays
bounded whatever N is. A shard that cannot be written (disk full, read-only cache) is kept in memory
with a warning and the run goes on. Either way the rows are one :class:`ShardedTable`, which can
also be held whole on a device.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from accelerate import PartialState
from accelerate.utils import gather_object
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from pogdiff.encode.cache import cache_folder, cache_key, tensors_sha256
from pogdiff.data.dataset import and_more
from pogdiff.errors import DatasetError, PogdiffError, PogdiffWarning
from pogdiff.files import atomic_path, apply_umask

Tensors = dict[str, torch.Tensor]

# Rows per shard: the unit of resumption and of the work split over processes. 1,024 rows of Stable
# Diffusion latents in float16 are 64 MiB. $POGDIFF_SHARD_ROWS overrides it (docs/scale.md).
DEFAULT_SHARD_ROWS = 1024
MAX_SHARD_ROWS = 2**31 - 1  # far past any table; a size past int64 overflowed numpy's row arithmetic after encoding


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
    """Rows held as a tensor: a shard that could not be written (in memory), or a whole table held on a device."""

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

    The rows are in shards of ``rows_per_shard``, each a file read as it is asked for (:class:`MappedArray`) or
    a tensor where the shard could not be written (:class:`HeldRows`); or in one tensor on a device
    (:meth:`held_on`). A read lands on :attr:`device`: the host for shards, the device a table is held on.
    """

    def __init__(self, parts: Sequence[MappedArray | HeldRows], rows_per_shard: int):
        self.parts, self.rows_per_shard = list(parts), rows_per_shard
        self.row_shape, self.dtype, self.device = tuple(parts[0].shape[1:]), parts[0].dtype, parts[0].device
        self.num_rows = sum(len(p) for p in parts)

    @classmethod
    def holding(cls, rows: torch.Tensor) -> "ShardedTable":
        """A table of the rows of one tensor, held where it is."""
        return cls([HeldRows(rows)], max(1, len(rows)))

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
        shard, local = np.divmod(index, self.rows_per_shard)
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


class ShardedCache:
    """The shards of one table: which are there and whole, computing the missing ones, opening them."""

    def __init__(self, cache_dir: str | Path | None, kind: str, params: dict, row_keys: Sequence[str],
                 rows_per_shard: int | None = None):
        self.kind, self.params, self.row_keys, self.num_rows = kind, params, list(row_keys), len(row_keys)
        self.rows_per_shard = rows_per_shard or shard_rows()
        self.key = cache_key(kind, {**params, "rows_per_shard": self.rows_per_shard})
        self.folder = cache_folder(cache_dir) / f"{kind}-{self.key}"
        self.num_shards = max(1, math.ceil(self.num_rows / self.rows_per_shard))
        self.held: dict[int, dict[str, HeldRows]] = {}  # shards that could not be written

    def shard_key(self, shard: int) -> str:
        """What shard ``shard`` holds: the table's key, its first row and its rows' keys."""
        rows = self.rows(shard)
        return hashlib.sha256(json.dumps([self.key, rows.start, self.row_keys[rows.start:rows.stop]]).encode()
                              ).hexdigest()[:20]

    def rows(self, shard: int) -> range:
        return range(shard * self.rows_per_shard, min((shard + 1) * self.rows_per_shard, self.num_rows))

    def path(self, shard: int) -> Path:
        return self.folder / f"shard-{shard:05d}-{self.shard_key(shard)}.safetensors"

    def damage(self, shard: int, check_values: bool = True) -> str | None:
        """Why shard ``shard`` cannot be used ("absent", cut short, another table's; with ``check_values``, bytes
        changed since it was written or NaN or inf), None when whole."""
        if shard in self.held:
            return None
        path = self.path(shard)
        if not path.is_file():
            return "absent"
        try:
            meta, arrays = _open(path)
        except (OSError, SafetensorError) as error:
            return f"unreadable cache shard ({error})"
        rows = self.rows(shard)
        if (meta.get("kind"), meta.get("key"), meta.get("rows")) != (self.kind, self.shard_key(shard),
                                                                     f"{rows.start}:{rows.stop}") \
                or any(len(a) != len(rows) for a in arrays.values()):
            return "this cache shard holds other rows or another table (copied or renamed?)"
        if not check_values:
            return None
        values = {name: a.read() for name, a in arrays.items()}
        if any(not torch.isfinite(v).all() for v in values.values() if v.is_floating_point()):
            return "NaN or inf in this cache shard"
        if meta.get("sha256") != tensors_sha256(values):
            return "this cache shard's bytes changed since it was written (its sha256 differs)"
        return None

    def complete(self) -> bool:
        """Whether every shard is there and whole (values not read): nothing left to :meth:`fill`."""
        return all(self.damage(s, check_values=False) is None for s in range(self.num_shards))

    def fill(self, compute: Callable[[range], Tensors], desc: str, progress: bool = True) -> None:
        """Compute and write this process's missing (or damaged) shards; then wait for the other processes
        (every process must call it: it synchronises them).

        ``compute(rows)`` returns the tensors of those rows. A :class:`~pogdiff.errors.PogdiffError` it raises
        (an unreadable image, NaN from an encoder) leaves that shard unwritten and the others go on; at the
        end every process raises the same one-line error, naming the first file and counting the rest.
        """
        state = PartialState()
        mine = [s for s in range(self.num_shards) if s % state.num_processes == state.process_index]
        damaged = {s: self.damage(s) for s in mine}
        todo = [s for s in mine if damaged[s] is not None]
        for s in todo:
            if damaged[s] != "absent":
                warnings.warn(f"{self.path(s)}: {damaged[s]}; computing it again", PogdiffWarning)
        errors: list[tuple[int, PogdiffError]] = []
        bar = tqdm(total=sum(len(self.rows(s)) for s in todo), desc=desc, unit="row", dynamic_ncols=True,
                   disable=not (progress and state.is_local_main_process and todo))
        for s in todo:
            try:
                tensors = compute(self.rows(s))
            except PogdiffError as error:
                errors.append((s, error))
            else:
                self._write(s, tensors, f"process {state.process_index} of {state.num_processes}")
            bar.update(len(self.rows(s)))
        bar.close()
        # a collective: it returns once every process has encoded its shards (no barrier needed besides)
        failures = gather_object([(s, type(e).__name__, getattr(e, "first_message", str(e)), getattr(e, "files", None))
                                  for s, e in errors])
        if failures:
            raise_first(sorted(failures, key=lambda f: f[0]))

    def _write(self, shard: int, tensors: Tensors, writer: str) -> None:
        path = self.path(shard)
        rows = self.rows(shard)
        metadata = {"kind": self.kind, "key": self.shard_key(shard), "rows": f"{rows.start}:{rows.stop}",
                    "params": json.dumps(self.params), "written_by": writer, "sha256": tensors_sha256(tensors)}
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            with atomic_path(path) as tmp:
                save_file({name: t.contiguous() for name, t in tensors.items()}, tmp, metadata=metadata)
                apply_umask(tmp)
        except OSError as error:
            warnings.warn(f"{path}: cannot write this cache shard ({error.strerror or error}); keeping it in memory "
                          "(free space or pass --cache-dir)", PogdiffWarning)
            self.held[shard] = {name: HeldRows(t.contiguous()) for name, t in tensors.items()}

    def open(self) -> dict[str, ShardedTable]:
        """Every table, its shards read as they are asked for (all must be whole: :meth:`fill` first)."""
        parts: dict[str, list] = {}
        for s in range(self.num_shards):
            if s in self.held:
                arrays = self.held[s]
            else:
                problem = self.damage(s, check_values=False)
                if problem is not None:
                    raise PogdiffError(f"{self.path(s)}: {problem} after encoding (is another process deleting the "
                                       "cache?); run the command again")
                arrays = _open(self.path(s))[1]
            for name, array in arrays.items():
                parts.setdefault(name, []).append(array)
        return {name: ShardedTable(p, self.rows_per_shard) for name, p in parts.items()}


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
