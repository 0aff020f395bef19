"""The benchmark's statistics on hand-made numbers, and a smallest-budget run that resumes without re-training."""

import json
import math

import pytest

import pogdiff.compare.comparison as benchmark
from pogdiff.compare.comparison import Budget, MethodSpec, aggregate, mean_interval, paired_difference, parse_method
from pogdiff.cli import main
from pogdiff.errors import PogdiffError
from pogdiff.backbones.shipped import SHIPPED_NAME, WEIGHTS_FILE, shipped_manifest

T_975_2DF = 4.302652729911275  # Student t, 97.5% quantile, 2 degrees of freedom (printed tables: 4.303)
T_975_1DF = 12.706204736174698  # the same, 1 degree of freedom (printed tables: 12.706)


def test_mean_interval_is_student_t_over_seeds():
    summary = mean_interval([0.2, 0.4, 0.6])  # sd 0.2
    assert summary["mean"] == pytest.approx(0.4) and summary["n"] == 3
    assert summary["half_width"] == pytest.approx(T_975_2DF * 0.2 / math.sqrt(3))
    assert mean_interval([0.7]) == {"mean": 0.7, "half_width": None, "n": 1}


def test_aggregate_takes_every_numeric_metric_of_all_and_few():
    per_seed = {0: {"all": {"id_acc": 0.5, "fd": 10.0}, "few": {"id_acc": None, "fd": None}},
                1: {"all": {"id_acc": 1.0, "fd": 14.0, "judge": "cnn"}, "few": {"id_acc": None, "fd": None}}}
    summary = aggregate(per_seed)
    assert summary["all"]["id_acc"]["mean"] == pytest.approx(0.75)
    assert summary["all"]["fd"]["mean"] == pytest.approx(12.0)
    assert summary["all"]["fd"]["half_width"] == pytest.approx(T_975_1DF * math.sqrt(8) / math.sqrt(2))
    assert "judge" not in summary["all"]
    assert summary["few"] == {"id_acc": None, "fd": None}  # no Few identities


def test_paired_difference_is_per_seed():
    method = {s: {"few": {"id_acc": v}} for s, v in enumerate([0.5, 0.75, 0.25])}
    vanilla = {s: {"few": {"id_acc": v}} for s, v in enumerate([0.25, 0.5, 0.25])}
    paired = paired_difference(method, vanilla, ("few", "id_acc"))
    assert paired["per_seed"] == {0: 0.25, 1: 0.25, 2: 0.0}
    assert paired["mean"] == pytest.approx(1 / 6)
    assert paired["half_width"] == pytest.approx(T_975_2DF * math.sqrt(1 / 48) / math.sqrt(3))


def test_method_names_ablations_and_options():
    assert parse_method("pogdiff-no-psi-img") == MethodSpec("pogdiff-no-psi-img", "pogdiff", {"use_psi_img": False})
    assert parse_method("cbdm:tau=0.5") == MethodSpec("cbdm:tau=0.5", "cbdm", {"tau": 0.5})
    assert parse_method("pogdiff:a1=2,use_psi_txt=false").options == {"a1": 2.0, "use_psi_txt": False}
    for bad, message in [("nope", "unknown method"), ("cbdm:a1=1", "cbdm takes option=value with option one of tau"),
                         ("pogdiff:use_psi_img=maybe", "use_psi_img takes true or false"),
                         ("t2h:tau=1", "t2h takes option=value with option one of frequency"),
                         ("vanilla:tau=1", "(none)"), ("pogdiff+sometimes", "unknown sampler 'sometimes'"),
                         ("resample+uniform", "resample implies the balanced sampler"),
                         ("pogdiff:density_max_ratio=5", "option one of k, neighbour_features"),
                         ("cbdm:balance=classes", "balance takes one of identities, rows"),
                         ("pogdiff:k=three", "k takes an integer")]:
        with pytest.raises(PogdiffError, match=message.replace("(", r"\(").replace(")", r"\)")):
            parse_method(bad)


def test_benchmark_writes_tables_and_resumes_without_training(toy_data, tmp_path, cache_dir, monkeypatch, capsys):
    calls = {"train": 0, "evaluate": 0}

    def counted(name, function):
        def wrapper(*args, **kwargs):
            calls[name] += 1
            return function(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(benchmark, "train", counted("train", benchmark.train))
    monkeypatch.setattr(benchmark, "evaluate_runs", counted("evaluate", benchmark.evaluate_runs))
    out = tmp_path / "bench"
    budget = Budget(max_train_steps=2, train_batch_size=8, num_images=1, num_inference_steps=2)
    metrics = benchmark.run_benchmark(out, ["vanilla", "pogdiff-no-psi-txt"], [0, 1], budget, data=toy_data,
                                      cache_dir=cache_dir, progress=False)
    assert calls == {"train": 4, "evaluate": 4}
    for name in ("metrics.json", "benchmark.md", "benchmark.html", "benchmark.json"):
        assert (out / name).is_file()
    assert json.loads((out / "metrics.json").read_text())["methods"].keys() == {"vanilla", "pogdiff-no-psi-txt"}
    ablation = metrics["methods"]["pogdiff-no-psi-txt"]
    assert ablation["label"] == "pogdiff(use_psi_txt=False)"
    cells = [json.loads((out / "eval" / "pogdiff-no-psi-txt" / f"seed-{s}" / "cell.json").read_text()) for s in (0, 1)]
    assert ablation["all"]["id_acc"]["mean"] == pytest.approx(sum(c["all"]["id_acc"] for c in cells) / 2)
    assert ablation["few"]["id_acc"]["n"] == 2
    paired = metrics["paired_vs_vanilla"]["pogdiff-no-psi-txt"]
    assert [p["metric"] for p in paired.values()] == ["few.id_acc", "few.sim"]
    sims = {s: c["few"]["sim"] - json.loads((out / "eval" / "vanilla" / f"seed-{s}" / "cell.json").read_text())["few"]["sim"]
            for s, c in enumerate(cells)}
    assert paired["few.sim"]["per_seed"] == pytest.approx(sims)
    table = (out / "benchmark.md").read_text()
    assert "| pogdiff-no-psi-txt |" in table and "id_acc All" in table and " ± " in table
    assert "| real (look-alike) |" in table  # toy_data has no DATA/heldout, so no held-out row
    assert list(metrics["calibration"]) == ["real (look-alike)"]
    assert metrics["calibration"]["real (look-alike)"]["few"]["id_acc"]["n"] == 1
    assert "<td>pogdiff-no-psi-txt</td>" in (out / "benchmark.html").read_text()
    assert json.loads(json.dumps(benchmark.summarise_finished(out, ["vanilla", "pogdiff-no-psi-txt"], [0, 1]))) == \
        json.loads(json.dumps(metrics))

    runs = sorted((out / "runs").rglob("*"))
    stamps = [p.stat().st_mtime_ns for p in runs]
    argv = ["benchmark", "--out", out, "--data", toy_data, "--methods", "vanilla", "pogdiff-no-psi-txt",
            "--seeds", 0, 1, "--max-train-steps", 2, "--train-batch-size", 8, "--num-images", 1,
            "--num-inference-steps", 2, "--cache-dir", cache_dir, "--no-progress"]
    assert main([str(a) for a in argv]) == 0, capsys.readouterr().err
    assert calls == {"train": 4, "evaluate": 4}  # the same command again: nothing runs
    assert [p.stat().st_mtime_ns for p in sorted((out / "runs").rglob("*"))] == stamps
    assert json.loads((out / "metrics.json").read_text()) == json.loads(json.dumps(metrics))

    (out / "eval" / "vanilla" / "seed-1" / "cell.json").unlink()  # interrupted after training, before scoring
    benchmark.run_benchmark(out, ["vanilla", "pogdiff-no-psi-txt"], [0, 1], budget, data=toy_data,
                            cache_dir=cache_dir, progress=False)
    assert calls == {"train": 4, "evaluate": 5}

    other = [str(a) for a in argv]
    other[other.index("--max-train-steps") + 1] = "3"
    code = main(other)
    assert code == 2 and "other settings (max_train_steps)" in capsys.readouterr().err

    settings = json.loads((out / "benchmark.json").read_text())
    del settings["budget"]["max_identities"]  # a folder written before the option existed ran with all identities
    (out / "benchmark.json").write_text(json.dumps(settings))
    assert main([str(a) for a in argv]) == 0, capsys.readouterr().err
    assert calls == {"train": 4, "evaluate": 5}
    assert main([str(a) for a in argv] + ["--max-identities", "2"]) == 2
    assert "other settings (max_identities)" in capsys.readouterr().err

    settings = json.loads((out / "benchmark.json").read_text())
    assert settings["backbone"] == {"name": SHIPPED_NAME, "sha256": shipped_manifest()["sha256"][WEIGHTS_FILE]}
    assert f"sha256 {settings['backbone']['sha256'][:12]}" in (out / "benchmark.md").read_text()
    del settings["backbone"]  # a folder written before the weights were recorded continues
    (out / "benchmark.json").write_text(json.dumps(settings))
    assert main([str(a) for a in argv]) == 0, capsys.readouterr().err
    settings["backbone"] = {"name": SHIPPED_NAME, "sha256": "0" * 64}  # begun on another release of the weights
    (out / "benchmark.json").write_text(json.dumps(settings))
    assert main([str(a) for a in argv]) == 2
    assert f"backbone weights: {SHIPPED_NAME} {'0' * 64} then" in capsys.readouterr().err
    assert calls == {"train": 4, "evaluate": 5}


def test_benchmark_refuses_bad_input_before_writing(toy_data, tmp_path, capsys):
    code = main(["benchmark", "--out", str(tmp_path / "a"), "--methods", "vanilla", "pogdiff-no-psi", "--quick"])
    err = capsys.readouterr().err
    assert code == 2 and "unknown method 'pogdiff-no-psi'" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "a").exists()

    code = main(["benchmark", "--out", str(tmp_path / "b"), "--data", str(tmp_path / "nowhere"), "--quick"])
    assert code == 2 and "dataset folder not found" in capsys.readouterr().err
    assert not (tmp_path / "b").exists()

    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "notes.txt").write_text("mine")
    code = main(["benchmark", "--out", str(tmp_path / "c"), "--data", str(toy_data), "--quick"])
    assert code == 2 and "is not a pogdiff benchmark folder" in capsys.readouterr().err
    assert [p.name for p in (tmp_path / "c").iterdir()] == ["notes.txt"]


def test_a_benchmark_refuses_data_whose_content_changed(toy_data, tmp_path, cache_dir, monkeypatch):
    """The folder records the data's content, not only its path: a seed added after an identity's rows were removed
    would average cells scored on other data."""
    monkeypatch.setattr(benchmark, "run_cell", lambda out, spec, seed, *a: (json.loads(json.dumps(FAKE_CELL)), True))
    monkeypatch.setattr(benchmark, "summarise", lambda *a: {})
    monkeypatch.setattr(benchmark, "markdown_report", lambda metrics: "")
    monkeypatch.setattr(benchmark, "html_report", lambda metrics: "")
    out = tmp_path / "bench"
    benchmark.run_benchmark(out, ["vanilla"], [0], Budget(), data=toy_data, cache_dir=cache_dir, progress=False)
    lines = (toy_data / "metadata.jsonl").read_text().splitlines()
    (toy_data / "metadata.jsonl").write_text("\n".join(line for line in lines if '"Chen"' not in line) + "\n")
    with pytest.raises(PogdiffError, match="the data's content: its metadata.jsonl or images changed"):
        benchmark.run_benchmark(out, ["vanilla"], [0, 1], Budget(), data=toy_data, cache_dir=cache_dir, progress=False)


FAKE_CELL = {"seconds": {"train": 1.0}}
