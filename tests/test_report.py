"""``pogdiff evaluate`` end to end on two tiny runs: metrics.json and a self-contained report.html."""

import base64
import io
import json
from html.parser import HTMLParser

import pytest
import torch
from conftest import write_toy_dataset
from PIL import Image

from pogdiff.data.synth import PRESETS
from pogdiff.evaluation.evaluate import evaluate_runs, format_table, identity_sample
from pogdiff.training.train import TrainConfig, train


class PixelFeatures:
    """A cheap feature space for tests: 8x8 average-pooled pixels."""

    name = "avg-pooled pixels 8x8"

    def __call__(self, images):
        return torch.nn.functional.adaptive_avg_pool2d(images.float(), 8).flatten(1)


class Page(HTMLParser):
    """Rows of table cells (text) and the src of every <img>."""

    def __init__(self):
        super().__init__()
        self.tables, self.images, self._cell = [], [], None

    def handle_starttag(self, tag, attrs):
        if tag == "table":
            self.tables.append([])
        elif tag == "tr":
            self.tables[-1].append([])
        elif tag in ("td", "th"):
            self._cell = ""
        elif tag == "img":
            self.images.append(dict(attrs))

    def handle_endtag(self, tag):
        if tag in ("td", "th"):
            self.tables[-1][-1].append(self._cell.strip())
            self._cell = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell += data


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    data = write_toy_dataset(root / "data")
    write_toy_dataset(data / "heldout", counts=(3, 3, 3), seed=1)
    runs = []
    for method in ("vanilla", "pogdiff"):
        runs.append(train(TrainConfig(str(data), str(root / method), method=method, max_train_steps=2,
                                      train_batch_size=4, cache_dir=str(root / "cache"), progress=False)))
    out = root / "eval"
    metrics = evaluate_runs(runs, data, out, num_images=3, num_images_few=4, num_inference_steps=2,
                            cache_dir=root / "cache", progress=False, features=PixelFeatures(), recall_threshold=0.8)
    return metrics, out


def test_metrics_json_has_every_metric_for_all_and_few_and_names_its_spaces(evaluated):
    metrics, out = evaluated
    assert json.loads((out / "metrics.json").read_text()) == json.loads(json.dumps(metrics))
    assert metrics["feature_spaces"] == {"fd": "avg-pooled pixels 8x8", "sim": "avg-pooled pixels 8x8"}
    assert metrics["recall_threshold"] == 0.8
    assert metrics["identity_judge"] == "nearest identity centroid in avg-pooled pixels 8x8 features"
    assert metrics["num_identities"] == {"all": 3, "few": 1}
    for result in metrics["methods"].values():
        assert set(result["all"]) == set(result["few"]) == {"fd", "sim", "recall", "id_acc"}
        per = result["per_identity"]
        assert per["Chen"]["generated_images"] == 4 and per["Anna"]["generated_images"] == 3  # Chen is Few
        assert result["few"]["recall"] == per["Chen"]["recall"]
        assert result["all"]["fd"] == pytest.approx(sum(per[n]["fd"] for n in per) / 3)
        assert result["skipped"] == {"fd": [], "sim": []}
    assert (out / "samples" / "pogdiff" / "Chen" / "003.png").is_file()
    assert "| pogdiff |" in format_table(metrics) and "| real (look-alike) |" in format_table(metrics)


def test_calibration_rows_score_real_images_and_a_look_alike(evaluated):
    metrics, _ = evaluated
    held_out, look_alike = metrics["calibration"]["real (held-out)"], metrics["calibration"]["real (look-alike)"]
    for row in (held_out, look_alike):
        assert set(row["all"]) == set(row["few"]) == {"fd", "sim", "recall", "id_acc"}
    assert held_out["per_identity"]["Chen"]["generated_images"] == 3  # its held-out images
    assert held_out["per_identity"]["Chen"]["sim_reference_images"] == 2  # the others of them
    assert held_out["per_identity"]["Chen"]["fd_reference_images"] == 2  # its training images only
    # Toy identities are colours: red Anna, green Bruno, blue Chen; each has a nearest other one.
    assert set(look_alike["look_alike_of"]) == {"Anna", "Bruno", "Chen"}
    assert all(other != name for name, other in look_alike["look_alike_of"].items())
    assert held_out["all"]["id_acc"] == 1.0 and look_alike["all"]["id_acc"] == 0.0


def test_report_is_self_contained_with_the_table_and_decodable_pngs(evaluated):
    metrics, out = evaluated
    page = Page()
    page.feed((out / "report.html").read_text(encoding="utf-8"))
    summary = page.tables[0]
    assert summary[0] == ["method", "FD ↓", "Similarity ↑", "Recall ↑", "Identity accuracy ↑"]
    assert summary[1] == ["All", "Few"] * 4
    rows = {row[0]: row[1:] for row in summary[2:]}
    assert set(rows) == {"vanilla", "pogdiff", "real (held-out)", "real (look-alike)"}
    calibration = metrics["calibration"]["real (held-out)"]
    assert rows["real (held-out)"] == [f"{calibration[split][k]:.3f}" for k in ("fd", "sim", "recall", "id_acc")
                                       for split in ("all", "few")]
    for label, result in metrics["methods"].items():
        expected = [f"{result[split][k]:.3f}" for k in ("fd", "sim", "recall", "id_acc") for split in ("all", "few")]
        assert rows[label] == expected
    per_identity = {row[0]: row for row in page.tables[1][2:]}
    assert list(per_identity) == ["Chen", "Bruno", "Anna"]  # minority first
    assert per_identity["Chen"][2] == f"{metrics['methods']['vanilla']['per_identity']['Chen']['fd']:.3f}"
    # 3 identities x (training + 2 methods) sample strips, then histogram, psi, neighbour similarity and PCA figures
    assert len(page.images) == 3 * 3 + 4
    alts = [image["alt"] for image in page.images]
    assert "psi and the share of y' from another identity, majority vs minority" in alts
    assert "same vs other identity similarity" in alts and "identity-count histogram" in alts
    for image in page.images:
        prefix = "data:image/png;base64,"
        assert image["src"].startswith(prefix)
        picture = Image.open(io.BytesIO(base64.b64decode(image["src"][len(prefix):])))
        assert picture.format == "PNG" and min(picture.size) > 20
    settings = (out / "report.html").read_text(encoding="utf-8")
    assert "avg-pooled pixels 8x8" in settings and "cosine similarity &gt;= 0.8" in settings


def test_an_identity_sample_keeps_every_training_count_in_its_share_and_is_the_same_every_time():
    counts = {f"p{i}": c for i, c in enumerate(sorted(PRESETS["large"]))}  # 220 people: 130 x 2, 60 x 4, 20 x 10, 10 x 30
    names = list(counts)
    sample = identity_sample(names, counts, 60)
    assert len(sample) == 60 and sample == [n for n in names if n in set(sample)]
    assert sample == identity_sample(names, counts, 60)
    for count in (2, 4, 10, 30):
        group = [n for n in names if counts[n] == count]
        taken = sum(counts[n] == count for n in sample)
        assert abs(taken - 60 * len(group) / len(names)) < 1 and taken >= 1
    assert identity_sample(names, counts, 3) == identity_sample(names, counts, 3) and len(identity_sample(names, counts, 3)) == 3
    assert identity_sample(names, counts, 500) == names


def test_max_identities_scores_a_sample_but_the_judge_and_look_alikes_see_everyone(evaluated, tmp_path):
    metrics, _ = evaluated
    runs = [result["run"] for result in metrics["methods"].values()]
    sampled = evaluate_runs(runs[:1], metrics["data"], tmp_path, num_images=2, num_inference_steps=2, progress=False,
                            features=PixelFeatures(), max_identities=2, report=False)
    (result,) = sampled["methods"].values()
    scored = set(result["per_identity"])
    assert len(scored) == 2 and sampled["num_identities"] == {"all": 2, "few": int("Chen" in scored)}
    assert sampled["identity_sample"]["of"] == 3 and sampled["identity_sample"]["few_of"] == 1
    assert {p.parent.name for p in (tmp_path / "samples").rglob("*.png")} == scored
    look_alike = sampled["calibration"]["real (look-alike)"]["look_alike_of"]
    assert set(look_alike) == scored
    # the full evaluation's look-alikes, whether or not the look-alike itself is scored
    assert look_alike == {n: metrics["calibration"]["real (look-alike)"]["look_alike_of"][n] for n in scored}
