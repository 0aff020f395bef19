"""Images as tensors (N, 3, H, W) in [-1, 1], as uint8 pixels, and as labelled grids for people to look at."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw


def from_uint8(pixels: np.ndarray) -> torch.Tensor:
    """uint8 arrays (N, H, W, 3) -> float tensor (N, 3, H, W) in [-1, 1]."""
    return torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] floats -> uint8 in [0, 255], same shape."""
    return ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def to_pil(image: torch.Tensor) -> Image.Image:
    """(3, H, W) in [-1, 1] -> RGB image."""
    return Image.fromarray(np.ascontiguousarray(to_uint8(image).permute(1, 2, 0).numpy()))


def labelled_grid(rows: list[tuple[str, torch.Tensor]], cell: int = 64, label_width: int = 150) -> Image.Image:
    """One row per (label, images (n, 3, H, W)), images scaled to ``cell`` pixels, label on the left."""
    columns = max(len(images) for _, images in rows)
    grid = Image.new("RGB", (label_width + columns * (cell + 2), len(rows) * (cell + 2)), "white")
    draw = ImageDraw.Draw(grid)
    for r, (label, images) in enumerate(rows):
        y = r * (cell + 2)
        draw.text((4, y + cell // 2 - 6), label, fill="black")
        for c, image in enumerate(images):
            grid.paste(to_pil(image).resize((cell, cell), Image.NEAREST), (label_width + c * (cell + 2), y))
    return grid


def save_grid(rows: list[tuple[str, torch.Tensor]], path: str | Path, **kwargs) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    labelled_grid(rows, **kwargs).save(path)
    return path
