"""Text density of PoGDiff (Sec. 3.2, Eq. 10): p(y) ~ exp(ELBO_VAE(y)).

A small VAE is fitted to the pooled text embeddings of the training captions; its
evidence lower bound approximates log p(y). Captions in sparse regions of the text
space (minority identities) get a low ELBO, hence a large inverse density (Eq. 11).
"""

from __future__ import annotations

import math

import torch
from torch import nn

_EVAL_CHUNK = 512


class TextDensityVAE(nn.Module):
    """Gaussian VAE on standardised text embeddings, decoder variance fixed to 1.

    A learned decoder variance collapses onto memorised points when a few hundred
    captions live in hundreds of dimensions, and the ELBO then says nothing about
    density; with unit variance a caption far from the modes the VAE learned gets a
    low ELBO.
    """

    def __init__(self, dim: int, latent_dim: int = 8, hidden_dim: int = 128):
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(dim, hidden_dim), nn.SiLU(), nn.Linear(hidden_dim, 2 * latent_dim))
        self.decoder = nn.Sequential(nn.Linear(latent_dim, hidden_dim), nn.SiLU(), nn.Linear(hidden_dim, dim))
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("std", torch.ones(dim))

    def elbo(self, y: torch.Tensor, generator: torch.Generator | None = None,
             noise: torch.Tensor | None = None) -> torch.Tensor:
        """ELBO(y) = E_q[log p(y|z)] - KL(q(z|y) || N(0, I)), per row, in nats (Eq. 10).

        The KL term is exact; the reconstruction term is a Monte-Carlo average over z = mu + sigma * eps:
        one eps per row drawn from ``generator`` (training), or the rows of ``noise`` (S, latent_dim) shared
        by every row (evaluation: common random numbers, so that captions are compared under the same draws).
        """
        y = (y - self.mean) / self.std
        mu, log_var_z = self.encoder(y).chunk(2, dim=-1)
        kl = 0.5 * (mu.pow(2) + log_var_z.exp() - 1 - log_var_z).sum(-1)
        draws = noise if noise is not None else [torch.randn(mu.shape, generator=generator, device=mu.device,
                                                             dtype=mu.dtype)]
        log_lik = 0.0
        for eps in draws:
            recon = self.decoder(mu + (0.5 * log_var_z).exp() * eps)
            log_lik = log_lik - 0.5 * ((y - recon).pow(2) + math.log(2 * math.pi)).sum(-1)
        return log_lik / len(draws) - kl


def fit_text_density(
    embeddings: torch.Tensor,
    rows: torch.Tensor | None = None,
    latent_dim: int = 8,
    hidden_dim: int = 128,
    steps: int = 1500,
    lr: float = 2e-3,
    batch_size: int = 512,
    eval_samples: int | None = None,
    seed: int = 0,
) -> torch.Tensor:
    """Fit a :class:`TextDensityVAE` to the training rows and return ELBO(y) (C,) of each distinct embedding.

    ``embeddings`` (C, D) are the distinct captions' vectors and ``rows`` (N,) the caption of each training
    row (default: one row each), so a frequent caption weighs in the fit as often as it is trained on, while
    its density is estimated once: two rows with the same caption get the same ELBO, a function of the caption
    as Eq. 10's p(y) is. The reconstruction term is averaged over ``eval_samples`` draws of z shared by every
    caption (default: as many as 2^22 decoder passes allow, between 64 and 4,096; docs/choices.md: how far such
    an estimate is from a longer one); the KL term is exact.
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vae = TextDensityVAE(embeddings.shape[1], latent_dim, hidden_dim)
    y = embeddings.float()
    rows = torch.arange(len(y)) if rows is None else rows.cpu()
    counts = torch.bincount(rows, minlength=len(y)).float()  # the rows' statistics, without an (N, D) copy
    mean = counts @ y / len(rows)
    variance = (counts @ y.square() - len(rows) * mean.square()).double() / max(len(rows) - 1, 1)
    vae.mean.copy_(mean)
    vae.std.copy_(variance.clamp(min=0).sqrt().float().clamp(min=1e-4) if len(rows) > 1 else torch.ones(y.shape[1]))
    optimizer = torch.optim.Adam(vae.parameters(), lr=lr)
    for _ in range(steps):
        drawn = rows[torch.randint(len(rows), (min(batch_size, len(rows)),), generator=generator)]
        loss = -vae.elbo(y[drawn], generator).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    samples = eval_samples or max(64, min(4096, 2**22 // len(y)))
    noise = torch.randn(samples, latent_dim, generator=generator)
    with torch.no_grad():  # in chunks: memory stays bounded, and 512 rows stay in cache (3x faster than 4096)
        return torch.cat([vae.elbo(chunk, noise=noise) for chunk in y.split(_EVAL_CHUNK)])
