"""Several machines (docs/scale.md, "Several machines"): what is built into the cache folder is built once when
the machines share it, and by each machine for itself when they do not; temporary names never collide across
machines; two conversions of one --dataset-name at once both succeed.

The "machines" here are processes of this host that each believe they are a machine's first process
(LOCAL_RANK 0): two processes of one gloo group (RANK 0 and 1, LOCAL_WORLD_SIZE 1), or two processes with no
group at all (two launches). This file is also the worker they run (``python test_several_machines.py``).
"""

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
NAMES = ["Anna", "Bruno", "Chen"]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- temporary names ---

def test_temporary_names_differ_across_hosts_with_the_same_pid(monkeypatch, tmp_path):
    from pogdiff import files

    target = tmp_path / "latents-abc" / "shard-00000.safetensors"
    monkeypatch.setattr(files.os, "getpid", lambda: 4242)
    names = []
    for host in ("node-a", "node-b", "node-b", "Node B/x"):
        monkeypatch.setattr(files.socket, "gethostname", lambda host=host: host)
        names.append(files.temporary_path(target))
    assert len(set(names)) == len(names)  # another host, or the same host and pid again (a container)
    for name in names:
        assert name.parent == target.parent and name.name.startswith(f".{target.name}.") and name.suffix == ".tmp"
        assert ".4242." in name.name and "/" not in name.name[len(target.name):]
    assert "node-a" in names[0].name and "Node_B_x" in names[3].name  # whose it is, as a file name
    with files.atomic_path(tmp_path / "t.json") as tmp:  # every atomic write takes such a name
        assert tmp.name.startswith(".t.json.Node_B_x.4242.") and tmp.suffix == ".tmp"
        tmp.write_text("{}")
    assert [p.name for p in tmp_path.iterdir()] == ["t.json"]


def test_a_folder_renamed_second_keeps_the_first_and_replaces_a_damaged_one(tmp_path):
    from pogdiff.files import atomic_folder

    target = tmp_path / "converted"
    complete = lambda folder: (folder / "done").is_file()  # noqa: E731
    target.mkdir()
    (target / "done").write_text("theirs")
    with atomic_folder(target, complete) as tmp:  # another process renamed its own first
        tmp.mkdir()
        (tmp / "done").write_text("mine")
    assert (target / "done").read_text() == "theirs" and [p.name for p in tmp_path.iterdir()] == ["converted"]

    (target / "done").unlink()  # damaged: no mark of completion
    (target / "half").write_text("")
    with atomic_folder(target, complete) as tmp:
        tmp.mkdir()
        (tmp / "done").write_text("mine")
    assert sorted(p.name for p in target.iterdir()) == ["done"] and (target / "done").read_text() == "mine"
    assert [p.name for p in tmp_path.iterdir()] == ["converted"]

    with pytest.raises(ZeroDivisionError), atomic_folder(tmp_path / "failed", complete) as tmp:
        tmp.mkdir()
        1 / 0
    assert [p.name for p in tmp_path.iterdir()] == ["converted"]


# --- two processes at once ---

def saved_dataset(tmp_path):
    saved = tmp_path / "saved"
    saved.mkdir()
    (saved / "dataset_dict.json").write_text('{"splits": ["train"]}')
    return saved


def run_workers(tmp_path, mode, caches, group, extra_env=None):
    """Run one worker per cache folder at once; their results, and the pids of the conversions logged."""
    saved = saved_dataset(tmp_path)
    log = tmp_path / "conversions.log"
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1", "POGDIFF_SHARD_ROWS": "2",
           **(extra_env or {})}
    port = free_port()
    procs = []
    for rank, cache in enumerate(caches):
        worker_env = dict(env)
        for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                     "ACCELERATE_USE_CPU"):
            worker_env.pop(name, None)
        if group:  # two machines of one process each: both are local rank 0
            worker_env.update(RANK=str(rank), WORLD_SIZE=str(len(caches)), LOCAL_RANK="0", LOCAL_WORLD_SIZE="1",
                              MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), ACCELERATE_USE_CPU="1")
        out = tmp_path / f"result-{rank}.json"
        procs.append((subprocess.Popen([sys.executable, __file__, mode, str(saved), str(cache), str(out), str(log)],
                                       env=worker_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True),
                      out))
    results = []
    for proc, out in procs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-3000:]
        results.append(json.loads(out.read_text()))
    return results, log.read_text().split() if log.exists() else []


def written_by(shard):
    from safetensors import safe_open

    with safe_open(shard, "np") as file:
        return file.metadata()["written_by"]


def leftovers(folder):
    return [p for p in folder.rglob("*") if p.name.endswith(".tmp") or p.name.startswith(".probe-")]


def test_two_launches_converting_one_dataset_at_once_both_succeed(tmp_path):
    """Two processes with no group between them (two launches, or two machines that both think they are first)
    convert one --dataset-name into one cache folder at the same time (both are writing before either
    finishes): both end with the same complete folder (before: "Directory not empty" for the second)."""
    cache = tmp_path / "cache"
    results, conversions = run_workers(tmp_path, "convert", [cache, cache], group=False,
                                       extra_env={"POGDIFF_TEST_RENDEZVOUS": f"{tmp_path / 'started'},2"})
    assert len(conversions) == 2  # both converted, at once
    assert results[0] == results[1] and len(results[0]["files"]) == 1 + 2 * len(NAMES)
    assert [p.name for p in (cache / "datasets").iterdir()] == [Path(results[0]["folder"]).name]
    assert not leftovers(cache)


@pytest.mark.parametrize("layout", ["shared cache", "a cache per machine"])
def test_two_machines_build_once_when_they_share_the_cache_and_each_for_itself_when_not(layout, tmp_path):
    """Two processes of one gloo group, each the first of its "machine" (LOCAL_RANK 0), convert a --dataset-name
    and encode it (file digests, caption states in shards, text density). With one cache folder the dataset is
    converted once, by process 0; with a folder per machine each converts and encodes its own copy (the shards
    too: each machine encodes every shard). Both processes get the same tables either way."""
    caches = [tmp_path / "cache"] * 2 if layout == "shared cache" else [tmp_path / "cache-0", tmp_path / "cache-1"]
    results, conversions = run_workers(tmp_path, "encode", caches, group=True)
    assert len(conversions) == len(set(caches))
    assert results[0] == results[1]
    writers = []
    for cache in dict.fromkeys(caches):
        assert [p.name for p in (cache / "datasets").iterdir()] == [Path(results[0]["folder"]).name]
        shards = sorted(cache.glob("text-*/shard-*"))
        assert len(shards) == 2  # 3 distinct captions, 2 a shard: all on each disk
        writers.append(sorted(written_by(shard) for shard in shards))
    # shared: each process encoded its share; apart: each machine all of its own
    assert writers == ([["process 0 of 2", "process 1 of 2"]] if layout == "shared cache" else
                       [["process 0 of 2"] * 2, ["process 1 of 2"] * 2])
    for cache in dict.fromkeys(caches):
        assert list(cache.glob("text-density-*")) and list(cache.glob("file-digests-*"))
        assert not leftovers(cache)


def test_an_error_of_the_first_stage_stops_every_process_with_its_line(tmp_path):
    """The main process fails inside built_once_first: the other machine's first process does not run the block,
    nor wait for a stage that will not come; both stop with the main process's line."""
    results, _ = run_workers(tmp_path, "fail", [tmp_path / "cache"] * 2, group=True)
    assert results == [{"error": "CACHE/table: broken; compute it again"}] * 2


# --- the worker ---

def rendezvous():
    """Wait until every worker named by $POGDIFF_TEST_RENDEZVOUS (FOLDER,N) got here: all convert at once."""
    spec = os.environ.get("POGDIFF_TEST_RENDEZVOUS")
    if not spec:
        return
    folder, count = spec.rsplit(",", 1)
    Path(folder).mkdir(exist_ok=True)
    (Path(folder) / str(os.getpid())).touch()
    deadline = time.monotonic() + 120
    while len(list(Path(folder).iterdir())) < int(count):
        assert time.monotonic() < deadline, "the other worker never started converting"
        time.sleep(0.05)


def fake_datasets(log):
    """What hf_datasets uses of the datasets package; a slow dataset whose conversions are logged."""
    import types

    from PIL import Image

    class FakeImage:
        pass

    class Rows(list):
        def __iter__(self):
            rendezvous()
            for row in list.__iter__(self):
                time.sleep(0.05)
                yield row

    colours = [(220, 40, 40), (40, 200, 60), (40, 60, 220)]
    rows = Rows({"image": Image.new("RGB", (32, 32), colour), "text": f"An image of {name}.", "identity": name}
                for colour, name in zip(colours, NAMES) for _ in range(2))
    rows.features = {"image": FakeImage(), "text": "string", "identity": "string"}

    def load_from_disk(path):
        with open(log, "a") as file:
            file.write(f"{os.getpid()}\n")
        return {"train": rows}

    return types.SimpleNamespace(load_from_disk=load_from_disk, Image=FakeImage, ClassLabel=type("ClassLabel", (), {}))


def worker(mode, saved, cache, out, log):
    from pogdiff.data.hf_datasets import dataset_folder
    from pogdiff.errors import PogdiffError
    from pogdiff.files import sha256
    from pogdiff.processes import built_once_first, process_state

    if mode == "fail":
        try:
            with built_once_first():
                if process_state().is_main_process:
                    raise PogdiffError("CACHE/table: broken; compute it again")
                Path(out).write_text(json.dumps({"ran": "the block of a later stage"}))
        except PogdiffError as error:
            Path(out).write_text(json.dumps({"error": str(error)}))
        return end_process_group()

    sys.modules["datasets"] = fake_datasets(log)
    folder = dataset_folder(saved, cache_dir=cache)
    result = {"folder": folder.name,
              "files": {p.relative_to(folder).as_posix(): sha256(p) for p in sorted(folder.rglob("*")) if p.is_file()}}
    if mode == "encode":
        import torch

        from pogdiff.backbones.pixel import PixelBackbone
        from pogdiff.data.dataset import load_dataset
        from pogdiff.data.image_files import ImageFiles
        from pogdiff.encode.cache import tensor_digest
        from pogdiff.encode.encoded_dataset import encode_dataset

        dataset = load_dataset(folder)
        torch.manual_seed(0)
        text = PixelBackbone.create().text_encoder
        images = ImageFiles(dataset, 32, cache_dir=cache)
        with built_once_first():
            digests = images.file_digests
        encoded = encode_dataset(dataset, text, images, cache_dir=cache)
        result.update(digests=digests, elbo=tensor_digest(encoded.elbo), states=tensor_digest(
            encoded.caption_table.read_all()), captions=len(encoded.caption_table))
    Path(out).write_text(json.dumps(result))
    end_process_group()


def end_process_group():
    """As pogdiff.cli ends its process group at exit: gloo aborts a process ("terminate called without an active
    exception") that exits with its group alive while its peer still talks."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    worker(*sys.argv[1:])
