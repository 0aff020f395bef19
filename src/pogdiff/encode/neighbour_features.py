"""The feature spaces in which PoGDiff finds neighbours (Eq. 8), ``--neighbour-features``.

Eq. 8 needs "a pretrained image encoder"; which one decides who counts as a look-alike,
so it is an option of the method:

- ``efficientnet-lite0``: ImageNet features of EfficientNet-Lite0, global
  average pool, 1280-d (:class:`pogdiff.encode.encoders.ImageEncoder`; offline).
- ``faces``: dlib's 128-d face descriptor (:mod:`pogdiff.encode.face_descriptor`), for photos
  of real people, the paper's domain (``pip install 'pogdiff[faces]'``). An image where
  no face is found gets the zero vector: cosine 0 to every image, so its own neighbours
  are drawn uniformly (Eq. 8's fallback) with psi_img = 0, and it is nobody's likely
  neighbour; a warning counts them.
- ``unet`` (default, the sensitivity study's choice): the backbone's own denoiser, no extra
  weights. The feature of an image is the output of the UNet's mid block (the lowest
  resolution; for SD3 and Flux the middle transformer block's image tokens), averaged over its
  positions, for x = a_t x0 at the forward process's ``feature_time`` (no noise added; DDPM's
  t = 50, abar_50 = 0.99 under the small backbone's cosine schedule; a flow's sigma = 0.05 at shift 1)
  under the empty caption phi(""), with the weights the run starts from (the
  pretrained backbone, or the fresh initialisation of ``config.seed``, where it tells people
  apart poorly). x0 comes from the encoded dataset's cache: the pixels for the small backbone
  (64-d), the mean of the VAE posterior for the pipelines (1280-d for SD v1.5); only the blocks up to
  the feature block run, under the run's mixed precision. The features are keyed by the base weights and
  the precision, not by LoRA adapters (zero at their start) nor the seed: a full and a LoRA run
  of one checkpoint share them.
- anything else: a Hugging Face DINOv2, CLIP, SigLIP or ViT/DINO v1 model id or folder the user
  has, e.g. ``facebook/dinov2-base`` (:class:`pogdiff.encode.encoders.HuggingFaceImageFeatures`).

Never the evaluation's identity judge (its CNN, or its faces/features judge paired with
the same space): the method would then see the test. Every space here has a ``name``
that names its weights (it keys the cached features) and is called on images
(N, 3, H, W) in [-1, 1] at training resolution, returning (N, D) on the CPU; the built-in models load
on the first call and are kept for the next ones (the run's every batch), so a cached space costs nothing
(a Hugging Face model loads at once: its weights' fingerprint is part of its name). The networks run on
this process's device (:func:`pogdiff.encode.encoders.process_device`: its GPU when there is one); dlib
runs where its build does (the CPU for ``dlib-bin``).
"""

from __future__ import annotations

import contextlib
import warnings

import torch

from pogdiff.backbones.placement import precision_dtype
from pogdiff.encode.encoders import HuggingFaceImageFeatures, ImageEncoder, process_device, weights_fingerprint
from pogdiff.errors import PogdiffError, PogdiffWarning
from pogdiff.objectives.neighbours import BUILT_IN_SPACES, EFFICIENTNET_SPACE, FACE_SPACE, UNET_SPACE



def neighbour_feature_space(space: str, backbone=None, x0=None, precision: str = "no"):
    """The feature space ``space`` names (see the module docstring); ``unet`` needs the backbone, the
    table x0 is drawn from (:func:`pogdiff.encode.encoded_dataset.training_latents`) and the mixed precision."""
    if space == EFFICIENTNET_SPACE:
        return EfficientNetSpace()
    if space == FACE_SPACE:
        return FaceSpace()
    if space == UNET_SPACE:
        if backbone is None or x0 is None:
            raise PogdiffError("--neighbour-features unet needs the backbone being trained")
        return UNetSpace(backbone, x0, precision)
    try:
        return HuggingFaceSpace(space)
    except PogdiffError as error:
        raise PogdiffError(f"--neighbour-features {space}: not a built-in space ({', '.join(BUILT_IN_SPACES)}); "
                           f"{error}") from None


class EfficientNetSpace:
    """EfficientNet-Lite0 features, the network built on the first call (on this process's device) and kept."""

    name = ImageEncoder.name

    def __init__(self):
        self.encoder = None

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if self.encoder is None:
            self.encoder = ImageEncoder(process_device())
        return self.encoder(images)


class FaceSpace:
    """dlib face descriptors, the zero vector where no face is found (warned about); dlib's models load on the
    first call and are kept."""

    def __init__(self, detector: str = "hog", min_size: int = 128):
        self.detector, self.min_size = detector, min_size
        self.name = f"dlib-face-descriptor-v1-{detector}@{min_size}"
        self.descriptor = None

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if self.descriptor is None:
            from pogdiff.encode.face_descriptor import FaceDescriptor

            self.descriptor = FaceDescriptor(self.detector, self.min_size)
        descriptors, found = self.descriptor(images)
        if not found.all():
            warnings.warn(f"--neighbour-features faces: no face found in {int((~found).sum())} of {len(images)} "
                          "training images; they get neighbours drawn uniformly with psi_img = 0", PogdiffWarning,
                          stacklevel=2)
        return descriptors.float()


class _MidBlockReached(Exception):
    """Stops the denoiser's forward pass once its feature block has run: the later blocks are not needed."""


class UNetSpace:
    """Mean-pooled output of the backbone's feature block (a UNet's mid block, a transformer's middle block) at the
    process's ``feature_time``, empty caption, no noise.

    Computed from rows of the x0 cache (:meth:`embed_rows`); the name fingerprints the base weights
    (LoRA adapters left out) when the space is made, so make it before casting the backbone.
    """

    def __init__(self, backbone, x0, precision: str = "no"):
        self.backbone, self.x0 = backbone, x0
        self.process = backbone.forward_process()
        self.timestep = self.process.feature_time
        self.dtype = precision_dtype(precision)
        self.name = (f"unet-{weights_fingerprint(backbone.denoiser, base_only=True)}-mid-t{self.timestep}-{precision}"
                     f"-on-{backbone.image_cache_name}")  # x0 comes from the backbone's image encoder

    @torch.no_grad()
    def embed_rows(self, rows: range, batch_size: int = 64) -> torch.Tensor:
        backbone, denoiser = self.backbone, self.backbone.denoiser
        device = next(denoiser.parameters()).device
        scale = self.process.signal_scale(self.timestep)
        uncond = backbone.text_encoder.encode([""]).states.to(device)
        pooled = []

        def keep_and_stop(module, args, output):
            pooled.append(backbone.pool_features(output).cpu())
            raise _MidBlockReached

        hook = backbone.feature_block().register_forward_hook(keep_and_stop)
        autocast = torch.autocast(device.type, self.dtype, enabled=self.dtype != torch.float32)
        try:
            for start in range(rows.start, rows.stop, batch_size):
                x0 = backbone.x0_mean(self.x0[torch.arange(start, min(start + batch_size, rows.stop))].to(device))
                t = torch.full((len(x0),), self.timestep, device=device)
                with autocast, contextlib.suppress(_MidBlockReached):
                    backbone.denoise(denoiser, scale * x0, t, uncond.expand(len(x0), -1, -1))
        finally:
            hook.remove()
        return torch.cat(pooled)


class HuggingFaceSpace:
    """A Hugging Face image model on this process's device; its name carries a fingerprint of the weights,
    loaded to compute it."""

    def __init__(self, name_or_path: str):
        self.model = HuggingFaceImageFeatures(name_or_path, process_device())
        self.name = f"{self.model.name}@{weights_fingerprint(self.model.model)}"

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images)
