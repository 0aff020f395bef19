"""Time and peak memory of the dataset tables at scale: neighbours (Eq. 8) and text density (Eq. 10).

Synthetic clustered embeddings stand in for image features and pooled caption vectors
(384-d: MiniLM, 768-d: CLIP ViT-L). Each measurement runs in a fresh process, so its peak
resident memory (ru_maxrss) is its own; "extra MB" is that peak minus the peak after the
embeddings were made, i.e. what the search or the VAE needs beyond its input.

    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/neighbours_density.py \
        [--sizes 10000 100000] [--dims 384 768] [--k 10] [--torch-up-to 10000]
"""

import argparse
import json
import resource
import subprocess
import sys
import time

import torch

TARGET_SECONDS = 120  # the budget for neighbours + text density at 100k rows


def embeddings(n: int, dim: int) -> torch.Tensor:
    """n points around n / 30 centres (identities with ~30 images each), seeded; made in place by chunks,
    so that the peak memory after this call is the embeddings' own."""
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(max(1, n // 30), dim, generator=g)
    x = torch.empty(n, dim)
    for chunk in x.split(4096):
        torch.randn(chunk.shape, generator=g, out=chunk).mul_(0.7)
        chunk.add_(centres[torch.randint(len(centres), (len(chunk),), generator=g)])
    return x


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


def child(task: str, n: int, dim: int, k: int) -> dict:
    from pogdiff.objectives.neighbours import find_neighbours
    from pogdiff.encode.text_density import fit_text_density

    x = embeddings(n, dim)
    before = peak_mb()
    start = time.perf_counter()
    if task == "density":
        fit_text_density(x)
    else:
        find_neighbours(x, k, backend=task)
    return {"seconds": time.perf_counter() - start, "extra_mb": peak_mb() - before, "input_mb": x.numel() * 4 / 2**20}


def measure(task: str, n: int, dim: int, k: int) -> dict:
    done = subprocess.run([sys.executable, __file__, "--child", task, str(n), str(dim), str(k)],
                          capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--dims", type=int, nargs="+", default=[384, 768])
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--torch-up-to", type=int, default=10_000, help="also time the torch backend up to this N")
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        task, n, dim, k = args.child
        print(json.dumps(child(task, int(n), int(dim), int(k))))
        return

    from pogdiff.objectives.neighbours import find_neighbours  # noqa: F401  (fail here, not in a child, if not importable)
    import importlib.util

    backend = "faiss" if importlib.util.find_spec("faiss") else "torch"
    print(f"torch threads {torch.get_num_threads()}, k = {args.k}, neighbours by {backend} (backend='auto')")
    print("| N | dim | neighbours s | extra MB | text density s | extra MB | input MB | total s | torch neighbours s |")
    print("|---|---|---|---|---|---|---|---|---|")
    results = {}
    for n in args.sizes:
        for dim in args.dims:
            search, density = measure(backend, n, dim, args.k), measure("density", n, dim, args.k)
            exact_torch = measure("torch", n, dim, args.k) if backend != "torch" and n <= args.torch_up_to else None
            results[n, dim] = search, density
            total = search["seconds"] + density["seconds"]
            flag = "" if total <= TARGET_SECONDS or n < 100_000 else f" (over {TARGET_SECONDS} s)"
            torch_cell = f"{exact_torch['seconds']:.1f}" if exact_torch else "–"
            print(f"| {n:,} | {dim} | {search['seconds']:.1f} | {search['extra_mb']:.0f} | {density['seconds']:.1f} | "
                  f"{density['extra_mb']:.0f} | {search['input_mb']:.0f} | {total:.1f}{flag} | {torch_cell} |",
                  flush=True)
    small, large = min(args.sizes), max(args.sizes)
    if small != large:
        for dim in args.dims:
            (s0, d0), (s1, d1) = results[small, dim], results[large, dim]
            print(f"{dim}-d, {large:,} vs {small:,} rows: neighbours x{s1['seconds'] / s0['seconds']:.0f} "
                  f"(N^2 would be x{(large / small) ** 2:.0f}), text density x{d1['seconds'] / d0['seconds']:.1f}, "
                  f"extra memory x{max(s1['extra_mb'], 1) / max(s0['extra_mb'], 1):.1f} / "
                  f"x{max(d1['extra_mb'], 1) / max(d0['extra_mb'], 1):.1f}")


if __name__ == "__main__":
    main()
