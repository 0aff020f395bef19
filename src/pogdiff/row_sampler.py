"""The row sampler: which training rows each batch holds (``--sampler``), for every method.

Separate from the losses, so that any objective can be trained on balanced batches:

- ``uniform`` (default): a fresh seeded shuffle each epoch, every row once per epoch (drop-last).
- ``balanced``: rows drawn with replacement, each with probability proportional to
  1 / (images of its identity), so every identity is seen equally often (what
  practitioners do with per-folder repeats, kohya-ss sd-scripts' ``num_repeats``).
  Without an identity column (every row its own identity) the weight is the inverse
  text density of Eq. 11, exp(-ELBO) relative to the median, clipped to
  [1/density_max_ratio, density_max_ratio] so that no single caption takes over.

The method ``resample`` is vanilla + ``balanced`` (:class:`pogdiff.losses.ResampleLoss`).
"""

from __future__ import annotations

import torch

from pogdiff.encoded_dataset import EncodedDataset
from pogdiff.errors import PogdiffError
from pogdiff.psi import inverse_text_density_weight

SAMPLERS = ("uniform", "balanced")


def identity_balanced_weights(identity: torch.Tensor) -> torch.Tensor:
    """Per-row probabilities, each identity drawn equally often, then a row of it uniformly: 1 / (I * n_id)."""
    _, codes, counts = identity.cpu().unique(return_inverse=True, return_counts=True)
    weights = 1.0 / counts[codes].double()
    return (weights / weights.sum()).float()


def row_weights(sampler: str, encoded: EncodedDataset, density_max_ratio: float = 10.0) -> torch.Tensor | None:
    """Per-row probabilities of ``sampler`` (see the module docstring); None for ``uniform`` shuffling."""
    if sampler not in SAMPLERS:
        raise PogdiffError(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")
    if sampler == "uniform":
        return None
    if encoded.has_identities:
        return identity_balanced_weights(encoded.identity)
    weights = inverse_text_density_weight(encoded.elbo.cpu(), 1.0, density_max_ratio)
    return (weights / weights.sum()).float()


def batch_rows(num_rows: int, global_batch: int, micro_step: int, seed: int,
               weights: torch.Tensor | None = None) -> torch.Tensor:
    """Rows of the ``micro_step``-th global batch: a fresh seeded shuffle each epoch (drop-last).

    With ``weights`` (the balanced sampler) rows are drawn with replacement in proportion to them.
    Stateless: a resumed run draws exactly the rows an uninterrupted one would.
    """
    per_epoch = num_rows // global_batch
    epoch, position = divmod(micro_step, per_epoch)
    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    if weights is None:
        order = torch.randperm(num_rows, generator=generator)
    else:
        order = torch.multinomial(weights, per_epoch * global_batch, replacement=True, generator=generator)
    return order[position * global_batch:(position + 1) * global_batch]
