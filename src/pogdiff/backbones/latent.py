"""What every diffusers latent-diffusion backbone shares; a family (SD, SDXL, SD3, Flux) is a subclass in a module
of its own that says how its denoiser is called (:meth:`LatentBackbone.denoise`), under which forward process
it trains, which text it is conditioned on, and which of its modules LoRA adapts.

Training follows diffusers' example scripts: the whole pipeline is loaded with ``from_pretrained`` (folder or
hub id), x0 is the frozen VAE's latent, shifted and scaled as the pipeline does, the VAE and text encoders
are frozen. With ``lora_rank`` only LoRA adapters of the denoiser are trained (alpha = rank and a Gaussian
init by default, as the scripts), and the run saves them alone in diffusers' LoRA format, their alpha and
target modules in the file's metadata, for ``pipeline.load_lora_weights``. Sampling runs the pipeline's
own denoising loop on the initial noise pogdiff draws, so a run samples exactly as its diffusers pipeline.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import ClassVar

import torch

from pogdiff.backbones.placement import move_frozen_to
from pogdiff.backbones.pretrained import local_pipeline_folder, pipeline_fingerprint
from pogdiff.data.image_files import pixels_to_float
from pogdiff.encode.encoders import TextEmbeddings, weights_fingerprint
from pogdiff.errors import PogdiffError, first_line
from pogdiff.training.run_folder import read_run_info


class PipelineText:
    """The captions as a pipeline's ``encode_prompt`` turns them into the denoiser's condition (SDXL, SD3, Flux).

    The per-token states and the pooled vector are stored together, as one (L + 1, D) tensor per caption:
    the states, then the pooled vector zero-padded to D (:meth:`LatentBackbone.split`). So a caption's
    condition is one tensor, batched, cached and dropped for guidance like any other; the pooled vector
    alone (``TextEmbeddings.pooled``) is what the text density of Eq. 10 is fitted on.
    """

    cache_dtype = torch.float16

    def __init__(self, pipeline, encode: Callable[[list[str], torch.device], tuple[torch.Tensor, torch.Tensor]],
                 models: list[torch.nn.Module], max_length: int, name: str):
        self.pipeline, self._encode, self.models = pipeline, encode, models
        self.tokenizer = pipeline.tokenizer  # the first CLIP tokenizer: what the prompt checks count tokens with
        self.max_length = max_length
        self.name = name

    @property
    def device(self) -> torch.device:
        return next(self.models[0].parameters()).device

    @torch.no_grad()
    def encode(self, captions: list[str], batch_size: int = 64) -> TextEmbeddings:
        states, pooled = [], []
        for start in range(0, len(captions), batch_size):
            embeds, vector = self._encode(captions[start:start + batch_size], self.device)
            padded = torch.zeros(len(vector), 1, embeds.shape[-1], dtype=embeds.dtype, device=embeds.device)
            padded[:, 0, :vector.shape[-1]] = vector
            states.append(torch.cat([embeds, padded], 1).float().cpu())
            pooled.append(vector.float().cpu())
        return TextEmbeddings(torch.cat(states), torch.cat(pooled))


class LatentBackbone:
    """A diffusers text-to-image pipeline trained in its VAE's latent space (see the module docstring).

    A subclass sets ``kind`` (recorded in run folders), ``pipeline_class`` and ``denoiser_name`` (the
    component trained: ``unet`` or ``transformer``), the LoRA targets of diffusers' scripts, and
    implements :meth:`denoise`, :meth:`forward_process` and :meth:`make_text`.
    """

    kind: ClassVar[str]
    pipeline_class: ClassVar[str]  # in diffusers
    denoiser_name: ClassVar[str] = "unet"
    lora_target_modules: ClassVar[tuple[str, ...]] = ("to_k", "to_q", "to_v", "to_out.0")
    default_guidance_scale: ClassVar[float] = 7.5
    sample_batch_size: ClassVar[int] = 8
    # Latents in float16: a relative round-off of 2^-11, below the bf16/fp16 rounding that mixed-precision
    # training applies to the denoiser's input anyway (docs/scale.md has the measurement).
    cache_dtype: ClassVar[torch.dtype] = torch.float16
    load_options: ClassVar[dict] = {}  # for the pipeline's from_pretrained
    latent_multiple: ClassVar[int] = 1  # what the latent's side must be a multiple of (Flux's 2x2 patches: 2)

    def __init__(self, pipeline, pretrained: str, max_sequence_length: int | None = None, resolution: int | None = None):
        self.pipeline = pipeline
        self.denoiser = getattr(pipeline, self.denoiser_name)
        self.vae = pipeline.vae.eval().requires_grad_(False)
        self.scheduler = self.training_scheduler(pipeline.scheduler)
        self.pretrained = pretrained
        self.pretrained_sha256: str | None = None  # of the checkpoint's files, where known (a LoRA run's base)
        self.lora_rank: int | None = None  # set by add_lora, or from a LoRA run
        self.max_sequence_length = max_sequence_length
        # the image size trained and sampled: the checkpoint's default unless a run says otherwise
        self.resolution = resolution or (getattr(pipeline, "default_sample_size", None)
                                         or self.denoiser.config.sample_size) * self.vae_scale_factor
        multiple = self.vae_scale_factor * self.latent_multiple
        if self.resolution % multiple:
            raise PogdiffError(f"--resolution {self.resolution}: a {self.pipeline_class} takes multiples of {multiple} "
                               "(its VAE's factor times its latent patches); pass one")
        self.text_encoder = self.make_text()
        for module in self.text_encoder.models:
            module.eval().requires_grad_(False)
        pipeline.set_progress_bar_config(disable=True)

    # --- what a family says ---

    def make_text(self):
        """The frozen text encoders as the training caches and the loop see them (``encode``, ``name``, ...)."""
        raise NotImplementedError

    def forward_process(self, weighting_scheme: str | None = None, **options):
        """The forward process the losses train under (:mod:`pogdiff.objectives.forward_process`); options that
        do not apply to it are refused in one line."""
        raise NotImplementedError

    def denoise(self, model, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """The model's output for x_t at the process's t under the caption condition ``cond`` (as cached)."""
        raise NotImplementedError

    @staticmethod
    def training_scheduler(scheduler):
        """The noise schedule training draws from: the checkpoint's scheduler config in the scheduler class of
        diffusers' training scripts (a new one: sampling may change the pipeline's)."""
        return type(scheduler).from_config(scheduler.config)

    def sampling_scheduler(self):
        """The scheduler sampling runs (the paper's DDIM for UNet backbones; a flow's own Euler)."""
        return copy.deepcopy(self.pipeline.scheduler)

    def pack(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents (B, C, h, w) as the denoiser and the pipeline's loop take them (Flux: 2x2 patches as tokens)."""
        return latents

    def unpack(self, packed: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
        """The inverse of :meth:`pack`, back to latents of ``shape`` (B, C, h, w)."""
        return packed

    def split(self, cond: torch.Tensor, pooled_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(states, pooled) of a condition stored by :class:`PipelineText`."""
        return cond[:, :-1], cond[:, -1, :pooled_dim]

    # --- shared ---

    @classmethod
    def from_pretrained(cls, path: str | Path, lora_rank: int | None = None, lora_alpha: float | None = None,
                        lora_target_modules: tuple[str, ...] | None = None, max_sequence_length: int | None = None,
                        resolution: int | None = None):
        """Load a checked pipeline folder (:func:`pogdiff.backbones.backbone.pretrained_backbone` checks it); with
        ``lora_rank``, add fresh LoRA adapters to train."""
        import diffusers
        import transformers

        diffusers.utils.logging.disable_progress_bar()  # a bar per component: the run shows its own progress
        transformers.utils.logging.disable_progress_bar()
        try:
            pipeline = getattr(diffusers, cls.pipeline_class).from_pretrained(str(path), dtype=torch.float32,
                                                                              **cls.load_options)
        except (OSError, ValueError, TypeError) as error:
            raise PogdiffError(f"{path}: cannot load it as a {cls.pipeline_class} ({first_line(error)}); pass a "
                               f"folder written by {cls.pipeline_class}.save_pretrained, or a hub id") from None
        backbone = cls(pipeline, str(path), max_sequence_length=max_sequence_length, resolution=resolution)
        if lora_rank:
            backbone.add_lora(lora_rank, lora_alpha, lora_target_modules)
        return backbone

    @classmethod
    def from_run(cls, run_dir: str | Path):
        """A pogdiff run (full weights, or LoRA adapters on its base checkpoint) or a plain pipeline folder."""
        info = read_run_info(Path(run_dir))
        sizes = {"max_sequence_length": info.get("max_sequence_length"), "resolution": info.get("resolution")}
        if not info.get("lora_rank"):
            return cls.from_pretrained(run_dir, **sizes)
        base = local_pipeline_folder(info["pretrained"])  # runs of earlier versions may name a hub id
        recorded = info.get("pretrained_sha256")  # runs of earlier versions did not record it
        if recorded and pipeline_fingerprint(base) != recorded:
            raise PogdiffError(f"{base}: not the weights the LoRA run {run_dir} was trained on (the checkpoint's "
                               "files changed since); put the run's base checkpoint back at that path")
        backbone = cls.from_pretrained(str(base), **sizes)
        backbone.denoiser.load_lora_adapter(str(run_dir), prefix=cls.denoiser_name, use_safetensors=True)
        backbone.lora_rank = info["lora_rank"]
        if info.get("prediction_type"):  # the base checkpoint's scheduler, trained for another prediction type
            backbone.scheduler.register_to_config(prediction_type=info["prediction_type"])
        return backbone

    def add_lora(self, rank: int, alpha: float | None = None, target_modules: tuple[str, ...] | None = None) -> None:
        """Fresh adapters to train on ``target_modules`` (names or name suffixes of the denoiser's modules)."""
        from peft import LoraConfig

        targets = list(target_modules or self.lora_target_modules)
        names = [name for name, _ in self.denoiser.named_modules()]
        example = " ".join(self.lora_target_modules)
        model = "UNet" if self.denoiser_name == "unet" else "transformer"
        for target in targets:  # peft drops a target matching no module silently
            if not any(name == target or name.endswith(f".{target}") for name in names):
                raise PogdiffError(f"--lora-target-modules {target}: no module of the {model} is called so; pass "
                                   f"names of its modules, e.g. {example}")
        self.denoiser.requires_grad_(False)
        try:
            self.denoiser.add_adapter(LoraConfig(r=rank, lora_alpha=alpha or rank, init_lora_weights="gaussian",
                                                 target_modules=targets))
        except ValueError as error:
            raise PogdiffError(f"--lora-target-modules {' '.join(targets)}: {first_line(error)}; pass names of the "
                               f"{model}'s modules, e.g. {example}") from None
        self.lora_rank = rank

    @property
    def default_learning_rate(self) -> float:
        # Sec. 4.1 fine-tunes the whole UNet at 1e-5; diffusers' LoRA scripts default to 1e-4.
        return 1e-4 if self.lora_rank else 1e-5

    @property
    def encode_batch_size(self) -> int:
        """Images the VAE encodes at once: 16 up to 512 px, fewer above (a 1024-px image takes ~2.5 GB in float32)."""
        return max(1, min(16, 16 * 512 ** 2 // self.resolution ** 2))

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def noise_shape(self) -> tuple[int, int, int]:
        """(C, h, w) of a latent at the resolution trained and sampled: x0 and the initial noise of sampling."""
        size = self.resolution // self.vae_scale_factor
        return self.vae.config.latent_channels, size, size

    @property
    def image_cache_name(self) -> str:
        parts = [self.vae.encoder] + ([self.vae.quant_conv] if getattr(self.vae, "quant_conv", None) else [])
        return "vae-" + "-".join(weights_fingerprint(part) for part in parts)

    @property
    def _shift(self) -> float:
        return self.vae.config.get("shift_factor") or 0.0

    @torch.no_grad()
    def cache_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """The VAE posterior q(z | x) of uint8 images: its mean and log-variance, (B, 2C, h, w), float32."""
        batch = pixels_to_float(pixels).to(self.vae.device, self.vae.dtype)
        return self.vae.encode(batch).latent_dist.parameters.float().cpu()

    def x0_from_cache(self, cached: torch.Tensor) -> torch.Tensor:
        """A fresh z ~ q(z | x) at every step, shifted and scaled, exactly as when the VAE encodes each batch."""
        from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

        z = DiagonalGaussianDistribution(cached.float()).sample()
        return (z - self._shift) * self.vae.config.scaling_factor

    def x0_mean(self, cached: torch.Tensor) -> torch.Tensor:
        """E[z | x], shifted and scaled: the posterior mean (the first half of the cached moments)."""
        return (cached.float().chunk(2, dim=1)[0] - self._shift) * self.vae.config.scaling_factor

    @torch.no_grad()
    def decode(self, x0: torch.Tensor) -> torch.Tensor:
        latents = x0.to(self.vae.dtype) / self.vae.config.scaling_factor + self._shift
        return self.vae.decode(latents).sample.clamp(-1, 1)

    def feature_block(self) -> torch.nn.Module:
        """The block whose output, averaged over positions, is the 'unet' neighbour feature (Eq. 8): a UNet's mid
        block, a transformer's middle block."""
        if self.denoiser_name == "unet":
            return self.denoiser.mid_block
        blocks = self.denoiser.transformer_blocks
        return blocks[len(blocks) // 2]

    def pool_features(self, output) -> torch.Tensor:
        if self.denoiser_name == "unet":
            return output.float().mean((2, 3))
        return output[1].float().mean(1)  # a joint block returns (text states, image states)

    @torch.no_grad()
    def sample(self, noise: torch.Tensor, prompts: list[str], num_inference_steps: int, guidance_scale: float,
               on_step: Callable[[], None] = lambda: None) -> torch.Tensor:
        """Images in [-1, 1] drawn from ``noise`` (one per prompt) by the pipeline's own loop and scheduler
        (:meth:`sampling_scheduler`), exactly as ``pipeline(prompts, latents=...)`` draws them."""
        self.denoiser.eval()
        self.pipeline.scheduler = self.sampling_scheduler()
        size = noise.shape[-1] * self.vae_scale_factor
        latents = self.pack(noise.to(self.denoiser.device, self.denoiser.dtype))

        def step_done(pipeline, step, timestep, tensors):
            on_step()
            return tensors

        out = self.pipeline(prompt=prompts, latents=latents, num_inference_steps=num_inference_steps,
                            guidance_scale=guidance_scale, height=size, width=size, output_type="latent",
                            callback_on_step_end=step_done, **self.sample_options()).images
        return self.decode(self.unpack(out, noise.shape))

    def sample_options(self) -> dict:
        """Options of the pipeline's call beyond the prompts, noise, steps, guidance and size."""
        return {}

    def encoders_to(self, device):
        """The VAE and the text encoders alone on ``device`` in float32, to encode the dataset; the denoiser stays
        where it is until the run's precision is known (Flux's transformer is 48 GB in float32)."""
        move_frozen_to(device, torch.float32, self.vae, *self.text_encoder.models)
        return self

    def to(self, device, dtype: torch.dtype = torch.float32):
        """On ``device``, the frozen weights in ``dtype`` but a VAE that overflows in float16 (``force_upcast``, SDXL's
        among them), which stays float32, as diffusers' pipelines upcast it to decode."""
        move_frozen_to(device, dtype, self.denoiser, *self.text_encoder.models)
        move_frozen_to(device, torch.float32 if self.vae.config.get("force_upcast") else dtype, self.vae)
        return self

    def run_info(self) -> dict:
        info = {"backbone": self.kind, "pretrained": self.pretrained, "pretrained_sha256": self.pretrained_sha256,
                "lora_rank": self.lora_rank,
                "text_encoder": self.text_encoder.name, "resolution": self.resolution,
                "prediction_type": getattr(self.scheduler.config, "prediction_type", None),
                "max_sequence_length": self.max_sequence_length}
        if self.lora_rank:
            adapter = self.denoiser.peft_config["default"]
            info.update(lora_alpha=adapter.lora_alpha, lora_target_modules=sorted(adapter.target_modules))
        return info

    def save(self, run_dir: Path, denoiser: torch.nn.Module) -> None:
        """A folder the pipeline class's ``from_pretrained`` loads (LoRA: ``load_lora_weights`` on the base)."""
        import diffusers

        pipeline_class = getattr(diffusers, self.pipeline_class)
        if self.lora_rank:
            from diffusers.utils import convert_state_dict_to_diffusers
            from peft.utils import get_peft_model_state_dict

            layers = get_peft_model_state_dict(denoiser)
            if self.denoiser_name == "unet":  # diffusers' UNet LoRA scripts save the UNet's in its own names
                layers = convert_state_dict_to_diffusers(layers)
            pipeline_class.save_lora_weights(
                run_dir, safe_serialization=True, **{f"{self.denoiser_name}_lora_layers": layers,
                                                    # alpha, target modules
                                                    f"{self.denoiser_name}_lora_adapter_metadata":
                                                        denoiser.peft_config["default"].to_dict()})
            return
        # The other parts are reloaded from the checkpoint, not saved from memory: they stay
        # bit-identical to it even when training held them in half precision.
        pipeline = pipeline_class.from_pretrained(self.pretrained, **{self.denoiser_name: denoiser},
                                                  **self.load_options)
        if hasattr(self.scheduler.config, "prediction_type"):
            pipeline.scheduler.register_to_config(prediction_type=self.scheduler.config.prediction_type)
        pipeline.save_pretrained(run_dir, safe_serialization=True)
