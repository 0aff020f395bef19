"""Stable Diffusion-shaped pipeline folders with random weights, built offline: for checking the
``--pretrained`` path and measuring its cost without downloading a checkpoint.

Random weights draw noise, as they should; these folders test code paths, memory and time,
never quality. ``tiny`` (32x32 images, VAE x2) is what the tests train on; ``tiny-x8`` has
SD's VAE downsampling (x8) at any resolution, for data-pipeline benchmarks on a CPU;
``sd15`` has SD v1.5's sizes (UNet 860M, VAE 84M, a CLIP-L-shaped text encoder).
The tokenizer is character-level (CLIP's BPE format, no merges).
"""

from __future__ import annotations

import json
import string
from pathlib import Path

import torch

SHAPES = ("tiny", "tiny-x8", "sd15")


def write_tokenizer_files(folder: Path, max_length: int):
    """A character-level CLIP BPE vocabulary (no merges), special tokens last as in CLIP."""
    from transformers import CLIPTokenizer

    folder.mkdir(parents=True)
    chars = string.ascii_lowercase + string.digits + ".,!?'-"
    tokens = list(chars) + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({token: i for i, token in enumerate(tokens)}))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=max_length)


def write_random_pipeline(folder: str | Path, shape: str = "tiny", resolution: int | None = None,
                          seed: int = 0) -> Path:
    """Write a ``StableDiffusionPipeline`` folder of the given ``shape`` (see the module docstring) to ``folder``."""
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    if shape not in SHAPES:
        raise ValueError(f"unknown pipeline shape {shape!r}; choose one of {', '.join(SHAPES)}")
    folder = Path(folder)
    sd15 = shape == "sd15"
    max_length = 77 if sd15 else 16
    tokenizer = write_tokenizer_files(folder.parent / f".{folder.name}-tokenizer-files", max_length)
    torch.manual_seed(seed)
    eos = len(tokenizer) - 1
    width = 768 if sd15 else 32
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=width, intermediate_size=3072 if sd15 else 37,
        num_attention_heads=12 if sd15 else 4, num_hidden_layers=12 if sd15 else 2, max_position_embeddings=max_length,
        bos_token_id=eos - 1, eos_token_id=eos, pad_token_id=eos))
    vae_channels = {"tiny": (8, 16), "tiny-x8": (8, 8, 16, 16), "sd15": (128, 256, 512, 512)}[shape]
    resolution = resolution or {"tiny": 32, "tiny-x8": 64, "sd15": 512}[shape]
    latent_size = resolution // 2 ** (len(vae_channels) - 1)
    if sd15:
        unet = UNet2DConditionModel(sample_size=latent_size, cross_attention_dim=768)
    else:
        unet = UNet2DConditionModel(
            sample_size=latent_size, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32, attention_head_dim=8)
    vae = AutoencoderKL(
        block_out_channels=vae_channels, in_channels=3, out_channels=3, latent_channels=4,
        norm_num_groups=32 if sd15 else 8, layers_per_block=2 if sd15 else 1,
        down_block_types=("DownEncoderBlock2D",) * len(vae_channels),
        up_block_types=("UpDecoderBlock2D",) * len(vae_channels), sample_size=resolution)
    # SD v1.5's scheduler, as its scheduler_config.json has it.
    scheduler = PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              skip_prk_steps=True, steps_offset=1, set_alpha_to_one=False)
    pipeline = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                       scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
    pipeline.save_pretrained(folder)
    return folder
