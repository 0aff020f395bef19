"""Eq. 8's feature spaces (--neighbour-features), the cache keyed by them, and the neighbour diagnostics."""

import json
import subprocess
import sys

import pytest
import torch
from test_losses import GivenNeighbours, make_tables

from pogdiff.backbones.pixel import PixelBackbone
from pogdiff.data.dataset import load_dataset
from pogdiff.data.image_files import ImageFiles, pixels_to_float
from pogdiff.encode.encoded_dataset import encode_dataset, training_latents
from pogdiff.errors import PogdiffError
from pogdiff.encode.neighbour_features import UNetSpace, neighbour_feature_space
from pogdiff.objectives.neighbours import DEFAULT_NEIGHBOUR_FEATURES
from pogdiff.objectives.neighbours import NeighbourRequest, NeighbourTable, other_identity_share, similarity_by_identity
from pogdiff.objectives.psi import summarise, summarise_similarity
from pogdiff.training.run_folder import save_psi


def test_training_modules_do_not_import_the_evaluation():
    code = ("import sys, pogdiff.training.train, pogdiff.encode.neighbour_features, pogdiff.cli; "
            "print([m for m in sys.modules if m.startswith('pogdiff.evaluation')])")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "[]"


@pytest.fixture(scope="module")
def backbone():
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return PixelBackbone.create()


def test_unet_space_is_the_mid_block_pooled_and_leaves_the_model_and_rng_alone(backbone):
    pixels = torch.randint(0, 256, (5, 3, 32, 32), dtype=torch.uint8)
    space = UNetSpace(backbone, pixels)
    before = {n: p.clone() for n, p in backbone.denoiser.state_dict().items()}
    state = torch.get_rng_state()
    features = space.embed_rows(range(5))
    assert features.shape == (5, backbone.denoiser.config.block_out_channels[-1])
    assert torch.equal(torch.get_rng_state(), state)
    assert all(torch.equal(p, before[n]) for n, p in backbone.denoiser.state_dict().items())
    whole = []  # a whole forward pass, its mid block's output pooled: what the space stops early to compute
    hook = backbone.denoiser.mid_block.register_forward_hook(lambda module, args, out: whole.append(out.mean((2, 3))))
    with torch.no_grad():
        abar = backbone.scheduler.alphas_cumprod[space.timestep].item()
        backbone.denoiser(abar ** 0.5 * pixels_to_float(pixels), torch.full((5,), space.timestep),
                      encoder_hidden_states=backbone.text_encoder.encode([""]).states.expand(5, -1, -1))
    hook.remove()
    torch.testing.assert_close(features, whole[0])
    assert torch.allclose(space.embed_rows(range(2)), features[:2], atol=1e-5)  # per image, whatever the batch
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        other = PixelBackbone.create()
    assert UNetSpace(other, pixels).name != space.name  # the name (the cache key) names the weights
    assert UNetSpace(backbone, pixels, "bf16").name != space.name  # and the precision they run in


def test_each_space_has_its_own_cached_neighbours(toy_data, tmp_path, backbone):
    from transformers import BitImageProcessor, Dinov2Config, Dinov2Model

    folder = tmp_path / "tiny-dinov2"
    torch.manual_seed(0)
    Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                             image_size=56, patch_size=14)).save_pretrained(folder)
    BitImageProcessor(size={"shortest_edge": 64}, crop_size={"height": 56, "width": 56}).save_pretrained(folder)
    dataset = load_dataset(toy_data)
    images = ImageFiles(dataset, 32, cache_dir=tmp_path / "cache")
    x0 = training_latents(backbone, images, random_flip=False, cache_dir=tmp_path / "cache")[0]
    encoded = encode_dataset(dataset, backbone.text_encoder, images, cache_dir=tmp_path / "cache",
                             feature_spaces=lambda space: neighbour_feature_space(space, backbone, x0))
    tables = {space: encoded.image_features.neighbours(space, 3)
              for space in ("efficientnet-lite0", "unet", str(folder))}
    assert {space: encoded.image_features.features(space).shape[1] for space in tables} == \
        {"efficientnet-lite0": 1280, "unet": 64, str(folder): 32}
    assert encoded.image_features.name(str(folder)).startswith(f"hf:{folder}@")
    assert len(list((tmp_path / "cache").glob("neighbours-*"))) == 3
    assert len(list((tmp_path / "cache").glob("image-features-*"))) == 3
    for table in tables.values():
        assert table.index.shape == (20, 3) and not (table.index == torch.arange(20)[:, None]).any()


def test_share_of_y_prime_from_another_identity_on_a_hand_built_table():
    identity = torch.tensor([0, 0, 0, 1])
    table = NeighbourTable(torch.tensor([[1, 3], [0, 2], [3, 1], [0, 1]]),
                           torch.tensor([[0.6, 0.2], [0.5, 0.5], [0.9, 0.3], [0.8, -0.4]]))
    # row 0: other identity (row 3) with weight 0.2 / 0.8; row 1: none; row 2: 0.9 / 1.2; row 3: both neighbours
    # are another identity (the negative similarity counts as 0, its weight goes to row 0)
    share = other_identity_share(table, identity)
    assert torch.allclose(share, torch.tensor([0.25, 0.0, 0.75, 1.0]))
    summary = summarise({"other_identity_share": share}, torch.tensor([False, False, False, True]))
    assert summary["majority"]["rows"] == 3 and summary["majority"]["other_identity_share"]["mean"] == pytest.approx(1 / 3, abs=1e-4)
    assert summary["minority"]["other_identity_share"]["median"] == 1.0


def test_similarity_by_identity_splits_pairs_and_is_summarised_with_a_histogram():
    features = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    split = similarity_by_identity(features, torch.tensor([0, 0, 1, 1]))
    assert sorted(split["same_identity"].tolist()) == [0.0, 1.0]            # (0, 1) and (2, 3)
    assert sorted(split["other_identity"].tolist()) == [-1.0, -1.0, 0.0, 0.0]
    summary = summarise_similarity(split, bins=4)
    assert summary["histogram_edges"] == [-1.0, -0.5, 0.0, 0.5, 1.0]
    assert summary["other_identity"]["histogram"] == [2, 0, 2, 0] and summary["other_identity"]["pairs"] == 4
    assert summary["same_identity"]["median"] == 0.5
    # same 0 beats the two -1 and ties the two 0 (3 of 4); same 1 beats all four: (0.75 + 1) / 2
    assert summary["separation"] == pytest.approx(0.875)


def test_pogdiff_writes_the_diagnostics_into_psi_summary(tmp_path):
    from diffusers import DDPMScheduler

    from pogdiff.encode.loss_tables import loss_tables, neighbour_space
    from pogdiff.objectives.forward_process import DDPMProcess
    from pogdiff.objectives.losses import PoGDiffLoss

    tables = make_tables()
    tables.image_features = GivenNeighbours(tables.image_features.table, torch.eye(4))
    wanted = NeighbourRequest(DEFAULT_NEIGHBOUR_FEATURES, 2)
    loss = PoGDiffLoss(DDPMProcess(DDPMScheduler(num_train_timesteps=100)), loss_tables(tables, wanted), k=2)
    save_psi(tmp_path, loss.psi_per_row(), torch.tensor([False, False, True, True]), neighbour_space(tables, wanted))
    summary = json.loads((tmp_path / "psi_summary.json").read_text())
    # make_tables: rows 0, 1 are identity 0, rows 2, 3 identity 1; row 0 draws row 2 with weight 0.2, row 1
    # draws row 2 half the time, row 2 draws row 0 with 0.1, row 3 draws row 1 with 0.4
    assert summary["majority"]["other_identity_share"]["mean"] == pytest.approx((0.2 + 0.5) / 2, abs=1e-4)
    assert summary["minority"]["other_identity_share"]["mean"] == pytest.approx((0.1 + 0.4) / 2, abs=1e-4)
    assert set(summary["minority"]) >= {"rows", "psi", "psi_img", "psi_txt", "other_identity_share"}
    space = summary["neighbour_features"]
    assert space["space"] == f"given:{DEFAULT_NEIGHBOUR_FEATURES}" and space["k"] == 2
    assert space["same_identity"]["pairs"] == 2 and space["other_identity"]["pairs"] == 4


def test_unknown_neighbour_space_names_the_built_in_ones(tmp_path):
    with pytest.raises(PogdiffError, match="not a built-in space \\(efficientnet-lite0, faces, unet\\)"):
        neighbour_feature_space(str(tmp_path / "effnet"))
