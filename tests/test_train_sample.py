"""A short training run lowers the loss; sampling returns images of the right shape."""

import pytest
import torch
from conftest import training_loss

from pogdiff.backbones.backbone import load_backbone
from pogdiff.data.dataset import load_dataset
from pogdiff.objectives.losses import DEFAULT_K, method_parameters
from pogdiff.objectives.neighbours import DEFAULT_NEIGHBOUR_FEATURES
from pogdiff.backbones.sampling import generate
from pogdiff.data.image_files import ImageFiles, read_images
from pogdiff.encode.encoded_dataset import encode_dataset
from pogdiff.training.row_sampler import batch_rows
from pogdiff.backbones.shipped import SHIPPED_NAME
from pogdiff.training.train import TrainConfig, train


def test_short_pogdiff_run_lowers_the_loss_and_samples(toy_data, tmp_path, cache_dir):
    config = TrainConfig(str(toy_data), str(tmp_path / "run"), method="pogdiff", max_train_steps=40,
                         train_batch_size=8, cache_dir=str(cache_dir), progress=False)
    run = train(config)
    initial = load_backbone(SHIPPED_NAME)  # where train starts by default
    dataset = load_dataset(toy_data)
    images = read_images(dataset, 32)
    tables = encode_dataset(dataset, initial.text_encoder, ImageFiles(dataset, 32), cache_dir=cache_dir)
    trained = load_backbone(run)
    before, after = training_loss(initial, images, tables), training_loss(trained, images, tables)
    assert after < 0.7 * before, (before, after)

    samples = generate(trained, ["An image of Anna.", "An image of Chen."], num_images=3,
                       num_inference_steps=4, progress=False)
    assert samples.shape == (6, 3, 32, 32)
    assert samples.min() >= -1 and samples.max() <= 1
    again = generate(trained, ["An image of Anna.", "An image of Chen."], num_images=3,
                     num_inference_steps=4, progress=False)
    assert torch.equal(samples, again)  # seeded


def test_batch_rows_is_a_seeded_epoch_shuffle():
    epoch = torch.cat([batch_rows(10, 3, step, seed=0) for step in range(3)])
    assert len(set(epoch.tolist())) == 9  # drop-last, no repeats within an epoch
    assert torch.equal(batch_rows(10, 3, 4, seed=0), batch_rows(10, 3, 4, seed=0))
    assert not torch.equal(torch.cat([batch_rows(10, 3, s, seed=0) for s in range(3, 6)]), epoch)
    assert not torch.equal(torch.cat([batch_rows(10, 3, step, seed=1) for step in range(3)]), epoch)
    weights = torch.tensor([0.0] * 9 + [1.0])
    assert (batch_rows(10, 3, 0, seed=0, weights=weights) == 9).all()


def test_pogdiff_run_writes_a_readable_psi_summary(toy_data, tmp_path, cache_dir):
    import json

    from safetensors.torch import load_file

    run = train(TrainConfig(str(toy_data), str(tmp_path / "run"), method="pogdiff", max_train_steps=1,
                            train_batch_size=4, method_options={"a2": 4.0}, cache_dir=str(cache_dir), progress=False))
    recorded = json.loads((run / "pogdiff_run.json").read_text())["loss_options"]  # defaults written out too
    assert recorded.keys() == method_parameters("pogdiff").keys() and recorded["a2"] == 4.0
    assert recorded["k"] == DEFAULT_K and recorded["neighbour_features"] == DEFAULT_NEIGHBOUR_FEATURES
    summary = json.loads((run / "psi_summary.json").read_text())
    assert summary["minority"]["rows"] == 2 and summary["majority"]["rows"] == 18  # toy: 12 + 6 vs 2
    space = summary["neighbour_features"]
    assert space["space"].startswith("unet-") and space["k"] == DEFAULT_K
    assert space["same_identity"]["pairs"] == 66 + 15 + 1 and space["other_identity"]["pairs"] == 190 - 82
    weights = load_file(run / "psi.safetensors")
    assert weights["psi"].shape == (20,)
    # the default clip of Eq. 11 (2x the median either way) reached the run; toy captions span more than that
    assert weights["psi_txt"].min() == pytest.approx(0.5) and weights["psi_txt"].max() == pytest.approx(2.0)
