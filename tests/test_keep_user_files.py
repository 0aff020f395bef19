"""Nothing of the user's is lost, no silent mix-up (docs/bad-input.md, #62-#75): evaluate's --out, --overwrite,
resume options, checkpoint bytes, run folders inside the dataset, sample's --out, release folders, benchmark stops."""

import json
import os
import shutil
import stat

import pytest
from test_bad_input import assert_one_line_error, run_cli, snapshot

from pogdiff.compare import comparison
from pogdiff.backbones import sampling as sampling_module
from pogdiff.errors import Interrupted
from pogdiff.training.ownership import MARK_FILE

T = ["--max-train-steps", 3, "--train-batch-size", 2, "--no-progress"]
E = ["--num-images", 1, "--num-inference-steps", 2, "--no-progress"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A PoGDiff run of 3 steps on the toy set with checkpoint-2 and checkpoint-3, and the cache it filled."""
    from conftest import write_toy_dataset
    from pogdiff.cli import main

    root = tmp_path_factory.mktemp("trained")
    data, run, cache = write_toy_dataset(root / "data"), root / "run", root / "cache"
    assert main([str(a) for a in ["train", data, "--output-dir", run, "--cache-dir", cache, "--checkpointing-steps", 2,
                                  *T]]) == 0
    return data, run, cache


def copy_run(run, tmp_path):
    return shutil.copytree(run, tmp_path / "run", symlinks=True)


def test_evaluate_keeps_the_users_files_in_out(trained, tmp_path, capsys):
    data, run, cache = trained
    mine = tmp_path / "ev"
    mine.mkdir()
    (mine / "metrics.json").write_text('{"mine": 1}')
    (mine / "report.html").write_text("mine")
    before = snapshot(mine)
    code, _, err = run_cli(capsys, "evaluate", run, "--data", data, "--out", mine, "--cache-dir", cache, *E)
    assert_one_line_error(code, err, "metrics.json: already exists and `pogdiff evaluate` did not write it")
    assert snapshot(mine) == before
    dataset = snapshot(data)
    code, _, err = run_cli(capsys, "evaluate", run, "--data", data, "--out", data, "--cache-dir", cache, *E)
    assert_one_line_error(code, err, "--out is inside the dataset")
    assert snapshot(data) == dataset
    (tmp_path / "f").write_text("k")
    code, _, err = run_cli(capsys, "evaluate", run, "--data", data, "--out", tmp_path / "f", "--cache-dir", cache, *E)
    assert_one_line_error(code, err, "--out is a file; choose a folder")


def test_evaluate_replaces_its_own_outputs(trained, tmp_path, capsys):
    data, run, cache = trained
    for _ in range(2):  # the second time into its own --out
        code, _, err = run_cli(capsys, "evaluate", run, "--data", data, "--out", tmp_path / "ev", "--cache-dir", cache,
                               *E)
        assert code == 0, err


def test_overwrite_removes_only_what_train_wrote(trained, tmp_path, capsys):
    data, run, cache = trained
    own = copy_run(run, tmp_path)
    (own / "eval").mkdir()
    (own / "eval" / "metrics.json").write_text("{}")
    (own / "NOTES.md").write_text("n")
    code, _, err = run_cli(capsys, "train", data, "--output-dir", own, "--cache-dir", cache, "--overwrite", *T)
    assert code == 0, err
    assert (own / "NOTES.md").read_text() == "n" and (own / "eval" / "metrics.json").read_text() == "{}"
    assert not (own / "checkpoint-2").exists()  # the old run's own files are gone

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.md").write_text("x")
    shutil.copytree(run, mine, dirs_exist_ok=True)  # cp -a run/. mine/: the mark travels with the copy
    code, _, err = run_cli(capsys, "train", data, "--output-dir", mine, "--cache-dir", cache, "--overwrite", *T)
    assert code == 0, err
    assert (mine / "notes.md").read_text() == "x"


@pytest.mark.parametrize("change, expected", [
    (["--method", "vanilla"], "method (run: 'pogdiff', now: 'vanilla')"),
    (["--use-ema"], "use_ema (run: False, now: True)"),
    (["--max-train-steps", 1], "holds a run finished at step 3; pass a --max-train-steps above 3"),
    (["--other-data"], "the dataset's metadata.jsonl"),
])
def test_resume_with_other_options_or_data_is_refused_before_any_work(change, expected, trained, tmp_path, capsys):
    data, run, cache = trained
    own = copy_run(run, tmp_path)
    if change == ["--other-data"]:
        data = shutil.copytree(data, tmp_path / "other-data")
        lines = (data / "metadata.jsonl").read_text().splitlines()
        (data / "metadata.jsonl").write_text("\n".join(lines[:-1]) + "\n")
        change = []
    before = snapshot(own)
    code, _, err = run_cli(capsys, "train", data, "--output-dir", own, "--cache-dir", cache,
                           "--resume-from-checkpoint", "latest", *T, *change)
    assert_one_line_error(code, err, "checkpoint-3" if change != ["--max-train-steps", 1] else "run", expected)
    assert snapshot(own) == before  # psi.safetensors and the rest untouched


def test_resume_with_the_runs_own_options_goes_on(trained, tmp_path, capsys):
    data, run, cache = trained
    own = copy_run(run, tmp_path)
    code, _, err = run_cli(capsys, "train", data, "--output-dir", own, "--cache-dir", cache,
                           "--resume-from-checkpoint", "latest", "--max-train-steps", 4, *T[2:])
    assert code == 0, err
    assert json.loads((own / "pogdiff_run.json").read_text())["steps"] == 4


def test_a_checkpoint_whose_bytes_changed_is_refused(trained, tmp_path, capsys):
    data, run, cache = trained
    own = copy_run(run, tmp_path)
    optimizer = own / "checkpoint-3" / "optimizer.bin"
    payload = bytearray(optimizer.read_bytes())
    middle = len(payload) // 2
    payload[middle:middle + 4096] = bytes(min(4096, len(payload) - middle))  # still a whole zip: only the sha256 tells
    optimizer.write_bytes(bytes(payload))
    code, _, err = run_cli(capsys, "train", data, "--output-dir", own, "--cache-dir", cache,
                           "--resume-from-checkpoint", "latest", *T)
    assert_one_line_error(code, err, "checkpoint-3: optimizer.bin is damaged", "sha256", "start the run afresh")


def test_a_run_copied_without_its_mark_says_so(trained, tmp_path, capsys):
    data, run, cache = trained
    own = copy_run(run, tmp_path)
    (own / MARK_FILE).unlink()
    code, _, err = run_cli(capsys, "train", data, "--output-dir", own, "--cache-dir", cache,
                           "--resume-from-checkpoint", "latest", *T)
    assert_one_line_error(code, err, "holds checkpoint-2, checkpoint-3 but no .pogdiff-run (copied without its "
                                     "hidden files?)")


def test_logging_dir_is_owned_exactly_and_never_the_run_folder(trained, tmp_path, capsys):
    """#105: --overwrite --logging-dir eval/tb removed the user's eval/; --logging-dir . failed after training."""
    data, run, cache = trained
    own = copy_run(run, tmp_path)
    (own / "eval").mkdir()
    (own / "eval" / "metrics.json").write_text('{"mine": 1}')
    code, _, err = run_cli(capsys, "train", data, "--output-dir", own, "--cache-dir", cache, "--overwrite",
                           "--logging-dir", "eval/tb", *T)
    assert code == 0, err
    assert (own / "eval" / "metrics.json").read_text() == '{"mine": 1}'
    before = snapshot(own)
    for outside in [".", "..", "logs/../..", tmp_path / "elsewhere"]:
        code, _, err = run_cli(capsys, "train", data, "--output-dir", own, "--cache-dir", cache, "--overwrite",
                               "--logging-dir", outside, *T)
        assert_one_line_error(code, err, f"--logging-dir {outside}: not a folder inside --output-dir",
                              "pass a folder name such as logs")
        assert snapshot(own) == before and not (tmp_path / "elsewhere").exists()


def test_a_finished_run_is_continued_from_its_final_step_and_never_shortened(trained, tmp_path, capsys):
    """#106: the final step was not checkpointed, and a resume to fewer steps replaced the final weights."""
    data, run, cache = trained
    assert (run / "checkpoint-3").is_dir()  # the final step, so the run can be continued
    own = copy_run(run, tmp_path)
    before = snapshot(own)
    for steps in (2, 3):
        code, _, err = run_cli(capsys, "train", data, "--output-dir", own, "--cache-dir", cache,
                               "--resume-from-checkpoint", "checkpoint-2", "--max-train-steps", steps, *T[2:])
        assert_one_line_error(code, err, "holds a run finished at step 3", "or add --overwrite")
        assert snapshot(own) == before
    code, _, err = run_cli(capsys, "train", data, "--output-dir", own, "--cache-dir", cache,
                           "--resume-from-checkpoint", "latest", "--max-train-steps", 5, *T[2:])
    assert code == 0, err
    info = json.loads((own / "pogdiff_run.json").read_text())
    assert info["steps"] == 5 and len(info["train_sessions"]) == 2  # continued from checkpoint-3, not started anew


@pytest.mark.parametrize("damage", ["missing", "truncated", "not a record"])
def test_a_missing_or_damaged_checkpoint_record_is_refused(damage, trained, tmp_path, capsys):
    """#107: such a checkpoint was taken as one saved before records, and no resume check ran."""
    data, run, cache = trained
    own = copy_run(run, tmp_path)
    record = own / "checkpoint-2" / "pogdiff_checkpoint.json"
    if damage == "missing":
        record.unlink()
    else:
        record.write_text(record.read_text()[:100] if damage == "truncated" else '{"sha256": {}}')
    before = snapshot(own)
    code, _, err = run_cli(capsys, "train", data, "--output-dir", own, "--cache-dir", cache,
                           "--resume-from-checkpoint", "checkpoint-2", "--max-train-steps", 4, *T[2:])
    assert_one_line_error(code, err, "checkpoint-2/pogdiff_checkpoint.json: missing or damaged",
                          "start the run afresh with --overwrite")
    assert snapshot(own) == before


def test_a_resume_on_other_images_is_refused(trained, tmp_path, capsys):
    """#109: every image inverted, metadata.jsonl untouched: it resumed and trained on the new images."""
    from PIL import Image, ImageOps

    data, run, cache = trained
    own = copy_run(run, tmp_path)
    data = shutil.copytree(data, tmp_path / "inverted")
    for image in sorted(data.rglob("*.png")):
        ImageOps.invert(Image.open(image).convert("RGB")).save(image)
    before = snapshot(own)
    code, _, err = run_cli(capsys, "train", data, "--output-dir", own, "--cache-dir", cache,
                           "--resume-from-checkpoint", "latest", "--max-train-steps", 4, *T[2:])
    assert_one_line_error(code, err, "checkpoint-3: the run was started on other data: the bytes of the dataset's "
                                     "images changed since")
    assert snapshot(own) == before


def test_a_resume_with_another_global_batch_is_refused(trained, tmp_path, capsys):
    """#108: 2 processes x 4 resumed as 1 x 4 went on at half the batch."""
    data, run, cache = trained
    own = copy_run(run, tmp_path)
    path = own / "checkpoint-3" / "pogdiff_checkpoint.json"  # as a run of 2 processes records it
    record = json.loads(path.read_text())
    assert record["options"]["global_batch"] == "1 x 2"
    record["options"]["global_batch"] = "2 x 2"
    path.write_text(json.dumps(record))
    before = snapshot(own)
    code, _, err = run_cli(capsys, "train", data, "--output-dir", own, "--cache-dir", cache,
                           "--resume-from-checkpoint", "latest", "--max-train-steps", 4, *T[2:])
    assert_one_line_error(code, err, "the global batch, processes x --train-batch-size (run: 2 x 2, now: 1 x 2)")
    assert snapshot(own) == before


def test_a_run_folder_inside_the_dataset_is_refused(trained, tmp_path, capsys):
    data, run, cache = trained
    data = shutil.copytree(data, tmp_path / "data")
    before = snapshot(data)
    code, _, err = run_cli(capsys, "train", data, "--output-dir", data / "run1", "--cache-dir", cache, *T)
    assert_one_line_error(code, err, "--output-dir is inside the dataset")
    assert snapshot(data) == before and not (data / "run1").exists()


def test_sample_checks_out_before_sampling_and_writes_images_as_they_come(trained, tmp_path, capsys, monkeypatch):
    data, run, cache = trained
    (tmp_path / "f").write_text("k")
    sampled = []
    real = sampling_module.generate_batches
    monkeypatch.setattr(sampling_module, "generate_batches", lambda *a, **k: sampled.append(1) or real(*a, **k))
    code, _, err = run_cli(capsys, "sample", run, "--prompt", "An image of Anna.", "--out", tmp_path / "f", *E)
    assert_one_line_error(code, err, "--out is a file; choose a folder")
    assert sampled == [] and (tmp_path / "f").read_text() == "k"

    def one_batch_then_stopped(*args, **kwargs):
        yield next(real(*args, **kwargs))
        raise KeyboardInterrupt

    monkeypatch.setattr(sampling_module, "generate_batches", one_batch_then_stopped)
    out = tmp_path / "samples"
    code, _, err = run_cli(capsys, "sample", run, "--prompt", "An image of Anna.", "--out", out, "--num-images", 70,
                           "--num-inference-steps", 1, "--no-progress")
    assert code == 130  # Ctrl-C after the first batch of 64: those images are already on disk
    assert len(list(out.glob("*.png"))) == 64


def test_pretrain_release_dir_in_the_run_folder_is_refused_before_training(trained, tmp_path, capsys):
    data, _, cache = trained
    code, _, err = run_cli(capsys, "pretrain", data, "--output-dir", tmp_path / "pt2", "--release-dir",
                           tmp_path / "pt2", "--max-train-steps", 1, "--train-batch-size", 2, "--cache-dir", cache,
                           "--no-progress")
    assert_one_line_error(code, err, "--release-dir and --output-dir", "overlap")
    assert not (tmp_path / "pt2").exists()


def test_a_stopped_benchmark_says_to_run_it_again(tmp_path, monkeypatch, capsys):
    def interrupted(config):
        raise Interrupted(f"{config.output_dir}: interrupted; start the run afresh with --overwrite")

    monkeypatch.setattr(comparison, "train", interrupted)
    code, _, err = run_cli(capsys, "benchmark", "--out", tmp_path / "b", "--quick", "--methods", "vanilla",
                           "--seeds", 0, "--no-progress")
    assert code == 130 and "run the same command again to continue" in err and "--overwrite" not in err


def test_caches_and_runs_are_readable_as_the_umask_says(trained):
    """safetensors writes 0600; a cache or run folder shared by a team must follow the umask (0644 under 022)."""
    _, run, cache = trained
    mask = os.umask(0o022)
    os.umask(mask)
    files = [*cache.rglob("*.safetensors"), *run.rglob("*.safetensors")]
    wrong = [(f.name, oct(stat.S_IMODE(f.stat().st_mode))) for f in files if stat.S_IMODE(f.stat().st_mode) != 0o666 & ~mask]
    assert len(files) > 5 and wrong == []


def test_a_cache_dir_that_is_a_file_is_one_line(trained, tmp_path, capsys):
    data, _, _ = trained
    (tmp_path / "cachefile").write_text("k")
    code, _, err = run_cli(capsys, "train", data, "--output-dir", tmp_path / "run", "--cache-dir",
                           tmp_path / "cachefile", *T)
    assert_one_line_error(code, err, "--cache-dir is a file; pass a folder")
    assert not (tmp_path / "run").exists() and (tmp_path / "cachefile").read_text() == "k"
