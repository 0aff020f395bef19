"""The dataset as the frozen encoders see it: what the losses look up by row, computed once, then cached.

Because phi and the image encoders are frozen, the caption states y, the image features
and neighbour tables (Eq. 8) and the text density (Eq. 10) depend only on the dataset,
the encoders and a few parameters. Each is cached on its own (:mod:`pogdiff.cache`),
keyed by exactly what it depends on (docs/bad-input.md, "Caches"):

| cache file | key |
|---|---|
| ``text-*`` caption states y, pooled vectors, phi("") | the captions in row order, the text encoder |
| ``image-features-*`` | the image tensor (pixels, resolution, crop), the feature space's name (its weights) |
| ``neighbours-*`` (Eq. 8) | the image-features key, k |
| ``text-density-*`` ELBO (Eq. 10) | the text key, the VAE's latent size, the seed |

so editing a caption or an image, or changing k or the neighbour feature space,
recomputes what depends on it and nothing else, while touching, moving or copying the
dataset folder recomputes nothing. Image features and neighbours are computed when a
method asks for them (:meth:`ImageFeatureSpaces.neighbours`): only PoGDiff does.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from pogdiff.cache import Tensors, cached, tensor_digest
from pogdiff.data.dataset import ImageTextDataset
from pogdiff.encoders import TextEncoder
from pogdiff.errors import PogdiffError
from pogdiff.neighbour_features import neighbour_feature_space
from pogdiff.neighbours import NeighbourTable, check_neighbour_count, find_neighbours
from pogdiff.text_density import fit_text_density


class ImageFeatureSpaces:
    """The training images in the feature spaces of Eq. 8, and their k-nearest-neighbour tables, cached.

    ``spaces(name)`` returns a feature space (a ``name`` naming its weights, called on images:
    :mod:`pogdiff.neighbour_features`); ``load_images()`` gives the images again on a cache miss,
    so that they are not held in memory while training. The global RNG is left as it was.
    """

    def __init__(self, dataset: ImageTextDataset, images_digest: str, load_images: Callable[[], torch.Tensor],
                 spaces: Callable[[str], object], cache_dir: str | Path | None = None, backend: str = "auto"):
        self.dataset, self.images_digest, self.load_images = dataset, images_digest, load_images
        self.spaces, self.cache_dir, self.backend = spaces, cache_dir, backend
        self._opened: dict[str, object] = {}

    def _space(self, name: str):
        if name not in self._opened:
            self._opened[name] = self.spaces(name)
        return self._opened[name]

    def name(self, space: str) -> str:
        """What the space ``space`` is, naming its weights (the key of its cached features)."""
        return self._space(space).name

    def _key(self, space: str) -> dict:
        return {"images": self.images_digest, "encoder": self.name(space)}

    def features(self, name: str) -> torch.Tensor:
        """(N, D) features of the training images in the space ``name``."""
        def embed() -> Tensors:
            features = self._space(name)(self.load_images())
            _check_rows(features, self.dataset, "its image features", "replace the image")
            return {"features": features}

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)  # a latent backbone's unet space draws from the VAE posterior
            return cached(self.cache_dir, "image-features", self._key(name), embed)["features"]

    def neighbours(self, name: str, k: int) -> NeighbourTable:
        """Eq. 8's table: the k most similar other training images of each, in the space ``name``."""
        check_neighbour_count(k, len(self.dataset), str(self.dataset.root))

        def search() -> Tensors:
            table = find_neighbours(self.features(name), k, self.backend)
            return {"index": table.index, "similarity": table.similarity}

        with torch.random.fork_rng(devices=[]):
            table = cached(self.cache_dir, "neighbours", {**self._key(name), "k": k}, search)
        return NeighbourTable(table["index"], table["similarity"])


@dataclass
class EncodedDataset:
    """Everything the losses look up by dataset row."""

    text_states: torch.Tensor      # (N, L, D) y = phi(c) per caption
    uncond_states: torch.Tensor    # (L, D) phi("") for caption dropout and guidance
    identity: torch.Tensor         # (N,) identity codes for Eq. 9's indicator
    elbo: torch.Tensor             # (N,) ELBO_VAE(y), the log text density of Eq. 10
    image_features: ImageFeatureSpaces | None = None  # Eq. 8's features and neighbours, on demand

    def __len__(self) -> int:
        return len(self.identity)

    def identity_counts(self) -> torch.Tensor:
        """(N,) images of each row's identity."""
        _, codes, counts = self.identity.unique(return_inverse=True, return_counts=True)
        return counts[codes]

    @property
    def has_identities(self) -> bool:
        """Whether some rows share an identity (False without an identity column: every row is its own)."""
        return bool((self.identity_counts() > 1).any())

    def to(self, device) -> "EncodedDataset":
        return EncodedDataset(self.text_states.to(device), self.uncond_states.to(device), self.identity.to(device),
                              self.elbo.to(device), self.image_features)


def encode_dataset(
    dataset: ImageTextDataset,
    images: torch.Tensor,
    text_encoder: TextEncoder,
    vae_latent_dim: int = 8,
    seed: int = 0,
    cache_dir: str | Path | None = None,
    feature_spaces: Callable[[str], object] = neighbour_feature_space,
    load_images: Callable[[], torch.Tensor] | None = None,
    neighbour_backend: str = "auto",
) -> EncodedDataset:
    """Embed captions and fit the text-density VAE, each cached by what it depends on; image features
    and neighbours come on demand from ``feature_spaces`` (:class:`ImageFeatureSpaces`), with
    ``load_images`` (default: keep ``images``) giving the images again on a cache miss.

    The global RNG is left as it was (loading an encoder initialises layers at random before
    reading its weights), so a run draws the same noise whether the cache was warm or cold.
    """
    text_key = {"captions": hashlib.sha256(json.dumps(dataset.captions).encode()).hexdigest(),
                "encoder": text_encoder.name}

    def embed_text() -> Tensors:
        text = text_encoder.encode(dataset.captions)
        uncond = text_encoder.encode([""]).states[0]
        _check_rows(text.states, dataset, "the text embedding of its caption", "check that caption")
        if not torch.isfinite(uncond).all():
            raise PogdiffError(f"text encoder {text_encoder.name}: NaN or inf for the empty caption; "
                               "the text encoder's weights are broken")
        return {"states": text.states, "pooled": text.pooled, "uncond": uncond}

    def text_density() -> Tensors:
        elbo = fit_text_density(text["pooled"], latent_dim=vae_latent_dim, seed=seed)
        _check_rows(elbo, dataset, "the text-density ELBO of its caption (the VAE diverged)",
                    "try another --seed or --vae-latent-dim")
        return {"elbo": elbo}

    with torch.random.fork_rng(devices=[]):
        text = cached(cache_dir, "text", text_key, embed_text)
        density = cached(cache_dir, "text-density", {**text_key, "vae_latent_dim": vae_latent_dim, "seed": seed},
                         text_density)
    image_features = ImageFeatureSpaces(dataset, tensor_digest(images), load_images or (lambda: images),
                                        feature_spaces, cache_dir, neighbour_backend)
    return EncodedDataset(text["states"], text["uncond"], dataset.identity_codes(), density["elbo"], image_features)


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
