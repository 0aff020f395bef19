"""Images per second of the small backbone's training loop, eager against ``--compile``, at large batches.

Runs ``pogdiff pretrain`` (the real loop: vanilla loss, EMA, AdamW, the corpus held on the device)
from random weights on a small pretraining corpus, twice per setting, for S1 and S2 steps, and
takes the difference of the two runs' training time (``train_seconds`` in pogdiff_run.json), so
that loading, encoding and torch.compile's first steps cancel out (a compiled setting runs once
more first, to fill torch.compile's cache that both timed runs then read):

    images/s = (S2 - S1) * batch / (seconds(S2) - seconds(S1))

Each run is a fresh process. On a GPU ``--mixed-precision bf16`` is passed (the pretraining
recipe's precision there); the target on an H100/H200 is >= 20,000 images/s (issue #30).

    python benchmarks/pretrain_throughput.py                          # batch 256 and 1,024, eager and compiled
    python benchmarks/pretrain_throughput.py --batch-sizes 256 --steps 2 4   # what the CPU can afford
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch

ENV = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}  # this checkout's pogdiff


def train_seconds(corpus: Path, out: Path, batch: int, steps: int, compiled: bool, precision: str) -> float:
    """Seconds of the training loop of a fresh ``pogdiff pretrain`` run of ``steps`` steps at ``batch``."""
    shutil.rmtree(out, ignore_errors=True)
    command = [sys.executable, "-m", "pogdiff.cli", "pretrain", str(corpus), "--output-dir", str(out),
               "--train-batch-size", str(batch), "--max-train-steps", str(steps), "--checkpointing-steps", "1000000",
               "--lr-warmup-steps", "0", "--mixed-precision", precision, "--cache-dir", str(out.parent / "cache"),
               "--no-progress", *(["--compile"] if compiled else [])]
    done = subprocess.run(command, env=ENV, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"failed: {' '.join(command)}\n{done.stderr[-3000:]}")
    return json.loads((out / "pogdiff_run.json").read_text())["train_seconds"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[256, 1024], help="(default: 256 1024)")
    parser.add_argument("--steps", nargs=2, type=int, default=None, metavar=("S1", "S2"),
                        help="the two run lengths (default: 20 220 on a GPU, 2 4 on a CPU)")
    parser.add_argument("--modes", nargs="+", choices=["eager", "compiled"], default=["eager", "compiled"])
    parser.add_argument("--out", default="benchmark-out/pretrain-throughput", help="work folder")
    args = parser.parse_args()

    gpu = torch.cuda.is_available()
    s1, s2 = args.steps or ((20, 220) if gpu else (2, 4))
    precision = "bf16" if gpu else "no"
    out = Path(args.out)
    corpus = out / "corpus"
    if not (corpus / "metadata.jsonl").is_file():  # enough rows for one batch of the largest size
        people = max(args.batch_sizes) // 4 + 1
        subprocess.run([sys.executable, "-m", "pogdiff.cli", "data", "synth", str(corpus), "--preset", "pretrain",
                        "--people", str(people), "--images-per-person", "4"], check=True, env=ENV)
    device = torch.cuda.get_device_name() if gpu else f"CPU, {os.cpu_count()} cores"
    print(f"{device}; runs of {s1} and {s2} steps; precision {precision}")
    print("| batch | mode | seconds (S1 / S2) | images/s |")
    print("|---|---|---|---|")
    results = {}
    for batch in args.batch_sizes:
        for mode in args.modes:
            if mode == "compiled":  # fill torch.compile's cache first, so that the S1 and S2 runs load the same
                train_seconds(corpus, out / "run", batch, s1, True, precision)
            first = train_seconds(corpus, out / "run", batch, s1, mode == "compiled", precision)
            second = train_seconds(corpus, out / "run", batch, s2, mode == "compiled", precision)
            if second <= first:
                print(f"| {batch} | {mode} | {first:.1f} / {second:.1f} | n/a: the longer run was not slower; "
                      "raise --steps |", flush=True)
                continue
            results[batch, mode] = (s2 - s1) * batch / (second - first)
            print(f"| {batch} | {mode} | {first:.1f} / {second:.1f} | {results[batch, mode]:,.0f} |", flush=True)
    for batch in args.batch_sizes:
        if (batch, "eager") in results and (batch, "compiled") in results:
            print(f"batch {batch}: compiled / eager = {results[batch, 'compiled'] / results[batch, 'eager']:.2f}x")


if __name__ == "__main__":
    main()
