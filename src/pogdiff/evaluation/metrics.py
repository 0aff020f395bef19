"""Per-identity metrics on features (App. B, E): Fréchet distance, similarity, recall (Eq. 17).

Every function takes the features of one identity's images, (N, D) tensors in one
feature space (see :mod:`pogdiff.evaluation.features`), and returns one number or None
where the sets are too small for it. Averages over identities skip the None values.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.image.fid import FrechetInceptionDistance


class _GivenFeatures(nn.Module):
    """Pass-through "network" for torchmetrics' FID: it is fed features already extracted."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features


def frechet_distance(generated: torch.Tensor, real: torch.Tensor) -> float | None:
    """Fréchet distance between Gaussians fitted to two feature sets; None with < 2 on either side.

    ``||mu_g - mu_r||^2 + Tr(S_g + S_r - 2 (S_g S_r)^(1/2))`` (Heusel et al., 2017), computed
    by torchmetrics' ``FrechetInceptionDistance`` in float64. Per-identity sets are small
    (a few images, D up to 2048), so both covariances are singular. The formula stays
    exact: the eigenvalues of S_g S_r (a product of two PSD matrices) are real and
    non-negative, and torchmetrics sums their square roots, dropping the round-off
    imaginary parts. To keep it cheap, the features are first written in an orthonormal
    basis of the span of the centred features and the mean difference (at most
    N_g + N_r dimensions): every term is invariant under that rotation, so the distance is
    unchanged, while the eigenproblem shrinks from D x D (~1 s at D = 1280, ~5 s at 2048 on
    one CPU thread) to (N_g + N_r) x (N_g + N_r).
    """
    if len(generated) < 2 or len(real) < 2:
        return None
    x, y = generated.double(), real.double()
    span = torch.cat([x - x.mean(0), y - y.mean(0), (x.mean(0) - y.mean(0))[None]])
    if len(span) < x.shape[1]:
        basis = torch.linalg.qr(span.T).Q
        x, y = x @ basis, y @ basis
    # one process's own sets: no gathering from the others of `accelerate launch`, which are done by then
    metric = FrechetInceptionDistance(feature=_GivenFeatures(x.shape[1]), sync_on_compute=False)
    metric.update(y, real=True)
    metric.update(x, real=False)
    return max(metric.compute().item(), 0.0)  # round-off can leave -1e-12 for identical sets


def cosine_similarities(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(len(a), len(b)) cosine similarities."""
    return F.normalize(a.double(), dim=1) @ F.normalize(b.double(), dim=1).T


def mean_similarity(generated: torch.Tensor, real: torch.Tensor) -> float | None:
    """The paper's DINO score for one identity: mean cosine similarity over all (generated, real) pairs."""
    if len(generated) == 0 or len(real) == 0:
        return None
    return cosine_similarities(generated, real).mean().item()


def mean_similarity_to_others(features: torch.Tensor) -> float | None:
    """Mean cosine similarity over pairs of two different images of one set (no image against itself)."""
    if len(features) < 2:
        return None
    similarity = cosine_similarities(features, features)
    return ((similarity.sum() - similarity.diagonal().sum()) / (len(features) * (len(features) - 1))).item()


def recall(generated: torch.Tensor, training: torch.Tensor, threshold: float = 0.9) -> float | None:
    """Eq. 17 for one identity: covered training images / training images.

    A training image is covered when some generated image of its identity has cosine
    similarity >= ``threshold`` to it.
    """
    if len(training) == 0:
        return None
    if len(generated) == 0:
        return 0.0
    covered = cosine_similarities(generated, training).max(dim=0).values >= threshold
    return covered.double().mean().item()


def identity_accuracy(predicted: list[str | None], name: str) -> float:
    """Fraction of images a judge assigned to ``name``; no prediction (no face found) counts as wrong."""
    return sum(p == name for p in predicted) / len(predicted)


def mean_over(values: list[float | None]) -> float | None:
    """Mean of the values that are not None; None when none is."""
    present = [v for v in values if v is not None]
    return sum(present) / len(present) if present else None
