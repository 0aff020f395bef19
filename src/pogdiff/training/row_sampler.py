"""The row sampler: which training rows each batch holds (``--sampler``), for every method.

Separate from the losses, so that any objective can be trained on balanced batches:

- ``uniform`` (default): a fresh seeded shuffle each epoch, every row once per epoch (drop-last).
- ``balanced``: rows drawn with replacement, each with probability proportional to
  1 / (images of its identity), so every identity is seen equally often (what
  practitioners do with per-folder repeats, kohya-ss sd-scripts' ``num_repeats``).
  Without an identity column (every row its own identity) the weight is the inverse
  text density of Eq. 11, exp(-ELBO) relative to the median, clipped to
  [1/density_max_ratio, density_max_ratio] so that no single caption takes over.

The method ``resample`` is vanilla + ``balanced`` (:class:`pogdiff.objectives.losses.ResampleLoss`).
"""

from __future__ import annotations

import torch

from pogdiff.encode.encoded_dataset import EncodedDataset
from pogdiff.options import check_sampler
from pogdiff.objectives.psi import inverse_text_density_weight


def identity_balanced_weights(identity: torch.Tensor) -> torch.Tensor:
    """Per-row probabilities, each identity drawn equally often, then a row of it uniformly: 1 / (I * n_id)."""
    _, codes, counts = identity.cpu().unique(return_inverse=True, return_counts=True)
    weights = 1.0 / counts[codes].double()
    return (weights / weights.sum()).float()


def row_weights(sampler: str, encoded: EncodedDataset, density_max_ratio: float = 10.0) -> torch.Tensor | None:
    """Per-row probabilities of ``sampler`` (see the module docstring); None for ``uniform`` shuffling."""
    check_sampler(sampler)
    if sampler == "uniform":
        return None
    if encoded.has_identities:
        return identity_balanced_weights(encoded.identity)
    weights = inverse_text_density_weight(encoded.elbo.cpu(), 1.0, density_max_ratio)
    return (weights / weights.sum()).float()


class RowSchedule:
    """Rows of each global batch of a run: a fresh seeded shuffle each epoch (drop-last), or with ``weights``
    (the balanced sampler) rows drawn with replacement in proportion to them.

    Stateless in what it draws: the rows of micro-step m depend only on (seed, m, weights), so a resumed run
    draws exactly the rows an uninterrupted one would. The epoch's order is drawn at once and kept while
    the steps stay in that epoch, so a step costs O(batch) and each epoch one draw of O(N log N).
    """

    def __init__(self, num_rows: int, global_batch: int, seed: int, weights: torch.Tensor | None = None):
        self.num_rows, self.global_batch, self.seed, self.weights = num_rows, global_batch, seed, weights
        self.per_epoch = num_rows // global_batch
        self._epoch, self._order = -1, torch.empty(0, dtype=torch.long)

    def epoch_order(self, epoch: int) -> torch.Tensor:
        """Every row of ``epoch``'s batches, in order (drawn once per epoch)."""
        if epoch != self._epoch:
            generator = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            self._order = torch.randperm(self.num_rows, generator=generator) if self.weights is None else \
                torch.multinomial(self.weights, self.per_epoch * self.global_batch, replacement=True,
                                  generator=generator)
            self._epoch = epoch
        return self._order

    def __getitem__(self, micro_step: int) -> torch.Tensor:
        """Rows of the ``micro_step``-th global batch."""
        epoch, position = divmod(micro_step, self.per_epoch)
        return self.epoch_order(epoch)[position * self.global_batch:(position + 1) * self.global_batch]


def batch_rows(num_rows: int, global_batch: int, micro_step: int, seed: int,
               weights: torch.Tensor | None = None) -> torch.Tensor:
    """Rows of the ``micro_step``-th global batch (:class:`RowSchedule`, for one step)."""
    return RowSchedule(num_rows, global_batch, seed, weights)[micro_step]
