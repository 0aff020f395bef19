"""The dataset as the frozen encoders see it: what the losses look up by row, computed once, then cached.

Because phi and the image encoder are frozen, the caption states y, the image features
and neighbour table (Eq. 8) and the text density (Eq. 10) depend only on the dataset,
the encoders and a few parameters. Each is cached on its own (:mod:`pogdiff.cache`),
keyed by exactly what it depends on (docs/bad-input.md, "Caches"):

| cache file | key |
|---|---|
| ``text-*`` caption states y, pooled vectors, phi("") | the captions in row order, the text encoder |
| ``image-features-*`` | the image tensor (pixels, resolution, crop), the image encoder |
| ``neighbours-*`` (Eq. 8) | the image-features key, k |
| ``text-density-*`` ELBO (Eq. 10) | the text key, the VAE's latent size, the seed |

so editing a caption or an image, or changing k, recomputes what depends on it and
nothing else, while touching, moving or copying the dataset folder recomputes nothing.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from pogdiff.cache import Tensors, cached, tensor_digest
from pogdiff.data.dataset import ImageTextDataset
from pogdiff.encoders import ImageEncoder, TextEncoder
from pogdiff.errors import PogdiffError
from pogdiff.neighbours import NeighbourTable, find_neighbours
from pogdiff.text_density import fit_text_density

@dataclass
class EncodedDataset:
    """Everything the losses look up by dataset row."""

    text_states: torch.Tensor      # (N, L, D) y = phi(c) per caption
    uncond_states: torch.Tensor    # (L, D) phi("") for caption dropout and guidance
    neighbours: NeighbourTable     # Eq. 8
    identity: torch.Tensor         # (N,) identity codes for Eq. 9's indicator
    elbo: torch.Tensor             # (N,) ELBO_VAE(y), the log text density of Eq. 10

    def __len__(self) -> int:
        return len(self.identity)

    def to(self, device) -> "EncodedDataset":
        return EncodedDataset(self.text_states.to(device), self.uncond_states.to(device),
                             self.neighbours.to(device), self.identity.to(device), self.elbo.to(device))


def encode_dataset(
    dataset: ImageTextDataset,
    images: torch.Tensor,
    text_encoder: TextEncoder,
    image_encoder: ImageEncoder | None = None,
    k: int = 10,
    vae_latent_dim: int = 8,
    seed: int = 0,
    cache_dir: str | Path | None = None,
    neighbour_backend: str = "auto",
) -> EncodedDataset:
    """Embed captions and images, find neighbours, fit the text-density VAE; each cached by what it depends on.

    The global RNG is left as it was (loading an encoder initialises layers at random before
    reading its weights), so a run draws the same noise whether the cache was warm or cold.
    """
    n = len(dataset)
    if not 1 <= k <= n - 1:
        raise PogdiffError(f"{dataset.root}: --k {k} neighbours per image, but the dataset has {n} images "
                           f"(at most {n - 1} other images each); pass --k between 1 and {n - 1}")
    text_key = {"captions": hashlib.sha256(json.dumps(dataset.captions).encode()).hexdigest(),
                 "encoder": text_encoder.name}
    image_key = {"images": tensor_digest(images), "encoder": image_encoder.name if image_encoder else ImageEncoder.name}

    def embed_text() -> Tensors:
        text = text_encoder.encode(dataset.captions)
        uncond = text_encoder.encode([""]).states[0]
        _check_rows(text.states, dataset, "the text embedding of its caption", "check that caption")
        if not torch.isfinite(uncond).all():
            raise PogdiffError(f"text encoder {text_encoder.name}: NaN or inf for the empty caption; "
                               "the text encoder's weights are broken")
        return {"states": text.states, "pooled": text.pooled, "uncond": uncond}

    def embed_images() -> Tensors:
        features = (image_encoder or ImageEncoder())(images)
        _check_rows(features, dataset, "its image features", "replace the image")
        return {"features": features}

    def neighbours() -> Tensors:
        features = cached(cache_dir, "image-features", image_key, embed_images)["features"]
        table = find_neighbours(features, k, neighbour_backend)
        return {"index": table.index, "similarity": table.similarity}

    def text_density() -> Tensors:
        elbo = fit_text_density(text["pooled"], latent_dim=vae_latent_dim, seed=seed)
        _check_rows(elbo, dataset, "the text-density ELBO of its caption (the VAE diverged)",
                    "try another --seed or --vae-latent-dim")
        return {"elbo": elbo}

    with torch.random.fork_rng(devices=[]):
        text = cached(cache_dir, "text", text_key, embed_text)
        table = cached(cache_dir, "neighbours", {**image_key, "k": k}, neighbours)
        density = cached(cache_dir, "text-density", {**text_key, "vae_latent_dim": vae_latent_dim, "seed": seed},
                          text_density)
    return EncodedDataset(text["states"], text["uncond"], NeighbourTable(table["index"], table["similarity"]),
                         dataset.identity_codes(), density["elbo"])


def _check_rows(values: torch.Tensor, dataset: ImageTextDataset, what: str, fix: str) -> None:
    """Raise naming the first row whose ``values`` hold NaN or inf."""
    bad = (~torch.isfinite(values.flatten(1) if values.dim() > 1 else values[:, None])).any(dim=1).nonzero()
    if len(bad):
        row = int(bad[0])
        raise PogdiffError(f"{dataset.root / dataset.files[row]}: NaN or inf in {what} (row {row + 1} of "
                           f"{len(dataset)}, {len(bad)} rows in all); {fix}")


def training_images(backbone, images: torch.Tensor, random_flip: bool,
                    cache_dir: str | Path | None = None) -> torch.Tensor:
    """What the training loop draws x0 from: (V, N, ...) with V = 2 (image, mirror image) under
    ``random_flip``, else 1.

    For a latent backbone these are the frozen VAE's posteriors, encoded once and cached by
    the image tensor (content, resolution, crop) and the VAE's weights. The mirror image is
    encoded on its own rather than flipping latents: the VAE is not equivariant to flips,
    so this is what diffusers' script (which flips pixels, then encodes) trains on.
    """
    def encode() -> Tensors:  # in chunks, so that no flipped copy of all images is ever held
        flips = (False, True) if random_flip else (False,)
        # Contiguous as when loaded from the cache file: the memory layout of x0 changes which
        # convolution kernels run, hence the last bits of the result.
        return {"images": torch.stack([torch.cat([backbone.cache_images(chunk.flip(-1) if flip else chunk)
                                                  for chunk in images.split(256)]) for flip in flips]).contiguous()}

    if backbone.image_cache_name is None:
        return encode()["images"]
    params = {"images": tensor_digest(images), "encoder": backbone.image_cache_name, "random_flip": random_flip}
    return cached(cache_dir, "latents", params, encode)["images"]
