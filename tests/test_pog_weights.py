"""Eq. 8 (neighbour sampling weights), Eq. 9 (image similarity), Eqs. 10-11 (inverse text density)."""

import math

import torch

from pogdiff.objectives.neighbours import NeighbourTable, find_neighbours
from pogdiff.objectives.psi import image_similarity_weight, inverse_text_density_weight, pog_weight
from pogdiff.encode.text_density import fit_text_density


def test_eq8_weights_are_similarities_normalised_per_row():
    table = NeighbourTable(torch.tensor([[1, 2, 3]]), torch.tensor([[0.6, 0.3, 0.1]]))
    assert torch.allclose(table.sampling_weights(), torch.tensor([[0.6, 0.3, 0.1]]))
    table = NeighbourTable(torch.tensor([[1, 2]]), torch.tensor([[0.3, 0.1]]))
    assert torch.allclose(table.sampling_weights(), torch.tensor([[0.75, 0.25]]))


def test_eq8_negative_similarities_count_as_zero_and_all_negative_is_uniform():
    table = NeighbourTable(torch.tensor([[1, 2], [0, 2]]), torch.tensor([[0.5, -0.2], [-0.1, -0.3]]))
    assert torch.allclose(table.sampling_weights(), torch.tensor([[1.0, 0.0], [0.5, 0.5]]))


def test_eq8_draw_frequencies_follow_weights():
    table = NeighbourTable(torch.tensor([[1, 2, 3]]), torch.tensor([[0.6, 0.3, 0.1]]))
    torch.manual_seed(0)
    drawn, sims = table.draw(torch.zeros(20000, dtype=torch.long))
    freq = torch.bincount(drawn, minlength=4)[1:].float() / 20000
    assert torch.allclose(freq, torch.tensor([0.6, 0.3, 0.1]), atol=0.015)
    assert torch.allclose(sims[drawn == 2], torch.tensor(0.3))


def test_find_neighbours_excludes_self_and_sorts_by_cosine():
    features = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.7, 0.7]])
    table = find_neighbours(features, k=2)
    assert (table.index != torch.arange(4)[:, None]).all()
    assert table.index[0].tolist() == [1, 3]
    assert (table.similarity[:, 0] >= table.similarity[:, 1]).all()
    assert math.isclose(table.similarity[0, 0].item(), 0.9 / math.hypot(0.9, 0.1), rel_tol=1e-5)
    assert find_neighbours(features, k=10).k == 3  # k larger than the dataset is capped at N - 1


def test_eq9_paper_footnote_example():
    s = torch.tensor([0.4, 0.4])
    same = torch.tensor([True, False])
    assert torch.allclose(image_similarity_weight(s, same, a1=1.0, a2=1.0), torch.tensor([0.4, 0.16]))


def test_eq9_negative_similarity_gives_zero_and_exponents_apply():
    psi = image_similarity_weight(torch.tensor([-0.3, 0.5, 0.5]), torch.tensor([True, True, False]), a1=2.0, a2=1.0)
    assert torch.allclose(psi, torch.tensor([0.0, 0.25, 0.125]))


def test_eq11_rare_caption_gets_larger_weight_and_median_is_one_over_a3():
    elbo = torch.tensor([-10.0, -3.0, -2.0, -1.0, 0.5])
    psi = inverse_text_density_weight(elbo, a3=1.0, max_ratio=1e9)
    assert (psi.diff() < 0).all()  # higher density -> smaller weight
    assert math.isclose(psi[2].item(), 1.0)
    assert torch.allclose(inverse_text_density_weight(elbo, a3=2.0, max_ratio=1e9), psi / 2)
    assert math.isclose(psi[0].item() / psi[1].item(), math.exp(7.0), rel_tol=1e-4)  # 1 / exp(ELBO) ratios


def test_eq11_is_finite_and_clipped_for_huge_elbo_gaps():
    psi = inverse_text_density_weight(torch.tensor([-1e6, 0.0, 1e6]), a3=1.0, max_ratio=10.0)
    assert torch.isfinite(psi).all()
    assert torch.allclose(psi, torch.tensor([10.0, 1.0, 0.1]))


def test_eq12_is_the_product():
    assert torch.allclose(pog_weight(torch.tensor([0.4, 0.16]), torch.tensor([2.0, 3.0])), torch.tensor([0.8, 0.48]))


def test_text_density_vae_ranks_rare_embeddings_below_frequent_ones_on_384d():
    g = torch.Generator().manual_seed(0)
    head = torch.randn(1, 384, generator=g)
    tail = torch.randn(1, 384, generator=g)
    data = torch.cat([head + 0.1 * torch.randn(60, 384, generator=g),   # 60 captions of a majority identity
                      tail + 0.1 * torch.randn(2, 384, generator=g)])  # 2 captions of a minority identity
    data = torch.nn.functional.normalize(data, dim=1)
    elbo = fit_text_density(data, steps=600, seed=0)
    assert torch.isfinite(elbo).all()
    assert elbo[60:].max() < elbo[:60].median()
    psi = inverse_text_density_weight(elbo, a3=1.0, max_ratio=10.0)
    assert torch.isfinite(psi).all()
    assert psi[60:].min() > psi[:60].median()
