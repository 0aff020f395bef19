"""``pogdiff evaluate``: sample "An image of {name}." for every identity and score the runs.

Scores are computed per identity, then averaged over All identities and over the Few
(minority) ones: identities with at most ``few_max_images`` training images.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from pogdiff.backbone import load_backbone, read_run_info
from pogdiff.data.dataset import FEW_MAX_IMAGES, ImageTextDataset, load_dataset
from pogdiff.encoders import ImageEncoder
from pogdiff.evaluation.identity import CentroidJudge, SynthIdentityJudge
from pogdiff.evaluation.pictures import save_grid, to_pil
from pogdiff.sampling import generate
from pogdiff.tables import default_cache_dir
from pogdiff.train import run_label

PROMPT = "An image of {name}."  # App. B


def identity_order(dataset: ImageTextDataset) -> list[str]:
    """Identities, minority first (fewest training images), ties in dataset order."""
    counts = dataset.identity_counts()
    return sorted(counts, key=lambda name: counts[name])


def make_judge(data_dir: Path, dataset: ImageTextDataset, cache_dir: Path, progress: bool):
    synth = data_dir / "synth.json"
    if synth.is_file():
        return SynthIdentityJudge.for_dataset(synth, cache_dir, progress=progress)
    real = real_images_by_identity(data_dir, dataset, resolution=64)
    return CentroidJudge(ImageEncoder(), real)


def real_images_by_identity(data_dir: Path, dataset: ImageTextDataset, resolution: int) -> dict[str, torch.Tensor]:
    """Held-out images (``DATA/heldout``) where they exist, else the training images, per identity."""
    source = load_dataset(data_dir / "heldout") if (data_dir / "heldout" / "metadata.jsonl").is_file() else dataset
    images = source.load_images(resolution)
    names = source.identity_names
    return {name: images[[i for i, n in enumerate(names) if n == name]] for name in dict.fromkeys(names)}


def evaluate_runs(run_dirs: list[str | Path], data_dir: str | Path, out_dir: str | Path,
                  num_images: int = 8, num_inference_steps: int = 50, guidance_scale: float | None = None,
                  seed: int = 0, few_max_images: int = FEW_MAX_IMAGES, cache_dir: str | Path | None = None,
                  progress: bool = True) -> dict:
    """Generate and score every run on ``data_dir``'s identities; write metrics.json and sample grids."""
    data_dir, out_dir = Path(data_dir), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    dataset = load_dataset(data_dir)
    cache_dir = Path(cache_dir or default_cache_dir())
    names = identity_order(dataset)
    counts = dataset.identity_counts()
    few = dataset.few_identities(few_max_images)
    judge = make_judge(data_dir, dataset, cache_dir, progress)
    results = {}
    for run_dir in run_dirs:
        label = run_label(read_run_info(Path(run_dir))["config"])
        backbone = load_backbone(run_dir)
        images = generate(backbone, [PROMPT.format(name=n) for n in names], num_images, num_inference_steps,
                          guidance_scale, seed, progress=progress)
        per_image = images.view(len(names), num_images, *images.shape[1:])
        save_samples(per_image, names, out_dir / "samples" / label)
        save_grid([(f"{n} ({counts[n]} train)", per_image[i]) for i, n in enumerate(names)],
                  out_dir / f"samples-{label}.png")
        predicted = judge.predict(images)
        per_identity = {n: {"id_acc": sum(p == n for p in predicted[i * num_images:(i + 1) * num_images]) / num_images,
                            "train_images": counts[n]} for i, n in enumerate(names)}
        results[label] = {"all": average(per_identity, names), "few": average(per_identity, [n for n in names if n in few]),
                          "per_identity": per_identity, "run": str(run_dir)}
    metrics = {"methods": results, "identity_judge": judge.name, "num_images_per_identity": num_images,
               "num_inference_steps": num_inference_steps, "few_max_images": few_max_images,
               "num_identities": {"all": len(names), "few": len(few)}}
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics


def average(per_identity: dict[str, dict], names: list[str]) -> dict[str, float | None]:
    keys = [k for k in next(iter(per_identity.values())) if k != "train_images"]
    if not names:
        return {k: None for k in keys}
    return {k: sum(per_identity[n][k] for n in names) / len(names) for k in keys}


def save_samples(per_identity: torch.Tensor, names: list[str], folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for images, name in zip(per_identity, names):
        for i, image in enumerate(images):
            to_pil(image).save(folder / f"{name}_{i:03d}.png")


def format_table(metrics: dict) -> str:
    """The All/Few table as Markdown, one row per method."""
    methods = metrics["methods"]
    keys = [k for k in next(iter(methods.values()))["all"]]
    header = "| method | " + " | ".join(f"{k} All | {k} Few" for k in keys) + " |"
    lines = [header, "|---" * (1 + 2 * len(keys)) + "|"]
    for label, result in methods.items():
        cells = []
        for k in keys:
            for split in ("all", "few"):
                value = result[split][k]
                cells.append("–" if value is None else f"{value:.3f}")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
