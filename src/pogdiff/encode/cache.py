"""The on-disk cache: tensors computed once, stored under a name derived from what they depend on.

A cache file is ``CACHE_DIR/<kind>-<key>.safetensors``, ``key`` a hash of the parameters
that determine its content (docs/bad-input.md, "Caches"). Files are written to a
temporary name and renamed, so a killed run never leaves a file that loads. Its metadata holds
the sha256 of its tensors (:func:`tensors_sha256`), checked when it is read: an unreadable or
non-finite file, or one whose bytes changed (a zeroed block), is computed again with a warning.
A cache that cannot be written is skipped with a warning.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from pathlib import Path
from typing import Callable

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from pogdiff.errors import PogdiffError, PogdiffWarning
from pogdiff.files import apply_umask, atomic_path

CACHE_VERSION = 4  # bump when a cached quantity is computed or stored differently (4: with its sha256)

Tensors = dict[str, torch.Tensor]


def cache_folder(cache_dir: str | Path | None = None) -> Path:
    """The cache folder: ``cache_dir`` (--cache-dir) when given, else $POGDIFF_CACHE, else $XDG_CACHE_HOME/pogdiff,
    else ~/.cache/pogdiff."""
    return Path(cache_dir or os.environ.get("POGDIFF_CACHE")
                or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "pogdiff")


def check_cache_dir(cache_dir: str | Path | None) -> None:
    """A --cache-dir that is a file is one line before any work (each cache write would warn about it)."""
    path = cache_folder(cache_dir)
    if path.exists() and not path.is_dir():
        raise PogdiffError(f"{path}: --cache-dir is a file; pass a folder (or leave --cache-dir out)")


def cache_key(kind: str, params: dict) -> str:
    """The hash that names the ``kind`` tensors computed with ``params``."""
    key = hashlib.sha256(json.dumps({**params, "kind": kind, "version": CACHE_VERSION}, sort_keys=True).encode())
    return key.hexdigest()[:20]


def cache_path(cache_dir: str | Path | None, kind: str, params: dict) -> Path:
    """Where the ``kind`` tensors computed with ``params`` are cached."""
    return cache_folder(cache_dir) / f"{kind}-{cache_key(kind, params)}.safetensors"


def cached(cache_dir: str | Path | None, kind: str, params: dict, compute: Callable[[], Tensors]) -> Tensors:
    """The tensors cached under (kind, params), else ``compute()``'s, then saved."""
    path = cache_path(cache_dir, kind, params)
    if path.is_file():
        try:
            with safe_open(path, "pt") as file:
                metadata = file.metadata() or {}
            tensors = load_file(path)
        except (SafetensorError, OSError) as error:
            warnings.warn(f"{path}: unreadable cache file ({error}); computing it again", PogdiffWarning)
        else:
            if metadata.get("kind") != kind or metadata.get("key") != cache_key(kind, params):
                warnings.warn(f"{path}: this cache file holds another table (copied or renamed?); computing it again",
                              PogdiffWarning)
            elif not all(torch.isfinite(t).all() for t in tensors.values() if t.is_floating_point()):
                warnings.warn(f"{path}: NaN or inf in this cache file; computing it again", PogdiffWarning)
            elif metadata.get("sha256") != tensors_sha256(tensors):
                warnings.warn(f"{path}: this cache file's bytes changed since it was written (its sha256 differs); "
                              "computing it again", PogdiffWarning)
            else:
                return tensors
    tensors = compute()
    _save(tensors, path, kind, params)
    return tensors


def _save(tensors: Tensors, path: Path, kind: str, params: dict) -> None:
    """Save atomically; a cache that cannot be written (disk full, read-only) is skipped with a warning:
    the tensors are in memory and the run goes on."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            save_file({name: t.contiguous() for name, t in tensors.items()}, tmp,
                      metadata={"kind": kind, "key": cache_key(kind, params), "params": json.dumps(params),
                                "sha256": tensors_sha256(tensors)})
            apply_umask(tmp)
    except OSError as error:
        warnings.warn(f"{path}: cannot write this cache file ({error.strerror or error}); going on without it "
                      "(free space or pass --cache-dir)", PogdiffWarning)


def tensors_sha256(tensors: Tensors) -> str:
    """The sha256 of named tensors (:func:`tensor_digest` of each): what a cache entry records of its content."""
    digests = {name: tensor_digest(tensor.detach().cpu()) for name, tensor in tensors.items()}
    return hashlib.sha256(json.dumps(digests, sort_keys=True).encode()).hexdigest()


def tensor_digest(tensor: torch.Tensor) -> str:
    """Hash of a CPU tensor's shape, dtype and values: the key of anything computed from it."""
    digest = hashlib.sha256(f"{tuple(tensor.shape)} {tensor.dtype}".encode())
    digest.update(tensor.contiguous().numpy())
    return digest.hexdigest()
