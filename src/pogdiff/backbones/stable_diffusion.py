"""Stable Diffusion 1.x/2.x (``StableDiffusionPipeline``; v1.5 is the paper's backbone): a UNet cross-attending to
one CLIP text encoder's states, DDPM with epsilon or v prediction, sampled with DDIM (the paper's App. B)."""

from __future__ import annotations

import torch
from diffusers import DDIMScheduler, DDPMScheduler

from pogdiff.backbones.latent import LatentBackbone
from pogdiff.encode.encoders import TextEncoder
from pogdiff.objectives.forward_process import DDPMProcess


class UNetDDPMBackbone(LatentBackbone):
    """What the UNet families (SD, SDXL) share: DDPM with the checkpoint's schedule, as diffusers'
    ``train_text_to_image*.py`` scripts train them, and DDIM sampling (the paper's protocol)."""

    @staticmethod
    def training_scheduler(scheduler):
        return DDPMScheduler.from_config(scheduler.config)

    def sampling_scheduler(self):
        return DDIMScheduler.from_config(self.scheduler.config)

    def forward_process(self, **options) -> DDPMProcess:
        return DDPMProcess(self.scheduler, **options)


class StableDiffusionBackbone(UNetDDPMBackbone):
    """A ``StableDiffusionPipeline`` checkpoint: UNet, VAE, CLIP text encoder and tokenizer, scheduler."""

    kind = "stable-diffusion"
    pipeline_class = "StableDiffusionPipeline"
    load_options = {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}

    def make_text(self) -> TextEncoder:
        return TextEncoder.of_pipeline(self.pipeline.tokenizer, self.pipeline.text_encoder)

    def denoise(self, model, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        return model(x_t, t, encoder_hidden_states=cond, return_dict=False)[0]
