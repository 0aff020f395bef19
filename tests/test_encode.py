"""`pogdiff encode`: sharded, memory-mapped caches that a killed or failed encode continues, keyed by the image
files and the base weights, written by every process of `accelerate launch`.

Peak memory against the number of images is measured by benchmarks/data_scale.py, not here.
"""

import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from test_scale import SRC, free_port
from test_stable_diffusion import sd_data, tiny_sd  # noqa: F401 (fixtures)

from pogdiff.encode import shards as shards_module
from pogdiff.backbones.pixel import PixelBackbone
from pogdiff.backbones.stable_diffusion import StableDiffusionBackbone
from pogdiff.cli import main
from pogdiff.data.dataset import load_dataset
from pogdiff.data.image_files import ImageFiles, file_digests
from pogdiff.encode.encoded_dataset import encode_dataset, training_latents
from pogdiff.encode.shards import ShardedCache, ShardedTable
from pogdiff.encode.text_density import fit_text_density


@pytest.fixture
def four_row_shards(monkeypatch):
    monkeypatch.setenv("POGDIFF_SHARD_ROWS", "4")


def shard_files(cache, kind):
    return sorted(cache.glob(f"{kind}-*/shard-*.safetensors"))


def folders(cache, kind):
    return [p for p in cache.glob(f"{kind}-*") if p.is_dir()]


def encode_cli(data, cache, *options):
    return main([str(a) for a in ["encode", data, "--cache-dir", cache, "--no-progress", *options]])


def test_encode_writes_what_train_reads_and_train_encodes_nothing_more(toy_data, tmp_path, four_row_shards,
                                                                        monkeypatch, capsys):
    cache = tmp_path / "cache"
    assert encode_cli(toy_data, cache, "--method", "pogdiff") == 0
    assert "encoded 20 rows (8 distinct captions)" in capsys.readouterr().out
    assert len(shard_files(cache, "latents")) == 5 and len(shard_files(cache, "text")) == 2  # 20 rows, 8 captions
    assert len(shard_files(cache, "image-features")) == 5 and len(list(cache.glob("neighbours-*"))) == 1
    before = {p: p.stat().st_mtime_ns for p in cache.rglob("*") if p.is_file()}
    computed = []
    monkeypatch.setattr(ShardedCache, "_write", lambda self, shard, *a: computed.append((self.kind, shard)))
    assert main([str(a) for a in ["train", toy_data, "--output-dir", tmp_path / "run", "--cache-dir", cache,
                                  "--max-train-steps", 1, "--train-batch-size", 4, "--no-progress"]]) == 0
    assert computed == [] and all(p.stat().st_mtime_ns == t for p, t in before.items() if p.suffix == ".safetensors")


def test_a_killed_encode_continues_from_its_finished_shards(toy_data, tmp_path, four_row_shards, monkeypatch):
    cache, written = tmp_path / "cache", []
    write = ShardedCache._write

    def killed_after_two(self, shard, tensors, writer):
        if len(written) == 2:
            raise KeyboardInterrupt
        written.append(shard)
        write(self, shard, tensors, writer)

    monkeypatch.setattr(ShardedCache, "_write", killed_after_two)
    assert encode_cli(toy_data, cache, "--method", "vanilla") == 130  # Ctrl-C
    kept = {p: p.read_bytes() for p in shard_files(cache, "latents")}
    assert len(kept) == 2 and not [p for p in cache.rglob("*") if p.name.endswith(".tmp")]

    monkeypatch.setattr(ShardedCache, "_write", lambda self, shard, tensors, writer: (
        written.append(shard), write(self, shard, tensors, writer)))
    written.clear()
    assert encode_cli(toy_data, cache, "--method", "vanilla") == 0
    assert written[:3] == [2, 3, 4]  # the latents' three missing shards, then the captions'
    assert all(p.read_bytes() == data for p, data in kept.items())


def test_a_corrupt_image_mid_encode_names_it_keeps_the_other_shards_and_the_rerun_does_the_rest(
        toy_data, tmp_path, four_row_shards, monkeypatch, capsys):
    dataset = load_dataset(toy_data)
    broken = toy_data / dataset.files[13]  # row 14: the fourth shard of five
    good = broken.read_bytes()
    broken.write_bytes(good[:60])
    cache = tmp_path / "cache"
    assert encode_cli(toy_data, cache, "--method", "vanilla") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith(f"pogdiff: error: {broken}: cannot read this image")
    assert err.endswith("replace it or remove its line; the shards encoded so far are kept")
    assert [p.name[:11] for p in shard_files(cache, "latents")] == [f"shard-0000{i}" for i in (0, 1, 2, 4)]

    broken.write_bytes(good)
    computed = []
    write = ShardedCache._write
    monkeypatch.setattr(ShardedCache, "_write", lambda self, shard, *a: (computed.append((self.kind, shard)),
                                                                         write(self, shard, *a)))
    assert encode_cli(toy_data, cache, "--method", "vanilla") == 0
    assert [c for c in computed if c[0] == "latents"] == [("latents", 3)]


def test_every_unreadable_image_of_every_shard_is_counted(toy_data, tmp_path, four_row_shards, capsys):
    dataset = load_dataset(toy_data)
    for row in (2, 9, 17):
        (toy_data / dataset.files[row]).write_bytes(b"not an image")
    assert encode_cli(toy_data, tmp_path / "cache", "--method", "vanilla") == 2
    err = capsys.readouterr().err
    assert f"{toy_data / dataset.files[2]}: cannot read this image" in err
    assert f"(2 more unreadable: {dataset.files[9]}, {dataset.files[17]})" in err


@pytest.mark.parametrize("value", ["0", "\u00b2", "1" + "0" * 22], ids=["zero", "superscript two", "23 digits"])
def test_a_bad_shard_size_is_one_line(value, toy_data, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("POGDIFF_SHARD_ROWS", value)
    assert encode_cli(toy_data, tmp_path / "cache", "--method", "vanilla") == 2
    err = capsys.readouterr().err
    assert err.strip() == f"pogdiff: error: POGDIFF_SHARD_ROWS={value!r}: rows per cache shard must be a whole " \
                          "number from 1 to 2147483647; unset it or fix it"
    assert not list((tmp_path / "cache").glob("*/shard-*"))  # refused before any shard was encoded


def test_sharded_table_reads_rows_in_any_order_across_shards(tmp_path):
    cache = ShardedCache(tmp_path, "t", {"x": 1}, [str(i) for i in range(10)], rows_per_shard=3)
    values = torch.arange(10 * 2, dtype=torch.float16).view(10, 2)
    cache.fill(lambda rows: {"v": values[rows.start:rows.stop]}, "test", progress=False)
    table = cache.open()["v"]
    assert isinstance(table, ShardedTable) and table.shape == (10, 2) and table.dtype == torch.float16
    assert isinstance(table.parts[0], shards_module.MappedArray)  # read from disk, not loaded
    rows = torch.tensor([9, 0, 4, 4, 3, 8])
    assert torch.equal(table[rows], values[rows]) and torch.equal(table[:], values)


def test_a_shard_of_another_table_is_computed_again(tmp_path, four_row_shards):
    one = ShardedCache(tmp_path, "latents", {"encoder": "a"}, list("abcdefgh"))
    one.fill(lambda rows: {"x0": torch.zeros(len(rows), 2)}, "a", progress=False)
    other = ShardedCache(tmp_path, "latents", {"encoder": "b"}, list("abcdefgh"))
    other.folder.mkdir()
    for shard in range(2):
        other.path(shard).write_bytes(one.path(shard).read_bytes())  # a copied folder, say
    with pytest.warns(UserWarning, match="holds other rows or another table"):
        other.fill(lambda rows: {"x0": torch.ones(len(rows), 2)}, "b", progress=False)
    assert torch.equal(other.open()["x0"][:], torch.ones(8, 2))


def test_image_keys_come_from_file_bytes_not_names_or_times(toy_data, tmp_path):
    dataset = load_dataset(toy_data)
    first = ImageFiles(dataset, 32, cache_dir=tmp_path / "cache").digest
    copy = shutil.copytree(toy_data, tmp_path / "copy")
    for path in copy.rglob("*.png"):
        os.utime(path, (1, 1))
    assert ImageFiles(load_dataset(copy), 32, cache_dir=tmp_path / "cache").digest == first
    assert ImageFiles(dataset, 32, center_crop=False, cache_dir=tmp_path / "cache").digest != first
    pixels = np.asarray(Image.open(copy / dataset.files[5])).copy()
    pixels[0, 0] = 255 - pixels[0, 0]
    Image.fromarray(pixels).save(copy / dataset.files[5])
    digests, original = file_digests(load_dataset(copy), tmp_path / "cache"), file_digests(dataset, tmp_path / "cache")
    assert digests[5] != original[5] and digests[:5] == original[:5] and digests[6:] == original[6:]


def test_rows_with_one_caption_get_one_text_density(toy_data, tmp_path):
    """Eq. 10's p(y) is a function of the caption: estimated once per distinct caption (issue: a one-sample
    ELBO per row gave two rows of one caption different psi_txt)."""
    dataset = load_dataset(toy_data)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        text = PixelBackbone.create().text_encoder
    encoded = encode_dataset(dataset, text, ImageFiles(dataset, 32), cache_dir=tmp_path)
    for caption in set(dataset.captions):
        rows = [i for i, c in enumerate(dataset.captions) if c == caption]
        assert torch.unique(encoded.elbo[rows]).numel() == 1
        assert torch.equal(encoded.caption_states(torch.tensor(rows)), encoded.caption_states(torch.tensor(rows[:1]))
                           .expand(len(rows), -1, -1))
    assert len(encoded.caption_table) == len(set(dataset.captions)) == 8
    # a caption repeated weighs in the fit as often as it is trained on: duplicating rows changes the density
    g = torch.Generator().manual_seed(0)
    vectors = torch.nn.functional.normalize(torch.randn(3, 16, generator=g), dim=1)
    even = fit_text_density(vectors, torch.tensor([0, 1, 2]), steps=200)
    skewed = fit_text_density(vectors, torch.tensor([0] * 30 + [1, 2]), steps=200)
    assert skewed[0] - skewed[1:].mean() > even[0] - even[1:].mean()


def test_fp16_latents_round_off_is_below_what_mixed_precision_rounds_anyway(tiny_sd, sd_data, tmp_path):
    """Latents are cached in float16: x0's relative round-off is ~2^-11, four times below bfloat16's 2^-9, which
    a bf16 run applies to the UNet's input anyway, and the UNet's prediction moves by less than that too."""
    backbone = StableDiffusionBackbone.from_pretrained(tiny_sd)
    images = ImageFiles(load_dataset(sd_data), 32)
    pixels = next(images.batches(range(20), 20))
    exact = backbone.cache_images(pixels)
    cached = training_latents(backbone, images, random_flip=False, cache_dir=tmp_path)[0][:]
    x0, x0_fp16, x0_bf16 = (backbone.x0_mean(m) for m in (exact, cached.float(), exact.bfloat16().float()))
    error_fp16, error_bf16 = ((x - x0).norm() / x0.norm() for x in (x0_fp16, x0_bf16))
    assert error_fp16 < 5e-4 and error_fp16 < error_bf16 / 3, (error_fp16, error_bf16)
    t = torch.full((20,), 500)
    cond = backbone.text_encoder.encode(["An image of Chen."] * 20).states
    with torch.no_grad():
        predicted = [backbone.denoiser(x, t, encoder_hidden_states=cond).sample for x in (x0, x0_fp16, x0_bf16)]
    moved_fp16, moved_bf16 = ((p - predicted[0]).norm() / predicted[0].norm() for p in predicted[1:])
    assert moved_fp16 < moved_bf16, (moved_fp16, moved_bf16)


def test_unet_neighbour_features_are_shared_by_full_and_lora_runs_of_any_seed(tiny_sd, sd_data, tmp_path):
    cache = tmp_path / "cache"
    common = ["--pretrained", tiny_sd, "--method", "pogdiff", "--k", 3]
    for options in ([], ["--lora-rank", 4], ["--lora-rank", 4, "--seed", 1], ["--seed", 2]):
        assert encode_cli(sd_data, cache, *common, *options) == 0
    assert len(list(cache.glob("image-features-*"))) == 1 and len(list(cache.glob("neighbours-*"))) == 1
    assert len(folders(cache, "latents")) == 1 and len(folders(cache, "text")) == 1
    assert len(list(cache.glob("text-density-*"))) == 3  # the VAE of Eq. 10 is fitted with the run's seed


def test_two_processes_each_encode_their_shards(toy_data, tmp_path, four_row_shards):
    cache = tmp_path / "cache"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1", "PYTHONPATH": str(SRC),
           "POGDIFF_SHARD_ROWS": "4"}
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
              "--num_cpu_threads_per_process", "1", "--main_process_port", str(free_port()),
              "-m", "pogdiff.cli", "encode", toy_data, "--method", "pogdiff", "--cache-dir", cache, "--no-progress"]
    done = subprocess.run([str(a) for a in launch], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    for kind, shards in (("latents", 5), ("image-features", 5), ("text", 2)):
        writers = [shards_module._open(path)[0]["written_by"] for path in shard_files(cache, kind)]
        assert writers == [f"process {s % 2} of 2" for s in range(shards)], kind
    assert len(list(cache.glob("neighbours-*"))) == 1 and len(list(cache.glob("text-density-*"))) == 1
    # the tables are those one process computes
    assert encode_cli(toy_data, tmp_path / "one", "--method", "pogdiff") == 0
    for kind in ("latents", "image-features", "text"):
        for two, one in zip(shard_files(cache, kind), shard_files(tmp_path / "one", kind)):
            a, b = shards_module._open(two)[1], shards_module._open(one)[1]
            assert all(np.allclose(a[n].read(), b[n].read(), atol=1e-5) for n in a), (kind, two.name)
