"""The training loop: one readable loop (after facebookresearch/DiT ``train.py``), run by accelerate.

The same code runs on a CPU, a GPU, or several GPUs/nodes under ``accelerate launch``.
The dataset is encoded once into on-disk caches (:func:`encode`, ``pogdiff encode``), each
process encoding its share, and read a batch at a time; batches come from a
stateless, seeded index schedule, so a resumed run draws exactly what an uninterrupted
one would (the random draws of t, eps, neighbours and caption dropout come from the
RNG states that accelerate saves with each checkpoint).

:func:`train` reads top to bottom: checks, model, encoded dataset and loss, run folder,
optimizer, resume, loop, save; the helpers follow in the order it calls them.
"""

from __future__ import annotations

import collections
import contextlib
import math
import os
import platform
import time
import warnings
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import InitProcessGroupKwargs, ProjectConfiguration, TorchDynamoPlugin, set_seed
from diffusers.optimization import get_scheduler
from PIL import Image
from tqdm.auto import tqdm

from pogdiff.backbones.backbone import pretrained_backbone
from pogdiff.backbones.pretrained import pipeline_fingerprint
from pogdiff.backbones.pixel import PixelBackbone
from pogdiff.encode.cache import cache_folder, check_cache_dir
from pogdiff.data.dataset import METADATA_FILE, ImageTextDataset, load_dataset
from pogdiff.processes import built_once_first, on_main_process, set_process_group_timeout
from pogdiff.data.image_files import dataset_digest
from pogdiff.encode.encoded_dataset import EncodedDataset, encode_for_training
from pogdiff.errors import DatasetError, PogdiffError, PogdiffWarning
from pogdiff.files import apply_umask_to_tree, sha256
from pogdiff.images import save_grid
from pogdiff.encode.loss_tables import check_neighbours_fit, loss_tables, neighbour_space
from pogdiff.objectives.losses import METHODS, DiffusionLoss, TrainBatch, neighbour_request, options_in_effect
from pogdiff.objectives.neighbours import UNET_SPACE
from pogdiff.objectives.neighbours import NeighbourRequest
from pogdiff.options import DEFAULT_MAX_TRAIN_STEPS, RESUMABLE_CHANGES, TrainConfig, check_sampler, check_values
from pogdiff.training.row_log import RowLog
from pogdiff.training.row_sampler import RowSchedule, row_weights
from pogdiff.training.run_folder import (DATA_CONTENT, GLOBAL_BATCH, PRETRAINED_WEIGHTS, PSI_FILE, RunFolder,
                                         checkpoint_step, checkpoint_trained_weights_only, load_checkpoint,
                                         reported_write_errors, save_checkpoint, save_psi, write_run_info,
                                         written_by_train)
from pogdiff.backbones.sampling import generate
from pogdiff.backbones.shipped import SHIPPED_NAME, SHIPPED_RESOLUTION, loading_shipped, shipped_backbone_dir

LOSS_EVERY = 10  # steps between reading the loss back (a host synchronisation) for the bar, the log and NaN
HELD_MAX_BYTES = 4 * 2**30  # the small backbone's tables are held on the device up to this size
READ_AHEAD = 1  # micro-steps read on a background thread while the current one trains (0: read in the loop)
TRACKER_EXTRAS = {"tensorboard": ("tensorboard", "tensorboard"), "wandb": ("wandb", "wandb")}  # module, extra


def train(config: TrainConfig) -> Path:
    """Fine-tune with ``config.method`` and write a run folder; returns its path.

    The run folder is claimed (:meth:`RunFolder.claimed`) from its creation until this returns.
    """
    with contextlib.ExitStack() as run_folder:
        return _train(config, run_folder)


def _train(config: TrainConfig, run_folder: contextlib.ExitStack) -> Path:
    # Checks: whatever can be refused is refused before any work, and before anything is written.
    check_options(config)
    config = with_dataset_folder(config)
    folder = output_folder(config)
    out = folder.check()
    accelerator = make_accelerator(config, out)
    # what a resumed run must be given again (each checkpoint records it)
    started_with = {**options_to_keep(config),
                    GLOBAL_BATCH: f"{accelerator.num_processes} x {config.train_batch_size}"}
    # the steps are known here unless --num-train-epochs sets them, from the dataset's size: then checked once read
    steps = config.max_train_steps or (None if config.num_train_epochs else DEFAULT_MAX_TRAIN_STEPS)
    if config.resume_from_checkpoint:
        # reads the checkpoint's bytes back: one process does it, the others get its answer
        checkpoint = on_main_process(lambda: folder.check_resume(started_with, steps))
    dataset = load_dataset(config.data_dir, config.caption_column, config.identity_column, config.image_column)
    if config.resume_from_checkpoint or config.checkpointing_steps:
        with built_once_first():  # the others read the file digests this one remembered
            started_with = {**started_with, DATA_CONTENT: dataset_digest(dataset, config.cache_dir)}
    if config.resume_from_checkpoint:
        folder.check_content(checkpoint, DATA_CONTENT, started_with[DATA_CONTENT])
    global_batch = config.train_batch_size * accelerator.num_processes
    check_batch_fits(dataset, global_batch, config)
    check_neighbours_fit(dataset, neighbours_of(config))
    config = replace(config, max_train_steps=train_steps(config, len(dataset), global_batch))
    if config.resume_from_checkpoint and steps is None:
        folder.check_steps(checkpoint, config.max_train_steps)

    # Model: the same initial weights (or LoRA adapters) on every rank and for every method.
    backbone = make_backbone(config)
    process = forward_process(config, backbone)  # before any encoding: refuses options it cannot take
    if config.pretrained:  # the base's files, not its path: other weights moved there are another run
        with built_once_first():  # a memo of the files' digests in the cache folder
            backbone.pretrained_sha256 = pipeline_fingerprint(backbone.pretrained, config.cache_dir)
        started_with = {**started_with, PRETRAINED_WEIGHTS: backbone.pretrained_sha256}
        if config.resume_from_checkpoint:
            folder.check_content(checkpoint, PRETRAINED_WEIGHTS, backbone.pretrained_sha256)
    config = replace(config, resolution=config.resolution or backbone.resolution,
                     learning_rate=learning_rate(config, backbone, global_batch))

    # Encoded dataset (Eqs. 8, 10), loss and row sampler: the frozen encoders run once, each process encoding
    # its share of the rows into the on-disk caches (pogdiff encode); the loop reads them a batch at a time.
    encoded, x0_tables = encode_for_training(dataset, backbone, config, accelerator.device,
                                             accelerator.mixed_precision, neighbours_of(config))
    encoded = encoded.to(accelerator.device)
    if not config.validation_prompts:  # the captions are cached: the text encoders (T5-XXL: 9.5 GB) leave the device
        for model in backbone.text_encoder.models:
            model.to("cpu")
    if backbone.kind == PixelBackbone.kind:  # small tables: held on the device, nothing copied per step
        x0_tables, encoded = held_on(accelerator.device, x0_tables, encoded)
    loss_fn = make_loss(config, process, encoded)
    sampling_weights = row_weights(sampler_of(config), encoded, config.density_max_ratio)
    psi_per_row = loss_fn.psi_per_row()

    # Run folder: the inputs are good, only now is anything written to it.
    if accelerator.is_main_process:
        run_folder.enter_context(folder.claimed())
    accelerator.wait_for_everyone()
    row_log = None
    if config.log_rows:
        row_log = RowLog(out, accelerator.process_index, encoded, loss_fn.tables.neighbours,
                         None if psi_per_row is None else psi_per_row["psi"])
    if accelerator.is_main_process and psi_per_row is not None:
        with reported_write_errors(out / PSI_FILE, out):
            save_psi(out, psi_per_row, few_rows(dataset), neighbour_space(encoded, neighbours_of(config)))

    # Optimizer: the whole UNet, or its LoRA adapters.
    denoiser = backbone.denoiser.train()
    if config.gradient_checkpointing:
        denoiser.enable_gradient_checkpointing()
    trained = [p for p in denoiser.parameters() if p.requires_grad]
    if config.allow_tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
    optimizer = make_optimizer(config, trained)
    lr_scheduler = get_scheduler(config.lr_scheduler, optimizer,
                                 num_warmup_steps=config.lr_warmup_steps * accelerator.num_processes,
                                 num_training_steps=config.max_train_steps * accelerator.num_processes)
    denoiser, optimizer, lr_scheduler = accelerator.prepare(denoiser, optimizer, lr_scheduler)
    checkpoint_trained_weights_only(accelerator)
    ema = make_ema(accelerator, trained, config) if config.use_ema else None
    clock = TrainClock(accelerator.device)
    accelerator.register_for_checkpointing(clock)  # after the EMA: checkpoints hold custom states in this order
    if accelerator.is_main_process:
        accelerator.init_trackers(config.tracker_project_name, config={
            k: v for k, v in asdict(config).items() if isinstance(v, (int, float, str, bool))})

    # Resume. Seeded here, after the set-up: its random draws (e.g. building encoders on a cache
    # miss) must not shift those of training. A resumed run restores the checkpoint's states instead.
    set_seed(config.seed, device_specific=True)
    global_step = 0
    if config.resume_from_checkpoint:
        load_checkpoint(accelerator, checkpoint)
        if ema is not None:
            ema.to(accelerator.device)  # accelerate loads custom states onto the CPU
        global_step = checkpoint_step(checkpoint)

    # Loop.
    def denoise(x_t, t, cond):
        return backbone.denoise(denoiser, x_t, t, cond)

    bar = tqdm(total=config.max_train_steps, initial=global_step, desc=f"train {config.method}", unit="step",
               disable=not (config.progress and accelerator.is_local_main_process))
    micro_step = global_step * config.gradient_accumulation_steps
    read = batch_reader(RowSchedule(len(dataset), global_batch, config.seed, sampling_weights), x0_tables, encoded,
                        accelerator)
    reads = run_folder.enter_context(contextlib.closing(
        read_ahead(read, range(micro_step, config.max_train_steps * config.gradient_accumulation_steps))))
    while global_step < config.max_train_steps:
        step_reads = next(reads)
        micro_step += 1
        if row_log:
            row_log.step(micro_step, step_reads.rows)
        with accelerator.accumulate(denoiser):
            batch = draw_batch(step_reads, backbone, x0_tables, encoded, config, accelerator.device)
            loss = loss_fn(denoise, batch).mean()
            accelerator.backward(loss)
            if accelerator.sync_gradients:
                accelerator.clip_grad_norm_(trained, config.max_grad_norm)
            optimizer.step()
            lr_scheduler.step()
            optimizer.zero_grad(set_to_none=True)
        if not accelerator.sync_gradients:
            continue
        global_step += 1
        if ema is not None:
            ema.step(trained)
        bar.update()
        if global_step % LOSS_EVERY == 0 or global_step == config.max_train_steps:  # .item() waits for the GPU
            loss_value = accelerator.gather(loss.detach()[None]).mean().item()
            if not math.isfinite(loss_value):
                raise PogdiffError(f"training diverged by step {global_step} (loss {loss_value}); "
                                   "lower --learning-rate or check the data")
            bar.set_postfix(loss=f"{loss_value:.4f}")
            accelerator.log({"loss": loss_value, "lr": lr_scheduler.get_last_lr()[0]}, step=global_step)
        # the final step too: a finished run can be continued to more steps
        if config.checkpointing_steps and (global_step % config.checkpointing_steps == 0
                                           or global_step == config.max_train_steps):
            save_checkpoint(accelerator, out, global_step, config.checkpoints_total_limit, started_with)
        if config.validation_prompts and accelerator.is_main_process and \
                (global_step % config.validation_steps == 0 or global_step == config.max_train_steps):
            log_validation(accelerator, backbone, config, out, global_step, ema, trained)
    bar.close()

    # Save: the weights (the EMA ones with --use-ema), then RUN_FILE last.
    accelerator.wait_for_everyone()
    if row_log:
        row_log.final_weights(accelerator.unwrap_model(denoiser))
    if accelerator.is_main_process:
        final = accelerator.unwrap_model(denoiser)
        if ema is not None:
            ema.copy_to(trained)
        info = {**backbone.run_info(), "config": asdict(config),
                "loss_options": options_in_effect(config.method, config.method_options),
                "num_processes": accelerator.num_processes, "mixed_precision": accelerator.mixed_precision,
                "steps": global_step, "train_seconds": round(clock.seconds(), 1),
                "train_sessions": clock.sessions()}
        with reported_write_errors(out, out):  # a run folder without RUN_FILE is unfinished
            backbone.save(out, final)
            for entry in written_by_train(out, config.logging_dir):  # readable as the umask says
                apply_umask_to_tree(entry)
            write_run_info(out, info)
    accelerator.wait_for_everyone()  # every process returns a finished run (a benchmark evaluates it next)
    for tracker in accelerator.trackers:  # not end_training(), which also ends the process group: a benchmark
        tracker.finish()                  # trains its next cell in it (pogdiff.cli ends it at exit)
    return out


def encode(config: TrainConfig) -> EncodedDataset:
    """``pogdiff encode``: compute and cache everything ``train`` with the same options reads (latents,
    caption states, text density, and for PoGDiff the image features and neighbours), each process
    encoding its share of the rows; a killed encode continues from its finished shards. Writes no run folder."""
    check_options(config)
    config = with_dataset_folder(config)
    accelerator = make_accelerator(config)
    dataset = load_dataset(config.data_dir, config.caption_column, config.identity_column, config.image_column)
    check_neighbours_fit(dataset, neighbours_of(config))
    backbone = make_backbone(config)
    config = replace(config, resolution=config.resolution or backbone.resolution)
    encoded, _ = encode_for_training(dataset, backbone, config, accelerator.device, accelerator.mixed_precision,
                                     neighbours_of(config))
    return encoded


def make_accelerator(config: TrainConfig, out: Path | None = None) -> Accelerator:
    """The run's accelerator, with the process-group timeout set (--ddp-timeout): a process waits that long for
    the others, e.g. while the local main process builds the neighbour table from everyone's shards."""
    project = ProjectConfiguration(project_dir=str(out), logging_dir=str(out / config.logging_dir)) if out else None
    # accelerate keeps the first Accelerator's settings for the whole process and refuses other ones: forget an
    # earlier run's (the Python API trains several runs in one process), keeping the process group of a launch
    AcceleratorState._reset_state(reset_partial_state=False)
    # mixed_precision None leaves accelerate's own setting (accelerate launch --mixed_precision, accelerate config)
    # --compile: inductor, with CUDA graphs on a GPU ("reduce-overhead": the small backbone's steps are bound by
    # kernel launches there); on a CPU it only costs its first step (docs/pretrained-backbone.md)
    dynamo = TorchDynamoPlugin(backend="inductor", mode="reduce-overhead" if torch.cuda.is_available() else "default") \
        if config.compile else None
    accelerator = Accelerator(gradient_accumulation_steps=config.gradient_accumulation_steps,
                              mixed_precision=config.mixed_precision, log_with=config.report_to if out else None,
                              project_config=project, dynamo_plugin=dynamo,
                              kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(seconds=config.ddp_timeout))])
    set_process_group_timeout(config.ddp_timeout)  # a group made before (--dataset-name's conversion) ignores the above
    if accelerator.mixed_precision == "fp16" and accelerator.device.type == "cpu":
        raise PogdiffError("accelerate's mixed precision is fp16 (accelerate launch --mixed_precision or accelerate "
                           "config), which needs a CUDA GPU, and none is visible; pass --mixed-precision bf16 or no")
    return accelerator


# --- checks ---

def check_options(config: TrainConfig) -> None:
    check_cache_dir(config.cache_dir)
    if config.method not in METHODS:
        raise PogdiffError(f"unknown method {config.method!r}; choose one of {', '.join(METHODS)}")
    if config.lora_rank and not config.pretrained:
        raise PogdiffError("--lora-rank adapts a pretrained checkpoint: pass --pretrained PATH_OR_HUB_ID too")
    for flag, value in (("--lora-alpha", config.lora_alpha), ("--lora-target-modules", config.lora_target_modules)):
        if value is not None and not config.lora_rank:
            raise PogdiffError(f"{flag} shapes LoRA adapters: pass --lora-rank R too (and --pretrained)")
    check_optional_packages(config)
    if config.from_scratch and config.pretrained:
        raise PogdiffError("--from-scratch and --pretrained both choose the backbone; pass one of them")
    if not (config.from_scratch or config.pretrained) and config.resolution not in (None, SHIPPED_RESOLUTION):
        raise PogdiffError(f"--resolution {config.resolution}: the shipped pretrained backbone draws "
                           f"{SHIPPED_RESOLUTION}x{SHIPPED_RESOLUTION} images; drop --resolution or add --from-scratch")
    if config.sampler is not None:
        check_sampler(config.sampler)
    implied = METHODS[config.method].SAMPLER
    if config.sampler not in (None, implied) and implied != "uniform":
        raise PogdiffError(f"--method {config.method} implies --sampler {implied}; drop --sampler {config.sampler} "
                           "or choose another method (resample is vanilla + --sampler balanced)")
    if config.density_max_ratio != TrainConfig.density_max_ratio and sampler_of(config) != "balanced":
        raise PogdiffError("--density-max-ratio applies to the balanced sampler; drop it or pass --sampler balanced")
    check_values({**asdict(config), **config.method_options})
    if config.from_scratch and (neighbours := neighbours_of(config)) and neighbours.space == UNET_SPACE:
        warnings.warn("--from-scratch with neighbours in the unet space: a randomly initialised UNet tells people "
                      "apart poorly (docs/pogdiff-options.md); pass --neighbour-features efficientnet-lite0",
                      PogdiffWarning, stacklevel=2)


def check_optional_packages(config: TrainConfig) -> None:
    """The optional packages the options ask for (--report-to, --use-8bit-adam) are installed."""
    import importlib.util

    wanted = [(f"--report-to {config.report_to}", *TRACKER_EXTRAS[config.report_to])] if config.report_to else []
    if config.use_8bit_adam:
        wanted.append(("--use-8bit-adam", "bitsandbytes", "bitsandbytes"))
    for flag, module, extra in wanted:
        if importlib.util.find_spec(module) is None:
            raise PogdiffError(f"{flag} needs the {module} package, which is not installed; "
                               f"pip install 'pogdiff[{extra}]', or drop {flag.split()[0]}")


def with_dataset_folder(config: TrainConfig) -> TrainConfig:
    """``config`` reading the folder of --dataset-name (:mod:`pogdiff.data.hf_datasets`) as its data_dir."""
    if not config.dataset_name:
        return config
    if config.data_dir:
        raise PogdiffError(f"DATA {config.data_dir} and --dataset-name {config.dataset_name} both name the "
                           "dataset; pass one of them")
    from pogdiff.data.hf_datasets import dataset_folder

    return replace(config, data_dir=str(dataset_folder(config.dataset_name, config.image_column, config.cache_dir)))


def sampler_of(config: TrainConfig) -> str:
    """The row sampler a run uses: --sampler, else the one its method implies."""
    return config.sampler or METHODS[config.method].SAMPLER


def output_folder(config: TrainConfig) -> RunFolder:
    """The run folder ``config`` writes, in plain values: the dataset and the cache must not lie in it."""
    return RunFolder(Path(config.output_dir), data_dir=config.data_dir,
                     inputs=(("the dataset", config.data_dir), ("--cache-dir", cache_folder(config.cache_dir))),
                     overwrite=config.overwrite, resume=config.resume_from_checkpoint, logging_dir=config.logging_dir)



def options_to_keep(config: TrainConfig) -> dict:
    """The options, as given, that a resumed run must be given again (its folders as resolved paths), the dataset's
    metadata (its sha256), and under ``defaults`` what each option left out stands for where that is known before
    the backbone loads: the small backbone's resolution and learning rate, a LoRA's alpha, the method's sampler and
    loss options. A resume that types such a default out is the same run (:meth:`RunFolder.check_resume`)."""
    from pogdiff.training.run_folder import DEFAULTS, PATH_OPTIONS

    options = {k: v for k, v in asdict(config).items() if k not in RESUMABLE_CHANGES}
    for key in PATH_OPTIONS:  # a hub id stays as typed
        if options[key] and os.path.exists(options[key]):
            options[key] = str(Path(options[key]).resolve())
    defaults = {"sampler": METHODS[config.method].SAMPLER, "method_options": options_in_effect(config.method, {})}
    if not config.pretrained:  # as make_backbone and learning_rate
        defaults.update(resolution=32 if config.from_scratch else SHIPPED_RESOLUTION,
                        learning_rate=PixelBackbone.default_learning_rate)
    if config.lora_rank:
        defaults["lora_alpha"] = config.lora_rank
    metadata = Path(config.data_dir) / METADATA_FILE
    return {**options, "data": sha256(metadata) if metadata.is_file() else None, DEFAULTS: defaults}


def train_steps(config: TrainConfig, num_rows: int, global_batch: int) -> int:
    """Optimizer steps: --max-train-steps, else --num-train-epochs' worth (an epoch: every row once, as
    diffusers counts it), else DEFAULT_MAX_TRAIN_STEPS."""
    if config.max_train_steps:
        return config.max_train_steps
    if config.num_train_epochs:
        steps_per_epoch = math.ceil(math.ceil(num_rows / global_batch) / config.gradient_accumulation_steps)
        return config.num_train_epochs * steps_per_epoch
    return DEFAULT_MAX_TRAIN_STEPS


def check_batch_fits(dataset: ImageTextDataset, global_batch: int, config: TrainConfig) -> None:
    if len(dataset) < global_batch:
        raise DatasetError(f"{config.data_dir}: {len(dataset)} images, fewer than one batch of {global_batch}; "
                           "lower --train-batch-size")


# --- model and encoded dataset ---

def make_backbone(config: TrainConfig):
    """The backbone to train, its fresh weights drawn from ``config.seed`` (the global RNG is left alone)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        if config.pretrained:
            backbone = pretrained_backbone(config.pretrained, config.lora_rank, config.lora_alpha,
                                           config.lora_target_modules, config.max_sequence_length, config.resolution)
        elif config.from_scratch:
            backbone = PixelBackbone.create(config.resolution or 32, config.text_max_length, config.block_out_channels)
        else:
            with loading_shipped(shipped_backbone_dir()):
                backbone = PixelBackbone.from_run(shipped_backbone_dir(), name=SHIPPED_NAME)
    if config.prediction_type:  # as diffusers' --prediction_type: the run saves the scheduler with it
        if "prediction_type" not in backbone.scheduler.config:
            raise PogdiffError(f"--prediction-type {config.prediction_type}: a flow-matching backbone ({backbone.kind}) "
                               "always predicts the velocity; drop --prediction-type")
        backbone.scheduler.register_to_config(prediction_type=config.prediction_type)
    return backbone


def learning_rate(config: TrainConfig, backbone, global_batch: int) -> float:
    """--learning-rate or the backbone's default, times the images per optimizer step with --scale-lr."""
    rate = config.learning_rate or backbone.default_learning_rate
    return rate * config.gradient_accumulation_steps * global_batch if config.scale_lr else rate


def neighbours_of(config: TrainConfig) -> NeighbourRequest | None:
    """The feature space and k of Eq. 8's neighbours when the method draws them (PoGDiff), else None."""
    return neighbour_request(config.method, config.method_options)


def forward_process(config: TrainConfig, backbone):
    """The backbone's forward process (DDPM or a flow) with the run's options."""
    return backbone.forward_process(weighting_scheme=config.weighting_scheme, logit_mean=config.logit_mean,
                                    logit_std=config.logit_std, mode_scale=config.mode_scale,
                                    snr_gamma=config.snr_gamma)


def make_loss(config: TrainConfig, process, encoded: EncodedDataset) -> DiffusionLoss:
    """The method's loss with its options (``config.method_options``) under the backbone's forward ``process``, on
    the tables it looks up by row (for PoGDiff, Eq. 8's table as ``encode_for_training`` built it)."""
    return METHODS[config.method](process, loss_tables(encoded, neighbours_of(config)),
                                  snr_gamma=config.snr_gamma, noise_offset=config.noise_offset,
                                  **config.method_options)


def few_rows(dataset: ImageTextDataset) -> torch.Tensor:
    """Whether each training row shows a minority ("Few") identity."""
    few = dataset.few_identities()
    return torch.tensor([name in few for name in dataset.identity_names])


# --- optimizer ---

def make_optimizer(config: TrainConfig, trained: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    """AdamW with diffusers' options (betas, epsilon, weight decay), fused on a GPU; bitsandbytes' 8-bit AdamW
    with --use-8bit-adam."""
    if config.use_8bit_adam:
        import bitsandbytes

        adamw, fused = bitsandbytes.optim.AdamW8bit, {}
    else:  # one kernel for all parameters instead of several per parameter
        adamw, fused = torch.optim.AdamW, {"fused": True} if trained[0].is_cuda else {}
    return adamw(trained, lr=config.learning_rate, betas=(config.adam_beta1, config.adam_beta2),
                 eps=config.adam_epsilon, weight_decay=config.adam_weight_decay, **fused)


def make_ema(accelerator: Accelerator, trained: list[torch.nn.Parameter], config: TrainConfig):
    """An exponential moving average of the trained weights (with warm-up), saved with each checkpoint."""
    from diffusers.training_utils import EMAModel

    ema = EMAModel(trained, decay=config.ema_decay, use_ema_warmup=True, foreach=True)  # one kernel per update
    ema.to(accelerator.device)
    accelerator.register_for_checkpointing(ema)
    return ema


class TrainClock:
    """Seconds spent training and on which hardware, over a run's resumed sessions (saved in every checkpoint)."""

    def __init__(self, device: torch.device):
        self.earlier: list[dict] = []
        self.start = time.monotonic()
        self.hardware = describe_hardware(device)

    def seconds(self) -> float:
        return sum(s["seconds"] for s in self.sessions())

    def sessions(self) -> list[dict]:
        return [*self.earlier, {"seconds": round(time.monotonic() - self.start, 1), "hardware": self.hardware}]

    def state_dict(self) -> dict:
        return {"sessions": self.sessions()}

    def load_state_dict(self, state: dict) -> None:
        self.earlier, self.start = state["sessions"], time.monotonic()


def describe_hardware(device: torch.device) -> str:
    """E.g. "NVIDIA H100 80GB HBM3" or "AMD EPYC 7B13, 2 cores, 1 torch thread"."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").is_file() \
        else platform.processor()
    threads = torch.get_num_threads()
    return f"{cpu}, {os.cpu_count()} cores, {threads} torch thread{'s' if threads > 1 else ''}"


# --- loop ---

def held_on(device, x0_tables: list, encoded: EncodedDataset) -> tuple[list, EncodedDataset]:
    """The x0 tables and caption states held on ``device`` (when they fit HELD_MAX_BYTES): a batch is then
    gathered there, with no copy from the host and no synchronisation per step."""
    tables = [*x0_tables, encoded.caption_table]
    if sum(math.prod(t.shape) * t.dtype.itemsize for t in tables) > HELD_MAX_BYTES:
        return x0_tables, encoded
    held = [t.held_on(device) for t in tables]
    return held[:-1], replace(encoded, caption_table=held[-1])


@dataclass
class BatchReads:
    """A micro-step's rows and what is read for them on the host (:func:`batch_reader`), for :func:`draw_batch`."""

    rows: torch.Tensor                        # this process's rows, on the CPU
    x0: list[torch.Tensor] | None = None      # their rows of each x0 table; None: tables held on the device
    states: torch.Tensor | None = None        # their caption states; None: the table is held on the device


def batch_reader(schedule: RowSchedule, x0_tables: list, encoded: EncodedDataset,
                 accelerator: Accelerator) -> Callable[[int], BatchReads]:
    """``read(micro_step)``: this process's share of the step's rows and their values in the tables read on the
    host (on disk, or in memory), pinned for an asynchronous copy on CUDA. It draws nothing from the global RNG,
    so it can run ahead of the loop; under --random-flip both variants are read, as the flips are drawn at the step.
    Tables held on a device (:func:`held_on`) are left to :func:`draw_batch`."""
    caption_index = encoded.caption_index.cpu()
    x0_on_host, states_on_host = (table.device.type == "cpu" for table in (x0_tables[0], encoded.caption_table))
    pinned = torch.Tensor.pin_memory if accelerator.device.type == "cuda" else (lambda tensor: tensor)

    def read(micro_step: int) -> BatchReads:
        rows = schedule[micro_step][accelerator.process_index::accelerator.num_processes]
        x0 = [pinned(table[rows]) for table in x0_tables] if x0_on_host else None
        states = pinned(encoded.caption_table[caption_index[rows]]) if states_on_host else None
        return BatchReads(pinned(rows), x0, states)

    return read


def read_ahead(read: Callable[[int], BatchReads], steps: range, ahead: int | None = None) -> Iterator[BatchReads]:
    """``read(m)`` for each micro-step m of ``steps``, in order, the next ``ahead`` (default READ_AHEAD) read on a
    background thread while the caller trains on the current one. An exception of ``read`` is raised here,
    at the step it belongs to; closing the iterator waits for the read in flight."""
    ahead = READ_AHEAD if ahead is None else ahead
    if ahead == 0:
        yield from map(read, steps)
        return
    pool = ThreadPoolExecutor(1, thread_name_prefix="pogdiff-reads")
    try:
        pending = collections.deque(pool.submit(read, m) for m in steps[:ahead])
        for m in steps[ahead:]:
            pending.append(pool.submit(read, m))
            yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        pool.shutdown(cancel_futures=True)


def draw_batch(reads: BatchReads, backbone, x0_tables: list, encoded: EncodedDataset, config: TrainConfig,
               device) -> TrainBatch:
    """x0 of each row (of its mirror image, drawn at random under --random-flip) and its caption states,
    the empty caption's where it is dropped for classifier-free guidance. Values read on the host
    (``reads``) are copied to ``device`` without waiting; tables held there (:func:`held_on`) are indexed there."""
    non_blocking = reads.rows.is_pinned()
    rows = reads.rows.to(device, non_blocking=non_blocking)
    variants = [table[rows] for table in x0_tables] if reads.x0 is None \
        else [x0.to(device, non_blocking=non_blocking) for x0 in reads.x0]
    cached = variants[0]
    if config.random_flip:  # [plain, mirror image]: one at random per row, drawn before the caption dropout
        flipped = torch.rand(len(rows), device=rows.device) < 0.5
        cached = torch.where(flipped.view(-1, *[1] * (cached.dim() - 1)), variants[1], cached)
    x0 = backbone.x0_from_cache(cached)
    dropped = torch.rand(len(rows), device=x0.device) < config.caption_dropout
    states = encoded.caption_states(rows) if reads.states is None \
        else reads.states.to(device, non_blocking=non_blocking).float()
    cond = torch.where(dropped[:, None, None], encoded.uncond_states.expand(len(rows), -1, -1), states)
    return TrainBatch(x0, cond, rows, dropped)


# --- checkpoints and validation, during the loop ---

def log_validation(accelerator: Accelerator, backbone, config: TrainConfig, out: Path, step: int, ema,
                   trained: list[torch.nn.Parameter]) -> None:
    """Sample the validation prompts with the current weights (the EMA ones with --use-ema):
    a grid in OUTPUT_DIR/validation/ and, with --report-to tensorboard, in the log."""
    if ema is not None:
        ema.store(trained)
        ema.copy_to(trained)
    images = generate(backbone, config.validation_prompts, config.num_validation_images, seed=config.seed,
                      progress=False)
    backbone.denoiser.train()
    if ema is not None:
        ema.restore(trained)
    per_prompt = images.view(len(config.validation_prompts), config.num_validation_images, *images.shape[1:])
    path = save_grid(list(zip(config.validation_prompts, per_prompt)), out / "validation" / f"step-{step:06d}.png",
                     cell=min(images.shape[-1], 256))
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_image("validation", np.asarray(Image.open(path)), step, dataformats="HWC")
        elif tracker.name == "wandb":
            import wandb

            tracker.log({"validation": wandb.Image(str(path))}, step=step)
