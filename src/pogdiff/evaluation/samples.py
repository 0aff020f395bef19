"""Generated images on disk: ``FOLDER/<identity>/<NNN>.png``, written as they are made and read back in batches.

``pogdiff evaluate`` writes each run's samples to ``OUT/samples/<label>/<identity stem>/<NNN>.png``
and scores them from there, the same way it scores a ``--samples FOLDER`` of images made elsewhere
(by an earlier evaluation, or by the user's own pipeline). An identity's folder is named after the
identity, or after the safe file stem :func:`pogdiff.files.file_stems` gives it (what evaluate
writes); its ``*.png`` files are read in natural order (``2.png`` before ``10.png``).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from pogdiff.data.dataset import load_image
from pogdiff.errors import PogdiffError
from pogdiff.files import file_stems
from pogdiff.images import from_uint8, to_pil
from pogdiff.backbones.sampling import sample_rows

SUFFIX = ".png"
READ_BATCH = 32  # images decoded and scored at a time


def write_samples(backbone, samples_for: dict[str, int], folder: Path, stems: dict[str, str], prompt_template: str,
                  num_inference_steps: int, guidance_scale: float | None, seed: int, progress: bool,
                  shard: tuple[int, int] = (0, 1)) -> None:
    """``samples_for[name]`` images of ``prompt_template`` per identity into ``folder/<stem>/<NNN>.png`` (``stems``:
    :func:`pogdiff.files.file_stems` of every identity of the dataset), each batch as soon as it is done;
    identities with the same count are sampled together, with the noise stream of
    :func:`pogdiff.backbones.sampling.generate`. ``shard``: this process's batches (:func:`sample_rows`)."""
    check_prompts_differ(backbone.text_encoder, prompt_template, list(samples_for))
    for count in sorted(set(samples_for.values())):
        group = [n for n in samples_for if samples_for[n] == count]
        for identity in group:
            (folder / stems[identity]).mkdir(parents=True, exist_ok=True)
        for rows, images in sample_rows(backbone, [prompt_template.format(name=n) for n in group], count,
                                        num_inference_steps, guidance_scale, seed, progress=progress, shard=shard):
            for row, image in zip(rows, images):
                to_pil(image).save(folder / stems[group[row // count]] / f"{row % count:03d}{SUFFIX}")


def check_prompts_differ(text_encoder, prompt_template: str, names: list[str]) -> None:
    """One line when two identities' prompts become the same tokens once cut to what ``text_encoder`` reads (a long
    template pushes the name past its last token): they would be sampled from one prompt. Names the tokenizer
    reads alike whole (``AC/DC`` and ``ac/dc`` for an uncased one) are not the template's doing."""
    prompts = [prompt_template.format(name=name) for name in names]
    whole = text_encoder.tokenizer(prompts, verbose=False)["input_ids"]  # no warning that they are too long
    cut = text_encoder.tokenizer(prompts, truncation=True, max_length=text_encoder.max_length)["input_ids"]
    first_of: dict[tuple[int, ...], tuple[str, list[int]]] = {}
    for name, ids, whole_ids in zip(names, cut, whole):
        other, other_whole = first_of.setdefault(tuple(ids), (name, whole_ids))
        if other_whole != whole_ids:
            raise PogdiffError(f"--prompt-template {prompt_template!r}: identities {other!r} and {name!r} get the "
                               f"same prompt once cut to the text encoder's {text_encoder.max_length} tokens; "
                               "shorten the template or put {name} nearer its start")


def find_samples(folder: Path, identities: list[str], scored: list[str]) -> dict[str, list[Path]]:
    """The images of every ``scored`` identity in ``folder``, by identity; ``identities``: every identity of the
    dataset (a folder of one that is not scored is left alone). One line for a folder that names no identity,
    and for a scored identity without a folder or without an image."""
    if not folder.is_dir():
        raise PogdiffError(f"{folder}: --samples folder not found; pass a folder holding one folder of "
                           f"{SUFFIX} images per identity")
    by_folder = {**{stem: name for name, stem in file_stems(identities).items()}, **{n: n for n in identities}}
    found: dict[str, list[Path]] = {}
    for sub in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")):
        if sub.name not in by_folder:
            raise PogdiffError(f"{sub}: no identity of the dataset is called {sub.name!r}; name each folder after "
                               "its identity (or the file stem evaluate gives it), or move it away")
        found[by_folder[sub.name]] = sorted(sub.glob(f"*{SUFFIX}"), key=_natural)
    for name in scored:
        if not found.get(name):
            where = folder / file_stems(identities)[name]
            raise PogdiffError(f"{where}: no {SUFFIX} image of identity {name!r}; add its samples as "
                               f"{where}/<N>{SUFFIX}, or pass --max-identities to score fewer identities")
    return {name: found[name] for name in scored}


def _natural(path: Path) -> list:
    """Sort key: digit runs as numbers (``2.png`` before ``10.png``)."""
    return [(0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", path.name)]


def resolution_of(files: list[Path]) -> int:
    """The side of the square the images are scored at: the shorter side of the first one."""
    with Image.open(files[0]) as image:
        return min(image.size)


def batches_of(files: list[Path], resolution: int) -> Callable[[], Iterator[torch.Tensor]]:
    """A function yielding ``files`` as float batches (B, 3, resolution, resolution) in [-1, 1], decoded like
    the dataset's images (:func:`pogdiff.data.dataset.load_image`: a square image of that size is read as is)."""
    def batches() -> Iterator[torch.Tensor]:
        for start in range(0, len(files), READ_BATCH):
            pixels = np.stack([load_image(f, resolution) for f in files[start:start + READ_BATCH]])
            yield from_uint8(pixels)
    return batches
