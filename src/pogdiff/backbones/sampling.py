"""Sampling: the noise, its batches and their processes; each backbone's own sampler draws the images
(``backbone.sample``: DDIM, 50 steps and classifier-free guidance, the paper's App. B protocol, for the small
backbone and the UNet pipelines; a flow pipeline's own scheduler for SD3 and Flux)."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from tqdm.auto import tqdm


def generate(backbone, prompts: list[str], num_images: int = 1, num_inference_steps: int = 50,
             guidance_scale: float | None = None, seed: int = 0, batch_size: int | None = None,
             progress: bool = True) -> torch.Tensor:
    """Images (len(prompts) * num_images, 3, H, W) in [-1, 1], prompt-major order: :func:`generate_batches`, joined."""
    return torch.cat(list(generate_batches(backbone, prompts, num_images, num_inference_steps, guidance_scale, seed,
                                           batch_size, progress)))


def generate_batches(backbone, prompts: list[str], num_images: int = 1, num_inference_steps: int = 50,
                     guidance_scale: float | None = None, seed: int = 0, batch_size: int | None = None,
                     progress: bool = True) -> Iterator[torch.Tensor]:
    """The images of :func:`generate` a batch at a time, as each is done: memory does not grow with their number.

    ``guidance_scale`` defaults to the backbone's (3.0 for the small pixel model, 7.5 for
    Stable Diffusion); 1.0 turns guidance off. For a latent backbone the loop runs on
    latents and ``backbone.decode`` turns them into images. The initial noise comes from a
    CPU generator seeded by ``seed`` (drawn batch after batch: the same values as one draw for all):
    the same images on any device and batch size, and the global random state is left alone
    (training's validation images do not change its draws).
    """
    for _, images in sample_rows(backbone, prompts, num_images, num_inference_steps, guidance_scale, seed,
                                 batch_size, progress):
        yield images


@torch.no_grad()
def sample_rows(backbone, prompts: list[str], num_images: int = 1, num_inference_steps: int = 50,
                guidance_scale: float | None = None, seed: int = 0, batch_size: int | None = None,
                progress: bool = True, shard: tuple[int, int] = (0, 1)) -> Iterator[tuple[range, torch.Tensor]]:
    """(rows, images) of :func:`generate_batches`' batches that process ``shard[0]`` of ``shard[1]`` owns:
    batch b when b % shard[1] == shard[0]. The noise of the other batches is drawn and discarded, so
    every row is the same image for any number of processes. Rows index the prompt-major order of
    :func:`generate` (row r is prompt r // num_images).
    """
    process, processes = shard
    guidance = backbone.default_guidance_scale if guidance_scale is None else guidance_scale
    batch_size = batch_size or backbone.sample_batch_size
    generator = torch.Generator().manual_seed(seed)
    total = len(prompts) * num_images
    batches = range(0, total, batch_size)
    owned = [b for b in range(len(batches)) if b % processes == process]
    bar = tqdm(total=len(owned) * num_inference_steps, desc="sampling", unit="step", disable=not progress)
    for b, start in enumerate(batches):
        rows = range(start, min(start + batch_size, total))
        noise = torch.randn((len(rows), *backbone.noise_shape), generator=generator)
        if b % processes != process:
            continue
        batch_prompts = [prompts[row // num_images] for row in rows]
        images = backbone.sample(noise, batch_prompts, num_inference_steps, guidance, on_step=bar.update)
        yield rows, images.float().cpu()
    bar.close()
