"""The paper's datasets, built from their public downloads: AgeDB-IT2I, DigiFace-IT2I and VGGFace-IT2I.

Sec. 4.1 ("Datasets") samples long-tailed subsets of AgeDB (Moschoglou et al., 2017) and
DigiFace-1M (Bae et al., 2023), App. F one of VGGFace2 (Cao et al., 2018):

- AgeDB-IT2I-S: 2 identities, 32 images; -M: 10 identities, 100 images; -L: 223 identities, 976 images;
- DigiFace-IT2I-L: 179 identities, 985 images;
- VGGFace-IT2I-small: 2 identities, 32 images;

each with majority identities of 30 images and minority identities of 2 (App. C.4: the sets
cover several levels of sparsity). The paper does not give the counts in between, so
:func:`long_tailed_counts` fixes them (a smooth decay from 30 to 2 that hits the totals).
The real names are replaced by random first names (Sec. 4.1: "Albert Einstein" becomes
"Lukas") in captions, identities and file names; the mapping stays in ``names.json``. Each
chosen identity's other source images become ``heldout/``, what the similarity metric
compares against (App. B, "Evaluating Image Similarities"). docs/dataset-format.md
describes the commands and the output.
"""

from __future__ import annotations

import csv
import functools
import json
import math
import os
import re
import shutil
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np

from pogdiff.data.dataset import METADATA_FILE
from pogdiff.data.synth import NAMES
from pogdiff.errors import PogdiffError, first_line
from pogdiff.files import atomic_path

PAPER_SIZES: dict[str, dict[str, tuple[int, int]]] = {
    "agedb": {"small": (2, 32), "medium": (10, 100), "large": (223, 976)},
    "digiface": {"large": (179, 985)},
    "vggface2": {"small": (2, 32)},
}
"""(identities, images) of each source's presets: Sec. 4.1 (AgeDB, DigiFace) and App. F (VGGFace2)."""

MOST_IMAGES, FEWEST_IMAGES = 30, 2
"""Training images of the largest (majority) and the smallest (minority) identity, as in the paper."""

DEFAULT_MAX_HELDOUT = 20
"""Held-out images per identity: App. B samples 20 images per identity on the large sets."""

NAMES_FILE = "names.json"
CAPTION_PROMPT = ("Describe this photo in one short phrase: the person's expression, clothes and the background. "
                  "Do not name the person.")

# synth.NAMES by the gender they are usually given; the others (neither set) are anyone's.
FEMALE_NAMES = frozenset((
    "Emma", "Olivia", "Sophia", "Isabella", "Charlotte", "Amelia", "Evelyn", "Abigail", "Emily", "Madison",
    "Scarlett", "Victoria", "Chloe", "Camila", "Penelope", "Layla", "Zoey", "Nora", "Lily", "Eleanor", "Hannah",
    "Lillian", "Addison", "Aubrey", "Ellie", "Stella", "Natalie", "Leah", "Greta", "Frieda", "Ingrid", "Astrid",
    "Sigrid", "Freya", "Helga", "Maja", "Amelie", "Margaux", "Juliette", "Camille", "Manon", "Clemence", "Elodie",
    "Lucia", "Valentina", "Ximena", "Paula", "Carmen", "Marisol", "Guadalupe", "Beatriz", "Giulia", "Francesca",
    "Chiara", "Alessandra", "Federica", "Serena", "Mariana", "Ines", "Leonor", "Raquel", "Fernanda", "Larissa",
    "Sanne", "Fenna", "Lieke", "Roos", "Anouk", "Agnieszka", "Katarzyna", "Svetlana", "Natasha", "Olga", "Tatiana",
    "Irina", "Milena", "Yulia", "Oksana", "Zuzana", "Dorota", "Eleni", "Katerina", "Sofia", "Despina", "Fatima",
    "Aisha", "Yasmin", "Mariam", "Salma", "Zainab", "Elif", "Zeynep", "Ayse", "Defne", "Selin", "Shirin", "Parisa",
    "Farah", "Nasrin", "Priya", "Ananya", "Kavya", "Deepika", "Sneha", "Meera", "Lakshmi", "Pooja", "Divya",
    "Sunita", "Nandini", "Shreya", "Mei", "Xiu", "Ling", "Fang", "Yui", "Hina", "Mio", "Akari", "Yuna", "Emiko",
    "Keiko", "Haeun", "Soyeon", "Eunji", "Yerin", "Linh", "Thao", "Ngoc", "Abena", "Ngozi", "Chiamaka", "Folake",
    "Zawadi", "Thandiwe", "Adwoa", "Adaeze", "Fatou", "Aminata", "Tamar", "Shira", "Yael", "Aroha", "Mele",
    "Leilani", "Malia", "Ataahua", "Citlali", "Nayeli", "Anahi", "Rocio", "Siobhan", "Niamh", "Aoife", "Saoirse",
    "Orla", "Cerys", "Eira", "Bronwen", "Isla", "Morag", "Kirsty", "Birgit", "Ursula", "Heike", "Petra", "Renate",
    "Katalin", "Ildiko", "Jelena", "Mirela", "Ivana", "Tijana", "Linnea", "Signe", "Aino", "Tuuli", "Miriam",
    "Naomi", "Ruth", "Clara", "Iris", "Beatrix", "Matilda", "Winifred", "Imani", "Keisha", "Latoya", "Tanisha",
    "Jasmine", "Filippa", "Pilar", "Consuelo", "Phuong",
))
UNISEX_NAMES = frozenset((
    "Avery", "Harper", "Rowan", "Noor", "Amani", "Qing", "Hui", "Ming", "Chen", "Wei", "Jiwoo", "Kiran", "Tenzin",
    "Pema", "Sonam", "Karma", "Khanh", "Thanh", "Bao", "Zhen", "Inti",
))
MALE_NAMES = frozenset(NAMES) - FEMALE_NAMES - UNISEX_NAMES

_AGEDB_FILE = re.compile(r"^(\d+)_(.+)_(\d+)_([mf])\.jpe?g$", re.IGNORECASE)
_DIGIFACE_FILE = re.compile(r"^\d+\.png$", re.IGNORECASE)
_VGGFACE2_FILE = re.compile(r"^\d+_\d+\.jpe?g$", re.IGNORECASE)
_CAMEL_CASE = re.compile(r"(?<=[a-z])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])")


@dataclass(frozen=True)
class SourceImage:
    path: Path
    age: int | None = None


@dataclass(frozen=True)
class SourceIdentity:
    """One person of the source: its key (AgeDB name, or folder), real name and gender where known, images."""

    key: str
    real_name: str | None
    gender: str | None  # "m", "f" or None
    images: tuple[SourceImage, ...]


@dataclass(frozen=True)
class Source:
    """How to read one download: its name in messages, the layout it expects, and the reader."""

    label: str
    layout: str
    read: Callable[[Path], list[SourceIdentity]]


@dataclass(frozen=True)
class Chosen:
    """An identity given a slot: its pseudonym and the source images for training and for heldout/."""

    source: SourceIdentity
    pseudonym: str
    train: tuple[SourceImage, ...]
    heldout: tuple[SourceImage, ...]


def long_tailed_counts(identities: int, images: int) -> tuple[int, ...]:
    """Training images per identity, largest first: 30 for the first, 2 for the last, ``images`` in all.

    The i-th of N identities (t = i / (N - 1)) gets 2 + 28 (1 - t)^p images, p chosen by bisection so
    that they sum to ``images``; the fractions are rounded by largest remainder (ties to the larger
    identity), which keeps the decay, the 30 and the 2. A ValueError when no such profile exists.
    """
    least = MOST_IMAGES + FEWEST_IMAGES * (identities - 1)
    most = MOST_IMAGES * (identities - 1) + FEWEST_IMAGES
    if identities < 2 or not least <= images <= most or (identities == 2 and images != least):
        raise ValueError(f"no profile from {MOST_IMAGES} down to {FEWEST_IMAGES} gives {identities} identities and "
                         f"{images} images")
    if images == least:  # also every 2-identity profile: 30 + 2
        return (MOST_IMAGES,) + (FEWEST_IMAGES,) * (identities - 1)
    if images == most:
        return (MOST_IMAGES,) * (identities - 1) + (FEWEST_IMAGES,)
    ts = [i / (identities - 1) for i in range(identities)]
    span = MOST_IMAGES - FEWEST_IMAGES

    def exact(p: float) -> list[float]:
        return [FEWEST_IMAGES + span * (1 - t) ** p for t in ts]

    low, high = 1e-9, 1e9  # the sum falls as p grows
    for _ in range(200):
        p = math.sqrt(low * high)
        low, high = (p, high) if sum(exact(p)) > images else (low, p)
    values = exact(math.sqrt(low * high))
    counts = [math.floor(v) for v in values]
    middle = sorted(range(1, identities - 1), key=lambda i: (-(values[i] - counts[i]), i))
    for i in middle[:images - sum(counts)]:
        counts[i] += 1
    return tuple(sorted(counts, reverse=True))


def read_agedb(folder: Path) -> list[SourceIdentity]:
    """AgeDB's flat folder of ``<n>_<Name>_<age>_<gender>.jpg``: one identity per name."""
    by_name: dict[str, list[tuple[SourceImage, str]]] = {}
    for path in _files(folder):
        match = _AGEDB_FILE.match(path.name)
        if match:
            by_name.setdefault(match[2], []).append((SourceImage(path, int(match[3])), match[4].lower()))
    return [SourceIdentity(name, name, Counter(g for _, g in shots).most_common(1)[0][0],
                           tuple(image for image, _ in shots))
            for name, shots in sorted(by_name.items())]


def read_digiface(folder: Path) -> list[SourceIdentity]:
    """DigiFace-1M's ``<identity>/<n>.png`` folders; its faces are rendered, so no name and no gender."""
    return [SourceIdentity(key, None, None, images) for key, images in _identity_folders(folder, _DIGIFACE_FILE)]


def read_vggface2(folder: Path) -> list[SourceIdentity]:
    """VGGFace2's ``<class id>/<nnnn_nn>.jpg`` folders, with names and genders from ``identity_meta.csv`` in
    ``folder`` or its parent (the download's layout: ``identity_meta.csv`` beside ``train/`` and ``test/``)."""
    meta = read_vggface2_meta(folder)
    return [SourceIdentity(key, *meta.get(key, (None, None)), images)
            for key, images in _identity_folders(folder, _VGGFACE2_FILE)]


def read_vggface2_meta(folder: Path) -> dict[str, tuple[str, str | None]]:
    """Class id -> (name, gender) from VGGFace2's ``identity_meta.csv`` (columns ``Class_ID, Name, Sample_Num,
    Flag, Gender``, values after ", " and sometimes quoted); {} without the file."""
    path = next((p for p in (folder / "identity_meta.csv", folder.parent / "identity_meta.csv") if p.is_file()), None)
    if path is None:
        return {}
    with open(path, newline="", encoding="utf-8-sig", errors="replace") as file:
        rows = csv.reader(file, skipinitialspace=True)
        header = [column.strip().lower() for column in next(rows, [])]
        if "class_id" not in header or "name" not in header:
            raise PogdiffError(f"{path}: no Class_ID and Name columns (found {', '.join(header) or 'none'}); "
                               "restore VGGFace2's identity_meta.csv, or move it away to build without names")
        key, name = header.index("class_id"), header.index("name")
        sex = header.index("gender") if "gender" in header else None
        meta = {}
        for row in rows:
            if len(row) > max(key, name):
                gender = row[sex].strip().lower() if sex is not None and sex < len(row) else ""
                meta[row[key].strip()] = (row[name].strip(), gender if gender in ("m", "f") else None)
    return meta


SOURCES: dict[str, Source] = {
    "agedb": Source("AgeDB", "<n>_<Name>_<age>_<gender>.jpg files", read_agedb),
    "digiface": Source("DigiFace-1M", "<identity>/<n>.png folders", read_digiface),
    "vggface2": Source("VGGFace2", "<class id>/<nnnn_nn>.jpg folders (e.g. n000002/0001_01.jpg)", read_vggface2),
}


def _files(folder: Path) -> list[Path]:
    """The files directly in ``folder``, by name."""
    with os.scandir(folder) as entries:
        return sorted((Path(entry.path) for entry in entries if entry.is_file()), key=lambda p: p.name)


def _identity_folders(folder: Path, pattern: re.Pattern) -> list[tuple[str, tuple[SourceImage, ...]]]:
    """(folder name, its images that match ``pattern``) for every subfolder of ``folder`` holding any, by name."""
    with os.scandir(folder) as entries:
        subfolders = sorted(entry.name for entry in entries if entry.is_dir() and not entry.name.startswith("."))
    identities = []
    for name in subfolders:
        images = tuple(SourceImage(path) for path in _files(folder / name) if pattern.match(path.name))
        if images:
            identities.append((name, images))
    return identities


def build_paper_dataset(source: str, source_dir: str | Path, out: str | Path, preset: str, seed: int = 0,
                        max_heldout: int = DEFAULT_MAX_HELDOUT,
                        captioner: Callable[[Sequence[Path]], list[str]] | None = None) -> Path:
    """Write the paper's ``preset`` set of ``source`` (a key of :data:`SOURCES`) from ``source_dir`` into ``out``.

    ``out`` gets ``metadata.jsonl`` and ``images/`` (the long-tailed training split, counts by
    :func:`long_tailed_counts`), ``heldout/`` (up to ``max_heldout`` other images of each chosen
    identity) and :data:`NAMES_FILE` (pseudonym -> real identity, and each copy's source file).
    ``captioner`` maps image paths to generated descriptions (:func:`load_captioner`); without one
    the captions come from the source's metadata (:func:`template_caption`). Held-out images always
    get the template: the metrics read only their pixels and identity. Everything is checked before
    anything is written; ``out`` appears complete or not at all. Deterministic in the inputs and ``seed``.
    """
    from pogdiff.evaluation.evaluate import HELDOUT_DIR  # what evaluate reads; imported here, not when parsing

    reader = SOURCES[source]
    source_dir, out = Path(source_dir), Path(out)
    identities, counts = _checked_source(reader, source_dir, source, preset)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise PogdiffError(f"{out}: already exists and is not an empty folder; choose a new or empty OUT "
                           "(nothing was written)")
    rng = np.random.default_rng(seed)
    chosen = choose_identities(identities, counts, rng, max_heldout)
    train_texts = _captions(chosen, captioner, [identity.real_name for identity in identities])
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp:
        train_names = _write_split(tmp, chosen, lambda c: c.train, train_texts)
        heldout_names = [[] for _ in chosen]
        if max_heldout > 0:
            heldout_texts = [[template_caption(c.pseudonym, c.source.gender, image.age) for image in c.heldout]
                             for c in chosen]
            heldout_names = [[f"{HELDOUT_DIR}/{name}" for name in names] for names in
                             _write_split(tmp / HELDOUT_DIR, chosen, lambda c: c.heldout, heldout_texts)]
        record = {"source": reader.label, "preset": preset, "seed": seed, "max_heldout": max_heldout,
                  "counts": list(counts), "identities": [
                      {"identity": c.pseudonym, "source_identity": c.source.key, "real_name": c.source.real_name,
                       "gender": c.source.gender, "train": _copies(train, c.train, source_dir),
                       "heldout": _copies(heldout, c.heldout, source_dir)}
                      for c, train, heldout in zip(chosen, train_names, heldout_names)]}
        (tmp / NAMES_FILE).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    return out


def _copies(file_names: Sequence[str], images: Sequence[SourceImage], source_dir: Path) -> list[dict]:
    """Each copy's file name in OUT and its source file, relative to ``source_dir``, for ``names.json``."""
    return [{"file_name": name, "source": image.path.relative_to(source_dir).as_posix()}
            for name, image in zip(file_names, images)]


def _checked_source(reader: Source, folder: Path, source: str, preset: str) -> tuple[list[SourceIdentity],
                                                                                       tuple[int, ...]]:
    """The source's identities and the preset's counts, or one line naming the folder and the fix."""
    if not folder.is_dir():
        why = "is not a folder" if folder.exists() else "not found"
        raise PogdiffError(f"{folder}: {reader.label} folder {why}; pass the folder holding {reader.label}'s "
                           f"{reader.layout}")
    identities = reader.read(folder)
    if not identities:
        raise PogdiffError(f"{folder}: no {reader.layout} of {reader.label}; pass the folder the download "
                           "unpacks to")
    counts = long_tailed_counts(*PAPER_SIZES[source][preset])
    shortfall = _shortfall(identities, counts)
    if shortfall:
        raise PogdiffError(f"{folder}: the {preset} preset needs {shortfall} but the folder has fewer; pass the "
                           f"complete {reader.label} download, or a smaller --preset")
    return identities, counts


def _shortfall(identities: Sequence[SourceIdentity], counts: Sequence[int]) -> str | None:
    """What ``identities`` lack to fill ``counts`` (largest first), e.g. "3 identities with >= 30 images"; None
    when they can: for every k, at least k identities have the k-th largest count."""
    sizes = sorted((len(identity.images) for identity in identities), reverse=True)
    for k, count in enumerate(counts, start=1):
        if k > len(sizes) or sizes[k - 1] < count:
            return f"{k} identities with >= {count} images"
    return None


def choose_identities(identities: Sequence[SourceIdentity], counts: Sequence[int], rng: np.random.Generator,
                      max_heldout: int) -> list[Chosen]:
    """Fill the slots ``counts`` (largest first) with identities drawn from those that have enough images.

    Each slot draws among the identities not yet taken that have more images than it needs (so some
    are left for ``heldout/``), else among those with just enough. Any such draw keeps the later,
    smaller slots fillable when :func:`_shortfall` found none lacking. Each identity's images are
    shuffled: the first ``count`` train, the next ``max_heldout`` are held out.
    """
    free = list(identities)
    taken: list[tuple[SourceIdentity, int]] = []
    for count in counts:
        enough = [i for i, identity in enumerate(free) if len(identity.images) >= count]
        spare = [i for i in enough if len(free[i].images) > count] or enough
        taken.append((free.pop(spare[rng.integers(len(spare))]), count))
    pseudonyms = draw_pseudonyms([identity for identity, _ in taken], rng)
    chosen = []
    for (identity, count), pseudonym in zip(taken, pseudonyms):
        order = [identity.images[i] for i in rng.permutation(len(identity.images))]
        chosen.append(Chosen(identity, pseudonym, tuple(order[:count]), tuple(order[count:count + max_heldout])))
    return chosen


def draw_pseudonyms(identities: Sequence[SourceIdentity], rng: np.random.Generator) -> list[str]:
    """A distinct first name of :data:`synth.NAMES` for each identity, of its gender where known (else any),
    never a word of any of their real names."""
    real_words = {word.lower() for identity in identities for word in name_words(identity.real_name or "")}
    pools = {"f": FEMALE_NAMES | UNISEX_NAMES, "m": MALE_NAMES | UNISEX_NAMES, None: frozenset(NAMES)}
    used: set[str] = set()
    pseudonyms = []
    for identity in identities:
        pool = [name for name in NAMES if name in pools[identity.gender] and name not in used
                and name.lower() not in real_words]
        if not pool:
            raise PogdiffError(f"{identity.key}: the {len(NAMES)} pseudonyms ran out for gender "
                               f"{identity.gender}; build a smaller --preset")
        pseudonyms.append(pool[rng.integers(len(pool))])
        used.add(pseudonyms[-1])
    return pseudonyms


def name_words(real_name: str) -> list[str]:
    """The words of a real name as sources spell it: "AlbertEinstein", "J.P.Morgan", "14th_Dalai_Lama"."""
    return [word for chunk in re.split(r"[\W_]+", real_name) for word in _CAMEL_CASE.split(chunk) if word]


def mask_real_names(text: str, real_names: Iterable[str | None], pseudonym: str) -> str:
    """``text`` with every one of ``real_names`` (its words run together or apart, any case) and each of their
    words of 3 letters or more, capitalised or in capitals, replaced by ``pseudonym``; a pseudonym then repeated
    ("Lukas Lukas") once. In lower case such a word is another word ("white" for Barry White). A captioner that
    names someone names the person in the photo, whoever it takes them for."""
    spellings = [name_words(name) for name in real_names if name]
    spellings = [words for words in spellings if words]
    if not spellings:
        return text
    whole = "|".join(r"[\s._-]*".join(map(re.escape, words)) for words in spellings)
    text = re.sub(rf"\b(?:{whole})\b", pseudonym, text, flags=re.IGNORECASE)
    parts = sorted({form for words in spellings for word in words if len(word) >= 3
                    for form in (word[0].upper() + word[1:], word.upper())})
    if parts:
        text = re.sub(rf"\b(?:{'|'.join(map(re.escape, parts))})\b", pseudonym, text)
    return re.sub(rf"\b{re.escape(pseudonym)}(?:[\s,]+{re.escape(pseudonym)}\b)+", pseudonym, text)


def template_caption(pseudonym: str, gender: str | None, age: int | None) -> str:
    """The caption from the source's metadata: "An image of Lukas, a 35-year-old man.", "..., a woman.",
    or "An image of Lukas." when the source tells neither."""
    who = {"m": "man", "f": "woman"}.get(gender, "person")
    if age is not None:
        return f"An image of {pseudonym}, a {age}-year-old {who}."
    return f"An image of {pseudonym}, a {who}." if gender else f"An image of {pseudonym}."


def generated_caption(pseudonym: str, generated: str, real_names: Iterable[str | None]) -> str:
    """"An image of Lukas, <generated>." with the real names masked, one line, its end's punctuation dropped."""
    text = " ".join(mask_real_names(generated, real_names, pseudonym).split()).rstrip(" .,;:")
    if not text:
        return f"An image of {pseudonym}."
    if text[0].isupper() and not text.startswith(pseudonym) and not text[1:2].isupper():
        text = text[0].lower() + text[1:]
    return f"An image of {pseudonym}, {text}."


def _captions(chosen: Sequence[Chosen], captioner: Callable[[Sequence[Path]], list[str]] | None,
              real_names: Sequence[str | None]) -> list[list[str]]:
    """The training captions of each chosen identity, in the order of its training images; a generated one with
    every name of ``real_names`` (the whole source's) masked."""
    if captioner is None:
        return [[template_caption(c.pseudonym, c.source.gender, image.age) for image in c.train] for c in chosen]
    generated = iter(captioner([image.path for c in chosen for image in c.train]))
    return [[generated_caption(c.pseudonym, next(generated), real_names) for _ in c.train] for c in chosen]


def _write_split(folder: Path, chosen: Sequence[Chosen], images_of: Callable[[Chosen], Sequence[SourceImage]],
                 texts: Sequence[Sequence[str]]) -> list[list[str]]:
    """Copy each identity's images (bytes unchanged) to ``folder/images/<pseudonym>-<k><suffix>``, list them in
    ``folder/metadata.jsonl``, and return the file names (relative to ``folder``) per identity."""
    (folder / "images").mkdir(parents=True)
    written, rows = [], []
    for c, captions in zip(chosen, texts):
        images = images_of(c)
        digits = max(2, len(str(len(images) - 1)))
        names = [f"images/{c.pseudonym}-{k:0{digits}d}{image.path.suffix.lower()}" for k, image in enumerate(images)]
        for name, image, text in zip(names, images, captions):
            shutil.copyfile(image.path, folder / name)
            rows.append({"file_name": name, "text": text, "identity": c.pseudonym})
        written.append(names)
    with open(folder / METADATA_FILE, "w", encoding="utf-8", newline="\n") as metadata:
        metadata.writelines(json.dumps(row) + "\n" for row in rows)
    return written


def load_captioner(model: str, batch_size: int = 8) -> Callable[[Sequence[Path]], list[str]]:
    """A transformers ``image-text-to-text`` model (a folder or hub id; the paper used LLaVA-1.6-7b) as a function
    from image paths to descriptions, asked :data:`CAPTION_PROMPT`, run in batches on CUDA when there is one
    (float16), else on the CPU; greedy decoding. The model loads on the first call, after the source and OUT
    are checked; one line naming the model when it does not load."""

    @functools.cache
    def pipe():
        import torch
        from transformers import pipeline

        cuda = torch.cuda.is_available()
        try:
            return pipeline("image-text-to-text", model=model, device="cuda" if cuda else "cpu",
                            dtype=torch.float16 if cuda else torch.float32)
        except (OSError, ValueError, KeyError) as error:
            raise PogdiffError(f"{model}: cannot load it as an image-text-to-text model ({first_line(error)}); "
                               "pass a transformers vision-language model, e.g. llava-hf/llava-v1.6-vicuna-7b-hf"
                               ) from None

    def caption(paths: Sequence[Path]) -> list[str]:
        from PIL import Image

        texts = []
        for start in range(0, len(paths), batch_size):
            chats = []
            for path in paths[start:start + batch_size]:
                with Image.open(path) as image:
                    chats.append([{"role": "user", "content": [{"type": "image", "image": image.convert("RGB")},
                                                               {"type": "text", "text": CAPTION_PROMPT}]}])
            outputs = pipe()(text=chats, batch_size=batch_size, max_new_tokens=60, return_full_text=False,
                             generate_kwargs={"do_sample": False})
            texts += [(out[0] if isinstance(out, list) else out)["generated_text"] for out in outputs]
        return texts

    return caption
