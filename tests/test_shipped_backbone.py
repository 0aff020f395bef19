"""The pretrained small backbone shipped in the package: verified, used by default, and it draws what it is told."""

import json
import shutil
import warnings

import numpy as np
import pytest
import torch

from pogdiff.backbones.backbone import load_backbone
from pogdiff.backbones.pixel import PixelBackbone
from pogdiff.cli import main
from pogdiff.data.synth import BACKGROUNDS
from pogdiff.errors import PogdiffError, PogdiffWarning
from pogdiff.training.run_folder import read_run_info
from pogdiff.backbones.sampling import generate
from pogdiff.backbones.shipped import (MANIFEST_FILE, SHIPPED_DIR, SHIPPED_NAME, WEIGHTS_FILE, resolve_run_dir, sha256,
                             shipped_backbone_dir)
from pogdiff.training.train import TrainConfig, check_options, train


def test_shipped_weights_match_their_manifest_and_are_small():
    manifest = json.loads((SHIPPED_DIR / MANIFEST_FILE).read_text())
    assert shipped_backbone_dir() == SHIPPED_DIR
    assert manifest["sha256"][WEIGHTS_FILE] == sha256(SHIPPED_DIR / WEIGHTS_FILE)
    assert (SHIPPED_DIR / WEIGHTS_FILE).stat().st_size < 10 * 2**20
    for key in ("command", "corpus", "steps", "batch", "learning_rate", "ema_decay", "train_seconds",
                "train_sessions", "heldout_loss"):
        assert manifest[key] is not None, key


@pytest.mark.parametrize("damage", ["flip a byte", "remove weights", "break manifest"])
def test_damaged_or_missing_shipped_weights_are_a_one_line_error(tmp_path, damage):
    copy = shutil.copytree(SHIPPED_DIR, tmp_path / SHIPPED_NAME)
    if damage == "flip a byte":
        data = bytearray((copy / WEIGHTS_FILE).read_bytes())
        data[-1] ^= 1
        (copy / WEIGHTS_FILE).write_bytes(bytes(data))
    elif damage == "remove weights":
        (copy / WEIGHTS_FILE).unlink()
    else:
        (copy / MANIFEST_FILE).write_text("{")
    with pytest.raises(PogdiffError, match="reinstall pogdiff, or train with --from-scratch") as error:
        shipped_backbone_dir(copy)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("damage", ["edited unet config", "no scheduler config", "no run file"])
def test_a_shipped_folder_that_does_not_load_says_reinstall(damage, tmp_path, monkeypatch):
    """The shipped manifest of this release hashes only the weights: other files are checked when they load."""
    from pogdiff.backbones import shipped
    from pogdiff.backbones.backbone import load_backbone

    copy = shutil.copytree(SHIPPED_DIR, tmp_path / SHIPPED_NAME)
    monkeypatch.setattr(shipped, "SHIPPED_DIR", copy)
    if damage == "edited unet config":
        config = json.loads((copy / "unet" / "config.json").read_text())
        (copy / "unet" / "config.json").write_text(json.dumps({**config, "norm_num_groups": 7}))
    elif damage == "no scheduler config":
        (copy / "scheduler" / "scheduler_config.json").unlink()
    else:
        (copy / "pogdiff_run.json").unlink()
    with pytest.raises(PogdiffError, match="the shipped pretrained backbone does not load") as error:
        load_backbone(copy, "cpu")
    assert "reinstall pogdiff" in str(error.value) and "train it again" not in str(error.value)
    assert "\n" not in str(error.value)


def test_the_shipped_name_stands_for_its_folder_unless_a_folder_has_that_name(tmp_path, monkeypatch):
    assert resolve_run_dir(SHIPPED_NAME) == SHIPPED_DIR
    monkeypatch.chdir(tmp_path)
    (tmp_path / SHIPPED_NAME).mkdir()
    assert resolve_run_dir(SHIPPED_NAME).resolve() == tmp_path / SHIPPED_NAME


def test_shipped_backbone_follows_a_background_colour_prompt():
    """Three few-step samples for each of the ten background colours, at the default guidance: the border
    pixels are nearest the asked colour at least three times as often as the 1-in-10 of chance (for a model
    that ignored the colour, 9 or more hits in 30 has a probability under 1%)."""
    backbone = load_backbone(SHIPPED_NAME, "cpu")
    colours = list(BACKGROUNDS)
    images = generate(backbone, [f"An image of a person in front of a {c} background." for c in colours],
                      num_images=3, num_inference_steps=15, progress=False)
    palette = torch.tensor(list(BACKGROUNDS.values()), dtype=torch.float32) / 127.5 - 1
    border = torch.cat([images[:, :, :3, :].flatten(2), images[:, :, :, :3].flatten(2)], dim=2).mean(2)
    nearest = torch.cdist(border, palette).argmin(1)
    asked = torch.arange(len(colours)).repeat_interleave(3)
    assert (nearest == asked).float().mean() >= 0.3


def test_train_starts_from_the_shipped_weights_unless_from_scratch(toy_data, tmp_path, cache_dir):
    shipped = PixelBackbone.from_run(SHIPPED_DIR)
    common = dict(method="vanilla", max_train_steps=1, train_batch_size=4, learning_rate=1e-12, caption_dropout=0.0,
                  cache_dir=str(cache_dir), progress=False)
    fine_tuned = train(TrainConfig(str(toy_data), str(tmp_path / "tuned"), **common))
    scratch = train(TrainConfig(str(toy_data), str(tmp_path / "scratch"), from_scratch=True, **common))
    assert read_run_info(fine_tuned)["pretrained"] == SHIPPED_NAME
    assert read_run_info(fine_tuned)["pretrained_sha256"] == sha256(SHIPPED_DIR / WEIGHTS_FILE)
    assert read_run_info(scratch)["pretrained"] is None and read_run_info(scratch)["pretrained_sha256"] is None
    reference = shipped.denoiser.state_dict()
    for run, same in ((fine_tuned, True), (scratch, False)):
        weights = load_backbone(run, "cpu").denoiser.state_dict()
        close = all(torch.allclose(weights[k], reference[k], atol=1e-6) for k in reference)
        assert close == same, run


def test_cli_refuses_from_scratch_with_pretrained_and_another_resolution(toy_data, tmp_path, capsys):
    assert main(["train", str(toy_data), "--output-dir", str(tmp_path / "a"), "--from-scratch",
                 "--pretrained", "x"]) == 2
    assert main(["train", str(toy_data), "--output-dir", str(tmp_path / "b"), "--resolution", "64"]) == 2
    err = capsys.readouterr().err
    assert "pass one of them" in err and "add --from-scratch" in err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_from_scratch_warns_that_the_default_unet_neighbour_space_is_random(toy_data, tmp_path):
    def warned(method: str, from_scratch: bool, **options) -> bool:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            check_options(TrainConfig(str(toy_data), str(tmp_path), method=method, from_scratch=from_scratch,
                                      method_options=options))
        return any(issubclass(w.category, PogdiffWarning) and "unet" in str(w.message) for w in caught)

    assert warned("pogdiff", True) and warned("pogdiff", True, use_psi_txt=False)
    assert not warned("pogdiff", False)  # the shipped weights' UNet space is the study's choice
    assert not warned("pogdiff", True, neighbour_features="efficientnet-lite0")
    assert not warned("vanilla", True)


def test_the_shipped_backbone_samples_and_evaluates_under_its_name(small_synth, tmp_path):
    from pogdiff.evaluation.evaluate import evaluate_runs

    assert main(["sample", SHIPPED_NAME, "--prompt", "An image of a person with ginger hair.", "--num-images", "2",
                 "--num-inference-steps", "3", "--out", str(tmp_path / "samples"), "--no-progress"]) == 0
    assert len(list((tmp_path / "samples").glob("*.png"))) == 2
    data, cache = small_synth
    metrics = evaluate_runs([SHIPPED_NAME], data, tmp_path / "eval", num_images=2, num_inference_steps=3,
                            cache_dir=cache, progress=False, report=False)
    assert list(metrics["methods"]) == [SHIPPED_NAME]
    assert np.isfinite(metrics["methods"][SHIPPED_NAME]["all"]["sim"])
