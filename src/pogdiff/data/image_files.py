"""The training images, read lazily: fingerprinted by their files' bytes, decoded a batch at a time.

Nothing holds every image. The caches derived from images (latents, image features) are
keyed by a streamed hash of each file's bytes (:attr:`ImageFiles.file_digests`, per shard
of rows) and the transform (:attr:`ImageFiles.transform`: resolution, crop), so touching,
moving or copying the dataset folder recomputes nothing and editing one image recomputes
the shard it is in and what is built from all rows. Hashes are
remembered per file by (size, mtime, ctime, inode) in the cache folder, so a warm start reads
no image at all, and a file rewritten in place whose size and mtime were put back is hashed again
(its ctime changed). Images are decoded only while encoding, JPEGs at a reduced scale (draft decoding,
:func:`pogdiff.data.dataset.load_image`), by one torch ``DataLoader`` per :class:`ImageFiles` whose
``num_workers`` worker processes (``--dataloader-num-workers``; by default the CPUs of this process:
:func:`decode_workers`) stay up from one batch request to the next (e.g. from shard to shard).
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from pogdiff.encode.cache import cache_folder
from pogdiff.data.dataset import METADATA_FILE, ImageTextDataset, and_more, load_image
from pogdiff.errors import DatasetError
from pogdiff.files import remembered_sha256, sha256

DECODER_VERSION = 2  # bump when load_image turns the same file into other pixels (2: JPEG draft decoding)
MAX_DECODE_WORKERS = 8  # the default's cap: each worker holds batches in flight, so memory grows with them


class UnreadableImages(DatasetError):
    """Images that could not be decoded: the first one's message (``first_message``), and every file (``files``)."""

    def __init__(self, failures: list[tuple[str, str]]):
        self.first_message, self.files = failures[0][1], [file for file, _ in failures]
        super().__init__(self.first_message + and_more(self.files[1:], "unreadable"))


class _Decoded(Dataset):
    """Row ``row`` of ``dataset`` as (row, uint8 array (H, W, 3)), or (row, the error message) when it cannot be
    read: errors travel back from the worker processes as values, so that they stay one line."""

    def __init__(self, dataset: ImageTextDataset, resolution: int, center_crop: bool):
        self.dataset, self.resolution, self.center_crop = dataset, resolution, center_crop

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, row: int):
        try:
            return row, load_image(self.dataset.root / self.dataset.files[row], self.resolution, self.center_crop)
        except DatasetError as error:
            return row, str(error)


class _Requested(Sampler):
    """The rows of the current request in batches: set before each pass over the one loader of an
    :class:`ImageFiles`, whose persistent workers then decode them."""

    def __init__(self):
        self.rows, self.batch_size = [], 1

    def __iter__(self):
        return (self.rows[i:i + self.batch_size] for i in range(0, len(self.rows), self.batch_size))

    def __len__(self) -> int:
        return math.ceil(len(self.rows) / self.batch_size)


def decode_workers(requested: int | None) -> int:
    """Worker processes decoding images: ``requested`` (``--dataloader-num-workers``), else the CPUs this process
    may use, shared with the other processes of this machine (``LOCAL_WORLD_SIZE``), at most MAX_DECODE_WORKERS."""
    if requested is not None:
        return requested
    return min(MAX_DECODE_WORKERS, len(os.sched_getaffinity(0)) // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


@dataclass
class ImageFiles:
    """The images of ``dataset`` at ``resolution``: their digest, and batches decoded on demand."""

    dataset: ImageTextDataset
    resolution: int
    center_crop: bool = True
    num_workers: int | None = 0  # None: decode_workers' default
    cache_dir: str | Path | None = None
    progress: bool = False

    @functools.cached_property
    def file_digests(self) -> list[str]:
        """sha256 of each row's image file (hashed once, then remembered: :func:`file_digests`)."""
        return file_digests(self.dataset, self.cache_dir, self.progress)

    @property
    def transform(self) -> dict:
        """How a file becomes pixels: with the file digests, the key of everything computed from the images."""
        return {"resolution": self.resolution, "center_crop": self.center_crop, "decoder": DECODER_VERSION}

    @functools.cached_property
    def digest(self) -> str:
        """One key for all the images (for tables built from every row, such as the neighbours)."""
        return hashlib.sha256(json.dumps({"files": self.file_digests, **self.transform}).encode()).hexdigest()

    @functools.cached_property
    def _requested(self) -> _Requested:
        return _Requested()

    @functools.cached_property
    def _loader(self) -> DataLoader:
        workers = decode_workers(self.num_workers)
        return DataLoader(_Decoded(self.dataset, self.resolution, self.center_crop), batch_sampler=self._requested,
                          num_workers=workers, persistent_workers=workers > 0, collate_fn=list)

    def batches(self, rows: Sequence[int], batch_size: int) -> Iterator[torch.Tensor]:
        """uint8 batches (B, 3, H, W) of ``rows`` in order (one request at a time). Every row is tried: when some
        cannot be read, :class:`UnreadableImages` names the first and lists all, after the last batch."""
        self._requested.rows, self._requested.batch_size = list(rows), batch_size
        failures: list[tuple[str, str]] = []
        for items in self._loader:
            failures += [(self.dataset.files[row], item) for row, item in items if isinstance(item, str)]
            if not failures:
                yield torch.from_numpy(np.stack([item for _, item in items])).permute(0, 3, 1, 2).contiguous()
        if failures:
            raise UnreadableImages(failures)

    def close(self) -> None:
        """Stop the decode workers (a later :meth:`batches` starts them again)."""
        self.__dict__.pop("_loader", None)


def read_images(dataset: ImageTextDataset, resolution: int, center_crop: bool = True) -> torch.Tensor:
    """Every image of ``dataset`` as one float tensor (N, 3, resolution, resolution) in [-1, 1]: for the small
    sets that evaluation and the pretraining's held-out loss score, never for training."""
    batches = ImageFiles(dataset, resolution, center_crop).batches(range(len(dataset)), 256)
    return torch.cat([pixels_to_float(batch) for batch in batches])


def pixels_to_float(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 (..., 3, H, W) -> float32 in [-1, 1], the same values as :func:`pogdiff.images.from_uint8`."""
    return pixels.float() / 127.5 - 1.0


def dataset_digest(dataset: ImageTextDataset, cache_dir: str | Path | None = None) -> str:
    """What a dataset holds: the bytes of its metadata.jsonl and of its image files."""
    metadata = sha256(dataset.root / METADATA_FILE)
    return hashlib.sha256(json.dumps({"metadata": metadata, "images": file_digests(dataset, cache_dir)}).encode()
                          ).hexdigest()


def file_digests(dataset: ImageTextDataset, cache_dir: str | Path | None = None, progress: bool = False) -> list[str]:
    """sha256 of each image file's bytes, in row order; remembered by (size, mtime, ctime, inode) in the cache folder
    (``os.utime`` puts an mtime back, never a ctime: a rewrite in place is seen)."""
    memo_path = cache_folder(cache_dir) / \
        f"file-digests-{hashlib.sha256(str(dataset.root.resolve()).encode()).hexdigest()[:16]}.json"
    return remembered_sha256(dataset.root, dataset.files, memo_path, "image files", progress)
