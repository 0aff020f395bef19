"""The per-identity metrics against cases with known answers, and the pluggable feature spaces."""

import warnings
from pathlib import Path

import pytest
import torch
from conftest import write_toy_dataset

from pogdiff.data.dataset import load_dataset
from pogdiff.data.synth import load_identities
from pogdiff.encode.encoders import ImageEncoder
from pogdiff.errors import PogdiffError, PogdiffWarning
from pogdiff.evaluation import metrics as m
from pogdiff.evaluation.evaluate import Evaluation, average, identity_summary
from pogdiff.evaluation.features import HuggingFaceImageFeatures, InceptionFeatures, load_feature_extractor
from pogdiff.evaluation.identity import CentroidJudge, SynthIdentityJudge, _renders
from pogdiff.data.image_files import read_images


@pytest.fixture(scope="module")
def encoder():
    return ImageEncoder()


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """Training set Anna 12, Bruno 6, Chen 2; held-out Anna 4, Bruno 4 (none of Chen), other noise draws."""
    root = write_toy_dataset(tmp_path_factory.mktemp("toy") / "data")
    write_toy_dataset(root / "heldout", counts=(4, 4), seed=1)
    return root


def by_identity(images: torch.Tensor, identity_names: list[str]) -> dict[str, torch.Tensor]:
    return {name: images[[i for i, n in enumerate(identity_names) if n == name]]
            for name in dict.fromkeys(identity_names)}


def as_batches(images: dict[str, torch.Tensor]) -> dict:
    """Images per identity as :meth:`Evaluation.score` reads them: a function yielding batches."""
    return {name: (lambda x=x: [x]) for name, x in images.items()}


@pytest.fixture(scope="module")
def toy_images(toy):
    train, heldout = load_dataset(toy), load_dataset(toy / "heldout")
    return (by_identity(read_images(train, 32), train.identity_names),
            by_identity(read_images(heldout, 32), heldout.identity_names))


def test_frechet_distance_of_a_set_with_itself_is_zero_and_a_shift_adds_its_square():
    torch.manual_seed(0)
    x = torch.rand(6, 1280, dtype=torch.float64)  # 6 samples in 1280-d: singular covariance
    assert m.frechet_distance(x, x) == pytest.approx(0.0, abs=1e-9)
    shift = torch.zeros(1280, dtype=torch.float64)
    shift[:100] = 0.3
    assert m.frechet_distance(x + shift, x) == pytest.approx(100 * 0.3 ** 2, rel=1e-9)
    distances = [m.frechet_distance(x + s * shift, x) for s in (0.5, 1.0, 2.0)]
    assert distances == sorted(distances) and distances[0] > 0


def test_frechet_distance_in_the_sample_span_equals_torchmetrics_in_full_dimension():
    from torchmetrics.image.fid import FrechetInceptionDistance

    torch.manual_seed(1)
    x, y = torch.randn(5, 64, dtype=torch.float64), torch.randn(9, 64, dtype=torch.float64) * 1.5 + 0.2
    full = FrechetInceptionDistance(feature=m._GivenFeatures(64))
    full.update(y, real=True)
    full.update(x, real=False)
    assert m.frechet_distance(x, y) == pytest.approx(full.compute().item(), rel=1e-6)


def test_frechet_distance_needs_two_images_on_each_side():
    x = torch.rand(5, 16)
    assert m.frechet_distance(x[:1], x) is None and m.frechet_distance(x, x[:1]) is None
    assert m.frechet_distance(x[:2], x[2:4]) is not None


def test_frechet_distance_on_image_features_is_smaller_within_an_identity(encoder, toy_images):
    train, heldout = toy_images
    anna = encoder(train["Anna"])
    same = m.frechet_distance(encoder(heldout["Anna"]), anna)
    other = m.frechet_distance(encoder(heldout["Bruno"]), anna)
    assert same < 0.5 * other


def test_similarity_is_the_mean_cosine_over_all_pairs():
    e = torch.eye(3)
    assert m.mean_similarity(e[:1], e[:1] * 5) == pytest.approx(1.0)
    assert m.mean_similarity(e[:1], e[1:]) == pytest.approx(0.0)
    assert m.mean_similarity(e[:2], torch.stack([e[0], e[0] + e[1]])) == pytest.approx((1 + 2 ** -0.5 + 0 + 2 ** -0.5) / 4)
    assert m.mean_similarity(e[:1], e[:0]) is None


def test_similarity_to_others_never_compares_an_image_with_itself():
    e = torch.eye(3)
    # pairs of [e0, e0, e1]: (0, 1) cosine 1, (0, 2) and (1, 2) cosine 0, each counted both ways
    assert m.mean_similarity_to_others(torch.stack([e[0], e[0], e[1]])) == pytest.approx(1 / 3)
    assert m.mean_similarity_to_others(e) == pytest.approx(0.0)
    assert m.mean_similarity_to_others(e[:1]) is None


def test_recall_counts_covered_training_images_eq_17():
    e = torch.eye(4)
    training = e[:2]
    # the paper's example: every sample resembles x1, none x2 -> 1/2
    assert m.recall(torch.stack([e[0], e[0] + 0.1 * e[2]]), training, 0.9) == 0.5
    assert m.recall(torch.stack([e[0], e[1]]), training, 0.9) == 1.0
    assert m.recall(e[2:], training, 0.9) == 0.0
    assert m.recall(e[:0], training) == 0.0
    sample = (e[0] + 0.5 * e[2]).unsqueeze(0)  # cosine 0.894 to x1
    assert m.recall(sample, training, 0.89) == 0.5 and m.recall(sample, training, 0.9) == 0.0


def test_recall_of_copies_of_the_training_images_is_one(encoder, toy_images):
    train, _ = toy_images
    features = encoder(train["Bruno"])
    assert m.recall(features.flip(0), features, 0.9) == 1.0
    assert m.recall(features[:2], features, 0.9999) < 1.0  # two copies cover only themselves at a strict threshold


def test_identity_accuracy_counts_no_prediction_as_wrong():
    assert m.identity_accuracy(["Anna", "Anna", None, "Bruno"], "Anna") == 0.5
    assert m.mean_over([1.0, None, 0.0]) == 0.5 and m.mean_over([None]) is None


def test_centroid_judge_recognises_held_out_real_images(encoder, toy_images):
    train, heldout = toy_images
    judge = CentroidJudge(encoder, {name: encoder(images) for name, images in train.items()})
    for name, images in heldout.items():
        assert m.identity_accuracy(judge.predict(images), name) >= 0.75


def test_evaluation_scores_each_identity_against_its_references(encoder, toy, toy_images):
    evaluation = Evaluation(toy, encoder, None, "features", "hog", 5, toy / "cache", progress=False)
    # "generated" images: the held-out ones for Anna and Bruno, copies of the training images for Chen
    generated = {"Anna": load_heldout(toy, "Anna"), "Bruno": load_heldout(toy, "Bruno"),
                 "Chen": toy_images[0]["Chen"].clone()}
    per_identity, described = evaluation.score(as_batches(generated), 32, recall_threshold=0.9)
    assert set(per_identity) == {"Anna", "Bruno", "Chen"} and described["Chen"].features["sim"].shape == (2, 1280)
    assert per_identity["Chen"]["sim"] is None  # no held-out image of Chen
    assert per_identity["Chen"]["recall"] == 1.0
    assert per_identity["Anna"]["fd_reference_images"] == 16 and per_identity["Anna"]["sim_reference_images"] == 4
    assert per_identity["Chen"]["fd_reference_images"] == 2
    for name in ("Anna", "Bruno"):
        assert per_identity[name]["id_acc"] >= 0.75
        assert per_identity[name]["sim"] > 0.9
    assert average(per_identity, ["Anna", "Bruno", "Chen"])["sim"] == pytest.approx(
        (per_identity["Anna"]["sim"] + per_identity["Bruno"]["sim"]) / 2)
    assert evaluation.references()["sim"].startswith("held-out")


def test_evaluation_skips_fd_of_an_identity_with_one_image(encoder, tmp_path):
    root = write_toy_dataset(tmp_path / "data", counts=(6, 1))
    with pytest.warns(PogdiffWarning, match="single image"):
        evaluation = Evaluation(root, encoder, None, "features", "hog", 5, tmp_path / "cache", progress=False)
    dataset = evaluation.dataset
    real = by_identity(read_images(dataset, 32), dataset.identity_names)
    per_identity, _ = evaluation.score(as_batches({"Anna": real["Anna"], "Bruno": real["Bruno"].repeat(3, 1, 1, 1)}),
                                       32, recall_threshold=0.9)
    assert per_identity["Bruno"]["fd"] is None and per_identity["Anna"]["fd"] == pytest.approx(0.0, abs=1e-6)
    assert evaluation.references()["sim"].startswith("training")  # no DATA/heldout: training images stand in
    assert per_identity["Bruno"]["sim"] == pytest.approx(1.0)


def test_synth_judge_needs_a_synth_dataset(encoder, toy):
    with pytest.raises(PogdiffError, match="synth.json: not found"):
        Evaluation(toy, encoder, None, "synth", "hog", 5, toy / "cache", progress=False)


def test_synth_judge_recognises_unseen_noisy_renders_of_every_identity(small_synth):
    data, cache = small_synth
    judge = SynthIdentityJudge.for_dataset(data / "synth.json", cache, progress=False)
    assert min(judge.heldout_accuracy.values()) >= 0.9  # the 2-image look-alike of the majority person too
    images, labels = _renders(load_identities(data), 40, seed=7, size=32, progress=False)
    noisy = (images + 0.3 * torch.randn(images.shape, generator=torch.Generator().manual_seed(0))).clamp(-1, 1)
    predicted = judge.predict(noisy)
    for label, name in enumerate(judge.names):
        assert m.identity_accuracy([p for p, y in zip(predicted, labels) if y == label], name) >= 0.9
    reloaded = SynthIdentityJudge.for_dataset(data / "synth.json", cache, progress=False)
    assert reloaded.name == judge.name and reloaded.predict(noisy) == predicted


def test_a_synth_judge_that_cannot_tell_the_identities_apart_is_warned_about(small_synth, tmp_path):
    with pytest.warns(PogdiffWarning, match="id_acc is unreliable"):
        judge = SynthIdentityJudge.for_dataset(small_synth[0] / "synth.json", tmp_path, steps=2, progress=False)
    assert min(judge.heldout_accuracy.values()) < 0.9


def test_the_synth_judge_trains_longer_for_more_identities(small_synth, tmp_path, monkeypatch):
    import pogdiff.evaluation.identity as identity

    steps = []

    def record(identities, size, renders, step_count, *rest):
        steps.append(step_count)
        return identity._SmallCNN(len(identities)), torch.ones(len(identities))

    monkeypatch.setattr(identity, "_train_judge", record)
    monkeypatch.setattr(SynthIdentityJudge, "MIN_STEPS", 5)
    monkeypatch.setattr(SynthIdentityJudge, "STEPS_PER_IDENTITY", 30)
    SynthIdentityJudge.for_dataset(small_synth[0] / "synth.json", tmp_path / "a", progress=False)  # 2 identities
    monkeypatch.setattr(SynthIdentityJudge, "STEPS_PER_IDENTITY", 1)
    SynthIdentityJudge.for_dataset(small_synth[0] / "synth.json", tmp_path / "b", progress=False)
    assert steps == [2 * 30, 5]  # 30 steps per identity, then the floor


def load_heldout(root: Path, name: str) -> torch.Tensor:
    heldout = load_dataset(root / "heldout")
    return by_identity(read_images(heldout, 32), heldout.identity_names)[name]


def test_hugging_face_image_model_from_a_folder(tmp_path):
    from transformers import BitImageProcessor, Dinov2Config, Dinov2Model

    folder = tmp_path / "tiny-dinov2"
    torch.manual_seed(0)
    Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                             image_size=56, patch_size=14)).save_pretrained(folder)
    BitImageProcessor(size={"shortest_edge": 64}, crop_size={"height": 56, "width": 56}).save_pretrained(folder)
    extractor = load_feature_extractor(str(folder))
    assert isinstance(extractor, HuggingFaceImageFeatures) and extractor.name == f"hf:{folder}"
    images = torch.rand(5, 3, 32, 32) * 2 - 1
    features = extractor(images)
    assert features.shape == (5, 32)
    assert torch.allclose(extractor(images[:2]), features[:2], atol=1e-5)


def test_unknown_hugging_face_model_is_a_one_line_error(tmp_path):
    with pytest.raises(PogdiffError, match="cannot load it as a Hugging Face image model"):
        load_feature_extractor(str(tmp_path / "no-such-model"))


def test_inception_needs_its_weights_file_and_torch_fidelity(tmp_path, monkeypatch):
    with pytest.raises(PogdiffError, match="--inception-weights"):
        InceptionFeatures(None)
    with pytest.raises(PogdiffError, match="not found"):
        InceptionFeatures(tmp_path / "missing.pth")
    weights = tmp_path / "pt_inception.pth"
    weights.write_bytes(b"")
    monkeypatch.setattr("torchmetrics.image.fid._TORCH_FIDELITY_AVAILABLE", False)  # as where it is not installed
    with pytest.raises(PogdiffError, match="torch-fidelity"):
        InceptionFeatures(weights)


def test_real_held_out_images_score_better_than_a_look_alike_on_every_metric(small_synth):
    data, cache = small_synth
    evaluation = Evaluation(data, "efficientnet-lite0", None, "auto", "hog", 5, cache, progress=False)
    rows = {label: identity_summary(row["per_identity"], evaluation)
            for label, row in evaluation.calibration(32, recall_threshold=0.9).items()}
    perfect, wrong = rows["real (held-out)"], rows["real (look-alike)"]
    for split in ("all", "few"):  # few: Jihoon, 2 training photos, a look-alike of Renate
        assert perfect[split]["fd"] < wrong[split]["fd"]
        for key in ("sim", "recall", "id_acc"):
            assert perfect[split][key] > wrong[split][key], (split, key)


def test_a_pogdiff_run_whose_neighbours_share_the_judges_space_is_warned_about():
    from types import SimpleNamespace

    from pogdiff.evaluation.evaluate import warn_if_judge_shares_neighbour_space
    from pogdiff.objectives.losses import options_in_effect

    def run(method: str, space: str | None = None, recorded: bool = True) -> dict:
        options = {"neighbour_features": space} if space else {}
        info = {"config": {"method": method, "method_options": options}}
        return {**info, "loss_options": options_in_effect(method, options)} if recorded else info

    by_features = SimpleNamespace(judge_kind="features", sim_features="efficientnet-lite0")
    with pytest.warns(PogdiffWarning, match="found its neighbours in efficientnet-lite0, the space the identity judge"):
        warn_if_judge_shares_neighbour_space("pogdiff", run("pogdiff", "efficientnet-lite0"), by_features)
    with pytest.warns(PogdiffWarning, match="found its neighbours in efficientnet-lite0"):  # the default back then
        warn_if_judge_shares_neighbour_space("pogdiff", run("pogdiff", recorded=False), by_features)
    with pytest.warns(PogdiffWarning, match="found its neighbours in faces"):
        warn_if_judge_shares_neighbour_space("pogdiff", run("pogdiff", "faces"),
                                             SimpleNamespace(judge_kind="faces", sim_features="efficientnet-lite0"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warn_if_judge_shares_neighbour_space("vanilla", run("vanilla"), by_features)
        warn_if_judge_shares_neighbour_space("pogdiff", run("pogdiff", "unet"), by_features)
        warn_if_judge_shares_neighbour_space("pogdiff", run("pogdiff", "efficientnet-lite0"),
                                             SimpleNamespace(judge_kind="synth", sim_features="efficientnet-lite0"))
