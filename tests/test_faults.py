"""Faults: killed runs, full disks, damaged caches. Nothing written half-way may load as valid,
and a run killed between checkpoints resumes to the very weights of an uninterrupted one."""

import errno
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from pogdiff.encode import cache as cache_module
from pogdiff.encode import encoded_dataset as encoded_dataset_module
from pogdiff.encode import shards as shards_module
from pogdiff.data.image_files import ImageFiles
from pogdiff.cli import main
from pogdiff.data.dataset import load_dataset
from pogdiff.encode.encoders import TextEmbeddings
from pogdiff.errors import PogdiffError, PogdiffWarning
from pogdiff.files import incomplete
from pogdiff.encode.cache import cache_path
from pogdiff.encode.encoded_dataset import encode_dataset
from pogdiff.training.ownership import claimed
from pogdiff.training.run_folder import latest_checkpoint, save_checkpoint
from pogdiff.training.train import TrainConfig, output_folder

SRC = Path(__file__).resolve().parents[1] / "src"


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory):
    """One table cache for the module: every toy dataset here has the same content."""
    return tmp_path_factory.mktemp("cache")


# --- caches: keyed by what they depend on ---

class FakeTextEncoder:
    """Deterministic per-caption vectors; counts how often it encodes the dataset."""

    name = "fake-text"
    cache_dtype = torch.float32

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

    def fit_counted(*args, **kwargs):
        counts["density"] += 1
        return fit(*args, steps=20, **kwargs)

    monkeypatch.setattr(encoded_dataset_module, "find_neighbours", find_counted)
    monkeypatch.setattr(encoded_dataset_module, "fit_text_density", fit_counted)
    return counts


def states(encoded):
    """The caption states of every row."""
    return encoded.caption_states(torch.arange(len(encoded)))


def written(cache):
    """The files in the cache folder but the image hashes it remembers."""
    return [p for p in cache.rglob("*") if p.is_file() and not p.name.startswith("file-digests-")]


def build(root, text, image, cache, k=3):
    """The encoded dataset and its neighbour table in the space of ``image``."""
    dataset = load_dataset(root)
    encoded = encode_dataset(dataset, text, ImageFiles(dataset, 32, cache_dir=cache), cache_dir=cache,
                             feature_spaces=lambda _: image)
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
        assert torch.equal(states(again), states(first)) and torch.equal(again.elbo, first.elbo)
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
    text_file = next(cache.glob("text-*/shard-*.safetensors"))
    with safe_open(text_file, "pt") as file:
        metadata = file.metadata()
    tensors = load_file(text_file)
    tensors["states"][2, 0, 0] = float("inf")
    save_file(tensors, text_file, metadata=metadata)  # a valid file of the right table, with a bad value
    with pytest.warns(PogdiffWarning, match="NaN or inf in this cache shard; computing it again"):
        again, _ = build(toy_data, text, image, cache)
    assert text.calls == 2 and torch.equal(states(again), states(good))

    density_file = next(cache.glob("text-density-*.safetensors"))
    density_file.write_bytes(density_file.read_bytes()[:40])  # truncated
    with pytest.warns(PogdiffWarning, match="unreadable cache file"):
        build(toy_data, text, image, cache)
    assert counted["density"] == 2 and torch.isfinite(load_file(density_file)["elbo"]).all()


def zero_the_data(file):
    """Zero every byte of a safetensors file after its header: a valid file of the right table, all values 0."""
    data = file.read_bytes()
    start = 8 + int.from_bytes(data[:8], "little")
    file.write_bytes(data[:start] + bytes(len(data) - start))


def test_zeroed_cache_files_and_shards_are_computed_again(toy_data, tmp_path, counted):
    text, image, cache = FakeTextEncoder(), FakeImageEncoder(), tmp_path / "cache"
    good, good_table = build(toy_data, text, image, cache)
    zero_the_data(next(cache.glob("neighbours-*.safetensors")))  # it gave psi = 0 on every row: vanilla
    zero_the_data(next(cache.glob("text-*/shard-*.safetensors")))
    with pytest.warns(PogdiffWarning, match="bytes changed since it was written") as caught:
        again, table = build(toy_data, text, image, cache)
    messages = [str(w.message) for w in caught]
    assert any("/neighbours-" in m for m in messages) and any("/shard-" in m for m in messages)
    assert counted["neighbours"] == 2 and text.calls == 2
    assert torch.equal(table.similarity, good_table.similarity) and torch.equal(states(again), states(good))


def test_a_cache_file_of_another_table_is_computed_again(toy_data, tmp_path, counted):
    cache = tmp_path / "cache"
    _, good = build(toy_data, FakeTextEncoder(), FakeImageEncoder(), cache)
    neighbours_file = next(cache.glob("neighbours-*.safetensors"))
    neighbours_file.write_bytes(next(cache.glob("text-density-*.safetensors")).read_bytes())
    with pytest.warns(PogdiffWarning, match="holds another table \\(copied or renamed\\?\\); computing it again"):
        _, again = build(toy_data, FakeTextEncoder(), FakeImageEncoder(), cache)  # it raised KeyError: 'index'
    assert counted["neighbours"] == 2 and torch.equal(again.index, good.index)


def test_nan_from_an_encoder_names_the_row_and_caches_nothing(toy_data, tmp_path):
    caption = load_dataset(toy_data).captions[18]  # Chen's first: no other row has this caption
    with pytest.raises(PogdiffError, match=r"images/2_0.png: NaN or inf in the text embedding of its caption "
                                           r"\(row 19 of 20, 1 rows in all\); check that caption"):
        build(toy_data, FakeTextEncoder(nan_for=caption), FakeImageEncoder(), tmp_path / "cache")
    assert not list((tmp_path / "cache").glob("text-*"))


def test_a_cache_shard_that_cannot_be_written_stops_the_encode_and_leaves_no_file(toy_data, tmp_path, counted,
                                                                                 monkeypatch):
    def disk_full(tensors, path, metadata=None):
        Path(path).write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(cache_module, "save_file", disk_full)
    monkeypatch.setattr(shards_module, "save_file", disk_full)
    cache = tmp_path / "cache"
    with pytest.raises(PogdiffError) as stopped:  # a shard is no longer kept in memory: the encode stops
        build(toy_data, FakeTextEncoder(), FakeImageEncoder(), cache)
    message = str(stopped.value)
    assert len(message.splitlines()) == 1 and message.startswith(f"{cache}/text-"), message
    assert re.search(r": cannot write cache shard shard-\S+\.safetensors \(No space left on device\); free space or "
                     r"pass --cache-dir on a larger disk$", message), message
    assert written(cache) == [] and counted == {"neighbours": 0, "density": 0}

    def interrupted(tensors, path, metadata=None):
        Path(path).write_bytes(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(cache_module, "save_file", interrupted)
    monkeypatch.setattr(shards_module, "save_file", interrupted)
    with pytest.raises(KeyboardInterrupt):
        build(toy_data, FakeTextEncoder(), FakeImageEncoder(), cache)
    assert written(cache) == []

    # the single-file caches (a neighbour table, a density fit) still are skipped with a warning: the run goes on
    monkeypatch.setattr(shards_module, "save_file", save_file)
    monkeypatch.setattr(cache_module, "save_file", disk_full)
    with pytest.warns(PogdiffWarning, match="cannot write this cache file \\(No space left on device\\); going on "
                                            "without it"):
        tables, table = build(toy_data, FakeTextEncoder(), FakeImageEncoder(), cache)
    assert len(tables) == 20 and states(tables).shape == (20, 4, 8) and table.index.shape == (20, 3)
    assert written(cache) and all(p.parent != cache and not p.name.endswith(".tmp") for p in written(cache))


def test_cache_files_are_named_by_kind_and_key(tmp_path):
    a = cache_path(tmp_path, "neighbours", {"images": "x", "k": 3})
    assert a.name.startswith("neighbours-") and a == cache_path(tmp_path, "neighbours", {"k": 3, "images": "x"})
    assert a != cache_path(tmp_path, "neighbours", {"images": "x", "k": 4})


# --- checkpoints ---

def train_args(data, out, cache, *extra):
    return ["train", str(data), "--output-dir", str(out), "--method", "pogdiff", "--train-batch-size", "2",
            "--cache-dir", str(cache), "--no-progress", *map(str, extra)]


def read_steps(run):
    """{micro_step: rows} from a --log-rows file (pogdiff.training.row_log)."""
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
    assert ("checkpoint-2: cannot write (No space left on device); free space, then continue from checkpoint-1 "
            "with --resume-from-checkpoint latest") in err
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


def run_main(capsys, *argv):
    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err


def assert_one_line(err, *expected):
    assert len(err.strip().splitlines()) == 1 and err.startswith("pogdiff: error: "), err
    for text in expected:
        assert text in err, err


# --- two writers: the run folder's lock (pogdiff.training.ownership) ---

HOLD_THE_LOCK = """
import sys, time
from pogdiff.training.ownership import claimed
with claimed(sys.argv[1]):
    print("held", flush=True)
    time.sleep(600)
"""


def test_a_second_writer_is_refused_and_a_killed_writer_leaves_no_stuck_lock(toy_data, tmp_path, shared_cache,
                                                                             capsys):
    run = tmp_path / "run"
    run.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", HOLD_THE_LOCK, str(run)], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(SRC)})
    try:
        assert holder.stdout.readline().strip() == "held"
        for extra in ([], ["--overwrite"], ["--resume-from-checkpoint", "latest"]):
            code, err = run_main(capsys, *train_args(toy_data, run, shared_cache, "--max-train-steps", 1, *extra))
            assert code == 2
            if not extra or extra == ["--overwrite"]:
                assert_one_line(err, f"pogdiff process {holder.pid} is writing into this folder now", "wait for it")
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert [p.name for p in run.iterdir()] == [".pogdiff-run"]  # the killed writer's mark, and nothing more
    code, err = run_main(capsys, *train_args(toy_data, run, shared_cache, "--max-train-steps", 1))
    assert code == 0, err


def test_a_run_finished_by_another_writer_meanwhile_is_not_replaced(toy_data, tmp_path):
    """Two starts into one empty folder both pass the first check; the second finds the first's run under the lock."""
    run = tmp_path / "run"
    config = TrainConfig(str(toy_data), str(run))
    output_folder(config).check()
    with output_folder(config).claimed():  # the first writer: claims, writes its run, ends
        (run / "pogdiff_run.json").write_text("{}")
    with pytest.raises(PogdiffError, match="already holds a run"):
        with output_folder(config).claimed():
            pass
    assert (run / "pogdiff_run.json").read_text() == "{}"
    with claimed(run):  # and a live claim is exclusive, within one process too
        with pytest.raises(PogdiffError, match="is writing into this folder now"):
            with claimed(run):
                pass


# --- Ctrl-C: one line, and a folder the tool can continue or replace ---

def interrupt_at_draw(monkeypatch, number):
    """Make the ``number``-th batch draw of the training loop raise KeyboardInterrupt, as Ctrl-C would."""
    from pogdiff.training import train as train_module

    draw, calls = train_module.draw_batch, []

    def draw_then_interrupt(*args, **kwargs):
        calls.append(1)
        if len(calls) == number:
            raise KeyboardInterrupt
        return draw(*args, **kwargs)

    monkeypatch.setattr(train_module, "draw_batch", draw_then_interrupt)


def test_ctrl_c_after_a_checkpoint_leaves_a_run_to_resume(toy_data, tmp_path, shared_cache, capsys, monkeypatch):
    run = tmp_path / "run"
    steps = ["--max-train-steps", 4, "--checkpointing-steps", 2]
    interrupt_at_draw(monkeypatch, 3)
    code, err = run_main(capsys, *train_args(toy_data, run, shared_cache, *steps))
    assert code == 130
    assert_one_line(err, "run: interrupted; continue from checkpoint-2 with --resume-from-checkpoint latest, "
                         "or start afresh with --overwrite")
    monkeypatch.undo()
    code, err = run_main(capsys, *train_args(toy_data, run, shared_cache, *steps))
    assert code == 2 and "holds an unfinished run; continue from checkpoint-2" in err
    code, err = run_main(capsys, *train_args(toy_data, run, shared_cache, *steps, "--resume-from-checkpoint", "latest"))
    assert code == 0, err
    assert json.loads((run / "pogdiff_run.json").read_text())["steps"] == 4


def test_ctrl_c_before_any_checkpoint_leaves_a_run_to_replace(toy_data, tmp_path, shared_cache, capsys, monkeypatch):
    run = tmp_path / "run"
    interrupt_at_draw(monkeypatch, 1)
    code, err = run_main(capsys, *train_args(toy_data, run, shared_cache, "--max-train-steps", 2))
    assert code == 130
    assert_one_line(err, "interrupted; start the run afresh with --overwrite (no checkpoint was saved)")
    monkeypatch.undo()
    code, err = run_main(capsys, *train_args(toy_data, run, shared_cache, "--max-train-steps", 2,
                                             "--resume-from-checkpoint", "latest"))
    assert code == 2 and "the run saved none; start it afresh with --overwrite" in err
    code, err = run_main(capsys, *train_args(toy_data, run, shared_cache, "--max-train-steps", 2, "--overwrite"))
    assert code == 0, err


def test_a_real_sigint_is_one_line(toy_data, tmp_path, shared_cache):
    """SIGINT, as a terminal sends it on Ctrl-C, to a `pogdiff train` process that has saved a checkpoint."""
    run = tmp_path / "run"
    argv = train_args(toy_data, run, shared_cache, "--max-train-steps", 500, "--checkpointing-steps", 1,
                      "--checkpoints-total-limit", 1)
    process = subprocess.Popen([sys.executable, "-m", "pogdiff.cli", *argv], stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(SRC)},
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # as in a terminal
    while latest_checkpoint(run) is None and process.poll() is None:
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    err = process.communicate()[1]
    assert process.returncode == 130, err
    assert_one_line(err, "run: interrupted; continue from checkpoint-", "with --resume-from-checkpoint latest")
    assert not (run / "pogdiff_run.json").exists()


def test_ctrl_c_before_the_run_folder_exists(toy_data, tmp_path, capsys, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("pogdiff.training.train.load_dataset", interrupted)
    code, err = run_main(capsys, *train_args(toy_data, tmp_path / "run", tmp_path / "cache"))
    assert code == 130 and err == "pogdiff: error: interrupted; run the command again\n"
    assert not (tmp_path / "run").exists()


def test_a_cache_inside_the_output_folder_is_refused(toy_data, tmp_path, capsys):
    run = tmp_path / "run"
    code, err = run_main(capsys, *train_args(toy_data, run, run / "cache"))
    assert code == 2
    assert_one_line(err, "--cache-dir is inside --output-dir", "choose an --output-dir outside it")
    assert not run.exists()


# --- a damaged checkpoint is named, with the checkpoint to go back to ---

@pytest.fixture(scope="module")
def checkpointed_run(tmp_path_factory, shared_cache):
    """A finished 3-step run with checkpoint-1, -2 and -3 (copied by each test that damages it)."""
    from conftest import write_toy_dataset

    root = tmp_path_factory.mktemp("checkpointed")
    data = write_toy_dataset(root / "data")
    assert main(train_args(data, root / "run", shared_cache, "--max-train-steps", 3, "--checkpointing-steps", 1)) == 0
    return data, root / "run"


def cut_short(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-1000])


@pytest.mark.parametrize("damage, expected", [
    (lambda c: cut_short(c / "trained_weights.safetensors"),
     "trained_weights.safetensors is damaged ("),
    (lambda c: cut_short(c / "optimizer.bin"),
     "optimizer.bin is damaged (not a whole torch file"),
    (lambda c: (c / "random_states_0.pkl").write_bytes(b"not a pickle"), "random_states_0.pkl is damaged"),
    (lambda c: zipfile.ZipFile(c / "optimizer.bin", "w").writestr("notes.txt", "a zip, not torch's"),
     "optimizer.bin is damaged (missing, or its bytes differ from the sha256 in pogdiff_checkpoint.json)"),
], ids=["truncated weights", "truncated optimizer", "garbage random states", "a zip but not torch's"])
def test_a_damaged_checkpoint_names_itself_and_the_one_before(damage, expected, checkpointed_run, tmp_path,
                                                              shared_cache, capsys):
    data, finished = checkpointed_run
    run = shutil.copytree(finished, tmp_path / "run")
    damage(run / "checkpoint-3")
    code, err = run_main(capsys, *train_args(data, run, shared_cache, "--max-train-steps", 4,
                                             "--resume-from-checkpoint", "latest"))
    assert code == 2
    assert_one_line(err, "checkpoint-3: ", expected, "resume from the one before with --resume-from-checkpoint "
                    "checkpoint-2, or start the run afresh with --overwrite")
    code, err = run_main(capsys, *train_args(data, run, shared_cache, "--max-train-steps", 4,
                                             "--resume-from-checkpoint", "checkpoint-2"))
    assert code == 0, err


def test_a_file_cut_short_is_told_from_its_header(tmp_path):
    weights, state = tmp_path / "w.safetensors", tmp_path / "state.bin"
    save_file({"a": torch.zeros(100), "b": torch.ones(3, 4)}, weights)
    torch.save({"step": 3, "t": torch.zeros(50)}, state)
    assert incomplete(weights) is None and incomplete(state) is None
    size = weights.stat().st_size
    weights.write_bytes(weights.read_bytes()[:-10])
    assert incomplete(weights) == f"{size - 10} of its {size} bytes"
    weights.write_bytes(b"\1\2")
    assert "too short" in incomplete(weights)
    state.write_bytes(state.read_bytes()[:-10])
    assert incomplete(state).startswith("not a whole torch file")


def test_resume_only_from_a_checkpoint_of_the_run_itself(checkpointed_run, tmp_path, shared_cache, capsys):
    data, finished = checkpointed_run
    mine = tmp_path / "mine"  # a diffusers-like folder of the user's: resuming into it would overwrite unet/
    (mine / "unet").mkdir(parents=True)
    (mine / "unet" / "config.json").write_text("mine")
    for out, checkpoint, expected in [
            (mine, finished / "checkpoint-1", "no checkpoint to resume from"),
            (tmp_path / "new", finished / "checkpoint-1", "not a pogdiff run folder; drop --resume-from-checkpoint"),
            (finished, tmp_path / "checkpoint-1", "not a checkpoint of the run in"),
            (finished, "checkpoint-7", "pass latest or one of checkpoint-1, checkpoint-2")]:
        code, err = run_main(capsys, *train_args(data, out, shared_cache, "--resume-from-checkpoint", checkpoint))
        assert code == 2
        assert_one_line(err, expected)
    assert (mine / "unet" / "config.json").read_text() == "mine" and not (tmp_path / "new").exists()


# --- really full and read-only disks: small tmpfs mounts (root only) ---

def assert_stopped_at_the_cache(err, cache, *expected):
    """One error line naming a folder of the ``cache``, as the last line (warnings, such as the image hashes that
    cannot be remembered, may come before it); no traceback."""
    lines = err.strip().splitlines()
    errors = [line for line in lines if line.startswith("pogdiff: error: ")]
    assert errors == lines[-1:] and "Traceback" not in err, err
    assert all(line.startswith("pogdiff: warning: ") for line in lines[:-1]), err
    assert errors[0].startswith(f"pogdiff: error: {cache}/latents-"), err
    for text in expected:
        assert text in errors[0], err


def test_a_cache_disk_too_small_is_refused_before_encoding_in_one_line(toy_data, tmp_path, small_disk, capsys):
    cache = small_disk("64k")
    code, err = run_main(capsys, *train_args(toy_data, tmp_path / "run", cache, "--max-train-steps", 1))
    assert code == 2
    assert_stopped_at_the_cache(err, cache, "free space or pass --cache-dir on a larger disk")
    assert re.search(r": the 20 rows left to encode of this latents cache need about [\d.]+ kB, [\d.]+ kB free; ",
                     err), err
    assert not list(cache.rglob("shard-*")) and not any(p.name.endswith(".tmp") for p in cache.rglob("*"))


def test_a_read_only_cache_disk_stops_the_encode_in_one_line(toy_data, tmp_path, small_disk, capsys):
    cache = small_disk("1m", read_only=True)
    code, err = run_main(capsys, *train_args(toy_data, tmp_path / "run", cache, "--max-train-steps", 1))
    assert code == 2
    assert_stopped_at_the_cache(err, cache, "(Read-only file system); pass --cache-dir on a disk you can write to")
    assert not list(cache.iterdir())


def test_a_cache_folder_under_a_regular_file_stops_the_encode_in_one_line(toy_data, tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("mine")
    cache = tmp_path / "notes.txt" / "cache"
    code, err = run_main(capsys, *train_args(toy_data, tmp_path / "run", cache, "--max-train-steps", 1))
    assert code == 2
    assert_stopped_at_the_cache(err, cache, "(Not a directory); pass another --cache-dir")
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_a_really_full_checkpoint_disk_keeps_the_previous_checkpoint(toy_data, small_disk, shared_cache, capsys):
    run = small_disk("32m") / "run"  # room for checkpoint-1 (23 MB), not for checkpoint-2
    code, err = run_main(capsys, *train_args(toy_data, run, shared_cache, "--max-train-steps", 3,
                                             "--checkpointing-steps", 1))
    assert code == 2
    assert_one_line(err, "checkpoint-2: cannot write (No space left on device); free space, then continue from "
                         "checkpoint-1 with --resume-from-checkpoint latest")
    assert sorted(p.name for p in run.iterdir()) == [".pogdiff-run", "checkpoint-1", "psi.safetensors",
                                                     "psi_summary.json"]
