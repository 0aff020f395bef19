"""The small backbone: a diffusers ``UNet2DConditionModel`` on 32x32 pixels cross-attending to MiniLM
token states, trained under DDPM (:class:`~pogdiff.objectives.forward_process.DDPMProcess`) on a CPU in minutes."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from diffusers import DDIMScheduler, DDPMScheduler, UNet2DConditionModel

from pogdiff.backbones.placement import move_frozen_to
from pogdiff.backbones.shipped import WEIGHTS_FILE, sha256
from pogdiff.data.image_files import pixels_to_float
from pogdiff.encode.encoders import TextEncoder
from pogdiff.objectives.forward_process import DDPMProcess
from pogdiff.training.run_folder import read_run_info


class PixelBackbone:
    """Small pixel-space text-to-image diffusion model (no VAE: x0 is the image in [-1, 1])."""

    kind = "pixel"
    default_guidance_scale = 3.0
    default_learning_rate = 1e-3  # from scratch and fine-tuning the shipped weights alike (docs/choices.md: why)
    sample_batch_size = 64
    encode_batch_size = 256
    image_cache_name = "pixels"  # x0 is the image: its uint8 pixels are stored as they are
    cache_dtype = torch.uint8
    lora_rank = None

    def __init__(self, denoiser: UNet2DConditionModel, scheduler: DDPMScheduler, text_encoder: TextEncoder,
                 pretrained: str | None = None, pretrained_sha256: str | None = None):
        self.denoiser = denoiser
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
        return self.denoiser.config.sample_size

    @property
    def noise_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of x0 and of the initial noise of sampling."""
        size = self.denoiser.config.sample_size
        return self.denoiser.config.in_channels, size, size

    def forward_process(self, **options) -> DDPMProcess:
        """DDPM with the run's noise schedule; ``options``: a flow's options (refused when set)."""
        return DDPMProcess(self.scheduler, **options)

    @staticmethod
    def denoise(model, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """The model's output for x_t at t under caption states ``cond``."""
        return model(x_t, t, encoder_hidden_states=cond, return_dict=False)[0]

    def feature_block(self) -> torch.nn.Module:
        """The block whose output, averaged over positions, is the 'unet' neighbour feature (Eq. 8)."""
        return self.denoiser.mid_block

    @staticmethod
    def pool_features(output) -> torch.Tensor:
        return output.float().mean((2, 3))

    def cache_images(self, pixels: torch.Tensor) -> torch.Tensor:
        return pixels

    def x0_from_cache(self, cached: torch.Tensor) -> torch.Tensor:
        return pixels_to_float(cached)

    x0_mean = x0_from_cache

    def decode(self, x0: torch.Tensor) -> torch.Tensor:
        return x0.clamp(-1, 1)

    @torch.no_grad()
    def sample(self, noise: torch.Tensor, prompts: list[str], num_inference_steps: int, guidance_scale: float,
               on_step: Callable[[], None] = lambda: None) -> torch.Tensor:
        """Images in [-1, 1] drawn from ``noise`` (one per prompt) by DDIM with classifier-free guidance."""
        unet = self.denoiser.eval()
        device, dtype = unet.device, unet.dtype
        scheduler = DDIMScheduler.from_config(self.scheduler.config)
        scheduler.set_timesteps(num_inference_steps)
        x = (noise * scheduler.init_noise_sigma).to(device, dtype)
        cond = self.text_encoder.encode(prompts).states.to(device, dtype)
        if guidance_scale != 1.0:
            uncond = self.text_encoder.encode([""]).states.to(device, dtype)
            cond = torch.cat([uncond.expand_as(cond), cond])
        for t in scheduler.timesteps:
            model_in = torch.cat([x, x]) if guidance_scale != 1.0 else x
            eps = unet(scheduler.scale_model_input(model_in, t), t, encoder_hidden_states=cond).sample
            if guidance_scale != 1.0:
                eps_uncond, eps_cond = eps.chunk(2)
                eps = eps_uncond + guidance_scale * (eps_cond - eps_uncond)
            x = scheduler.step(eps, t, x).prev_sample
            on_step()
        return self.decode(x)

    def encoders_to(self, device) -> "PixelBackbone":
        """The frozen encoders alone on ``device`` in float32, to encode the dataset; the denoiser stays where it is."""
        move_frozen_to(device, torch.float32, self.text_encoder.model)
        return self

    def to(self, device, dtype: torch.dtype = torch.float32) -> "PixelBackbone":
        move_frozen_to(device, dtype, self.denoiser, self.text_encoder.model)
        return self

    def run_info(self) -> dict:
        return {"backbone": self.kind, "pretrained": self.pretrained, "pretrained_sha256": self.pretrained_sha256,
                "text_encoder": self.text_encoder.name,
                "text_max_length": self.text_encoder.max_length, "resolution": self.resolution}

    def save(self, run_dir: Path, denoiser: UNet2DConditionModel) -> None:
        denoiser.save_pretrained(run_dir / "unet")
        self.scheduler.save_pretrained(run_dir / "scheduler")
