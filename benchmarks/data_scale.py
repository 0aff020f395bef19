"""Memory and time of `pogdiff encode` and one training step against the number of photos.

Writes N synthetic 512 px JPEGs with an identity column (default N = 1,000 and 8,000) and a
Stable Diffusion-shaped folder with random weights (`pogdiff.backbones.random_pipeline`: ``tiny-x8``,
SD's x8 VAE downsampling, tiny channels, so that it runs on a CPU; ``--shape sd15`` for SD
v1.5's sizes on a GPU), then for each N runs, each in a fresh process:

1. ``pogdiff encode DATA --pretrained SD --method pogdiff`` (cold caches), and
2. ``pogdiff train`` of one step with the same options (warm caches),

and prints peak host RSS of each, its ratio between the largest and the smallest N, encode
throughput (images/s), cache bytes per image and the time to the first step (the whole
one-step ``train``: load, read the caches, one step, save).
Bounded memory means the ratio stays near 1 (target on a 2-core CPU: <= 1.25 at 8,000 / 1,000).

    python benchmarks/data_scale.py                       # 1,000 and 8,000 photos, tiny-x8, CPU
    python benchmarks/data_scale.py --sizes 200 800 --out /tmp/scale   # quicker
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

PEOPLE = 50


def write_photos(root: Path, n: int, size: int, seed: int = 0) -> Path:
    """``n`` JPEG portraits-like images (smooth background, a face-coloured ellipse), long-tailed over PEOPLE."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True)
    weights = 1.0 / np.arange(1, PEOPLE + 1)  # Zipf: person 1 has 50 times the photos of person 50
    people = rng.choice(PEOPLE, size=n, p=weights / weights.sum())
    ramp = np.linspace(0, 1, size)[None, :, None]
    rows = []
    for i, person in enumerate(people):
        top, bottom = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
        background = (top + (bottom - top) * ramp).repeat(size, axis=0).astype(np.uint8)
        image = Image.fromarray(background)
        draw = ImageDraw.Draw(image)
        centre = size // 2 + rng.integers(-size // 8, size // 8, 2)
        radius = size // 4 + person % 7 * size // 64
        draw.ellipse([*(centre - radius), *(centre + radius)], fill=tuple(int(c) for c in (200, 150 + person, 120)))
        file = f"images/{i:06d}.jpg"
        image.save(root / file, quality=90)
        rows.append({"file_name": file, "text": f"An image of person{person}.", "identity": f"person{person}"})
    (root / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return root


def measured(command: list[str], env: dict) -> dict:
    """Run ``command`` in a child of a fresh process (so that each peak is its own): wall time and peak RSS."""
    done = subprocess.run([sys.executable, __file__, "--measure", "--", *command], env=env, capture_output=True,
                          text=True)
    if done.returncode != 0:
        sys.exit(f"failed: {' '.join(command)}\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def measure_child(command: list[str]) -> None:
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        sys.stderr.write(done.stderr)
        sys.exit(done.returncode)
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024  # kB on Linux
    print(json.dumps({"seconds": round(seconds, 1), "peak_rss_mb": round(peak, 1)}))


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", type=int, default=[1000, 8000], help="photos (default: 1000 8000)")
    parser.add_argument("--resolution", type=int, default=512, help="photo and training resolution (default: 512)")
    parser.add_argument("--shape", choices=["tiny-x8", "sd15"], default="tiny-x8",
                        help="random pipeline (default: tiny-x8; sd15 on a GPU)")
    parser.add_argument("--mixed-precision", default="no", help="for train and encode (default: no; bf16 on a GPU)")
    parser.add_argument("--out", default="benchmark-out/data-scale", help="work folder (default: benchmark-out/"
                        "data-scale; the photos are kept there between runs)")
    args = parser.parse_args()

    from pogdiff.backbones.random_pipeline import write_random_pipeline

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    pipeline = out / f"pipeline-{args.shape}-{args.resolution}"
    if not pipeline.is_dir():
        write_random_pipeline(pipeline, args.shape, args.resolution)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    pogdiff = [sys.executable, "-m", "pogdiff.cli"]
    common = ["--pretrained", str(pipeline), "--method", "pogdiff", "--resolution", str(args.resolution),
              "--mixed-precision", args.mixed_precision, "--no-progress"]
    results = []
    for n in args.sizes:
        data = out / f"photos-{n}"
        if not (data / "metadata.jsonl").is_file():
            shutil.rmtree(data, ignore_errors=True)
            started = time.perf_counter()
            write_photos(data, n, args.resolution)
            print(f"wrote {n} photos in {time.perf_counter() - started:.0f} s", flush=True)
        cache, run = out / f"cache-{n}", out / f"run-{n}"
        shutil.rmtree(cache, ignore_errors=True)
        shutil.rmtree(run, ignore_errors=True)
        encode = measured([*pogdiff, "encode", str(data), "--cache-dir", str(cache), *common], env)
        train = measured([*pogdiff, "train", str(data), "--output-dir", str(run), "--cache-dir", str(cache),
                          "--max-train-steps", "1", "--train-batch-size", "8", *common], env)
        row = {"photos": n, "encode_seconds": encode["seconds"], "encode_images_per_s": round(n / encode["seconds"], 1),
               "encode_peak_rss_mb": encode["peak_rss_mb"], "first_step_seconds": train["seconds"],
               "train_peak_rss_mb": train["peak_rss_mb"],
               "cache_bytes_per_image": round(folder_bytes(cache) / n),
               "peak_rss_mb": max(encode["peak_rss_mb"], train["peak_rss_mb"])}
        results.append(row)
        print(json.dumps(row), flush=True)
        shutil.rmtree(run, ignore_errors=True)
    small, large = results[0], results[-1]
    print(f"\npeak RSS at {large['photos']} / at {small['photos']} photos: "
          f"{large['peak_rss_mb'] / small['peak_rss_mb']:.2f}x "
          f"({large['peak_rss_mb']:.0f} / {small['peak_rss_mb']:.0f} MB; photos x{large['photos'] / small['photos']:.0f})")
    (out / "data_scale.json").write_text(json.dumps({"shape": args.shape, "resolution": args.resolution,
                                                     "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--measure"]:
        measure_child(sys.argv[3:])
    else:
        main()
