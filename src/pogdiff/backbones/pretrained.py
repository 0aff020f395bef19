"""Checks on a local diffusers pipeline folder (``--pretrained``) before anything loads from it, and its fingerprint.

``from_pretrained`` on a partial download fails deep inside diffusers or transformers,
minutes into a run, with a message about some class. These checks name the folder,
the missing piece and the fix instead; they read only file names and a few bytes.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from pogdiff.errors import PogdiffError, first_line
from pogdiff.files import remembered_sha256

PIPELINE_FILE = "model_index.json"
CONFIG_FILES = ("config.json", "scheduler_config.json", "tokenizer_config.json", "preprocessor_config.json")
WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.safetensors.index.json", "*.bin.index.json")
_LFS_POINTER = b"version https://git-lfs"


def check_pipeline_files(folder: str | Path) -> dict:
    """Raise :class:`PogdiffError` unless ``folder`` holds a complete diffusers pipeline; return its model index.

    Complete: ``model_index.json`` is valid JSON, and every component it lists is a
    subfolder with its config and, for models (a ``config.json``), real weights (not
    Git LFS pointer files).
    """
    folder = Path(folder)
    if folder.is_file():
        raise PogdiffError(f"{folder}: a single checkpoint file, not a diffusers pipeline folder; convert it with "
                           "StableDiffusionPipeline.from_single_file(PATH).save_pretrained(FOLDER) and pass FOLDER")
    if not folder.is_dir():
        raise PogdiffError(f"{folder}: pretrained folder not found; pass a local diffusers pipeline folder")
    index_path = folder / PIPELINE_FILE
    if not index_path.is_file():
        raise PogdiffError(f"{folder}: not a diffusers pipeline folder (no {PIPELINE_FILE}); pass the folder that "
                           "StableDiffusionPipeline.save_pretrained wrote")
    try:
        index = json.loads(index_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise PogdiffError(f"{index_path}: not valid JSON ({error}); download the pipeline again") from None
    for name in components(index):
        _check_component(folder / name)
    return index


def components(index: dict) -> list[str]:
    """The component folders a model index lists: not metadata such as _class_name, nor an optional component
    left out (null)."""
    return [name for name, entry in index.items()
            if not name.startswith("_") and isinstance(entry, list) and None not in entry]


def _check_component(path: Path) -> None:
    if not path.is_dir():
        raise PogdiffError(f"{path}: missing ({PIPELINE_FILE} lists it); the download is partial: download it again")
    if not any((path / name).is_file() for name in CONFIG_FILES):
        raise PogdiffError(f"{path}: no config.json or other config file; the download is partial: download it again")
    if not (path / "config.json").is_file():
        return  # a scheduler, tokenizer or feature extractor: configs and vocabularies only
    weights = [p for pattern in WEIGHT_PATTERNS for p in path.glob(pattern)]
    if not weights:
        raise PogdiffError(f"{path}: no weights (*.safetensors or *.bin); the download is partial: download it again")
    for file in weights:
        with file.open("rb") as f:
            if f.read(len(_LFS_POINTER)) == _LFS_POINTER:
                raise PogdiffError(f"{file}: a Git LFS pointer, not the weights; run `git lfs pull` in the "
                                   "pipeline's repository, or download it again")


def local_pipeline_folder(path_or_hub_id: str | Path) -> Path:
    """The local folder of a pipeline given as a folder or a hub id: for a hub id, the snapshot in the Hugging
    Face cache (downloaded first where the hub can be reached, as ``from_pretrained`` would)."""
    if Path(path_or_hub_id).is_dir() or Path(path_or_hub_id).is_file():
        return Path(path_or_hub_id)
    from diffusers import DiffusionPipeline

    try:
        return Path(DiffusionPipeline.download(str(path_or_hub_id)))
    except Exception as error:  # huggingface_hub raises several kinds: offline, unknown id, gated, ...
        raise PogdiffError(f"{path_or_hub_id}: not a local folder, and the hub id cannot be fetched "
                           f"({first_line(error)}); "
                           "pass a local diffusers pipeline folder, or a hub id the machine can download") from None


def pipeline_fingerprint(folder: str | Path, cache_dir: str | Path | None = None) -> str:
    """sha256 over ``model_index.json`` and every file of the components it lists, by relative path: the
    same weights give the same fingerprint wherever the folder lies; other weights at the same path do not.
    Each file's digest is remembered in the cache folder (:func:`pogdiff.files.remembered_sha256`), so a
    checkpoint is read once, not at every run that checks it."""
    from pogdiff.encode.cache import cache_folder

    folder = Path(folder).resolve()
    files = sorted(file for name in components(json.loads((folder / PIPELINE_FILE).read_text()))
                   for file in (folder / name).rglob("*") if file.is_file())
    names = [PIPELINE_FILE] + [file.relative_to(folder).as_posix() for file in files]
    memo = cache_folder(cache_dir) / f"pipeline-digests-{hashlib.sha256(str(folder).encode()).hexdigest()[:16]}.json"
    digest = hashlib.sha256()
    for name, file_digest in zip(names, remembered_sha256(folder, names, memo, "checkpoint files")):
        digest.update(f"{name}\0{file_digest}\n".encode())
    return digest.hexdigest()
