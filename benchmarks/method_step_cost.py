"""Seconds per training step of every method on the small backbone, and the ratio to vanilla.

Each method trains 2 and 2 + STEPS steps on the embedded small preset with the same
seed; the difference divided by STEPS is the cost of one step without the fixed set-up
(encoders, cached tables, model creation). Use it to size `pogdiff benchmark` budgets.

    OMP_NUM_THREADS=2 PYTHONPATH=src python benchmarks/method_step_cost.py [--steps 40] [--batch 16]
"""

import argparse
import tempfile
import time
from pathlib import Path

import torch

from pogdiff.data.synth import write_dataset
from pogdiff.objectives.losses import METHODS
from pogdiff.training.train import TrainConfig, train


def timed_train(data: Path, out: Path, method: str, steps: int, batch: int, cache: Path) -> float:
    start = time.perf_counter()
    train(TrainConfig(str(data), str(out), method=method, max_train_steps=steps, train_batch_size=batch,
                      cache_dir=str(cache), overwrite=True, progress=False))
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch", type=int, default=16)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = write_dataset(tmp / "data", preset="small")
        timed_train(data, tmp / "warm-up", "vanilla", 1, args.batch, tmp / "cache")  # fills the table cache
        cost = {}
        for method in METHODS:
            short = timed_train(data, tmp / method, method, 2, args.batch, tmp / "cache")
            long = timed_train(data, tmp / method, method, 2 + args.steps, args.batch, tmp / "cache")
            cost[method] = (long - short) / args.steps
    print(f"torch threads {torch.get_num_threads()}, batch {args.batch}, {args.steps} timed steps per method")
    print("| method | s/step | x vanilla |\n|---|---|---|")
    for method, seconds in cost.items():
        print(f"| {method} | {seconds:.3f} | {seconds / cost['vanilla']:.2f} |")


if __name__ == "__main__":
    main()
