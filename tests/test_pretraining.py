"""The pretraining corpus and `pogdiff pretrain`: balanced, name-free, disjoint from the presets; resumable; released."""

import json

import pytest
import torch

from pogdiff.cli import main
from pogdiff.data.dataset import load_dataset
from pogdiff.data.pretraining_corpus import EXCLUDED_PRESET_SEEDS, draw_people, write_pretraining_corpus
from pogdiff.data.synth import MIN_TRAIT_DIFFERENCES, NAMES, PRESETS, make_identities, trait_differences


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_pretraining_corpus(tmp_path_factory.mktemp("corpus") / "corpus", people=12, images_per_person=3,
                                    heldout_people=3)


def test_corpus_is_balanced_and_has_a_heldout_split_of_other_people(corpus):
    train, heldout = load_dataset(corpus), load_dataset(corpus / "heldout")
    assert len(train) == 36 and set(train.identity_counts().values()) == {3}
    assert len(heldout) == 6 and not set(train.identity_names) & set(heldout.identity_names)


def test_corpus_captions_name_no_one_and_describe_what_is_drawn(corpus):
    captions = load_dataset(corpus).captions
    words = {word.strip(",.") for caption in captions for word in caption.split()}
    assert not words & set(NAMES)
    traits = json.loads((corpus / "corpus.json").read_text())["traits"]
    rows = [json.loads(line) for line in (corpus / "metadata.jsonl").read_text().splitlines()]
    for row in rows:
        person = traits[int(row["identity"].split("-")[1])]
        if "hair" in row["text"] and "bald" not in row["text"]:
            assert f"{person['hair_colour']} hair" in row["text"]
        if "shirt" in row["text"]:
            assert f"{person['shirt']} shirt" in row["text"]
    assert len(set(captions)) > 0.9 * len(captions)  # varied phrasing, not one template


def test_corpus_people_differ_from_every_preset_identity():
    people = draw_people(50, seed=3)
    for preset in PRESETS:
        for seed in range(EXCLUDED_PRESET_SEEDS):
            for identity in make_identities(preset, seed):
                assert all(trait_differences(p, identity.traits) >= MIN_TRAIT_DIFFERENCES for p in people)


def test_same_arguments_write_the_same_corpus(tmp_path):
    a = write_pretraining_corpus(tmp_path / "a", people=3, images_per_person=2, heldout_people=1)
    b = write_pretraining_corpus(tmp_path / "b", people=3, images_per_person=2, heldout_people=1)
    assert (a / "metadata.jsonl").read_bytes() == (b / "metadata.jsonl").read_bytes()
    assert (a / "images" / "0.png").read_bytes() == (b / "images" / "0.png").read_bytes()


def test_pretrain_runs_resumes_and_releases_verified_weights(corpus, tmp_path, capsys):
    from pogdiff.backbones.backbone import load_backbone
    from pogdiff.errors import PogdiffError
    from pogdiff.training.pretraining import MANIFEST_FILE, previous_release_dir, sha256, write_release
    from pogdiff.backbones.shipped import WEIGHTS_FILE, shipped_backbone_dir

    run, release = tmp_path / "run", tmp_path / "release"
    common = [str(corpus), "--output-dir", str(run), "--cache-dir", str(tmp_path / "cache"), "--no-progress",
              "--train-batch-size", "8", "--checkpointing-steps", "2", "--lr-warmup-steps", "1"]
    assert main(["pretrain", *common, "--max-train-steps", "2"]) == 0
    assert main(["pretrain", *common, "--max-train-steps", "4", "--overwrite"]) == 0
    info = json.loads((run / "pogdiff_run.json").read_text())
    assert info["steps"] == 4 and info["config"]["use_ema"] and info["config"]["method"] == "vanilla"
    assert info["config"]["text_max_length"] == 56
    assert main(["pretrain", *common, "--max-train-steps", "6", "--resume-from-checkpoint", "latest",
                 "--release-dir", str(release)]) == 0
    info = json.loads((run / "pogdiff_run.json").read_text())
    assert info["steps"] == 6 and len(info["train_sessions"]) == 2
    manifest = json.loads((release / MANIFEST_FILE).read_text())
    assert manifest["sha256"][WEIGHTS_FILE] == sha256(release / WEIGHTS_FILE)
    assert manifest["steps"] == 6 and manifest["images_seen"] == 48 and manifest["heldout_loss"] > 0
    assert manifest["corpus"]["people"] == 12
    # every file of the release is in the manifest: an edited config is caught as well as edited weights
    assert set(manifest["sha256"]) == {WEIGHTS_FILE, "unet/config.json", "scheduler/scheduler_config.json",
                                       "pogdiff_run.json"}
    first = (release / WEIGHTS_FILE).read_bytes()
    write_release(run, release)  # a release replacing an earlier one keeps it beside itself
    assert (previous_release_dir(release) / WEIGHTS_FILE).read_bytes() == first
    config = release / "unet" / "config.json"
    config.write_text(config.read_text().replace('"norm_num_groups": 8', '"norm_num_groups": 4'))
    with pytest.raises(PogdiffError, match="unet/config.json: a file of the shipped pretrained backbone is damaged"):
        shipped_backbone_dir(release)
    released, trained = load_backbone(release, "cpu"), load_backbone(run, "cpu")
    for (name, a), b in zip(released.denoiser.state_dict().items(), trained.denoiser.state_dict().values()):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a, b, atol=2e-3, rtol=1e-3, msg=name)  # fp16 storage


def test_a_release_never_replaces_a_folder_of_the_users(corpus, tmp_path, capsys):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "manifest.json").write_text('{"name": "my own project"}')
    code = main(["pretrain", str(corpus), "--output-dir", str(tmp_path / "run"), "--release-dir", str(mine),
                 "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and "--release-dir exists and is not an earlier release" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "run").exists() and [p.name for p in mine.iterdir()] == ["manifest.json"]


def test_from_shipped_continues_the_shipped_weights_and_its_manifest_says_so(corpus, tmp_path):
    from pogdiff.backbones.backbone import load_backbone
    from pogdiff.backbones.pixel import PixelBackbone
    from pogdiff.training.pretraining import MANIFEST_FILE
    from pogdiff.backbones.shipped import SHIPPED_DIR, SHIPPED_NAME

    run, release = tmp_path / "run", tmp_path / "release"
    assert main(["pretrain", str(corpus), "--output-dir", str(run), "--from-shipped", "--max-train-steps", "1",
                 "--train-batch-size", "8", "--learning-rate", "1e-6", "--no-progress",
                 "--release-dir", str(release)]) == 0
    shipped = load_backbone(SHIPPED_NAME, "cpu").denoiser.state_dict()
    continued = load_backbone(run, "cpu").denoiser.state_dict()
    scratch = PixelBackbone.create(32, 56).denoiser.state_dict()
    name = "conv_in.weight"
    assert (continued[name] - shipped[name]).abs().max() < 1e-3 < (scratch[name] - shipped[name]).abs().max()
    manifest = json.loads((release / MANIFEST_FILE).read_text())
    assert manifest["continued_from"] == json.loads((SHIPPED_DIR / MANIFEST_FILE).read_text())
