"""Stable Diffusion 3 and 3.5 (``StableDiffusion3Pipeline``): an MMDiT transformer conditioned on two CLIP
encoders' states beside T5's and their pooled embeddings, trained by flow matching; 1024 px."""

from __future__ import annotations

import torch

from pogdiff.backbones.latent import LatentBackbone, PipelineText
from pogdiff.encode.encoders import weights_fingerprint
from pogdiff.objectives.forward_process import FlowMatchingProcess

# diffusers' train_dreambooth_lora_sd3.py: the attention projections of both streams
SD3_LORA_TARGETS = ("attn.add_k_proj", "attn.add_q_proj", "attn.add_v_proj", "attn.to_add_out",
                    "attn.to_k", "attn.to_out.0", "attn.to_q", "attn.to_v")


class FlowTransformerBackbone(LatentBackbone):
    """What the flow-matching transformers (SD3, Flux) share: LoRA on their attention, T5 states of
    ``max_sequence_length`` tokens, the velocity target, sampling with the checkpoint's own flow scheduler."""

    denoiser_name = "transformer"
    lora_target_modules = SD3_LORA_TARGETS
    default_max_sequence_length: int  # diffusers' script's --max_sequence_length
    default_weighting_scheme: str  # diffusers' script's --weighting_scheme

    def __init__(self, pipeline, pretrained: str, max_sequence_length: int | None = None, resolution: int | None = None):
        super().__init__(pipeline, pretrained, max_sequence_length or self.default_max_sequence_length, resolution)

    def forward_process(self, weighting_scheme: str | None = None, **options) -> FlowMatchingProcess:
        return FlowMatchingProcess(self.scheduler, weighting_scheme or self.default_weighting_scheme, **options)

    def sample_options(self) -> dict:
        return {"max_sequence_length": self.max_sequence_length}

    def text_name(self, family: str, models: list[torch.nn.Module]) -> str:
        return f"{family}-" + "-".join(weights_fingerprint(model) for model in models) + f"@{self.max_sequence_length}"


class StableDiffusion3Backbone(FlowTransformerBackbone):
    """An SD3/SD3.5 checkpoint, trained as diffusers' ``train_dreambooth_lora_sd3.py`` does (logit-normal timesteps
    by default) on the velocity target: that script's default ``--precondition_outputs`` regresses x0 instead, which
    is the velocity loss weighted by sigma_t^2 per example (docs/choices.md); without its T5 encoder
    (``text_encoder_3`` left out) T5's states are zeros, as the pipeline has them."""

    kind = "stable-diffusion-3"
    pipeline_class = "StableDiffusion3Pipeline"
    default_guidance_scale = 7.0
    default_max_sequence_length = 77
    default_weighting_scheme = "logit_normal"

    def make_text(self) -> PipelineText:
        pipeline = self.pipeline
        models = [m for m in (pipeline.text_encoder, pipeline.text_encoder_2, pipeline.text_encoder_3) if m is not None]

        def encode(captions: list[str], device) -> tuple[torch.Tensor, torch.Tensor]:
            embeds, _, pooled, _ = pipeline.encode_prompt(captions, None, None, device=device,
                                                          do_classifier_free_guidance=False,
                                                          max_sequence_length=self.max_sequence_length)
            return embeds, pooled

        return PipelineText(pipeline, encode, models, pipeline.tokenizer.model_max_length,
                            self.text_name("sd3", models))

    def denoise(self, model, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        states, pooled = self.split(cond, self.denoiser.config.pooled_projection_dim)
        timestep = self.scheduler.timesteps.to(t.device)[t]
        return model(hidden_states=x_t, timestep=timestep, encoder_hidden_states=states, pooled_projections=pooled,
                     return_dict=False)[0]
