"""The dataset as the frozen encoders see it: what the losses look up by row, computed once, then cached.

Because phi and the image encoders are frozen, the caption states y, the image features
and neighbour tables (Eq. 8) and the text density (Eq. 10) depend only on the dataset,
the encoders and a few parameters. Each is cached on its own, keyed by exactly what it
depends on (docs/bad-input.md, "Caches"); per-row tables too large to hold are sharded
and read by row (:mod:`pogdiff.encode.shards`), the rest are single files (:mod:`pogdiff.encode.cache`):

| cache | key | per |
|---|---|---|
| ``text-*/`` caption states y, pooled vectors | the captions of the shard, the text encoder | distinct caption, sharded |
| ``latents-*/`` what x0 is drawn from | the shard's image files (bytes) and transform, the backbone's image encoder, flip | row, sharded |
| ``image-features-*/`` | the shard's image files and transform, the feature space's name (its weights) | row, sharded |
| ``neighbours-*`` (Eq. 8) | the image-features key, k | row |
| ``text-density-*`` ELBO (Eq. 10) | the text key, the rows' captions, the VAE's latent size, the seed | distinct caption |

so editing a caption or an image, or changing k or the neighbour feature space,
recomputes what depends on it and nothing else, while touching, moving or copying the
dataset folder recomputes nothing. Caption states are stored once per distinct caption,
with a row -> caption index; nothing of size N x (per-row tensor) is held in memory:
:meth:`EncodedDataset.caption_states` reads a batch's rows. Image features and neighbours
are computed when a method asks for them (:meth:`ImageFeatureSpaces.neighbours`): only PoGDiff does.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import torch
from accelerate import PartialState
from pogdiff.processes import built_once_first

from pogdiff.encode.cache import Tensors, cached
from pogdiff.data.dataset import ImageTextDataset
from pogdiff.backbones.placement import precision_dtype
from pogdiff.data.image_files import ImageFiles, pixels_to_float
from pogdiff.encode.encoders import TextEncoder
from pogdiff.errors import PogdiffError
from pogdiff.encode.neighbour_features import neighbour_feature_space
from pogdiff.objectives.neighbours import NeighbourTable, check_neighbour_count, find_neighbours
from pogdiff.encode.shards import ShardedCache, ShardedTable
from pogdiff.encode.text_density import EVAL_SAMPLES, fit_text_density

_FEATURE_BATCH = 64


class ImageFeatureSpaces:
    """The training images in the feature spaces of Eq. 8, and their k-nearest-neighbour tables, cached.

    ``spaces(name)`` returns a feature space (a ``name`` naming its weights, called on images in [-1, 1], or
    with an ``embed_rows(rows)`` of its own: :mod:`pogdiff.encode.neighbour_features`); ``images`` decodes the
    training images a shard at a time on a cache miss. The global RNG is left as it was.
    """

    def __init__(self, images: ImageFiles, spaces: Callable[[str], object], cache_dir: str | Path | None = None,
                 backend: str = "auto", progress: bool = False):
        self.images, self.spaces, self.cache_dir = images, spaces, cache_dir
        self.backend, self.progress = backend, progress
        self._opened: dict[str, object] = {}
        self._caches: dict[str, ShardedCache] = {}
        self._tables: dict[tuple[str, int], NeighbourTable] = {}  # encoding builds it, the losses read it: once

    @property
    def dataset(self) -> ImageTextDataset:
        return self.images.dataset

    def _space(self, name: str):
        if name not in self._opened:
            with torch.random.fork_rng(devices=[]):  # encoders initialise layers at random before loading
                self._opened[name] = self.spaces(name)
        return self._opened[name]

    def name(self, space: str) -> str:
        """What the space ``space`` is, naming its weights (the key of its cached features)."""
        return self._space(space).name

    def _key(self, space: str) -> dict:
        return {"images": self.images.digest, "encoder": self.name(space)}

    def fill(self, name: str) -> None:
        """Compute this process's share of the features in the space ``name`` (all of them in one process)."""
        space = self._space(name)

        def embed(rows: range) -> Tensors:
            with torch.random.fork_rng(devices=[]):
                if hasattr(space, "embed_rows"):
                    features = space.embed_rows(rows)
                else:
                    features = torch.cat([space(pixels_to_float(batch))
                                          for batch in self.images.batches(rows, _FEATURE_BATCH)])
            _check_rows(features, self.dataset, rows, "its image features", "replace the image")
            return {"features": features.float()}

        self._cache(name).fill(embed, f"image features ({name})", self.progress)

    def _cache(self, name: str) -> ShardedCache:
        if name not in self._caches:
            self._caches[name] = ShardedCache(self.cache_dir, "image-features",
                                              {**self.images.transform, "encoder": self.name(name)},
                                              self.images.file_digests)
        return self._caches[name]

    def features(self, name: str) -> torch.Tensor:
        """(N, D) features of the training images in the space ``name`` (computed here when missing: in one
        process, or after every process has called :meth:`fill`)."""
        if not self._cache(name).complete():
            self.fill(name)
        return self._cache(name).open()["features"].read_all()

    def neighbours(self, name: str, k: int) -> NeighbourTable:
        """Eq. 8's table: the k most similar other training images of each, in the space ``name``."""
        check_neighbour_count(k, len(self.dataset), str(self.dataset.root))
        if (name, k) in self._tables:
            return self._tables[name, k]

        def search() -> Tensors:
            table = find_neighbours(self.features(name), k, self.backend)
            return {"index": table.index, "similarity": table.similarity}

        with torch.random.fork_rng(devices=[]):
            table = cached(self.cache_dir, "neighbours", {**self._key(name), "k": k}, search)
        self._tables[name, k] = NeighbourTable(table["index"], table["similarity"])
        return self._tables[name, k]


@dataclass
class EncodedDataset:
    """Everything the losses look up by dataset row."""

    caption_index: torch.Tensor                 # (N,) row -> its distinct caption
    caption_table: ShardedTable                 # (C, L, D) y = phi(c) per distinct caption, read per batch
    uncond_states: torch.Tensor                 # (L, D) phi("") for caption dropout and guidance
    identity: torch.Tensor                      # (N,) identity codes for Eq. 9's indicator
    elbo: torch.Tensor                          # (N,) ELBO_VAE(y) of each row's caption, the log density of Eq. 10
    image_features: ImageFeatureSpaces | None = None  # Eq. 8's features and neighbours, on demand

    @classmethod
    def of_rows(cls, text_states: torch.Tensor, uncond_states: torch.Tensor, identity: torch.Tensor,
                elbo: torch.Tensor, image_features=None) -> "EncodedDataset":
        """An encoded dataset held in memory with one caption per row (tests, benchmarks)."""
        return cls(torch.arange(len(identity), device=identity.device), ShardedTable.holding(text_states),
                   uncond_states, identity, elbo, image_features)

    def __len__(self) -> int:
        return len(self.identity)

    def caption_states(self, rows: torch.Tensor) -> torch.Tensor:
        """(B, L, D) float32 caption states y of ``rows``, on their device (a table on disk reads them on the CPU)."""
        return self.caption_table[self.caption_index[rows]].to(rows.device, torch.float32)

    def identity_counts(self) -> torch.Tensor:
        """(N,) images of each row's identity."""
        _, codes, counts = self.identity.unique(return_inverse=True, return_counts=True)
        return counts[codes]

    @property
    def has_identities(self) -> bool:
        """Whether some rows share an identity (False without an identity column: every row is its own)."""
        return bool((self.identity_counts() > 1).any())

    def to(self, device) -> "EncodedDataset":
        """The per-row tables on ``device``; caption states on disk stay there (:meth:`ShardedTable.to`)."""
        return replace(self, caption_index=self.caption_index.to(device), caption_table=self.caption_table.to(device),
                       uncond_states=self.uncond_states.to(device), identity=self.identity.to(device),
                       elbo=self.elbo.to(device))


def encode_dataset(
    dataset: ImageTextDataset,
    text_encoder: TextEncoder,
    images: ImageFiles,
    vae_latent_dim: int = 8,
    seed: int = 0,
    cache_dir: str | Path | None = None,
    feature_spaces: Callable[[str], object] = neighbour_feature_space,
    neighbour_backend: str = "auto",
    progress: bool = False,
) -> EncodedDataset:
    """Embed the distinct captions (each process its share of the shards) and fit the text-density VAE (built once:
    :func:`pogdiff.processes.built_once_first`, the others read its cache); image features and neighbours come on demand from
    ``feature_spaces`` (:class:`ImageFeatureSpaces`).

    The global RNG is left as it was (loading an encoder initialises layers at random before
    reading its weights), so a run draws the same noise whether the cache was warm or cold.
    """
    distinct = list(dict.fromkeys(dataset.captions))
    position = {caption: i for i, caption in enumerate(distinct)}
    caption_index = torch.tensor([position[c] for c in dataset.captions], dtype=torch.long)
    text_key = {"captions": hashlib.sha256(json.dumps(distinct).encode()).hexdigest(), "encoder": text_encoder.name}

    def embed_text(shard: range) -> Tensors:
        text = text_encoder.encode([distinct[i] for i in shard])
        states = text.states.to(text_encoder.cache_dtype)
        _check_captions(states, shard, caption_index, dataset, "the text embedding of its caption", "check that caption")
        return {"states": states, "pooled": text.pooled}

    def text_density() -> Tensors:
        elbo = fit_text_density(text["pooled"].read_all(), caption_index, latent_dim=vae_latent_dim, seed=seed)
        _check_captions(elbo, range(len(distinct)), caption_index, dataset,
                        "the text-density ELBO of its caption (the VAE diverged)", "try another --seed or --vae-latent-dim")
        return {"elbo": elbo}

    with torch.random.fork_rng(devices=[]):
        cache = ShardedCache(cache_dir, "text", {"encoder": text_encoder.name,
                                                 "dtype": str(text_encoder.cache_dtype)}, distinct)
        cache.fill(embed_text, "encode captions", progress)
        text = cache.open()
        uncond = text_encoder.encode([""]).states[0].float().cpu()
        if not torch.isfinite(uncond).all():
            raise PogdiffError(f"text encoder {text_encoder.name}: NaN or inf for the empty caption; "
                               "the text encoder's weights are broken")
        rows_key = hashlib.sha256(caption_index.numpy().tobytes()).hexdigest()
        with built_once_first():
            density = cached(cache_dir, "text-density", {**text_key, "rows": rows_key,
                                                         "vae_latent_dim": vae_latent_dim, "seed": seed,
                                                         "draws": EVAL_SAMPLES}, text_density)
    image_features = ImageFeatureSpaces(images, feature_spaces, cache_dir, neighbour_backend, progress)
    return EncodedDataset(caption_index, text["states"], uncond, dataset.identity_codes(),
                          density["elbo"][caption_index], image_features)


def _not_finite(values: torch.Tensor) -> torch.Tensor:
    """(len(values),) whether each entry (a row of any shape) holds NaN or inf."""
    return (~torch.isfinite(values.flatten(1) if values.dim() > 1 else values[:, None])).any(dim=1)


def _refuse_rows(bad_rows: torch.Tensor, dataset: ImageTextDataset, what: str, fix: str) -> None:
    """Raise naming the first of the dataset rows ``bad_rows`` (if any) and counting them."""
    if len(bad_rows):
        row = int(bad_rows[0])
        raise PogdiffError(f"{dataset.root / dataset.files[row]}: NaN or inf in {what} (row {row + 1} of "
                           f"{len(dataset)}, {len(bad_rows)} rows in all); {fix}")


def _check_rows(values: torch.Tensor, dataset: ImageTextDataset, rows: range, what: str, fix: str) -> None:
    """Raise naming the first of ``rows`` whose ``values`` hold NaN or inf."""
    _refuse_rows(torch.tensor(list(rows))[_not_finite(values)], dataset, what, fix)


def _check_captions(values: torch.Tensor, captions: range, caption_index: torch.Tensor, dataset: ImageTextDataset,
                    what: str, fix: str) -> None:
    """Raise naming the first row whose caption (one of ``captions``) has NaN or inf in ``values``."""
    bad_captions = torch.tensor(list(captions))[_not_finite(values)]
    _refuse_rows(torch.isin(caption_index, bad_captions).nonzero().squeeze(1), dataset, what, fix)


def training_latents(backbone, images: ImageFiles, random_flip: bool, cache_dir: str | Path | None = None,
                     progress: bool = False) -> list[ShardedTable]:
    """What the training loop draws x0 from, per row: ``[plain]``, or ``[plain, mirror image]`` under
    ``random_flip``; each process encodes its share of the shards.

    For a latent backbone these are the frozen VAE's posteriors (mean and log-variance), for the
    pixel backbone the uint8 pixels themselves, keyed by the image files and the encoder's weights.
    The mirror image is encoded on its own rather than flipping latents: the VAE is not
    equivariant to flips, so this is what diffusers' script (which flips pixels, then encodes) trains on.
    """
    tables = []
    for flip in (False, True) if random_flip else (False,):
        def encode(rows: range, flip=flip) -> Tensors:
            x0 = torch.cat([backbone.cache_images(batch.flip(-1) if flip else batch).to(backbone.cache_dtype)
                            for batch in images.batches(rows, backbone.encode_batch_size)])
            if x0.is_floating_point():
                _check_rows(x0, images.dataset, rows, "its latents", "replace the image, or check the VAE's weights")
            return {"x0": x0}

        params = {**images.transform, "encoder": backbone.image_cache_name, "flip": flip,
                  "dtype": str(backbone.cache_dtype)}
        cache = ShardedCache(cache_dir, "latents", params, images.file_digests)
        cache.fill(encode, "encode images" + (" (mirrored)" if flip else ""), progress)
        tables.append(cache.open()["x0"])
    return tables


def encode_for_training(dataset: ImageTextDataset, backbone, config, device, precision: str = "no",
                        neighbours: tuple[str, int] | None = None) -> tuple[EncodedDataset, list[ShardedTable]]:
    """Everything a run trains from, as ``pogdiff encode`` and ``pogdiff train`` compute it: the x0 tables
    (:func:`training_latents`), the encoded dataset, and with ``neighbours = (space, k)`` Eq. 8's features
    and table. Each process encodes its share of the shards; the tables built from all rows (text density,
    neighbours) are built once (:func:`pogdiff.processes.built_once_first`) while the others wait, then read from
    its cache.

    ``config`` holds the data options of :class:`pogdiff.training.train.TrainConfig`. The frozen encoders run in
    float32 on ``device`` (the denoiser joins them only once cast to ``precision``: a large one never sits there in
    float32); the 'unet' neighbour features run under ``precision``, after the backbone is cast to it, as the
    training loop will.
    """
    state = PartialState()
    backbone.encoders_to(device)
    images = ImageFiles(dataset, config.resolution, config.center_crop, config.dataloader_num_workers,
                        config.cache_dir, config.progress and state.is_local_main_process)
    with built_once_first():
        images.file_digests  # noqa: B018 -- hashed here once; the other processes read what this one remembered
    x0 = training_latents(backbone, images, config.random_flip, config.cache_dir, config.progress)
    encoded = encode_dataset(dataset, backbone.text_encoder, images, vae_latent_dim=config.vae_latent_dim,
                             seed=config.seed, cache_dir=config.cache_dir,
                             feature_spaces=lambda space: neighbour_feature_space(space, backbone, x0[0], precision),
                             progress=config.progress)
    if neighbours:
        encoded.image_features.name(neighbours[0])  # before the cast: the unet space fingerprints the weights as loaded
    backbone.to(device, precision_dtype(precision))
    if neighbours:
        encoded.image_features.fill(neighbours[0])
        with built_once_first():
            encoded.image_features.neighbours(*neighbours)
    images.close()
    return encoded, x0
