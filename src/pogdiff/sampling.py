"""Sampling: DDIM, 50 steps, classifier-free guidance (the paper's App. B protocol)."""

from __future__ import annotations

import torch
from diffusers import DDIMScheduler
from tqdm.auto import tqdm


@torch.no_grad()
def generate(backbone, prompts: list[str], num_images: int = 1, num_inference_steps: int = 50,
             guidance_scale: float | None = None, seed: int = 0, batch_size: int | None = None,
             progress: bool = True) -> torch.Tensor:
    """Images (len(prompts) * num_images, 3, H, W) in [-1, 1], prompt-major order.

    ``guidance_scale`` defaults to the backbone's (3.0 for the small pixel model, 7.5 for
    Stable Diffusion); 1.0 turns guidance off. For a latent backbone the loop runs on
    latents and ``backbone.decode`` turns them into images. The initial noise comes from a
    CPU generator seeded by ``seed``: the same images on any device, and the global
    random state is left alone (training's validation images do not change its draws).
    """
    guidance = backbone.default_guidance_scale if guidance_scale is None else guidance_scale
    batch_size = batch_size or backbone.sample_batch_size
    unet = backbone.unet.eval()
    device, dtype = unet.device, unet.dtype
    scheduler = DDIMScheduler.from_config(backbone.scheduler.config)
    scheduler.set_timesteps(num_inference_steps)
    states = backbone.text_encoder.encode(prompts).states.repeat_interleave(num_images, 0)
    uncond = backbone.text_encoder.encode([""]).states
    generator = torch.Generator().manual_seed(seed)
    size = unet.config.sample_size
    shape = (len(states), unet.config.in_channels, size, size)
    latents = torch.randn(shape, generator=generator) * scheduler.init_noise_sigma
    out = []
    batches = range(0, len(states), batch_size)
    bar = tqdm(total=len(batches) * num_inference_steps, desc="sampling", unit="step", disable=not progress)
    for start in batches:
        x = latents[start:start + batch_size].to(device, dtype)
        cond = states[start:start + batch_size].to(device, dtype)
        if guidance != 1.0:
            cond = torch.cat([uncond.to(device, dtype).expand_as(cond), cond])
        for t in scheduler.timesteps:
            model_in = torch.cat([x, x]) if guidance != 1.0 else x
            eps = unet(scheduler.scale_model_input(model_in, t), t, encoder_hidden_states=cond).sample
            if guidance != 1.0:
                eps_uncond, eps_cond = eps.chunk(2)
                eps = eps_uncond + guidance * (eps_cond - eps_uncond)
            x = scheduler.step(eps, t, x).prev_sample
            bar.update()
        out.append(backbone.decode(x).float().cpu())
    bar.close()
    return torch.cat(out)
