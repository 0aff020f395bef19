"""``pogdiff pretrain``: the small backbone learns to draw people before it is fine-tuned.

The paper fine-tunes Stable Diffusion, which already draws faces and follows captions.
The small backbone gets the same start: it is trained from random weights on the
name-free pretraining corpus (:mod:`pogdiff.data.pretraining_corpus`) with the ordinary
training loop (plain diffusion loss, EMA, large batches, checkpoints), and the result is
released into a folder that ships inside the package:

    release/unet/            config + fp16 safetensors (the EMA weights)
    release/scheduler/       the training noise schedule
    release/pogdiff_run.json what sample/evaluate/train read, as in any run folder
    release/manifest.json    command, corpus, steps, batch, learning rate, EMA, time,
                             hardware, held-out loss, sha256 of the weights

The shipped release lives in :mod:`pogdiff.backbones.shipped`.
"""

from __future__ import annotations

import datetime
import json
import shlex
import shutil
import sys
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel

from pogdiff.backbones.backbone import PixelBackbone
from pogdiff.data.dataset import load_dataset
from pogdiff.errors import PogdiffError
from pogdiff.training.ownership import RELEASE
from pogdiff.training.run_folder import RUN_FILE, RunFolder, read_run_info
from pogdiff.backbones.shipped import MANIFEST_FILE, SHIPPED_NAME, sha256, shipped_manifest
from pogdiff.data.image_files import read_images

# The recipe of the shipped weights: from random weights, EMA on, large batches (a GPU wants
# hundreds of 32x32 images per step), checkpointed so that a long CPU run continues across sessions.
PRETRAINING = {"method": "vanilla", "use_ema": True, "ema_decay": 0.999, "train_batch_size": 256,
               "max_train_steps": 6500, "learning_rate": 1e-3, "lr_scheduler": "constant_with_warmup",
               "lr_warmup_steps": 200, "checkpointing_steps": 500, "checkpoints_total_limit": 2,
               "text_max_length": 56, "from_scratch": True}


def check_release_dir(release_dir: str | Path, output_dir: str | Path | None = None) -> None:
    """A release replaces only an earlier release (its manifest names the shipped backbone), never a folder
    of the user's nor the run it is made from; checked before pretraining starts, and again before the
    release is written."""
    release = Path(release_dir)
    if output_dir is not None and (release.resolve().is_relative_to(Path(output_dir).resolve())
                                   or Path(output_dir).resolve().is_relative_to(release.resolve())):
        raise PogdiffError(f"{release}: --release-dir and --output-dir {output_dir} overlap, and the release is "
                           "written from the finished run; choose a --release-dir outside the run folder")
    RunFolder(release, RELEASE, "--release-dir").check()


def write_release(run_dir: str | Path, release_dir: str | Path, command: list[str] | None = None) -> Path:
    """Release a finished pretraining run: fp16 weights, configs and a manifest with their sha256."""
    run_dir, release = Path(run_dir), Path(release_dir)
    check_release_dir(release)
    info = read_run_info(run_dir)
    config = info["config"]
    unet = UNet2DConditionModel.from_pretrained(run_dir / "unet", torch_dtype=torch.float16)
    tmp = release.with_name(f".{release.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    unet.save_pretrained(tmp / "unet")
    shutil.copytree(run_dir / "scheduler", tmp / "scheduler")
    info["config"]["label"] = SHIPPED_NAME  # its name in evaluation tables
    (tmp / RUN_FILE).write_text(json.dumps(info, indent=2, default=str) + "\n")
    corpus_file = Path(config["data_dir"]) / "corpus.json"
    corpus = {k: v for k, v in json.loads(corpus_file.read_text()).items() if k != "traits"} \
        if corpus_file.is_file() else None
    manifest = {
        "name": SHIPPED_NAME,
        "corpus_command": corpus and (f"pogdiff data synth {Path(config['data_dir']).name} --preset pretrain "
                                      f"--seed {corpus['seed']} --people {corpus['people']} "
                                      f"--images-per-person {corpus['images_per_person']} --resolution {corpus['size']}"),
        "command": shlex.join(command or ["pogdiff", *sys.argv[1:]]),
        "corpus": corpus or str(config["data_dir"]),
        "rows": len(load_dataset(config["data_dir"])),
        "steps": info["steps"],
        "batch": config["train_batch_size"] * config["gradient_accumulation_steps"] * info["num_processes"],
        "images_seen": info["steps"] * config["train_batch_size"] * config["gradient_accumulation_steps"]
        * info["num_processes"],
        "learning_rate": config["learning_rate"], "lr_scheduler": config["lr_scheduler"],
        "lr_warmup_steps": config["lr_warmup_steps"], "ema_decay": config["ema_decay"] if config["use_ema"] else None,
        "caption_dropout": config["caption_dropout"], "seed": config["seed"],
        "train_seconds": info.get("train_seconds"), "train_sessions": info.get("train_sessions"),
        "heldout_loss": heldout_loss(run_dir, Path(config["data_dir"]) / "heldout"),
        "weights_dtype": "float16",
        "released": datetime.date.today().isoformat(),
        # every file of the release, so that an edited config is caught as well as edited weights
        "sha256": {str(p.relative_to(tmp)): sha256(p) for p in sorted(tmp.rglob("*")) if p.is_file()},
    }
    if not config["from_scratch"]:  # --from-shipped: the weights it started from, and how those were made
        manifest["continued_from"] = shipped_manifest()
    (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
    if release.exists():  # an earlier release (check_release_dir): kept beside it, not deleted
        shutil.rmtree(previous_release_dir(release), ignore_errors=True)
        release.rename(previous_release_dir(release))
    tmp.rename(release)
    return release


def previous_release_dir(release: str | Path) -> Path:
    """Where a release keeps the one it replaced (hidden: not packaged with the shipped weights)."""
    release = Path(release)
    return release.with_name(f".{release.name}.previous")


@torch.no_grad()
def heldout_loss(run_dir: str | Path, data_dir: str | Path, seed: int = 0, repeats: int = 4) -> float:
    """Mean epsilon-MSE of a run's weights on a dataset it did not train on, at fixed draws of t and eps."""
    backbone = PixelBackbone.from_run(run_dir)
    dataset = load_dataset(data_dir)
    images = read_images(dataset, backbone.resolution)
    states = backbone.text_encoder.encode(dataset.captions).states
    generator = torch.Generator().manual_seed(seed)
    total, count = 0.0, 0
    for _ in range(repeats):
        for rows in torch.arange(len(images)).split(64):
            x0 = images[rows]
            t = torch.randint(0, backbone.scheduler.config.num_train_timesteps, (len(rows),), generator=generator)
            eps = torch.randn(x0.shape, generator=generator)
            x_t = backbone.scheduler.add_noise(x0, eps, t)
            predicted = backbone.denoise(backbone.denoiser, x_t, t, states[rows])
            total += torch.nn.functional.mse_loss(predicted, eps, reduction="sum").item()
            count += eps.numel()
    return round(total / count, 5)
