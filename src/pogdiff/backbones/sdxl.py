"""Stable Diffusion XL (``StableDiffusionXLPipeline``): a UNet conditioned on two CLIP text encoders' penultimate
states, the second encoder's pooled embedding and the size/crop time ids; DDPM, epsilon or v prediction; 1024 px."""

from __future__ import annotations

import torch

from pogdiff.backbones.latent import PipelineText
from pogdiff.backbones.stable_diffusion import UNetDDPMBackbone
from pogdiff.encode.encoders import weights_fingerprint


class StableDiffusionXLBackbone(UNetDDPMBackbone):
    """An SDXL checkpoint, trained as diffusers' ``train_text_to_image_sdxl.py`` and its LoRA script do.

    The time ids are (original size, crop top-left, target size) = (H, W, 0, 0, H, W) for every image, what the
    pipeline samples with: the images are resized and cropped to the training size before encoding, and
    their original sizes are not kept (docs/stable-diffusion.md).
    """

    kind = "stable-diffusion-xl"
    pipeline_class = "StableDiffusionXLPipeline"

    def make_text(self) -> PipelineText:
        pipeline = self.pipeline
        models = [pipeline.text_encoder, pipeline.text_encoder_2]

        def encode(captions: list[str], device) -> tuple[torch.Tensor, torch.Tensor]:
            embeds, _, pooled, _ = pipeline.encode_prompt(captions, device=device, do_classifier_free_guidance=False)
            return embeds, pooled

        name = "sdxl-clip-" + "-".join(weights_fingerprint(model) for model in models)
        return PipelineText(pipeline, encode, models, pipeline.tokenizer.model_max_length, name)

    def denoise(self, model, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        states, pooled = self.split(cond, self.pipeline.text_encoder_2.config.projection_dim)
        height, width = (size * self.vae_scale_factor for size in x_t.shape[-2:])
        time_ids = torch.tensor([height, width, 0, 0, height, width], device=x_t.device,
                                dtype=states.dtype).expand(len(x_t), -1)
        return model(x_t, t, encoder_hidden_states=states, return_dict=False,
                     added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids})[0]
