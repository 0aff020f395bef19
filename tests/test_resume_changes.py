"""#37 items 12 and 13: a resume accepts what does not change the run (docs/bad-input.md #140-#143), and bad input
that was reported as something else gets its own line (#144-#149); `pogdiff --version`."""

import json
import os
import shutil
import unicodedata
from importlib.metadata import version

import pytest
import torch
from safetensors.torch import load_file
from test_bad_input import assert_one_line_error, run_cli, snapshot

from pogdiff.data.dataset import load_dataset, load_image
from pogdiff.errors import DatasetError
from pogdiff.training import train as train_module
from pogdiff.training.run_folder import CHECKPOINT_RECORD

T = ["--train-batch-size", 2, "--no-progress"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A PoGDiff run of 2 steps on the toy set, checkpointed at each step, and the cache it filled."""
    from conftest import write_toy_dataset
    from pogdiff.cli import main

    root = tmp_path_factory.mktemp("trained")
    data, run, cache = write_toy_dataset(root / "data"), root / "run", root / "cache"
    assert main([str(a) for a in ["train", data, "--output-dir", run, "--cache-dir", cache, "--checkpointing-steps", 1,
                                  "--max-train-steps", 2, *T]]) == 0
    return data, run, cache


def copy_run(run, tmp_path):
    return shutil.copytree(run, tmp_path / "run", symlinks=True)


def steps_of(run):
    return json.loads((run / "pogdiff_run.json").read_text())["steps"]


# --- item 12: harmless changes resume ---

@pytest.mark.parametrize("change", [
    ["--gradient-checkpointing"],
    ["--resolution", 32, "--learning-rate", "1e-3"],  # the small backbone's own, typed out
    ["--sampler", "uniform", "--k", 10],  # PoGDiff's own sampler and k, typed out
    ["--dataset-name", "DATA"],  # the same folder, named by --dataset-name instead of DATA
    ["--train_data_dir", "./DATA"],  # the same folder twice, once relative
], ids=["gradient checkpointing", "small backbone defaults", "method defaults", "dataset-name", "DATA and ./DATA"])
def test_a_resume_with_a_harmless_change_goes_on(change, trained, tmp_path, capsys, monkeypatch):
    data, run, cache = trained
    own = copy_run(run, tmp_path)
    monkeypatch.chdir(data.parent)
    change = [data.name if a == "DATA" else f"./{data.name}" if a == "./DATA" else a for a in change]
    given = [] if "--dataset-name" in change else [data]
    code, _, err = run_cli(capsys, "train", *given, "--output-dir", own, "--cache-dir", cache, "--checkpointing-steps",
                           1, "--resume-from-checkpoint", "latest", "--max-train-steps", 3, *T, *change)
    assert code == 0, err
    assert steps_of(own) == 3
    record = json.loads((own / "checkpoint-3" / CHECKPOINT_RECORD).read_text())["options"]
    assert record["defaults"]["resolution"] == 32 and record["defaults"]["learning_rate"] == 1e-3  # None stands for


@pytest.mark.parametrize("change, expected", [
    (["--learning-rate", "2e-3"], "learning_rate (run: 0.001, now: 0.002)"),
    (["--k", 3], "method_options (run: {}, now: {'k': 3})"),
    (["--from-scratch", "--resolution", 16, "--neighbour-features", "efficientnet-lite0"],
     "from_scratch (run: False, now: True), "
     "method_options (run: {}, now: {'neighbour_features': 'efficientnet-lite0'}), "
     "resolution (run: 32, now: 16)"),
], ids=["learning rate", "k", "from scratch at 16"])
def test_a_resume_with_a_real_change_is_still_refused(change, expected, trained, tmp_path, capsys):
    data, run, cache = trained
    own = copy_run(run, tmp_path)
    before = snapshot(own)
    code, _, err = run_cli(capsys, "train", data, "--output-dir", own, "--cache-dir", cache,
                           "--resume-from-checkpoint", "latest", "--max-train-steps", 3, *T, *change)
    assert_one_line_error(code, err, "checkpoint-2: the run was started with other options", expected)
    assert snapshot(own) == before


def test_a_checkpoint_recorded_before_defaults_were_resolved_still_resumes(trained, tmp_path, capsys):
    """A record written by an earlier version: the options as given (None for the backbone's defaults),
    gradient checkpointing and compile among them."""
    data, run, cache = trained
    own = copy_run(run, tmp_path)
    path = own / "checkpoint-2" / CHECKPOINT_RECORD
    record = json.loads(path.read_text())
    # nor the options added since (those of flow-matching backbones): they ran as their defaults
    added = {"weighting_scheme", "logit_mean", "logit_std", "mode_scale", "max_sequence_length"}
    record["options"] = {**{k: v for k, v in record["options"].items() if k != "defaults" and k not in added},
                         "resolution": None, "learning_rate": None, "sampler": None,
                         "gradient_checkpointing": False, "compile": False}
    path.write_text(json.dumps(record))
    code, _, err = run_cli(capsys, "train", data, "--output-dir", own, "--cache-dir", cache,
                           "--resume-from-checkpoint", "latest", "--max-train-steps", 3, *T,
                           "--learning-rate", "1e-3", "--gradient-checkpointing")
    assert code == 0, err
    path.write_text(json.dumps(record))  # and a real change is refused against it
    code, _, err = run_cli(capsys, "train", data, "--output-dir", own, "--cache-dir", cache, "--overwrite",
                           "--resume-from-checkpoint", "checkpoint-2", "--max-train-steps", 3, *T, "--resolution", 16,
                           "--from-scratch", "--neighbour-features", "efficientnet-lite0")
    assert_one_line_error(code, err, "resolution (run: 32, now: 16)")


@pytest.fixture
def eager_backend(monkeypatch):
    """--compile with dynamo's eager backend: the same wrapping, without minutes of code generation on a CPU."""
    real = train_module.TorchDynamoPlugin
    monkeypatch.setattr(train_module, "TorchDynamoPlugin", lambda **kwargs: real(**{**kwargs, "backend": "eager"}))


def test_compile_may_be_added_or_dropped_on_resume_and_the_weights_are_the_same(toy_data, tmp_path, cache_dir, capsys,
                                                                                eager_backend):
    def train(out, *extra):
        code, _, err = run_cli(capsys, "train", toy_data, "--output-dir", out, "--cache-dir", cache_dir,
                               "--checkpointing-steps", 1, *T, *extra)
        assert code == 0, err
        return load_file(out / "unet" / "diffusion_pytorch_model.safetensors")

    reference = train(tmp_path / "reference", "--max-train-steps", 3)
    for first, then in ((["--compile"], []), ([], ["--compile"])):
        run = tmp_path / f"run{len(first)}"
        train(run, "--max-train-steps", 2, *first)
        (run / "pogdiff_run.json").unlink()  # as if killed after checkpoint-2
        resumed = train(run, "--max-train-steps", 3, "--resume-from-checkpoint", "latest", *then)
        assert all(torch.allclose(reference[k], resumed[k], atol=1e-6) for k in reference), (first, then)


# --- item 13 (a): what "missing" meant ---

def test_a_symbolic_link_loop_is_called_so(toy_data, tmp_path, capsys):
    loop = toy_data / "images" / "0_0.png"
    loop.unlink()
    os.symlink(loop.name, loop)  # a link to itself
    before = snapshot(toy_data)
    code, _, err = run_cli(capsys, "train", toy_data, "--output-dir", tmp_path / "run", "--cache-dir", tmp_path / "c",
                           "--max-train-steps", 1, *T)
    assert_one_line_error(code, err, "0_0.png: image listed on line 1 of", "is a symbolic link loop",
                          "point the link at the image or remove its line")
    assert "missing" not in err
    assert snapshot(toy_data) == before and not (tmp_path / "run").exists()


def test_a_file_name_on_disk_in_nfd_beside_nfc_metadata_is_read(toy_data):
    """macOS writes file names in NFD; metadata.jsonl written by a script holds NFC."""
    nfc, nfd = (unicodedata.normalize(form, "Zoë") for form in ("NFC", "NFD"))
    lines = (toy_data / "metadata.jsonl").read_text().splitlines()
    row = json.loads(lines[0])
    (toy_data / row["file_name"]).rename(toy_data / "images" / f"{nfd}.png")
    lines[0] = json.dumps({**row, "file_name": f"images/{nfc}.png"})
    (toy_data / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    dataset = load_dataset(toy_data)
    assert dataset.files[0] == f"images/{nfd}.png"  # the file on disk
    assert load_image(dataset.root / dataset.files[0], 32).shape == (32, 32, 3)


def test_a_url_as_file_name_says_download_the_images(toy_data, tmp_path, capsys):
    lines = (toy_data / "metadata.jsonl").read_text().splitlines()
    lines[1] = json.dumps({**json.loads(lines[1]), "file_name": "https://example.com/images/a.png"})
    (toy_data / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(DatasetError, match="metadata.jsonl:2: 'https://example.com/images/a.png' is a URL; "
                                           "file_name must be a path relative to DATA; download the images first"):
        load_dataset(toy_data)
    code, _, err = run_cli(capsys, "train", toy_data, "--output-dir", tmp_path / "run", "--cache-dir", tmp_path / "c",
                           *T)
    assert_one_line_error(code, err, "download the images first")
    assert "missing" not in err and not (tmp_path / "run").exists()


# --- item 13 (b): DATA swallowed by --validation-prompts ---

def test_data_taken_as_a_validation_prompt_is_named(toy_data, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(toy_data.parent)
    code, _, err = run_cli(capsys, "train", "--validation-prompts", "An image of Anna.", toy_data.name,
                           "--output-dir", tmp_path / "run", *T)
    assert_one_line_error(code, err, "no dataset", f"{toy_data.name} was taken as a validation prompt; put DATA "
                                     "before --validation-prompts or end the prompts with --")
    code, _, err = run_cli(capsys, "train", "--validation-prompts", "An image of Anna.", "Chen",  # not a dataset
                           "--output-dir", tmp_path / "run", *T)
    assert_one_line_error(code, err, "no dataset")
    assert "validation prompt" not in err and not (tmp_path / "run").exists()


# --- item 13 (c): benchmark --out inside the dataset ---

def test_a_benchmark_out_inside_the_dataset_is_refused_before_writing(toy_data, tmp_path, capsys):
    before = snapshot(toy_data)
    code, _, err = run_cli(capsys, "benchmark", "--data", toy_data, "--out", toy_data / "bench", "--quick",
                           "--cache-dir", tmp_path / "c", "--no-progress")
    assert_one_line_error(code, err, "bench: --out is inside the dataset", "choose an --out outside it")
    assert "--output-dir" not in err
    assert snapshot(toy_data) == before and not (toy_data / "bench").exists()


# --- --version ---

def test_version_prints_the_installed_version(capsys):
    code, out, err = run_cli(capsys, "--version")
    assert code == 0, err
    assert out == f"pogdiff {version('pogdiff')}\n"
