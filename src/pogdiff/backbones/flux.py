"""Flux.1 (``FluxPipeline``): an MMDiT transformer on packed 2x2 latent patches, conditioned on T5's states and
CLIP's pooled embedding (Flux-dev also on a distilled guidance scale), trained by flow matching; 1024 px."""

from __future__ import annotations

import torch

from pogdiff.backbones.latent import PipelineText
from pogdiff.backbones.sd3 import FlowTransformerBackbone

# diffusers' train_dreambooth_lora_flux.py: attention of both streams and the feed-forward layers
FLUX_LORA_TARGETS = ("attn.to_k", "attn.to_q", "attn.to_v", "attn.to_out.0", "attn.add_k_proj", "attn.add_q_proj",
                     "attn.add_v_proj", "attn.to_add_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj",
                     "ff_context.net.2")


class FluxBackbone(FlowTransformerBackbone):
    """A Flux.1 checkpoint, trained as diffusers' ``train_dreambooth_lora_flux.py`` does: velocity target, uniform
    timesteps by default, and for a guidance-distilled model (dev) the guidance embedding at ``guidance``
    (the script's --guidance_scale) while training; sampling's guidance scale is that embedding too (no
    classifier-free guidance)."""

    kind = "flux"
    pipeline_class = "FluxPipeline"
    lora_target_modules = FLUX_LORA_TARGETS
    latent_multiple = 2  # latents are packed in 2x2 patches
    default_guidance_scale = 3.5
    guidance = 3.5
    default_max_sequence_length = 512
    default_weighting_scheme = "none"

    def make_text(self) -> PipelineText:
        pipeline = self.pipeline
        models = [pipeline.text_encoder, pipeline.text_encoder_2]

        def encode(captions: list[str], device) -> tuple[torch.Tensor, torch.Tensor]:
            embeds, pooled, _ = pipeline.encode_prompt(captions, None, device=device,
                                                       max_sequence_length=self.max_sequence_length)
            return embeds, pooled

        return PipelineText(pipeline, encode, models, pipeline.tokenizer.model_max_length,
                            self.text_name("flux", models))

    def pack(self, latents: torch.Tensor) -> torch.Tensor:
        return self.pipeline._pack_latents(latents, *latents.shape)

    def unpack(self, packed: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
        height, width = (size * self.vae_scale_factor for size in shape[-2:])
        return self.pipeline._unpack_latents(packed, height, width, self.vae_scale_factor)

    def denoise(self, model, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        config = self.denoiser.config
        states, pooled = self.split(cond, config.pooled_projection_dim)
        height, width = x_t.shape[-2:]
        image_ids = self.pipeline._prepare_latent_image_ids(len(x_t), height // 2, width // 2, x_t.device,
                                                            states.dtype)
        text_ids = torch.zeros(states.shape[1], 3, device=x_t.device, dtype=states.dtype)
        guidance = torch.full((len(x_t),), self.guidance, device=x_t.device) if config.guidance_embeds else None
        timestep = self.scheduler.timesteps.to(t.device)[t] / 1000
        packed = model(hidden_states=self.pack(x_t), timestep=timestep, guidance=guidance, pooled_projections=pooled,
                       encoder_hidden_states=states, txt_ids=text_ids, img_ids=image_ids, return_dict=False)[0]
        return self.unpack(packed, x_t.shape)
