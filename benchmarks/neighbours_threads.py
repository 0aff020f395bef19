"""Exact kNN (Eq. 8) under ``accelerate launch``'s OMP_NUM_THREADS=1: one thread (before) vs every core (now).

``find_neighbours`` raises torch's and faiss's thread pools to the cores this process may use
(``os.sched_getaffinity``) for the search, then restores them. "before" runs the same search with that
switched off, i.e. on the one thread OMP_NUM_THREADS=1 leaves; both run in this process, which sets
OMP_NUM_THREADS=1 before importing torch, as accelerate's launcher does. Random features (seeded); the
tables of the two runs are compared: the same neighbours, and the largest difference of a similarity
(0 for torch: the same bits on any number of threads; faiss's products round with the number of threads).
On a machine with a GPU the torch backend runs there (``--device cpu`` keeps it on the CPU).

    PYTHONPATH=src python benchmarks/neighbours_threads.py [--rows 100000] [--dim 1280] [--k 10] \
        [--backends torch faiss]
"""

import os

os.environ["OMP_NUM_THREADS"] = "1"

import argparse  # noqa: E402
import contextlib  # noqa: E402
import importlib.util  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402

from pogdiff.objectives import neighbours  # noqa: E402


def timed(features: torch.Tensor, k: int, backend: str, all_cores: bool):
    switch = contextlib.nullcontext() if all_cores else _one_thread(backend)
    with switch:
        start = time.perf_counter()
        table = neighbours.find_neighbours(features, k, backend)
        return time.perf_counter() - start, table


@contextlib.contextmanager
def _one_thread(backend: str):
    saved = neighbours.all_cpu_threads
    neighbours.all_cpu_threads = lambda with_faiss=False: contextlib.nullcontext()
    if backend == "faiss":
        import faiss

        faiss.omp_set_num_threads(1)  # what OMP_NUM_THREADS=1 left it
    try:
        yield
    finally:
        neighbours.all_cpu_threads = saved


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=1280)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--backends", nargs="+", default=["torch", "faiss"])
    parser.add_argument("--device", default="auto", help="'cpu': the torch search stays on the CPU")
    args = parser.parse_args()
    features = torch.randn(args.rows, args.dim, generator=torch.Generator().manual_seed(0))
    if args.device == "cpu":
        neighbours.search_device = lambda features: torch.device("cpu")
    print(f"{args.rows:,} x {args.dim} random features, k = {args.k}; OMP_NUM_THREADS=1, torch threads "
          f"{torch.get_num_threads()} outside the search, {neighbours.cpu_thread_count()} cores in this process's "
          f"affinity; torch search on {neighbours.search_device(features)}")
    print("| backend | before: 1 thread, s | now, s | speed-up | same neighbours | max abs. difference of a similarity |")
    print("|---|---|---|---|---|---|")
    for backend in args.backends:
        if backend == "faiss" and importlib.util.find_spec("faiss") is None:
            print("| faiss | not installed | | | | |")
            continue
        before, old = timed(features, args.k, backend, all_cores=False)
        now, new = timed(features, args.k, backend, all_cores=True)
        same = torch.equal(old.index, new.index)
        difference = (old.similarity - new.similarity).abs().max().item()
        print(f"| {backend} | {before:.1f} | {now:.1f} | {before / now:.2f}x | {same} | {difference:.1e} |", flush=True)
    assert torch.get_num_threads() == 1, "the thread count was not restored"


if __name__ == "__main__":
    main()
