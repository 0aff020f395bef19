"""Backbones: what denoises, in which space, conditioned by which frozen text encoder.

- :class:`PixelBackbone`: the small model that trains on a CPU in minutes, a diffusers
  ``UNet2DConditionModel`` on 32x32 pixels cross-attending to MiniLM token states.
- :class:`StableDiffusionBackbone`: a diffusers text-to-image checkpoint (Stable Diffusion
  v1.5, the paper's backbone, or any with the same parts), trained in the latent space of
  its frozen VAE (Rombach et al., 2022), either fully or through LoRA adapters (Hu et al.,
  2022) with peft.

Both offer what training, sampling and evaluation use: ``unet``, ``scheduler`` (the
training noise schedule), ``text_encoder``, ``resolution``, ``cache_images`` (what the
encoded dataset stores per image, from uint8 pixels; ``image_cache_name`` names it and
``cache_dtype`` is how it is stored), ``x0_from_cache`` (x0 of Eq. 1 drawn from it) and
``x0_mean`` (its expectation, for neighbour features), ``decode``, ``to``, ``run_info`` and ``save``. A run folder holds ``pogdiff_run.json``
next to the weights in diffusers' own layout (:mod:`pogdiff.training.run_folder`).
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import DDPMScheduler, UNet2DConditionModel
from safetensors import SafetensorError

from pogdiff.data.image_files import pixels_to_float
from pogdiff.encode.encoders import TextEncoder, weights_fingerprint
from pogdiff.errors import PogdiffError, first_line
from pogdiff.backbones.pretrained import PIPELINE_FILE, check_pipeline_files
from pogdiff.training.ownership import is_marked
from pogdiff.training.run_folder import (DAMAGED_RUN_FIX, PIPELINE_BACKBONE, RUN_FILE, how_to_continue,
                                         read_run_info)
from pogdiff.backbones.shipped import WEIGHTS_FILE, loading_shipped, resolve_run_dir, sha256


class PixelBackbone:
    """Small pixel-space text-to-image diffusion model (no VAE: x0 is the image in [-1, 1])."""

    kind = "pixel"
    default_guidance_scale = 3.0
    default_learning_rate = 1e-3  # from scratch and fine-tuning the shipped weights alike (docs/choices.md: why)
    sample_batch_size = 64
    encode_batch_size = 256
    image_cache_name = "pixels"  # x0 is the image: its uint8 pixels are stored as they are
    cache_dtype = torch.uint8

    def __init__(self, unet: UNet2DConditionModel, scheduler: DDPMScheduler, text_encoder: TextEncoder,
                 pretrained: str | None = None, pretrained_sha256: str | None = None):
        self.unet = unet
        self.scheduler = scheduler
        self.text_encoder = text_encoder
        self.pretrained = pretrained  # the run its weights were loaded from; None for random weights
        self.pretrained_sha256 = pretrained_sha256  # of that run's weights file

    @classmethod
    def create(cls, resolution: int = 32, text_max_length: int = 24,
               block_out_channels: tuple[int, ...] = (32, 64, 64), layers_per_block: int = 1) -> "PixelBackbone":
        text_encoder = TextEncoder.minilm(text_max_length)
        unet = UNet2DConditionModel(
            sample_size=resolution, in_channels=3, out_channels=3,
            block_out_channels=tuple(block_out_channels), layers_per_block=layers_per_block,
            # No attention at full resolution: it costs ~80% more per step on a CPU.
            down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (len(block_out_channels) - 1),
            up_block_types=("CrossAttnUpBlock2D",) * (len(block_out_channels) - 1) + ("UpBlock2D",),
            cross_attention_dim=text_encoder.model.config.hidden_size, attention_head_dim=8, norm_num_groups=8,
        )
        scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2")
        return cls(unet, scheduler, text_encoder)

    @classmethod
    def from_run(cls, run_dir: str | Path, name: str | None = None) -> "PixelBackbone":
        """The weights of a run folder (any storage dtype, loaded as float32), ``name``-d in later runs'
        info beside their sha256."""
        run_dir = Path(run_dir)
        text_max_length = read_run_info(run_dir)["text_max_length"]
        unet = UNet2DConditionModel.from_pretrained(run_dir / "unet").float()
        scheduler = DDPMScheduler.from_pretrained(run_dir / "scheduler")
        return cls(unet, scheduler, TextEncoder.minilm(text_max_length), name or str(run_dir),
                   sha256(run_dir / WEIGHTS_FILE))

    @property
    def resolution(self) -> int:
        return self.unet.config.sample_size

    def cache_images(self, pixels: torch.Tensor) -> torch.Tensor:
        return pixels

    def x0_from_cache(self, cached: torch.Tensor) -> torch.Tensor:
        return pixels_to_float(cached)

    x0_mean = x0_from_cache

    def decode(self, x0: torch.Tensor) -> torch.Tensor:
        return x0.clamp(-1, 1)

    def to(self, device, dtype: torch.dtype = torch.float32) -> "PixelBackbone":
        move_frozen_to(device, dtype, self.unet, self.text_encoder.model)
        return self

    def run_info(self) -> dict:
        return {"backbone": self.kind, "pretrained": self.pretrained, "pretrained_sha256": self.pretrained_sha256,
                "text_encoder": self.text_encoder.name,
                "text_max_length": self.text_encoder.max_length, "resolution": self.resolution}

    def save(self, run_dir: Path, unet: UNet2DConditionModel) -> None:
        unet.save_pretrained(run_dir / "unet")
        self.scheduler.save_pretrained(run_dir / "scheduler")


class StableDiffusionBackbone:
    """A diffusers Stable Diffusion checkpoint: UNet, VAE, CLIP text encoder + tokenizer, scheduler.

    Training follows diffusers' ``examples/text_to_image`` scripts: the noise schedule is a
    ``DDPMScheduler`` with the checkpoint's scheduler config, x0 is the VAE latent times its
    scaling factor, the VAE and text encoder are frozen. With ``lora_rank`` only LoRA
    adapters are trained (by default on the attention projections with alpha = rank and a
    Gaussian init, as ``train_text_to_image_lora.py``), and the run saves them alone in
    diffusers' LoRA format, their alpha and target modules in the file's metadata.
    """

    kind = PIPELINE_BACKBONE
    default_guidance_scale = 7.5
    sample_batch_size = 8
    encode_batch_size = 16
    # Latents in float16: a relative round-off of 2^-11, below the bf16/fp16 rounding that mixed-precision
    # training applies to the UNet's input anyway (docs/scale.md has the measurement).
    cache_dtype = torch.float16
    lora_target_modules = ("to_k", "to_q", "to_v", "to_out.0")  # as train_text_to_image_lora.py

    def __init__(self, unet: UNet2DConditionModel, vae, scheduler: DDPMScheduler, text_encoder: TextEncoder,
                 pretrained: str, lora_rank: int | None = None):
        self.unet = unet
        self.vae = vae.eval().requires_grad_(False)
        self.scheduler = scheduler
        self.text_encoder = text_encoder
        self.pretrained = pretrained
        self.lora_rank = lora_rank

    @classmethod
    def from_pretrained(cls, path: str | Path, lora_rank: int | None = None, lora_alpha: float | None = None,
                        lora_target_modules: tuple[str, ...] | None = None) -> "StableDiffusionBackbone":
        """Load a pipeline folder or hub id; with ``lora_rank``, add fresh LoRA adapters to train
        (``lora_alpha`` defaults to the rank, ``lora_target_modules`` to :attr:`lora_target_modules`)."""
        from diffusers import AutoencoderKL

        if Path(path).is_dir():
            check_pipeline_folder(Path(path))
            path = str(Path(path).resolve())
        try:
            unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet")
            vae = AutoencoderKL.from_pretrained(path, subfolder="vae")
            scheduler = DDPMScheduler.from_pretrained(path, subfolder="scheduler")
            text_encoder = TextEncoder.from_pretrained(path)
        except (OSError, ValueError) as error:
            raise PogdiffError(f"{path}: cannot load a Stable Diffusion checkpoint ({first_line(error)}); "
                               "pass a folder written by StableDiffusionPipeline.save_pretrained or a hub id "
                               "already in the local Hugging Face cache") from None
        backbone = cls(unet, vae, scheduler, text_encoder, str(path))
        if lora_rank:
            backbone.add_lora(lora_rank, lora_alpha, lora_target_modules)
        return backbone

    @classmethod
    def from_run(cls, run_dir: str | Path) -> "StableDiffusionBackbone":
        """A pogdiff run (full weights, or LoRA adapters on its base checkpoint) or a plain pipeline folder."""
        info = read_run_info(Path(run_dir))
        if not info.get("lora_rank"):
            return cls.from_pretrained(run_dir)
        backbone = cls.from_pretrained(info["pretrained"])
        backbone.unet.load_lora_adapter(str(run_dir), prefix="unet", use_safetensors=True)  # alpha: from metadata
        backbone.lora_rank = info["lora_rank"]
        if info.get("prediction_type"):  # the base checkpoint's scheduler, trained for another prediction type
            backbone.scheduler.register_to_config(prediction_type=info["prediction_type"])
        return backbone

    def add_lora(self, rank: int, alpha: float | None = None, target_modules: tuple[str, ...] | None = None) -> None:
        """Fresh adapters to train on ``target_modules`` (names or name suffixes of the UNet's modules)."""
        from peft import LoraConfig

        targets = list(target_modules or self.lora_target_modules)
        names = [name for name, _ in self.unet.named_modules()]
        for target in targets:  # peft drops a target matching no module silently
            if not any(name == target or name.endswith(f".{target}") for name in names):
                raise PogdiffError(f"--lora-target-modules {target}: no module of the UNet is called so; pass names "
                                   f"of the UNet's modules, e.g. {' '.join(self.lora_target_modules)}")
        self.unet.requires_grad_(False)
        try:
            self.unet.add_adapter(LoraConfig(r=rank, lora_alpha=alpha or rank, init_lora_weights="gaussian",
                                             target_modules=targets))
        except ValueError as error:
            raise PogdiffError(f"--lora-target-modules {' '.join(targets)}: {first_line(error)}; pass names of the "
                               f"UNet's modules, e.g. {' '.join(self.lora_target_modules)}") from None
        self.lora_rank = rank

    @property
    def default_learning_rate(self) -> float:
        # Sec. 4.1 fine-tunes the whole UNet at 1e-5; diffusers' LoRA script defaults to 1e-4.
        return 1e-4 if self.lora_rank else 1e-5

    @property
    def resolution(self) -> int:
        return self.unet.config.sample_size * 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def image_cache_name(self) -> str:
        return f"vae-{weights_fingerprint(self.vae.encoder)}-{weights_fingerprint(self.vae.quant_conv)}"

    @torch.no_grad()
    def cache_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """The VAE posterior q(z | x) of uint8 images: its mean and log-variance, (B, 2C, h, w), float32."""
        batch = pixels_to_float(pixels).to(self.vae.device, self.vae.dtype)
        return self.vae.encode(batch).latent_dist.parameters.float().cpu()

    def x0_from_cache(self, cached: torch.Tensor) -> torch.Tensor:
        """A fresh z ~ q(z | x) at every step, scaled, exactly as when the VAE encodes each batch."""
        from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

        return DiagonalGaussianDistribution(cached.float()).sample() * self.vae.config.scaling_factor

    def x0_mean(self, cached: torch.Tensor) -> torch.Tensor:
        """E[z | x], scaled: the posterior mean (the first half of the cached moments)."""
        return cached.float().chunk(2, dim=1)[0] * self.vae.config.scaling_factor

    @torch.no_grad()
    def decode(self, x0: torch.Tensor) -> torch.Tensor:
        latents = x0.to(self.vae.dtype) / self.vae.config.scaling_factor
        return self.vae.decode(latents).sample.clamp(-1, 1)

    def to(self, device, dtype: torch.dtype = torch.float32) -> "StableDiffusionBackbone":
        move_frozen_to(device, dtype, self.unet, self.vae, self.text_encoder.model)
        return self

    def run_info(self) -> dict:
        info = {"backbone": self.kind, "pretrained": self.pretrained, "lora_rank": self.lora_rank,
                "text_encoder": self.text_encoder.name, "resolution": self.resolution,
                "prediction_type": self.scheduler.config.prediction_type}
        if self.lora_rank:
            adapter = self.unet.peft_config["default"]
            info.update(lora_alpha=adapter.lora_alpha, lora_target_modules=sorted(adapter.target_modules))
        return info

    def save(self, run_dir: Path, unet: UNet2DConditionModel) -> None:
        """A folder ``StableDiffusionPipeline.from_pretrained`` loads (LoRA: ``load_lora_weights`` on the base)."""
        from diffusers import StableDiffusionPipeline

        if self.lora_rank:
            from diffusers.utils import convert_state_dict_to_diffusers
            from peft.utils import get_peft_model_state_dict

            layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
            StableDiffusionPipeline.save_lora_weights(
                run_dir, unet_lora_layers=layers, safe_serialization=True,
                unet_lora_adapter_metadata=unet.peft_config["default"].to_dict())  # alpha, target modules
            return
        # The other parts are reloaded from the checkpoint, not saved from memory: they stay
        # bit-identical to it even when training held them in half precision.
        pipeline = StableDiffusionPipeline.from_pretrained(self.pretrained, unet=unet)
        pipeline.scheduler.register_to_config(prediction_type=self.scheduler.config.prediction_type)
        pipeline.save_pretrained(run_dir, safe_serialization=True)


def precision_dtype(precision: str | None) -> torch.dtype:
    """The dtype of accelerate's mixed precision ``no``, ``fp16`` or ``bf16``."""
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(precision, torch.float32)


def move_frozen_to(device, dtype: torch.dtype, *modules: torch.nn.Module) -> None:
    """Move modules to ``device``; parameters not being trained go to ``dtype`` (half precision
    under mixed precision), trained ones stay float32, as diffusers' training scripts keep them."""
    for module in modules:
        module.to(device)
        for param in module.parameters():
            if not param.requires_grad:
                param.data = param.data.to(dtype)


def check_pipeline_folder(folder: Path) -> None:
    """A complete (see :func:`check_pipeline_files`), Stable Diffusion-like pipeline folder:
    one UNet, VAE, CLIP text encoder, tokenizer, scheduler."""
    components = check_pipeline_files(folder)
    index = folder / PIPELINE_FILE
    missing = [c for c in ("unet", "vae", "text_encoder", "tokenizer", "scheduler") if c not in components]
    if missing or "text_encoder_2" in components:
        what = f"it has no {', '.join(missing)}" if missing else "it has a second text encoder (SDXL-like)"
        raise PogdiffError(f"{index}: a {components.get('_class_name', 'pipeline')} is not supported ({what}); "
                           "pogdiff trains Stable Diffusion 1.x/2.x-like checkpoints")


BACKBONES = {PixelBackbone.kind: PixelBackbone, StableDiffusionBackbone.kind: StableDiffusionBackbone}


def load_backbone(run_dir: str | Path, device: str | torch.device | None = None):
    """The backbone of a finished run or of any Stable Diffusion pipeline folder, ready to sample:
    on the GPU in half precision where there is one, else on the CPU in float32. ``run_dir`` may be
    the shipped backbone's name."""
    run_dir = resolve_run_dir(run_dir)
    if is_marked(run_dir) and not (Path(run_dir) / RUN_FILE).is_file():  # else a full SD run loads as a pipeline
        raise PogdiffError(f"{run_dir}: an unfinished run (no {RUN_FILE}); {how_to_continue(Path(run_dir))}")
    with loading_shipped(run_dir):
        info = read_run_info(run_dir)
        if info["backbone"] not in BACKBONES:
            raise PogdiffError(f"{run_dir}: unknown backbone {info['backbone']!r} in {RUN_FILE}")
        try:
            backbone = BACKBONES[info["backbone"]].from_run(run_dir)
        except KeyError as error:
            raise PogdiffError(f"{Path(run_dir) / RUN_FILE}: no {error.args[0]}; {DAMAGED_RUN_FIX}") from None
        except (OSError, SafetensorError, ValueError) as error:
            raise PogdiffError(f"{run_dir}: cannot load the run's weights ({first_line(error)}); "
                               f"{DAMAGED_RUN_FIX}") from None
    backbone.unet.eval().requires_grad_(False)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    return backbone.to(device, torch.float16 if device.type == "cuda" else torch.float32)
