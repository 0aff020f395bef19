"""Feature spaces for the metrics: every extractor maps images (N, 3, H, W) in [-1, 1] to (N, D).

The paper measures FID in Inception features and similarity and recall in DINOv2
features (App. B, E). Neither network's weights ship with a Python package, so the
default is the offline EfficientNet-Lite0 space (also one of the neighbour spaces of
Eq. 8); the others load when the user has their weights:

- ``"efficientnet-lite0"`` (default): :class:`pogdiff.encode.encoders.ImageEncoder`, 1280-d.
- ``"inception"``: the standard FID network (2048-d pool features of the 2015 TF
  Inception v3) through torchmetrics' ``NoTrainInceptionV3``, which needs
  ``torch-fidelity`` (extra ``pogdiff[inception]``; it imports torchvision) and the
  weights file ``pt_inception-2015-12-05-6726825d.pth`` given by ``inception_weights``.
- anything else: a Hugging Face DINOv2, CLIP, SigLIP or ViT/DINO v1 model id or folder (e.g.
  ``facebook/dinov2-base``), :class:`pogdiff.encode.encoders.HuggingFaceImageFeatures`.

Each extractor has a ``name``, written next to every number measured in its space. Any
object with a ``name`` and ``__call__(images) -> (N, D)`` can be passed instead of a name.

An evaluation measures fd in one space and sim and recall in another (the paper: Inception,
then DINOv2): :class:`FeatureSpaces` holds both, one extractor when both name the same space.
"""

from __future__ import annotations

from pathlib import Path

import torch

from pogdiff.encode.encoders import HuggingFaceImageFeatures, ImageEncoder, full_precision, process_device
from pogdiff.errors import PogdiffError
from pogdiff.images import to_uint8

DEFAULT_FEATURES = "efficientnet-lite0"
ROLES = ("fd", "sim")  # fd's space; sim's, which recall and the features judge share


def load_feature_extractor(spec=DEFAULT_FEATURES, inception_weights: str | Path | None = None,
                           device: str | torch.device | None = None):
    """The extractor named by ``spec`` (see the module docstring), its network on ``device`` (default: this
    process's, :func:`pogdiff.encode.encoders.process_device`: the GPU when there is one); an extractor object
    is returned as is."""
    if not isinstance(spec, str):
        return spec
    device = process_device() if device is None else device
    if spec == DEFAULT_FEATURES:
        return ImageEncoder(device)
    if spec == "inception":
        return InceptionFeatures(inception_weights, device)
    return HuggingFaceImageFeatures(spec, device)


class InceptionFeatures:
    """The FID Inception v3 (2048-d), from a local weights file, via torchmetrics + torch-fidelity."""

    def __init__(self, weights: str | Path | None, device: str | torch.device = "cpu"):
        if weights is None:
            raise PogdiffError("Inception features need the FID Inception weights: pass --inception-weights "
                               "FILE (pt_inception-2015-12-05-6726825d.pth from the torch-fidelity release)")
        weights = Path(weights)
        if not weights.is_file():
            raise PogdiffError(f"{weights}: Inception weights file not found; pass the path of "
                               "pt_inception-2015-12-05-6726825d.pth")
        try:
            from torchmetrics.image.fid import NoTrainInceptionV3

            self.model = NoTrainInceptionV3(name="inception-v3-compat", features_list=["2048"],
                                            feature_extractor_weights_path=str(weights))
        except (ImportError, ModuleNotFoundError) as error:
            raise PogdiffError(f"Inception features need torch-fidelity ({error}): pip install 'pogdiff[inception]' "
                               "(it needs a torchvision that matches your torch), or use the default "
                               f"--features {DEFAULT_FEATURES} or a Hugging Face model") from None
        self.model.eval().to(device)
        self.name = f"inception-v3-fid ({weights.name})"

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
        device = next(self.model.parameters()).device
        with full_precision():
            return torch.cat([self.model(to_uint8(chunk).to(device)).float().cpu()
                              for chunk in images.split(batch_size)])


class FeatureSpaces:
    """The extractors of fd (``fd``) and of sim and recall (``sim``), built once on ``device`` (default: this
    process's, the GPU when there is one): one object when both name the same space, so its features are
    computed once.

    ``__call__`` maps images to ``{"fd": (N, D_fd), "sim": (N, D_sim)}``.
    """

    def __init__(self, fd=DEFAULT_FEATURES, sim=DEFAULT_FEATURES, inception_weights: str | Path | None = None,
                 device: str | torch.device | None = None):
        self.specs = {"fd": fd, "sim": sim}
        device = process_device() if device is None else device
        self.fd = load_feature_extractor(fd, inception_weights, device)
        self.sim = self.fd if sim == fd else load_feature_extractor(sim, inception_weights, device)

    @property
    def names(self) -> dict[str, str]:
        """Each role's space, as metrics.json records it (``feature_spaces``)."""
        return {"fd": self.fd.name, "sim": self.sim.name}

    def __call__(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        fd = self.fd(images)
        return {"fd": fd, "sim": fd if self.sim is self.fd else self.sim(images)}
