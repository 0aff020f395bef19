"""Training objectives, one small callable class per paper (after NVlabs/edm ``training/loss.py``).

Every loss shares one call contract::

    loss_fn = SomeLoss(process, tables, **paper_defaults)   # pure: no dataset work
    per_example = loss_fn(denoiser, batch)      # (B,) tensor, mean it to step

where ``process`` is the backbone's forward process (:mod:`pogdiff.objectives.forward_process`: DDPM's
noise schedule or a flow; the losses never know which model they train), ``tables`` is a :class:`LossTables`: what the losses look up by training row, as
tensors, built once from the encoded dataset by the encode stage
(:func:`pogdiff.encode.loss_tables.loss_tables`, given the Eq. 8 table the method asks for with
:meth:`~DiffusionLoss.neighbour_request`); ``denoiser(x_t, t, cond)`` returns the model
output (epsilon, v or a flow's velocity: the process's target) and ``batch`` is a :class:`TrainBatch`. Which rows a batch holds
is the row sampler's business (:mod:`pogdiff.training.row_sampler`, ``--sampler``), not the
loss's; a class only names the sampler it implies (``SAMPLER``: ``resample`` is vanilla
on balanced batches). An optional hook, with a neutral default on :class:`DiffusionLoss`,
for a method with PoGDiff's weight psi: :meth:`~DiffusionLoss.psi_per_row`. A class's
constructor options are the method's options, with the paper's defaults; their values are
checked by :mod:`pogdiff.options`. The ``OPTION_HELP`` of a class documents them for
``pogdiff train --help`` (``OPTION_CHOICES`` lists the values of a text option). Register
new classes in ``METHODS``.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Callable, ClassVar

import torch
import torch.nn.functional as F

from pogdiff.errors import PogdiffError
from pogdiff.objectives.forward_process import ForwardProcess
from pogdiff.objectives.neighbours import (DEFAULT_NEIGHBOUR_FEATURES, NeighbourRequest, NeighbourTable,
                                          other_identity_share)
from pogdiff.objectives.psi import image_similarity_weight, inverse_text_density_weight, pog_weight

DEFAULT_K = 10  # PoGDiff's neighbours per image (Eq. 8)

Denoiser = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class LossTables:
    """What the losses look up by training row, as tensors: built from the encoded dataset by the encode stage
    (:func:`pogdiff.encode.loss_tables.loss_tables`), so that constructing a loss does no dataset work."""

    caption_states: Callable[[torch.Tensor], torch.Tensor]  # rows -> (B, L, D) float32 caption states y, read per batch
    identity: torch.Tensor           # (N,) identity codes: Eq. 9's indicator 1[I(x) != I(x')]
    identity_counts: torch.Tensor    # (N,) images of each row's identity (T2H's condition frequency)
    has_identities: bool             # whether some rows share an identity (without an identity column none do)
    identity_balanced: torch.Tensor  # (N,) probabilities that draw each identity equally often, then a row of it
    elbo: torch.Tensor               # (N,) ELBO_VAE(y) of each row's caption: the log text density of Eq. 10
    neighbours: NeighbourTable | None = None  # Eq. 8's k nearest other images, for a method that draws them

    def __len__(self) -> int:
        return len(self.identity)


@dataclass
class TrainBatch:
    x0: torch.Tensor       # (B, C, H, W) clean images or latents
    cond: torch.Tensor     # (B, L, D) caption states y, phi("") where the caption was dropped
    index: torch.Tensor    # (B,) dataset rows
    dropped: torch.Tensor  # (B,) bool: caption replaced by the empty caption (for guidance)


def mse_per_example(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(a.float(), b.float(), reduction="none").flatten(1).mean(1)


class DiffusionLoss:
    """The standard objective L_DM = ||eps_theta(x_t, t, y) - eps||^2 (Ho et al., 2020; paper Eq. 1).

    Shared by all methods: t and x_t from the backbone's forward process (``process``), the
    target it names (eps, v, or a flow's velocity), its weighting (optional Min-SNR-gamma for
    DDPM), and optional offset noise (``noise_offset``: eps gains noise_offset * n with
    n ~ N(0, 1) per example and channel, constant over the image, as diffusers' ``--noise_offset``).
    """

    OPTION_TITLE: ClassVar[str] = ""  # heading of the method's options in `pogdiff train --help`
    OPTION_HELP: ClassVar[dict[str, str]] = {}  # constructor option -> its help
    OPTION_FLAGS: ClassVar[dict[str, str]] = {}  # constructor option -> its flag, where not --option-name
    OPTION_CHOICES: ClassVar[dict[str, tuple[str, ...]]] = {}  # text option -> its values, where fixed
    SAMPLER: ClassVar[str] = "uniform"  # the row sampler the method implies (pogdiff.training.row_sampler)

    def __init__(self, process: ForwardProcess, tables: LossTables, snr_gamma: float | None = None,
                 noise_offset: float = 0.0):
        self.process = process
        self.tables = tables
        self.snr_gamma = snr_gamma
        self.noise_offset = noise_offset

    def diffuse(self, x0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Draw (t, eps) and return x_t, t, eps and the regression target."""
        noise = torch.randn_like(x0)
        if self.noise_offset:
            noise += self.noise_offset * torch.randn(x0.shape[:2] + (1,) * (x0.dim() - 2), device=x0.device)
        t = self.process.draw_times(len(x0), x0.device)
        return self.process.add_noise(x0, noise, t), t, noise, self.process.target(x0, noise, t)

    def example_weights(self, t: torch.Tensor) -> torch.Tensor:
        """The process's weight of each example (Min-SNR-gamma with ``snr_gamma``; ones for plain DDPM)."""
        return self.process.example_weights(t, self.snr_gamma)

    @classmethod
    def neighbour_request(cls, options: dict) -> NeighbourRequest | None:
        """The table of Eq. 8 that the loss with ``options`` (all in effect) reads from its tables; None: none."""
        return None

    def check_choice(self, option: str, value: str) -> None:
        """A text option must be one of OPTION_CHOICES[option]."""
        choices = self.OPTION_CHOICES[option]
        if value not in choices:
            raise PogdiffError(f"{option}={value!r}: choose one of {', '.join(choices)}")

    def psi_per_row(self) -> dict[str, torch.Tensor] | None:
        """Per training row: psi_txt, psi_img, psi (Eqs. 9, 11, 12) and the share of y' drawn from
        another identity (Eq. 8); None for a method without psi."""
        return None

    def __call__(self, denoiser: Denoiser, batch: TrainBatch) -> torch.Tensor:
        x_t, t, _, target = self.diffuse(batch.x0)
        return self.example_weights(t) * mse_per_example(denoiser(x_t, t, batch.cond), target)


class VanillaLoss(DiffusionLoss):
    """VANILLA: plain fine-tuning with the standard loss (the paper's first baseline)."""


class PoGDiffLoss(DiffusionLoss):
    """PoGDiff (Wang et al., 2025), Eq. 13:

        L = ||eps_theta(x_t, y) - eps||^2 + psi * ||eps_theta(x_t, y) - eps_theta(x_t, y')||^2

    y' is the caption of one of the k nearest neighbours in the feature space
    ``neighbour_features`` (:mod:`pogdiff.encode.neighbour_features`), drawn by Eq. 8 from
    ``tables.neighbours`` (these two options choose the table that the encode stage builds,
    :meth:`neighbour_request`); psi = psi_img * psi_txt (Eqs. 9, 11, 12), computed from the
    tables' tensors. eps_theta(x_t, y') is a target to match (the
    mean of the PoG's second Gaussian), so by default it carries no gradient and runs as a
    separate forward without autograd (1.4x a vanilla step, against 2x for one batched 2B
    forward); ``target_grad=True`` lets the gradient flow through both branches. Examples
    whose caption was dropped for classifier-free guidance have no caption to borrow for,
    so their psi is 0.

    The defaults of k, neighbour_features, a2 and psi_txt_max_ratio are the sensitivity
    study's choice (benchmarks/pogdiff_sensitivity.py, docs/pogdiff-options.md); the paper's footnote example
    has a1 = a2 = 1.
    """

    OPTION_TITLE = "PoGDiff (Sec. 3.2)"
    OPTION_HELP = {
        "k": "neighbours per image, Eq. 8",
        "neighbour_features": "feature space of Eq. 8's neighbours: efficientnet-lite0, faces (dlib), unet (the "
                              "backbone's own denoiser's middle features) or a Hugging Face CLIP, SigLIP, ViT/DINO "
                              "or DINOv2 model id or folder",
        "a1": "Eq. 9 exponent for the same identity",
        "a2": "Eq. 9 extra exponent for another identity",
        "a3": "Eq. 11 scale of the inverse text density",
        "psi_txt_max_ratio": "clip psi_txt to [1/r, r] x the median",
        "use_psi_img": "ablation: psi_img = 1",
        "use_psi_txt": "ablation: psi_txt = 1",
        "target_grad": "let gradient flow through eps(x_t, y')",
    }
    OPTION_FLAGS = {"k": "--k"}

    def __init__(self, process: ForwardProcess, tables: LossTables, snr_gamma: float | None = None, noise_offset: float = 0.0,
                 k: int = DEFAULT_K, neighbour_features: str = DEFAULT_NEIGHBOUR_FEATURES,
                 a1: float = 1.0, a2: float = 10.0, a3: float = 1.0, psi_txt_max_ratio: float = 2.0,
                 use_psi_img: bool = True, use_psi_txt: bool = True, target_grad: bool = False):
        super().__init__(process, tables, snr_gamma, noise_offset)
        if tables.neighbours is None:
            raise PogdiffError("PoGDiff draws y' from Eq. 8's neighbour table and its tables hold none; build them "
                               "with pogdiff.encode.loss_tables.loss_tables(encoded, neighbour_request('pogdiff', options))")
        self.a1, self.a2 = a1, a2
        self.use_psi_img, self.use_psi_txt = use_psi_img, use_psi_txt
        self.target_grad = target_grad
        self.psi_txt = inverse_text_density_weight(tables.elbo, a3, psi_txt_max_ratio)  # Eq. 11, checks a3

    @classmethod
    def neighbour_request(cls, options: dict) -> NeighbourRequest:
        return NeighbourRequest(options["neighbour_features"], options["k"])

    def psi(self, rows: torch.Tensor, neighbours: torch.Tensor, similarity: torch.Tensor) -> torch.Tensor:
        """Eq. 12 for each (example, drawn neighbour) pair; an ablated factor counts as 1."""
        ones = torch.ones_like(similarity)
        same = self.tables.identity[rows] == self.tables.identity[neighbours]
        psi_img = image_similarity_weight(similarity, same, self.a1, self.a2) if self.use_psi_img else ones
        psi_txt = self.psi_txt[rows] if self.use_psi_txt else ones
        return pog_weight(psi_img, psi_txt)

    def psi_per_row(self) -> dict[str, torch.Tensor]:
        """Per training row: psi_txt, psi_img and psi in expectation over the neighbour draw (Eq. 8), and
        the probability that the drawn y' is another identity's caption."""
        table = self.tables.neighbours
        rows = torch.arange(len(self.tables), device=table.index.device)[:, None].expand_as(table.index)
        psi = self.psi(rows.flatten(), table.index.flatten(), table.similarity.flatten()).view_as(table.index)
        weights = table.sampling_weights()
        expected_psi = (weights * psi).sum(1)
        psi_txt = self.psi_txt if self.use_psi_txt else torch.ones_like(expected_psi)
        return {"psi_txt": psi_txt, "psi_img": expected_psi / psi_txt, "psi": expected_psi,
                "other_identity_share": other_identity_share(table, self.tables.identity)}

    def __call__(self, denoiser: Denoiser, batch: TrainBatch) -> torch.Tensor:
        x_t, t, _, target = self.diffuse(batch.x0)
        prediction = denoiser(x_t, t, batch.cond)
        neighbours, similarity = self.tables.neighbours.draw(batch.index)
        psi = self.psi(batch.index, neighbours, similarity) * (~batch.dropped)
        neighbour_cond = self.tables.caption_states(neighbours)
        with torch.set_grad_enabled(self.target_grad and torch.is_grad_enabled()):
            neighbour_prediction = denoiser(x_t, t, neighbour_cond)
        loss = mse_per_example(prediction, target) + psi * mse_per_example(prediction, neighbour_prediction)
        return self.example_weights(t) * loss


class CBDMLoss(DiffusionLoss):
    """CBDM, class-balancing diffusion (Qin et al., CVPR 2023; qym7/CBDM-pytorch ``diffusion.py``):

        L = ||eps(x_t, y) - eps||^2 + w ||eps(x_t, y) - sg(eps(x_t, y_b))||^2
                                    + (w / 4) ||sg(eps(x_t, y)) - eps(x_t, y_b)||^2,   w = tau * t / T

    The first term pulls the prediction under the example's caption towards the one under
    a balanced condition y_b; the second (commitment) term pulls the y_b prediction back.
    CBDM draws y_b's class uniformly over the class labels (its reference code does so when
    fine-tuning); with free-form captions y_b is the caption of a training row:
    ``balance="identities"`` (default) draws an identity uniformly, then one of its rows
    uniformly, so that a minority person is y_b as often as a majority one; ``"rows"``
    draws a row uniformly (identities in proportion to their images). Without an identity
    column the two coincide. The example's own row can be drawn, as CBDM's draw includes
    the example's class. Both branches need gradient, so they run as one batched forward;
    examples whose caption was dropped for guidance get no regulariser (CBDM skips it for
    unconditional batches) and are left out of the y_b half.
    """

    OPTION_TITLE = "CBDM (Qin et al., 2023)"
    OPTION_HELP = {"tau": "regulariser weight, w = tau * t / T",
                   "balance": "y_b is a row of an identity drawn uniformly (identities) or a row drawn uniformly (rows)"}
    OPTION_FLAGS = {"tau": "--cbdm-tau", "balance": "--cbdm-balance"}
    OPTION_CHOICES = {"balance": ("identities", "rows")}

    def __init__(self, process: ForwardProcess, tables: LossTables, snr_gamma: float | None = None, noise_offset: float = 0.0,
                 tau: float = 1.0, balance: str = "identities"):
        super().__init__(process, tables, snr_gamma, noise_offset)
        self.check_choice("balance", balance)
        self.tau = tau
        self.balance = balance

    def draw_balanced(self, count: int, device) -> torch.Tensor:
        """Rows whose captions become y_b, one per example."""
        if self.balance == "rows":
            return torch.randint(0, len(self.tables), (count,), device=device)
        return torch.multinomial(self.tables.identity_balanced, count, replacement=True)

    def __call__(self, denoiser: Denoiser, batch: TrainBatch) -> torch.Tensor:
        x_t, t, _, target = self.diffuse(batch.x0)
        balanced = self.draw_balanced(len(x_t), x_t.device)
        kept = (~batch.dropped).nonzero().squeeze(1)
        both = denoiser(torch.cat([x_t, x_t[kept]]), torch.cat([t, t[kept]]),
                        torch.cat([batch.cond, self.tables.caption_states(balanced[kept])]))
        prediction, balanced_prediction = both[:len(x_t)], both[len(x_t):]
        conditioned = prediction[kept]
        weight = self.tau * self.process.time_fraction(t[kept])
        regulariser = torch.zeros(len(x_t), device=x_t.device)
        regulariser[kept] = weight * (mse_per_example(conditioned, balanced_prediction.detach())
                                      + 0.25 * mse_per_example(conditioned.detach(), balanced_prediction))
        return self.example_weights(t) * (mse_per_example(prediction, target) + regulariser)


class T2HLoss(DiffusionLoss):
    """T2H, tail-to-head target transfer (Zhang et al., ICLR 2024; MediaBrain-SJTU/OC_LT
    ``diffusion.py``, ``do_transfer_x0`` with ``transfer_mode='t2h'``).

    No extra term: the regression target of example i is redrawn from a batch member j
    (i itself included) with probability proportional to

        exp(-||x0_i + sigma_t eps_i - x0_j||^2 / (2 sigma_t^2)),   x_t = a_t x0 + b_t eps,  sigma_t = b_t / a_t

    (for DDPM sigma_t^2 = 1 / abar_t - 1; for a flow sigma_t / (1 - sigma_t)), i.e. the posterior
    that the noisy x_t / a_t came from x0_j. The draw is kept only when j's
    condition is at least as frequent as i's (tail to head), else j = i; OC_LT applies it
    to every example at every step (no probability or time cut-off by default), whether
    or not the caption was dropped. The frequency of a condition, ``frequency``:
    ``"identity"`` (default) is the number of training images of the row's identity, as
    OC_LT counts a class, when the dataset has an identity column, and the text density
    without one; ``"text_density"`` is always the caption's text density exp(ELBO) from the
    same VAE as PoGDiff's psi_txt (Eq. 10), as the PoGDiff paper adapted it. The new target
    is the process's target for the noise that makes x_t from x0_j: eps' = (x_t - a_t x0_j) / b_t
    (eps' itself, its v for v-prediction, eps' - x0_j for a flow).
    """

    OPTION_TITLE = "T2H (Zhang et al., 2024)"
    OPTION_HELP = {"frequency": "how frequent a condition is: images of its identity (identity; text density "
                                "without an identity column) or the caption's text density (text_density)"}
    OPTION_FLAGS = {"frequency": "--t2h-frequency"}
    OPTION_CHOICES = {"frequency": ("identity", "text_density")}

    def __init__(self, process: ForwardProcess, tables: LossTables, snr_gamma: float | None = None,
                 noise_offset: float = 0.0, frequency: str = "identity"):
        super().__init__(process, tables, snr_gamma, noise_offset)
        self.check_choice("frequency", frequency)
        self.frequency = frequency
        # Per row, a number that grows with how frequent its condition is (only its order matters).
        by_identity = frequency == "identity" and tables.has_identities
        self.condition_frequency = tables.identity_counts.float() if by_identity else tables.elbo

    def transfer_probabilities(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """(B, B) row-stochastic matrix: the probability of drawing source j for example i."""
        sigma2 = self.process.noise_to_signal(t)
        x0 = x0.double().flatten(1)
        anchor = x0 + sigma2.sqrt()[:, None] * noise.double().flatten(1)  # x_t / a_t
        distance2 = torch.cdist(anchor, x0).pow(2)
        return torch.softmax(-distance2 / (2 * sigma2[:, None]), dim=1).float()

    def transfer(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """Batch position of each example's new source x0_j: drawn, then kept only towards conditions at least
        as frequent."""
        drawn = torch.multinomial(self.transfer_probabilities(x0, noise, t), 1).squeeze(1)
        towards_head = self.condition_frequency[rows[drawn]] >= self.condition_frequency[rows]
        return torch.where(towards_head, drawn, torch.arange(len(x0), device=x0.device))

    def __call__(self, denoiser: Denoiser, batch: TrainBatch) -> torch.Tensor:
        x_t, t, noise, _ = self.diffuse(batch.x0)
        with torch.no_grad():
            source = batch.x0[self.transfer(batch.x0, noise, t, batch.index)]
            a, b = (scale.view(-1, *[1] * (x_t.dim() - 1)) for scale in self.process.scales(t))
            target = self.process.target(source, (x_t - a * source) / b, t)
        return self.example_weights(t) * mse_per_example(denoiser(x_t, t, batch.cond), target)


class ResampleLoss(VanillaLoss):
    """Balanced resampling: the standard loss on batches that oversample the minority, i.e. vanilla
    with ``--sampler balanced`` (:mod:`pogdiff.training.row_sampler`), under a name of its own.

    Not in the paper; what practitioners do today with per-folder repeats (kohya-ss
    sd-scripts' ``num_repeats``).
    """

    SAMPLER = "balanced"


METHODS: dict[str, type[DiffusionLoss]] = {
    "vanilla": VanillaLoss,
    "pogdiff": PoGDiffLoss,
    "cbdm": CBDMLoss,
    "t2h": T2HLoss,
    "resample": ResampleLoss,
}


def method_parameters(method: str) -> dict[str, inspect.Parameter]:
    """The options a method's constructor takes beyond the shared (process, tables, snr_gamma, noise_offset)."""
    shared = {"self", "process", "tables", "snr_gamma", "noise_offset"}
    return {name: p for name, p in inspect.signature(METHODS[method].__init__).parameters.items() if name not in shared}


def options_in_effect(method: str, options: dict) -> dict:
    """Every option of the method's loss with the value it takes: the given ones, the defaults for the rest
    (what a run folder records, so that it stays readable after a default changes)."""
    return {name: options.get(name, p.default) for name, p in method_parameters(method).items()}


def neighbour_request(method: str, options: dict) -> NeighbourRequest | None:
    """The table of Eq. 8 that ``method`` with ``options`` draws from (PoGDiff's feature space and k), None for
    a method without neighbours: what the encode stage builds for its loss."""
    return METHODS[method].neighbour_request(options_in_effect(method, options))
