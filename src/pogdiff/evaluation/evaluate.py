"""``pogdiff evaluate``: sample a prompt for every identity and score the runs (and folders of samples).

The prompt is ``prompt_template`` with the identity's name, by default App. B's "An image
of {name}."; a dataset captioned otherwise wants a template like its captions
(``--prompt-template``), which metrics.json and the report record.

Every metric is computed per identity, then averaged over All identities and over the
Few (minority) ones, identities with at most ``few_max_images`` training images (the
paper's protocol, App. B and E):

- ``fd``: Fréchet distance between the identity's generated images and its real images,
  training and held-out (``DATA/heldout``) together: the paper takes all the source
  images of the identity. Needs >= 2 images on each side, else None.
- ``sim``: mean cosine similarity between generated and held-out real images (the
  paper's DINO score); without a ``DATA/heldout`` folder, the training images stand in
  (and metrics.json says so). None for an identity with no held-out image.
- ``recall`` (Eq. 17): fraction of the identity's training images covered by a generated
  image (cosine similarity >= ``recall_threshold``).
- ``id_acc``: fraction of the generated images a judge assigns to the intended identity.

fd is measured in one feature space (``fd_features``), sim and recall in another
(``sim_features``; the paper: Inception, then DINOv2), both set by ``features``; the
samples are made once and scored in both, and an extractor is built once when both name
the same space. The features judge and the look-alikes use the sim space. metrics.json
(``feature_spaces``) and report.html name both spaces, and the judge. On a dataset with many
identities ``max_identities`` scores a fixed sample of them (:func:`identity_sample`); the judge
and the look-alikes still choose among every identity. Averages skip the identities whose value is None;
metrics.json lists them under ``skipped``.

Calibration rows (``calibration`` in metrics.json) say what the numbers mean on this
dataset, feature space and judge: real images scored as if generated, with the same code.

- ``real (held-out)``: each identity's held-out images (``DATA/heldout``), what a perfect
  generator would give. A reference never contains the image being scored: fd is taken
  against the training images only, and sim over pairs of two different held-out images.
- ``real (look-alike)``: the held-out images (training images where it has none) of the
  identity whose training-image centroid is nearest in the sim space (cosine), scored
  against this identity's references: what drawing the wrong, similar person gives.

Memory does not grow with the number of images: every run's samples are written to
``OUT/samples/<label>/<identity>/<NNN>.png`` as they are made and scored from there a batch at
a time, exactly as ``--samples`` folders are (:mod:`pogdiff.evaluation.samples`), and the real
images are read a batch at a time; only their features and a few thumbnails per identity (for
the report) are kept. Under ``accelerate launch`` every process samples its share of the
batches (:func:`pogdiff.backbones.sampling.sample_rows`: the same images for any number of processes);
the main process scores and writes metrics.json and the report.
"""

from __future__ import annotations

import json
import random
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from pogdiff.backbones.backbone import load_backbone
from pogdiff.encode.cache import check_cache_dir
from pogdiff.data.dataset import FEW_MAX_IMAGES, METADATA_FILE, ImageTextDataset, load_dataset
from pogdiff.data.image_files import ImageFiles, pixels_to_float
from pogdiff.data.synth import load_identities
from pogdiff.errors import PogdiffError, PogdiffWarning
from pogdiff.evaluation import metrics as m
from pogdiff.evaluation.features import DEFAULT_FEATURES, FeatureSpaces
from pogdiff.evaluation.identity import CentroidJudge, SynthIdentityJudge
from pogdiff.evaluation.report import ReportData, write_report
from pogdiff.evaluation.results_table import all_few_table, format_value, markdown_table
from pogdiff.evaluation.samples import READ_BATCH, batches_of, find_samples, resolution_of, write_samples
from pogdiff.files import file_stems, remove_quietly
from pogdiff.images import save_grid
from pogdiff.objectives.neighbours import EFFICIENTNET_SPACE
from pogdiff.options import check_values
from pogdiff.training.ownership import EVALUATION
from pogdiff.processes import on_main_process, process_state
from pogdiff.training.run_folder import RunFolder, load_psi, load_psi_summary, read_run_info, run_label
from pogdiff.backbones.shipped import resolve_run_dir

PROMPT = "An image of {name}."  # App. B: the default --prompt-template
METRIC_KEYS = ("fd", "sim", "recall", "id_acc")
JUDGES = ("auto", "synth", "faces", "features")
DATASET_COLUMNS = {"caption_column": "text", "identity_column": "identity", "image_column": "file_name"}
HELDOUT_DIR = "heldout"
HELD_OUT, LOOK_ALIKE = "real (held-out)", "real (look-alike)"  # calibration rows
PREVIEW_IMAGES, THUMBNAIL = 8, 64  # per identity and set, kept for the report and the grids, at most 64 px
MAX_IDENTITIES_HELP = ("score a fixed sample of at most N identities, stratified by training images, instead of "
                       "all (sampling time is per identity); the judge still chooses among every identity")


def paper_sample_counts(num_training_images: int) -> tuple[int, int]:
    """Generated images per identity in App. B: (All, Few).

    100 per identity for the small and medium sets (32 and 100 training images), 20 for
    the large ones (~1,000), and 500 per minority identity for the Few-shot numbers.
    """
    return (20 if num_training_images >= 500 else 100), 500


def identity_order(dataset: ImageTextDataset) -> list[str]:
    """Identities, minority first (fewest training images), ties in dataset order."""
    counts = dataset.identity_counts()
    return sorted(counts, key=lambda name: counts[name])


def identity_sample(names: list[str], counts: dict[str, int], max_identities: int) -> list[str]:
    """At most ``max_identities`` of ``names``, stratified by training-image count, in ``names``' order.

    Each count keeps its share of the identities (largest remainder; one at least while there is
    room), drawn with a fixed seed: every run, method and seed is scored on the same people.
    """
    if max_identities >= len(names):
        return names
    groups: dict[int, list[str]] = {}
    for name in names:
        groups.setdefault(counts[name], []).append(name)
    share = {c: max_identities * len(g) / len(names) for c, g in groups.items()}
    floor = 1 if max_identities >= len(groups) else 0
    quota = {c: max(int(share[c]), floor) for c in groups}  # <= the group's size: share < size, and size >= 1
    by_remainder = sorted(groups, key=lambda c: quota[c] - share[c])
    while sum(quota.values()) > max_identities:  # the "one at least" pushed the total over
        c = max((c for c in quota if quota[c] > 1), key=lambda c: quota[c] - share[c])
        quota[c] -= 1
    for c in by_remainder:
        if sum(quota.values()) == max_identities:
            break
        if quota[c] < len(groups[c]):
            quota[c] += 1
    rng = random.Random(0)
    chosen = {name for c, g in groups.items() for name in rng.sample(g, quota[c])}
    return [name for name in names if name in chosen]


Batches = Callable[[], Iterator[torch.Tensor]]  # yields one set's images, (B, 3, H, W) in [-1, 1], each call anew


@dataclass
class ImageSet:
    """One identity's images (generated, or real) as the metrics see them: features per role
    (:class:`FeatureSpaces`), up to :data:`PREVIEW_IMAGES` thumbnails, and how to read the images again
    (for a judge that decides on pixels)."""

    features: dict[str, torch.Tensor]
    thumbnails: torch.Tensor
    batches: Batches
    predicted: list[str | None] | None = None  # the judge's identity per image, once asked

    def __len__(self) -> int:
        return len(self.features["fd"])


def thumbnails(images: torch.Tensor) -> torch.Tensor:
    """Images at most :data:`THUMBNAIL` pixels wide (nearest neighbour, as the grids draw them)."""
    return images if images.shape[-1] <= THUMBNAIL else F.interpolate(images, size=THUMBNAIL, mode="nearest")


def rows_by_identity(dataset: ImageTextDataset) -> dict[str, list[int]]:
    rows: dict[str, list[int]] = {}
    for i, name in enumerate(dataset.identity_names):
        rows.setdefault(name, []).append(i)
    return rows


def load_scored_dataset(root: Path, columns: dict[str, str]) -> ImageTextDataset:
    """``load_dataset`` with the given columns, refusing one without identities: evaluate prompts and scores
    per identity, and would otherwise take every image for a person of its own."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dataset = load_dataset(root, columns["caption_column"], columns["identity_column"], columns["image_column"])
    if dataset.identities is None:
        raise PogdiffError(f"{root / METADATA_FILE}: no '{columns['identity_column']}' column, so evaluate cannot "
                           "tell who each image shows; pass --identity-column NAME, the column that holds it")
    for warning in caught:
        warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)
    return dataset


@dataclass
class RealImages:
    """The real images of every identity at one resolution, described (:class:`ImageSet`), and the identity judge."""

    training: dict[str, ImageSet]
    heldout: dict[str, ImageSet] | None  # None: the dataset has no DATA/heldout
    judge: object


class Evaluation:
    """One dataset, two feature spaces (fd's; sim's and recall's), one judge: scores any number of image sets.

    ``features``: a :class:`FeatureSpaces`, or one space (a name or an extractor) for both roles.
    ``columns``: the metadata columns (``caption_column``, ``identity_column``, ``image_column``).
    """

    def __init__(self, data_dir: Path, features, inception_weights, identity_judge: str, face_detector: str,
                 few_max_images: int, cache_dir: str | Path | None, progress: bool,
                 max_identities: int | None = None, columns: dict[str, str] | None = None):
        if identity_judge not in JUDGES:
            raise PogdiffError(f"unknown identity judge {identity_judge!r}; choose one of {', '.join(JUDGES)}")
        self.data_dir = data_dir
        columns = {**DATASET_COLUMNS, **(columns or {})}
        self.dataset = load_scored_dataset(data_dir, columns)
        heldout = data_dir / HELDOUT_DIR
        self.heldout = load_scored_dataset(heldout, columns) if (heldout / METADATA_FILE).is_file() else None
        for split in (self.dataset, self.heldout):  # decode every image now: a broken one fails before sampling
            if split is not None:
                for _ in ImageFiles(split, 8).batches(range(len(split)), 256):
                    pass
        self.counts = self.dataset.identity_counts()
        every = identity_order(self.dataset)
        self.names = every if max_identities is None else identity_sample(every, self.counts, max_identities)
        self.few = self.dataset.few_identities(few_max_images)
        self.spaces = features if isinstance(features, FeatureSpaces) else FeatureSpaces(
            features, features, inception_weights)  # on this process's device (the GPU when there is one)
        self.sim_features = self.spaces.specs["sim"]  # the features judge's space
        synth = data_dir / "synth.json"
        self.judge_kind = self._judge_kind(identity_judge, synth)
        self.face_detector, self.cache_dir, self.progress = face_detector, cache_dir, progress
        self._real: dict[int, RealImages] = {}
        self._face_descriptor = None  # dlib's models, loaded once for every resolution's faces judge

    def _judge_kind(self, identity_judge: str, synth: Path) -> str:
        """The judge to use: ``auto`` is synth for a `pogdiff data synth` set whose synth.json describes
        every identity, else features (with a warning when identities are missing from it)."""
        if identity_judge not in ("auto", "synth"):
            return identity_judge
        if not synth.is_file():
            if identity_judge == "synth":
                raise PogdiffError(f"{synth}: not found; the synth judge only scores datasets written by "
                                   "`pogdiff data synth`; use --identity-judge features or faces")
            return "features"
        unknown = sorted(set(self.counts) - {identity.name for identity in load_identities(synth)})
        if not unknown:
            return "synth"
        shown = ", ".join(unknown[:3]) + (", ..." if len(unknown) > 3 else "")
        problem = (f"{synth}: {len(unknown)} of the dataset's identities are not in it ({shown}), so the synth "
                   "judge, which knows only the people it rendered, cannot recognise them")
        if identity_judge == "synth":
            raise PogdiffError(f"{problem}; use --identity-judge features or faces")
        warnings.warn(f"{problem}; id_acc is judged by the features judge instead", PogdiffWarning)
        return "features"

    def describe(self, batches: Batches) -> ImageSet:
        """The features of a set of images in both spaces and its first thumbnails, reading it a batch at a time."""
        features: dict[str, list[torch.Tensor]] = {"fd": [], "sim": []}
        kept: list[torch.Tensor] = []
        for batch in batches():
            for role, values in self.spaces(batch).items():
                features[role].append(values)
            room = PREVIEW_IMAGES - sum(map(len, kept))
            if room > 0:
                kept.append(thumbnails(batch[:room]))
        return ImageSet({role: torch.cat(values) for role, values in features.items()}, torch.cat(kept), batches)

    def real(self, resolution: int) -> RealImages:
        """The real images described at the resolution of the generated ones (once per resolution)."""
        if resolution not in self._real:
            training = {n: self.describe(self._dataset_batches(self.dataset, rows, resolution))
                        for n, rows in rows_by_identity(self.dataset).items()}
            heldout = None if self.heldout is None else {
                n: self.describe(self._dataset_batches(self.heldout, rows, resolution))
                for n, rows in rows_by_identity(self.heldout).items() if n in self.counts}
            self._real[resolution] = RealImages(training, heldout, self._make_judge(training))
        return self._real[resolution]

    @staticmethod
    def _dataset_batches(dataset: ImageTextDataset, rows: list[int], resolution: int) -> Batches:
        return lambda: (pixels_to_float(batch) for batch in ImageFiles(dataset, resolution).batches(rows, READ_BATCH))

    def _make_judge(self, training: dict[str, ImageSet]):
        if self.judge_kind == "synth":
            return SynthIdentityJudge.for_dataset(self.data_dir / "synth.json", self.cache_dir,
                                                  progress=self.progress)
        if self.judge_kind == "faces":
            from pogdiff.evaluation.faces import FaceDescriptor, FaceJudge

            if self._face_descriptor is None:
                self._face_descriptor = FaceDescriptor(self.face_detector)
            return FaceJudge(((n, batch) for n, images in training.items() for batch in images.batches()),
                             self._face_descriptor)
        return CentroidJudge(self.spaces.sim, {n: images.features["sim"] for n, images in training.items()})

    def references(self) -> dict[str, str]:
        if self.heldout is None:
            return {"fd": "training images of the identity (no DATA/heldout)",
                    "sim": "training images of the identity (no DATA/heldout, so not held out)"}
        return {"fd": "training and held-out (DATA/heldout) images of the identity",
                "sim": "held-out images of the identity (DATA/heldout)"}

    def score(self, generated: dict[str, Batches], resolution: int, recall_threshold: float
              ) -> tuple[dict, dict[str, ImageSet]]:
        """Per-identity metrics of each scored identity's images (read through ``generated[name]`` at
        ``resolution``), and the images described."""
        real = self.real(resolution)
        described = {name: self.describe(generated[name]) for name in self.names}
        per_identity = {}
        for name in self.names:
            images = described[name]
            fd_reference, sim_reference = self._reference_features(name, real)
            per_identity[name] = self._score_identity(
                name, images, real, recall_threshold, fd_reference,
                m.mean_similarity(images.features["sim"], sim_reference), len(sim_reference))
        return per_identity, described

    def calibration(self, resolution: int, recall_threshold: float) -> dict[str, dict]:
        """Per-identity scores of real images standing in for generated ones (see the module docstring):
        {row label: {"per_identity": ..., "look_alike_of": {identity: its look-alike}}}."""
        real = self.real(resolution)
        rows = {}
        if real.heldout is not None:
            per_identity = {}
            for name in self.names:
                images = real.heldout.get(name)
                per_identity[name] = (self._empty_scores(name) if images is None else self._score_identity(
                    name, images, real, recall_threshold, real.training[name].features["fd"],
                    m.mean_similarity_to_others(images.features["sim"]), len(images) - 1))
            rows[HELD_OUT] = {"per_identity": per_identity}
        look_alike = self.look_alikes(real)
        per_identity = {}
        for name in self.names:
            other = look_alike[name]
            if other is None:
                per_identity[name] = self._empty_scores(name)
                continue
            held_out = real.heldout is not None and other in real.heldout
            images = (real.heldout if held_out else real.training)[other]
            fd_reference, sim_reference = self._reference_features(name, real)
            per_identity[name] = self._score_identity(name, images, real, recall_threshold, fd_reference,
                                                      m.mean_similarity(images.features["sim"], sim_reference),
                                                      len(sim_reference))
        rows[LOOK_ALIKE] = {"per_identity": per_identity, "look_alike_of": look_alike}
        return rows

    def look_alikes(self, real: RealImages) -> dict[str, str | None]:
        """For each scored identity, the other identity (of all) whose training-image centroid is nearest
        (cosine, in the sim space)."""
        every = list(self.counts)
        if len(every) < 2:
            return {name: None for name in self.names}
        centroids = torch.stack([F.normalize(real.training[n].features["sim"].double(), dim=1).mean(0)
                                 for n in every])
        similarity = m.cosine_similarities(centroids, centroids).fill_diagonal_(-float("inf"))
        nearest = dict(zip(every, similarity.argmax(1).tolist()))
        return {name: every[nearest[name]] for name in self.names}

    def _reference_features(self, name: str, real: RealImages) -> tuple[torch.Tensor, torch.Tensor]:
        """The real features an identity's images are compared with: (fd's, in the fd space; sim's, in the sim
        space); see the module docstring."""
        training = real.training[name].features
        if real.heldout is None:  # no DATA/heldout: the training images stand in
            return training["fd"], training["sim"]
        heldout = real.heldout.get(name)
        if heldout is None:
            return training["fd"], training["sim"][:0]
        return torch.cat([training["fd"], heldout.features["fd"]]), heldout.features["sim"]

    def _predictions(self, images: ImageSet, judge) -> list[str | None]:
        """The judge's identity for each image of a set (asked once): the features judge decides on the sim
        features already computed, the others read the images again."""
        if images.predicted is None:
            images.predicted = (judge.predict_features(images.features["sim"]) if isinstance(judge, CentroidJudge)
                                else [p for batch in images.batches() for p in judge.predict(batch)])
        return images.predicted

    def _score_identity(self, name: str, images: ImageSet, real: RealImages, recall_threshold: float,
                        fd_reference: torch.Tensor, sim: float | None, sim_reference_images: int) -> dict:
        """The metrics of one identity's images (generated, or real ones standing in), sim given."""
        predicted = self._predictions(images, real.judge)
        scores = {
            "fd": m.frechet_distance(images.features["fd"], fd_reference),
            "sim": sim,
            "recall": m.recall(images.features["sim"], real.training[name].features["sim"], recall_threshold),
            "id_acc": m.identity_accuracy(predicted, name),
            "train_images": self.counts[name],
            "generated_images": len(images),
            "fd_reference_images": len(fd_reference),
            "sim_reference_images": sim_reference_images,
        }
        if self.judge_kind == "faces":
            scores["no_face"] = sum(p is None for p in predicted)
        return scores

    def _empty_scores(self, name: str) -> dict:
        """No image to score (an identity without held-out images or look-alike): every metric None."""
        return {**dict.fromkeys(METRIC_KEYS), "train_images": self.counts[name], "generated_images": 0}


EVALUATION_OUTPUTS = ("metrics.json", "report.html", "samples", "samples-*.png")


def evaluation_folder(out_dir: Path, data_dir: Path, own_folder: bool = False) -> RunFolder:
    """--out, which must not lie in the dataset nor hold files evaluate would replace that an earlier
    `pogdiff evaluate` did not write (``own_folder``: the caller's own, any file of it may be replaced)."""
    return RunFolder(out_dir, EVALUATION, "--out", data_dir=data_dir,
                     outputs=() if own_folder else EVALUATION_OUTPUTS)


def evaluate_runs(run_dirs: list[str | Path], data_dir: str | Path | None, out_dir: str | Path,
                  num_images: int = 8, num_inference_steps: int = 50, guidance_scale: float | None = None,
                  seed: int = 0, few_max_images: int = FEW_MAX_IMAGES, cache_dir: str | Path | None = None,
                  progress: bool = True, *, features=DEFAULT_FEATURES, fd_features=None, sim_features=None,
                  samples: list[str | Path] = (), inception_weights: str | Path | None = None,
                  recall_threshold: float = 0.9, identity_judge: str = "auto", face_detector: str = "hog",
                  num_images_few: int | None = None, paper_protocol: bool = False, max_identities: int | None = None,
                  report: bool = True, prompt_template: str = PROMPT, own_folder: bool = False,
                  caption_column: str = "text", identity_column: str = "identity", image_column: str = "file_name",
                  dataset_name: str | Path | None = None) -> dict | None:
    """Generate and score every run, and score every ``samples`` folder, on ``data_dir``'s identities.

    Writes ``metrics.json``, ``report.html`` (unless ``report=False``), each run's samples
    (``samples/<label>/<identity>/<NNN>.png``: :mod:`pogdiff.evaluation.samples`) and one grid per
    run or samples folder (``samples-<label>.png``) into ``out_dir``. A ``samples`` folder holds
    ``<identity>/*.png`` images made elsewhere; it is labelled by its folder name. ``num_images``
    images are generated per identity, ``num_images_few`` (default: the same) per Few identity;
    ``paper_protocol`` uses App. B's counts instead (:func:`paper_sample_counts`).
    ``prompt_template`` is what is sampled, with {name} replaced by each identity's name.
    ``max_identities`` scores a fixed, stratified sample of the identities (:func:`identity_sample`)
    instead of all. ``fd_features`` names fd's feature space, ``sim_features`` that of sim and recall,
    each ``features`` by default (:func:`pogdiff.evaluation.features.load_feature_extractor`: a name
    or an extractor object); ``identity_judge`` is one of :data:`JUDGES`. The dataset is ``data_dir``,
    or ``dataset_name`` (as ``pogdiff train --dataset-name`` reads it), with the given metadata columns.
    ``out_dir`` is checked first (:func:`evaluation_folder`; ``own_folder``: the caller's own, e.g. a
    benchmark cell's). Under ``accelerate launch`` every process samples its share; the main process
    scores and returns the metrics, the others return None.
    """
    from pogdiff.data.hf_datasets import data_folder

    out_dir = Path(out_dir)
    if not run_dirs and not samples:
        raise PogdiffError("nothing to evaluate; pass run folders written by `pogdiff train`, or --samples FOLDER")
    run_dirs = [resolve_run_dir(run) for run in run_dirs]
    samples = [Path(folder) for folder in samples]
    check_values({"num_images": num_images, "num_images_few": num_images_few, "seed": seed,
                  "num_inference_steps": num_inference_steps, "guidance_scale": guidance_scale,
                  "few_max_images": few_max_images, "recall_threshold": recall_threshold,
                  "max_identities": max_identities, "prompt_template": prompt_template}, command="evaluate")
    data_dir = data_folder(data_dir, dataset_name, image_column, cache_dir)
    folder = evaluation_folder(out_dir, data_dir, own_folder)
    folder.check()
    check_cache_dir(cache_dir)
    infos = [read_run_info(run_dir) for run_dir in run_dirs]  # a broken run fails now, before any work
    labels = unique_labels([run_label(info["config"]) for info in infos] + [folder.name for folder in samples])
    stems = file_stems(labels)
    check_samples_outside_run_folders(samples, [out_dir / "samples" / stems[label] for label in labels[:len(infos)]])
    state = process_state()
    spaces = FeatureSpaces(fd_features or features, sim_features or features, inception_weights, state.device)
    evaluation = Evaluation(data_dir, spaces, inception_weights, identity_judge, face_detector, few_max_images,
                            cache_dir, progress, max_identities, {"caption_column": caption_column,
                                                                  "identity_column": identity_column,
                                                                  "image_column": image_column})
    every = list(evaluation.counts)
    given = {label: find_samples(folder, every, evaluation.names)
             for label, folder in zip(labels[len(infos):], samples)}
    if paper_protocol:
        num_images, num_images_few = paper_sample_counts(len(evaluation.dataset))
    num_images_few = num_images_few or num_images
    samples_for = {n: num_images_few if n in evaluation.few else num_images for n in evaluation.names}

    folder.create()
    for run_dir, info, label in zip(run_dirs, infos, labels):
        warn_if_judge_shares_neighbour_space(label, info, evaluation)
        sample_run(run_dir, out_dir / "samples" / stems[label], evaluation, samples_for, state, prompt_template,
                   num_inference_steps, guidance_scale, seed, progress)
    state.wait_for_everyone()
    if not state.is_main_process:
        return None

    scored = {**{label: find_samples(out_dir / "samples" / stems[label], every, evaluation.names)
                 for label in labels[:len(infos)]}, **given}
    sources = {**{label: {"run": str(run_dir)} for label, run_dir in zip(labels, run_dirs)},
               **{label: {"samples": str(folder)} for label, folder in zip(labels[len(infos):], samples)}}
    results, described, psi, psi_summaries = {}, {}, {}, {}
    for label, files in scored.items():
        resolution = resolution_of(files[evaluation.names[0]])
        per_identity, described[label] = evaluation.score({n: batches_of(files[n], resolution) for n in files},
                                                          resolution, recall_threshold)
        save_grid([(f"{n} ({evaluation.counts[n]} train)", images.thumbnails)
                   for n, images in described[label].items()], out_dir / f"samples-{stems[label]}.png")
        results[label] = {**identity_summary(per_identity, evaluation), **sources[label]}
        run_psi = load_psi(sources[label]["run"]) if "run" in sources[label] else None
        if run_psi is not None:
            psi[label], psi_summaries[label] = run_psi, load_psi_summary(sources[label]["run"])

    resolution = resolution_of(next(iter(scored.values()))[evaluation.names[0]])
    real = evaluation.real(resolution)
    calibration = {label: {**identity_summary(row.pop("per_identity"), evaluation), **row}
                   for label, row in evaluation.calibration(resolution, recall_threshold).items()}
    sampled = bool(run_dirs)  # the counts below describe the runs' samples; --samples folders hold what they hold
    metrics = {"methods": results, "calibration": calibration, "data": str(data_dir),
               "feature_spaces": evaluation.spaces.names,
               "identity_judge": real.judge.name, "prompt_template": prompt_template,
               "recall_threshold": recall_threshold,
               "references": evaluation.references(),
               "num_images_per_identity": num_images if sampled else None,
               "num_images_per_few_identity": num_images_few if sampled else None, "paper_protocol": paper_protocol,
               "num_inference_steps": num_inference_steps if sampled else None,
               "guidance_scale": guidance_scale, "few_max_images": few_max_images,
               "num_identities": {"all": len(evaluation.names), "few": len(set(evaluation.names) & evaluation.few)},
               "identity_sample": None if len(evaluation.names) == len(evaluation.counts) else {
                   "of": len(evaluation.counts), "few_of": len(evaluation.few),
                   "how": "stratified by training images, fixed seed (the same for every run)"}}
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    if report:
        write_report(out_dir / "report.html", metrics, report_data(evaluation, real, described, psi, psi_summaries))
    return metrics


def sample_run(run_dir: Path, folder: Path, evaluation: Evaluation, samples_for: dict[str, int], state,
               prompt_template: str, num_inference_steps: int, guidance_scale: float | None, seed: int,
               progress: bool) -> None:
    """A run's samples into ``folder`` (:func:`write_samples`), replacing an earlier evaluation's; each process
    of ``state`` (accelerate's) draws its share of the batches."""
    on_main_process(lambda: remove_quietly(folder))  # an earlier evaluation's samples, maybe more of them
    write_samples(load_backbone(run_dir, state.device), samples_for, folder, file_stems(evaluation.counts),
                  prompt_template, num_inference_steps, guidance_scale, seed, progress and state.is_main_process,
                  (state.process_index, state.num_processes))


def report_data(evaluation: Evaluation, real: RealImages, described: dict[str, dict[str, ImageSet]], psi: dict,
                psi_summaries: dict) -> ReportData:
    """What the report shows beyond metrics.json: thumbnails, and features in the sim space."""
    return ReportData(
        evaluation.names, dict(evaluation.counts), evaluation.few,
        {n: images.thumbnails for n, images in real.training.items()},
        {n: images.features["sim"] for n, images in real.training.items()},
        {label: {n: images.thumbnails for n, images in sets.items()} for label, sets in described.items()},
        {label: {n: images.features["sim"] for n, images in sets.items()} for label, sets in described.items()},
        psi, psi_summaries)


def check_samples_outside_run_folders(samples: list[Path], run_folders: list[Path]) -> None:
    """Refuse a --samples folder inside the folder a run's samples are about to replace."""
    for folder in samples:
        for run_folder in run_folders:
            if folder.resolve().is_relative_to(run_folder.resolve()):
                raise PogdiffError(f"{folder}: --samples lies in {run_folder}, where this evaluation writes a run's "
                                   "new samples; copy it elsewhere, or choose another --out")


def warn_if_judge_shares_neighbour_space(label: str, info: dict, evaluation: Evaluation) -> None:
    """A PoGDiff run whose neighbours (Eq. 8) were found in the judge's own space has seen the test a little."""
    config = info["config"]
    if config.get("method") != "pogdiff":
        return
    # runs from before loss_options was recorded ran with the default of their time, the first one
    space = {"neighbour_features": EFFICIENTNET_SPACE, **config.get("method_options", {}),
             **info.get("loss_options", {})}["neighbour_features"]
    shared = ((evaluation.judge_kind == "faces" and space == "faces")
              or (evaluation.judge_kind == "features" and space == evaluation.sim_features))
    if shared:
        warnings.warn(f"{label}: PoGDiff found its neighbours in {space}, the space the identity judge "
                      f"({evaluation.judge_kind}) decides in, so its id_acc is not independent of the method; pass "
                      "another --identity-judge or train with another --neighbour-features", PogdiffWarning,
                      stacklevel=2)


def identity_summary(per_identity: dict[str, dict], evaluation: Evaluation) -> dict:
    """Averages over All and Few, per-identity values, what was skipped (a run's or a calibration row's)."""
    names = evaluation.names
    result = {"all": average(per_identity, names), "few": average(per_identity, [n for n in names if n in evaluation.few]),
              "per_identity": per_identity,
              "skipped": {k: [n for n in names if per_identity[n][k] is None] for k in ("fd", "sim")}}
    if evaluation.judge_kind == "faces":
        missing = sum(v.get("no_face", 0) for v in per_identity.values())
        total = sum(v["generated_images"] for v in per_identity.values())
        result["no_face"] = {"count": missing, "fraction": missing / max(total, 1)}
    return result


def unique_labels(labels: list[str]) -> list[str]:
    """The labels made unique (:func:`_unique`), in order."""
    unique: list[str] = []
    for label in labels:
        unique.append(_unique(label, unique))
    return unique


def _unique(label: str, taken: list[str]) -> str:
    """``label``, or ``label#2``, ``label#3``... when runs share a method and options."""
    candidate, number = label, 2
    while candidate in taken:
        candidate, number = f"{label}#{number}", number + 1
    return candidate


def average(per_identity: dict[str, dict], names: list[str]) -> dict[str, float | None]:
    """Mean of each metric over ``names``, skipping identities where it is None."""
    return {k: m.mean_over([per_identity[n][k] for n in names]) for k in METRIC_KEYS}


def format_table(metrics: dict) -> str:
    """The All/Few table as Markdown, one row per method, then the calibration rows."""
    return markdown_table(*all_few_table({**metrics["methods"], **metrics["calibration"]}, format_value))
