"""`--dry-run` on train, encode and benchmark: the plan is printed, nothing is written, and the cache size it
announces is what encoding then writes."""

import re

import pytest
from conftest import write_toy_dataset

from pogdiff.cli import main
from pogdiff.backbones.random_pipeline import write_random_pipeline

UNITS = {"B": 1, "KB": 1e3, "MB": 1e6, "GB": 1e9}


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory):
    return write_random_pipeline(tmp_path_factory.mktemp("dry-sd") / "sd", "tiny")


def tree(root):
    return sorted((str(p), p.stat().st_mtime_ns) for p in root.rglob("*"))


def announced(text: str, table: str) -> float:
    value, unit = re.search(rf"{table} ([\d.]+) (B|KB|MB|GB)", text).groups()
    return float(value) * UNITS[unit]


def test_dry_runs_write_nothing_and_announce_the_cache_encoding_writes(tiny_sd, tmp_path, capsys):
    data = write_toy_dataset(tmp_path / "data")
    cache = tmp_path / "cache"
    before = tree(tmp_path)
    common = ["--pretrained", str(tiny_sd), "--method", "pogdiff", "--cache-dir", str(cache), "--no-progress"]
    assert main(["train", str(data), "--output-dir", str(tmp_path / "run"), "--lora-rank", "4", "--preset",
                 "paper-large", "--validation-prompts", "An image of Chen.", "--dry-run", *common]) == 0
    plan = capsys.readouterr().out
    assert "20 rows, 8 distinct captions, 3 identities (1 Few" in plan
    assert "12000 optimizer steps of 32 images (8 x 4 accumulation x 1 process)" in plan
    assert "96 validation images" in plan  # every 500 steps and at the end: 24 rounds x 1 prompt x 4 images
    assert re.search(r"estimated on one NVIDIA H100, bf16: training [\d.]+ (s|min|h)", plan)
    assert main(["encode", str(data), "--dry-run", *common]) == 0
    assert main(["benchmark", "--data", str(data), "--out", str(tmp_path / "bench"), "--pretrained", str(tiny_sd),
                 "--methods", "vanilla", "pogdiff", "--seeds", "0", "1", "--dry-run"]) == 0
    bench = capsys.readouterr().out
    assert "2 methods x 2 seeds = 4, each 300 steps of 16 images, then 24 images sampled" in bench
    assert tree(tmp_path) == before  # no run, cache, or benchmark folder

    assert main(["encode", str(data), *common]) == 0
    for table, folder in (("latents", "latents-*"), ("caption states", "text-[0-9a-f]*"),
                          ("image features", "image-features-*"), ("neighbours", "neighbours-*")):
        written = sum(f.stat().st_size for f in cache.glob(f"{folder}") for f in ([f] if f.is_file() else f.rglob("*")))
        assert abs(announced(plan, table) - written) <= 0.05 * written + 1024, (table, written)


def test_a_dry_run_checks_the_options(tmp_path, capsys):
    data = write_toy_dataset(tmp_path / "data")
    assert main(["train", str(data), "--output-dir", str(tmp_path / "run"), "--lora-rank", "4", "--dry-run"]) == 2
    assert "pass --pretrained" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
