"""What a run folder (``pogdiff train --output-dir``) holds, and how to read it.

::

    RUN/pogdiff_run.json     backbone, config, steps; written last: without it the run is unfinished
    RUN/unet/, scheduler/    the weights, in diffusers' layout (a full pipeline for Stable Diffusion)
    RUN/psi.safetensors      PoGDiff only: per training row psi_txt, psi_img, psi (Eqs. 9, 11, 12), the
                             share of drawn y' of another identity (Eq. 8), is_few
    RUN/psi_summary.json     their means and quantiles, majority vs minority rows; same- vs
                             other-identity cosine similarity in the neighbour feature space
    RUN/checkpoint-N/        training states (--checkpointing-steps), with pogdiff_checkpoint.json: the
                             options the run was started with and the sha256 of each file
    RUN/rows-rank<R>.jsonl   --log-rows (pogdiff.row_log)

A plain diffusers pipeline folder reads as a Stable Diffusion run labelled by its folder name.
"""

from __future__ import annotations

import fnmatch
import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from pogdiff import psi
from pogdiff.errors import PogdiffError
from pogdiff.files import sha256, write_text_atomic
from pogdiff.pretrained import PIPELINE_FILE

RUN_FILE = "pogdiff_run.json"
PIPELINE_BACKBONE = "stable-diffusion"  # the backbone kind of a plain pipeline folder
PSI_FILE = "psi.safetensors"
PSI_SUMMARY_FILE = "psi_summary.json"
PSI_KEYS = ("psi_txt", "psi_img", "psi", "other_identity_share")
IS_FEW_KEY = "is_few"
NEIGHBOUR_SPACE_KEY = "neighbour_features"  # in PSI_SUMMARY_FILE
CHECKPOINT_PREFIX = "checkpoint-"
CHECKPOINT_RECORD = "pogdiff_checkpoint.json"
# What `train` writes at the top of a run folder; --overwrite removes these and nothing else (an eval/
# or notes of the user's stay). The trackers' --logging-dir is added by is_run_entry.
RUN_ENTRIES = (RUN_FILE, PSI_FILE, PSI_SUMMARY_FILE, "unet", "scheduler", "vae", "text_encoder", "tokenizer",
               "model_index.json", "pytorch_lora_weights.safetensors", "validation", "rows-rank*.jsonl",
               f"{CHECKPOINT_PREFIX}*", ".checkpoint-*", ".write-test")


def is_run_entry(name: str, logging_dir: str = "logs") -> bool:
    """Whether ``name`` (at the top of a run folder) is something `train` writes there."""
    own = [*RUN_ENTRIES] + ([Path(logging_dir).parts[0]] if not Path(logging_dir).is_absolute() else [])
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in own)


def write_checkpoint_record(checkpoint: Path, options: dict) -> None:
    """The options a run was started with, and the sha256 of each file of the checkpoint (read on resume)."""
    files = sorted(p for p in checkpoint.rglob("*") if p.is_file() and p.name != CHECKPOINT_RECORD)
    record = {"options": options, "sha256": {str(p.relative_to(checkpoint)): sha256(p) for p in files}}
    write_text_atomic(checkpoint / CHECKPOINT_RECORD, json.dumps(record, indent=2, default=str))


def read_checkpoint_record(checkpoint: Path) -> dict | None:
    """A checkpoint's record (None for a checkpoint saved before records were written, or a damaged one)."""
    try:
        record = json.loads((checkpoint / CHECKPOINT_RECORD).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and isinstance(record.get("sha256"), dict) else None


def changed_checkpoint_file(checkpoint: Path) -> str | None:
    """The first file of a checkpoint that is missing or differs from the sha256 its record holds."""
    record = read_checkpoint_record(checkpoint)
    for name, digest in (record or {}).get("sha256", {}).items():
        path = checkpoint / name
        if not path.is_file() or sha256(path) != digest:
            return name
    return None


def is_finished(run_dir: str | Path) -> bool:
    return (Path(run_dir) / RUN_FILE).is_file()


def write_run_info(run_dir: Path, info: dict) -> None:
    """RUN_FILE, atomically: the last file a run writes."""
    write_text_atomic(Path(run_dir) / RUN_FILE, json.dumps(info, indent=2, default=str))


def read_run_info(run_dir: str | Path) -> dict:
    """RUN_FILE of a run; for a plain diffusers pipeline folder, the same keys made up from it
    (labelled by its folder name)."""
    run_dir = Path(run_dir)
    path = run_dir / RUN_FILE
    if path.is_file():
        return _checked_run_info(path)
    if (run_dir / PIPELINE_FILE).is_file():
        return {"backbone": PIPELINE_BACKBONE, "pretrained": str(run_dir.resolve()), "lora_rank": None,
                "config": {"method": run_dir.resolve().name}}
    raise PogdiffError(f"{run_dir}: neither a pogdiff run folder (no {RUN_FILE}) nor a diffusers pipeline folder "
                       f"(no {PIPELINE_FILE}); pass the --output-dir of a finished `pogdiff train` or a "
                       "Stable Diffusion folder")


DAMAGED_RUN_FIX = "the run folder is damaged: train it again (pogdiff train --overwrite)"


def _checked_run_info(path: Path) -> dict:
    """RUN_FILE's content with the keys every reader needs; a broken file is a one-line error."""
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise PogdiffError(f"{path}: not valid JSON ({error}); {DAMAGED_RUN_FIX}") from None
    if not isinstance(info, dict):
        raise PogdiffError(f"{path}: not a JSON object; {DAMAGED_RUN_FIX}")
    missing = [key for key in ("backbone", "config") if key not in info]
    config = info.get("config")
    if "config" in info and not (isinstance(config, dict) and isinstance(config.get("method"), str)):
        missing.append("config.method")
    if missing:
        raise PogdiffError(f"{path}: no {', '.join(missing)}; {DAMAGED_RUN_FIX}")
    return info


def run_label(config: dict) -> str:
    """A run's name in tables: its method, the sampler it was given (``+balanced``) and the method
    options it changed (e.g. ablations); a released backbone's own name."""
    if "label" in config:
        return config["label"]
    options = ",".join(f"{k}={v}" for k, v in sorted(config.get("method_options", {}).items()))
    name = f"{config['method']}+{config['sampler']}" if config.get("sampler") else config["method"]
    return f"{name}({options})" if options else name


def save_psi(run_dir: Path, psi_per_row: dict[str, torch.Tensor], is_few: torch.Tensor,
             neighbour_space: dict | None = None) -> None:
    """The per-row values (PSI_FILE) and their quantiles, majority vs minority (PSI_SUMMARY_FILE).

    ``neighbour_space``: the feature space of Eq. 8 (``name``, ``k``) and its cosine similarities
    of same-identity and other-identity pairs (:func:`pogdiff.neighbours.similarity_by_identity`),
    summarised under ``"neighbour_features"``.
    """
    weights = {k: v.float().cpu().contiguous() for k, v in psi_per_row.items()}
    save_file({**weights, IS_FEW_KEY: is_few}, Path(run_dir) / PSI_FILE)
    summary = psi.summarise(weights, is_few)
    if neighbour_space is not None:
        summary[NEIGHBOUR_SPACE_KEY] = {"space": neighbour_space["name"], "k": neighbour_space["k"],
                                        **psi.summarise_similarity(neighbour_space["similarity"])}
    (Path(run_dir) / PSI_SUMMARY_FILE).write_text(json.dumps(summary, indent=2))


def load_psi(run_dir: str | Path) -> dict[str, torch.Tensor] | None:
    """PSI_FILE's tensors, None for a run without one (every method but PoGDiff)."""
    path = Path(run_dir) / PSI_FILE
    return load_file(path) if path.is_file() else None


def load_psi_summary(run_dir: str | Path) -> dict | None:
    """PSI_SUMMARY_FILE, None for a run without one."""
    path = Path(run_dir) / PSI_SUMMARY_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def checkpoint_step(checkpoint: Path) -> int:
    return int(checkpoint.name.split("-")[-1])


def checkpoints(run_dir: Path) -> list[Path]:
    """Finished checkpoints, oldest first (``.checkpoint-N.tmp`` folders being written are not)."""
    done = [p for p in Path(run_dir).glob(f"{CHECKPOINT_PREFIX}*") if p.is_dir() and p.name.split("-")[-1].isdigit()]
    return sorted(done, key=checkpoint_step)


def latest_checkpoint(run_dir: Path) -> Path | None:
    return next(reversed(checkpoints(run_dir)), None)
