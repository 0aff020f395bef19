"""The forward processes a backbone is trained under: how x_t is made from x0 and noise, and what the model regresses.

Every loss of :mod:`pogdiff.objectives.losses` is written against this small interface, so a
loss never knows which model it trains (the backbone chooses its process):

- ``draw_times(n, device)``: t for n examples (an integer index into the process's schedule);
- ``add_noise(x0, noise, t)`` = a_t x0 + b_t eps, with ``scales(t) = (a_t, b_t)``;
- ``target(x0, noise, t)``: the regression target of the model's output;
- ``noise_to_signal(t)`` = (b_t / a_t)^2: x_t / a_t = x0 + (b_t / a_t) eps (T2H's posterior over sources);
- ``time_fraction(t)`` in [0, 1]: the noise level of t (t / T for DDPM, sigma_t for a flow; CBDM's w = tau t / T);
- ``example_weights(t, snr_gamma)``: the process's loss weighting (Min-SNR-gamma where it applies);
- ``feature_time`` and ``signal_scale(t)``: where the 'unet' neighbour features read the denoiser,
  x = a_t x0 (almost no signal lost, no noise added).
"""

from __future__ import annotations

import torch

from pogdiff.errors import PogdiffError


class DDPMProcess:
    """Eq. 1's variance-preserving process (Ho et al., 2020), as diffusers' ``DDPMScheduler`` defines it:
    x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, t ~ U{0..T-1}; the target is eps, or the velocity
    sqrt(abar_t) eps - sqrt(1 - abar_t) x0 for a v-prediction model."""

    feature_time = 50  # abar_50 = 0.99 under the small backbone's cosine schedule

    def __init__(self, scheduler, weighting_scheme: str | None = None, **_):
        if weighting_scheme is not None:
            raise PogdiffError(f"--weighting-scheme {weighting_scheme}: applies to flow-matching backbones (SD3, "
                               "Flux); this one trains under DDPM: drop it (--snr-gamma weights its loss)")
        self.scheduler = scheduler
        self.num_timesteps = scheduler.config.num_train_timesteps

    @property
    def v_prediction(self) -> bool:
        return self.scheduler.config.prediction_type == "v_prediction"

    def draw_times(self, n: int, device) -> torch.Tensor:
        return torch.randint(0, self.num_timesteps, (n,), device=device)

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.scheduler.add_noise(x0, noise, t)

    def target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.scheduler.get_velocity(x0, noise, t) if self.v_prediction else noise

    def scales(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        abar = self.scheduler.alphas_cumprod.to(t.device)[t]
        return abar.sqrt(), (1 - abar).sqrt()

    def signal_scale(self, t: int) -> float:
        """a_t of one t, as a number."""
        return self.scheduler.alphas_cumprod[t].item() ** 0.5

    def noise_to_signal(self, t: torch.Tensor) -> torch.Tensor:
        return 1 / self.scheduler.alphas_cumprod.to(t.device, torch.float64)[t] - 1

    def time_fraction(self, t: torch.Tensor) -> torch.Tensor:
        return t.float() / self.num_timesteps

    def example_weights(self, t: torch.Tensor, snr_gamma: float | None = None) -> torch.Tensor:
        """Min-SNR-gamma weights (Hang et al., 2023) as in diffusers' scripts; ones without snr_gamma."""
        if snr_gamma is None:
            return torch.ones(len(t), device=t.device)
        from diffusers.training_utils import compute_snr

        snr = compute_snr(self.scheduler, t)
        if self.v_prediction:
            return snr.clamp(max=snr_gamma) / (snr + 1)
        return snr.clamp(max=snr_gamma) / snr


class FlowMatchingProcess:
    """Rectified flow (Liu et al., 2023; Esser et al., 2024), as diffusers' SD3 and Flux DreamBooth-LoRA scripts
    train it: x_t = (1 - sigma_t) x0 + sigma_t eps and the target is the velocity eps - x0.

    sigma_t is the scheduler's training schedule as the scheduler makes it (``FlowMatchEulerDiscreteScheduler``'s
    sigmas: shifted by its ``shift`` for SD3, unshifted where it shifts by resolution at sampling, Flux's
    ``use_dynamic_shifting``, as diffusers' scripts train it); t's index is drawn by ``weighting_scheme`` (``none``: uniform; ``logit_normal`` with
    ``logit_mean``, ``logit_std``; ``mode`` with ``mode_scale``), which also weights the loss
    (``sigma_sqrt``, ``cosmap``), all as those scripts' options of the same names.
    """

    feature_time = 950  # sigma = 0.05 at shift 1 (indices run from sigma 1 down)

    def __init__(self, scheduler, weighting_scheme: str = "none", logit_mean: float = 0.0, logit_std: float = 1.0,
                 mode_scale: float = 1.29, snr_gamma: float | None = None):
        if snr_gamma is not None:
            raise PogdiffError("--snr-gamma weights a noise-prediction loss; a flow-matching backbone (SD3, Flux) is "
                               "weighted by --weighting-scheme instead: drop --snr-gamma")
        self.scheduler = scheduler
        self.num_timesteps = scheduler.config.num_train_timesteps
        schedule = type(scheduler).from_config(scheduler.config)  # its training schedule, whatever sampling set
        self.sigmas = schedule.sigmas.float()
        self.weighting_scheme, self.logit_mean, self.logit_std = weighting_scheme, logit_mean, logit_std
        self.mode_scale = mode_scale

    def draw_times(self, n: int, device) -> torch.Tensor:
        from diffusers.training_utils import compute_density_for_timestep_sampling

        u = compute_density_for_timestep_sampling(self.weighting_scheme, n, self.logit_mean, self.logit_std,
                                                  self.mode_scale)
        return (u * self.num_timesteps).long().clamp(max=self.num_timesteps - 1).to(device)

    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        return self.sigmas.to(t.device)[t]

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a, b = self.scales(t)
        shape = (-1,) + (1,) * (x0.dim() - 1)
        return (a.view(shape) * x0 + b.view(shape) * noise).to(x0.dtype)

    def target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return noise - x0

    def scales(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        sigma = self.sigma(t)
        return 1 - sigma, sigma

    def signal_scale(self, t: int) -> float:
        return 1 - self.sigmas[t].item()

    def noise_to_signal(self, t: torch.Tensor) -> torch.Tensor:
        sigma = self.sigma(t).double()
        return (sigma / (1 - sigma).clamp(min=1e-6)) ** 2  # at sigma = 1, x_t tells nothing: every source alike

    def time_fraction(self, t: torch.Tensor) -> torch.Tensor:
        return self.sigma(t)

    def example_weights(self, t: torch.Tensor, snr_gamma: float | None = None) -> torch.Tensor:
        """The weighting scheme's weights (``snr_gamma`` is refused when the process is made)."""
        from diffusers.training_utils import compute_loss_weighting_for_sd3

        return compute_loss_weighting_for_sd3(self.weighting_scheme, self.sigma(t))


ForwardProcess = DDPMProcess | FlowMatchingProcess  # what a loss is given (the interface of the module docstring)
