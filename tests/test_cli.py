"""The command line on the tiny preset, and one-line errors for bad input."""

import json

import pytest

from pogdiff.cli import main


def run_cli(capsys, *argv):
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_cli_chain_on_the_small_preset(tmp_path, capsys):
    data, cache = tmp_path / "data", tmp_path / "cache"
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
        assert 0.0 <= result["all"]["id_acc"] <= 1.0 and 0.0 <= result["few"]["id_acc"] <= 1.0
    assert metrics["num_identities"] == {"all": 2, "few": 1}
    assert (tmp_path / "eval" / "samples-pogdiff.png").is_file()
    assert "| vanilla |" in out


def test_train_refuses_a_folder_that_holds_another_run(toy_data, tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "pogdiff_run.json").write_text("{}")
    code, _, err = run_cli(capsys, "train", toy_data, "--output-dir", run, "--max-train-steps", 1, "--no-progress")
    assert code == 2 and "already holds a run" in err and "--overwrite" in err
    assert (run / "pogdiff_run.json").read_text() == "{}"


def _break_missing_folder(root):
    return root.parent / "nowhere", "dataset folder not found"


def _break_no_metadata(root):
    (root / "metadata.jsonl").rename(root / "metadata.json1")
    return root, "rename it to metadata.jsonl"


def _break_missing_image(root):
    (root / "images" / "0_0.png").unlink()
    return root, "0_0.png: image listed on line 1"


def _break_empty_caption(root):
    lines = (root / "metadata.jsonl").read_text().splitlines()
    row = json.loads(lines[1])
    row["text"] = "  "
    lines[1] = json.dumps(row)
    (root / "metadata.jsonl").write_text("\n".join(lines))
    return root, "metadata.jsonl:2: empty or non-string caption"


def _break_unknown_column(root):
    text = (root / "metadata.jsonl").read_text().replace('"text"', '"caption"')
    (root / "metadata.jsonl").write_text(text)
    return root, "--caption-column"


def _break_corrupt_image(root):
    (root / "images" / "1_0.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    return root, "1_0.png: cannot read this image"


@pytest.mark.parametrize("breaker", [_break_missing_folder, _break_no_metadata, _break_missing_image,
                                     _break_empty_caption, _break_unknown_column, _break_corrupt_image])
@pytest.mark.parametrize("command", ["train", "evaluate"])
def test_bad_input_gives_one_line_error(breaker, command, toy_data, tmp_path, capsys):
    data, expected = breaker(toy_data)
    if command == "train":
        argv = ["train", data, "--output-dir", tmp_path / "run", "--max-train-steps", 1, "--no-progress"]
    else:
        run = tmp_path / "fake-run"
        run.mkdir()
        argv = ["evaluate", run, "--data", data, "--out", tmp_path / "eval", "--no-progress"]
    code, _, err = run_cli(capsys, *argv)
    assert code == 2
    assert len(err.strip().splitlines()) == 1, err
    assert err.startswith("pogdiff: error: ") and expected in err
