"""Neighbour sampling of PoGDiff (Sec. 3.2, Eq. 8).

Every training image is embedded with a frozen image encoder (a feature space of
:mod:`pogdiff.encode.neighbour_features`); its k most similar other
images by cosine similarity are its neighbours. At each step one neighbour j is drawn
with probability w_j = s_j / sum_j s_j (Eq. 8) and its caption embedding becomes y'.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F

from pogdiff.errors import PogdiffError

# The feature spaces of Eq. 8 by name (``--neighbour-features``; built by :mod:`pogdiff.encode.neighbour_features`).
EFFICIENTNET_SPACE, FACE_SPACE, UNET_SPACE = "efficientnet-lite0", "faces", "unet"
BUILT_IN_SPACES = (EFFICIENTNET_SPACE, FACE_SPACE, UNET_SPACE)
DEFAULT_NEIGHBOUR_FEATURES = UNET_SPACE

# Similarity blocks of at most this many entries: memory stays bounded whatever N is (on a GPU, beside the
# backbone: 512 MiB of float32).
_BLOCK_ELEMENTS = 1 << 24
_GPU_BLOCK_ELEMENTS = 1 << 27
_QUERY_CHUNK = 4096


class NeighbourRequest(NamedTuple):
    """Which table of Eq. 8 a method draws from: the feature space (by name) and k."""

    space: str
    k: int


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


def check_neighbour_count(k: int, num_images: int, where: str) -> None:
    """Each of ``num_images`` images has at most num_images - 1 others to be its neighbours."""
    if not 1 <= k <= num_images - 1:
        raise PogdiffError(f"{where}: --k {k} neighbours per image, but the dataset has {num_images} images "
                           f"(at most {num_images - 1} other images each); pass --k between 1 and {num_images - 1}")


def find_neighbours(features: torch.Tensor, k: int, backend: str = "auto") -> NeighbourTable:
    """Exact k-nearest neighbours by cosine similarity, excluding each point itself; the table comes back on the CPU.

    ``backend``: "faiss" (an exact ``IndexFlatIP`` on the L2-normalised vectors, on the GPUs with faiss-gpu), "torch"
    (blocked matrix products, on the features' GPU, or on this machine's when there is one: :func:`search_device`),
    or "auto": torch where it runs on a GPU that faiss does not use (faiss without GPU support), else faiss when it
    is installed. Both search the queries in chunks, so memory beyond the (N, D) vectors stays bounded whatever N
    is; time grows as N^2 D (benchmarks/neighbours_density.py). On the CPU both use every core this process may
    run on (:func:`all_cpu_threads`), whatever OMP_NUM_THREADS says (``accelerate launch`` sets it to 1).
    """
    n = len(features)
    if n < 2:
        raise ValueError(f"neighbours need at least 2 images, got {n}")
    k = min(k, n - 1)
    if backend == "auto":
        backend = _auto_backend(features)
    searches = {"faiss": _search_faiss, "torch": _search_torch}
    if backend not in searches:
        raise ValueError(f"unknown neighbour backend {backend!r}; choose auto, faiss or torch")
    device = search_device(features) if backend == "torch" else torch.device("cpu")
    with all_cpu_threads(with_faiss=backend == "faiss"), torch.no_grad():
        normed = F.normalize(features.to(device, torch.float32), dim=1).contiguous()
        index, similarity = searches[backend](normed, k)
    return NeighbourTable(index.cpu(), similarity.cpu())


def search_device(features: torch.Tensor) -> torch.device:
    """Where the torch search runs: the features' GPU, else this process's GPU when there is one, else the CPU."""
    if features.device.type != "cpu":
        return features.device
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return features.device


def _auto_backend(features: torch.Tensor) -> str:
    if importlib.util.find_spec("faiss") is None:
        return "torch"
    if search_device(features).type == "cuda":
        import faiss

        if faiss.get_num_gpus() == 0:  # faiss-cpu beside a GPU: the GPU's matrix products are faster
            return "torch"
    return "faiss"


def cpu_thread_count() -> int:
    """The cores this process may run on (its affinity mask: what a scheduler gave it, not the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


@contextlib.contextmanager
def all_cpu_threads(with_faiss: bool = False):
    """torch's (and ``with_faiss``, faiss's) CPU thread pools at :func:`cpu_thread_count` threads, restored on exit.

    ``accelerate launch`` exports OMP_NUM_THREADS=1 (and warns), so a search made by its main process while the
    others wait would otherwise run on one thread of a machine that has many. torch's products give the same bits
    on any number of threads; faiss's round differently with it (similarities within 7e-7), as they always did
    with OMP_NUM_THREADS.
    """
    threads, before = cpu_thread_count(), torch.get_num_threads()
    faiss = importlib.import_module("faiss") if with_faiss else None
    faiss_before = faiss.omp_get_max_threads() if faiss is not None else None
    torch.set_num_threads(threads)
    if faiss is not None:
        faiss.omp_set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)
        if faiss is not None:
            faiss.omp_set_num_threads(faiss_before)


def _search_torch(normed: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Blocks of query rows against every row, on ``normed``'s device; on a GPU in float32, not TF32, so that
    the similarities differ from the CPU's by rounding only."""
    n = len(normed)
    on_gpu = normed.device.type == "cuda"
    block = max(1, (_GPU_BLOCK_ELEMENTS if on_gpu else _BLOCK_ELEMENTS) // n)
    index, similarity = [], []
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        for start in range(0, n, block):
            sims = normed[start:start + block] @ normed.T
            rows = torch.arange(start, min(start + block, n), device=normed.device)
            sims[rows - start, rows] = -float("inf")
            top = sims.topk(k, dim=1)
            index.append(top.indices)
            similarity.append(top.values)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    return torch.cat(index), torch.cat(similarity)


def _search_faiss(normed: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """k + 1 nearest by inner product, then each query's own row dropped (or the last, if a duplicate outranked it)."""
    import faiss

    vectors = normed.cpu().numpy()
    flat = faiss.IndexFlatIP(vectors.shape[1])
    if faiss.get_num_gpus() > 0:  # faiss-gpu: the same exact search on every GPU of this process's machine
        flat = faiss.index_cpu_to_all_gpus(flat)
    flat.add(vectors)
    index, similarity = [], []
    for start in range(0, len(vectors), _QUERY_CHUNK):
        sims, found = flat.search(vectors[start:start + _QUERY_CHUNK], k + 1)
        found, sims = torch.from_numpy(found), torch.from_numpy(sims)
        keep = found != torch.arange(start, start + len(found))[:, None]
        keep[keep.all(dim=1), -1] = False
        index.append(found[keep].view(-1, k))
        similarity.append(sims[keep].view(-1, k))
    return torch.cat(index), torch.cat(similarity)


def other_identity_share(table: NeighbourTable, identity: torch.Tensor) -> torch.Tensor:
    """(N,) probability that the y' drawn for each row (Eq. 8) is the caption of another identity."""
    other = (identity[table.index] != identity[:, None]).to(table.similarity.dtype)
    return (table.sampling_weights() * other).sum(1)


def similarity_by_identity(features: torch.Tensor, identity: torch.Tensor, max_rows: int = 2000,
                           seed: int = 0) -> dict[str, torch.Tensor]:
    """Cosine similarities of every pair of distinct images, split into same identity and other identity.

    On at most ``max_rows`` rows (a seeded random subset beyond that), so that the N x N
    matrix stays small: these are distributions to read, not a search.
    """
    if len(features) > max_rows:
        keep = torch.randperm(len(features), generator=torch.Generator().manual_seed(seed))[:max_rows]
        features, identity = features[keep], identity[keep]
    normed = F.normalize(features.float(), dim=1)
    similarity = normed @ normed.T
    pairs = torch.triu(torch.ones_like(similarity, dtype=torch.bool), diagonal=1)
    same = identity[:, None] == identity[None, :]
    return {"same_identity": similarity[pairs & same], "other_identity": similarity[pairs & ~same]}
