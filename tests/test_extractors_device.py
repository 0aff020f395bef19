"""The frozen extractors, the kNN and the text density at scale (issue #36): each network built once per run on
this process's device, the search on every core (or the GPU), the density's Monte-Carlo draws fixed; the numbers
the same as before on the CPU."""

import os

import pytest
import torch
import torch.nn.functional as F

import pogdiff.encode.neighbour_features as neighbour_features
import pogdiff.evaluation.features as evaluation_features
from pogdiff.encode import text_density
from pogdiff.encode.encoders import ImageEncoder, process_device
from pogdiff.encode.neighbour_features import EfficientNetSpace, FaceSpace
from pogdiff.objectives import neighbours
from pogdiff.objectives.neighbours import find_neighbours


@pytest.fixture
def counted_image_encoders(monkeypatch):
    """ImageEncoder, counting its constructions and the device each was given, where the spaces look it up."""
    built = []

    class Counted(ImageEncoder):
        def __init__(self, device="cpu"):
            built.append(torch.device(device))
            super().__init__(device)

    monkeypatch.setattr(neighbour_features, "ImageEncoder", Counted)
    monkeypatch.setattr(evaluation_features, "ImageEncoder", Counted)
    return built


def test_efficientnet_space_builds_its_network_once_on_the_process_device(counted_image_encoders):
    images = torch.rand(5, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    before = ImageEncoder()(images)  # what every call computed before: a fresh network on the CPU
    space = EfficientNetSpace()
    assert space.name == ImageEncoder.name and counted_image_encoders == []  # a cached space costs nothing
    batches = [space(images[:2]), space(images[2:]), space(images)]  # the run's shards, one batch after another
    assert counted_image_encoders == [process_device()]
    assert torch.equal(torch.cat(batches[:2]), before) and torch.equal(batches[2], before)


def test_evaluation_builds_one_extractor_on_the_process_device(counted_image_encoders):
    spaces = evaluation_features.FeatureSpaces()
    assert counted_image_encoders == [process_device()] and spaces.sim is spaces.fd
    images = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    assert torch.equal(spaces(images)["fd"], ImageEncoder()(images))
    assert counted_image_encoders == [process_device()]


def test_face_space_loads_dlib_once(monkeypatch):
    import pogdiff.encode.face_descriptor as face_descriptor

    built = []

    class FakeDescriptor:
        def __init__(self, detector, min_size):
            built.append((detector, min_size))

        def __call__(self, images):
            return torch.ones(len(images), 128, dtype=torch.float64), torch.ones(len(images), dtype=torch.bool)

    monkeypatch.setattr(face_descriptor, "FaceDescriptor", FakeDescriptor)
    space = FaceSpace("cnn", 96)
    assert built == []
    for _ in range(3):
        assert torch.equal(space(torch.zeros(2, 3, 8, 8)), torch.ones(2, 128))
    assert built == [("cnn", 96)]


def test_hugging_face_space_loads_on_the_process_device(monkeypatch):
    given = []

    class FakeModel:
        name = "hf:fake"

        def __init__(self, name_or_path, device="cpu"):
            given.append(device)
            self.model = torch.nn.Linear(2, 2)

    monkeypatch.setattr(neighbour_features, "HuggingFaceImageFeatures", FakeModel)
    neighbour_features.neighbour_feature_space("some/model")
    assert given == [process_device()]


def _neighbours_before(features: torch.Tensor, k: int):
    """The torch search as it was: blocked products on the CPU, on whatever threads torch had."""
    normed = F.normalize(features.float(), dim=1).contiguous()
    n, block = len(normed), max(1, neighbours._BLOCK_ELEMENTS // len(normed))
    index, similarity = [], []
    for start in range(0, n, block):
        sims = normed[start:start + block] @ normed.T
        rows = torch.arange(start, min(start + block, n))
        sims[rows - start, rows] = -float("inf")
        top = sims.topk(k, dim=1)
        index.append(top.indices)
        similarity.append(top.values)
    return torch.cat(index), torch.cat(similarity)


@pytest.fixture
def one_thread():
    """What ``accelerate launch`` leaves a process: OMP_NUM_THREADS=1."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("backend", ["torch", "faiss"])
def test_knn_uses_every_core_then_restores_the_threads_and_finds_the_same_table(backend, one_thread, monkeypatch):
    features = torch.randn(3000, 48, generator=torch.Generator().manual_seed(0))
    features[7] = features[3]  # a duplicate: each is the other's nearest
    monkeypatch.setattr(neighbours, "_BLOCK_ELEMENTS", 3000 * 700)  # several blocks, the last one short
    monkeypatch.setattr(neighbours, "_QUERY_CHUNK", 700)
    monkeypatch.setattr(neighbours, "cpu_thread_count", lambda: max(2, len(os.sched_getaffinity(0))))
    search, threads_seen = getattr(neighbours, f"_search_{backend}"), []
    faiss = pytest.importorskip("faiss") if backend == "faiss" else None
    faiss_threads = faiss.omp_get_max_threads() if faiss else None

    def watched(normed, k):
        threads_seen.append((torch.get_num_threads(), faiss.omp_get_max_threads() if faiss else None))
        return search(normed, k)

    with monkeypatch.context() as patch:  # before: the search on the one thread it was given
        patch.setattr(neighbours, "cpu_thread_count", lambda: 1)
        single = find_neighbours(features, 10, backend)
    monkeypatch.setattr(neighbours, f"_search_{backend}", watched)
    table = find_neighbours(features, 10, backend)
    threads = neighbours.cpu_thread_count()
    assert threads_seen == [(threads, threads if faiss else None)] and torch.get_num_threads() == 1
    assert torch.equal(table.index, single.index)
    if faiss:  # faiss's products round with the number of threads, as they did with OMP_NUM_THREADS
        assert faiss.omp_get_max_threads() == faiss_threads
        torch.testing.assert_close(table.similarity, single.similarity, rtol=0, atol=2e-6)
    else:  # torch's do not: the same bits on one thread as on all, and as before
        assert torch.equal(table.similarity, single.similarity)
        index, similarity = _neighbours_before(features, 10)
        assert torch.equal(table.index, index) and torch.equal(table.similarity, similarity)
    assert (table.index != torch.arange(len(features))[:, None]).all()
    assert table.index[3, 0] == 7 and table.index[7, 0] == 3


def test_knn_searches_on_a_gpu_when_there_is_one(monkeypatch):
    features = torch.randn(10, 4)
    assert neighbours.search_device(features) == torch.device("cpu")  # none here
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    assert neighbours.search_device(features) == torch.device("cuda", 1)
    faiss = pytest.importorskip("faiss")
    monkeypatch.setattr(faiss, "get_num_gpus", lambda: 0)
    assert neighbours._auto_backend(features) == "torch"  # not faiss-cpu beside the GPU
    monkeypatch.setattr(faiss, "get_num_gpus", lambda: 1)
    assert neighbours._auto_backend(features) == "faiss"


@pytest.mark.parametrize("captions", [40, 3000])
def test_text_density_takes_the_same_number_of_draws_at_every_size(captions, monkeypatch):
    drawn = []
    evaluate = text_density.text_elbo

    def counted(vae, embeddings, noise):
        drawn.append(noise.shape)
        return evaluate(vae, embeddings, noise)

    monkeypatch.setattr(text_density, "text_elbo", counted)
    y = torch.randn(captions, 16, generator=torch.Generator().manual_seed(0))
    elbo = text_density.fit_text_density(y, steps=5)
    assert drawn == [(text_density.EVAL_SAMPLES, 8)] and elbo.shape == (captions,) and elbo.device.type == "cpu"


def test_text_density_draws_in_groups_as_it_did_one_at_a_time(monkeypatch):
    y = torch.randn(700, 24, generator=torch.Generator().manual_seed(0))
    vae, generator = text_density.fit_text_vae(y, steps=20)
    assert vae.mean.device == process_device()
    noise = torch.randn(300, 8, generator=generator)
    one_at_a_time = text_density.text_elbo(vae, y, noise)  # the CPU's way: 512 rows x 1 draw per pass
    with torch.no_grad():
        by_hand = torch.stack([vae.elbo(y, noise=eps[None]) for eps in noise]).mean(0)
    torch.testing.assert_close(one_at_a_time, by_hand, rtol=1e-6, atol=1e-4)
    monkeypatch.setitem(text_density._EVAL_PASS, "cpu", 1 << 17)  # an accelerator's: many draws per pass
    monkeypatch.setitem(text_density._EVAL_ROWS, "cpu", 8192)
    torch.testing.assert_close(text_density.text_elbo(vae, y, noise), one_at_a_time, rtol=1e-6, atol=1e-4)


def test_text_density_leaves_the_gpus_generators_alone(monkeypatch):
    reseeded = []
    monkeypatch.setattr(torch.cuda, "manual_seed_all", lambda seed: reseeded.append(seed))
    y = torch.randn(30, 8)
    state = torch.get_rng_state()
    text_density.fit_text_density(y, steps=3, eval_samples=4, seed=5)
    assert reseeded == [] and torch.equal(torch.get_rng_state(), state)
