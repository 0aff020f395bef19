"""`pogdiff benchmark --pretrained`: every cell fine-tunes a diffusers checkpoint (a tiny random one built here),
the table has its intervals, a killed benchmark continues, and other weights are refused."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import write_toy_dataset

from pogdiff.cli import main
from pogdiff.backbones.random_pipeline import write_random_pipeline


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory):
    return write_random_pipeline(tmp_path_factory.mktemp("bench-sd") / "sd", "tiny")


def benchmark_argv(out, data, pretrained, cache):
    return ["benchmark", "--out", out, "--data", data, "--pretrained", pretrained, "--lora-rank", 4,
            "--methods", "vanilla", "pogdiff", "--seeds", 0, 1, "--max-train-steps", 2, "--train-batch-size", 4,
            "--learning-rate", 1e-3, "--num-images", 2, "--num-inference-steps", 2, "--cache-dir", cache,
            "--no-progress"]


def test_a_benchmark_on_a_diffusers_checkpoint_resumes_after_a_kill(tiny_sd, tmp_path, capsys):
    data = write_toy_dataset(tmp_path / "data")
    out, cache = tmp_path / "bench", tmp_path / "cache"
    argv = [str(a) for a in benchmark_argv(out, data, tiny_sd, cache)]
    first_cell = out / "eval" / "vanilla" / "seed-0" / "cell.json"
    child = subprocess.Popen([sys.executable, "-m", "pogdiff.cli", *argv], stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, env={**os.environ, "OMP_NUM_THREADS": "2"})
    while not first_cell.is_file() and child.poll() is None:
        time.sleep(0.2)
    child.send_signal(signal.SIGKILL)  # no chance to clean up: the next cell is left half done
    child.wait()
    assert first_cell.is_file(), child.stderr.read().decode()[-2000:]
    stamp = first_cell.stat().st_mtime_ns
    trained_first = (out / "runs" / "vanilla" / "seed-0" / "pogdiff_run.json").stat().st_mtime_ns

    assert main(argv) == 0, capsys.readouterr().err
    assert first_cell.stat().st_mtime_ns == stamp  # a finished cell is not run again
    assert (out / "runs" / "vanilla" / "seed-0" / "pogdiff_run.json").stat().st_mtime_ns == trained_first
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["methods"]["pogdiff"]["few"]["id_acc"]["n"] == 2
    assert metrics["methods"]["pogdiff"]["all"]["fd"]["half_width"] is not None
    assert list(metrics["paired_vs_vanilla"]["pogdiff"]["few.id_acc"]["per_seed"]) in (["0", "1"], [0, 1])
    table = (out / "benchmark.md").read_text()
    assert "| pogdiff |" in table and " ± " in table and "LoRA rank 4" in table
    backbone = json.loads((out / "benchmark.json").read_text())["backbone"]
    assert backbone["name"] == str(tiny_sd.resolve()) and len(backbone["sha256"]) == 64
    for spec in ("vanilla", "pogdiff"):
        for seed in (0, 1):
            cell = json.loads((out / "eval" / spec / f"seed-{seed}" / "cell.json").read_text())
            assert cell["backbone"] == backbone
            run = json.loads((out / "runs" / spec / f"seed-{seed}" / "pogdiff_run.json").read_text())
            assert run["config"]["lora_rank"] == 4 and run["config"]["pretrained"] == str(tiny_sd.resolve())

    # The same path holding other weights: refused before any work, nothing of the benchmark touched.
    other = write_random_pipeline(tmp_path / "other" / "sd", "tiny", seed=1)
    os.rename(tiny_sd, tmp_path / "moved-sd")
    os.rename(other, tiny_sd)
    try:
        before = sorted((p, p.stat().st_mtime_ns) for p in out.rglob("*"))
        capsys.readouterr()
        assert main(argv) == 2
        error = capsys.readouterr().err
        assert "other settings (backbone weights:" in error and len(error.strip().splitlines()) == 1
        assert sorted((p, p.stat().st_mtime_ns) for p in out.rglob("*")) == before
    finally:
        os.rename(tiny_sd, other)
        os.rename(tmp_path / "moved-sd", tiny_sd)


def test_a_benchmark_refuses_a_wrong_model_folder_before_writing(tmp_path, capsys):
    data = write_toy_dataset(tmp_path / "data")
    not_a_model = tmp_path / "weights"
    not_a_model.mkdir()
    argv = [str(a) for a in benchmark_argv(tmp_path / "bench", data, not_a_model, tmp_path / "cache")]
    assert main(argv) == 2
    error = capsys.readouterr().err
    assert "not a diffusers pipeline folder (no model_index.json)" in error and len(error.strip().splitlines()) == 1
    assert not (tmp_path / "bench").exists()


def test_two_processes_run_every_cell_together_and_report_once(tiny_sd, tmp_path):
    """Under `accelerate launch` each cell trains on both processes (a global batch of 2 x 2) and samples its images
    split between them; the main process alone writes the cells and the report, which equal one process's."""
    from test_scale import SRC, free_port

    data = write_toy_dataset(tmp_path / "data")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1", "PYTHONPATH": str(SRC)}
    launch = ["-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
              "--mixed_precision", "no", "--dynamo_backend", "no", "--num_cpu_threads_per_process", "1",
              "--main_process_port", free_port(), "-m", "pogdiff.cli"]
    argv = benchmark_argv(tmp_path / "two", data, tiny_sd, tmp_path / "cache")
    argv[argv.index("--seeds") + 1:argv.index("--seeds") + 3] = [0]
    argv[argv.index("--train-batch-size") + 1] = 2
    done = subprocess.run([sys.executable, *map(str, launch + argv)], env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("written: ") == 1 and done.stdout.count("[2/2] pogdiff, seed 0") == 1
    for method in ("vanilla", "pogdiff"):
        run = json.loads((tmp_path / "two" / "runs" / method / "seed-0" / "pogdiff_run.json").read_text())
        assert run["num_processes"] == 2
    samples = sorted((tmp_path / "two" / "eval" / "pogdiff" / "seed-0" / "samples").rglob("*.png"))
    assert len(samples) == 3 * 2  # every identity's 2 images, whichever process drew them
    metrics = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert metrics["paired_vs_vanilla"]["pogdiff"]["few.id_acc"]["n"] == 1
