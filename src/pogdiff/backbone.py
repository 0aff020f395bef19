"""Backbones: what denoises, in which space, conditioned by which frozen text encoder.

:class:`PixelBackbone` is the small one that trains on a CPU in minutes: a diffusers
``UNet2DConditionModel`` on 32x32 pixels, cross-attending to MiniLM token states, with
a DDPM noise schedule. A run folder stores it the diffusers way (``unet/``,
``scheduler/``) plus ``pogdiff_run.json`` naming the text encoder.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import DDPMScheduler, UNet2DConditionModel

from pogdiff.encoders import TextEncoder
from pogdiff.errors import PogdiffError

RUN_FILE = "pogdiff_run.json"


class PixelBackbone:
    """Small pixel-space text-to-image diffusion model (no VAE: x0 is the image in [-1, 1])."""

    kind = "pixel"
    default_guidance_scale = 3.0

    def __init__(self, unet: UNet2DConditionModel, scheduler: DDPMScheduler, text_encoder: TextEncoder):
        self.unet = unet
        self.scheduler = scheduler
        self.text_encoder = text_encoder

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
    def from_run(cls, run_dir: str | Path) -> "PixelBackbone":
        run_dir = Path(run_dir)
        info = read_run_info(run_dir)
        unet = UNet2DConditionModel.from_pretrained(run_dir / "unet")
        scheduler = DDPMScheduler.from_pretrained(run_dir / "scheduler")
        return cls(unet, scheduler, TextEncoder.minilm(info["text_max_length"]))

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        return images

    def decode(self, x0: torch.Tensor) -> torch.Tensor:
        return x0.clamp(-1, 1)

    def run_info(self) -> dict:
        return {"backbone": self.kind, "text_encoder": self.text_encoder.name,
                "text_max_length": self.text_encoder.max_length, "resolution": self.unet.config.sample_size}

    def save(self, run_dir: Path, unet: UNet2DConditionModel) -> None:
        unet.save_pretrained(run_dir / "unet")
        self.scheduler.save_pretrained(run_dir / "scheduler")


def read_run_info(run_dir: Path) -> dict:
    path = Path(run_dir) / RUN_FILE
    if not path.is_file():
        raise PogdiffError(f"{run_dir}: not a pogdiff run folder (no {RUN_FILE}); pass the --output-dir of a "
                           "finished `pogdiff train`")
    return json.loads(path.read_text())


def load_backbone(run_dir: str | Path):
    """The backbone of a finished run, ready to sample."""
    info = read_run_info(Path(run_dir))
    if info["backbone"] == PixelBackbone.kind:
        return PixelBackbone.from_run(run_dir)
    raise PogdiffError(f"{run_dir}: unknown backbone {info['backbone']!r} in {RUN_FILE}")
