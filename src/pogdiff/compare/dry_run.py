"""``--dry-run``: what ``train``, ``encode`` and ``benchmark`` will do and cost, told before any of it is done.

Counts come from the dataset's metadata (no image is read), sizes from the backbone's config files
(no weights are loaded), times from step costs this project measured, printed with where each was
measured. Other batches and resolutions are scaled linearly in images and pixels, which is rough
(attention grows faster than the pixels): read the times as the order of magnitude. Nothing is written.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from pogdiff.errors import PogdiffError, first_line
from pogdiff.processes import process_state

# Seconds of one vanilla optimizer step as measured: (seconds, batch, resolution, where).
STEP_COSTS = {
    "latent": {"one NVIDIA H100, bf16": (0.143, 8, 512, "benchmarks/step_cost.py, SD v1.5's UNet, 2026-11-26"),
               "one NVIDIA H100, fp16": (0.164, 8, 512, "benchmarks/step_cost.py, SD v1.5's UNet, 2026-11-26")},
    # 151.6 s for 300 steps with its set-up: the median vanilla cell of benchmarks/results/confirmation
    "pixel": {"2-core CPU": (0.505, 16, 32, "the confirmation's vanilla cells, benchmarks/results/confirmation")},
}
# A method's training time over vanilla's: the medians of the confirmation cells' train seconds (small backbone,
# 2-core CPU); PoGDiff at Stable Diffusion size from benchmarks/step_cost.py on an H100 (README).
METHOD_COST = {"pixel": {"vanilla": 1.0, "resample": 1.05, "t2h": 1.02, "cbdm": 1.79, "pogdiff": 1.43},
               "latent": {"vanilla": 1.0, "resample": 1.05, "t2h": 1.02, "cbdm": 1.79, "pogdiff": 1.28}}
# One image through one guided DDIM step, over one image's share of a training step: 14.6 s for 16 images x 50
# steps against 0.38 s a step of batch 16 (the small backbone on the 2-core CPU, docs/pretrained-backbone.md).
SAMPLE_STEP_COST = 0.77
FEATURE_WIDTH = {"efficientnet-lite0": 1280, "faces": 128}  # Eq. 8's spaces of known width; unet: its mid block


@dataclass(frozen=True)
class BackboneShape:
    """What sizes a backbone's caches: bytes of x0 per row, of text states per distinct caption."""

    kind: str  # "pixel" (the small backbone) or "latent" (a diffusers checkpoint)
    resolution: int
    x0_bytes: int
    text_bytes: int
    mid_channels: int  # the width of the unet neighbour space


def backbone_shape(pretrained: str | None, resolution: int | None,
                   max_sequence_length: int | None = None) -> BackboneShape:
    """The shape of the small backbone, or of the checkpoint ``pretrained`` from its config files alone."""
    if not pretrained:
        from pogdiff.training.run_folder import read_run_info
        from pogdiff.backbones.shipped import SHIPPED_RESOLUTION, shipped_backbone_dir

        tokens = read_run_info(shipped_backbone_dir())["text_max_length"]
        side = resolution or SHIPPED_RESOLUTION
        mid = _json(shipped_backbone_dir() / "unet" / "config.json")["block_out_channels"][-1]
        return BackboneShape("pixel", side, 3 * side * side, tokens * 384 * 4 + 384 * 4, mid)
    family = component_config(pretrained, "", "model_index.json").get("_class_name")
    vae = component_config(pretrained, "vae")
    factor = 2 ** (len(vae["block_out_channels"]) - 1)

    def latent(side: int) -> int:  # the posterior's mean and log-variance in float16
        return 2 * vae.get("latent_channels", 4) * (side // factor) ** 2 * 2

    clip = component_config(pretrained, "text_encoder")
    tokens = component_config(pretrained, "tokenizer", "tokenizer_config.json").get("model_max_length", 77)
    if family in ("StableDiffusion3Pipeline", "FluxPipeline"):  # per caption: T5's states (+ CLIP's), the pooled
        transformer = component_config(pretrained, "transformer")
        width = transformer["joint_attention_dim"]  # T5's width (SD3 without its T5 has zeros of it)
        sequence = max_sequence_length or (77 if family == "StableDiffusion3Pipeline" else 512)
        states = sequence + (min(tokens, 4096) if family == "StableDiffusion3Pipeline" else 0) + 1
        side = resolution or (transformer["sample_size"] if family == "StableDiffusion3Pipeline" else 128) * factor
        return BackboneShape("latent", side, latent(side), states * width * 2 + width * 4,
                             transformer["num_attention_heads"] * transformer["attention_head_dim"])
    unet = component_config(pretrained, "unet")
    width = clip["hidden_size"]
    if family == "StableDiffusionXLPipeline":  # both encoders' states side by side, and the pooled row
        width += component_config(pretrained, "text_encoder_2")["hidden_size"]
        tokens += 1
    side = resolution or unet["sample_size"] * factor
    return BackboneShape("latent", side, latent(side), min(tokens, 4096) * width * 2 + width * 4,
                         unet["block_out_channels"][-1])


def component_config(pretrained: str, component: str, file: str = "config.json") -> dict:
    """A pipeline component's config, from the folder, or for a hub id from the hub (or its local cache)."""
    folder = Path(pretrained)
    if folder.is_dir():
        path = folder / component / file
        if not path.is_file():
            raise PogdiffError(f"{path}: missing; --pretrained must be a diffusers pipeline folder")
        return _json(path)
    from huggingface_hub import hf_hub_download

    try:
        return _json(Path(hf_hub_download(pretrained, "/".join(part for part in (component, file) if part))))
    except Exception as error:  # offline, unknown id, gated: huggingface_hub raises several kinds
        raise PogdiffError(f"{pretrained}: cannot read {component}/{file} ({first_line(error)}); pass a "
                           "local diffusers pipeline folder or a hub id the machine can reach") from None


def _json(path: Path) -> dict:
    return json.loads(path.read_text())


def cache_bytes(shape: BackboneShape, rows: int, captions: int, random_flip: bool,
                neighbours: tuple[str, int] | None) -> dict[str, int | None]:
    """Bytes on disk of each cached table (None: a feature space whose width is unknown until it loads)."""
    sizes = {"latents" if shape.kind == "latent" else "pixels": rows * shape.x0_bytes * (2 if random_flip else 1),
             "caption states": captions * shape.text_bytes}
    if neighbours:
        space, k = neighbours
        width = shape.mid_channels if space == "unet" else FEATURE_WIDTH.get(space)
        sizes["image features"] = None if width is None else rows * width * 4
        sizes["neighbours"] = rows * k * (8 + 4)
    return sizes


def training_seconds(kind: str, method: str, steps: int, images_per_step: int, resolution: int) -> dict[str, float]:
    """Estimated seconds of ``steps`` optimizer steps of ``images_per_step`` images, per measured machine."""
    factor = METHOD_COST[kind].get(method, max(METHOD_COST[kind].values()))
    return {machine: steps * factor * seconds * images_per_step / batch * (resolution / side) ** 2
            for machine, (seconds, batch, side, _) in STEP_COSTS[kind].items()}


def sampling_seconds(kind: str, images: int, inference_steps: int, resolution: int) -> dict[str, float]:
    """Estimated seconds to draw ``images`` with ``inference_steps`` guided DDIM steps, per measured machine."""
    return {machine: images * inference_steps * SAMPLE_STEP_COST * seconds / batch * (resolution / side) ** 2
            for machine, (seconds, batch, side, _) in STEP_COSTS[kind].items()}


def human_bytes(size: float | None) -> str:
    if size is None:
        return "unknown until the model loads"
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1000:
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{size:.1f} TB"


def human_seconds(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.0f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"


def report(title: str, facts: list[tuple[str, str]], sizes: dict[str, int | None],
           seconds: dict[str, dict[str, float]], kind: str) -> str:
    """The dry run's text: facts, the cache's tables and total, the estimated times per measured machine."""
    known = [s for s in sizes.values() if s is not None]
    lines = [f"{title} (dry run: nothing was read but the metadata and configs, nothing was written)"]
    lines += [f"  {what}: {value}" for what, value in facts]
    lines.append("  cache on disk: " + ", ".join(f"{t} {human_bytes(s)}" for t, s in sizes.items())
                 + f"; total {human_bytes(sum(known))}" + ("" if len(known) == len(sizes) else " and more"))
    for machine in STEP_COSTS[kind] if seconds else ():
        parts = ", ".join(f"{what} {human_seconds(by_machine[machine])}" for what, by_machine in seconds.items())
        total = sum(by_machine[machine] for by_machine in seconds.values())
        lines.append(f"  estimated on {machine}: {parts}; {human_seconds(total)} in all, encoding not included")
    if seconds:
        lines.append("  from: " + "; ".join(sorted({where for *_, where in STEP_COSTS[kind].values()}))
                     + " (other GPUs and UNets: not measured; scaled linearly in batch and pixels)")
    return "\n".join(lines)


def validation_rounds(validation_steps: int, max_train_steps: int) -> int:
    """How many times training samples its validation prompts (every validation_steps, and at the end)."""
    return math.ceil(max_train_steps / validation_steps)


@dataclass(frozen=True)
class DataCounts:
    """What the plan needs of a dataset: rows, distinct captions, training images per identity."""

    rows: int
    captions: int
    per_identity: list[int]

    @classmethod
    def of_folder(cls, data_dir: str | Path, caption_column: str = "text", identity_column: str = "identity",
                  image_column: str = "file_name") -> "DataCounts":
        from pogdiff.data.dataset import load_dataset

        dataset = load_dataset(data_dir, caption_column, identity_column, image_column)
        return cls(len(dataset), len(set(dataset.captions)), list(dataset.identity_counts().values()))

    @classmethod
    def of_preset(cls, preset: str) -> "DataCounts":
        from pogdiff.data.synth import PRESETS

        return cls(sum(PRESETS[preset]), sum(PRESETS[preset]), list(PRESETS[preset]))

    def describe(self, few_max_images: int) -> str:
        few = sum(count <= few_max_images for count in self.per_identity)
        return (f"{self.rows} rows, {self.captions} distinct captions, {len(self.per_identity)} identities "
                f"({few} Few: <= {few_max_images} images)")


def describe_backbone(pretrained: str | None, lora_rank: int | None, from_scratch: bool = False) -> str:
    """A backbone and how it is trained, in words (the dry run's and the benchmark report's)."""
    if pretrained:
        return f"{pretrained}, " + (f"LoRA rank {lora_rank}" if lora_rank else "full fine-tuning")
    return "small, from scratch" if from_scratch else "small, shipped pretrained"


def training_plan(config, command: str = "train") -> str:
    """``pogdiff train|encode --dry-run``: the data, the steps, the images to sample, the cache, the time."""
    from pogdiff.data.dataset import FEW_MAX_IMAGES
    from pogdiff.training.train import check_options, neighbours_of, train_steps

    check_options(config)
    data = DataCounts.of_folder(dry_run_data_dir(config), config.caption_column, config.identity_column,
                                config.image_column)
    processes = process_state().num_processes
    global_batch = config.train_batch_size * processes
    steps = train_steps(config, data.rows, global_batch)
    shape = backbone_shape(config.pretrained, config.resolution, config.max_sequence_length)
    facts = [("data", data.describe(FEW_MAX_IMAGES)),
             ("backbone", f"{describe_backbone(config.pretrained, config.lora_rank, config.from_scratch)}, "
                         f"{shape.resolution} px")]
    seconds = {}
    if command == "train":
        per_process = config.train_batch_size * config.gradient_accumulation_steps
        facts.append(("steps", f"{steps} optimizer steps of {per_process * processes} images "
                               f"({config.train_batch_size} x {config.gradient_accumulation_steps} accumulation x "
                               f"{processes} process{'es' if processes > 1 else ''}), {config.method}"))
        seconds["training"] = training_seconds(shape.kind, config.method, steps, per_process, shape.resolution)
        validation = (validation_rounds(config.validation_steps, steps) * len(config.validation_prompts)
                      * config.num_validation_images) if config.validation_prompts else 0
        facts.append(("images to sample", f"{validation} validation images"))
        if validation:
            seconds["validation"] = sampling_seconds(shape.kind, validation, 50, shape.resolution)
    sizes = cache_bytes(shape, data.rows, data.captions, config.random_flip, neighbours_of(config))
    return report(f"pogdiff {command}", facts, sizes, seconds, shape.kind)


def dry_run_data_dir(config) -> str:
    """DATA, or a --dataset-name folder that is already in the dataset format (a dry run converts nothing)."""
    if config.data_dir:
        return config.data_dir
    if (Path(config.dataset_name) / "metadata.jsonl").is_file():
        return config.dataset_name
    raise PogdiffError(f"{config.dataset_name}: --dry-run reads a metadata.jsonl, and this --dataset-name folder "
                       "has to be converted first; run once without --dry-run, or pass the converted folder as DATA")


def benchmark_plan(specs: list, seeds: list[int], budget, data: str | Path | None, data_preset: str) -> str:
    """``pogdiff benchmark --dry-run``: cells, steps and images to sample per cell, the cache, the time."""
    from pogdiff.objectives.losses import neighbour_request

    data_counts = DataCounts.of_folder(data) if data else DataCounts.of_preset(data_preset)
    shape = backbone_shape(budget.pretrained, budget.resolution)
    processes = process_state().num_processes
    identities = len(data_counts.per_identity) if budget.max_identities is None else \
        min(budget.max_identities, len(data_counts.per_identity))
    few = min(identities, sum(count <= budget.few_max_images for count in data_counts.per_identity))
    images = (identities - few) * budget.num_images + few * (budget.num_images_few or budget.num_images)
    cells = len(specs) * len(seeds)
    few_images = f", {budget.num_images_few} per Few identity" if budget.num_images_few else ""
    per_process = budget.train_batch_size * budget.gradient_accumulation_steps
    facts = [("data", data_counts.describe(budget.few_max_images)),
             ("backbone", f"{describe_backbone(budget.pretrained, budget.lora_rank, budget.from_scratch)}, "
                         f"{shape.resolution} px"),
             ("cells", f"{len(specs)} methods x {len(seeds)} seeds = {cells}, each {budget.max_train_steps} steps of "
                       f"{per_process * processes} images, then {images} images sampled "
                       f"({budget.num_images} per identity{few_images}, {budget.num_inference_steps} DDIM steps)")]
    training = [training_seconds(shape.kind, spec.method, budget.max_train_steps, per_process, shape.resolution)
                for spec in specs for _ in seeds]
    sampling = sampling_seconds(shape.kind, images * cells, budget.num_inference_steps, shape.resolution)
    seconds = {"training": {m: sum(t[m] for t in training) for m in STEP_COSTS[shape.kind]},
               "sampling": {m: s / processes for m, s in sampling.items()}}
    neighbours = next((n for spec in specs if (n := neighbour_request(spec.method, spec.options))), None)
    sizes = cache_bytes(shape, data_counts.rows, data_counts.captions, False, neighbours)
    return report("pogdiff benchmark", facts, sizes, seconds, shape.kind)
