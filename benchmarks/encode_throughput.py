"""Photos per second of encode's image path on camera-size JPEGs, against a one-thread full decode.

Writes ``--photos`` JPEGs of ``--size`` (default 3000x2000, smooth random content: random colours at
1/100 scale resized up with bicubic, plus mild noise; quality 90) to a temporary folder, then times,
each over every file (the files stay in the page cache: decoding is timed, not the disk):

- baseline: one thread, full decode + resize + crop (``load_image(..., draft=False)``);
- draft, one thread: the same with JPEG draft decoding (``load_image``'s default);
- encode: what ``pogdiff encode`` runs for the image tables, ``ImageFiles.batches`` with
  TrainConfig's defaults (decode workers: ``decode_workers(None)``, draft decoding), batches of ``--batch``,
  worker start-up included;

and prints photos/s of each, encode's per-photo cost over the baseline's (target <= 0.35 at 128 px), and
the pixel difference draft decoding makes (max and mean absolute difference, 0-255 scale, all pixels).

    PYTHONPATH=src python benchmarks/encode_throughput.py [--photos 96] [--resolution 128]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from pogdiff.data.dataset import load_dataset, load_image
from pogdiff.data.image_files import ImageFiles, decode_workers
from pogdiff.training.train import TrainConfig

TARGET = 0.35


def write_photos(folder: Path, count: int, size: tuple[int, int], seed: int = 0) -> list[Path]:
    """``count`` smooth random JPEGs of ``size`` (quality 90) and a metadata.jsonl naming them."""
    rng = np.random.default_rng(seed)
    files = []
    for i in range(count):
        coarse = Image.fromarray(rng.integers(0, 256, (size[1] // 100, size[0] // 100, 3), dtype=np.uint8))
        smooth = np.asarray(coarse.resize(size, Image.BICUBIC), dtype=np.int16)
        noisy = (smooth + rng.integers(-6, 7, smooth.shape, dtype=np.int16)).clip(0, 255).astype(np.uint8)
        files.append(folder / f"{i:04d}.jpg")
        Image.fromarray(noisy).save(files[-1], quality=90)
    (folder / "metadata.jsonl").write_text("".join(json.dumps({"file_name": f.name, "text": f"photo {i}"}) + "\n"
                                                   for i, f in enumerate(files)))
    return files


def photos_per_second(decode, count: int) -> float:
    start = time.perf_counter()
    decode()
    return count / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--photos", type=int, default=96)
    parser.add_argument("--size", type=int, nargs=2, default=(3000, 2000), metavar=("WIDTH", "HEIGHT"))
    parser.add_argument("--resolution", type=int, default=128)
    parser.add_argument("--batch", type=int, default=16)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        files = write_photos(Path(tmp), args.photos, tuple(args.size))
        dataset = load_dataset(tmp)
        for file in files:  # into the page cache for every contender
            file.read_bytes()
        full = [load_image(f, args.resolution, draft=False) for f in files[:1]]  # warm-up
        baseline = photos_per_second(lambda: full.extend(load_image(f, args.resolution, draft=False) for f in files),
                                     len(files))
        full = full[1:]
        drafted = []
        draft = photos_per_second(lambda: drafted.extend(load_image(f, args.resolution) for f in files), len(files))
        workers = TrainConfig("", "").dataloader_num_workers
        images = ImageFiles(dataset, args.resolution, num_workers=workers)
        encode = photos_per_second(lambda: [None for _ in images.batches(range(len(files)), args.batch)], len(files))
        images.close()
    difference = np.abs(np.stack(full).astype(np.int16) - np.stack(drafted).astype(np.int16))
    ratio = baseline / encode
    print(f"{len(files)} JPEGs {args.size[0]}x{args.size[1]} (quality 90) -> {args.resolution} px")
    print(f"baseline, one thread, full decode + resize: {baseline:7.1f} photos/s")
    print(f"draft decode, one thread:                   {draft:7.1f} photos/s ({baseline / draft:.2f}x the cost)")
    print(f"encode, defaults ({decode_workers(workers)} decode workers):        {encode:7.1f} photos/s")
    print(f"encode per-photo cost / baseline: {ratio:.3f} "
          f"(target <= {TARGET} at 128 px: {'met' if ratio <= TARGET else 'MISSED'})")
    print(f"draft vs full decode: max abs difference {difference.max()}, mean {difference.mean():.3f} (0-255 scale)")


if __name__ == "__main__":
    main()
