"""Faces: a nearest-identity judge on dlib's 128-d face descriptor (:mod:`pogdiff.encode.face_descriptor`).

A stand-in for the paper's human judges on datasets of people (Sec. 4, App. B): each
generated image is assigned to the identity whose centroid of real-image descriptors is
nearest. An image where no face is found gets no identity, which the accuracy counts as wrong.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from pogdiff.errors import PogdiffError
from pogdiff.encode.face_descriptor import FaceDescriptor


class FaceJudge:
    """Nearest identity (Euclidean, as dlib's descriptor is trained for) among centroids of real-image descriptors."""

    def __init__(self, real_images: Iterable[tuple[str, torch.Tensor]], descriptor: FaceDescriptor | None = None):
        """``real_images``: (identity, images) pairs, an identity's images in one or several batches."""
        self.descriptor = descriptor or FaceDescriptor()
        self.name = (f"nearest identity centroid of dlib 128-d face descriptors ({self.descriptor.detector} "
                     f"detector; no face found = wrong)")
        found_by_identity: dict[str, list[torch.Tensor]] = {}
        for name, images in real_images:
            descriptors, found = self.descriptor(images)
            found_by_identity.setdefault(name, []).append(descriptors[found])
        self.names, centroids = [], []
        self.faceless = []  # identities with no face found in any real image: never predicted
        for name, descriptors in found_by_identity.items():
            descriptors = torch.cat(descriptors)
            if len(descriptors):
                self.names.append(name)
                centroids.append(descriptors.mean(0))
            else:
                self.faceless.append(name)
        if not self.names:
            raise PogdiffError("the faces judge found no face in any real image; use --identity-judge features")
        self.centroids = torch.stack(centroids)

    def predict(self, images: torch.Tensor) -> list[str | None]:
        """Identity name per image, None where no face was found."""
        descriptors, found = self.descriptor(images)
        nearest = torch.cdist(descriptors, self.centroids).argmin(1).tolist()
        return [self.names[j] if ok else None for j, ok in zip(nearest, found.tolist())]
