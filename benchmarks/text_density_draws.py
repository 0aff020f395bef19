"""Monte-Carlo error of the text density (Eq. 10) and of psi_txt (Eq. 11) against the number of draws of z.

The ELBO's reconstruction term is averaged over S draws of z shared by every caption
(:func:`pogdiff.encode.text_density.fit_text_density`). For each number of distinct captions, the VAE
is fitted once to synthetic clustered caption vectors (every row a distinct caption: the worst case,
``benchmarks/neighbours_density.py``'s embeddings), then the ELBO of a fixed subsample of the captions is
estimated ``--repeats`` times with draws from different seeds, with that full model. Printed per S:

- the Monte-Carlo std of a caption's ELBO over the repeats (nats): its mean (RMS) over the captions,
  and its 99th percentile and maximum;
- the same for psi_txt = clip(exp(-(ELBO - median)), 1/r, r) (r = psi_txt_max_ratio = 2, the default),
  as a relative std (std / mean of each caption's psi_txt over the repeats), the median taken over the
  subsample in each repeat;
- the time to evaluate the ELBO of all the captions with S draws (the subsample's, scaled), on the device used.

(Antithetic pairs of draws, (eps, -eps), were tried as well: no better than as many independent draws.)

    PYTHONPATH=src python benchmarks/text_density_draws.py [--captions 16000 100000] [--dim 384] \
        [--subsample 1000] [--repeats 6] [--draws 64 262 1024 2048 4096] [--device cuda]
"""

import argparse
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from neighbours_density import embeddings  # noqa: E402

from pogdiff.encode.text_density import EVAL_SAMPLES, fit_text_vae, text_elbo  # noqa: E402

MAX_RATIO = 2.0


def old_draws(captions: int) -> int:
    """The draws before this benchmark: as many as 2^22 decoder passes allow, between 64 and 4,096."""
    return max(64, min(4096, 2**22 // captions))


def noise(samples: int, seed: int) -> torch.Tensor:
    return torch.randn(samples, 8, generator=torch.Generator().manual_seed(1000 + seed))


def psi_txt(elbo: torch.Tensor) -> torch.Tensor:
    bound = math.log(MAX_RATIO)
    return (-(elbo - elbo.median())).clamp(-bound, bound).exp()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--captions", type=int, nargs="+", default=[16_000, 100_000])
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--subsample", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=6)
    parser.add_argument("--draws", type=int, nargs="+", default=[64, 262, 1024, 2048, EVAL_SAMPLES])
    parser.add_argument("--device", default=None, help="default: this process's (the accelerator when there is one)")
    args = parser.parse_args()
    device = torch.device(args.device) if args.device else None
    print(f"torch threads {torch.get_num_threads()}, device {device or 'default'}, dim {args.dim}, {args.subsample} captions x {args.repeats} "
          f"repeats per cell, default draws now {EVAL_SAMPLES}")
    print("| captions | draws | ELBO spread (std, nats) | MC std of ELBO: RMS / p99 / max (nats) "
          "| MC relative std of psi_txt: RMS / p99 / max | all captions' ELBO, s |")
    print("|---|---|---|---|---|---|")
    for captions in args.captions:
        y = embeddings(captions, args.dim)
        start = time.perf_counter()
        vae, _ = fit_text_vae(y, seed=0, device=device)
        fit_seconds = time.perf_counter() - start
        rows = torch.randperm(captions, generator=torch.Generator().manual_seed(1))[:args.subsample]
        for samples in args.draws:
            start = time.perf_counter()
            elbo = torch.stack([text_elbo(vae, y[rows], noise(samples, r)) for r in range(args.repeats)])
            seconds = (time.perf_counter() - start) / args.repeats * captions / len(rows)
            psi = torch.stack([psi_txt(e) for e in elbo])
            std = elbo.double().std(0)
            rel = (psi.double().std(0) / psi.double().mean(0))
            q = torch.tensor([0.99], dtype=torch.float64)
            name = f"{samples:,}" + (" (old default)" if samples == old_draws(captions) else "") + (
                " (new default)" if samples == EVAL_SAMPLES else "")
            print(f"| {captions:,} | {name} | {elbo.double().mean(0).std().item():.2f} | "
                  f"{std.square().mean().sqrt().item():.3f} / {std.quantile(q).item():.3f} / {std.max().item():.3f} | "
                  f"{rel.square().mean().sqrt().item():.1%} / {rel.quantile(q).item():.1%} / {rel.max().item():.1%} | "
                  f"{seconds:.0f} |", flush=True)
        print(f"(fit of the VAE on {captions:,} captions: {fit_seconds:.1f} s)", flush=True)


if __name__ == "__main__":
    main()
