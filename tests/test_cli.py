"""The command line on the tiny preset (bad input: tests/test_bad_input.py)."""

import json
import math

from pogdiff.cli import main
from pogdiff.training.ownership import MARK_FILE


def run_cli(capsys, *argv):
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_cli_chain_on_the_small_preset(small_synth, tmp_path, capsys):
    data, cache = tmp_path / "data", small_synth[1]
    assert run_cli(capsys, "data", "synth", data, "--preset", "small")[0] == 0
    runs = []
    for method in ("vanilla", "pogdiff"):
        run = tmp_path / method
        code, _, err = run_cli(capsys, "train", data, "--method", method, "--output-dir", run, "--max-train-steps", 3,
                               "--train-batch-size", 8, "--cache-dir", cache, "--no-progress")
        assert code == 0, err
        assert json.loads((run / "pogdiff_run.json").read_text())["config"]["method"] == method
        runs.append(run)
    code, out, err = run_cli(capsys, "sample", runs[1], "--prompt", "An image of somebody.", "--num-images", 2,
                             "--num-inference-steps", 2, "--out", tmp_path / "samples", "--no-progress")
    assert code == 0, err
    assert sorted(p.name for p in (tmp_path / "samples").iterdir()) == ["0000.png", "0001.png"]
    code, out, err = run_cli(capsys, "evaluate", *runs, "--data", data, "--out", tmp_path / "eval", "--num-images", 2,
                             "--num-inference-steps", 2, "--cache-dir", cache, "--no-progress")
    assert code == 0, err
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert set(metrics["methods"]) == {"vanilla", "pogdiff"}
    for result in metrics["methods"].values():
        assert all(math.isfinite(result[split][key]) for split in ("all", "few") for key in ("fd", "sim", "id_acc"))
    assert set(metrics["calibration"]) == {"real (held-out)", "real (look-alike)"}
    assert metrics["num_identities"] == {"all": 2, "few": 1}
    assert (tmp_path / "eval" / "samples-pogdiff.png").is_file()
    assert "| vanilla |" in out


def test_demo_prints_both_methods_and_reuses_finished_steps(small_synth, tmp_path, capsys):
    out, cache = tmp_path / "demo", small_synth[1]
    argv = ("demo", "--out", out, "--preset", "small", "--max-train-steps", 2, "--num-images", 1,
            "--num-inference-steps", 2, "--cache-dir", cache, "--no-progress")
    code, printed, err = run_cli(capsys, *argv)
    assert code == 0, err
    assert "| vanilla |" in printed and "| pogdiff |" in printed and "DDIM 2 steps" in printed
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["methods"]) == {"vanilla", "pogdiff"}
    assert (out / "samples-vanilla.png").is_file() and (out / "report.html").is_file()
    weights = {m: (out / "runs" / m / "unet" / "diffusion_pytorch_model.safetensors").stat().st_mtime_ns
               for m in ("vanilla", "pogdiff")}
    assert run_cli(capsys, *argv)[0] == 0
    assert {m: (out / "runs" / m / "unet" / "diffusion_pytorch_model.safetensors").stat().st_mtime_ns
            for m in weights} == weights


def test_demo_refuses_a_folder_that_is_not_a_demo(tmp_path, capsys):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    code, _, err = run_cli(capsys, "demo", "--out", tmp_path / "mine", "--no-progress")
    assert code != 0 and "not a pogdiff demo folder" in err
    assert [p.name for p in (tmp_path / "mine").iterdir()] == ["notes.txt"]


def test_train_refuses_a_folder_that_holds_another_run(toy_data, tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / MARK_FILE).write_text("")
    (run / "pogdiff_run.json").write_text("{}")
    code, _, err = run_cli(capsys, "train", toy_data, "--output-dir", run, "--max-train-steps", 1, "--no-progress")
    assert code == 2 and "already holds a run" in err and "--overwrite" in err
    assert (run / "pogdiff_run.json").read_text() == "{}"
