"""What a run folder (``pogdiff train --output-dir``) holds, and how to read it.

::

    RUN/pogdiff_run.json     backbone, config, steps; written last: without it the run is unfinished
    RUN/unet/, scheduler/    the weights, in diffusers' layout (a full pipeline for Stable Diffusion)
    RUN/psi.safetensors      PoGDiff only: per training row psi_txt, psi_img, psi (Eqs. 9, 11, 12), the
                             share of drawn y' of another identity (Eq. 8), is_few
    RUN/psi_summary.json     their means and quantiles, majority vs minority rows; same- vs
                             other-identity cosine similarity in the neighbour feature space
    RUN/checkpoint-N/        training states (every --checkpointing-steps and the final step), with
                             pogdiff_checkpoint.json: the options the run was started with (and what those
                             left out stand for), its global batch,
                             the sha256 of the dataset's images and of each file
    RUN/rows-rank<R>.jsonl   --log-rows (pogdiff.training.row_log)

A plain diffusers pipeline folder reads as a Stable Diffusion run labelled by its folder name.

:class:`RunFolder` is the one owner of every folder a command writes (a run, an evaluation, a
benchmark, a demo, samples, a release): it checks, creates and claims it under the one rule of
:mod:`pogdiff.training.ownership`, and, for a run, finds the checkpoint to resume; the functions after it
save, check and load a run's checkpoints.
"""

from __future__ import annotations

import contextlib
import fnmatch
import json
import os
import pickle
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from pogdiff.objectives import psi
from pogdiff.data.dataset import METADATA_FILE
from pogdiff.errors import Interrupted, PogdiffError, first_line
from pogdiff.files import (apply_umask_to_tree, incomplete, remove_quietly, sha256, write_errors_as_os_errors,
                           write_text_atomic)
from pogdiff.training.ownership import (BENCHMARK, DEMO, EVALUATION, MARKS, RELEASE, RUN, SAMPLES, claimed, entries,
                               is_marked, refuse_if_in_use)
from pogdiff.backbones.pretrained import PIPELINE_FILE
from pogdiff.backbones.shipped import SHIPPED_NAME
from pogdiff.options import RESUMABLE_CHANGES, option_defaults

RUN_FILE = "pogdiff_run.json"
PIPELINE_BACKBONE = "stable-diffusion"  # the backbone kind of a plain pipeline folder
PSI_FILE = "psi.safetensors"
PSI_SUMMARY_FILE = "psi_summary.json"
PSI_KEYS = ("psi_txt", "psi_img", "psi", "other_identity_share")
IS_FEW_KEY = "is_few"
NEIGHBOUR_SPACE_KEY = "neighbour_features"  # in PSI_SUMMARY_FILE
CHECKPOINT_PREFIX = "checkpoint-"
CHECKPOINT_RECORD = "pogdiff_checkpoint.json"
TRAINED_WEIGHTS_FILE = "trained_weights.safetensors"  # in each checkpoint-N folder
# What `train` writes at the top of a run folder; --overwrite removes these and nothing else (an eval/
# or notes of the user's stay). The trackers' --logging-dir is owned exactly: logging_folder.
RUN_ENTRIES = (RUN_FILE, PSI_FILE, PSI_SUMMARY_FILE, "unet", "scheduler", "vae", "text_encoder", "tokenizer",
               "model_index.json", "pytorch_lora_weights.safetensors", "validation", "rows-rank*.jsonl",
               f"{CHECKPOINT_PREFIX}*", ".checkpoint-*", ".write-test")


def is_run_entry(name: str) -> bool:
    """Whether ``name`` (at the top of a run folder) is something `train` writes there (besides the logs)."""
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in RUN_ENTRIES)


def logging_folder(run_dir: str | Path, logging_dir: str) -> Path:
    """The trackers' folder (--logging-dir, relative to the run folder): `train` owns exactly this folder, never
    the one above it (``eval/tb`` leaves the user's ``eval/`` alone), the run folder itself or a folder outside it."""
    run = Path(os.path.normpath(Path(run_dir).absolute()))
    folder = Path(os.path.normpath(run / logging_dir))
    if folder == run or not folder.is_relative_to(run):
        raise PogdiffError(f"--logging-dir {logging_dir}: not a folder inside --output-dir {run_dir}, which is "
                           "where train writes the trackers' logs; pass a folder name such as logs")
    return folder


def written_by_train(run_dir: str | Path, logging_dir: str) -> list[Path]:
    """What `train` wrote into a run folder (:func:`is_run_entry`, :func:`logging_folder`); never the user's files."""
    logs = logging_folder(run_dir, logging_dir)
    return [e for e in entries(run_dir) if is_run_entry(e.name)] + ([logs] if logs.exists() else [])


def write_checkpoint_record(checkpoint: Path, options: dict) -> None:
    """The options a run was started with, and the sha256 of each file of the checkpoint (read on resume)."""
    files = sorted(p for p in checkpoint.rglob("*") if p.is_file() and p.name != CHECKPOINT_RECORD)
    record = {"options": options, "sha256": {str(p.relative_to(checkpoint)): sha256(p) for p in files}}
    write_text_atomic(checkpoint / CHECKPOINT_RECORD, json.dumps(record, indent=2, default=str))


def read_checkpoint_record(checkpoint: Path) -> dict:
    """A checkpoint's record; a missing or damaged one is a one-line error (nothing of the checkpoint could be
    checked: not its options, data or bytes)."""
    try:
        record = json.loads((checkpoint / CHECKPOINT_RECORD).read_text())
    except (OSError, ValueError):
        record = None
    if isinstance(record, dict) and isinstance(record.get("sha256"), dict) and isinstance(record.get("options"), dict):
        return record
    raise PogdiffError(f"{checkpoint / CHECKPOINT_RECORD}: missing or damaged, so this checkpoint's options, data "
                       f"and bytes cannot be checked; {restart_from_before(checkpoint)}")


def changed_checkpoint_file(checkpoint: Path) -> str | None:
    """The first file of a checkpoint that is missing or differs from the sha256 its record holds."""
    for name, digest in read_checkpoint_record(checkpoint)["sha256"].items():
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
    of same-identity and other-identity pairs (:func:`pogdiff.objectives.neighbours.similarity_by_identity`),
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


# What a command says of a folder that is not its own and holds what it would write (``{taken}``: the first
# such file) or anything at all (``{folder}``).
NOT_OURS = {
    RUN: "{folder}: output folder is not empty and pogdiff did not create it, so neither --overwrite nor "
         "--resume-from-checkpoint touch it; choose another --output-dir",
    EVALUATION: "{taken}: already exists and `pogdiff evaluate` did not write it; choose another --out, "
                "or move it away",
    BENCHMARK: "{folder}: folder exists and is not a pogdiff benchmark folder; choose another --out",
    DEMO: "{folder}: folder exists and is not a pogdiff demo folder; choose another --out",
    SAMPLES: "{taken}: already exists ({count} of the {total} files to write do); choose another --out, "
             "or move them away",
    RELEASE: "{folder}: --release-dir exists and is not an earlier release of " + SHIPPED_NAME + ", so it is "
             "not replaced; choose another --release-dir",
}


@dataclass(frozen=True)
class RunFolder:
    """A folder a command writes, in plain values; the one rule of what it may write there, and how it claims it.

    ``kind``: whose folder it is (:mod:`pogdiff.training.ownership`: ``run`` for `pogdiff train`, ``evaluation``,
    ``benchmark``, ``demo``, ``samples``, ``release``); ``flag``: the option naming it, in messages.
    ``data_dir``: the dataset, which the folder must not lie in; ``inputs``: (what, folder) pairs that must not
    lie in the folder (a new run or --overwrite would mix with them). ``outputs``: the names (glob patterns)
    the command writes; where given, a folder that is not its own is refused only when one of them is there
    (``()``: never, the folder is the caller's own), else when it holds anything. A run's ``overwrite``,
    ``resume`` (--resume-from-checkpoint) and ``logging_dir`` (the trackers', under the folder) say what may
    happen to a run already there.
    """

    path: Path
    kind: str = RUN
    flag: str = "--output-dir"
    data_dir: str | Path | None = None
    inputs: tuple[tuple[str, str | Path], ...] = ()
    outputs: tuple[str, ...] | None = None
    overwrite: bool = False
    resume: str | None = None
    logging_dir: str = "logs"

    def __post_init__(self):
        object.__setattr__(self, "path", Path(self.path))

    def is_mine(self) -> bool:
        return is_marked(self.path, self.kind)

    def check(self) -> Path:
        """Refuse a folder that is a file, overlaps the inputs, holds what this command may not replace (for a run:
        mixes two runs; resume, overwrite, or pick another), is being written by another process, or where we
        cannot write. Writes nothing: called before any work, so a bad folder costs seconds, not a run."""
        out = self.path
        if out.exists() and not out.is_dir():
            raise PogdiffError(f"{out}: {self.flag} is a file; choose a folder")
        if self.kind == RUN:
            logging_folder(out, self.logging_dir)
        self.check_inputs_outside()
        self._check_contents()
        if self.kind in MARKS:
            refuse_if_in_use(out, self.kind, self.flag)
        parent = next(p for p in (out.absolute(), *out.absolute().parents) if p.exists())
        if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
            why = "is a file" if not parent.is_dir() else "is not writable"
            what = "create the output folder" if self.kind == RUN else f"write into {self.flag}"
            raise PogdiffError(f"{out}: cannot {what} ({parent} {why}); choose another {self.flag}")
        return out

    def check_inputs_outside(self) -> None:
        """Refuse inputs inside the folder, or the folder inside the dataset (reads nothing but the paths)."""
        out = self.path
        for what, folder in self.inputs:
            if Path(os.path.realpath(folder)).is_relative_to(os.path.realpath(out)):  # no traceback on a link loop
                raise PogdiffError(f"{folder}: {what} is inside {self.flag} {out}, where --overwrite or a new run "
                                   f"would mix with it; choose an {self.flag} outside it")
        if self.data_dir is not None and Path(os.path.realpath(out)).is_relative_to(os.path.realpath(self.data_dir)):
            raise PogdiffError(f"{out}: {self.flag} is inside the dataset {self.data_dir}, whose folder should hold "
                               f"only its images and metadata; choose an {self.flag} outside it")

    def _check_contents(self) -> None:
        """What the folder holds against what was asked (the run's rules: :meth:`_check_run`)."""
        if self.kind == RUN:
            self._check_run()
            return
        if self.is_mine():
            return
        if self.outputs is not None:
            taken = [p for pattern in self.outputs for p in sorted(self.path.glob(pattern))]
            if taken:
                raise PogdiffError(NOT_OURS[self.kind].format(taken=taken[0], count=len(taken),
                                                              total=len(self.outputs)))
        elif entries(self.path, self.kind):
            raise PogdiffError(NOT_OURS[self.kind].format(folder=self.path))

    def _check_run(self) -> None:
        """A new run needs a new or empty folder, or pogdiff's own run with --overwrite; --resume-from-checkpoint
        needs a whole checkpoint of pogdiff's own run."""
        out = self.path
        if self.resume:
            self.checkpoint_to_resume()
            return
        if not entries(out):
            return
        if not self.is_mine():
            raise PogdiffError(NOT_OURS[RUN].format(folder=out))
        if self.overwrite:
            return
        if (out / RUN_FILE).is_file():
            raise PogdiffError(f"{out}: output folder already holds a run; pass --overwrite to replace it, "
                               "or choose another --output-dir")
        raise PogdiffError(f"{out}: output folder holds an unfinished run; {how_to_continue(out)}, "
                           "or choose another --output-dir")

    def create(self) -> Path:
        """Create the folder with its mark, holding no lock (every process of a launch may call this)."""
        self.path.mkdir(parents=True, exist_ok=True)
        (self.path / MARKS[self.kind]).touch()
        return self.path

    @contextlib.contextmanager
    def claimed(self) -> Iterator[Path]:
        """Create the folder, claim it (mark and lock it, :func:`pogdiff.training.ownership.claimed`), check it again under
        the lock, and for a run with --overwrite empty it of what `train` wrote; the claim lasts for the block.

        A Ctrl-C inside a run's block becomes a one-line error that says how to continue the run.
        """
        out = self.check()
        try:
            out.mkdir(parents=True, exist_ok=True)
            probe = out / ".write-test"
            probe.touch()
            probe.unlink()
        except OSError as error:
            raise PogdiffError(f"{out}: cannot write to the output folder ({error.strerror}); "
                               f"choose another {self.flag}")
        with claimed(out, self.kind, self.flag):
            self._check_contents()  # another process may have finished a run here since the first check
            if self.kind == RUN and self.overwrite and not self.resume:
                self._remove_run()
            try:
                yield out
            except KeyboardInterrupt:
                if self.kind != RUN:
                    raise
                raise Interrupted(f"{out}: interrupted; {how_to_continue(out)}") from None

    def _remove_run(self) -> None:
        """What `train` wrote (:func:`written_by_train`): an eval/ or notes of the user's stay."""
        for entry in written_by_train(self.path, self.logging_dir):
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()

    def checkpoint_to_resume(self) -> Path:
        """The checkpoint --resume-from-checkpoint names ('latest': the newest finished one), a whole checkpoint
        of the pogdiff run in this folder."""
        out, wanted = self.path, self.resume
        if not self.is_mine():
            found = checkpoints(out) if out.is_dir() else []
            if found:
                raise PogdiffError(f"{out}: holds {', '.join(c.name for c in found[:3])}"
                                   f"{', ...' if len(found) > 3 else ''} but no {MARKS[RUN]} (copied without its "
                                   f"hidden files?), so pogdiff does not resume into it; copy the whole run folder "
                                   f"(cp -a RUN/. {out}/) or resume the original")
            raise PogdiffError(f"{out}: no checkpoint to resume from ({wanted}): not a pogdiff run folder; "
                               "drop --resume-from-checkpoint to start afresh, or pass the --output-dir of the run")
        saved = checkpoints(out)
        if not saved:
            why = "it was trained without --checkpointing-steps" if is_finished(out) else "the run saved none"
            raise PogdiffError(f"{out}: no checkpoint to resume from: {why}; start it afresh with --overwrite")
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

    def check_resume(self, given: dict, max_train_steps: int | None) -> Path:
        """The checkpoint to resume from; refused, before any work, when its record is missing or damaged, its
        bytes changed since it was saved, or its run was started with other options, data or global batch than
        ``given``; then :meth:`check_steps` (``max_train_steps`` None: not known yet, the caller checks them)."""
        checkpoint = self.checkpoint_to_resume()
        record = read_checkpoint_record(checkpoint)
        changed = changed_checkpoint_file(checkpoint)
        if changed:
            raise PogdiffError(f"{checkpoint}: {changed} is damaged (missing, or its bytes differ from the sha256 in "
                               f"{CHECKPOINT_RECORD}); {restart_from_before(checkpoint)}")
        # an option the saving version did not have yet ran as its default
        started = {**option_defaults(), **json.loads(json.dumps(record["options"]))}
        now = json.loads(json.dumps(given, default=str))
        # what an option left out stood for when the run started; where its record does not say (saved before
        # defaults were recorded), what it stands for now
        defaults = now.get(DEFAULTS) or {}
        started, now = _comparable(started, {**defaults, **(started.get(DEFAULTS) or {})}), _comparable(now, defaults)
        differ = [k for k in sorted(set(started) | set(now)) if started.get(k) != now.get(k)
                  and not (k == GLOBAL_BATCH and k not in started)]  # saved before the global batch was recorded
        if differ:
            shown = ", ".join(_option_change(k, started.get(k), now.get(k)) for k in differ[:3])
            raise PogdiffError(f"{checkpoint}: the run was started with other options or data: {shown}"
                               f"{' and more' if len(differ) > 3 else ''}; resume with the run's own options, "
                               "or start a new run in another --output-dir")
        if max_train_steps is not None:
            self.check_steps(checkpoint, max_train_steps)
        return checkpoint

    def check_content(self, checkpoint: Path, key: str, content: str) -> None:
        """Refuse a resume on other bytes than the run's: the dataset's images (``key`` DATA_CONTENT:
        :func:`pogdiff.data.image_files.dataset_digest`) or the base checkpoint's weights (PRETRAINED_WEIGHTS:
        :func:`pogdiff.backbones.pretrained.pipeline_fingerprint`), known once read; checkpoints saved before they
        were recorded are not compared."""
        started = read_checkpoint_record(checkpoint)["options"].get(key)
        if started is not None and started != content:
            what = {DATA_CONTENT: "the bytes of the dataset's images changed since; resume on the run's own images",
                    PRETRAINED_WEIGHTS: "the --pretrained checkpoint's files changed since (other weights at that "
                                        "path?); resume on the run's own base weights"}[key]
            raise PogdiffError(f"{checkpoint}: the run was started on other {'data' if key == DATA_CONTENT else 'weights'}"
                               f": {what}, or start a new run in another --output-dir")

    def check_steps(self, checkpoint: Path, max_train_steps: int) -> None:
        """Refuse a resume from ``checkpoint`` past ``max_train_steps``, or of a run finished at
        ``max_train_steps`` or later (its final weights are replaced only with --overwrite)."""
        finished_at = read_run_info(self.path).get("steps") if is_finished(self.path) else None
        if finished_at is not None and max_train_steps <= finished_at and not self.overwrite:
            raise PogdiffError(f"{self.path}: holds a run finished at step {finished_at}; pass a --max-train-steps "
                               f"above {finished_at} to continue it, or add --overwrite to replace its final weights "
                               f"with those of step {max_train_steps}")
        if max_train_steps < checkpoint_step(checkpoint):
            raise PogdiffError(f"{checkpoint}: already past --max-train-steps {max_train_steps}; pass a larger "
                               f"--max-train-steps, or resume from an earlier checkpoint")


GLOBAL_BATCH = "global_batch"  # in a checkpoint record's options: "<processes> x <--train-batch-size>"
DATA_CONTENT = "data_content"  # in a checkpoint record's options: the dataset's bytes (RunFolder.check_content)
PRETRAINED_WEIGHTS = "pretrained_weights"  # in a checkpoint record's options: the base checkpoint's fingerprint
# in a checkpoint record's options: what each option left out stands for, where that is known before the backbone
# loads (pogdiff.training.train.options_to_keep); a method's options: the loss's defaults
DEFAULTS = "defaults"
PATH_OPTIONS = ("pretrained", "dataset_name")  # a folder (or a hub id, compared as typed)


def _comparable(options: dict, defaults: dict) -> dict:
    """A checkpoint record's options as a resume compares them: those a resume may change (RESUMABLE_CHANGES, the
    data's content) left out; an option left out as the value it stands for (``defaults``), so that typing the
    run's own default out is no change; a method's options without those at their default; a folder as its resolved
    path, and --dataset-name of a folder that holds metadata.jsonl (read as DATA is: by its content) as none."""
    compared = {}
    for key, value in options.items():
        if key in RESUMABLE_CHANGES or key in (DEFAULTS, DATA_CONTENT, PRETRAINED_WEIGHTS):
            continue
        default = defaults.get(key)
        if value is None and key in defaults:
            value = default
        elif isinstance(value, dict) and isinstance(default, dict):
            value = {k: v for k, v in value.items() if k not in default or default[k] != v}
        if key in PATH_OPTIONS and isinstance(value, str) and value and os.path.exists(value):
            folder = Path(value).resolve()
            value = None if key == "dataset_name" and (folder / METADATA_FILE).is_file() else str(folder)
        compared[key] = value
    return compared


def _option_change(key: str, started, now) -> str:
    """How a refused resume names one option (or the data) that differs from the run's."""
    if key == "data":
        return "the dataset's metadata.jsonl"
    if key == GLOBAL_BATCH:
        return f"the global batch, processes x --train-batch-size (run: {started}, now: {now})"
    return f"{key} (run: {started!r}, now: {now!r})"


def how_to_continue(out: Path) -> str:
    """The fix for an unfinished run: resume from its last checkpoint, or start it afresh."""
    last = latest_checkpoint(out)
    if last is None:
        return "start the run afresh with --overwrite (no checkpoint was saved)"
    return f"continue from {last.name} with --resume-from-checkpoint latest, or start afresh with --overwrite"


def restart_from_before(checkpoint: Path) -> str:
    """The fix for a damaged checkpoint: the one saved before it, or a fresh run."""
    earlier = [c for c in checkpoints(checkpoint.parent) if checkpoint_step(c) < checkpoint_step(checkpoint)]
    fresh = "start the run afresh with --overwrite"
    if not earlier:
        return fresh
    return f"resume from the one before with --resume-from-checkpoint {earlier[-1].name}, or {fresh}"


def checkpoint_damage(checkpoint: Path) -> str | None:
    """Why a checkpoint cannot be loaded (its weights missing, or a file cut short), None when it looks whole.
    Reads headers only: the folder's state is checked several times (:meth:`RunFolder.check_resume` reads the
    bytes once)."""
    if not (checkpoint / TRAINED_WEIGHTS_FILE).is_file():
        return f"no {TRAINED_WEIGHTS_FILE}"
    for file in sorted(p for p in checkpoint.iterdir() if p.is_file()):
        reason = incomplete(file)
        if reason:
            return f"{file.name} is damaged ({reason})"
    return None


def checkpoint_trained_weights_only(accelerator) -> None:
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


def save_checkpoint(accelerator, out: Path, step: int, total_limit: int | None, options: dict | None = None) -> None:
    """Save the full training state atomically: written to a temporary folder, then renamed; with ``options``
    (the run's own, see :func:`pogdiff.training.train.options_to_keep`), a record of them and of each file's sha256 goes
    with it.

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


def load_checkpoint(accelerator, checkpoint: Path) -> None:
    """Restore the training state; a file that cannot be read is a one-line error saying what to resume from."""
    try:
        accelerator.load_state(str(checkpoint))
    except (SafetensorError, RuntimeError, OSError, EOFError, pickle.UnpicklingError) as error:
        raise PogdiffError(f"{checkpoint}: cannot load this checkpoint ({first_line(error)}); "
                           f"{restart_from_before(checkpoint)}") from None


@contextlib.contextmanager
def reported_write_errors(target: Path, out: Path, cleanup: Path | None = None) -> Iterator[None]:
    """Turn a failed write of ``target`` (disk full, permissions) into a one-line error saying how to go on."""
    try:
        with write_errors_as_os_errors(target):
            yield
    except OSError as error:
        if cleanup is not None:
            remove_quietly(cleanup)
        raise PogdiffError(f"{target}: cannot write ({error.strerror or error}); free space, then "
                           f"{how_to_continue(out)}") from None
