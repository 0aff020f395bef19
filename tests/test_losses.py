"""Eq. 13 against a hand computation, and where gradient flows."""

import pytest
import torch
from diffusers import DDPMScheduler

from pogdiff.encode.loss_tables import loss_tables
from pogdiff.objectives.losses import PoGDiffLoss, TrainBatch, VanillaLoss
from pogdiff.objectives.neighbours import NeighbourRequest, NeighbourTable
from pogdiff.encode.encoded_dataset import EncodedDataset
from pogdiff.objectives.forward_process import DDPMProcess


class TinyDenoiser(torch.nn.Module):
    """eps(x_t, t, y) = W x_t + mean_tokens(y) . v, elementwise: small enough to compute by hand."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor(0.5))
        self.v = torch.nn.Parameter(torch.tensor([1.0, -2.0, 0.5]))
        self.calls_with_grad = []

    def forward(self, x_t, t, cond):
        self.calls_with_grad.append(torch.is_grad_enabled())
        return self.w * x_t + (cond.mean(1) @ self.v)[:, None, None, None]


class GivenNeighbours:
    """Stands in for ImageFeatureSpaces: a hand-built table (and features), whatever space and k are asked for."""

    def __init__(self, table: NeighbourTable, features: torch.Tensor | None = None):
        self.table, self.given_features, self.asked = table, features, []

    def neighbours(self, space, k):
        self.asked.append((space, k))
        return self.table

    def features(self, space):
        return self.given_features

    def name(self, space):
        return f"given:{space}"


GIVEN = NeighbourRequest("unet", 2)  # the table GivenNeighbours holds, as the encode stage would build it
SEED_DRAWING_ANOTHER_IDENTITY = 2  # of seeds 0-9 only 2 and 5 draw one (asserted below)


def make_tables():
    g = torch.Generator().manual_seed(1)
    return EncodedDataset.of_rows(
        text_states=torch.randn(4, 2, 3, generator=g),
        uncond_states=torch.zeros(2, 3),
        identity=torch.tensor([0, 0, 1, 1]),
        elbo=torch.tensor([-1.0, 0.0, 1.0, 2.0]),
        image_features=GivenNeighbours(NeighbourTable(torch.tensor([[1, 2], [0, 2], [3, 0], [2, 1]]),
                                                      torch.tensor([[0.8, 0.2], [0.5, 0.5], [0.9, 0.1], [0.6, 0.4]]))))


def make_batch(tables):
    g = torch.Generator().manual_seed(2)
    index = torch.tensor([0, 2, 3])
    return TrainBatch(torch.randn(3, 1, 2, 2, generator=g), tables.caption_states(index), index,
                      torch.tensor([False, False, True]))


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_pogdiff_loss_matches_hand_computation(prediction_type):
    scheduler = DDPMScheduler(num_train_timesteps=100, prediction_type=prediction_type)
    tables = make_tables()
    batch = make_batch(tables)
    model = TinyDenoiser()
    loss_fn = PoGDiffLoss(DDPMProcess(scheduler), loss_tables(tables, GIVEN), a1=1.0, a2=2.0, a3=1.0, psi_txt_max_ratio=100.0)
    torch.manual_seed(SEED_DRAWING_ANOTHER_IDENTITY)
    loss = loss_fn(model, batch)

    torch.manual_seed(SEED_DRAWING_ANOTHER_IDENTITY)  # replay the same draws: eps, t, then the neighbour (Eq. 8)
    eps = torch.randn_like(batch.x0)
    t = torch.randint(0, 100, (3,))
    abar = scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    x_t = abar.sqrt() * batch.x0 + (1 - abar).sqrt() * eps
    target = eps if prediction_type == "epsilon" else abar.sqrt() * eps - (1 - abar).sqrt() * batch.x0
    table = tables.image_features.table
    weights = table.similarity[batch.index] / table.similarity[batch.index].sum(1, keepdim=True)
    choice = torch.multinomial(weights, 1).squeeze(1)
    j = table.index[batch.index, choice]
    s = table.similarity[batch.index, choice]
    same = tables.identity[batch.index] == tables.identity[j]
    assert not same[:2].all()  # another identity's caption is drawn for a row whose caption was not dropped
    psi_img = s ** torch.where(same, 1.0, 3.0)                           # Eq. 9: a1, a1 + a2
    psi_txt = torch.exp(-(tables.elbo[batch.index] - tables.elbo.median()))  # Eq. 11, median-normalised
    psi = psi_img * psi_txt * torch.tensor([1.0, 1.0, 0.0])              # third caption was dropped
    pred = 0.5 * x_t + (batch.cond.mean(1) @ model.v.detach())[:, None, None, None]
    pred_nb = 0.5 * x_t + (tables.caption_states(j).mean(1) @ model.v.detach())[:, None, None, None]
    expected = ((pred - target) ** 2).mean((1, 2, 3)) + psi * ((pred - pred_nb) ** 2).mean((1, 2, 3))
    assert torch.allclose(loss.detach(), expected, atol=1e-5)


def test_expected_psi_per_row_matches_hand_computation():
    """Eq. 12 in expectation over Eq. 8's draw, with the defaults (a1 = 1, a2 = 10, a3 = 1, clip 2)."""
    tables = make_tables()
    psi = PoGDiffLoss(DDPMProcess(DDPMScheduler(num_train_timesteps=100)), loss_tables(tables, GIVEN)).psi_per_row()
    # make_tables: ELBO -1, 0, 1, 2 around the median 0 -> exp(1), 1, exp(-1), exp(-2), clipped to [1/2, 2]
    psi_txt = torch.tensor([2.0, 1.0, 0.5, 0.5])
    # each row: (weight, similarity) of its same-identity neighbour, then of its other-identity one
    draws = [(0.8, 0.2), (0.5, 0.5), (0.9, 0.1), (0.6, 0.4)]
    psi_img = torch.tensor([same * same + other * other ** 11 for same, other in draws])
    assert torch.allclose(psi["psi_txt"], psi_txt)
    assert torch.allclose(psi["psi_img"], psi_img)
    assert torch.allclose(psi["psi"], psi_txt * psi_img)
    assert torch.allclose(psi["other_identity_share"], torch.tensor([0.2, 0.5, 0.1, 0.4]))


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_min_snr_gamma_weights(prediction_type):
    """Hang et al. 2023 as in diffusers' scripts: min(SNR, gamma) / SNR, or / (SNR + 1) for v-prediction."""
    scheduler = DDPMScheduler(num_train_timesteps=100, prediction_type=prediction_type)
    t = torch.tensor([0, 10, 50, 99])
    abar = scheduler.alphas_cumprod[t]
    snr = abar / (1 - abar)
    expected = snr.clamp(max=5.0) / (snr + 1 if prediction_type == "v_prediction" else snr)
    weights = VanillaLoss(DDPMProcess(scheduler), make_tables(), snr_gamma=5.0).example_weights(t)
    assert torch.allclose(weights, expected.float(), rtol=1e-5)
    assert weights[0] < 0.01 and weights.max() <= 1  # clean timesteps are down-weighted
    assert torch.equal(VanillaLoss(DDPMProcess(scheduler), make_tables()).example_weights(t), torch.ones(4))


def test_target_branch_has_no_gradient_by_default():
    scheduler = DDPMScheduler(num_train_timesteps=100)
    tables = make_tables()
    batch = make_batch(tables)
    model = TinyDenoiser()
    torch.manual_seed(3)
    PoGDiffLoss(DDPMProcess(scheduler), loss_tables(tables, GIVEN))(model, batch).sum().backward()
    assert model.calls_with_grad == [True, False]
    default_grad = model.v.grad.clone()

    model.v.grad = None
    model.w.grad = None
    torch.manual_seed(3)
    PoGDiffLoss(DDPMProcess(scheduler), loss_tables(tables, GIVEN), target_grad=True)(model, batch).sum().backward()
    assert model.calls_with_grad[2:] == [True, True]
    assert not torch.allclose(model.v.grad, default_grad)


def test_pogdiff_with_zero_psi_equals_vanilla():
    scheduler = DDPMScheduler(num_train_timesteps=100)
    tables = make_tables()
    tables.image_features.table.similarity.zero_()  # psi_img = 0 everywhere
    batch = make_batch(tables)
    torch.manual_seed(5)
    pog = PoGDiffLoss(DDPMProcess(scheduler), loss_tables(tables, GIVEN))(TinyDenoiser(), batch)
    torch.manual_seed(5)
    vanilla = VanillaLoss(DDPMProcess(scheduler), tables)(TinyDenoiser(), batch)
    assert torch.allclose(pog, vanilla)


def test_ablations_switch_factors_off():
    scheduler = DDPMScheduler(num_train_timesteps=100)
    tables = make_tables()
    rows, nbrs, sims = torch.tensor([0, 0]), torch.tensor([1, 2]), torch.tensor([0.4, 0.4])
    given = loss_tables(tables, GIVEN)
    full = PoGDiffLoss(DDPMProcess(scheduler), given, a2=1.0, psi_txt_max_ratio=100.0)  # the paper's footnote: a1 = a2 = 1
    no_img = PoGDiffLoss(DDPMProcess(scheduler), given, a2=1.0, use_psi_img=False, psi_txt_max_ratio=100.0)
    no_txt = PoGDiffLoss(DDPMProcess(scheduler), given, a2=1.0, use_psi_txt=False)
    txt = torch.exp(torch.tensor(1.0))  # elbo -1 against the (lower) median 0
    assert torch.allclose(full.psi(rows, nbrs, sims), torch.stack([0.4 * txt, 0.16 * txt]))
    assert torch.allclose(no_img.psi(rows, nbrs, sims), torch.stack([txt, txt]))
    assert torch.allclose(no_txt.psi(rows, nbrs, sims), torch.tensor([0.4, 0.16]))
