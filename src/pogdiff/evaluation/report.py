"""``report.html``: the evaluation as one self-contained page (every picture embedded as a base64 PNG).

Sections, after the paper's: the All/Few table (Tables 1-2, 6) with the calibration rows
(real held-out images, and a look-alike's, scored as if generated), per-identity values,
real training images beside generated ones for every identity, minority first (Fig. 6),
the identity-count histogram of the training set (Fig. 4), for each PoGDiff run psi and
the share of y' drawn from another identity for majority vs minority rows and the cosine
similarity of same- vs other-identity pairs in its neighbour feature space, and a PCA of
real and generated features for a few minority identities (Fig. 9).
"""

from __future__ import annotations

import base64
import html
import io
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib
import torch
from matplotlib.figure import Figure
from PIL import Image

from pogdiff.evaluation.results_table import SPLITS, all_few_columns, feature_spaces_text, format_value
from pogdiff.images import labelled_grid
from pogdiff.training.run_folder import IS_FEW_KEY, NEIGHBOUR_SPACE_KEY, PSI_FILE, PSI_KEYS

LOWER_IS_BETTER = {"fd"}
METRIC_TITLES = {"fd": "FD ↓", "sim": "Similarity ↑", "recall": "Recall ↑", "id_acc": "Identity accuracy ↑"}
METHOD_COLOURS = matplotlib.colormaps["tab10"].colors


@dataclass
class ReportData:
    """What the report shows beyond metrics.json; images (n, 3, H, W) in [-1, 1], features (n, D)."""

    names: list[str]  # identities, minority first
    counts: dict[str, int]  # training images per identity
    few: set[str]
    training_images: dict[str, torch.Tensor]  # a few per identity, thumbnails are enough
    training_features: dict[str, torch.Tensor]  # every image's, in the sim space
    generated: dict[str, dict[str, torch.Tensor]]  # method -> identity -> a few images
    generated_features: dict[str, dict[str, torch.Tensor]]  # method -> identity -> every image's
    psi: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)  # method -> its run's psi.safetensors
    psi_summary: dict[str, dict] = field(default_factory=dict)  # method -> its run's psi_summary.json


def write_report(path: str | Path, metrics: dict, data: ReportData, images_per_cell: int = 6) -> Path:
    path = Path(path)
    sections = [
        _settings(metrics),
        "<h2>All / Few</h2>" + _summary_table(metrics),
        "<h2>Per identity</h2>" + _per_identity_table(metrics, data),
        "<h2>Samples</h2><p>Real training images, then each method's samples for \"An image of {name}.\", "
        "minority first.</p>" + _sample_grid(data, images_per_cell),
        "<h2>Training set</h2>" + _image(identity_histogram(data), "identity-count histogram"),
        "<h2>PoGDiff weights and neighbours</h2>" + _pogdiff_section(data),
        "<h2>Features of minority identities</h2>"
        f"<p>PCA of {html.escape(metrics['feature_spaces']['sim'])} features (sim's space), fitted on all training "
        "images.</p>"
        + _image(feature_projection(data), "PCA of real and generated features"),
    ]
    page = (f"<!DOCTYPE html><html><head><meta charset=\"utf-8\"><title>pogdiff evaluation</title>"
            f"<style>{_CSS}</style></head><body><h1>pogdiff evaluation</h1>{''.join(sections)}</body></html>")
    path.write_text(page, encoding="utf-8")
    return path


_CSS = """
body { font-family: sans-serif; margin: 2em; max-width: 1400px; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; }
th, td { border: 1px solid #bbb; padding: 3px 8px; text-align: center; }
th { background: #eee; } td.name { text-align: left; }
tr.few td.name { color: #b34700; } td img { display: block; image-rendering: pixelated; }
dl { display: grid; grid-template-columns: max-content auto; gap: 2px 12px; } dt { font-weight: bold; }
"""


def _settings(metrics: dict) -> str:
    counts = metrics["num_identities"]
    items = {
        "dataset": metrics.get("data", ""),
        "prompt (each identity's name for {name})": metrics["prompt_template"],
        "feature spaces": feature_spaces_text(metrics["feature_spaces"]),
        "identity judge (id_acc)": metrics["identity_judge"],
        "fd reference": metrics["references"]["fd"],
        "sim reference": metrics["references"]["sim"],
        "recall": f"training image covered when cosine similarity >= {metrics['recall_threshold']}",
        "identities": f"{counts['all']} (Few: {counts['few']}, at most {metrics['few_max_images']} training images)"
                      + _sample_note(metrics.get("identity_sample")),
        "samples per identity": _samples_note(metrics),
    }
    rows = "".join(f"<dt>{html.escape(k)}</dt><dd>{html.escape(str(v))}</dd>" for k, v in items.items())
    return f"<dl>{rows}</dl>"


def _samples_note(metrics: dict) -> str:
    if metrics["num_images_per_identity"] is None:
        return "the images of each --samples folder"
    return (f"{metrics['num_images_per_identity']} (Few: {metrics['num_images_per_few_identity']}), "
            f"DDIM {metrics['num_inference_steps']} steps")


def _sample_note(sample: dict | None) -> str:
    if sample is None:
        return ""
    return f", a sample of the dataset's {sample['of']} (Few: {sample['few_of']}), {sample['how']}"


def _pogdiff_section(data: ReportData) -> str:
    if not data.psi:
        return f"<p>No run here has a {PSI_FILE} (only PoGDiff runs write one).</p>"
    spaces = {m: s[NEIGHBOUR_SPACE_KEY] for m, s in data.psi_summary.items() if s and NEIGHBOUR_SPACE_KEY in s}
    text = ("<p>Per training row: psi_txt, psi_img and psi (Eqs. 9, 11, 12; psi_img and psi in expectation over "
            "Eq. 8's draw), and the probability that the drawn y' is the caption of another identity.</p>")
    text += _image(psi_figure(data.psi), "psi and the share of y' from another identity, majority vs minority")
    if spaces:
        text += ("<p>Cosine similarity of pairs of training images in each run's neighbour feature space (Eq. 8), "
                 "same identity vs other identity: where the two overlap, a look-alike is as likely a neighbour "
                 "as the person.</p>" + _image(similarity_figure(spaces), "same vs other identity similarity"))
    return text


def _best(values: list, key: str):
    """The best value of a column, None when there is nothing to single out (no values, or all equal)."""
    present = [v for v in values if v is not None]
    if len(set(present)) < 2:
        return None
    return min(present) if key in LOWER_IS_BETTER else max(present)


def _summary_table(metrics: dict) -> str:
    """The results table with a metric heading over its All and Few columns, the best value of each in bold,
    then the calibration rows in italics (never bold)."""
    methods, calibration = metrics["methods"], metrics.get("calibration", {})
    columns = all_few_columns({**methods, **calibration})
    keys = list(dict.fromkeys(key for key, _ in columns))
    head = ("<tr><th rowspan=\"2\">method</th>" + "".join(f"<th colspan=\"2\">{html.escape(METRIC_TITLES.get(k, k))}"
                                                        f"</th>" for k in keys) + "</tr>"
            "<tr>" + "".join(f"<th>{SPLITS[split]}</th>" for _, split in columns) + "</tr>")
    best = {(k, s): _best([r[s][k] for r in methods.values()], k) for k, s in columns}
    body = ""
    for label, result in methods.items():
        cells = []
        for k, split in columns:
            value = result[split][k]
            text = format_value(value)
            cells.append(f"<td><b>{text}</b></td>" if value is not None and value == best[k, split]
                         else f"<td>{text}</td>")
        body += f"<tr><td class=\"name\">{html.escape(label)}</td>{''.join(cells)}</tr>"
    for label, result in calibration.items():
        cells = "".join(f"<td><i>{format_value(result[split].get(k))}</i></td>" for k, split in columns)
        body += f"<tr class=\"calibration\"><td class=\"name\"><i>{html.escape(label)}</i></td>{cells}</tr>"
    return f"<table>{head}{body}</table>" + _calibration_note(calibration)


def _calibration_note(calibration: dict) -> str:
    if not calibration:
        return ""
    pairs = calibration.get("real (look-alike)", {}).get("look_alike_of", {})
    look_alikes = ", ".join(f"{html.escape(a)} → {html.escape(b)}" for a, b in pairs.items() if b)
    return ("<p><i>Calibration</i>: real images scored as if generated, with the same metrics and judge. "
            "<i>real (held-out)</i>: each identity's held-out images, what a perfect generator gets (fd against "
            "the training images only, sim over pairs of two different held-out images). <i>real (look-alike)</i>: "
            "images of the identity with the nearest training-image centroid, scored against this one, what "
            f"drawing the wrong, similar person gets. Look-alikes: {look_alikes}.</p>")


def _per_identity_table(metrics: dict, data: ReportData) -> str:
    methods = metrics["methods"]
    keys = list(next(iter(methods.values()))["all"])
    head = ("<tr><th rowspan=\"2\">identity</th><th rowspan=\"2\">training images</th>"
            + "".join(f"<th colspan=\"{len(keys)}\">{html.escape(label)}</th>" for label in methods) + "</tr><tr>"
            + "".join(f"<th>{k}</th>" for k in keys) * len(methods) + "</tr>")
    body = ""
    for name in data.names:
        cells = "".join(f"<td>{format_value(result['per_identity'][name][k])}</td>"
                        for result in methods.values() for k in keys)
        few = " class=\"few\"" if name in data.few else ""
        body += (f"<tr{few}><td class=\"name\">{html.escape(name)}</td><td>{data.counts[name]}</td>{cells}</tr>")
    return f"<p>Few identities in orange.</p><table>{head}{body}</table>"


def _sample_grid(data: ReportData, per_cell: int) -> str:
    head = "<tr><th>identity</th><th>training</th>" + "".join(f"<th>{html.escape(m)}</th>" for m in data.generated) + "</tr>"
    body = ""
    for name in data.names:
        cells = [_image(_strip(data.training_images[name][:per_cell]), f"{name} training")]
        cells += [_image(_strip(images[name][:per_cell]), f"{name} {method}") for method, images in data.generated.items()]
        few = " class=\"few\"" if name in data.few else ""
        body += (f"<tr{few}><td class=\"name\">{html.escape(name)}<br>{data.counts[name]} train</td>"
                 + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    return f"<table>{head}{body}</table>"


def _strip(images: torch.Tensor, cell: int = 48) -> Image.Image:
    return labelled_grid([("", images)], cell=cell, label_width=0)


def _png(picture: Image.Image | Figure) -> str:
    buffer = io.BytesIO()
    if isinstance(picture, Figure):
        picture.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    else:
        picture.save(buffer, format="png")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _image(picture: Image.Image | Figure, alt: str) -> str:
    return f"<img alt=\"{html.escape(alt)}\" src=\"data:image/png;base64,{_png(picture)}\">"


def identity_histogram(data: ReportData) -> Figure:
    """Training images per identity, most first, Few identities in orange (the paper's Fig. 4)."""
    order = sorted(data.counts, key=lambda n: -data.counts[n])  # the whole dataset, scored or not
    figure = Figure(figsize=(min(12, 2 + 0.35 * len(order)), 3))
    ax = figure.subplots()
    ax.bar(range(len(order)), [data.counts[n] for n in order],
           color=["tab:orange" if n in data.few else "tab:blue" for n in order])
    if len(order) <= 40:
        ax.set_xticks(range(len(order)), order, rotation=60, ha="right", fontsize=8)
    else:
        ax.set_xticks([])
        ax.set_xlabel(f"{len(order)} identities, most images first")
    ax.set_ylabel("training images")
    ax.set_title(f"{len(data.few)} of {len(order)} identities are Few (orange)")
    return figure


def psi_figure(psi: dict[str, dict[str, torch.Tensor]]) -> Figure:
    """psi_txt, psi_img, psi and the share of y' from another identity per training row, majority vs
    minority, one row of panels per run (a run written before the share was recorded leaves its panel empty)."""
    figure = Figure(figsize=(13, 2.8 * len(psi)))
    axes = figure.subplots(len(psi), len(PSI_KEYS), squeeze=False)
    for row, (method, tensors) in enumerate(psi.items()):
        few = tensors[IS_FEW_KEY].bool()
        for ax, key in zip(axes[row], PSI_KEYS):
            if key not in tensors:
                ax.set_axis_off()
                continue
            values = tensors[key].float()
            groups = {label: values[mask].numpy() for label, mask in (("majority", ~few), ("minority", few)) if mask.any()}
            ax.boxplot(list(groups.values()))
            ax.set_xticks(range(1, len(groups) + 1), [f"{label} ({len(v)})" for label, v in groups.items()])
            if (values > 0).all():
                ax.set_yscale("log")
            ax.set_title(key, fontsize=9)
        axes[row][0].set_ylabel(textwrap.fill(method, 28), fontsize=8)
    figure.tight_layout()
    return figure


def similarity_figure(spaces: dict[str, dict]) -> Figure:
    """Histograms of same- and other-identity cosine similarity in each run's neighbour space (psi_summary.json)."""
    figure = Figure(figsize=(4.5 * len(spaces), 2.8))
    axes = figure.subplots(1, len(spaces), squeeze=False)[0]
    for ax, (method, space) in zip(axes, spaces.items()):
        edges = space["histogram_edges"]
        for group, colour in (("same_identity", "tab:blue"), ("other_identity", "tab:orange")):
            counts = space[group]["histogram"]
            total = max(sum(counts), 1)
            ax.stairs([c / total for c in counts], edges, color=colour,
                      label=f"{group.replace('_', ' ')} ({space[group]['pairs']} pairs)")
        separation = "" if space.get("separation") is None else f", separation {space['separation']:.2f}"
        ax.set_title(textwrap.fill(f"{method}: {space['space']}, k = {space['k']}{separation}", 60), fontsize=8)
        ax.set_xlabel("cosine similarity")
        ax.legend(fontsize=7)
    figure.tight_layout()
    return figure


def feature_projection(data: ReportData, max_identities: int = 3) -> Figure:
    """PCA of training features (grey), one minority identity's training images (black stars)
    and every method's samples for it, one panel per identity (cf. the paper's Fig. 9)."""
    chosen = [n for n in data.names if n in data.few][:max_identities] or data.names[:1]
    real = torch.cat([data.training_features[n] for n in data.names]).double()
    mean = real.mean(0)
    components = torch.linalg.svd(real - mean, full_matrices=False).Vh[:2].T

    def project(features):
        return ((features.double() - mean) @ components).numpy()

    figure = Figure(figsize=(4.2 * len(chosen), 4))
    axes = figure.subplots(1, len(chosen), squeeze=False)[0]
    everything = project(real)
    for ax, name in zip(axes, chosen):
        ax.scatter(everything[:, 0], everything[:, 1], s=8, c="lightgrey", label="training, all identities")
        for c, (method, features) in enumerate(data.generated_features.items()):
            points = project(features[name])
            ax.scatter(points[:, 0], points[:, 1], s=18, color=METHOD_COLOURS[c % 10], alpha=0.8, label=method)
        own = project(data.training_features[name])
        ax.scatter(own[:, 0], own[:, 1], s=140, marker="*", c="black", label=f"training, {name}")
        ax.set_title(f"{name} ({data.counts[name]} training images)", fontsize=10)
        ax.set_xticks([])
        ax.set_yticks([])
    axes[0].legend(fontsize=7, loc="best")
    figure.tight_layout()
    return figure
