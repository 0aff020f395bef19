"""The dataset format: an image folder with a ``metadata.jsonl`` (Hugging Face ``imagefolder``).

Each line of ``metadata.jsonl`` is a JSON object with the image path relative to the
folder (``file_name``), its caption (``text``) and, optionally, who or what it shows
(``identity``). Identity feeds the indicator of Eq. 9 and the All/Few split of the
evaluation; without it every pair of images counts as different identities.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from pogdiff.errors import DatasetError

METADATA_FILE = "metadata.jsonl"
FEW_MAX_IMAGES = 5  # "Few" (minority) identities have at most this many training images


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

    def content_hash(self) -> str:
        """Hash of the metadata and the image bytes: caches keyed by it follow any edit."""
        digest = hashlib.sha256()
        for file, caption, identity in zip(self.files, self.captions, self.identity_names):
            digest.update(json.dumps([file, caption, identity]).encode())
            digest.update(hashlib.sha256((self.root / file).read_bytes()).digest())
        return digest.hexdigest()[:16]

    def load_images(self, resolution: int, center_crop: bool = True) -> torch.Tensor:
        """All images as one float tensor (N, 3, resolution, resolution) in [-1, 1]."""
        arrays = [load_image(self.root / f, resolution, center_crop) for f in self.files]
        return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def load_image(path: Path, resolution: int, center_crop: bool = True) -> np.ndarray:
    """One image as a uint8 array (resolution, resolution, 3): shorter side resized, then cropped."""
    try:
        with Image.open(path) as image:
            image.load()
            image = _to_rgb(image)
    except FileNotFoundError:
        raise DatasetError(f"{path}: image listed in {METADATA_FILE} is missing; add it or remove its line") from None
    except (UnidentifiedImageError, OSError) as error:
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


def _to_rgb(image: Image.Image) -> Image.Image:
    """Grayscale, palette, RGBA and 16-bit images become 8-bit RGB (alpha over white)."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        array = np.asarray(image, dtype=np.float64)
        image = Image.fromarray((array / max(array.max(), 1.0) * 255).astype(np.uint8))
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
    """Read and check ``root/metadata.jsonl``; raise :class:`DatasetError` naming file, line and fix."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"{root}: dataset folder not found; pass a folder that holds {METADATA_FILE} and the images")
    metadata = root / METADATA_FILE
    if not metadata.is_file():
        near = sorted(p.name for p in root.glob("metadata*"))
        hint = f" (found {', '.join(near)}: rename it to {METADATA_FILE})" if near else ""
        raise DatasetError(f"{metadata}: no {METADATA_FILE} in the dataset folder{hint}; "
                           f"write one JSON object per line with '{image_column}' and '{caption_column}'")
    files, captions, identities = [], [], []
    seen: dict[str, int] = {}
    for number, line in enumerate(metadata.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise DatasetError(f"{metadata}:{number}: not valid JSON ({error.msg}); fix or remove that line") from None
        if not isinstance(row, dict):
            raise DatasetError(f"{metadata}:{number}: expected a JSON object, got {type(row).__name__}")
        for column in (image_column, caption_column):
            if column not in row:
                flag = "--image-column" if column == image_column else "--caption-column"
                raise DatasetError(f"{metadata}:{number}: no '{column}' column (columns: {', '.join(row)}); "
                                   f"rename it or pass {flag} NAME")
        file, caption = row[image_column], row[caption_column]
        if not isinstance(caption, str) or not caption.strip():
            raise DatasetError(f"{metadata}:{number}: empty or non-string caption for {file!r}; write a caption")
        if not isinstance(file, str) or not file:
            raise DatasetError(f"{metadata}:{number}: '{image_column}' must be a relative path string")
        if file in seen:
            raise DatasetError(f"{metadata}:{number}: {file!r} is listed twice (first on line {seen[file]}); "
                               "remove the duplicate line")
        seen[file] = number
        if not (root / file).is_file():
            raise DatasetError(f"{root / file}: image listed on line {number} of {metadata} is missing; "
                               "add it or remove its line")
        files.append(file)
        captions.append(caption.strip())
        if identity_column and identity_column in row:
            identities.append(str(row[identity_column]))
        elif identity_column and identities:
            raise DatasetError(f"{metadata}:{number}: no '{identity_column}' column though earlier lines have one; "
                               "give every line an identity")
    if not files:
        raise DatasetError(f"{metadata}: no rows; add one JSON line per image")
    if identities and len(identities) != len(files):
        raise DatasetError(f"{metadata}: the first lines have no '{identity_column}' but later ones do; "
                           "give every line an identity")
    return ImageTextDataset(root, files, captions, identities or None)
