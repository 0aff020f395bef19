"""``--dataset-name``: a Hugging Face ``datasets`` folder read as a pogdiff dataset folder.

diffusers' training scripts pass ``--dataset_name`` to ``datasets.load_dataset``; pogdiff reads
local folders only (nothing is downloaded):

- a folder holding ``metadata.jsonl`` (an ``imagefolder`` whose metadata is already pogdiff's
  format, docs/dataset-format.md) is read as it is, without the ``datasets`` package;
- a folder written by ``Dataset.save_to_disk`` or ``DatasetDict.save_to_disk`` (its ``train``
  split, as diffusers trains on), or any other ``imagefolder`` (``metadata.csv``, or one
  subfolder per class: a ``label`` column holding the class name, for ``--identity-column
  label``), is converted once with ``datasets`` (``pip install 'pogdiff[datasets]'``) into
  ``CACHE/datasets/<name>-<key>/``: its images as ``images/NNNNNN.png`` under the
  ``--image-column`` name, every text, number and class-label column beside them in
  ``metadata.jsonl``. The key follows the names, sizes and modification times of the folder's
  files, so an edited dataset is converted again.

Under ``accelerate launch`` the conversion is built once (:func:`pogdiff.processes.built_once_first`): the main
process converts while the others wait, then read it, or, where each machine has its own cache folder, each
machine's first process converts its own copy. The conversion is written into a folder of its own
(:func:`pogdiff.files.temporary_path`) and renamed into place, so two conversions at once (two launches, two
machines) both end with the same complete folder: the one renamed second finds the first's, keeps it and removes
its own.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from pogdiff.encode.cache import cache_folder
from pogdiff.errors import PogdiffError, first_line
from pogdiff.files import atomic_folder, safe_stem
from pogdiff.processes import built_once_first

SAVED_TO_DISK = ("dataset_dict.json", "state.json")  # what DatasetDict / Dataset.save_to_disk write
PNG_MODES = ("1", "L", "LA", "P", "RGB", "RGBA", "I", "I;16")


def data_folder(data_dir: str | Path | None, dataset_name: str | Path | None, image_column: str = "file_name",
                cache_dir: str | Path | None = None) -> Path:
    """The dataset folder named by DATA or by ``--dataset-name`` (:func:`dataset_folder`): one line when both or
    neither is given."""
    if data_dir and dataset_name:
        raise PogdiffError(f"DATA {data_dir} and --dataset-name {dataset_name} both name the dataset; pass one of them")
    if not data_dir and not dataset_name:
        raise PogdiffError("no dataset: pass --data DATA (a folder with metadata.jsonl and images) or --dataset-name "
                           "FOLDER")
    return Path(data_dir) if data_dir else dataset_folder(dataset_name, image_column, cache_dir)


def dataset_folder(name: str | Path, image_column: str = "file_name", cache_dir: str | Path | None = None) -> Path:
    """The pogdiff dataset folder of ``--dataset-name name``: the folder itself, or its conversion (see above).

    Under ``accelerate launch`` it is converted once, while the other processes wait (see above).
    """
    folder = Path(name)
    if not folder.is_dir():
        raise PogdiffError(f"--dataset-name {name}: not a folder; pogdiff reads local datasets only: save a hub "
                           "dataset with datasets.load_dataset(NAME).save_to_disk(DIR) and pass DIR")
    if (folder / "metadata.jsonl").is_file():
        return folder
    target = cache_folder(cache_dir) / "datasets" / \
        f"{safe_stem(folder.resolve().name)}-{folder_key(folder, image_column)}"
    with built_once_first():
        if not (target / "metadata.jsonl").is_file():
            rows = load_train_split(folder)
            target.parent.mkdir(parents=True, exist_ok=True)
            with atomic_folder(target, lambda found: converted(found, image_column)) as tmp:
                write_image_folder(rows, tmp, image_column, folder)
    return target


def converted(target: Path, image_column: str) -> bool:
    """Whether ``target`` is a whole conversion: its metadata.jsonl, written last, and every image it names."""
    try:
        rows = [json.loads(line) for line in (target / "metadata.jsonl").read_text().splitlines() if line.strip()]
        return all((target / row[image_column]).is_file() for row in rows)
    except (OSError, ValueError, KeyError, TypeError):
        return False


def folder_key(folder: Path, image_column: str) -> str:
    """A digest of the folder's file names, sizes and modification times, and of the image column's name."""
    digest = hashlib.sha256(image_column.encode())
    for file in sorted(p for p in folder.rglob("*") if p.is_file()):
        stat = file.stat()
        digest.update(f"{file.relative_to(folder)}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


def load_train_split(folder: Path):
    """The ``datasets.Dataset`` a folder holds: saved with save_to_disk, else read as an imagefolder."""
    try:
        import datasets
    except ImportError:
        raise PogdiffError(f"--dataset-name {folder}: reading a Hugging Face datasets folder needs the datasets "
                           "package, which is not installed; pip install 'pogdiff[datasets]', or pass DATA, a "
                           "folder with metadata.jsonl (docs/dataset-format.md)") from None
    try:
        if any((folder / name).is_file() for name in SAVED_TO_DISK):
            loaded = datasets.load_from_disk(str(folder))
        else:
            loaded = datasets.load_dataset("imagefolder", data_dir=str(folder))
    except Exception as error:  # datasets' own errors about the user's files: one line, not a traceback
        raise PogdiffError(f"--dataset-name {folder}: datasets cannot read it ({first_line(error)}); pass a folder "
                           "written by save_to_disk or an imagefolder") from None
    if isinstance(loaded, dict):  # a DatasetDict
        if "train" not in loaded:
            raise PogdiffError(f"--dataset-name {folder}: no train split (it has {', '.join(loaded)}); save the "
                               "split to train on with save_to_disk and pass that folder")
        loaded = loaded["train"]
    return loaded


def write_image_folder(dataset, folder: Path, image_column: str, source: Path) -> None:
    """Write ``dataset``'s images and its text, number and class-label columns as a pogdiff dataset folder."""
    import datasets
    from PIL import ImageOps

    features = dataset.features
    image_columns = [c for c, feature in features.items() if isinstance(feature, datasets.Image)]
    if not image_columns:
        raise PogdiffError(f"--dataset-name {source}: no image column (columns: {', '.join(features)}); pass a "
                           "dataset with an Image column")
    if image_column not in image_columns and len(image_columns) > 1:
        raise PogdiffError(f"--dataset-name {source}: image columns {', '.join(image_columns)}; pass "
                           "--image-column NAME to choose one")
    images = image_column if image_column in image_columns else image_columns[0]
    (folder / "images").mkdir(parents=True)
    lines = []
    for i, row in enumerate(dataset):
        file = f"images/{i:06d}.png"
        image = ImageOps.exif_transpose(row[images])
        (image if image.mode in PNG_MODES else image.convert("RGB")).save(folder / file)
        record = {image_column: file}
        for column, feature in features.items():
            value = row[column]
            if isinstance(feature, datasets.ClassLabel) and isinstance(value, int):
                value = feature.int2str(value)
            if column not in (images, image_column) and (value is None or isinstance(value, (str, int, float, bool))):
                record[column] = value
        lines.append(json.dumps(record))
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
