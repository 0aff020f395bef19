"""Storage: a cache disk too small or filling up, shards found by what they hold (not where their rows are),
shards verified once, image hashes remembered by ctime too, and folders locked where flock is missing."""

import errno
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import warnings
from collections import namedtuple
from pathlib import Path

import pytest
import torch

from pogdiff.cli import main
from pogdiff.data.dataset import load_dataset
from pogdiff.data.image_files import file_digests
from pogdiff.encode import shards as shards_module
from pogdiff.encode.shards import VERIFIED_FILE, ShardedCache
from pogdiff.errors import PogdiffError, PogdiffWarning
from pogdiff.training import ownership
from pogdiff.training.ownership import claimed, entries, lock_file, refuse_if_in_use

SRC = Path(__file__).resolve().parents[1] / "src"


# --- helpers ---

def keys(n, prefix="row"):
    return [f"{prefix}-{i}" for i in range(n)]


def value_of(key: str) -> torch.Tensor:
    """A row's value, a function of its key only (as latents are of their image's bytes)."""
    return torch.full((2, 3), float(int(key.rsplit("-", 1)[1])))


class Encoder:
    """compute() for a ShardedCache over ``row_keys``: counts the rows it encodes."""

    def __init__(self, row_keys):
        self.row_keys, self.rows = row_keys, 0

    def __call__(self, rows: range):
        self.rows += len(rows)
        return {"x": torch.stack([value_of(self.row_keys[i]) for i in rows])}


def fill(folder, row_keys, rows_per_shard=4, kind="latents"):
    """A table's cache filled; the rows it encoded and the table read back."""
    cache = ShardedCache(folder, kind, {"encoder": "e"}, row_keys, rows_per_shard=rows_per_shard)
    encoder = Encoder(row_keys)
    cache.fill(encoder, kind, progress=False)
    table = cache.open()["x"]
    assert torch.equal(table[:], torch.stack([value_of(k) for k in row_keys]))  # the right rows, in order
    return encoder.rows, cache


def shard_files(folder):
    return sorted(folder.glob("*/shard-*.safetensors"))


def wait_for_the_clock(path: Path) -> None:
    """Return once a file changed now gets another ctime than ``path`` has (the kernel's file clock is coarse)."""
    probe = path.with_name(".clock-probe")
    while True:
        probe.write_bytes(b"")
        if probe.stat().st_ctime_ns > path.stat().st_ctime_ns:
            probe.unlink()
            return


def rewrite_in_place_keeping_size_and_mtime(path: Path, data: bytes) -> None:
    """Overwrite ``path``'s bytes in place (same inode, same size) and put its mtime back: only the ctime tells."""
    stat = path.stat()
    assert len(data) == stat.st_size
    wait_for_the_clock(path)
    with open(path, "r+b") as file:
        file.write(data)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    after = path.stat()
    assert (after.st_size, after.st_mtime_ns, after.st_ino) == (stat.st_size, stat.st_mtime_ns, stat.st_ino)


def encode_cli(data, cache, *options):
    return main([str(a) for a in ["encode", data, "--cache-dir", cache, "--no-progress", "--method", "vanilla",
                                  *options]])


def one_line(capsys):
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and err.startswith("pogdiff: error: "), err
    return err.strip()


# --- 1. a disk too small for the cache: refused before the rest is computed ---

def test_a_cache_the_disk_cannot_hold_is_refused_after_its_first_shard_is_computed(tmp_path, monkeypatch):
    Usage = namedtuple("Usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: Usage(10**9, 10**9 - 40_000, 40_000))
    cache = ShardedCache(tmp_path, "latents", {"encoder": "e"}, keys(40), rows_per_shard=4)
    encoder = Encoder(keys(40))
    with pytest.raises(PogdiffError) as refused:
        cache.fill(encoder, "latents", progress=False)
    # 40 rows of 2x3 float32, 24 bytes each, and a 4 kB block per shard for its header: the first shard would fit
    assert str(refused.value) == (f"{cache.folder}: the 40 rows left to encode of this latents cache need about "
                                  "41.9 kB, 40.0 kB free; free space or pass --cache-dir on a larger disk")
    assert encoder.rows == 4 and shard_files(tmp_path) == []  # one shard computed, none written


def test_encode_on_a_really_small_disk_is_one_line_before_the_rest_is_encoded(toy_data, small_disk, capsys,
                                                                             monkeypatch):
    cache = small_disk("48k")  # the 20 toy images' pixels alone are 61 kB (one shard: and its header)
    computed = []
    write = ShardedCache._write
    monkeypatch.setattr(ShardedCache, "_write", lambda self, shard, *a: (computed.append(shard),
                                                                         write(self, shard, *a)))
    assert encode_cli(toy_data, cache) == 2
    err = one_line(capsys)
    assert err.startswith(f"pogdiff: error: {cache}/latents-"), err
    assert ": the 20 rows left to encode of this latents cache need about 65.5 kB, " in err, err
    assert err.endswith("free; free space or pass --cache-dir on a larger disk")
    assert computed == [] and not list(cache.glob("*/shard-*")) and not list(cache.rglob("*.tmp"))


# --- 2. a write that fails later stops the encode in one line; no shard is kept in memory ---

@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT, errno.EROFS],
                         ids=["ENOSPC", "EDQUOT", "EROFS"])
def test_a_shard_that_cannot_be_written_stops_the_encode_in_one_line(tmp_path, monkeypatch, code):
    save, saved = shards_module.save_file, []

    def fails_on_the_second(tensors, path, metadata=None):
        if saved:
            Path(path).write_bytes(b"partial")
            raise OSError(code, os.strerror(code))
        saved.append(path)
        save(tensors, path, metadata=metadata)

    monkeypatch.setattr(shards_module, "save_file", fails_on_the_second)
    row_keys = keys(20)
    cache = ShardedCache(tmp_path, "latents", {"encoder": "e"}, row_keys, rows_per_shard=4)
    encoder = Encoder(row_keys)
    with pytest.raises(PogdiffError) as stopped:
        cache.fill(encoder, "latents", progress=False)
    fix = "free space or pass --cache-dir on a larger disk" if code != errno.EROFS else \
        "pass --cache-dir on a disk you can write to"
    assert str(stopped.value) == f"{cache.folder}: cannot write cache shard {cache.path(1).name} " \
                                 f"({os.strerror(code)}); {fix}"
    assert encoder.rows == 8  # the shard that failed, and no shard after it
    assert [p.name for p in shard_files(tmp_path)] == [cache.path(0).name]  # no partial file
    assert not hasattr(cache, "held")  # nothing kept in memory
    monkeypatch.setattr(shards_module, "save_file", save)
    rows, _ = fill(tmp_path, row_keys)  # space freed: the rerun encodes what is missing
    assert rows == 16


def test_a_disk_that_fills_up_while_encoding_stops_it_in_one_line(tmp_path, small_disk):
    disk = small_disk("64k")
    row_keys = keys(12)
    encoder = Encoder(row_keys)

    def fills_the_disk_after_the_first(rows):
        if rows.start == 4:  # another program fills the disk meanwhile
            fd = os.open(disk / "filler", os.O_WRONLY | os.O_CREAT)
            with pytest.raises(OSError) as full:
                while True:
                    os.write(fd, bytes(4096))
            os.close(fd)
            assert full.value.errno == errno.ENOSPC
        return encoder(rows)

    cache = ShardedCache(disk, "latents", {"encoder": "e"}, row_keys, rows_per_shard=4)
    with pytest.raises(PogdiffError) as stopped:
        cache.fill(fills_the_disk_after_the_first, "latents", progress=False)
    assert str(stopped.value) == f"{cache.folder}: cannot write cache shard {cache.path(1).name} (No space left on " \
                                 "device); free space or pass --cache-dir on a larger disk"
    assert encoder.rows == 8 and len(shard_files(disk)) == 1 and not list(disk.rglob("*.tmp"))


def test_encode_on_a_read_only_cache_disk_is_one_line(toy_data, small_disk, capsys):
    cache = small_disk("1m", read_only=True)
    assert encode_cli(toy_data, cache) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[0].endswith("image files will be hashed again next time (free space or pass --cache-dir)")
    assert len(lines) == 2 and "Traceback" not in lines[1]  # a warning, then the one line
    err = lines[1]
    assert err.startswith(f"pogdiff: error: {cache}/latents-") and "(Read-only file system)" in err
    assert err.endswith("pass --cache-dir on a disk you can write to")


# --- 3. a filesystem without flock: a lock file holding host and pid ---

@pytest.fixture
def no_flock(monkeypatch):
    def flock(fd, operation):
        raise OSError(errno.ENOSYS, "Function not implemented")

    monkeypatch.setattr(ownership.fcntl, "flock", flock)
    monkeypatch.setattr(ownership, "_warned_no_flock", False, raising=False)


def test_without_flock_a_lock_file_guards_the_folder_and_goes_with_its_writer(tmp_path, no_flock):
    run = tmp_path / "run"
    run.mkdir()
    with pytest.warns(PogdiffWarning, match="does not lock files with flock \\(Function not implemented\\)"):
        with claimed(run):
            holder = json.loads(lock_file(run).read_text())
            assert holder == {"host": socket.gethostname(), "pid": os.getpid()}
            assert entries(run) == []  # the mark and the lock are not the folder's contents
            with pytest.raises(PogdiffError, match=f"pogdiff process {os.getpid()} is writing into this folder now"):
                refuse_if_in_use(run)
            with pytest.raises(PogdiffError, match="is writing into this folder now; wait for it to end"):
                with claimed(run):
                    pass
    assert not lock_file(run).exists()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the warning is given once
        refuse_if_in_use(run)
        with claimed(run):
            pass


def test_without_flock_a_killed_writers_lock_is_taken_over_and_another_hosts_is_named(tmp_path, no_flock):
    run = tmp_path / "run"
    run.mkdir()
    hold = ("import errno, fcntl, sys, time\n"
            "def flock(fd, op): raise OSError(errno.ENOSYS, 'Function not implemented')\n"
            "fcntl.flock = flock\n"
            "from pogdiff.training.ownership import claimed\n"
            "with claimed(sys.argv[1]):\n"
            "    print('held', flush=True)\n"
            "    time.sleep(600)\n")
    holder = subprocess.Popen([sys.executable, "-W", "ignore", "-c", hold, str(run)], stdout=subprocess.PIPE,
                              text=True, env={**os.environ, "PYTHONPATH": str(SRC)})
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.warns(PogdiffWarning), pytest.raises(PogdiffError, match=f"pogdiff process {holder.pid} is "
                                                                              "writing into this folder now"):
            refuse_if_in_use(run)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert json.loads(lock_file(run).read_text())["pid"] == holder.pid  # left behind by the kill
    refuse_if_in_use(run)  # a stale lock: its process is gone from this host
    with claimed(run):
        assert json.loads(lock_file(run).read_text())["pid"] == os.getpid()
    lock_file(run).write_text(json.dumps({"host": "node-17", "pid": 4242}))
    with pytest.raises(PogdiffError) as refused:
        refuse_if_in_use(run)
    assert str(refused.value) == (f"{run}: pogdiff process 4242 on node-17 is writing into this folder now (its "
                                  f"lock: {lock_file(run)}); wait for it to end, or, if it is gone, remove "
                                  ".pogdiff-run.lock; or choose another --output-dir")


def test_without_flock_train_runs_and_leaves_no_lock(toy_data, tmp_path, no_flock, capsys):
    run = tmp_path / "run"
    code = main([str(a) for a in ["train", toy_data, "--output-dir", run, "--cache-dir", tmp_path / "cache",
                                  "--method", "vanilla", "--max-train-steps", 1, "--train-batch-size", 4,
                                  "--no-progress"]])
    err = capsys.readouterr().err
    assert code == 0, err
    assert "does not lock files with flock" in err and not lock_file(run).exists()


# --- 4. each shard verified once, recorded by its stat ---

def test_shards_are_verified_once_and_a_shard_rewritten_in_place_is_still_caught(tmp_path, monkeypatch):
    row_keys = keys(12)
    _, cache = fill(tmp_path, row_keys)
    hashed = []
    sha = shards_module.tensors_sha256
    monkeypatch.setattr(shards_module, "tensors_sha256", lambda tensors: (hashed.append(1), sha(tensors))[1])
    assert fill(tmp_path, row_keys)[0] == 0 and hashed == []  # just written: recorded, not read again

    (cache.folder / VERIFIED_FILE).unlink()  # e.g. a cache of an earlier version
    assert fill(tmp_path, row_keys)[0] == 0 and len(hashed) == 3  # the first start verifies each shard
    assert sorted(json.loads((cache.folder / VERIFIED_FILE).read_text())) == [p.name for p in shard_files(tmp_path)]
    hashed.clear()
    assert fill(tmp_path, row_keys)[0] == 0 and hashed == []  # the next one reads none

    shard = cache.path(1)
    data = shard.read_bytes()
    header = 8 + int.from_bytes(data[:8], "little")
    rewrite_in_place_keeping_size_and_mtime(shard, data[:header] + bytes(len(data) - header))
    with pytest.warns(PogdiffWarning, match="bytes changed since it was written"):
        rows, _ = fill(tmp_path, row_keys)
    assert rows == 4 and len(hashed) == 2  # that shard only: checked, then encoded again (its new sha256)


# --- 5. shards found by what they hold ---

def test_removing_or_adding_rows_encodes_about_one_shard(tmp_path):
    row_keys = keys(104)  # 26 shards of 4
    rows, cache = fill(tmp_path, row_keys)
    assert rows == 104 and cache.num_shards == 26
    fewer = row_keys[:10] + row_keys[11:]  # one line of metadata.jsonl removed (it encoded 95 rows again)
    assert fill(tmp_path, fewer)[0] == 3
    more = fewer[:50] + keys(2, "new") + fewer[50:]  # two rows added
    assert fill(tmp_path, more)[0] <= 4 + 2
    assert fill(tmp_path, row_keys)[0] == 0  # the first dataset again: all its shards are still there


def test_a_table_is_read_whatever_the_shard_size_it_was_written_with(tmp_path):
    row_keys = keys(30)
    assert fill(tmp_path, row_keys, rows_per_shard=8)[0] == 30
    rows, cache = fill(tmp_path, row_keys, rows_per_shard=4)
    assert rows == 0 and [len(r) for r, _ in cache.layout] == [8, 8, 8, 6]


def test_removing_a_line_of_metadata_encodes_one_shard_again(toy_data, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("POGDIFF_SHARD_ROWS", "4")
    cache, computed = tmp_path / "cache", {}
    write = ShardedCache._write

    def counted(self, shard, tensors, writer):
        computed[self.kind] = computed.get(self.kind, 0) + len(self.rows(shard))
        write(self, shard, tensors, writer)

    monkeypatch.setattr(ShardedCache, "_write", counted)
    assert encode_cli(toy_data, cache) == 0
    assert computed["latents"] == 20
    lines = (toy_data / "metadata.jsonl").read_text().splitlines()
    (toy_data / "metadata.jsonl").write_text("\n".join(lines[:5] + lines[6:]) + "\n")  # row 6: in the second shard
    computed.clear()
    assert encode_cli(toy_data, cache) == 0
    assert computed == {"latents": 3}  # the second shard's other rows; the text shards hold distinct captions

    monkeypatch.delenv("POGDIFF_SHARD_ROWS")  # `train` without the size `encode` was given: nothing encoded
    computed.clear()
    assert main([str(a) for a in ["train", toy_data, "--output-dir", tmp_path / "run", "--cache-dir", cache,
                                  "--method", "vanilla", "--max-train-steps", 1, "--train-batch-size", 4,
                                  "--no-progress"]]) == 0, \
        capsys.readouterr().err
    assert computed == {}


# --- 6. image hashes remembered by ctime too ---

def test_an_image_rewritten_in_place_with_its_size_and_mtime_put_back_is_hashed_again(toy_data, tmp_path):
    dataset = load_dataset(toy_data)
    before = file_digests(dataset, tmp_path / "cache")
    image = toy_data / dataset.files[3]
    data = image.read_bytes()
    rewrite_in_place_keeping_size_and_mtime(image, data[:-20] + bytes(20))
    after = file_digests(dataset, tmp_path / "cache")
    assert after[3] != before[3] and after[:3] == before[:3] and after[4:] == before[4:]
