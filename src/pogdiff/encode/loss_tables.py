"""What the losses look up by training row (:class:`pogdiff.objectives.losses.LossTables`), built once from the encoded dataset.

The last step of encoding, so that a loss is a pure callable (after NVlabs/edm ``training/loss.py``):
PoGDiff's neighbour table (Eq. 8) comes from the image features of every row
(:class:`~pogdiff.encode.encoded_dataset.ImageFeatureSpaces`: encoders, caches, one search over
all rows; ``pogdiff encode`` has built and cached it, here it is read back), the
identity counts and identity-balanced probabilities the baselines draw with from the
identity codes, the text density (Eq. 10) from the encoded captions. PoGDiff's loss
weighs with psi (Eqs. 9, 11, 12, :mod:`pogdiff.objectives.psi`) computed from these tensors and its options.
"""

from __future__ import annotations

from pogdiff.data.dataset import ImageTextDataset
from pogdiff.encode.encoded_dataset import EncodedDataset
from pogdiff.objectives.losses import LossTables
from pogdiff.objectives.neighbours import NeighbourRequest, check_neighbour_count, similarity_by_identity
from pogdiff.training.row_sampler import identity_balanced_weights


def check_neighbours_fit(dataset: ImageTextDataset, neighbours: NeighbourRequest | None) -> None:
    """Refuse a table of Eq. 8 the dataset cannot fill (k other images of each image), before any work."""
    if neighbours is not None:
        check_neighbour_count(neighbours.k, len(dataset), str(dataset.root))


def loss_tables(encoded: EncodedDataset, neighbours: NeighbourRequest | None = None) -> LossTables:
    """The per-row tensors of every loss, on the device of ``encoded``'s tables, with Eq. 8's table in the space
    and for the k of ``neighbours`` (:func:`pogdiff.objectives.losses.neighbour_request`; None: no table)."""
    device = encoded.identity.device
    table = None if neighbours is None else encoded.image_features.neighbours(*neighbours).to(device)
    return LossTables(caption_states=encoded.caption_states, identity=encoded.identity,
                      identity_counts=encoded.identity_counts(), has_identities=encoded.has_identities,
                      identity_balanced=identity_balanced_weights(encoded.identity).to(device), elbo=encoded.elbo,
                      neighbours=table)


def neighbour_space(encoded: EncodedDataset, neighbours: NeighbourRequest) -> dict:
    """The feature space of Eq. 8: its ``name`` (naming its weights), ``k`` and the cosine similarities of
    same-identity and other-identity image pairs in it (what ``psi_summary.json`` reports,
    :func:`pogdiff.training.run_folder.save_psi`)."""
    features = encoded.image_features
    return {"name": features.name(neighbours.space), "k": neighbours.k,
            "similarity": similarity_by_identity(features.features(neighbours.space), encoded.identity.cpu())}
