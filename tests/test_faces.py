"""The dlib faces judge on 64x64 faces of the DigiFace-trained DCGAN that ships in ``gan-face-generate``.

An "identity" is one GAN latent; its images are that latent plus small noise, which
changes pose, light and expression but keeps the person (checked by eye when written).
"""

import json
from pathlib import Path

import pytest
import torch

from pogdiff.evaluation import metrics as m
from pogdiff.evaluation.evaluate import Evaluation
from pogdiff.errors import PogdiffWarning
from pogdiff.evaluation.faces import FaceJudge
from pogdiff.encode.face_descriptor import FaceDescriptor
from pogdiff.images import to_pil
from pogdiff.encode.neighbour_features import neighbour_feature_space
from pogdiff.objectives.neighbours import similarity_by_identity

pytest.importorskip("dlib")
NAMES = ("Lukas", "Emma", "Noah")


@pytest.fixture(scope="module")
def faces():
    """8 images of each of 3 GAN identities, (8, 3, 64, 64) in [-1, 1] per name."""
    gan = pytest.importorskip("gan_face_generate")
    from gan_face_generate.models import Generator

    generator = Generator(0, 3, 100, 64)
    weights = torch.load(Path(gan.__file__).parent / "weights.tar", map_location="cpu")
    generator.load_state_dict(weights["netG_state_dict"])
    rng = torch.Generator().manual_seed(0)
    latents = torch.randn(len(NAMES), 100, 1, 1, generator=rng).repeat_interleave(8, 0)
    with torch.no_grad():
        images = generator.eval()(latents + 0.3 * torch.randn(latents.shape, generator=rng))
    return dict(zip(NAMES, images.split(8)))


@pytest.fixture(scope="module")
def descriptor():
    return FaceDescriptor()


@pytest.fixture(scope="module")
def judge(faces, descriptor):
    """Centroids of the first 4 images of each identity; the last 4 are held out."""
    return FaceJudge([(name, images[:4]) for name, images in faces.items()], descriptor)


def test_faces_judge_recognises_held_out_images_of_each_identity(faces, judge):
    assert judge.names == list(NAMES) and judge.centroids.shape == (3, 128)
    predicted = {name: judge.predict(images[4:]) for name, images in faces.items()}
    found = [(p, name) for name, ps in predicted.items() for p in ps if p is not None]
    assert len(found) >= 8  # of 12; the detector misses some (see the upscaling test)
    assert all(p == name for p, name in found)


def test_no_face_found_gets_no_identity_and_counts_as_wrong(faces, descriptor, judge):
    blank = torch.zeros(2, 3, 64, 64)
    noise = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    _, found = descriptor(torch.cat([blank, noise]))
    assert not found.any()
    predicted = judge.predict(torch.cat([faces["Emma"][4:6], blank]))
    assert predicted[2:] == [None, None]
    assert m.identity_accuracy(predicted, "Emma") == sum(p == "Emma" for p in predicted[:2]) / 4


def test_small_faces_are_upscaled_for_the_detector(faces, descriptor):
    images = torch.cat([images[:4] for images in faces.values()])
    _, found = descriptor(images)
    _, found_native = FaceDescriptor(min_size=64)(images)
    assert found.sum() >= 0.75 * len(images) and found_native.sum() < found.sum()


def test_evaluation_with_the_faces_judge_reports_images_without_a_face(faces, tmp_path):
    root = tmp_path / "data"
    (root / "images").mkdir(parents=True)
    rows = []
    for name, images in faces.items():
        for i, image in enumerate(images[:4]):
            to_pil(image).save(root / "images" / f"{name}_{i}.png")
            rows.append({"file_name": f"images/{name}_{i}.png", "text": f"An image of {name}.", "identity": name})
    (root / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    evaluation = Evaluation(root, lambda x: x.flatten(1), None, "faces", "hog", 5, tmp_path / "cache",
                            progress=False)
    generated = {name: torch.cat([images[4:6], torch.zeros(1, 3, 64, 64)]) for name, images in faces.items()}
    per_identity, _ = evaluation.score({name: (lambda x=x: [x]) for name, x in generated.items()}, 64,
                                       recall_threshold=0.9)
    assert evaluation.real(64).judge.name.startswith("nearest identity centroid of dlib")
    for name in NAMES:
        assert per_identity[name]["no_face"] == 1
        assert 0.3 <= per_identity[name]["id_acc"] <= 2 / 3


def test_faces_neighbour_space_tells_people_apart_and_zeroes_images_without_a_face(faces):
    space = neighbour_feature_space("faces")
    images = torch.cat([images[:4] for images in faces.values()] + [torch.zeros(1, 3, 64, 64)])
    with pytest.warns(PogdiffWarning, match="no face found in [1-9]+ of 13 training images"):
        features = space(images)
    assert features.shape == (13, 128) and space.name == "dlib-face-descriptor-v1-hog@128"
    assert (features[-1] == 0).all()
    found = features.abs().sum(1) > 0
    identity = torch.arange(3).repeat_interleave(4)[found[:12]]
    split = similarity_by_identity(features[:12][found[:12]], identity)
    assert split["same_identity"].median() > split["other_identity"].median()
