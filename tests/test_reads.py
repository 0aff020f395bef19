"""Reads at scale: the row schedule, the training loop's read-ahead, and image decoding (workers, JPEG drafts).

Timings are in benchmarks/train_reads.py and benchmarks/encode_throughput.py, not here.
"""

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from pogdiff.training import train as train_module
from pogdiff.cli import main
from pogdiff.data.dataset import load_dataset, load_image
from pogdiff.data.image_files import ImageFiles, UnreadableImages, decode_workers
from pogdiff.encode.encoded_dataset import EncodedDataset
from pogdiff.training.row_sampler import RowSchedule, batch_rows
from pogdiff.encode.shards import ShardedCache
from pogdiff.training.train import TrainConfig, batch_reader, draw_batch, read_ahead


# --- the row schedule ---

def test_balanced_schedule_draws_rows_in_proportion_to_their_weights():
    weights = torch.tensor([0.1, 0.2, 0.3, 0.4, 0.0])
    schedule = RowSchedule(5, 5, seed=3, weights=weights)
    drawn = torch.cat([schedule[m] for m in range(4000)])
    counts = torch.bincount(drawn, minlength=5).double()
    expected = weights.double() * len(drawn)
    chi_square = ((counts[:4] - expected[:4]) ** 2 / expected[:4]).sum().item()
    assert counts[4] == 0 and chi_square < 16.3  # chi-square, 3 degrees of freedom: p = 0.001


@pytest.mark.parametrize("weights", [None, torch.tensor([1.0, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11])])
def test_schedule_rows_depend_only_on_seed_step_and_weights(weights):
    steps = [0, 1, 2, 7, 3, 30, 2, 0, 31]  # out of order, across epochs, again: as a resumed run asks
    one = RowSchedule(11, 3, seed=5, weights=weights)
    for m in steps:
        assert torch.equal(one[m], RowSchedule(11, 3, seed=5, weights=weights)[m])
        assert torch.equal(one[m], batch_rows(11, 3, m, 5, weights))
    assert not torch.equal(torch.cat([one[m] for m in range(3)]), torch.cat([one[m] for m in range(3, 6)]))


def test_uniform_schedule_is_the_seeded_epoch_shuffle_it_always_was():
    """The committed results' row order: randperm seeded with seed * 100003 + epoch, drop-last."""
    for m in range(9):
        epoch, position = divmod(m, 3)
        order = torch.randperm(10, generator=torch.Generator().manual_seed(2 * 100_003 + epoch))
        assert torch.equal(RowSchedule(10, 3, seed=2)[m], order[position * 3:(position + 1) * 3])


# --- reading ahead ---

def test_read_ahead_yields_what_reading_in_the_loop_does_and_raises_at_the_failing_step():
    def read(m):
        if m == 4:
            raise FileNotFoundError("shard-00004 removed")
        return m * 10

    assert list(read_ahead(read, range(2, 4), ahead=1)) == list(read_ahead(read, range(2, 4), ahead=0)) == [20, 30]
    for ahead in (0, 1, 2):
        reads = read_ahead(read, range(1, 9), ahead=ahead)
        assert [next(reads) for _ in range(3)] == [10, 20, 30]
        with pytest.raises(FileNotFoundError, match="shard-00004 removed"):
            next(reads)


def _on_disk(tmp_path, name, values):
    """``values`` as a table of memory-mapped shards of 4 rows, as the encode caches are."""
    cache = ShardedCache(tmp_path, name, {}, [str(i) for i in range(len(values))], rows_per_shard=4)
    cache.fill(lambda rows: {"x": values[rows.start:rows.stop]}, name, progress=False)
    return cache.open()["x"]


def test_batches_read_ahead_from_disk_equal_those_of_tables_held_in_memory(tmp_path):
    """Under --random-flip and caption dropout: the flips and drops are drawn at the step as before, so reading
    ahead (both variants of each row) changes no batch."""
    g = torch.Generator().manual_seed(0)
    plain, mirror = torch.randn(10, 2, 3, 3, generator=g).half(), torch.randn(10, 2, 3, 3, generator=g).half()
    states, caption_index = torch.randn(6, 4, 5, generator=g).half(), torch.tensor([0, 1, 2, 3, 4, 5, 0, 1, 2, 3])

    def encoded(table):
        return EncodedDataset(caption_index, table, torch.zeros(4, 5), torch.arange(10), torch.zeros(10))

    held = ([plain, mirror], encoded(states))
    on_disk = ([_on_disk(tmp_path, "plain", plain), _on_disk(tmp_path, "mirror", mirror)],
               encoded(_on_disk(tmp_path, "states", states)))
    config = TrainConfig("", "", random_flip=True, caption_dropout=0.5)
    backbone = SimpleNamespace(x0_from_cache=lambda cached: cached.float() * 2)
    process = SimpleNamespace(process_index=1, num_processes=2, device=torch.device("cpu"))
    schedule = RowSchedule(10, 4, seed=0, weights=torch.linspace(1, 2, 10))

    def batches(tables, ahead):
        torch.manual_seed(0)
        read = batch_reader(schedule, *tables, process)
        return [draw_batch(reads, backbone, *tables, config, "cpu") for reads in read_ahead(read, range(7), ahead)]

    expected = batches(held, 0)
    assert any(b.dropped.any() for b in expected) and not all(b.dropped.all() for b in expected)
    for tables, ahead in ((held, 1), (on_disk, 0), (on_disk, 1)):
        for got, want in zip(batches(tables, ahead), expected, strict=True):
            for field in ("x0", "cond", "index", "dropped"):
                assert torch.equal(getattr(got, field), getattr(want, field)), field


def test_training_reading_ahead_trains_the_same_weights_as_reading_in_the_loop(toy_data, tmp_path, cache_dir, capsys,
                                                                               monkeypatch):
    def weights_after(name):
        run = tmp_path / name
        code = main(["train", str(toy_data), "--output-dir", str(run), "--max-train-steps", "4", "--train-batch-size",
                     "4", "--gradient-accumulation-steps", "2", "--sampler", "balanced", "--random-flip",
                     "--log-rows", "--cache-dir", str(cache_dir), "--no-progress"])
        assert code == 0, capsys.readouterr().err
        return [json.loads(line) for line in (run / "rows-rank0.jsonl").read_text().splitlines()]

    ahead = weights_after("ahead")
    monkeypatch.setattr(train_module, "READ_AHEAD", 0)
    assert weights_after("in-loop") == ahead and "weights" in ahead[-1]


# --- decoding ---

def _jpeg(path, size=(600, 400), seed=0):
    coarse = np.random.default_rng(seed).integers(0, 256, (size[1] // 50, size[0] // 50, 3), dtype=np.uint8)
    Image.fromarray(coarse).resize(size, Image.BICUBIC).save(path, quality=90)


def test_jpeg_draft_decoding_changes_pixels_a_little_and_so_the_cache_key(tmp_path):
    _jpeg(tmp_path / "photo.jpg")
    full, drafted = (load_image(tmp_path / "photo.jpg", 32, draft=d).astype(int) for d in (False, True))
    difference = np.abs(full - drafted)
    assert difference.max() > 0 and difference.mean() < 1.0
    _jpeg(tmp_path / "other.jpg", seed=1)
    (tmp_path / "metadata.jsonl").write_text("".join(json.dumps({"file_name": f, "text": f}) + "\n"
                                                     for f in ("photo.jpg", "other.jpg")))
    transform = ImageFiles(load_dataset(tmp_path), 32).transform
    # the transform of full decoding, which caches written before draft decoding are keyed by
    assert transform != {"resolution": 32, "center_crop": True, "decoder": 1}


def test_decode_workers_default_to_the_cpus_per_local_process(monkeypatch):
    assert TrainConfig("", "").dataloader_num_workers is None
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(12)))
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert decode_workers(None) == 8  # capped
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert decode_workers(None) == 3
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "16")
    assert decode_workers(None) == 0  # fewer CPUs than processes: each decodes in its own
    assert decode_workers(0) == 0 and decode_workers(5) == 5  # --dataloader-num-workers wins


def test_decode_workers_serve_request_after_request_with_the_pixels_of_the_main_process(tmp_path):
    for i in range(5):
        _jpeg(tmp_path / f"{i}.jpg", seed=i)
    (tmp_path / "broken.jpg").write_bytes(b"not a jpeg")
    (tmp_path / "metadata.jsonl").write_text("".join(json.dumps({"file_name": f, "text": f}) + "\n"
                                                     for f in [*(f"{i}.jpg" for i in range(5)), "broken.jpg"]))
    dataset = load_dataset(tmp_path)
    serial, workers = ImageFiles(dataset, 16, num_workers=0), ImageFiles(dataset, 16, num_workers=2)
    for rows, batch in ((range(0, 3), 2), (range(3, 5), 3), (range(0, 5), 5)):  # one loader, three requests
        assert torch.equal(torch.cat(list(workers.batches(rows, batch))), torch.cat(list(serial.batches(rows, batch))))
    with pytest.raises(UnreadableImages, match="broken.jpg: cannot read this image"):
        list(workers.batches(range(6), 4))
    assert torch.equal(next(workers.batches(range(1, 2), 1)), next(serial.batches(range(1, 2), 1)))
    workers.close()
