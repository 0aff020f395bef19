"""Host milliseconds per training step spent choosing and reading a batch's rows, at 100k and 1M rows.

What the training loop's background thread runs each micro-step (``pogdiff.training.train.batch_reader``): the row
sampler's draw (``RowSchedule``, uniform or balanced) and the reads of the batch's rows from the cache's
shards (x0 and caption states), no model. The shards are synthetic and shaped as Stable Diffusion v1.5's at
512 px (latent mean and log-variance 8x64x64, caption states 77x768, float16, 1,024 rows a shard); one shard
file of each is written and every shard of the table reads it, so 1M rows need no 64 GB on disk and the
reads are warm (page cache: the host's cost, not the storage's). Identities are long-tailed (Zipf) for the
balanced sampler's weights.

Per setting it prints the sampler's draw alone, then draw + reads: the mean over ``--steps`` steps inside an
epoch, the step that starts an epoch (the epoch's order is drawn then) and their average over a whole epoch;
and the draw as it was before (the epoch's order drawn again every step: ``batch_rows``).
Target: <= 1 ms a step (draw + reads, over an epoch) at 1M rows, balanced.

    PYTHONPATH=src python benchmarks/train_reads.py [--steps 500] [--batch 16]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from pogdiff.encode.encoded_dataset import EncodedDataset
from pogdiff.training.row_sampler import RowSchedule, batch_rows, identity_balanced_weights
from pogdiff.encode.shards import DEFAULT_SHARD_ROWS, ShardedCache, ShardedTable
from pogdiff.training.train import batch_reader

TARGET_MS = 1.0
LATENT, STATES = (8, 64, 64), (77, 768)


def synthetic_table(folder: Path, name: str, row_shape: tuple[int, ...], num_rows: int) -> ShardedTable:
    """A float16 table of ``num_rows`` rows whose every shard maps one file of DEFAULT_SHARD_ROWS random rows."""
    cache = ShardedCache(folder, name, {}, [str(i) for i in range(DEFAULT_SHARD_ROWS)], DEFAULT_SHARD_ROWS)
    cache.fill(lambda rows: {name: torch.randn(len(rows), *row_shape).half()}, name, progress=False)
    part = cache.open()[name].parts[0]
    shards = -(-num_rows // DEFAULT_SHARD_ROWS)
    return ShardedTable([part] * shards, DEFAULT_SHARD_ROWS)


def ms_per_step(function, steps: range) -> float:
    start = time.perf_counter()
    for step in steps:
        function(step)
    return (time.perf_counter() - start) * 1000 / len(steps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--rows", type=int, nargs="+", default=[100_000, 1_000_000])
    args = parser.parse_args()
    torch.set_num_threads(1)  # the reads run on one background thread
    process = SimpleNamespace(process_index=0, num_processes=1, device=torch.device("cpu"))
    print(f"batch {args.batch}; x0 {LATENT} and caption states {STATES} float16 from cache shards; ms a step")
    print(f"{'rows':>9} {'sampler':>8} {'draw':>6} | draw + reads: {'in epoch':>8} {'epoch start':>11} "
          f"{'over an epoch':>13} | draw before")
    with tempfile.TemporaryDirectory() as tmp:
        for num_rows in args.rows:
            x0 = synthetic_table(Path(tmp), "x0", LATENT, num_rows)
            states = synthetic_table(Path(tmp), "states", STATES, num_rows)
            identity = torch.from_numpy(np.random.default_rng(0).zipf(1.5, num_rows) % (num_rows // 10))
            encoded = EncodedDataset(torch.arange(num_rows), states, torch.zeros(STATES), identity,
                                     torch.zeros(num_rows))
            for sampler, weights in (("uniform", None), ("balanced", identity_balanced_weights(identity))):
                schedule = RowSchedule(num_rows, args.batch, 0, weights)
                read = batch_reader(schedule, [x0], encoded, process)
                per_epoch = num_rows // args.batch
                epoch_start = ms_per_step(read, range(0, 1))
                in_epoch = ms_per_step(read, range(1, 1 + args.steps))
                draw = ms_per_step(schedule.__getitem__, range(1, 1 + args.steps))
                over_epoch = in_epoch + (epoch_start - in_epoch) / per_epoch
                before = ms_per_step(lambda m: batch_rows(num_rows, args.batch, m, 0, weights), range(1, 6))
                print(f"{num_rows:>9,} {sampler:>8} {draw:>6.3f} | {'':>13} {in_epoch:>8.3f} {epoch_start:>11.1f} "
                      f"{over_epoch:>13.3f} | {before:>11.1f}")
                if sampler == "balanced" and num_rows >= 1_000_000:
                    print(f"{'':>19}target <= {TARGET_MS} ms a step at 1M rows, balanced: "
                          f"{'met' if over_epoch <= TARGET_MS else 'MISSED'}")


if __name__ == "__main__":
    main()
