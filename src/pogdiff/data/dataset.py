"""The dataset format: an image folder with a ``metadata.jsonl`` (Hugging Face ``imagefolder``).

Each line of ``metadata.jsonl`` is a JSON object with the image path relative to the
folder (``file_name``), its caption (``text``) and, optionally, who or what it shows
(``identity``). Identity feeds the indicator of Eq. 9 and the All/Few split of the
evaluation; without it every pair of images counts as different identities.
"""

from __future__ import annotations

import errno
import json
import os
import posixpath
import re
import unicodedata
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from pogdiff.errors import DatasetError, PogdiffWarning

METADATA_FILE = "metadata.jsonl"
FEW_MAX_IMAGES = 5  # "Few" (minority) identities have at most this many training images
MAX_PIXELS = 64 * 2**20  # a 50-megapixel photo fits; decoded as RGB it takes 192 MiB
MAX_ASPECT_RATIO = 16  # a wider image would lose over 15/16 of itself to the square crop
URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")  # https://, s3://, hf://, file://: no image of the folder


@dataclass
class ImageTextDataset:
    """Image paths, captions and optional identities of one dataset folder."""

    root: Path
    files: list[str]
    captions: list[str]
    identities: list[str] | None

    def __len__(self) -> int:
        return len(self.files)

    @property
    def identity_names(self) -> list[str]:
        """Identity of each row; rows without an identity column are their own identity."""
        return self.identities if self.identities is not None else [f"#{i}" for i in range(len(self))]

    def identity_counts(self) -> Counter:
        return Counter(self.identity_names)

    def few_identities(self, few_max_images: int = FEW_MAX_IMAGES) -> set[str]:
        """The minority ("Few") identities: at most ``few_max_images`` training images."""
        return {name for name, count in self.identity_counts().items() if count <= few_max_images}

    def identity_codes(self) -> torch.Tensor:
        """Integer code per row, equal codes meaning the same identity (Eq. 9's indicator)."""
        index = {name: i for i, name in enumerate(dict.fromkeys(self.identity_names))}
        return torch.tensor([index[name] for name in self.identity_names], dtype=torch.long)


def load_image(path: Path, resolution: int, center_crop: bool = True, draft: bool = True) -> np.ndarray:
    """One image as a uint8 array (resolution, resolution, 3): shorter side resized, then cropped.

    With ``draft``, a JPEG is decoded at a reduced scale (libjpeg's DCT scaling, 1/2 to 1/8) that keeps both
    sides at least twice ``resolution``, so the resize still antialiases from a larger image: a camera photo
    decodes several times faster, its pixels within a few levels of a full decode (benchmarks/encode_throughput.py).
    """
    try:
        with Image.open(path) as image:
            _check_decoded_size(image, path)
            if draft:
                image.draft("RGB", (2 * resolution, 2 * resolution))
            image.load()
            image = _to_rgb(ImageOps.exif_transpose(image))
    except FileNotFoundError:
        raise DatasetError(f"{path}: image listed in {METADATA_FILE} is missing; add it or remove its line") from None
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as error:
        raise DatasetError(f"{path}: cannot read this image ({error}); replace it or remove its line") from None
    scale = resolution / min(image.size)
    size = (max(resolution, round(image.width * scale)), max(resolution, round(image.height * scale)))
    image = image.resize(size, Image.BICUBIC)
    if center_crop:
        left, top = (image.width - resolution) // 2, (image.height - resolution) // 2
    else:
        left, top = 0, 0
    image = image.crop((left, top, left + resolution, top + resolution))
    return np.asarray(image, dtype=np.uint8)


def _check_decoded_size(image: Image.Image, path: Path) -> None:
    """Refuse, from the header alone, an image whose pixels would not fit in memory or whose shape
    cannot be cropped to a square (a 3,000,000 x 1 PNG is 8.8 KB on disk)."""
    width, height = image.size
    if width * height > MAX_PIXELS or max(width, height) > MAX_ASPECT_RATIO * min(width, height):
        raise DatasetError(f"{path}: {width}x{height} pixels, more than {MAX_PIXELS // 2**20} Mi pixels or more than "
                           f"{MAX_ASPECT_RATIO} times as wide as high (or high as wide); crop or shrink it, "
                           "or remove its line")


def _to_rgb(image: Image.Image) -> Image.Image:
    """Grayscale, palette, RGBA, CMYK and 16-bit or float images become 8-bit RGB (alpha over white)."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        array = np.asarray(image, dtype=np.float64)
        if not np.isfinite(array).all():
            raise ValueError("NaN or infinite pixel values")
        image = Image.fromarray((array / max(array.max(), 1.0) * 255).clip(0, 255).astype(np.uint8))
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        image = image.convert("RGBA")
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, image)
    return image.convert("RGB")


def load_dataset(
    root: str | Path,
    caption_column: str = "text",
    identity_column: str | None = "identity",
    image_column: str = "file_name",
) -> ImageTextDataset:
    """Read and check ``root/metadata.jsonl``; raise :class:`DatasetError` naming file, line and fix.

    Nothing is written. Problems that still leave a usable dataset (a single-image
    identity, an identity column under another name) are reported once as a
    :class:`PogdiffWarning`. docs/bad-input.md lists every case.
    """
    root = Path(root)
    metadata = _metadata_file(root, caption_column, image_column)
    files, captions, identities = [], [], []
    missing: list[tuple[str, int]] = []
    seen: dict[str, int] = {}
    identity_lines: dict[str, tuple[object, int]] = {}
    columns: dict[str, None] = {}
    listings: dict[Path, list[str]] = {}  # folders listed to find a name in another Unicode normalisation
    for number, line in enumerate(_read_lines(metadata), start=1):
        if not line.strip():
            continue
        where = f"{metadata}:{number}"
        row = _json_object(line, where)
        columns.update(dict.fromkeys(row))
        file, caption = _image_and_caption(row, root, where, image_column, caption_column)
        if not (root / file).is_file():
            file = _on_disk(root, file, listings) or file
        if file in seen:
            raise DatasetError(f"{where}: {file!r} is listed twice (first on line {seen[file]}); "
                               "remove the duplicate line")
        seen[file] = number
        if not (root / file).is_file():
            missing.append((file, number))
        files.append(file)
        captions.append(caption)
        if identity_column and identity_column in row:
            identities.append(_identity(row[identity_column], where, number, identity_lines))
        elif identity_column and identities:
            raise DatasetError(f"{where}: no '{identity_column}' column though earlier lines have one; "
                               "give every line an identity")
    if not files:
        raise DatasetError(f"{metadata}: no rows; add one JSON line per image")
    if len(files) == 1:
        raise DatasetError(f"{metadata}: a single row, but every image needs another one as its neighbour (Eq. 8); "
                           "add images")
    _check_images_exist(root, metadata, missing)
    if identities and len(identities) != len(files):
        raise DatasetError(f"{metadata}: the first lines have no '{identity_column}' but later ones do; "
                           "give every line an identity")
    dataset = ImageTextDataset(root, files, captions, identities or None)
    _warn_about_identities(dataset, metadata, identity_column, [c for c in columns if c not in
                                                                 (image_column, caption_column)])
    return dataset


def _metadata_file(root: Path, caption_column: str, image_column: str) -> Path:
    """``root/metadata.jsonl``, or an error saying what is there instead."""
    if not root.is_dir():
        what = "is a file, not a folder" if root.is_file() else "dataset folder not found"
        raise DatasetError(f"{root}: {what}; pass a folder that holds {METADATA_FILE} and the images")
    metadata = root / METADATA_FILE
    if not metadata.is_file():
        raise DatasetError(f"{metadata}: no {METADATA_FILE} in the dataset folder{_misnamed_metadata_hint(root)}; "
                           f"write one JSON object per line with '{image_column}' and '{caption_column}'")
    return metadata


def _json_object(line: str, where: str) -> dict:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as error:
        raise DatasetError(f"{where}: not valid JSON ({error.msg} at column {error.colno}); "
                           "fix or remove that line") from None
    if not isinstance(row, dict):
        raise DatasetError(f"{where}: expected a JSON object, got {type(row).__name__}; "
                           "write one {...} object per line")
    return row


def _image_and_caption(row: dict, root: Path, where: str, image_column: str, caption_column: str) -> tuple[str, str]:
    for column in (image_column, caption_column):
        if column not in row:
            flag = "--image-column" if column == image_column else "--caption-column"
            raise DatasetError(f"{where}: no '{column}' column (columns: {', '.join(row)}); "
                               f"rename it or pass {flag} NAME")
    file = _relative_path(row[image_column], root, where, image_column)
    caption = row[caption_column]
    if not isinstance(caption, str) or not caption.strip():
        raise DatasetError(f"{where}: empty or non-string caption for {file!r}; write a caption")
    return file, caption.strip()


def _identity(identity, where: str, number: int, first_seen: dict[str, tuple[object, int]]) -> str:
    """The identity as a name, in Unicode NFC: "Zoë" typed with a combined ë and with e + U+0308 (macOS file
    names, some editors) is one person. A number and a string that read the same (1 and "1") are refused,
    not merged. ``first_seen`` maps each name to the value and line it first appeared as.
    """
    if isinstance(identity, bool) or not isinstance(identity, (str, int)) or not str(identity).strip():
        raise DatasetError(f"{where}: identity {identity!r} is not a name; "
                           "write a non-empty string (or drop the column from every line)")
    name = unicodedata.normalize("NFC", str(identity).strip())
    first, line = first_seen.setdefault(name, (identity, number))
    if type(first) is not type(identity):
        raise DatasetError(f"{where}: identity {identity!r} and {first!r} on line {line} would count as one identity; "
                           "write every identity as a string (\"1\", not 1)")
    return name


def _on_disk(root: Path, file: str, listings: dict[Path, list[str]]) -> str | None:
    """``file`` as it is spelled on disk when its name (or a folder's) is there in another Unicode normalisation
    only: metadata.jsonl in NFC, the files in NFD as macOS writes them (ext4 tells the two apart). None when
    it is not there, or more than one spelling is."""
    folder, parts = root, []
    for part in PurePosixPath(file).parts:
        if not (folder / part).exists():
            if folder not in listings:
                try:
                    listings[folder] = os.listdir(folder) if folder.is_dir() else []
                except OSError:
                    listings[folder] = []
            name = unicodedata.normalize("NFC", part)
            spelled = [entry for entry in listings[folder] if unicodedata.normalize("NFC", entry) == name]
            if len(spelled) != 1:
                return None
            part = spelled[0]
        folder, parts = folder / part, [*parts, part]
    return str(PurePosixPath(*parts)) if folder.is_file() else None


def _check_images_exist(root: Path, metadata: Path, missing: list[tuple[str, int]]) -> None:
    """One error for every listed image that is not a file, naming the first."""
    if missing:
        (file, number), others = missing[0], [file for file, _ in missing[1:]]
        path = root / file
        if _is_link_loop(path):
            raise DatasetError(f"{path}: image listed on line {number} of {metadata} is a symbolic link loop; point "
                               f"the link at the image or remove its line{and_more(others, 'missing')}")
        what = "is not a file" if path.exists() else "is missing"
        raise DatasetError(f"{path}: image listed on line {number} of {metadata} {what}; "
                           f"add it or remove its line{and_more(others, 'missing')}")


def _is_link_loop(path: Path) -> bool:
    """Whether ``path`` (or a folder on its way) is a symbolic link that leads back to itself."""
    try:
        os.stat(path)
    except OSError as error:
        return error.errno == errno.ELOOP
    return False


def _read_lines(metadata: Path) -> list[str]:
    """The metadata's lines; UTF-8 with or without a byte-order mark (Windows editors write one)."""
    data = metadata.read_bytes()
    try:
        # "\n" only: JSON strings may hold U+2028, U+0085 and other characters that splitlines() breaks at
        return data.decode("utf-8-sig").split("\n")
    except UnicodeDecodeError as error:
        line = data[:error.start].count(b"\n") + 1
        raise DatasetError(f"{metadata}:{line}: not UTF-8 text (byte {data[error.start]:#04x}); "
                           "save the file as UTF-8") from None


def and_more(files: list[str], what: str) -> str:
    """' (N more WHAT: a, b, c, ...)' after a message naming the first file; '' when there are none."""
    if not files:
        return ""
    shown = ", ".join(files[:3]) + (", ..." if len(files) > 3 else "")
    return f" ({len(files)} more {what}: {shown})"


def _misnamed_metadata_hint(root: Path) -> str:
    near = sorted(p.name for p in root.iterdir() if p.name.lower().startswith("metadata"))
    if not near:
        return ""
    if any(Path(name).suffix.lower() in (".csv", ".parquet", ".json") for name in near):
        return f" (found {', '.join(near)}: convert it to {METADATA_FILE}, one JSON object per line)"
    return f" (found {', '.join(near)}: rename it to {METADATA_FILE})"


def _relative_path(value, root: Path, where: str, column: str) -> str:
    """The image path as a normalised relative POSIX path that stays inside ``root``."""
    if not isinstance(value, str) or not value.strip():
        raise DatasetError(f"{where}: '{column}' must be a path string relative to {root}")
    if URL.match(value.strip()):
        raise DatasetError(f"{where}: {value.strip()!r} is a URL; {column} must be a path relative to DATA; "
                           "download the images first")
    path = PurePosixPath(posixpath.normpath(value.strip().replace("\\", "/")))
    if path.is_absolute() or path.parts[0] == "..":
        raise DatasetError(f"{where}: {value!r} is outside the dataset folder; "
                           f"copy the image into {root} and give its path relative to it")
    return str(path)


def _warn_about_identities(dataset: ImageTextDataset, metadata: Path, identity_column: str | None,
                           other_columns: list[str]) -> None:
    if dataset.identities is None:
        if identity_column and other_columns:
            warnings.warn(f"{metadata}: no '{identity_column}' column, so every image counts as its own identity; "
                          f"if '{other_columns[0]}' holds who is shown, pass --identity-column {other_columns[0]}",
                          PogdiffWarning, stacklevel=3)
        return
    single = [name for name, count in dataset.identity_counts().items() if count == 1]
    if single:
        shown = ", ".join(single[:3]) + (f" and {len(single) - 3} more" if len(single) > 3 else "")
        warnings.warn(f"{metadata}: {len(single)} identit{'y has' if len(single) == 1 else 'ies have'} a single "
                      f"image ({shown}); PoGDiff assumes >= 2: with no same-identity neighbour, Eq. 9 gives them "
                      "only the other-identity weight s^(a1+a2); add a second image to borrow from their own",
                      PogdiffWarning, stacklevel=3)
