"""Peak host memory of `pogdiff evaluate` at 8 and at 64 images per identity, 512 px.

Writes the embedded medium preset (10 people, 100 training images, 10 held-out images each) and, for
each count, a ``--samples`` folder of smooth random 512 px PNGs per identity, then scores each folder
with ``pogdiff evaluate --samples`` in a fresh process and prints that process's peak RSS
(``ru_maxrss``) and the ratio. Scoring is what holds images (sampling writes each batch as it is
done), so this measures the part that grew with ``--num-images``: the real images and the samples
are read a batch at a time and only their features are kept. Target: ratio <= 1.25.

    python benchmarks/evaluate_memory.py                     # 8 and 64 per identity, efficientnet-lite0
    python benchmarks/evaluate_memory.py --counts 8 128 --out /tmp/evaluate-memory
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

SIZE = 512


def write_samples(data: Path, folder: Path, per_identity: int, seed: int = 0) -> Path:
    """``per_identity`` smooth random SIZE px PNGs (16x16 noise, upscaled) per identity of ``data``."""
    from pogdiff.data.dataset import load_dataset

    rng = np.random.default_rng(seed)
    for name in load_dataset(data).identity_counts():
        (folder / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_identity):
            small = Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8))
            small.resize((SIZE, SIZE), Image.BICUBIC).save(folder / name / f"{i:03d}.png")
    return folder


def peak_rss_mb(argv: list[str]) -> tuple[float, float]:
    """Peak RSS (MB) and wall time of ``pogdiff`` run with ``argv`` in a fresh process."""
    start = time.time()
    done = subprocess.run([sys.executable, __file__, "--measure", "--", *argv], capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"pogdiff {' '.join(argv)} failed:\n{done.stderr[-3000:]}")
    return float(done.stdout.strip().splitlines()[-1]), time.time() - start


def measure(argv: list[str]) -> None:
    """Run the CLI in a child process and print its peak RSS in MB (the child alone, not this process)."""
    done = subprocess.run([sys.executable, "-m", "pogdiff.cli", *argv], capture_output=True, text=True)
    if done.returncode != 0:
        sys.stderr.write(done.stderr)
        sys.exit(done.returncode)
    print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024)  # kB on Linux


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--counts", nargs=2, type=int, default=[8, 64], help="images per identity (default: 8 64)")
    parser.add_argument("--out", type=Path, default=Path("evaluate-memory"), help="work folder")
    parser.add_argument("--features", default="efficientnet-lite0", help="feature space (default: efficientnet-lite0)")
    parser.add_argument("--measure", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("argv", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        return measure(args.argv)
    from pogdiff.data.synth import write_dataset

    data = args.out / "data"
    if not (data / "metadata.jsonl").is_file():
        write_dataset(data, preset="medium")
    peaks = {}
    for count in args.counts:
        folder = args.out / f"samples-{count}" / f"random-{count}"
        if not folder.is_dir():
            write_samples(data, folder, count)
        peaks[count], seconds = peak_rss_mb(
            ["evaluate", "--samples", str(folder), "--data", str(data), "--out", str(args.out / f"eval-{count}"),
             "--features", args.features, "--identity-judge", "features", "--cache-dir", str(args.out / "cache"),
             "--no-progress"])
        print(f"{count:4d} images per identity ({SIZE} px, 10 identities): peak RSS {peaks[count]:7.0f} MB, "
              f"{seconds:5.0f} s")
    low, high = args.counts
    print(f"ratio {high} / {low}: {peaks[high] / peaks[low]:.2f}x (target <= 1.25x)")


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
