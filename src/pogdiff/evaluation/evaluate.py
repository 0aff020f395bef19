"""``pogdiff evaluate``: sample a prompt for every identity and score the runs.

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

fd, sim and recall are measured in one feature space (``features``); metrics.json and
report.html name it, and the judge. On a dataset with many identities ``max_identities``
scores a fixed sample of them (:func:`identity_sample`); the judge and the look-alikes
still choose among every identity. Averages skip the identities whose value is None;
metrics.json lists them under ``skipped``.

Calibration rows (``calibration`` in metrics.json) say what the numbers mean on this
dataset, feature space and judge: real images scored as if generated, with the same code.

- ``real (held-out)``: each identity's held-out images (``DATA/heldout``), what a perfect
  generator would give. A reference never contains the image being scored: fd is taken
  against the training images only, and sim over pairs of two different held-out images.
- ``real (look-alike)``: the held-out images (training images where it has none) of the
  identity whose training-image centroid is nearest in the feature space (cosine), scored
  against this identity's references: what drawing the wrong, similar person gives.
"""

from __future__ import annotations

import json
import random
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from pogdiff.backbone import load_backbone
from pogdiff.cache import check_cache_dir
from pogdiff.data.dataset import FEW_MAX_IMAGES, ImageTextDataset, load_dataset
from pogdiff.data.synth import load_identities
from pogdiff.errors import PogdiffError, PogdiffWarning
from pogdiff.evaluation import metrics as m
from pogdiff.evaluation.features import DEFAULT_FEATURES, load_feature_extractor
from pogdiff.evaluation.identity import CentroidJudge, SynthIdentityJudge
from pogdiff.evaluation.report import ReportData, write_report
from pogdiff.evaluation.results_table import all_few_table, format_value, markdown_table
from pogdiff.files import check_writable_folder, file_stems
from pogdiff.images import save_grid, to_pil
from pogdiff.neighbour_features import EFFICIENTNET_SPACE
from pogdiff.options import check_values
from pogdiff.run_folder import load_psi, load_psi_summary, read_run_info, run_label
from pogdiff.sampling import generate
from pogdiff.shipped import resolve_run_dir
from pogdiff.data.image_files import read_images

PROMPT = "An image of {name}."  # App. B: the default --prompt-template
METRIC_KEYS = ("fd", "sim", "recall", "id_acc")
JUDGES = ("auto", "synth", "faces", "features")
HELDOUT_DIR = "heldout"
HELD_OUT, LOOK_ALIKE = "real (held-out)", "real (look-alike)"  # calibration rows
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


def by_identity(images: torch.Tensor, identity_names: list[str]) -> dict[str, torch.Tensor]:
    rows: dict[str, list[int]] = {}
    for i, name in enumerate(identity_names):
        rows.setdefault(name, []).append(i)
    return {name: images[index] for name, index in rows.items()}


@dataclass
class RealImages:
    """Real images of every identity at one resolution, their features, and the identity judge."""

    training: dict[str, torch.Tensor]
    training_features: dict[str, torch.Tensor]
    heldout: dict[str, torch.Tensor] | None  # None: the dataset has no DATA/heldout
    heldout_features: dict[str, torch.Tensor] | None
    judge: object


class Evaluation:
    """One dataset, one feature space, one judge: scores any number of runs."""

    def __init__(self, data_dir: Path, features, inception_weights, identity_judge: str, face_detector: str,
                 few_max_images: int, cache_dir: str | Path | None, progress: bool,
                 max_identities: int | None = None):
        if identity_judge not in JUDGES:
            raise PogdiffError(f"unknown identity judge {identity_judge!r}; choose one of {', '.join(JUDGES)}")
        self.data_dir = data_dir
        self.dataset = load_dataset(data_dir)
        heldout = data_dir / HELDOUT_DIR
        self.heldout = load_dataset(heldout) if (heldout / "metadata.jsonl").is_file() else None
        for split in (self.dataset, self.heldout):  # decode every image now: a broken one fails before sampling
            if split is not None:
                read_images(split, 8)
        self.counts = self.dataset.identity_counts()
        every = identity_order(self.dataset)
        self.names = every if max_identities is None else identity_sample(every, self.counts, max_identities)
        self.few = self.dataset.few_identities(few_max_images)
        self.features = features
        self.extractor = load_feature_extractor(features, inception_weights)
        synth = data_dir / "synth.json"
        self.judge_kind = self._judge_kind(identity_judge, synth)
        self.face_detector = face_detector
        self._synth_judge = (SynthIdentityJudge.for_dataset(synth, cache_dir, progress=progress)
                             if self.judge_kind == "synth" else None)
        self._real: dict[int, RealImages] = {}

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

    def real(self, resolution: int) -> RealImages:
        """Real images at the resolution of the generated ones (loaded once per resolution)."""
        if resolution not in self._real:
            training = by_identity(read_images(self.dataset, resolution), self.dataset.identity_names)
            training_features = {n: self.extractor(images) for n, images in training.items()}
            heldout = heldout_features = None
            if self.heldout is not None:
                heldout = {n: images for n, images in by_identity(read_images(self.heldout, resolution),
                                                                  self.heldout.identity_names).items()
                           if n in self.counts}
                heldout_features = {n: self.extractor(images) for n, images in heldout.items()}
            self._real[resolution] = RealImages(training, training_features, heldout, heldout_features,
                                                self._make_judge(training))
        return self._real[resolution]

    def _make_judge(self, training: dict[str, torch.Tensor]):
        if self.judge_kind == "synth":
            return self._synth_judge
        if self.judge_kind == "faces":
            from pogdiff.evaluation.faces import FaceDescriptor, FaceJudge

            return FaceJudge(training, FaceDescriptor(self.face_detector))
        return CentroidJudge(self.extractor, training)

    def references(self) -> dict[str, str]:
        if self.heldout is None:
            return {"fd": "training images of the identity (no DATA/heldout)",
                    "sim": "training images of the identity (no DATA/heldout, so not held out)"}
        return {"fd": "training and held-out (DATA/heldout) images of the identity",
                "sim": "held-out images of the identity (DATA/heldout)"}

    def score(self, generated: dict[str, torch.Tensor], recall_threshold: float) -> tuple[dict, dict]:
        """Per-identity metrics and the generated images' features."""
        real = self.real(next(iter(generated.values())).shape[-1])
        features = {n: self.extractor(images) for n, images in generated.items()}
        per_identity = {}
        for name in self.names:
            fd_reference, sim_reference = self._reference_features(name, real)
            per_identity[name] = self._score_identity(
                name, generated[name], features[name], real, recall_threshold, fd_reference,
                m.mean_similarity(features[name], sim_reference), len(sim_reference))
        return per_identity, features

    def calibration(self, resolution: int, recall_threshold: float) -> dict[str, dict]:
        """Per-identity scores of real images standing in for generated ones (see the module docstring):
        {row label: {"per_identity": ..., "look_alike_of": {identity: its look-alike}}}."""
        real = self.real(resolution)
        rows = {}
        if real.heldout is not None:
            per_identity = {}
            for name in self.names:
                images, features = real.heldout.get(name), real.heldout_features.get(name)
                per_identity[name] = (self._empty_scores(name) if images is None else self._score_identity(
                    name, images, features, real, recall_threshold, real.training_features[name],
                    m.mean_similarity_to_others(features), len(features) - 1))
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
            features = (real.heldout_features if held_out else real.training_features)[other]
            fd_reference, sim_reference = self._reference_features(name, real)
            per_identity[name] = self._score_identity(name, images, features, real, recall_threshold, fd_reference,
                                                      m.mean_similarity(features, sim_reference), len(sim_reference))
        rows[LOOK_ALIKE] = {"per_identity": per_identity, "look_alike_of": look_alike}
        return rows

    def look_alikes(self, real: RealImages) -> dict[str, str | None]:
        """For each scored identity, the other identity (of all) whose training-image centroid is nearest (cosine)."""
        every = list(self.counts)
        if len(every) < 2:
            return {name: None for name in self.names}
        centroids = torch.stack([F.normalize(real.training_features[n].double(), dim=1).mean(0) for n in every])
        similarity = m.cosine_similarities(centroids, centroids).fill_diagonal_(-float("inf"))
        nearest = dict(zip(every, similarity.argmax(1).tolist()))
        return {name: every[nearest[name]] for name in self.names}

    def _reference_features(self, name: str, real: RealImages) -> tuple[torch.Tensor, torch.Tensor]:
        """The real features an identity's images are compared with: (fd's, sim's); see the module docstring."""
        training = real.training_features[name]
        if real.heldout_features is None:  # no DATA/heldout: the training images stand in
            return training, training
        heldout = real.heldout_features.get(name, training[:0])
        return torch.cat([training, heldout]), heldout

    def _score_identity(self, name: str, images: torch.Tensor, features: torch.Tensor, real: RealImages,
                        recall_threshold: float, fd_reference: torch.Tensor, sim: float | None,
                        sim_reference_images: int) -> dict:
        """The metrics of one identity's images (generated, or real ones standing in), sim given."""
        predicted = real.judge.predict(images)
        scores = {
            "fd": m.frechet_distance(features, fd_reference),
            "sim": sim,
            "recall": m.recall(features, real.training_features[name], recall_threshold),
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


EVALUATION_MARK = ".pogdiff-evaluation"  # in an --out that `pogdiff evaluate` wrote: its outputs are its own
EVALUATION_OUTPUTS = ("metrics.json", "report.html", "samples", "samples-*.png")


def check_evaluation_folder(out_dir: Path, data_dir: Path, own_folder: bool = False) -> None:
    """Refuse, before any work, an --out that is a file, lies in the dataset, cannot be written, or holds
    files evaluate would replace that an earlier `pogdiff evaluate` did not write."""
    if out_dir.exists() and not out_dir.is_dir():
        raise PogdiffError(f"{out_dir}: --out is a file; choose a folder")
    if out_dir.resolve().is_relative_to(data_dir.resolve()):
        raise PogdiffError(f"{out_dir}: --out is inside the dataset {data_dir}, whose folder should hold only its "
                           "images and metadata; choose an --out outside it")
    if out_dir.is_dir() and not own_folder and not (out_dir / EVALUATION_MARK).is_file():
        taken = sorted(p.name for pattern in EVALUATION_OUTPUTS for p in out_dir.glob(pattern))
        if taken:
            raise PogdiffError(f"{out_dir / taken[0]}: already exists and `pogdiff evaluate` did not write it; "
                               "choose another --out, or move it away")
    check_writable_folder(out_dir, "--out")


def evaluate_runs(run_dirs: list[str | Path], data_dir: str | Path, out_dir: str | Path,
                  num_images: int = 8, num_inference_steps: int = 50, guidance_scale: float | None = None,
                  seed: int = 0, few_max_images: int = FEW_MAX_IMAGES, cache_dir: str | Path | None = None,
                  progress: bool = True, *, features=DEFAULT_FEATURES,
                  inception_weights: str | Path | None = None, recall_threshold: float = 0.9,
                  identity_judge: str = "auto", face_detector: str = "hog", num_images_few: int | None = None,
                  paper_protocol: bool = False, max_identities: int | None = None, report: bool = True,
                  prompt_template: str = PROMPT, own_folder: bool = False) -> dict:
    """Generate and score every run on ``data_dir``'s identities.

    Writes ``metrics.json``, ``report.html`` (unless ``report=False``), the samples
    (``samples/<method>/``) and one grid per method (``samples-<method>.png``) into
    ``out_dir``. ``num_images`` images are generated per identity, ``num_images_few``
    (default: the same) per Few identity; ``paper_protocol`` uses App. B's counts instead
    (:func:`paper_sample_counts`). ``prompt_template`` is what is sampled, with {name} replaced by
    each identity's name. ``max_identities`` scores a fixed, stratified sample of the
    identities (:func:`identity_sample`) instead of all. ``features`` names the feature space of fd, sim and
    recall (:func:`pogdiff.evaluation.features.load_feature_extractor`) or is an extractor
    object; ``identity_judge`` is one of :data:`JUDGES`. ``out_dir`` is checked first
    (:func:`check_evaluation_folder`; ``own_folder``: the caller's own, e.g. a benchmark cell's).
    """
    data_dir, out_dir = Path(data_dir), Path(out_dir)
    if not run_dirs:
        raise PogdiffError("no run to evaluate; pass one or more run folders written by `pogdiff train`")
    run_dirs = [resolve_run_dir(run) for run in run_dirs]
    check_values({"num_images": num_images, "num_images_few": num_images_few, "seed": seed,
                  "num_inference_steps": num_inference_steps, "guidance_scale": guidance_scale,
                  "few_max_images": few_max_images, "recall_threshold": recall_threshold,
                  "max_identities": max_identities, "prompt_template": prompt_template}, command="evaluate")
    check_evaluation_folder(out_dir, data_dir, own_folder)
    check_cache_dir(cache_dir)
    infos = [read_run_info(run_dir) for run_dir in run_dirs]  # a broken run fails now, before any work
    labels = run_labels([info["config"] for info in infos])
    evaluation = Evaluation(data_dir, features, inception_weights, identity_judge, face_detector, few_max_images,
                            cache_dir, progress, max_identities)
    if paper_protocol:
        num_images, num_images_few = paper_sample_counts(len(evaluation.dataset))
    num_images_few = num_images_few or num_images
    samples_for = {n: num_images_few if n in evaluation.few else num_images for n in evaluation.names}

    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / EVALUATION_MARK).touch()
    results, generated, generated_features, psi, psi_summaries = {}, {}, {}, {}, {}
    label_stems, name_stems = file_stems(labels), file_stems(evaluation.names)
    for run_dir, info, label in zip(run_dirs, infos, labels):
        warn_if_judge_shares_neighbour_space(label, info, evaluation)
        generated[label] = generate_per_identity(load_backbone(run_dir), samples_for, num_inference_steps,
                                                 guidance_scale, seed, progress, prompt_template)
        save_samples(generated[label], evaluation.counts, out_dir / f"samples-{label_stems[label]}.png",
                     out_dir / "samples" / label_stems[label], name_stems)
        per_identity, generated_features[label] = evaluation.score(generated[label], recall_threshold)
        results[label] = run_result(per_identity, evaluation, run_dir)
        run_psi = load_psi(run_dir)
        if run_psi is not None:
            psi[label], psi_summaries[label] = run_psi, load_psi_summary(run_dir)

    resolution = next(iter(generated.values()))[evaluation.names[0]].shape[-1]
    real = evaluation.real(resolution)
    calibration = {label: {**identity_summary(row.pop("per_identity"), evaluation), **row}
                   for label, row in evaluation.calibration(resolution, recall_threshold).items()}
    metrics = {"methods": results, "calibration": calibration, "data": str(data_dir),
               "feature_space": evaluation.extractor.name,
               "identity_judge": real.judge.name, "prompt_template": prompt_template,
               "recall_threshold": recall_threshold,
               "references": evaluation.references(), "num_images_per_identity": num_images,
               "num_images_per_few_identity": num_images_few, "paper_protocol": paper_protocol,
               "num_inference_steps": num_inference_steps, "guidance_scale": guidance_scale,
               "few_max_images": few_max_images,
               "num_identities": {"all": len(evaluation.names), "few": len(set(evaluation.names) & evaluation.few)},
               "identity_sample": None if len(evaluation.names) == len(evaluation.counts) else {
                   "of": len(evaluation.counts), "few_of": len(evaluation.few),
                   "how": "stratified by training images, fixed seed (the same for every run)"}}
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    if report:
        write_report(out_dir / "report.html", metrics,
                     ReportData(evaluation.names, dict(evaluation.counts), evaluation.few, real.training,
                                real.training_features, generated, generated_features, psi, psi_summaries))
    return metrics


def warn_if_judge_shares_neighbour_space(label: str, info: dict, evaluation: Evaluation) -> None:
    """A PoGDiff run whose neighbours (Eq. 8) were found in the judge's own space has seen the test a little."""
    config = info["config"]
    if config.get("method") != "pogdiff":
        return
    # runs from before loss_options was recorded ran with the default of their time, the first one
    space = {"neighbour_features": EFFICIENTNET_SPACE, **config.get("method_options", {}),
             **info.get("loss_options", {})}["neighbour_features"]
    shared = ((evaluation.judge_kind == "faces" and space == "faces")
              or (evaluation.judge_kind == "features" and space == evaluation.features))
    if shared:
        warnings.warn(f"{label}: PoGDiff found its neighbours in {space}, the space the identity judge "
                      f"({evaluation.judge_kind}) decides in, so its id_acc is not independent of the method; pass "
                      "another --identity-judge or train with another --neighbour-features", PogdiffWarning,
                      stacklevel=2)


def generate_per_identity(backbone, samples_for: dict[str, int], num_inference_steps: int,
                          guidance_scale: float | None, seed: int, progress: bool,
                          prompt_template: str = PROMPT) -> dict[str, torch.Tensor]:
    """``samples_for[name]`` images of ``prompt_template`` for every identity, in the order of ``samples_for``;
    identities with the same count are sampled together."""
    generated = {}
    for count in sorted(set(samples_for.values())):
        group = [n for n in samples_for if samples_for[n] == count]
        images = generate(backbone, [prompt_template.format(name=n) for n in group], count, num_inference_steps,
                          guidance_scale, seed, progress=progress)
        generated.update(zip(group, images.split(count)))
    return {n: generated[n] for n in samples_for}


def save_samples(generated: dict[str, torch.Tensor], counts: dict[str, int], grid: Path, folder: Path,
                 stems: dict[str, str]) -> None:
    """Every image as ``folder/<stem>_<i>.png`` (``stems``: a safe file name per identity), and one grid."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, images in generated.items():
        for i, image in enumerate(images):
            to_pil(image).save(folder / f"{stems[name]}_{i:03d}.png")
    save_grid([(f"{n} ({counts[n]} train)", images) for n, images in generated.items()], grid)


def run_result(per_identity: dict[str, dict], evaluation: Evaluation, run_dir: str | Path) -> dict:
    """One run's entry in metrics.json: :func:`identity_summary` and the run folder."""
    return {**identity_summary(per_identity, evaluation), "run": str(run_dir)}


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


def run_labels(configs: list[dict]) -> list[str]:
    """Each run's label (:func:`run_label` of its config), made unique."""
    labels: list[str] = []
    for config in configs:
        labels.append(_unique(run_label(config), labels))
    return labels


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
