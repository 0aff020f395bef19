"""Per-dataset quantities computed once with the frozen encoders, then cached.

Because phi and the image encoder are frozen, the caption states y, the neighbour table
(Eq. 8) and the text density (Eq. 10) depend only on the dataset, the encoders and a
few parameters. They are computed once, cached under a key of all of those, and shared
by every method that needs them.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from pogdiff.data.dataset import ImageTextDataset
from pogdiff.encoders import ImageEncoder, TextEncoder
from pogdiff.errors import PogdiffError
from pogdiff.neighbours import NeighbourTable, find_neighbours
from pogdiff.text_density import fit_text_density


@dataclass
class DatasetTables:
    """Everything the losses look up by dataset row."""

    text_states: torch.Tensor      # (N, L, D) y = phi(c) per caption
    uncond_states: torch.Tensor    # (L, D) phi("") for caption dropout and guidance
    neighbours: NeighbourTable     # Eq. 8
    identity: torch.Tensor         # (N,) identity codes for Eq. 9's indicator
    elbo: torch.Tensor             # (N,) ELBO_VAE(y), the log text density of Eq. 10

    def __len__(self) -> int:
        return len(self.identity)

    def to(self, device) -> "DatasetTables":
        return DatasetTables(self.text_states.to(device), self.uncond_states.to(device),
                             self.neighbours.to(device), self.identity.to(device), self.elbo.to(device))

    def check_finite(self, source: str) -> None:
        for name in ("text_states", "uncond_states", "elbo"):
            if not torch.isfinite(getattr(self, name)).all():
                raise PogdiffError(f"{source}: NaN or inf in {name}; delete this cache file and run again")
        if not torch.isfinite(self.neighbours.similarity).all():
            raise PogdiffError(f"{source}: NaN or inf in neighbour similarities; delete this cache file and run again")


def default_cache_dir() -> Path:
    base = os.environ.get("POGDIFF_CACHE") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "pogdiff"
    return Path(base)


def build_tables(
    dataset: ImageTextDataset,
    images: torch.Tensor,
    text_encoder: TextEncoder,
    image_encoder: ImageEncoder | None = None,
    k: int = 10,
    vae_latent_dim: int = 8,
    seed: int = 0,
    cache_dir: str | Path | None = None,
) -> DatasetTables:
    """Embed captions and images, find neighbours, fit the text-density VAE; cached by content."""
    params = {"dataset": dataset.content_hash(), "text": text_encoder.name, "image": ImageEncoder.name,
              "k": k, "vae_latent_dim": vae_latent_dim, "seed": seed, "resolution": images.shape[-1], "version": 1}
    key = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:20]
    path = Path(cache_dir or default_cache_dir()) / f"tables-{key}.safetensors"
    if path.is_file():
        tables = _load(path)
        tables.check_finite(str(path))
        return tables
    text = text_encoder.encode(dataset.captions)
    uncond = text_encoder.encode([""]).states[0]
    features = (image_encoder or ImageEncoder())(images)
    neighbours = find_neighbours(features, k)
    elbo = fit_text_density(text.pooled, latent_dim=vae_latent_dim, seed=seed)
    tables = DatasetTables(text.states, uncond, neighbours, dataset.identity_codes(), elbo)
    tables.check_finite("computed tables")
    _save_atomic(tables, path, params)
    return tables


def _save_atomic(tables: DatasetTables, path: Path, params: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    save_file({"text_states": tables.text_states.contiguous(), "uncond_states": tables.uncond_states.contiguous(),
               "neighbour_index": tables.neighbours.index.contiguous(),
               "neighbour_similarity": tables.neighbours.similarity.contiguous(),
               "identity": tables.identity.contiguous(), "elbo": tables.elbo.contiguous()},
              tmp, metadata={"params": json.dumps(params)})
    os.replace(tmp, path)


def _load(path: Path) -> DatasetTables:
    t = load_file(path)
    return DatasetTables(t["text_states"], t["uncond_states"],
                         NeighbourTable(t["neighbour_index"], t["neighbour_similarity"]), t["identity"], t["elbo"])


def training_images(backbone, dataset: ImageTextDataset, images: torch.Tensor, center_crop: bool,
                    random_flip: bool, cache_dir: str | Path | None = None) -> torch.Tensor:
    """What the training loop draws x0 from: (V, N, ...) with V = 2 (image, mirror image) under
    ``random_flip``, else 1.

    For a latent backbone these are the frozen VAE's posteriors, encoded once and cached by
    dataset content, resolution, crop and VAE weights. The mirror image is encoded on its own
    rather than flipping latents: the VAE is not equivariant to flips, so this is what
    diffusers' script (which flips pixels, then encodes) trains on.
    """
    def encode() -> torch.Tensor:  # in chunks, so that no flipped copy of all images is ever held
        flips = (False, True) if random_flip else (False,)
        # Contiguous as when loaded from the cache file: the memory layout of x0 changes which
        # convolution kernels run, hence the last bits of the result.
        return torch.stack([torch.cat([backbone.cache_images(chunk.flip(-1) if flip else chunk)
                                       for chunk in images.split(256)]) for flip in flips]).contiguous()

    if backbone.image_cache_name is None:
        return encode()
    params = {"dataset": dataset.content_hash(), "encoder": backbone.image_cache_name, "resolution": images.shape[-1],
              "center_crop": center_crop, "random_flip": random_flip, "version": 1}
    key = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:20]
    path = Path(cache_dir or default_cache_dir()) / f"images-{key}.safetensors"
    if path.is_file():
        cached = load_file(path)["images"]
        if not torch.isfinite(cached).all():
            raise PogdiffError(f"{path}: NaN or inf in cached image encodings; delete this cache file and run again")
        return cached
    cached = encode()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    save_file({"images": cached.contiguous()}, tmp, metadata={"params": json.dumps(params)})
    os.replace(tmp, path)
    return cached
