"""Every method option reaches its loss, whether typed as a train flag or as a benchmark row's option."""

import pytest
import torch
from diffusers import DDPMScheduler
from test_losses import TinyDenoiser, make_batch, make_tables

from pogdiff.cli import build_parser, train_config
from pogdiff.compare.comparison import parse_method
from pogdiff.objectives.forward_process import DDPMProcess
from pogdiff.objectives.losses import METHODS, method_parameters
from pogdiff.training.train import TrainConfig, make_loss

PROCESS = DDPMProcess(DDPMScheduler(num_train_timesteps=100))
ENCODED = make_tables()  # its GivenNeighbours records which table of Eq. 8 the loss's tables were built with
SAME, OTHER = (torch.tensor([0]), torch.tensor([1]), torch.tensor([0.4])), (torch.tensor([0]), torch.tensor([2]),
                                                                            torch.tensor([0.4]))


def loss_from_flags(method, *flags):
    args = build_parser().parse_args(["train", "DATA", "--output-dir", "RUN", "--method", method, *flags])
    return make_loss(train_config(args), PROCESS, ENCODED)


def loss_from_benchmark(row):
    spec = parse_method(row)
    return make_loss(TrainConfig("", "", method=spec.method, method_options=spec.options), PROCESS, ENCODED)


def psi_txt_of_row_0(loss):  # ELBO -1 against the median 0: exp(1) before the clip and a3
    return loss.psi_txt[0].item()


def target_branch_has_gradient(loss):
    model = TinyDenoiser()
    loss(model, make_batch(ENCODED)).sum().backward()
    return model.calls_with_grad[1]


# (method, flags, benchmark options, what the loss shows, its value with the default, with the option)
KNOBS = [
    ("pogdiff", ["--k", "1"], "k=1", lambda loss: ENCODED.image_features.asked[-1][1], 10, 1),
    ("pogdiff", ["--neighbour-features", "efficientnet-lite0"], "neighbour_features=efficientnet-lite0",
     lambda loss: ENCODED.image_features.asked[-1][0], "unet", "efficientnet-lite0"),
    ("pogdiff", ["--a1", "2"], "a1=2", lambda loss: loss.psi(*SAME).div(psi_txt_of_row_0(loss)).item(), 0.4, 0.16),
    ("pogdiff", ["--a2", "2"], "a2=2", lambda loss: loss.psi(*OTHER).div(psi_txt_of_row_0(loss)).item(), 0.4 ** 11,
     0.064),
    ("pogdiff", ["--a3", "2"], "a3=2", psi_txt_of_row_0, 2.0, 1.0),  # e, clipped to the default ratio 2
    ("pogdiff", ["--psi-txt-max-ratio", "10"], "psi_txt_max_ratio=10", psi_txt_of_row_0, 2.0, torch.e),
    ("pogdiff", ["--no-psi-img"], "use_psi_img=false", lambda loss: loss.psi(*OTHER).item(), 0.4 ** 11 * 2, 2.0),
    ("pogdiff", ["--no-psi-txt"], "use_psi_txt=false", lambda loss: loss.psi(*OTHER).item(), 0.4 ** 11 * 2,
     0.4 ** 11),
    ("pogdiff", ["--target-grad"], "target_grad=true", target_branch_has_gradient, False, True),
    ("cbdm", ["--cbdm-tau", "0.5"], "tau=0.5", lambda loss: loss.tau, 1.0, 0.5),
    ("cbdm", ["--cbdm-balance", "rows"], "balance=rows", lambda loss: loss.balance, "identities", "rows"),
    ("t2h", ["--t2h-frequency", "text_density"], "frequency=text_density",
     lambda loss: loss.condition_frequency.tolist(), [2.0, 2.0, 2.0, 2.0], [-1.0, 0.0, 1.0, 2.0]),
]


@pytest.mark.parametrize("method, flags, option, shown, default, changed", KNOBS, ids=[k[2] for k in KNOBS])
def test_each_option_reaches_the_loss_from_a_flag_and_from_a_benchmark_row(method, flags, option, shown, default,
                                                                            changed):
    for loss in (loss_from_flags(method), loss_from_benchmark(method)):
        assert shown(loss) == pytest.approx(default)
    for loss in (loss_from_flags(method, *flags), loss_from_benchmark(f"{method}:{option}")):
        assert shown(loss) == pytest.approx(changed)


def test_every_option_of_every_method_is_covered_here():
    covered = {(method, option.split("=")[0]) for method, _, option, *_ in KNOBS}
    assert covered == {(method, name) for method in METHODS for name in method_parameters(method)}


def test_benchmark_rows_spell_a_sampler_and_options_together():
    spec = parse_method("pogdiff+balanced:k=3,a2=10,psi_txt_max_ratio=2,neighbour_features=faces")
    assert (spec.method, spec.sampler) == ("pogdiff", "balanced")
    assert spec.options == {"k": 3, "a2": 10.0, "psi_txt_max_ratio": 2.0, "neighbour_features": "faces"}
    assert parse_method("cbdm+balanced").sampler == "balanced"
    assert parse_method("resample:density_max_ratio=5").sampler_options == {"density_max_ratio": 5.0}
    assert parse_method("resample").sampler is None  # its own: balanced
