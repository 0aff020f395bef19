"""Scale: exact neighbour search by faiss or torch in chunks, and training on two processes.

Timings and peak memory at 10k/100k rows are in benchmarks/neighbours_density.py, not here.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import training_loss

from pogdiff.objectives import neighbours as neighbours_module
from pogdiff.backbones.backbone import load_backbone
from pogdiff.cli import main
from pogdiff.data.dataset import load_dataset
from pogdiff.objectives.neighbours import find_neighbours
from pogdiff.data.image_files import ImageFiles, read_images
from pogdiff.encode.encoded_dataset import encode_dataset
from pogdiff.training.row_sampler import batch_rows

SRC = Path(__file__).resolve().parents[1] / "src"


def clustered(n, dim, seed=0):
    """Points around 20 centres, as image features of a few identities are; some exact duplicates."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(20, dim, generator=g)
    x = centres[torch.randint(20, (n,), generator=g)] + 0.5 * torch.randn(n, dim, generator=g)
    x[10] = x[3]
    x[11] = x[3]
    return x


@pytest.mark.parametrize("n, dim, k", [(600, 48, 10), (50, 8, 49)])
def test_faiss_and_torch_find_the_same_neighbours_in_small_chunks(n, dim, k, monkeypatch):
    pytest.importorskip("faiss")
    monkeypatch.setattr(neighbours_module, "_QUERY_CHUNK", 37)  # many chunks, one ragged
    monkeypatch.setattr(neighbours_module, "_BLOCK_ELEMENTS", 53 * n)
    x = clustered(n, dim)
    by_faiss, by_torch = find_neighbours(x, k, "faiss"), find_neighbours(x, k, "torch")
    assert torch.allclose(by_faiss.similarity, by_torch.similarity, atol=1e-5)
    assert (by_faiss.index == by_torch.index).float().mean() > 0.9  # the rest: ties (the duplicates)
    cosine = torch.nn.functional.normalize(x, dim=1) @ torch.nn.functional.normalize(x, dim=1).T
    for table in (by_faiss, by_torch):
        assert torch.allclose(cosine.gather(1, table.index), table.similarity, atol=1e-5)  # true pairs
        assert (table.index != torch.arange(n)[:, None]).all()  # never itself, even beside exact duplicates
        assert (table.similarity[:, :-1] >= table.similarity[:, 1:] - 1e-6).all()
    assert set(by_faiss.index[3, :2].tolist()) == {10, 11} and torch.allclose(by_faiss.similarity[3, :2],
                                                                               torch.ones(2))


def test_auto_backend_is_faiss_when_installed_else_torch(monkeypatch):
    pytest.importorskip("faiss")
    used = []
    for name in ("_search_faiss", "_search_torch"):
        search = getattr(neighbours_module, name)
        monkeypatch.setattr(neighbours_module, name,
                            lambda x, k, name=name, search=search: used.append(name) or search(x, k))
    x = clustered(40, 8)
    find_neighbours(x, 5)
    real_find_spec = neighbours_module.importlib.util.find_spec
    monkeypatch.setattr(neighbours_module.importlib.util, "find_spec",
                        lambda name, *a: None if name == "faiss" else real_find_spec(name, *a))
    find_neighbours(x, 5)
    assert used == ["_search_faiss", "_search_torch"]
    with pytest.raises(ValueError, match="unknown neighbour backend"):
        find_neighbours(x, 5, backend="annoy")


# --- two processes ---

def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def row_log(run, rank):
    records = [json.loads(line) for line in (run / f"rows-rank{rank}.jsonl").read_text().splitlines()]
    return {"tables": [r["tables"] for r in records if "tables" in r],
            "steps": {r["micro_step"]: r["rows"] for r in records if "micro_step" in r},
            "weights": [r["weights"] for r in records if "weights" in r]}


def test_two_processes_split_each_global_batch_and_share_tables(toy_data, tmp_path, cache_dir, capsys):
    """``accelerate launch --num_processes 2`` with B per process against one process with 2B (docs/scale.md).

    Rows, tables and the synchronised weights are checked exactly. The draws of t, eps,
    caption dropout and neighbours come from each process's own RNG stream (seed + rank),
    so the two runs are the same training with other draws: their losses on the training
    images after 10 steps must agree within 20% (measured on this toy set, from the shipped
    weights at 0.237: one process 0.134, two processes 0.134).
    """
    common = ["--method", "pogdiff", "--max-train-steps", 10, "--cache-dir", cache_dir, "--no-progress", "--log-rows"]
    one = tmp_path / "one-process"
    assert main([str(a) for a in ["train", toy_data, "--output-dir", one, "--train-batch-size", 4, *common]]) == 0
    capsys.readouterr()

    two = tmp_path / "two-processes"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1", "PYTHONPATH": str(SRC)}
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
              "--num_cpu_threads_per_process", "1", "--main_process_port", str(free_port()),
              "-m", "pogdiff.cli", "train", toy_data, "--output-dir", two, "--train-batch-size", 2, *common]
    done = subprocess.run([str(a) for a in launch], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]

    ranks, single = [row_log(two, 0), row_log(two, 1)], row_log(one, 0)
    assert json.loads((two / "pogdiff_run.json").read_text())["num_processes"] == 2
    assert ranks[0]["tables"] == ranks[1]["tables"] == single["tables"]  # text, neighbours, ELBO, psi
    assert set(ranks[0]["tables"][0]) >= {"neighbour_index", "neighbour_similarity", "elbo", "psi"}
    assert ranks[0]["weights"] == ranks[1]["weights"]  # gradients were averaged, not trained apart
    assert sorted(ranks[0]["steps"]) == sorted(single["steps"]) == list(range(1, 11))
    for step, rows in single["steps"].items():
        rank0, rank1 = ranks[0]["steps"][step], ranks[1]["steps"][step]
        assert len(rank0) == len(rank1) == 2 and not set(rank0) & set(rank1)  # distinct examples
        assert sorted(rank0 + rank1) == sorted(rows) == sorted(batch_rows(20, 4, step - 1, seed=0).tolist())

    dataset = load_dataset(toy_data)
    images = read_images(dataset, 32)
    one_backbone, two_backbone = load_backbone(one), load_backbone(two)
    tables = encode_dataset(dataset, one_backbone.text_encoder, ImageFiles(dataset, 32), cache_dir=cache_dir)
    loss_one, loss_two = training_loss(one_backbone, images, tables), training_loss(two_backbone, images, tables)
    assert abs(loss_two - loss_one) <= 0.2 * loss_one, (loss_one, loss_two)
