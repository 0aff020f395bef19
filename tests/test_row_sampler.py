"""The row sampler (--sampler): balanced rows for every method, and resample = vanilla + balanced."""

import json

import pytest
import torch
from test_losses import make_tables

from pogdiff.cli import main
from pogdiff.encode.encoded_dataset import EncodedDataset
from pogdiff.errors import PogdiffError
from pogdiff.training.row_sampler import batch_rows, row_weights
from pogdiff.training.train import TrainConfig, check_options, sampler_of


def test_balanced_sampler_gives_every_identity_the_same_share():
    tables = make_tables()
    tables.identity = torch.tensor([0, 0, 0, 1])
    weights = row_weights("balanced", tables)
    assert torch.allclose(weights, torch.tensor([1 / 6, 1 / 6, 1 / 6, 1 / 2]))
    drawn = torch.cat([batch_rows(4, 2, step, seed=0, weights=weights) for step in range(2000)])
    assert abs((drawn == 3).float().mean().item() - 0.5) < 0.03  # the lone image is half of what is seen
    assert row_weights("uniform", tables) is None


def test_balanced_sampler_without_identities_follows_inverse_text_density():
    tables = make_tables()
    tables.identity = torch.arange(4)  # no identity column: every row is its own identity
    density = torch.exp(-tables.elbo)
    assert torch.allclose(row_weights("balanced", tables), density / density.sum())
    tables.elbo = torch.tensor([-10.0, 0.0, 0.0, 0.0])  # one outlier caption is clipped at 10x the median
    assert torch.allclose(row_weights("balanced", tables, density_max_ratio=10.0),
                          torch.tensor([10.0, 1.0, 1.0, 1.0]) / 13)


def test_resample_implies_the_balanced_sampler_and_any_method_takes_one():
    assert sampler_of(TrainConfig("", "", method="resample")) == "balanced"
    assert sampler_of(TrainConfig("", "", method="pogdiff")) == "uniform"
    assert sampler_of(TrainConfig("", "", method="cbdm", sampler="balanced")) == "balanced"
    with pytest.raises(PogdiffError, match="--method resample implies --sampler balanced"):
        check_options(TrainConfig("", "", method="resample", sampler="uniform"))
    with pytest.raises(PogdiffError, match="--density-max-ratio applies to the balanced sampler"):
        check_options(TrainConfig("", "", method="pogdiff", density_max_ratio=5.0))
    check_options(TrainConfig("", "", method="resample", density_max_ratio=5.0))
    check_options(TrainConfig("", "", method="cbdm", sampler="balanced", density_max_ratio=5.0))


@pytest.mark.parametrize("method, argv", [("pogdiff", ["--sampler", "balanced"]), ("resample", [])])
def test_balanced_rows_train_on_the_minority_as_often(method, argv, toy_data, tmp_path, cache_dir, capsys):
    run = tmp_path / "run"
    code = main(["train", str(toy_data), "--output-dir", str(run), "--method", method, *argv,
                 "--max-train-steps", "6", "--train-batch-size", "4", "--log-rows", "--cache-dir", str(cache_dir),
                 "--no-progress"])
    assert code == 0, capsys.readouterr().err
    config = json.loads((run / "pogdiff_run.json").read_text())["config"]
    assert config["method"] == method  # resample records no --sampler: its method implies the balanced one
    assert sampler_of(TrainConfig("", "", method=method, sampler=config["sampler"])) == "balanced"
    lines = [json.loads(line) for line in (run / "rows-rank0.jsonl").read_text().splitlines()]
    rows = torch.tensor([r for line in lines if "rows" in line for r in line["rows"]])
    # toy_data: 12 + 6 + 2 images; the two of the third identity are rows 18 and 19
    assert torch.equal(rows, torch.cat([batch_rows(20, 4, step, 0, row_weights("balanced", _identities()))
                                        for step in range(6)]))
    assert (rows >= 18).float().mean() > 0.15  # uniform shuffling would give them 10%


def _identities():
    return EncodedDataset.of_rows(torch.zeros(20, 1, 1), torch.zeros(1, 1), torch.tensor([0] * 12 + [1] * 6 + [2] * 2),
                          torch.zeros(20))
