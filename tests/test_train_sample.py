"""A short training run lowers the loss; sampling returns images of the right shape."""

import torch

from pogdiff.backbone import PixelBackbone, load_backbone
from pogdiff.data.dataset import load_dataset
from pogdiff.losses import DEFAULT_K, TrainBatch, VanillaLoss, method_parameters
from pogdiff.neighbour_features import DEFAULT_NEIGHBOUR_FEATURES
from pogdiff.sampling import generate
from pogdiff.encoded_dataset import encode_dataset
from pogdiff.row_sampler import batch_rows
from pogdiff.train import TrainConfig, train


def held_out_loss(unet, backbone, tables, images):
    """Vanilla loss on every training image with fixed noise draws."""
    loss_fn = VanillaLoss(backbone.scheduler, tables)
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(123)
        rows = torch.arange(len(images)).repeat(4)
        batch = TrainBatch(images[rows], tables.text_states[rows], rows, torch.zeros(len(rows), dtype=torch.bool))
        return loss_fn(lambda x, t, c: unet(x, t, encoder_hidden_states=c).sample, batch).mean().item()


def test_short_pogdiff_run_lowers_the_loss_and_samples(toy_data, tmp_path, cache_dir):
    config = TrainConfig(str(toy_data), str(tmp_path / "run"), method="pogdiff", max_train_steps=40,
                         train_batch_size=8, cache_dir=str(cache_dir), progress=False)
    run = train(config)
    torch.manual_seed(config.seed)
    initial = PixelBackbone.create()
    dataset = load_dataset(toy_data)
    images = dataset.load_images(32)
    tables = encode_dataset(dataset, images, initial.text_encoder, cache_dir=cache_dir)
    trained = load_backbone(run)
    before = held_out_loss(initial.unet, initial, tables, images)
    after = held_out_loss(trained.unet, trained, tables, images)
    assert after < 0.7 * before

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
    for group in (summary["majority"], summary["minority"]):
        assert group["psi"]["min"] <= group["psi"]["median"] <= group["psi"]["max"]
        assert 0 <= group["other_identity_share"]["mean"] <= 1
    space = summary["neighbour_features"]
    assert space["space"].startswith("unet-") and space["k"] == DEFAULT_K
    assert space["same_identity"]["pairs"] == 66 + 15 + 1 and space["other_identity"]["pairs"] == 190 - 82
    weights = load_file(run / "psi.safetensors")
    assert torch.allclose(weights["psi"], weights["psi_img"] * weights["psi_txt"], atol=1e-6)
    assert (weights["psi_img"] >= 0).all() and (weights["psi_img"] <= 1).all()
