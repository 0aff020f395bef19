"""`pogdiff evaluate` in one pass: samples on disk and re-scored from there (`--samples`), two feature spaces,
the dataset's columns, and sampling split over the processes of `accelerate launch`."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline
from PIL import Image
from test_scale import SRC, free_port
from test_stable_diffusion import sd_data, tiny_sd  # noqa: F401 (fixtures)

from pogdiff.backbones.backbone import load_backbone
from pogdiff.cli import main
from pogdiff.data.dataset import load_dataset
from pogdiff.evaluation.evaluate import identity_order
from pogdiff.evaluation.features import FeatureSpaces
from pogdiff.backbones.sampling import sample_rows

STEPS = ["--num-inference-steps", 2]


def run_cli(capsys, *argv):
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def evaluate(capsys, out, *argv, cache):
    code, _, err = run_cli(capsys, "evaluate", *argv, "--out", out, "--cache-dir", cache, "--no-progress")
    assert code == 0, err
    return json.loads((out / "metrics.json").read_text())


def scores(metrics, label):
    """What a row of the table is made of: per-identity values and the All/Few averages."""
    result = metrics["methods"][label]
    return {"all": result["all"], "few": result["few"], "per_identity": result["per_identity"]}


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def evaluated_run(tiny_sd, sd_data, cache, tmp_path_factory):  # noqa: F811 (fixtures)
    """The tiny SD pipeline evaluated: 4 images per identity (12 rows: two sampling batches of 8)."""
    out = tmp_path_factory.mktemp("run-eval") / "eval"
    assert main([str(a) for a in ["evaluate", tiny_sd, "--data", sd_data, "--out", out, "--num-images", 4, *STEPS,
                                  "--cache-dir", cache, "--no-progress"]]) == 0
    return out, json.loads((out / "metrics.json").read_text())


def test_a_runs_samples_are_on_disk_and_rescoring_them_gives_its_numbers(evaluated_run, sd_data, cache, tmp_path,
                                                                        capsys):  # noqa: F811
    out, metrics = evaluated_run
    names = identity_order(load_dataset(sd_data))
    assert sorted(p.name for p in (out / "samples" / "sd").iterdir()) == sorted(names)
    assert all(sorted(p.name for p in (out / "samples" / "sd" / n).iterdir()) == [f"00{i}.png" for i in range(4)]
               for n in names)
    rescored = evaluate(capsys, tmp_path / "again", "--samples", out / "samples" / "sd", "--data", sd_data,
                        cache=cache)
    assert scores(rescored, "sd") == scores(metrics, "sd")
    assert rescored["calibration"] == metrics["calibration"]
    assert rescored["methods"]["sd"]["samples"] == str(out / "samples" / "sd")
    assert "run" not in rescored["methods"]["sd"]
    assert rescored["num_images_per_identity"] is None  # not sampled here


def test_samples_written_by_diffusers_are_scored_like_the_run_that_made_them(evaluated_run, tiny_sd, sd_data, cache,
                                                                            tmp_path, capsys):  # noqa: F811
    out, metrics = evaluated_run
    pipeline = StableDiffusionPipeline.from_pretrained(tiny_sd)
    pipeline.scheduler = DDIMScheduler.from_config(pipeline.scheduler.config)
    pipeline.set_progress_bar_config(disable=True)
    names = identity_order(load_dataset(sd_data))  # the order evaluate samples in: one noise stream for all
    images = pipeline([f"An image of {n}." for n in names], num_images_per_prompt=4, num_inference_steps=2,
                      guidance_scale=7.5, generator=torch.Generator().manual_seed(0)).images
    folder = tmp_path / "diffusers"
    for i, image in enumerate(images):
        (folder / names[i // 4]).mkdir(parents=True, exist_ok=True)
        image.save(folder / names[i // 4] / f"{i % 4}.png")
    both = evaluate(capsys, tmp_path / "both", "--samples", folder, out / "samples" / "sd", "--data", sd_data,
                    cache=cache)
    assert list(both["methods"]) == ["diffusers", "sd"]
    assert scores(both, "sd") == scores(metrics, "sd")
    ours, theirs = metrics["methods"]["sd"]["per_identity"], both["methods"]["diffusers"]["per_identity"]
    for name in names:  # the same images up to float round-off, which can move a pixel by one level
        for key in ("sim", "recall", "id_acc"):
            assert theirs[name][key] == pytest.approx(ours[name][key], abs=1e-3), (name, key)
        assert theirs[name]["fd"] == pytest.approx(ours[name]["fd"], rel=1e-2, abs=1e-2), name


def test_a_samples_folder_naming_no_identity_or_missing_one_is_one_line(evaluated_run, sd_data, cache, tmp_path,
                                                                        capsys):  # noqa: F811
    out, _ = evaluated_run
    folder = shutil.copytree(out / "samples" / "sd", tmp_path / "mine")
    (folder / "Zed").mkdir()
    code, _, err = run_cli(capsys, "evaluate", "--samples", folder, "--data", sd_data, "--out", tmp_path / "e",
                           "--cache-dir", cache, "--no-progress")
    assert code == 2 and len(err.strip().splitlines()) == 1 and f"{folder / 'Zed'}: no identity" in err, err
    (folder / "Zed").rmdir()
    for png in (folder / "Chen").iterdir():
        png.unlink()
    code, _, err = run_cli(capsys, "evaluate", "--samples", folder, "--data", sd_data, "--out", tmp_path / "e",
                           "--cache-dir", cache, "--no-progress")
    assert code == 2 and len(err.strip().splitlines()) == 1 and f"{folder / 'Chen'}: no .png image" in err, err
    assert not (tmp_path / "e").exists()


@pytest.fixture(scope="module")
def tiny_dinov2(tmp_path_factory):
    """A random DINOv2 saved to a folder: a second feature space, offline."""
    from transformers import BitImageProcessor, Dinov2Config, Dinov2Model

    folder = tmp_path_factory.mktemp("dinov2") / "tiny-dinov2"
    torch.manual_seed(0)
    Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                             image_size=56, patch_size=14)).save_pretrained(folder)
    BitImageProcessor(size={"shortest_edge": 64}, crop_size={"height": 56, "width": 56}).save_pretrained(folder)
    return folder


def test_two_spaces_in_one_pass_equal_two_one_space_passes(evaluated_run, tiny_dinov2, sd_data, cache, tmp_path,
                                                           capsys):  # noqa: F811
    out, metrics = evaluated_run  # sampled once, fd, sim and recall in efficientnet-lite0
    samples = out / "samples" / "sd"
    two = evaluate(capsys, tmp_path / "two", "--samples", samples, "--data", sd_data, "--fd-features",
                   "efficientnet-lite0", "--sim-features", tiny_dinov2, cache=cache)
    dino = evaluate(capsys, tmp_path / "dino", "--samples", samples, "--data", sd_data, "--features", tiny_dinov2,
                    cache=cache)
    assert two["feature_spaces"]["fd"] == metrics["feature_spaces"]["fd"] == "efficientnet-lite0-imagenet"
    assert two["feature_spaces"]["sim"] == dino["feature_spaces"]["sim"] != two["feature_spaces"]["fd"]
    assert two["identity_judge"] == dino["identity_judge"]  # the features judge decides in the sim space
    look_alike = two["calibration"]["real (look-alike)"]["look_alike_of"]
    assert look_alike == dino["calibration"]["real (look-alike)"]["look_alike_of"]  # chosen in the sim space
    effnet_look_alike = metrics["calibration"]["real (look-alike)"]["look_alike_of"]
    for section, label in (("methods", "sd"), ("calibration", "real (look-alike)")):
        for name, values in two[section][label]["per_identity"].items():
            effnet, dinov2 = (m[section][label]["per_identity"][name] for m in (metrics, dino))
            if label == "sd" or look_alike[name] == effnet_look_alike[name]:  # fd of the same images
                assert values["fd"] == effnet["fd"], (label, name)
            assert (values["sim"], values["recall"], values["id_acc"]) == (
                dinov2["sim"], dinov2["recall"], dinov2["id_acc"]), (label, name)


def test_one_space_named_twice_is_one_extractor():
    spaces = FeatureSpaces("efficientnet-lite0", "efficientnet-lite0")
    assert spaces.fd is spaces.sim
    features = spaces(torch.zeros(2, 3, 32, 32))
    assert features["fd"] is features["sim"]


def rename_columns(data, target, columns):
    shutil.copytree(data, target)
    rows = [json.loads(line) for line in (target / "metadata.jsonl").read_text().splitlines()]
    (target / "metadata.jsonl").write_text("".join(json.dumps({columns.get(k, k): v for k, v in row.items()}) + "\n"
                                                   for row in rows))
    return target


def test_the_datasets_columns_are_honoured_and_a_missing_identity_column_is_one_line(evaluated_run, sd_data, cache,
                                                                                    tmp_path, capsys):  # noqa: F811
    out, metrics = evaluated_run
    data = rename_columns(sd_data, tmp_path / "renamed",
                          {"identity": "person", "text": "caption", "file_name": "path"})
    columns = ["--identity-column", "person", "--caption-column", "caption", "--image-column", "path"]
    samples = out / "samples" / "sd"
    renamed = evaluate(capsys, tmp_path / "renamed-eval", "--samples", samples, "--data", data, *columns, cache=cache)
    assert scores(renamed, "sd") == scores(metrics, "sd")
    by_name = evaluate(capsys, tmp_path / "by-name", "--samples", samples, "--dataset-name", data, *columns,
                       cache=cache)
    assert scores(by_name, "sd") == scores(metrics, "sd")
    code, _, err = run_cli(capsys, "evaluate", "--samples", samples, "--data", data, "--caption-column", "caption",
                           "--image-column", "path", "--out", tmp_path / "e", "--cache-dir", cache, "--no-progress")
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "metadata.jsonl: no 'identity' column" in err and "--identity-column" in err
    code, _, err = run_cli(capsys, "evaluate", "--samples", samples, "--data", data, "--dataset-name", data,
                           "--out", tmp_path / "e", "--no-progress")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "both name the dataset" in err, err
    assert not (tmp_path / "e").exists()


def test_every_process_draws_the_same_images_as_one(tiny_sd):  # noqa: F811
    backbone = load_backbone(tiny_sd)
    prompts = ["An image of Anna.", "An image of Chen."]
    one = dict(sample_rows(backbone, prompts, 5, 2, seed=3, batch_size=3, progress=False))
    assert [list(rows) for rows in one] == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9]]
    for processes in (2, 3):
        shared = {rows: images for rank in range(processes)
                  for rows, images in sample_rows(backbone, prompts, 5, 2, seed=3, batch_size=3, progress=False,
                                                  shard=(rank, processes))}
        assert shared.keys() == one.keys() and all(torch.equal(shared[rows], one[rows]) for rows in one)


def test_two_processes_write_the_pngs_of_one(tiny_sd, sd_data, cache, tmp_path):  # noqa: F811
    """12 rows, sampling batches of 8: process 0 draws the first batch, process 1 the second. Both runs use
    one thread, as float round-off, which can move a pixel by one level, depends on the thread count."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1", "PYTHONPATH": str(SRC)}
    evaluate = ["-m", "pogdiff.cli", "evaluate", tiny_sd, "--data", sd_data, "--num-images", 4, *STEPS,
                "--cache-dir", cache, "--no-progress", "--out"]
    launch = ["-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
              "--mixed_precision", "no", "--dynamo_backend", "no", "--num_cpu_threads_per_process", "1",
              "--main_process_port", str(free_port())]
    for argv in ([*evaluate, tmp_path / "one"], [*launch, *evaluate, tmp_path / "two"]):
        done = subprocess.run([sys.executable, *map(str, argv)], env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("metrics written to") == 1  # the main process scores and reports
    one, two = tmp_path / "one", tmp_path / "two"
    pngs = sorted(p.relative_to(one) for p in (one / "samples").rglob("*.png"))
    assert len(pngs) == 12 and sorted(p.relative_to(two) for p in (two / "samples").rglob("*.png")) == pngs
    for png in pngs:
        assert np.array_equal(np.asarray(Image.open(one / png)), np.asarray(Image.open(two / png))), png
    metrics = [json.loads((folder / "metrics.json").read_text()) for folder in (one, two)]
    assert scores(metrics[0], "sd") == scores(metrics[1], "sd")
