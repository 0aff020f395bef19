"""The baselines' arithmetic on tiny tensors (CBDM, T2H, and their identity variants), and every method trains."""

import json

import pytest
import torch
from diffusers import DDPMScheduler
from test_losses import TinyDenoiser, make_batch, make_tables

from pogdiff.backbones.backbone import load_backbone
from pogdiff.cli import build_parser, main
from pogdiff.encode.encoded_dataset import EncodedDataset
from pogdiff.errors import PogdiffError
from pogdiff.encode.loss_tables import loss_tables
from pogdiff.objectives.losses import METHODS, CBDMLoss, T2HLoss, TrainBatch, method_parameters
from pogdiff.training.run_folder import run_label
from pogdiff.backbones.shipped import SHIPPED_NAME
from pogdiff.training.train import TrainConfig, train
from pogdiff.objectives.forward_process import DDPMProcess


def test_cbdm_loss_and_its_stop_gradients_match_hand_computation():
    scheduler = DDPMScheduler(num_train_timesteps=100)
    tables = make_tables()
    batch = make_batch(tables)  # rows 0, 2, 3; the third caption was dropped
    model = TinyDenoiser()
    torch.manual_seed(7)
    loss = CBDMLoss(DDPMProcess(scheduler), loss_tables(tables), tau=2.0, balance="rows")(model, batch)
    loss.sum().backward()

    torch.manual_seed(7)  # replay the draws: eps, t, then the balanced caption y_b
    eps = torch.randn_like(batch.x0)
    t = torch.randint(0, 100, (3,))
    balanced = torch.randint(0, 4, (3,))
    abar = scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    x_t = abar.sqrt() * batch.x0 + (1 - abar).sqrt() * eps
    w, v = 0.5, model.v.detach()
    c, cb = batch.cond.mean(1), tables.caption_states(balanced).mean(1)
    h = w * x_t + (c @ v)[:, None, None, None]
    # eps(x_t, y) - eps(x_t, y_b) = (c - cb) . v: the same for every pixel
    d = (c - cb) @ v
    weight = 2.0 * t / 100 * torch.tensor([1.0, 1.0, 0.0])
    residual = h - eps
    expected = (residual ** 2).mean((1, 2, 3)) + weight * 1.25 * d ** 2
    assert torch.allclose(loss.detach(), expected, atol=1e-5)

    # d/dv: w_i d_i^2 with y_b detached gives 2 w_i d_i c_i; (w_i/4) d_i^2 with y detached gives -w_i d_i cb_i / 2.
    # d/dw: x_t cancels in d, so only the stop-gradients leave 2 w_i d_i m_i - w_i d_i m_i / 2 (m_i = mean x_t).
    grad_v = (2 * residual.mean((1, 2, 3))[:, None] * c).sum(0) + (2 * weight * d)[:, None].mul(c - cb / 4).sum(0)
    grad_w = (2 * residual * x_t).mean((1, 2, 3)).sum() + (1.5 * weight * d * x_t.mean((1, 2, 3))).sum()
    assert torch.allclose(model.v.grad, grad_v, atol=1e-5)
    assert torch.allclose(model.w.grad, grad_w, atol=1e-5)


def t2h_tables(elbo, identity=None):
    n = len(elbo)
    return loss_tables(EncodedDataset.of_rows(torch.zeros(n, 2, 3), torch.zeros(2, 3),
                                              torch.arange(n) if identity is None else torch.tensor(identity),
                                              torch.tensor(elbo)))


def test_t2h_transfer_probabilities_follow_the_gaussian_posterior():
    scheduler = DDPMScheduler(num_train_timesteps=100)
    loss_fn = T2HLoss(DDPMProcess(scheduler), t2h_tables([0.0, 0.0, 0.0]))
    x0 = torch.tensor([[0.0, 0.0], [0.5, 0.0], [0.0, -1.0]]).view(3, 1, 1, 2)
    noise = torch.tensor([[0.3, -0.2], [1.0, 0.5], [-0.4, 0.1]]).view(3, 1, 1, 2)
    t = torch.tensor([40, 60, 75])
    sigma2 = 1 / scheduler.alphas_cumprod[t].double() - 1
    expected = torch.empty(3, 3, dtype=torch.float64)
    for i in range(3):
        for j in range(3):
            anchor = x0[i].double() + sigma2[i].sqrt() * noise[i].double()
            expected[i, j] = torch.exp(-((anchor - x0[j].double()) ** 2).sum() / (2 * sigma2[i]))
    expected /= expected.sum(1, keepdim=True)
    assert torch.allclose(loss_fn.transfer_probabilities(x0, noise, t).double(), expected, atol=1e-6)


def test_t2h_moves_targets_only_towards_captions_at_least_as_dense():
    # Batch positions 0-2 show the same image, so each draws among them uniformly (itself included);
    # position 3 is far away. Text densities (ELBO): 0 is rarest, 1 and 2 tie, 3 is densest.
    loss_fn = T2HLoss(DDPMProcess(DDPMScheduler(num_train_timesteps=100)), t2h_tables([-1.0, 0.0, 0.0, 2.0]))
    x0 = torch.tensor([0.0, 0.0, 0.0, 50.0]).view(4, 1, 1, 1)
    noise = torch.tensor([0.1, -0.3, 0.2, 0.0]).view(4, 1, 1, 1)
    t, rows = torch.full((4,), 50), torch.arange(4)
    torch.manual_seed(0)
    sources = torch.stack([loss_fn.transfer(x0, noise, t, rows) for _ in range(900)])
    frequency = torch.stack([(sources == j).float().mean(0) for j in range(4)], 1)  # [position, source]
    expected = torch.tensor([[1 / 3, 1 / 3, 1 / 3, 0],   # the rarest caption takes any of the three
                             [0, 2 / 3, 1 / 3, 0],       # 0 is rarer: refused, the target stays its own
                             [0, 1 / 3, 2 / 3, 0],
                             [0, 0, 0, 1]])
    assert torch.allclose(frequency, expected, atol=0.06)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_t2h_target_is_the_noise_that_makes_x_t_from_the_source(prediction_type):
    scheduler = DDPMScheduler(num_train_timesteps=100, prediction_type=prediction_type)
    tables = t2h_tables([-1.0, 0.0, 1.0, 2.0])
    g = torch.Generator().manual_seed(4)
    x0 = 0.1 * torch.randn(4, 1, 2, 2, generator=g)  # close together: transfers are likely
    batch = TrainBatch(x0, tables.caption_states(torch.arange(4)), torch.arange(4), torch.zeros(4, dtype=torch.bool))
    model = TinyDenoiser()
    torch.manual_seed(11)
    loss = T2HLoss(DDPMProcess(scheduler), tables)(model, batch)

    torch.manual_seed(11)  # replay: eps, t, then j from the posterior weights
    eps = torch.randn_like(x0)
    t = torch.randint(0, 100, (4,))
    abar = scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    x_t = abar.sqrt() * x0 + (1 - abar).sqrt() * eps
    sigma2 = (1 / abar - 1).view(-1, 1)
    anchor = (x0 + (1 / abar - 1).sqrt() * eps).flatten(1)
    logits = -((anchor[:, None] - x0.flatten(1)[None]) ** 2).sum(-1) / (2 * sigma2)
    drawn = torch.multinomial(torch.softmax(logits, 1), 1).squeeze(1)
    source = torch.where(tables.elbo[drawn] >= tables.elbo, drawn, torch.arange(4))
    assert (source != torch.arange(4)).any()  # this draw exercises a transfer
    new_eps = (x_t - abar.sqrt() * x0[source]) / (1 - abar).sqrt()
    target = new_eps if prediction_type == "epsilon" else abar.sqrt() * new_eps - (1 - abar).sqrt() * x0[source]
    prediction = 0.5 * x_t + (batch.cond.mean(1) @ model.v.detach())[:, None, None, None]
    assert torch.allclose(loss.detach(), ((prediction - target) ** 2).mean((1, 2, 3)), atol=1e-5)


def test_cbdm_draws_y_b_uniformly_over_identities_by_default_and_over_rows_as_an_option():
    tables = make_tables()
    tables.identity = torch.tensor([0, 0, 0, 1])  # three rows of one person, one of another
    scheduler = DDPMScheduler(num_train_timesteps=100)
    torch.manual_seed(0)
    by_identity = CBDMLoss(DDPMProcess(scheduler), loss_tables(tables)).draw_balanced(20000, "cpu")
    by_row = CBDMLoss(DDPMProcess(scheduler), loss_tables(tables), balance="rows").draw_balanced(20000, "cpu")
    share = [[(drawn == row).float().mean().item() for row in range(4)] for drawn in (by_identity, by_row)]
    assert torch.allclose(torch.tensor(share[0]), torch.tensor([1 / 6, 1 / 6, 1 / 6, 1 / 2]), atol=0.015)
    assert torch.allclose(torch.tensor(share[1]), torch.tensor([1 / 4] * 4), atol=0.015)
    with pytest.raises(PogdiffError, match="balance='classes': choose one of identities, rows"):
        CBDMLoss(DDPMProcess(scheduler), loss_tables(tables), balance="classes")


def test_t2h_frequency_is_the_identity_count_by_default_and_text_density_as_an_option():
    # Rows 0-2 are one person with rare captions (low ELBO), row 3 a person with one image and a dense caption.
    x0 = torch.zeros(4, 1, 1, 1)  # one image: every source equally likely
    noise, t, rows = torch.zeros(4, 1, 1, 1), torch.full((4,), 50), torch.arange(4)
    scheduler = DDPMScheduler(num_train_timesteps=100)
    moved = {}
    for frequency in ("identity", "text_density"):
        loss_fn = T2HLoss(DDPMProcess(scheduler), t2h_tables([-3.0, -3.0, -3.0, 5.0], identity=[0, 0, 0, 1]), frequency=frequency)
        torch.manual_seed(0)
        sources = torch.stack([loss_fn.transfer(x0, noise, t, rows) for _ in range(400)])
        moved[frequency] = [(sources[:, i] == 3).any().item() for i in range(3)], (sources[:, 3] != 3).any().item()
    assert moved["identity"] == ([False] * 3, True)      # the single image's row borrows from the 3-image person
    assert moved["text_density"] == ([True] * 3, False)  # rare captions borrow from the dense one
    # Without an identity column the default falls back to the text density.
    loss_fn = T2HLoss(DDPMProcess(scheduler), t2h_tables([-3.0, -3.0, -3.0, 5.0]))
    assert torch.equal(loss_fn.condition_frequency, loss_fn.tables.elbo)


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_trains_a_few_steps(method, toy_data, tmp_path, shared_cache):
    run = train(TrainConfig(str(toy_data), str(tmp_path / "run"), method=method, max_train_steps=2,
                            train_batch_size=4, cache_dir=str(shared_cache), progress=False))
    info = json.loads((run / "pogdiff_run.json").read_text())
    assert info["steps"] == 2 and info["config"]["method"] == method
    start, trained = load_backbone(SHIPPED_NAME).denoiser.state_dict(), load_backbone(run).denoiser.state_dict()
    assert any(not torch.equal(start[name], trained[name]) for name in start)  # the loss carried a gradient


def test_every_method_option_of_the_cli_reaches_a_loss():
    flags = build_parser().parse_args(["train", "DATA", "--output-dir", "RUN"]).method_flags
    assert set(flags) == {name for method in METHODS for name in method_parameters(method)}


def test_cli_passes_method_options_and_names_ablations(toy_data, tmp_path, shared_cache, capsys):
    common = ["--max-train-steps", "1", "--train-batch-size", "4", "--cache-dir", str(shared_cache), "--no-progress"]
    cases = [(["--method", "pogdiff", "--no-psi-img"], {"use_psi_img": False}, "pogdiff(use_psi_img=False)"),
             (["--method", "pogdiff", "--no-psi-txt"], {"use_psi_txt": False}, "pogdiff(use_psi_txt=False)"),
             (["--method", "cbdm", "--cbdm-tau", "0.5"], {"tau": 0.5}, "cbdm(tau=0.5)")]
    for i, (argv, options, label) in enumerate(cases):
        run = tmp_path / f"run{i}"
        assert main(["train", str(toy_data), "--output-dir", str(run), *argv, *common]) == 0, capsys.readouterr().err
        config = json.loads((run / "pogdiff_run.json").read_text())["config"]
        assert config["method_options"] == options and run_label(config) == label

    code = main(["train", str(toy_data), "--output-dir", str(tmp_path / "bad"), "--method", "cbdm", "--no-psi-img",
                 *common])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("pogdiff: error: --no-psi-img does not apply to --method cbdm")
    assert not (tmp_path / "bad").exists()
