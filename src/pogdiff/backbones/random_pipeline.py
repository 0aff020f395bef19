"""Pipeline folders with random weights, built offline: for checking the ``--pretrained`` path and measuring
its cost without downloading a checkpoint.

Random weights draw noise, as they should; these folders test code paths, memory and time,
never quality. ``tiny`` (a Stable Diffusion pipeline, 32x32 images, VAE x2) is what the tests train on;
``tiny-x8`` has SD's VAE downsampling (x8) at any resolution, for data-pipeline benchmarks on a CPU;
``sd15`` has SD v1.5's sizes (UNet 860M, VAE 84M, a CLIP-L-shaped text encoder). ``tiny-sdxl``,
``tiny-sd3`` and ``tiny-flux`` are the other families' pipelines at 32x32 (VAE x2) with every part each
has (two CLIP encoders, T5, time ids, a guidance embedding), a few thousand weights each.
The CLIP tokenizers are character-level (CLIP's BPE format, no merges); T5's is a character-level Unigram.
"""

from __future__ import annotations

import json
import string
from pathlib import Path

import torch

SHAPES = ("tiny", "tiny-x8", "sd15", "tiny-sdxl", "tiny-sd3", "tiny-flux")
FAMILIES = {"tiny-sdxl": "_write_sdxl", "tiny-sd3": "_write_sd3", "tiny-flux": "_write_flux"}


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
    if shape in FAMILIES:
        torch.manual_seed(seed)
        globals()[FAMILIES[shape]](folder)
        return folder
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


TINY_TOKENS = 16  # tokens of the tiny CLIP and T5 encoders


def _tiny_clip(folder: Path, name: str, projection: bool):
    """A tokenizer (written under ``folder``) and a 32-wide, 2-layer CLIP text encoder, with projection or not."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    tokenizer = write_tokenizer_files(folder.parent / f".{folder.name}-{name}-files", TINY_TOKENS)
    eos = len(tokenizer) - 1
    config = CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37, num_attention_heads=4,
                            num_hidden_layers=2, max_position_embeddings=TINY_TOKENS, projection_dim=32,
                            bos_token_id=eos - 1, eos_token_id=eos, pad_token_id=eos)
    return tokenizer, (CLIPTextModelWithProjection if projection else CLIPTextModel)(config)


def _tiny_t5(width: int):
    """A character-level T5 tokenizer (Unigram, as T5's) and a 2-layer T5 encoder of ``width``."""
    import string

    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import T5Config, T5EncoderModel, T5TokenizerFast

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + \
        [(c, -1.0) for c in string.ascii_lowercase + string.digits + ".,!?'-\u2581"]
    model = Tokenizer(models.Unigram(pieces, unk_id=2))
    model.pre_tokenizer = pre_tokenizers.Metaspace()
    model.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    tokenizer = T5TokenizerFast(tokenizer_object=model, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                                extra_ids=0, model_max_length=TINY_TOKENS)
    encoder = T5EncoderModel(T5Config(vocab_size=len(pieces), d_model=width, d_ff=37, d_kv=8, num_layers=2,
                                      num_heads=4, relative_attention_num_buckets=8, pad_token_id=0,
                                      eos_token_id=1, decoder_start_token_id=0))
    return tokenizer, encoder


def _tiny_vae(latent_channels: int, flow: bool):
    """A 2-level VAE (x2); a flow model's has no quant convolutions and a shift, as SD3's and Flux's."""
    from diffusers import AutoencoderKL

    extra = {"use_quant_conv": False, "use_post_quant_conv": False, "shift_factor": 0.0609,
             "scaling_factor": 1.5035} if flow else {}
    return AutoencoderKL(block_out_channels=(8, 16), in_channels=3, out_channels=3, latent_channels=latent_channels,
                         norm_num_groups=8, layers_per_block=1, sample_size=32,
                         down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                         **extra)


def _write_sdxl(folder: Path) -> None:
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel

    tokenizer, text_encoder = _tiny_clip(folder, "tokenizer", projection=False)
    tokenizer_2, text_encoder_2 = _tiny_clip(folder, "tokenizer-2", projection=True)
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=8, transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=6 * 8 + 32, cross_attention_dim=64, norm_num_groups=8)
    # SDXL base's scheduler, as its scheduler_config.json has it
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       steps_offset=1, timestep_spacing="leading")
    StableDiffusionXLPipeline(vae=_tiny_vae(4, flow=False), text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                              tokenizer=tokenizer, tokenizer_2=tokenizer_2, unet=unet,
                              scheduler=scheduler).save_pretrained(folder)


def _write_sd3(folder: Path) -> None:
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    tokenizer, text_encoder = _tiny_clip(folder, "tokenizer", projection=True)
    tokenizer_2, text_encoder_2 = _tiny_clip(folder, "tokenizer-2", projection=True)
    tokenizer_3, text_encoder_3 = _tiny_t5(64)  # as wide as the two CLIP encoders' states side by side
    transformer = SD3Transformer2DModel(sample_size=16, patch_size=1, in_channels=4, out_channels=4, num_layers=2,
                                        attention_head_dim=8, num_attention_heads=4, caption_projection_dim=32,
                                        joint_attention_dim=64, pooled_projection_dim=64)
    StableDiffusion3Pipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
                             vae=_tiny_vae(4, flow=True), text_encoder=text_encoder, tokenizer=tokenizer,
                             text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2, text_encoder_3=text_encoder_3,
                             tokenizer_3=tokenizer_3).save_pretrained(folder)


def _write_flux(folder: Path) -> None:
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    tokenizer, text_encoder = _tiny_clip(folder, "tokenizer", projection=False)
    tokenizer_2, text_encoder_2 = _tiny_t5(32)
    # Flux-dev's shape: a guidance embedding; latents of 4 channels packed 2x2 into 16
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                         attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                         pooled_projection_dim=32, axes_dims_rope=(4, 4, 8), guidance_embeds=True)
    # Flux-dev's scheduler, as its scheduler_config.json has it
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=4096)
    FluxPipeline(transformer=transformer, scheduler=scheduler, vae=_tiny_vae(4, flow=True), text_encoder=text_encoder,
                 tokenizer=tokenizer, text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2).save_pretrained(folder)
