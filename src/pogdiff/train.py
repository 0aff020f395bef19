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
import json
import math
import os
import pickle
import platform
import shutil
import time
import warnings
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, fields, replace
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import InitProcessGroupKwargs, ProjectConfiguration, TorchDynamoPlugin, set_seed
from diffusers.optimization import get_scheduler
from PIL import Image
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from pogdiff.backbone import PixelBackbone, StableDiffusionBackbone
from pogdiff.cache import check_cache_dir, default_cache_dir
from pogdiff.data.dataset import METADATA_FILE, ImageTextDataset, load_dataset
from pogdiff.encoded_dataset import EncodedDataset, encode_for_training
from pogdiff.errors import DatasetError, Interrupted, PogdiffError, PogdiffWarning, first_line
from pogdiff.files import apply_umask_to_tree, incomplete, remove_quietly, sha256, write_errors_as_os_errors
from pogdiff.images import save_grid
from pogdiff.losses import METHODS, DiffusionLoss, TrainBatch, options_in_effect
from pogdiff.neighbour_features import UNET_SPACE
from pogdiff.options import check_values
from pogdiff.ownership import MARK_FILE, claimed, entries, is_marked, refuse_if_in_use
from pogdiff.row_log import RowLog
from pogdiff.row_sampler import SAMPLERS, RowSchedule, row_weights
from pogdiff.run_folder import (CHECKPOINT_PREFIX, CHECKPOINT_RECORD, PSI_FILE, RUN_FILE, changed_checkpoint_file,
                                checkpoint_step, checkpoints, is_run_entry, latest_checkpoint, read_checkpoint_record,
                                save_psi, write_checkpoint_record, write_run_info)
from pogdiff.sampling import generate
from pogdiff.shards import ShardedTable
from pogdiff.shipped import SHIPPED_NAME, SHIPPED_RESOLUTION, loading_shipped, shipped_backbone_dir

TRAINED_WEIGHTS_FILE = "trained_weights.safetensors"  # in each checkpoint-N folder


@dataclass
class TrainConfig:
    """Training options, named and meant as in diffusers' ``train_text_to_image.py``.

    ``None`` defaults depend on the backbone: the small CPU one (``pretrained=None``) or a
    diffusers checkpoint. ``PAPER_PRESETS`` hold Sec. 4.1's settings.
    """

    data_dir: str
    output_dir: str
    method: str = "pogdiff"
    seed: int = 0
    # backbone: a diffusers Stable Diffusion checkpoint (folder or hub id), else the small pixel model
    # (the shipped pretrained one, or random weights with from_scratch)
    pretrained: str | None = None
    lora_rank: int | None = None
    lora_alpha: float | None = None  # None: the rank (scale 1), as train_text_to_image_lora.py
    lora_target_modules: tuple[str, ...] | None = None  # None: the attention projections (StableDiffusionBackbone)
    prediction_type: str | None = None  # None: the checkpoint scheduler's (epsilon or v_prediction)
    # data: the folder data_dir, or a Hugging Face `datasets` folder (dataset_name, pogdiff.data.hf_datasets)
    dataset_name: str | None = None
    resolution: int | None = None  # the backbone's own: 32 small, 512 for SD v1.5
    center_crop: bool = True
    random_flip: bool = False
    caption_column: str = "text"
    identity_column: str = "identity"
    image_column: str = "file_name"
    caption_dropout: float = 0.1
    dataloader_num_workers: int | None = None  # processes decoding images while encoding (0: the main process;
    # None: the CPUs per local process, at most 8: pogdiff.data.image_files.decode_workers)
    # optimisation
    train_batch_size: int = 16
    gradient_accumulation_steps: int = 1
    max_train_steps: int | None = None  # None: num_train_epochs' worth, else DEFAULT_MAX_TRAIN_STEPS
    num_train_epochs: int | None = None
    learning_rate: float | None = None  # 1e-3 small, 1e-5 full SD (Sec. 4.1), 1e-4 LoRA
    scale_lr: bool = False  # learning_rate x gradient accumulation x batch x processes, as diffusers' --scale_lr
    lr_scheduler: str = "constant"
    lr_warmup_steps: int = 0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    adam_weight_decay: float = 1e-2
    use_8bit_adam: bool = False  # bitsandbytes' AdamW8bit
    max_grad_norm: float = 1.0
    noise_offset: float = 0.0
    mixed_precision: str | None = None  # None: accelerate's (accelerate launch --mixed_precision, accelerate config)
    allow_tf32: bool = False
    gradient_checkpointing: bool = False
    compile: bool = False  # torch.compile the UNet (accelerate's dynamo plugin; CUDA graphs on a GPU)
    use_ema: bool = False
    ema_decay: float = 0.9999
    snr_gamma: float | None = None
    # method: its loss's constructor options (pogdiff.losses), and the row sampler (pogdiff.row_sampler)
    method_options: dict = field(default_factory=dict)
    sampler: str | None = None  # None: the method's own (balanced for resample, uniform otherwise)
    density_max_ratio: float = 10.0  # balanced sampler without identities: clip of the inverse text density
    vae_latent_dim: int = 8
    # small backbone
    from_scratch: bool = False  # else the shipped pretrained one (pogdiff.shipped)
    text_max_length: int = 24  # from scratch only: the shipped backbone has its own
    block_out_channels: tuple[int, ...] = (32, 64, 64)
    # bookkeeping
    checkpointing_steps: int | None = None
    checkpoints_total_limit: int | None = None
    resume_from_checkpoint: str | None = None
    validation_prompts: list[str] | None = None
    validation_steps: int = 500
    num_validation_images: int = 4
    overwrite: bool = False
    report_to: str | None = None
    logging_dir: str = "logs"  # under output_dir
    tracker_project_name: str = "pogdiff"
    ddp_timeout: int = 6 * 3600  # seconds a process waits for the others (e.g. while one builds the neighbours)
    cache_dir: str | None = None
    progress: bool = True
    log_rows: bool = False  # write rows-rank<R>.jsonl (see pogdiff.row_log)


# Sec. 4.1: lr 1e-5; large sets 12,000 steps at 8 x 4; small/medium 6,000 steps at 8 x 1.
PAPER_PRESETS = {
    "paper-large": {"learning_rate": 1e-5, "train_batch_size": 8, "gradient_accumulation_steps": 4,
                    "max_train_steps": 12000},
    "paper-small": {"learning_rate": 1e-5, "train_batch_size": 8, "gradient_accumulation_steps": 1,
                    "max_train_steps": 6000},
}


DEFAULT_MAX_TRAIN_STEPS = 500
LOSS_EVERY = 10  # steps between reading the loss back (a host synchronisation) for the bar, the log and NaN
HELD_MAX_BYTES = 4 * 2**30  # the small backbone's tables are held on the device up to this size
READ_AHEAD = 1  # micro-steps read on a background thread while the current one trains (0: read in the loop)
TRACKER_EXTRAS = {"tensorboard": ("tensorboard", "tensorboard"), "wandb": ("wandb", "wandb")}  # module, extra


def config_fields() -> set[str]:
    return {f.name for f in fields(TrainConfig)}


def train(config: TrainConfig) -> Path:
    """Fine-tune with ``config.method`` and write a run folder; returns its path.

    The run folder is claimed (:func:`claimed_output_dir`) from its creation until this returns.
    """
    with contextlib.ExitStack() as run_folder:
        return _train(config, run_folder)


def _train(config: TrainConfig, run_folder: contextlib.ExitStack) -> Path:
    # Checks: whatever can be refused is refused before any work, and before anything is written.
    check_options(config)
    config = with_dataset_folder(config)
    out = check_output_dir(config)
    started_with = options_to_keep(config)  # what a resumed run must be given again (each checkpoint records it)
    if config.resume_from_checkpoint:
        check_resume(resume_checkpoint(config), started_with, config)
    accelerator = make_accelerator(config, out)
    dataset = load_dataset(config.data_dir, config.caption_column, config.identity_column, config.image_column)
    global_batch = config.train_batch_size * accelerator.num_processes
    check_batch_fits(dataset, global_batch, config)
    METHODS[config.method].check_dataset(dataset, **config.method_options)
    config = replace(config, max_train_steps=train_steps(config, len(dataset), global_batch))

    # Model: the same initial weights (or LoRA adapters) on every rank and for every method.
    backbone = make_backbone(config)
    config = replace(config, resolution=config.resolution or backbone.resolution,
                     learning_rate=learning_rate(config, backbone, global_batch))

    # Encoded dataset (Eqs. 8, 10), loss and row sampler: the frozen encoders run once, each process encoding
    # its share of the rows into the on-disk caches (pogdiff encode); the loop reads them a batch at a time.
    encoded, x0_tables = encode_for_training(dataset, backbone, config, accelerator.device,
                                             accelerator.mixed_precision, neighbours_of(config))
    encoded = encoded.to(accelerator.device)
    if backbone.kind == PixelBackbone.kind:  # small tables: held on the device, nothing copied per step
        x0_tables, encoded = held_on(accelerator.device, x0_tables, encoded)
    with accelerator.local_main_process_first():
        loss_fn = make_loss(config, backbone, encoded)  # PoGDiff's neighbour table (Eq. 8) is read here
    sampling_weights = row_weights(sampler_of(config), encoded, config.density_max_ratio)
    psi_per_row = loss_fn.psi_per_row()

    # Run folder: the inputs are good, only now is anything written to it.
    if accelerator.is_main_process:
        run_folder.enter_context(claimed_output_dir(config))
    accelerator.wait_for_everyone()
    row_log = None
    if config.log_rows:
        row_log = RowLog(out, accelerator.process_index, encoded, loss_fn.neighbours,
                         None if psi_per_row is None else psi_per_row["psi"])
    if accelerator.is_main_process and psi_per_row is not None:
        with reported_write_errors(out / PSI_FILE, out):
            save_psi(out, psi_per_row, few_rows(dataset), loss_fn.neighbour_space())

    # Optimizer: the whole UNet, or its LoRA adapters.
    unet = backbone.unet.train()
    if config.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    trained = [p for p in unet.parameters() if p.requires_grad]
    if config.allow_tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
    optimizer = make_optimizer(config, trained)
    lr_scheduler = get_scheduler(config.lr_scheduler, optimizer,
                                 num_warmup_steps=config.lr_warmup_steps * accelerator.num_processes,
                                 num_training_steps=config.max_train_steps * accelerator.num_processes)
    unet, optimizer, lr_scheduler = accelerator.prepare(unet, optimizer, lr_scheduler)
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
        checkpoint = resume_checkpoint(config)
        load_checkpoint(accelerator, checkpoint)
        if ema is not None:
            ema.to(accelerator.device)  # accelerate loads custom states onto the CPU
        global_step = checkpoint_step(checkpoint)

    # Loop.
    def denoiser(x_t, t, cond):
        return unet(x_t, t, encoder_hidden_states=cond, return_dict=False)[0]

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
        with accelerator.accumulate(unet):
            batch = draw_batch(step_reads, backbone, x0_tables, encoded, config, accelerator.device)
            loss = loss_fn(denoiser, batch).mean()
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
        if config.checkpointing_steps and global_step % config.checkpointing_steps == 0 \
                and global_step < config.max_train_steps:
            save_checkpoint(accelerator, out, global_step, config.checkpoints_total_limit, started_with)
        if config.validation_prompts and accelerator.is_main_process and \
                (global_step % config.validation_steps == 0 or global_step == config.max_train_steps):
            log_validation(accelerator, backbone, config, out, global_step, ema, trained)
    bar.close()

    # Save: the weights (the EMA ones with --use-ema), then RUN_FILE last.
    accelerator.wait_for_everyone()
    if row_log:
        row_log.final_weights(accelerator.unwrap_model(unet))
    if accelerator.is_main_process:
        final = accelerator.unwrap_model(unet)
        if ema is not None:
            ema.copy_to(trained)
        info = {**backbone.run_info(), "config": asdict(config),
                "loss_options": options_in_effect(config.method, config.method_options),
                "num_processes": accelerator.num_processes, "mixed_precision": accelerator.mixed_precision,
                "steps": global_step, "train_seconds": round(clock.seconds(), 1),
                "train_sessions": clock.sessions()}
        with reported_write_errors(out, out):  # a run folder without RUN_FILE is unfinished
            backbone.save(out, final)
            for entry in entries(out):  # what train wrote, readable as the umask says (not the user's files)
                if is_run_entry(entry.name, config.logging_dir):
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
    METHODS[config.method].check_dataset(dataset, **config.method_options)
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
    if config.sampler is not None and config.sampler not in SAMPLERS:
        raise PogdiffError(f"unknown sampler {config.sampler!r}; choose one of {', '.join(SAMPLERS)}")
    implied = METHODS[config.method].SAMPLER
    if config.sampler not in (None, implied) and implied != "uniform":
        raise PogdiffError(f"--method {config.method} implies --sampler {implied}; drop --sampler {config.sampler} "
                           "or choose another method (resample is vanilla + --sampler balanced)")
    if config.density_max_ratio != TrainConfig.density_max_ratio and sampler_of(config) != "balanced":
        raise PogdiffError("--density-max-ratio applies to the balanced sampler; drop it or pass --sampler balanced")
    check_values({**asdict(config), **config.method_options})
    if config.from_scratch and (
            options_in_effect(config.method, config.method_options).get("neighbour_features") == UNET_SPACE):
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


def check_output_dir(config: TrainConfig) -> Path:
    """Refuse to mix two runs in one folder (resume, overwrite, or pick another), to replace a folder that
    pogdiff did not create, to write into a folder another process writes into, or where we cannot write.

    Writes nothing: called before any work, so a bad folder costs seconds, not a run.
    """
    out = Path(config.output_dir)
    if out.exists() and not out.is_dir():
        raise PogdiffError(f"{out}: --output-dir is a file; choose a folder")
    check_inputs_outside(out, config)
    check_folder_state(out, config)
    refuse_if_in_use(out)
    parent = next(p for p in (out.absolute(), *out.absolute().parents) if p.exists())
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        why = "is a file" if not parent.is_dir() else "is not writable"
        raise PogdiffError(f"{out}: cannot create the output folder ({parent} {why}); choose another --output-dir")
    return out


def check_inputs_outside(out: Path, config: TrainConfig) -> None:
    """The dataset and the cache must not live in the run folder (--overwrite would delete them), nor the run
    folder in the dataset (its files would mix with the dataset's)."""
    for what, folder in (("the dataset", config.data_dir), ("--cache-dir", config.cache_dir or default_cache_dir())):
        if Path(folder).resolve().is_relative_to(out.resolve()):
            raise PogdiffError(f"{folder}: {what} is inside --output-dir {out}, where --overwrite or a new run "
                               "would mix with it; choose an --output-dir outside it")
    if out.resolve().is_relative_to(Path(config.data_dir).resolve()):
        raise PogdiffError(f"{out}: --output-dir is inside the dataset {config.data_dir}, whose folder should hold "
                           "only its images and metadata; choose an --output-dir outside it")


def check_folder_state(out: Path, config: TrainConfig) -> None:
    """What the folder holds against what was asked: a new run needs a new or empty folder, or pogdiff's own
    run with --overwrite; --resume-from-checkpoint needs a whole checkpoint of pogdiff's own run."""
    if config.resume_from_checkpoint:
        resume_checkpoint(config)
        return
    if not entries(out):
        return
    if not is_marked(out):
        raise PogdiffError(f"{out}: output folder is not empty and pogdiff did not create it, so neither --overwrite "
                           "nor --resume-from-checkpoint touch it; choose another --output-dir")
    if config.overwrite:
        return
    if (out / RUN_FILE).is_file():
        raise PogdiffError(f"{out}: output folder already holds a run; pass --overwrite to replace it, "
                           "or choose another --output-dir")
    raise PogdiffError(f"{out}: output folder holds an unfinished run; {how_to_continue(out)}, "
                       "or choose another --output-dir")


def how_to_continue(out: Path) -> str:
    """The fix for an unfinished run: resume from its last checkpoint, or start it afresh."""
    last = latest_checkpoint(out)
    if last is None:
        return "start the run afresh with --overwrite (no checkpoint was saved)"
    return f"continue from {last.name} with --resume-from-checkpoint latest, or start afresh with --overwrite"


def resume_checkpoint(config: TrainConfig) -> Path:
    """The checkpoint --resume-from-checkpoint names ('latest': the newest finished one), a whole checkpoint
    of the pogdiff run in --output-dir."""
    out, wanted = Path(config.output_dir), config.resume_from_checkpoint
    if not is_marked(out):
        found = checkpoints(out) if out.is_dir() else []
        if found:
            raise PogdiffError(f"{out}: holds {', '.join(c.name for c in found[:3])}{', ...' if len(found) > 3 else ''} "
                               f"but no {MARK_FILE} (copied without its hidden files?), so pogdiff does not resume "
                               f"into it; copy the whole run folder (cp -a RUN/. {out}/) or resume the original")
        raise PogdiffError(f"{out}: no checkpoint to resume from ({wanted}): not a pogdiff run folder; "
                           "drop --resume-from-checkpoint to start afresh, or pass the --output-dir of the run")
    saved = checkpoints(out)
    if not saved:
        raise PogdiffError(f"{out}: no checkpoint to resume from: the run saved none; start it afresh with --overwrite")
    if wanted == "latest":
        checkpoint = saved[-1]
    else:
        path = out / wanted if len(Path(wanted).parts) == 1 else Path(wanted)
        checkpoint = next((c for c in saved if c.resolve() == path.resolve()), None)
        if checkpoint is None:
            raise PogdiffError(f"{wanted}: not a checkpoint of the run in {out}; pass latest or one of "
                               f"{', '.join(c.name for c in saved)}")
    damage = checkpoint_damage(checkpoint)
    if damage:
        raise PogdiffError(f"{checkpoint}: {damage}; {restart_from_before(checkpoint)}")
    return checkpoint


def checkpoint_damage(checkpoint: Path) -> str | None:
    """Why a checkpoint cannot be loaded (its weights missing, or a file cut short), None when it looks whole.
    Reads headers only: the folder's state is checked several times (:func:`check_resume` reads the bytes once)."""
    if not (checkpoint / TRAINED_WEIGHTS_FILE).is_file():
        return f"no {TRAINED_WEIGHTS_FILE}"
    for file in sorted(p for p in checkpoint.iterdir() if p.is_file()):
        reason = incomplete(file)
        if reason:
            return f"{file.name} is damaged ({reason})"
    return None


# Options a resumed run may change: how long it runs, what it logs and saves, where it caches.
RESUMABLE_CHANGES = {"output_dir", "data_dir", "max_train_steps", "num_train_epochs", "checkpointing_steps",
                     "checkpoints_total_limit", "resume_from_checkpoint", "validation_prompts", "validation_steps",
                     "num_validation_images", "overwrite", "report_to", "logging_dir", "tracker_project_name",
                     "ddp_timeout", "cache_dir", "progress", "log_rows", "dataloader_num_workers", "mixed_precision",
                     "allow_tf32"}


def options_to_keep(config: TrainConfig) -> dict:
    """The options, as given, that a resumed run must be given again, and the dataset's metadata (its sha256)."""
    options = {k: v for k, v in asdict(config).items() if k not in RESUMABLE_CHANGES}
    metadata = Path(config.data_dir) / METADATA_FILE
    return {**options, "data": sha256(metadata) if metadata.is_file() else None}


def check_resume(checkpoint: Path, given: dict, config: TrainConfig) -> None:
    """Refuse, before any work, a resume from a checkpoint whose bytes changed since it was saved, whose run was
    started with other options or data, or that is past --max-train-steps."""
    changed = changed_checkpoint_file(checkpoint)
    if changed:
        raise PogdiffError(f"{checkpoint}: {changed} is damaged (missing, or its bytes differ from the sha256 in "
                           f"{CHECKPOINT_RECORD}); {restart_from_before(checkpoint)}")
    record = read_checkpoint_record(checkpoint)
    if record is not None:
        started = json.loads(json.dumps(record["options"]))
        now = json.loads(json.dumps(given, default=str))
        differ = [k for k in sorted(set(started) | set(now)) if started.get(k) != now.get(k)]
        if differ:
            shown = ", ".join("the dataset's metadata.jsonl" if k == "data" else
                              f"{k} (run: {started.get(k)!r}, now: {now.get(k)!r})" for k in differ[:3])
            raise PogdiffError(f"{checkpoint}: the run was started with other options or data: {shown}"
                               f"{' and more' if len(differ) > 3 else ''}; resume with the run's own options, or "
                               "start a new run in another --output-dir")
    if config.max_train_steps is not None and config.max_train_steps < checkpoint_step(checkpoint):
        raise PogdiffError(f"{checkpoint}: already past --max-train-steps {config.max_train_steps}; pass a larger "
                           f"--max-train-steps, or resume from an earlier checkpoint")


def restart_from_before(checkpoint: Path) -> str:
    """The fix for a damaged checkpoint: the one saved before it, or a fresh run."""
    earlier = [c for c in checkpoints(checkpoint.parent) if checkpoint_step(c) < checkpoint_step(checkpoint)]
    fresh = "start the run afresh with --overwrite"
    if not earlier:
        return fresh
    return f"resume from the one before with --resume-from-checkpoint {earlier[-1].name}, or {fresh}"


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
            backbone = StableDiffusionBackbone.from_pretrained(config.pretrained, config.lora_rank, config.lora_alpha,
                                                               config.lora_target_modules)
        elif config.from_scratch:
            backbone = PixelBackbone.create(config.resolution or 32, config.text_max_length, config.block_out_channels)
        else:
            with loading_shipped(shipped_backbone_dir()):
                backbone = PixelBackbone.from_run(shipped_backbone_dir(), name=SHIPPED_NAME)
    if config.prediction_type:  # as diffusers' --prediction_type: the run saves the scheduler with it
        backbone.scheduler.register_to_config(prediction_type=config.prediction_type)
    return backbone


def learning_rate(config: TrainConfig, backbone, global_batch: int) -> float:
    """--learning-rate or the backbone's default, times the images per optimizer step with --scale-lr."""
    rate = config.learning_rate or backbone.default_learning_rate
    return rate * config.gradient_accumulation_steps * global_batch if config.scale_lr else rate


def neighbours_of(config: TrainConfig) -> tuple[str, int] | None:
    """The feature space and k of Eq. 8's neighbours when the method draws them (PoGDiff), else None."""
    options = options_in_effect(config.method, config.method_options)
    return (options["neighbour_features"], options["k"]) if "neighbour_features" in options else None


def make_loss(config: TrainConfig, backbone, encoded: EncodedDataset) -> DiffusionLoss:
    """The method's loss with its options (``config.method_options``); PoGDiff finds its neighbours here."""
    return METHODS[config.method](backbone.scheduler, encoded, snr_gamma=config.snr_gamma,
                                  noise_offset=config.noise_offset, **config.method_options)


# --- run folder ---

@contextlib.contextmanager
def claimed_output_dir(config: TrainConfig) -> Iterator[Path]:
    """Create the output folder, claim it (mark and lock it, :mod:`pogdiff.ownership`), check it again under
    the lock, and empty it for --overwrite; the claim lasts for the block.

    A Ctrl-C inside the block becomes a one-line error that says how to continue the run.
    """
    out = check_output_dir(config)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.touch()
        probe.unlink()
    except OSError as error:
        raise PogdiffError(f"{out}: cannot write to the output folder ({error.strerror}); choose another --output-dir")
    with claimed(out):
        check_folder_state(out, config)  # another process may have finished a run here since the first check
        if config.overwrite and not config.resume_from_checkpoint:
            for entry in entries(out):  # only what train wrote: an eval/ or notes of the user's stay
                if not is_run_entry(entry.name, config.logging_dir):
                    continue
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry)
                else:
                    entry.unlink()
        try:
            yield out
        except KeyboardInterrupt:
            raise Interrupted(f"{out}: interrupted; {how_to_continue(out)}") from None


def few_rows(dataset: ImageTextDataset) -> torch.Tensor:
    """Whether each training row shows a minority ("Few") identity."""
    few = dataset.few_identities()
    return torch.tensor([name in few for name in dataset.identity_names])


# --- optimizer ---

def checkpoint_trained_weights_only(accelerator: Accelerator) -> None:
    """Checkpoints hold the trained parameters only (a few MB for LoRA, not the frozen UNet)."""

    def save(models, weights, output_dir):
        if accelerator.is_main_process:
            model = accelerator.unwrap_model(models[0])
            save_file({n: p.detach().contiguous() for n, p in model.named_parameters() if p.requires_grad},
                      Path(output_dir) / TRAINED_WEIGHTS_FILE)
        weights.clear()

    def load(models, input_dir):
        model = accelerator.unwrap_model(models.pop())
        state = load_file(Path(input_dir) / TRAINED_WEIGHTS_FILE)
        expected = {n for n, p in model.named_parameters() if p.requires_grad}
        if set(state) != expected:
            raise PogdiffError(f"{input_dir}: this checkpoint holds other weights than this run trains "
                               "(another --lora-rank or --pretrained?); resume with the options it was saved with")
        model.load_state_dict(state, strict=False)

    accelerator.register_save_state_pre_hook(save)
    accelerator.register_load_state_pre_hook(load)


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


def load_checkpoint(accelerator: Accelerator, checkpoint: Path) -> None:
    """Restore the training state; a file that cannot be read is a one-line error saying what to resume from."""
    try:
        accelerator.load_state(str(checkpoint))
    except (SafetensorError, RuntimeError, OSError, EOFError, pickle.UnpicklingError) as error:
        raise PogdiffError(f"{checkpoint}: cannot load this checkpoint ({first_line(error)}); "
                           f"{restart_from_before(checkpoint)}") from None


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
    """The x0 tables and caption states as tensors on ``device`` (when they fit HELD_MAX_BYTES): a batch is then
    gathered there, with no copy from the host and no synchronisation per step."""
    tables = [*x0_tables, encoded.caption_table]
    if sum(math.prod(t.shape) * t.dtype.itemsize for t in tables) > HELD_MAX_BYTES:
        return x0_tables, encoded
    held = [t.to(device) if isinstance(t, torch.Tensor) else torch.cat(t.chunks()).to(device) for t in tables]
    return held[:-1], replace(encoded, caption_table=held[-1])


@dataclass
class BatchReads:
    """A micro-step's rows and what is read for them on the host (:func:`batch_reader`), for :func:`draw_batch`."""

    rows: torch.Tensor                        # this process's rows, on the CPU
    x0: list[torch.Tensor] | None = None      # their rows of each x0 table on disk; None: tables held on the device
    states: torch.Tensor | None = None        # their caption states from disk; None: the table is on the device


def batch_reader(schedule: RowSchedule, x0_tables: list, encoded: EncodedDataset,
                 accelerator: Accelerator) -> Callable[[int], BatchReads]:
    """``read(micro_step)``: this process's share of the step's rows and their values in the tables on disk,
    pinned for an asynchronous copy on CUDA. It draws nothing from the global RNG, so it can run ahead of
    the loop; under --random-flip both variants are read, as the flips are drawn at the step."""
    caption_index = encoded.caption_index.cpu()
    on_disk = not isinstance(x0_tables[0], torch.Tensor)
    pinned = torch.Tensor.pin_memory if accelerator.device.type == "cuda" else (lambda tensor: tensor)

    def read(micro_step: int) -> BatchReads:
        rows = schedule[micro_step][accelerator.process_index::accelerator.num_processes]
        x0 = [pinned(table[rows]) for table in x0_tables] if on_disk else None
        states = pinned(encoded.caption_table[caption_index[rows]]) \
            if isinstance(encoded.caption_table, ShardedTable) else None
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
    the empty caption's where it is dropped for classifier-free guidance. Values read from the tables on disk
    (``reads``) are copied to ``device`` without waiting; tables held there (:func:`held_on`) are indexed there."""
    non_blocking = reads.rows.is_pinned()
    rows = reads.rows.to(device, non_blocking=non_blocking)
    flipped = torch.rand(len(rows), device=rows.device) < 0.5 if config.random_flip \
        else torch.zeros(len(rows), dtype=torch.bool, device=rows.device)
    variants = [table[rows] for table in x0_tables] if reads.x0 is None \
        else [x0.to(device, non_blocking=non_blocking) for x0 in reads.x0]
    cached = variants[0] if len(variants) == 1 \
        else torch.where(flipped.view(-1, *[1] * (variants[0].dim() - 1)), variants[1], variants[0])
    x0 = backbone.x0_from_cache(cached)
    dropped = torch.rand(len(rows), device=x0.device) < config.caption_dropout
    states = encoded.caption_states(rows) if reads.states is None \
        else reads.states.to(device, non_blocking=non_blocking).float()
    cond = torch.where(dropped[:, None, None], encoded.uncond_states.expand(len(rows), -1, -1), states)
    return TrainBatch(x0, cond, rows, dropped)


# --- checkpoints and validation, during the loop ---

def save_checkpoint(accelerator: Accelerator, out: Path, step: int, total_limit: int | None,
                    options: dict | None = None) -> None:
    """Save the full training state atomically: written to a temporary folder, then renamed; with ``options``
    (the run's own, see :func:`options_to_keep`), a record of them and of each file's sha256 goes with it.

    A failed write (disk full) removes the temporary folder and raises a one-line error;
    the checkpoints saved before stay as they were.
    """
    accelerator.wait_for_everyone()
    final = out / f"{CHECKPOINT_PREFIX}{step}"
    tmp = out / f".checkpoint-{step}.tmp"
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    with reported_write_errors(final, out, cleanup=tmp if accelerator.is_main_process else None):
        accelerator.save_state(str(tmp))
        if accelerator.is_main_process:
            apply_umask_to_tree(tmp)
            if options is not None:
                write_checkpoint_record(tmp, options)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if final.exists():  # resumed from an earlier checkpoint: this step's new state replaces the old one
            old = out / f".checkpoint-{step}.old"
            shutil.rmtree(old, ignore_errors=True)
            final.rename(old)
            tmp.rename(final)
            shutil.rmtree(old)
        else:
            tmp.rename(final)
        if total_limit:
            for old in checkpoints(out)[:-total_limit]:
                shutil.rmtree(old)
    accelerator.wait_for_everyone()


@contextlib.contextmanager
def reported_write_errors(target: Path, out: Path, cleanup: Path | None = None):
    """Turn a failed write of ``target`` (disk full, permissions) into a one-line error saying how to go on."""
    try:
        with write_errors_as_os_errors(target):
            yield
    except OSError as error:
        if cleanup is not None:
            remove_quietly(cleanup)
        raise PogdiffError(f"{target}: cannot write ({error.strerror or error}); free space, then "
                           f"{how_to_continue(out)}") from None


def log_validation(accelerator: Accelerator, backbone, config: TrainConfig, out: Path, step: int, ema,
                   trained: list[torch.nn.Parameter]) -> None:
    """Sample the validation prompts with the current weights (the EMA ones with --use-ema):
    a grid in OUTPUT_DIR/validation/ and, with --report-to tensorboard, in the log."""
    if ema is not None:
        ema.store(trained)
        ema.copy_to(trained)
    images = generate(backbone, config.validation_prompts, config.num_validation_images, seed=config.seed,
                      progress=False)
    backbone.unet.train()
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
