"""Faults: killed runs, full disks, damaged caches. Nothing written half-way may load as valid,
and a run killed between checkpoints resumes to the very weights of an uninterrupted one."""

import errno
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from pogdiff import cache as cache_module
from pogdiff import encoded_dataset as encoded_dataset_module
from pogdiff.cli import main
from pogdiff.data.dataset import load_dataset
from pogdiff.encoders import TextEmbeddings
from pogdiff.errors import PogdiffError, PogdiffWarning
from pogdiff.cache import cache_path
from pogdiff.encoded_dataset import encode_dataset
from pogdiff.run_folder import latest_checkpoint
from pogdiff.train import save_checkpoint

SRC = Path(__file__).resolve().parents[1] / "src"


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory):
    """One table cache for the module: every toy dataset here has the same content."""
    return tmp_path_factory.mktemp("cache")


# --- caches: keyed by what they depend on ---

class FakeTextEncoder:
    """Deterministic per-caption vectors; counts how often it encodes the dataset."""

    name = "fake-text"

    def __init__(self, nan_for: str | None = None):
        self.calls = 0
        self.nan_for = nan_for

    def encode(self, captions):
        self.calls += len(captions) > 1
        states = torch.stack([torch.randn(4, 8, generator=torch.Generator().manual_seed(
            int(hashlib.sha256(c.encode()).hexdigest()[:8], 16))) for c in captions])
        states[[c == self.nan_for for c in captions]] = float("nan")
        return TextEmbeddings(states, states.mean(1))


class FakeImageEncoder:
    name = "fake-image"

    def __init__(self):
        self.calls = 0

    def __call__(self, images):
        self.calls += 1
        return images.flatten(1)


@pytest.fixture
def counted(monkeypatch):
    """Counts of the neighbour searches and density fits encode_dataset runs (the fit shortened)."""
    counts = {"neighbours": 0, "density": 0}
    find, fit = encoded_dataset_module.find_neighbours, encoded_dataset_module.fit_text_density

    def find_counted(*args, **kwargs):
        counts["neighbours"] += 1
        return find(*args, **kwargs)

    def fit_counted(pooled, **kwargs):
        counts["density"] += 1
        return fit(pooled, steps=20, **kwargs)

    monkeypatch.setattr(encoded_dataset_module, "find_neighbours", find_counted)
    monkeypatch.setattr(encoded_dataset_module, "fit_text_density", fit_counted)
    return counts


def build(root, text, image, cache, k=3):
    """The encoded dataset and its neighbour table in the space of ``image``."""
    dataset = load_dataset(root)
    encoded = encode_dataset(dataset, dataset.load_images(32), text, cache_dir=cache, feature_spaces=lambda _: image)
    return encoded, encoded.image_features.neighbours("fake", k)


def test_caches_follow_content_and_parameters_not_location(toy_data, tmp_path, counted):
    text, image, cache = FakeTextEncoder(), FakeImageEncoder(), tmp_path / "cache"

    def computed():
        return {"text": text.calls, "image": image.calls, **counted}

    first, first_table = build(toy_data, text, image, cache)
    assert computed() == {"text": 1, "image": 1, "neighbours": 1, "density": 1}

    for path in toy_data.rglob("*"):  # touching every file changes nothing
        os.utime(path, (time.time() + 100, time.time() + 100))
    copy = shutil.copytree(toy_data, tmp_path / "elsewhere")  # nor does a copy in another place
    for root in (toy_data, copy):
        again, again_table = build(root, text, image, cache)
        assert computed() == {"text": 1, "image": 1, "neighbours": 1, "density": 1}
        assert torch.equal(again.text_states, first.text_states) and torch.equal(again.elbo, first.elbo)
        assert torch.equal(again_table.index, first_table.index)

    lines = (copy / "metadata.jsonl").read_text().splitlines()
    lines[3] = lines[3].replace("pose", "smiling, pose")
    (copy / "metadata.jsonl").write_text("\n".join(lines))
    build(copy, text, image, cache)  # a caption: its states and the text density
    assert computed() == {"text": 2, "image": 1, "neighbours": 1, "density": 2}

    pixels = np.asarray(Image.open(copy / "images" / "1_2.png")).copy()
    pixels[:8] = 255
    Image.fromarray(pixels).save(copy / "images" / "1_2.png")
    build(copy, text, image, cache)  # an image: its features and the neighbours
    assert computed() == {"text": 2, "image": 2, "neighbours": 2, "density": 2}

    build(copy, text, image, cache, k=5)  # k: the neighbours only
    assert computed() == {"text": 2, "image": 2, "neighbours": 3, "density": 2}


def test_building_tables_leaves_the_global_rng_alone(toy_data, tmp_path, counted):
    """A cold cache must not change a run's draws: encoders initialise layers at random when they load."""

    class LoadsLikeARealEncoder(FakeImageEncoder):
        def __call__(self, images):
            torch.nn.Linear(8, 8)  # random init before the weights are read
            return super().__call__(images)

    torch.manual_seed(5)
    state = torch.get_rng_state()
    build(toy_data, FakeTextEncoder(), LoadsLikeARealEncoder(), tmp_path / "cache")  # cold
    assert torch.equal(torch.get_rng_state(), state)


def test_damaged_cache_files_are_computed_again(toy_data, tmp_path, counted):
    text, image, cache = FakeTextEncoder(), FakeImageEncoder(), tmp_path / "cache"
    good, _ = build(toy_data, text, image, cache)
    text_file = next(cache.glob("text-*.safetensors"))
    tensors = load_file(text_file)
    tensors["states"][2, 0, 0] = float("inf")
    save_file(tensors, text_file)
    with pytest.warns(PogdiffWarning, match="NaN or inf in this cache file; computing it again"):
        again, _ = build(toy_data, text, image, cache)
    assert text.calls == 2 and torch.equal(again.text_states, good.text_states)

    density_file = next(cache.glob("text-density-*.safetensors"))
    density_file.write_bytes(density_file.read_bytes()[:40])  # truncated
    with pytest.warns(PogdiffWarning, match="unreadable cache file"):
        build(toy_data, text, image, cache)
    assert counted["density"] == 2 and torch.isfinite(load_file(density_file)["elbo"]).all()


def test_nan_from_an_encoder_names_the_row_and_caches_nothing(toy_data, tmp_path):
    caption = load_dataset(toy_data).captions[18]  # Chen's first: no other row has this caption
    with pytest.raises(PogdiffError, match=r"images/2_0.png: NaN or inf in the text embedding of its caption "
                                           r"\(row 19 of 20, 1 rows in all\); check that caption"):
        build(toy_data, FakeTextEncoder(nan_for=caption), FakeImageEncoder(), tmp_path / "cache")
    assert not list((tmp_path / "cache").glob("text-*"))


def test_a_cache_write_that_fails_leaves_no_file_and_the_run_goes_on(toy_data, tmp_path, counted, monkeypatch):
    def disk_full(tensors, path, metadata=None):
        Path(path).write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(cache_module, "save_file", disk_full)
    cache = tmp_path / "cache"
    with pytest.warns(PogdiffWarning, match="cannot write this cache file \\(No space left on device\\)"):
        tables, _ = build(toy_data, FakeTextEncoder(), FakeImageEncoder(), cache)
    assert len(tables) == 20 and list(cache.iterdir()) == []

    def interrupted(tensors, path, metadata=None):
        Path(path).write_bytes(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(cache_module, "save_file", interrupted)
    with pytest.raises(KeyboardInterrupt):
        build(toy_data, FakeTextEncoder(), FakeImageEncoder(), cache)
    assert list(cache.iterdir()) == []


def test_cache_files_are_named_by_kind_and_key(tmp_path):
    a = cache_path(tmp_path, "neighbours", {"images": "x", "k": 3})
    assert a.name.startswith("neighbours-") and a == cache_path(tmp_path, "neighbours", {"k": 3, "images": "x"})
    assert a != cache_path(tmp_path, "neighbours", {"images": "x", "k": 4})


# --- checkpoints ---

def train_args(data, out, cache, *extra):
    return ["train", str(data), "--output-dir", str(out), "--method", "pogdiff", "--train-batch-size", "2",
            "--cache-dir", str(cache), "--no-progress", *map(str, extra)]


def read_steps(run):
    """{micro_step: rows} from a --log-rows file (pogdiff.row_log)."""
    records = [json.loads(line) for line in (run / "rows-rank0.jsonl").read_text().splitlines()]
    return {r["micro_step"]: r["rows"] for r in records if "micro_step" in r}


def unet_weights(run):
    return load_file(run / "unet" / "diffusion_pytorch_model.safetensors")


def test_disk_full_while_checkpointing_keeps_the_previous_checkpoint(toy_data, tmp_path, shared_cache, capsys,
                                                                     monkeypatch):
    from accelerate import Accelerator

    save_state, calls = Accelerator.save_state, []

    def fills_the_disk(self, output_dir=None, **kwargs):
        calls.append(output_dir)
        save_state(self, output_dir, **kwargs)  # the files are written, then the disk fills up
        if len(calls) == 2:
            (Path(output_dir) / "optimizer.bin").write_bytes(b"trunc")
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Accelerator, "save_state", fills_the_disk)
    run = tmp_path / "run"
    code = main(train_args(toy_data, run, shared_cache, "--max-train-steps", 3, "--checkpointing-steps", 1))
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "checkpoint-2: cannot write (No space left on device); checkpoint-1 is intact" in err
    assert sorted(p.name for p in run.iterdir() if "checkpoint" in p.name) == ["checkpoint-1"]
    assert not (run / "pogdiff_run.json").exists()

    monkeypatch.setattr(Accelerator, "save_state", save_state)  # space freed: the run continues from step 1
    code = main(train_args(toy_data, run, shared_cache, "--max-train-steps", 3, "--checkpointing-steps", 1,
                           "--resume-from-checkpoint", "latest"))
    assert code == 0, capsys.readouterr().err
    assert json.loads((run / "pogdiff_run.json").read_text())["steps"] == 3


def test_a_checkpoint_saved_again_replaces_the_old_one_and_tmp_folders_are_ignored(tmp_path):
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    model = accelerator.prepare(torch.nn.Linear(2, 2))
    save_checkpoint(accelerator, tmp_path, 4, None)
    with torch.no_grad():
        model.weight.fill_(7.0)
    save_checkpoint(accelerator, tmp_path, 4, None)  # e.g. resumed from checkpoint-2 of a run that reached 4
    assert (load_file(tmp_path / "checkpoint-4" / "model.safetensors")["weight"] == 7.0).all()
    (tmp_path / ".checkpoint-6.tmp").mkdir()  # a write that was killed
    (tmp_path / "checkpoint-final").mkdir()
    assert latest_checkpoint(tmp_path).name == "checkpoint-4"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".checkpoint-6.tmp", "checkpoint-4", "checkpoint-final"]


def test_sigkill_between_checkpoints_then_resume_equals_an_uninterrupted_run(toy_data, tmp_path, shared_cache):
    """PoGDiff with EMA, accumulation and flips: data order, t, eps, dropout, flips and neighbour draws all resume."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the killed subprocess: the same float reductions
    try:
        steps = ["--max-train-steps", 12, "--checkpointing-steps", 3, "--gradient-accumulation-steps", 2,
                 "--use-ema", "--random-flip"]
        assert main(train_args(toy_data, tmp_path / "reference", shared_cache, *steps, "--log-rows")) == 0

        run = tmp_path / "killed"
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(SRC)}
        process = subprocess.Popen([sys.executable, "-m", "pogdiff.cli", *train_args(toy_data, run, shared_cache,
                                                                                     *steps, "--log-rows")],
                                   env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        while not (run / "checkpoint-6").is_dir() and process.poll() is None:
            time.sleep(0.01)
        process.send_signal(signal.SIGKILL)
        assert process.wait() == -signal.SIGKILL, process.stderr.read().decode()
        assert not (run / "pogdiff_run.json").exists() and not (run / "unet").exists()
        killed_at = latest_checkpoint(run).name
        assert killed_at in ("checkpoint-6", "checkpoint-9")

        assert main(train_args(toy_data, run, shared_cache, *steps, "--log-rows",
                               "--resume-from-checkpoint", "latest")) == 0
    finally:
        torch.set_num_threads(threads)
    records = [json.loads(line) for line in (run / "rows-rank0.jsonl").read_text().splitlines()]
    resumed_at = [i for i, r in enumerate(records) if "tables" in r][1]
    assert records[resumed_at + 1]["micro_step"] == 2 * int(killed_at.split("-")[1]) + 1  # not from scratch
    assert read_steps(run) == read_steps(tmp_path / "reference")  # the same rows at every micro-step
    reference, resumed = unet_weights(tmp_path / "reference"), unet_weights(run)
    assert reference.keys() == resumed.keys()
    different = [name for name in reference if not torch.equal(reference[name], resumed[name])]
    assert not different, f"killed at {killed_at}; {len(different)} tensors differ, e.g. {different[:3]}"
