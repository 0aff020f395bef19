"""Neighbour sampling of PoGDiff (Sec. 3.2, Eq. 8).

Every training image is embedded with a frozen image encoder; its k most similar other
images by cosine similarity are its neighbours. At each step one neighbour j is drawn
with probability w_j = s_j / sum_j s_j (Eq. 8) and its caption embedding becomes y'.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

# Similarity blocks of at most this many entries: memory stays bounded whatever N is.
_BLOCK_ELEMENTS = 1 << 24


@dataclass
class NeighbourTable:
    """The k nearest other images of every image, most similar first."""

    index: torch.Tensor       # (N, k) long
    similarity: torch.Tensor  # (N, k) cosine similarity s_1 >= ... >= s_k

    @property
    def k(self) -> int:
        return self.index.shape[1]

    def sampling_weights(self) -> torch.Tensor:
        """Eq. 8: w_j = s_j / sum_j s_j, with negative similarities counted as 0 (uniform if all are)."""
        s = self.similarity.clamp(min=0)
        total = s.sum(dim=1, keepdim=True)
        uniform = torch.full_like(s, 1.0 / self.k)
        return torch.where(total > 0, s / total.clamp(min=torch.finfo(s.dtype).tiny), uniform)

    def draw(self, rows: torch.Tensor, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Draw one neighbour per row from Cat(w) (Eq. 8): its dataset index and similarity s."""
        weights = self.sampling_weights()[rows]
        choice = torch.multinomial(weights, 1, generator=generator).squeeze(1)
        return self.index[rows, choice], self.similarity[rows, choice]

    def to(self, device) -> "NeighbourTable":
        return NeighbourTable(self.index.to(device), self.similarity.to(device))


def find_neighbours(features: torch.Tensor, k: int) -> NeighbourTable:
    """Exact k-nearest neighbours by cosine similarity, excluding each point itself, in row blocks."""
    n = len(features)
    if n < 2:
        raise ValueError(f"neighbours need at least 2 images, got {n}")
    k = min(k, n - 1)
    normed = F.normalize(features.float(), dim=1)
    block = max(1, _BLOCK_ELEMENTS // n)
    index, similarity = [], []
    for start in range(0, n, block):
        sims = normed[start:start + block] @ normed.T
        rows = torch.arange(start, min(start + block, n))
        sims[rows - start, rows] = -float("inf")
        top = sims.topk(k, dim=1)
        index.append(top.indices)
        similarity.append(top.values)
    return NeighbourTable(torch.cat(index), torch.cat(similarity))
