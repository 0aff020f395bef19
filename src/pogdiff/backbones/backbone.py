"""Backbones: what denoises, in which space, under which forward process, conditioned by which frozen text.

- :class:`~pogdiff.backbones.pixel.PixelBackbone`: the small model that trains on a CPU in minutes.
- A diffusers pipeline (``--pretrained``), one module per family, trained fully or through LoRA adapters:
  Stable Diffusion 1.x/2.x (:mod:`~pogdiff.backbones.stable_diffusion`, the paper's v1.5), SDXL
  (:mod:`~pogdiff.backbones.sdxl`), SD3/3.5 (:mod:`~pogdiff.backbones.sd3`) and Flux.1
  (:mod:`~pogdiff.backbones.flux`), each registered below by its pipeline class.

Every backbone offers what training, sampling and evaluation use, so that nothing else knows which model it
runs: ``denoiser`` (the module trained), ``forward_process(...)`` (DDPM or a flow, for the losses),
``denoise(model, x_t, t, cond)`` (its conditioning and calling convention), ``sample(noise, prompts, ...)``
(its sampler), ``noise_shape``, ``text_encoder`` (``encode`` captions into the cached condition and the
pooled vector of Eq. 10), ``resolution``, ``cache_images`` / ``x0_from_cache`` / ``x0_mean`` / ``decode``
(x0 and its cache: ``image_cache_name``, ``cache_dtype``), ``feature_block`` / ``pool_features`` (the 'unet'
neighbour features), ``to``, ``run_info`` and ``save``. A run folder holds ``pogdiff_run.json`` next to the
weights in diffusers' own layout (:mod:`pogdiff.training.run_folder`).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError

from pogdiff.backbones.flux import FluxBackbone
from pogdiff.backbones.pixel import PixelBackbone
from pogdiff.backbones.pretrained import PIPELINE_FILE, check_pipeline_files, local_pipeline_folder
from pogdiff.backbones.sd3 import StableDiffusion3Backbone
from pogdiff.backbones.sdxl import StableDiffusionXLBackbone
from pogdiff.backbones.shipped import loading_shipped, resolve_run_dir
from pogdiff.backbones.stable_diffusion import StableDiffusionBackbone
from pogdiff.errors import PogdiffError, first_line
from pogdiff.training.ownership import is_marked
from pogdiff.training.run_folder import DAMAGED_RUN_FIX, RUN_FILE, how_to_continue, read_run_info

PIPELINE_BACKBONES = {cls.pipeline_class: cls for cls in (StableDiffusionBackbone, StableDiffusionXLBackbone,
                                                           StableDiffusion3Backbone, FluxBackbone)}
BACKBONES = {cls.kind: cls for cls in (PixelBackbone, *PIPELINE_BACKBONES.values())}
# the components each family's pipeline must have, and what its denoiser's config must say
_REQUIRED = {"StableDiffusionPipeline": ("unet", "vae", "text_encoder", "tokenizer", "scheduler"),
             "StableDiffusionXLPipeline": ("unet", "vae", "text_encoder", "text_encoder_2", "tokenizer",
                                           "tokenizer_2", "scheduler"),
             "StableDiffusion3Pipeline": ("transformer", "vae", "text_encoder", "text_encoder_2", "tokenizer",
                                          "tokenizer_2", "scheduler"),
             "FluxPipeline": ("transformer", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2",
                              "scheduler")}
_SUPPORTED = ", ".join(PIPELINE_BACKBONES)


def pipeline_backbone_class(folder: Path):
    """The backbone class of a complete local pipeline folder, by its model index; anything pogdiff cannot train
    (another pipeline, a missing part, a denoiser whose input is not the VAE's latent, e.g. an inpainting UNet)
    is one line, read from config files only, before any weights load."""
    index = check_pipeline_files(folder)
    name = index.get("_class_name", "pipeline")
    where = folder / PIPELINE_FILE
    if name not in PIPELINE_BACKBONES:
        raise PogdiffError(f"{where}: a {name} is not supported; pogdiff trains {_SUPPORTED} checkpoints")
    missing = [c for c in _REQUIRED[name] if c not in index or None in index[c]]
    if missing:
        raise PogdiffError(f"{where}: a {name} without {', '.join(missing)}; pogdiff needs every part of it: "
                           "download the whole pipeline")
    cls = PIPELINE_BACKBONES[name]
    denoiser = _config(folder / cls.denoiser_name)
    latent_channels = _config(folder / "vae")["latent_channels"]
    channels = denoiser["in_channels"] // (4 if name == "FluxPipeline" else 1)  # Flux: 2x2 patches as tokens
    if channels != latent_channels:
        raise PogdiffError(f"{folder / cls.denoiser_name}: its input has {channels} channels and the VAE's latents "
                           f"{latent_channels} (an inpainting or other conditioned model?); pogdiff trains "
                           "text-to-image checkpoints")
    if name == "StableDiffusionXLPipeline" and denoiser.get("addition_embed_type") != "text_time":
        raise PogdiffError(f"{folder / 'unet'}: addition_embed_type {denoiser.get('addition_embed_type')!r}, not "
                           "SDXL's text_time conditioning; pass an SDXL base checkpoint")
    return cls


def _config(component: Path) -> dict:
    try:
        return json.loads((component / "config.json").read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as error:
        raise PogdiffError(f"{component / 'config.json'}: unreadable ({first_line(error)}); download the pipeline "
                           "again") from None


def pretrained_backbone(path: str | Path, lora_rank: int | None = None, lora_alpha: float | None = None,
                        lora_target_modules: tuple[str, ...] | None = None, max_sequence_length: int | None = None,
                        resolution: int | None = None):
    """The backbone of a pipeline folder or hub id (``--pretrained``), checked before it loads; a hub id is
    resolved to its local snapshot first (downloaded where the hub can be reached)."""
    folder = local_pipeline_folder(path)
    cls = pipeline_backbone_class(folder)
    return cls.from_pretrained(str(folder.resolve()), lora_rank, lora_alpha, lora_target_modules,
                               max_sequence_length, resolution)


def load_backbone(run_dir: str | Path, device: str | torch.device | None = None):
    """The backbone of a finished run or of any supported pipeline folder, ready to sample:
    on the GPU in half precision where there is one, else on the CPU in float32. ``run_dir`` may be
    the shipped backbone's name."""
    run_dir = resolve_run_dir(run_dir)
    if is_marked(run_dir) and not (Path(run_dir) / RUN_FILE).is_file():  # else a full run loads as a pipeline
        raise PogdiffError(f"{run_dir}: an unfinished run (no {RUN_FILE}); {how_to_continue(Path(run_dir))}")
    with loading_shipped(run_dir):
        info = read_run_info(run_dir)
        if not (Path(run_dir) / RUN_FILE).is_file():  # a plain pipeline folder: its family by its model index
            info["backbone"] = pipeline_backbone_class(Path(run_dir)).kind
        if info["backbone"] not in BACKBONES:
            raise PogdiffError(f"{run_dir}: unknown backbone {info['backbone']!r} in {RUN_FILE}")
        try:
            backbone = BACKBONES[info["backbone"]].from_run(run_dir)
        except KeyError as error:
            raise PogdiffError(f"{Path(run_dir) / RUN_FILE}: no {error.args[0]}; {DAMAGED_RUN_FIX}") from None
        except (OSError, SafetensorError, ValueError) as error:
            raise PogdiffError(f"{run_dir}: cannot load the run's weights ({first_line(error)}); "
                               f"{DAMAGED_RUN_FIX}") from None
    backbone.denoiser.eval().requires_grad_(False)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    return backbone.to(device, torch.float16 if device.type == "cuda" else torch.float32)
