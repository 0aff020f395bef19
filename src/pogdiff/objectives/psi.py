"""The weight psi of PoGDiff's second term (Sec. 3.2, Eqs. 9, 11, 12).

psi = psi_img * psi_txt: how much of the neighbour's prediction to borrow, larger when
the neighbour image looks alike (and more so when it shows the same identity), and
larger for captions in sparse regions of the text space. The summaries at the end are
what a run's ``psi_summary.json`` holds (:func:`pogdiff.training.run_folder.save_psi`).
"""

from __future__ import annotations

import math

import torch

from pogdiff.options import check_values


def image_similarity_weight(similarity: torch.Tensor, same_identity: torch.Tensor,
                            a1: float, a2: float) -> torch.Tensor:
    """Eq. 9: psi_img = max(0, s) ** (a1 + a2 * 1[I(x) != I(x')]).

    The paper's footnote: s = 0.4, a1 = a2 = 1 gives 0.4 for the same person, 0.16 otherwise.
    No defaults here: PoGDiff's are :class:`pogdiff.objectives.losses.PoGDiffLoss`'s arguments. The exponents must be
    >= 0 (a negative one turns s = 0 into an infinite weight): refused by the options' rules.
    """
    check_values({"a1": a1, "a2": a2})
    exponent = a1 + a2 * (~same_identity.bool()).to(similarity.dtype)
    return similarity.clamp(min=0).pow(exponent)


def inverse_text_density_weight(elbo: torch.Tensor, a3: float, max_ratio: float) -> torch.Tensor:
    """Eq. 11: psi_txt = 1 / (a3 * exp(ELBO(y))), computed in log space so it cannot overflow.

    exp(ELBO) of a high-dimensional embedding is far outside float range, so densities
    are taken relative to the dataset's median density (a constant the paper's a3 would
    absorb) and clipped to [1/max_ratio, max_ratio] before a3 is applied: the median
    caption weighs 1/a3, rare captions up to max_ratio/a3. Eq. 11 needs a3 > 0 (it divides by it) and a
    ratio >= 1 (a smaller one inverts the clip): refused by the options' rules.
    """
    check_values({"a3": a3, "psi_txt_max_ratio": max_ratio})
    log_weight = -(elbo - elbo.median())
    bound = math.log(max_ratio)
    return log_weight.clamp(-bound, bound).exp() / a3


def pog_weight(psi_img: torch.Tensor, psi_txt: torch.Tensor) -> torch.Tensor:
    """Eq. 12 (via Eq. 7): psi = psi_img * psi_txt."""
    return psi_img * psi_txt


QUANTILES = {"min": 0.0, "q05": 0.05, "q25": 0.25, "median": 0.5, "q75": 0.75, "q95": 0.95, "max": 1.0}


def quantiles(values: torch.Tensor) -> dict[str, float]:
    """Mean and quantiles of ``values``, rounded for people to read."""
    values = values.double().flatten()
    found = values.quantile(torch.tensor(list(QUANTILES.values()), dtype=torch.float64)).tolist()
    return {"mean": round(values.mean().item(), 4), **{k: round(v, 4) for k, v in zip(QUANTILES, found)}}


def summarise(weights: dict[str, torch.Tensor], is_few: torch.Tensor) -> dict:
    """Mean and quantiles of each per-row value (psi_txt, psi_img, psi, the share of y' of another
    identity) for majority and minority ("Few") rows, for people to read."""
    summary = {}
    for group, mask in (("majority", ~is_few), ("minority", is_few)):
        if mask.any():
            summary[group] = {"rows": int(mask.sum()), **{name: quantiles(values[mask]) for name, values in weights.items()}}
    return summary


def summarise_similarity(similarity: dict[str, torch.Tensor], bins: int = 40) -> dict:
    """Quantiles and a histogram on [-1, 1] of each group of cosine similarities (same vs other identity),
    and ``separation``: the probability that a same-identity pair is more similar than an other-identity
    pair (ties count half; the area under the ROC curve of similarity as a same-identity test; 0.5 is chance)."""
    same, other = similarity["same_identity"].double(), similarity["other_identity"].double().sort().values
    separation = None
    if len(same) and len(other):
        below = torch.searchsorted(other, same, right=False).double()
        ties = torch.searchsorted(other, same, right=True).double() - below
        separation = round(((below + ties / 2) / len(other)).mean().item(), 4)
    summary = {"separation": separation, "histogram_edges": torch.linspace(-1, 1, bins + 1).tolist()}
    for group, values in similarity.items():
        summary[group] = {"pairs": len(values), **(quantiles(values) if len(values) else {}),
                          "histogram": torch.histc(values.float(), bins, -1, 1).long().tolist()}
    return summary
