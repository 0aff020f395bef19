"""Text density of PoGDiff (Sec. 3.2, Eq. 10): p(y) ~ exp(ELBO_VAE(y)).

A small VAE is fitted to the pooled text embeddings of the training captions; its
evidence lower bound approximates log p(y). Captions in sparse regions of the text
space (minority identities) get a low ELBO, hence a large inverse density (Eq. 11).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from pogdiff.encode.encoders import full_precision

# Monte-Carlo draws of z for the reconstruction term of every caption's ELBO, whatever the number of captions
# (docs/choices.md, "Defaults and the text-density VAE": the estimate's error in nats and in psi_txt).
EVAL_SAMPLES = 4096
# Decoder rows per pass when the ELBO is evaluated: on the CPU 512 rows x 1 draw stay in cache (3x faster than
# 4096 rows); an accelerator takes many draws of many rows at once.
_EVAL_ROWS = {"cpu": 512}
_EVAL_PASS = {"cpu": 512}
_ACCELERATOR_ROWS, _ACCELERATOR_PASS = 8192, 1 << 17


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
        one eps per row drawn from ``generator`` (training; drawn on the CPU, then moved to the rows' device), or the
        rows of ``noise`` (S, latent_dim) shared by every row (evaluation: common random numbers, so that captions
        are compared under the same draws), a group of draws per decoder pass.
        """
        y = (y - self.mean) / self.std
        mu, log_var_z = self.encoder(y).chunk(2, dim=-1)
        kl = 0.5 * (mu.pow(2) + log_var_z.exp() - 1 - log_var_z).sum(-1)
        if noise is None:  # drawn on the generator's device (the CPU's), so that any device sees the same draws
            noise = torch.randn(mu.shape, generator=generator, dtype=mu.dtype).to(mu.device)[None]
        sigma = (0.5 * log_var_z).exp()
        per_pass = max(1, _EVAL_PASS.get(y.device.type, _ACCELERATOR_PASS) // len(y))
        log_lik = 0.0
        for eps in noise.to(mu.device).split(per_pass):  # (G, latent) or (G, rows, latent): G draws at once
            recon = self.decoder(mu + sigma * (eps if eps.dim() == 3 else eps[:, None]))
            log_lik = log_lik - 0.5 * ((y - recon).pow(2) + math.log(2 * math.pi)).sum(-1).sum(0)
        return log_lik / len(noise) - kl


def fit_text_density(
    embeddings: torch.Tensor,
    rows: torch.Tensor | None = None,
    latent_dim: int = 8,
    hidden_dim: int = 128,
    steps: int = 1500,
    lr: float = 2e-3,
    batch_size: int = 512,
    eval_samples: int = EVAL_SAMPLES,
    seed: int = 0,
    device: str | torch.device | None = None,
) -> torch.Tensor:
    """Fit a :class:`TextDensityVAE` to the training rows and return ELBO(y) (C,) of each distinct embedding, on the CPU.

    ``embeddings`` (C, D) are the distinct captions' vectors and ``rows`` (N,) the caption of each training
    row (default: one row each), so a frequent caption weighs in the fit as often as it is trained on, while
    its density is estimated once: two rows with the same caption get the same ELBO, a function of the caption
    as Eq. 10's p(y) is. The reconstruction term is averaged over ``eval_samples`` draws of z shared by every
    caption (:data:`EVAL_SAMPLES` at every size; docs/choices.md: the estimate's Monte-Carlo error); the KL
    term is exact. The VAE is fitted and evaluated on ``device``, by default this process's
    (:func:`pogdiff.processes.process_state`: the accelerator when there is one); every random draw is made on
    the CPU, so a device changes only the arithmetic's rounding.
    """
    with full_precision():  # a run's --allow-tf32 would round the ELBO's 768-d sums of squares to TF32
        vae, generator = fit_text_vae(embeddings, rows, latent_dim, hidden_dim, steps, lr, batch_size, seed, device)
        noise = torch.randn(eval_samples, latent_dim, generator=generator)
        return text_elbo(vae, embeddings, noise)


def fit_text_vae(embeddings: torch.Tensor, rows: torch.Tensor | None = None, latent_dim: int = 8, hidden_dim: int = 128,
                 steps: int = 1500, lr: float = 2e-3, batch_size: int = 512, seed: int = 0,
                 device: str | torch.device | None = None) -> tuple[TextDensityVAE, torch.Generator]:
    """The fitted VAE of :func:`fit_text_density` (on ``device``), and its CPU generator, where the draws of z go on."""
    if device is None:
        from pogdiff.processes import process_state

        device = process_state().device
    device = torch.device(device)
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):  # the CPU's generator only: torch.manual_seed would reseed the GPUs' too
        torch.random.default_generator.manual_seed(seed)
        vae = TextDensityVAE(embeddings.shape[1], latent_dim, hidden_dim)
    y = embeddings.float()
    rows = torch.arange(len(y)) if rows is None else rows.cpu()
    counts = torch.bincount(rows, minlength=len(y)).float()  # the rows' statistics, without an (N, D) copy
    mean = counts @ y / len(rows)
    variance = (counts @ y.square() - len(rows) * mean.square()).double() / max(len(rows) - 1, 1)
    vae.mean.copy_(mean)
    vae.std.copy_(variance.clamp(min=0).sqrt().float().clamp(min=1e-4) if len(rows) > 1 else torch.ones(y.shape[1]))
    vae.to(device)
    y_on_device = y.to(device)
    optimizer = torch.optim.Adam(vae.parameters(), lr=lr)
    for _ in range(steps):
        drawn = rows[torch.randint(len(rows), (min(batch_size, len(rows)),), generator=generator)]
        loss = -vae.elbo(y_on_device[drawn.to(device)], generator).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return vae, generator


@torch.no_grad()
def text_elbo(vae: TextDensityVAE, embeddings: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """ELBO (C,) of each embedding on the CPU, under the draws ``noise`` (S, latent_dim) shared by every
    embedding, on the VAE's device, in chunks of rows: memory stays bounded whatever C and S are."""
    device = vae.mean.device
    chunk = _EVAL_ROWS.get(device.type, _ACCELERATOR_ROWS)
    noise = noise.to(device)
    return torch.cat([vae.elbo(part.to(device, torch.float32), noise=noise).cpu() for part in embeddings.split(chunk)])
