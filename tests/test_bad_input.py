"""The catalogue of docs/bad-input.md: each kind of bad input gets one clear line, and nothing is written.

Errors: one line on stderr starting "pogdiff: error: ", exit code 2, naming the file (and
line or row) and the fix; the dataset is left as it was and no run folder is created.
Input that still works is converted (images) or warned about once ("pogdiff: warning: ").
"""

import errno
import hashlib
import json
import math
import re
import shutil
import unicodedata
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from pogdiff.cli import main
from pogdiff.data.dataset import load_dataset, load_image
from pogdiff.errors import DatasetError, PogdiffError, PogdiffWarning
from pogdiff.files import file_stems
from pogdiff.backbones.pretrained import check_pipeline_files
from pogdiff.objectives.psi import image_similarity_weight, inverse_text_density_weight
from pogdiff.training.ownership import MARK_FILE, entries
from pogdiff.training.train import TrainConfig, output_folder


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory):
    """One table cache for the module: every toy dataset here has the same content."""
    return tmp_path_factory.mktemp("cache")


def run_cli(capsys, *argv):
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def snapshot(folder):
    """Every file under ``folder`` with a hash of its bytes: equal snapshots, nothing changed."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def assert_one_line_error(code, err, *expected):
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1, err
    assert err.startswith("pogdiff: error: "), err
    for text in expected:
        assert text in err, err


def edit_metadata(root, line_index, **changes):
    lines = (root / "metadata.jsonl").read_text().splitlines()
    row = json.loads(lines[line_index])
    row.update(changes)
    lines[line_index] = json.dumps(row)
    (root / "metadata.jsonl").write_text("\n".join(lines) + "\n")


# --- the dataset folder: each breaker returns (dataset path, texts the error must contain) ---

def _missing_folder(root):
    return root.parent / "nowhere", ["nowhere: dataset folder not found", "pass a folder"]


def _folder_is_a_file(root):
    return root / "metadata.jsonl", ["is a file, not a folder"]


def _misnamed_metadata(root):
    (root / "metadata.jsonl").rename(root / "metadata.json1")
    return root, ["no metadata.jsonl", "found metadata.json1: rename it to metadata.jsonl"]


def _csv_metadata(root):
    (root / "metadata.jsonl").rename(root / "metadata.csv")
    return root, ["found metadata.csv: convert it to metadata.jsonl"]


def _not_utf8(root):
    text = (root / "metadata.jsonl").read_text().splitlines()
    text[2] = text[2].replace("Anna", "Ann\xe9")
    (root / "metadata.jsonl").write_bytes("\n".join(text).encode("latin-1"))
    return root, ["metadata.jsonl:3: not UTF-8 text (byte 0xe9)", "save the file as UTF-8"]


def _malformed_json(root):
    lines = (root / "metadata.jsonl").read_text().splitlines()
    lines[4] = lines[4][:-1]  # drop the closing brace
    (root / "metadata.jsonl").write_text("\n".join(lines))
    return root, ["metadata.jsonl:5: not valid JSON", "fix or remove that line"]


def _not_an_object(root):
    with (root / "metadata.jsonl").open("a") as f:
        f.write('["images/0_0.png", "a caption"]\n')
    return root, ["metadata.jsonl:21: expected a JSON object, got list"]


def _caption_column_renamed(root):
    text = (root / "metadata.jsonl").read_text().replace('"text"', '"caption"')
    (root / "metadata.jsonl").write_text(text)
    return root, ["metadata.jsonl:1: no 'text' column (columns: file_name, caption, identity)", "--caption-column"]


def _image_column_renamed(root):
    text = (root / "metadata.jsonl").read_text().replace('"file_name"', '"image"')
    (root / "metadata.jsonl").write_text(text)
    return root, ["no 'file_name' column", "--image-column"]


def _image_outside_folder(root):
    edit_metadata(root, 3, file_name="../elsewhere/cat.png")
    return root, ["metadata.jsonl:4: '../elsewhere/cat.png' is outside the dataset folder", "relative to it"]


def _missing_image(root):
    for name in ("0_0.png", "1_3.png", "2_1.png"):
        (root / "images" / name).unlink()
    return root, ["images/0_0.png: image listed on line 1", "is missing", "add it or remove its line",
                  "(2 more missing: images/1_3.png, images/2_1.png)"]


def _duplicate_file(root):
    edit_metadata(root, 7, file_name="./images/0_2.png")
    return root, ["metadata.jsonl:8: 'images/0_2.png' is listed twice (first on line 3)", "remove the duplicate"]


def _corrupt_image(root):
    (root / "images" / "1_0.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    (root / "images" / "1_4.png").write_bytes(b"GIF89a")
    return root, ["images/1_0.png: cannot read this image", "replace it or remove its line",
                  "(1 more unreadable: images/1_4.png)"]


def _truncated_image(root):
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    image.save(root / "images" / "1_1.png")
    data = (root / "images" / "1_1.png").read_bytes()
    (root / "images" / "1_1.png").write_bytes(data[:len(data) // 2])
    return root, ["images/1_1.png: cannot read this image"]


def _empty_image_file(root):
    (root / "images" / "2_0.png").write_bytes(b"")
    return root, ["images/2_0.png: cannot read this image"]


def _empty_caption(root):
    edit_metadata(root, 1, text="  ")
    return root, ["metadata.jsonl:2: empty or non-string caption", "write a caption"]


def _non_string_caption(root):
    edit_metadata(root, 2, text=["An", "image"])
    return root, ["metadata.jsonl:3: empty or non-string caption"]


def _identity_on_some_lines(root):
    lines = (root / "metadata.jsonl").read_text().splitlines()
    row = json.loads(lines[5])
    del row["identity"]
    lines[5] = json.dumps(row)
    (root / "metadata.jsonl").write_text("\n".join(lines))
    return root, ["metadata.jsonl:6: no 'identity' column though earlier lines have one"]


def _null_identity(root):
    edit_metadata(root, 0, identity=None)
    return root, ["metadata.jsonl:1: identity None is not a name"]


def _empty_metadata(root):
    (root / "metadata.jsonl").write_text("\n\n")
    return root, ["metadata.jsonl: no rows"]


def _identity_number_and_string(root):
    edit_metadata(root, 0, identity=1)
    edit_metadata(root, 1, identity="1")
    return root, ["metadata.jsonl:2: identity '1' and 1 on line 1 would count as one identity",
                  "write every identity as a string"]


def _nan_float_image(root):
    Image.fromarray(np.full((32, 32), np.nan, dtype=np.float32), "F").save(root / "images" / "1_2.png", format="TIFF")
    return root, ["images/1_2.png: cannot read this image (NaN or infinite pixel values)", "replace it"]


def _image_bomb(root):
    Image.new("RGB", (3_000_000, 1)).save(root / "images" / "0_5.png")  # a few KB on disk, 9 MB decoded
    return root, ["images/0_5.png: 3000000x1 pixels", "more than 16 times as wide as high", "crop or shrink it"]


DATASET_BREAKERS = [_missing_folder, _folder_is_a_file, _misnamed_metadata, _csv_metadata, _not_utf8, _malformed_json,
                    _not_an_object, _caption_column_renamed, _image_column_renamed, _image_outside_folder,
                    _missing_image, _duplicate_file, _corrupt_image, _truncated_image, _empty_image_file,
                    _empty_caption, _non_string_caption, _identity_on_some_lines, _null_identity, _empty_metadata,
                    _identity_number_and_string, _nan_float_image, _image_bomb]


@pytest.mark.parametrize("breaker", DATASET_BREAKERS, ids=lambda b: b.__name__.strip("_"))
def test_bad_dataset_gives_one_line_error_and_train_writes_nothing(breaker, toy_data, tmp_path, capsys):
    data, expected = breaker(toy_data)
    before = snapshot(toy_data)
    run = tmp_path / "run"
    code, _, err = run_cli(capsys, "train", data, "--output-dir", run, "--max-train-steps", 1,
                           "--cache-dir", tmp_path / "cache", "--no-progress")
    assert_one_line_error(code, err, *expected)
    # the cache may remember the image files' hashes; no shard holds the bad image (one shard: 20 rows)
    assert not run.exists() and [p for p in (tmp_path / "cache").rglob("*")
                                 if p.is_file() and not p.name.startswith("file-digests-")] == []
    assert snapshot(toy_data) == before


@pytest.mark.parametrize("breaker", [_missing_folder, _misnamed_metadata, _missing_image, _empty_caption,
                                     _caption_column_renamed, _corrupt_image], ids=lambda b: b.__name__.strip("_"))
def test_bad_dataset_gives_one_line_error_in_evaluate(breaker, toy_data, tmp_path, capsys):
    data, expected = breaker(toy_data)
    before = snapshot(toy_data)
    run = tmp_path / "fake-run"  # read (first) but never loaded: the dataset is refused before
    run.mkdir()
    (run / "pogdiff_run.json").write_text(json.dumps({"backbone": "pixel", "config": {"method": "vanilla"}}))
    code, _, err = run_cli(capsys, "evaluate", run, "--data", data, "--out", tmp_path / "eval", "--no-progress")
    assert_one_line_error(code, err, *expected)
    assert snapshot(toy_data) == before


# --- images that are converted, not refused ---

@pytest.mark.parametrize("mode", ["L", "LA", "RGBA", "P", "I;16", "CMYK", "1"])
def test_unusual_image_modes_become_rgb(mode, tmp_path):
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8))
    if mode == "I;16":
        image = Image.fromarray((rng.integers(0, 65535, (40, 48))).astype(np.uint16))
    elif mode == "P":
        image = rgb.quantize(16)
    else:
        image = rgb.convert(mode)
    path = tmp_path / ("image.jpg" if mode == "CMYK" else "image.png")
    image.save(path)
    array = load_image(path, 32)
    assert array.shape == (32, 32, 3) and array.dtype == np.uint8
    assert array.std() > 0  # still a picture, not a blank


def test_transparent_pixels_go_over_white(tmp_path):
    Image.new("RGBA", (32, 32), (255, 0, 0, 0)).save(tmp_path / "clear.png")
    assert (load_image(tmp_path / "clear.png", 32) == 255).all()


def test_exif_rotated_photo_is_turned_upright(tmp_path):
    array = np.zeros((20, 40, 3), dtype=np.uint8)  # landscape: red left half, blue right half
    array[:, :20] = (255, 0, 0)
    array[:, 20:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to view
    Image.fromarray(array).save(tmp_path / "phone.png", exif=exif)
    upright = load_image(tmp_path / "phone.png", 20, center_crop=False)  # portrait after rotation: top 20x20
    assert upright[0, 0, 0] > 200 and upright[0, 0, 2] < 50  # top is the red half
    assert load_image(tmp_path / "phone.png", 20, center_crop=False)[19, 0, 0] > 200


def test_line_separators_inside_json_strings_are_accepted(toy_data):
    """U+2028, U+2029 and U+0085 are legal inside JSON strings; only "\\n" ends a JSONL line."""
    edit_metadata(toy_data, 2, text="An image of Anna,\u2028smiling.")
    edit_metadata(toy_data, 3, text="An image of Anna,\u0085frowning.")
    text = (toy_data / "metadata.jsonl").read_text(encoding="utf-8")
    (toy_data / "metadata.jsonl").write_bytes(text.replace("\\u2028", "\u2028").replace("\\u0085", "\u0085")
                                              .encode())
    assert "\u2028" in (toy_data / "metadata.jsonl").read_text(encoding="utf-8")  # raw, not escaped
    dataset = load_dataset(toy_data)
    assert len(dataset) == 20 and dataset.captions[2] == "An image of Anna,\u2028smiling."


def test_utf8_byte_order_mark_and_windows_paths_are_accepted(toy_data):
    text = (toy_data / "metadata.jsonl").read_text().replace("images/", "images\\\\")
    (toy_data / "metadata.jsonl").write_bytes(b"\xef\xbb\xbf" + text.encode())
    dataset = load_dataset(toy_data)
    assert len(dataset) == 20 and dataset.files[0] == "images/0_0.png"


# --- warnings: the data still work, the user is told once ---

def test_single_image_identity_is_warned_once_and_kept(toy_data, tmp_path, capsys):
    edit_metadata(toy_data, 19, identity="Dara")  # Chen keeps one image, Dara gets one
    with pytest.warns(PogdiffWarning, match=r"2 identities have a single image \(Chen, Dara\); PoGDiff assumes >= 2"):
        dataset = load_dataset(toy_data)
    assert dataset.identity_counts()["Dara"] == 1 and {"Chen", "Dara"} <= dataset.few_identities()
    # through the CLI: one warning line before the (unrelated) batch-size error
    code, _, err = run_cli(capsys, "train", toy_data, "--output-dir", tmp_path / "run", "--train-batch-size", 64,
                           "--no-progress")
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 2
    assert lines[0].startswith("pogdiff: warning: ") and "s^(a1+a2)" in lines[0]
    assert lines[1].startswith("pogdiff: error: ")


def test_identity_column_under_another_name_is_warned_with_the_flag(toy_data):
    text = (toy_data / "metadata.jsonl").read_text().replace('"identity"', '"person"')
    (toy_data / "metadata.jsonl").write_text(text)
    with pytest.warns(PogdiffWarning, match="no 'identity' column.*pass --identity-column person"):
        assert load_dataset(toy_data).identities is None
    identities = load_dataset(toy_data, identity_column="person").identities
    assert identities[0] == "Anna"


def test_no_identity_column_at_all_is_silent(toy_data):
    rows = [json.loads(line) for line in (toy_data / "metadata.jsonl").read_text().splitlines()]
    (toy_data / "metadata.jsonl").write_text("".join(json.dumps({"file_name": r["file_name"], "text": r["text"]}) + "\n"
                                                     for r in rows))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load_dataset(toy_data).identities is None


# --- training options against the dataset ---

def test_dataset_smaller_than_the_batch(toy_data, tmp_path, capsys):
    code, _, err = run_cli(capsys, "train", toy_data, "--output-dir", tmp_path / "run", "--train-batch-size", 32,
                           "--no-progress")
    assert_one_line_error(code, err, "20 images, fewer than one batch of 32", "lower --train-batch-size")
    assert not (tmp_path / "run").exists()


def test_k_larger_than_the_dataset(toy_data, tmp_path, capsys):
    code, _, err = run_cli(capsys, "train", toy_data, "--output-dir", tmp_path / "run", "--k", 20,
                           "--train-batch-size", 4, "--cache-dir", tmp_path / "cache", "--no-progress")
    assert not (tmp_path / "cache").exists()
    assert_one_line_error(code, err, "--k 20 neighbours per image, but the dataset has 20 images",
                          "pass --k between 1 and 19")
    assert not (tmp_path / "run").exists()


def test_a_single_image_dataset_is_told_it_needs_two(toy_data, tmp_path, capsys):
    lines = (toy_data / "metadata.jsonl").read_text().splitlines()
    (toy_data / "metadata.jsonl").write_text(lines[0] + "\n")
    code, _, err = run_cli(capsys, "train", toy_data, "--output-dir", tmp_path / "run", "--train-batch-size", 1,
                           "--cache-dir", tmp_path / "cache", "--no-progress")
    assert_one_line_error(code, err, "metadata.jsonl: a single row", "add images")
    assert "--k" not in err and not (tmp_path / "run").exists()


@pytest.mark.parametrize("option, value, expected", [("--a3", 0, "Eq. 11 needs a3 > 0"),
                                                     ("--a1", -1, "Eq. 9's exponents must be >= 0")])
def test_psi_options_that_would_make_psi_infinite(option, value, expected, toy_data, tmp_path, shared_cache,
                                                   capsys):
    code, _, err = run_cli(capsys, "train", toy_data, "--output-dir", tmp_path / "run", option, value,
                           "--train-batch-size", 4, "--cache-dir", shared_cache, "--no-progress")
    assert_one_line_error(code, err, f"argument {option}: ", expected)
    assert not (tmp_path / "run").exists()


def test_psi_functions_refuse_values_that_give_nan_or_inf():
    elbo = torch.tensor([-3.0, -1.0, 0.0])
    with pytest.raises(PogdiffError):
        inverse_text_density_weight(elbo, a3=0.0, max_ratio=2.0)
    with pytest.raises(PogdiffError):
        inverse_text_density_weight(elbo, a3=float("nan"), max_ratio=2.0)
    with pytest.raises(PogdiffError):
        inverse_text_density_weight(elbo, a3=1.0, max_ratio=0.5)  # a clip below 1 would invert [1/r, r]
    with pytest.raises(PogdiffError):
        image_similarity_weight(torch.tensor([0.0]), torch.tensor([False]), a1=1.0, a2=-2.0)
    assert torch.isfinite(inverse_text_density_weight(elbo, a3=1e-3, max_ratio=2.0)).all()
    assert math.isclose(image_similarity_weight(torch.tensor([0.0]), torch.tensor([True]), 0.0, 0.0).item(), 1.0)


# --- option values: refused when the command line is parsed (pogdiff.options), before anything is read or written ---

CPU_ONLY = not torch.cuda.is_available()
OPTION_CASES = [  # (command and option, allowed range in the error)
    ("train --train-batch-size 0", "an integer >= 1"), ("train --train-batch-size -1", "an integer >= 1"),
    ("train --gradient-accumulation-steps 0", "an integer >= 1"),
    ("train --learning-rate -1", "a finite number > 0"), ("train --learning-rate 0", "a finite number > 0"),
    ("train --learning-rate nan", "a finite number > 0"),
    ("train --lr-scheduler foo", "one of constant, linear, cosine"),
    ("train --seed -1", "an integer in [0, 4294967295]"), ("train --seed 4294967296", "an integer in [0, 4294967295]"),
    ("train --validation-steps 0", "an integer >= 1"), ("train --num-validation-images 0", "an integer >= 1"),
    ("train --resolution -8", "a multiple of 8 >= 8"), ("train --resolution 0", "a multiple of 8 >= 8"),
    ("train --resolution 36", "a multiple of 8 >= 8"),
    ("train --max-train-steps 0", "an integer >= 1"), ("train --max-train-steps -5", "an integer >= 1"),
    ("train --checkpoints-total-limit -1", "an integer >= 1"), ("train --checkpointing-steps 0", "an integer >= 1"),
    ("train --caption-dropout 5", "a finite number in [0, 1]"), ("train --vae-latent-dim 0", "an integer >= 1"),
    ("train --k 0", "an integer >= 1"), ("train --ema-decay 1.5", "a finite number in [0, 1]"),
    ("train --cbdm-tau -1", "a finite number >= 0"), ("train --a2 -1", "a finite number >= 0"),
    ("train --psi-txt-max-ratio 0.5", "a finite number >= 1"),
    ("train --density-max-ratio 0.5", "a finite number >= 1"),
    ("train --train-batch-size two", "an integer >= 1"),
    pytest.param("train --mixed-precision fp16", "bf16 or no",
                 marks=pytest.mark.skipif(not CPU_ONLY, reason="a GPU is visible: fp16 is allowed"),
                 id="train --mixed-precision fp16"),
    ("sample --num-images 0", "an integer >= 1"), ("sample --num-images -1", "an integer >= 1"),
    ("sample --num-inference-steps 0", "an integer in [1, 1000]"),
    ("sample --num-inference-steps -3", "an integer in [1, 1000]"),
    ("sample --num-inference-steps 5000", "an integer in [1, 1000]"),
    ("sample --guidance-scale nan", "a finite number >= 0"), ("sample --guidance-scale inf", "a finite number >= 0"),
    ("evaluate --num-images 0", "an integer >= 1"), ("evaluate --recall-threshold 2", "a finite number in [-1, 1]"),
    ("data synth --resolution 4", "an integer >= 8"), ("benchmark --seeds 0 -1", "an integer in [0, 4294967295]"),
]
COMMAND_ARGUMENTS = {"train": "{data} --output-dir {out}", "sample": "{run} --prompt x --out {out}",
                     "evaluate": "{run} --data {data} --out {out}", "data synth": "{out}", "benchmark": "--out {out}"}


@pytest.mark.parametrize("case, allowed", [c if len(c) == 3 else pytest.param(*c, id=c[0]) for c in OPTION_CASES])
def test_option_values_out_of_range_are_refused_when_parsed(case, allowed, toy_data, tmp_path, capsys):
    command = next(c for c in COMMAND_ARGUMENTS if case.startswith(c + " "))
    option, value = case[len(command) + 1:].split(" ", 1)
    fixed = COMMAND_ARGUMENTS[command].format(data=toy_data, out=tmp_path / "out", run=tmp_path / "run")
    code, _, err = run_cli(capsys, *command.split(), *fixed.split(), option, *value.split(), "--no-progress")
    assert_one_line_error(code, err, f"argument {option}: {value.split()[-1]} ", f"; pass {allowed}")
    assert list(tmp_path.iterdir()) == [toy_data]  # nothing written


def test_python_callers_get_the_same_checks(toy_data, tmp_path):
    from pogdiff.compare.comparison import parse_method
    from pogdiff.training.train import train

    with pytest.raises(PogdiffError, match=r"--train-batch-size: 0 is out of range; pass an integer >= 1"):
        train(TrainConfig(str(toy_data), str(tmp_path / "run"), train_batch_size=0))
    with pytest.raises(PogdiffError, match=r"--cbdm-tau: -1.0 is out of range; pass a finite number >= 0"):
        train(TrainConfig(str(toy_data), str(tmp_path / "run"), method="cbdm", method_options={"tau": -1.0}))
    with pytest.raises(PogdiffError, match=r"'cbdm:tau=-1': --cbdm-tau: -1.0 is out of range"):
        parse_method("cbdm:tau=-1")  # a benchmark row, refused before any cell runs
    assert list(tmp_path.iterdir()) == [toy_data]


@pytest.mark.parametrize("content, expected", [("{}", "pogdiff_run.json: no backbone, config"),
                                               ('{"backbone": "pixel",', "pogdiff_run.json: not valid JSON"),
                                               ("[1, 2]", "pogdiff_run.json: not a JSON object"),
                                               ('{"backbone": "pixel", "config": {"method": "vanilla"}}',
                                                "pogdiff_run.json: no text_max_length"),
                                               ('{"backbone": "pixel", "config": {"method": "vanilla"}, '
                                                '"text_max_length": 24}', "cannot load the run's weights")])
def test_a_broken_run_file_is_one_line(content, expected, tmp_path, capsys):
    run = tmp_path / "run"
    (run / "unet").mkdir(parents=True)
    (run / "pogdiff_run.json").write_text(content)
    code, _, err = run_cli(capsys, "sample", run, "--prompt", "x", "--out", tmp_path / "out", "--no-progress")
    assert_one_line_error(code, err, expected, "the run folder is damaged: train it again")
    assert not (tmp_path / "out").exists()


def test_sample_keeps_the_files_already_in_out(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "0001.png").write_bytes(b"mine")
    code, _, err = run_cli(capsys, "sample", tmp_path / "run", "--prompt", "x", "--out", out, "--num-images", 2)
    assert_one_line_error(code, err, "0001.png: already exists", "choose another --out")
    assert [p.name for p in out.iterdir()] == ["0001.png"] and (out / "0001.png").read_bytes() == b"mine"


# --- the output folder ---

def test_overwrite_refuses_a_folder_that_is_not_a_run(tmp_path, toy_data, capsys):
    out = tmp_path / "holiday-photos"
    (out / "checkpoint-500").mkdir(parents=True)  # what every diffusers training output holds
    (out / "beach.jpg").write_bytes(b"precious")
    for extra in ([], ["--overwrite"], ["--resume-from-checkpoint", "latest"]):
        code, _, err = run_cli(capsys, "train", toy_data, "--output-dir", out, "--no-progress", *extra)
        assert_one_line_error(code, err, "holiday-photos")
        assert sorted(p.name for p in out.iterdir()) == ["beach.jpg", "checkpoint-500"]
        assert (out / "beach.jpg").read_bytes() == b"precious"


def test_identity_names_are_never_paths(toy_data, tmp_path, shared_cache, capsys):
    names = {"Anna": "../../../../escaped", "Bruno": "AC/DC", "Chen": "ac/dc"}
    lines = [json.loads(line) for line in (toy_data / "metadata.jsonl").read_text().splitlines()]
    (toy_data / "metadata.jsonl").write_text("".join(json.dumps({**row, "identity": names[row["identity"]]}) + "\n"
                                                     for row in lines))
    run, out = tmp_path / "run", tmp_path / "deep" / "er" / "eval"
    code, _, err = run_cli(capsys, "train", toy_data, "--output-dir", run, "--max-train-steps", 1,
                           "--train-batch-size", 4, "--cache-dir", shared_cache, "--no-progress")
    assert code == 0, err
    before = {p for p in tmp_path.rglob("*") if p.is_file()}
    code, _, err = run_cli(capsys, "evaluate", run, "--data", toy_data, "--out", out, "--num-images", 2,
                           "--num-inference-steps", 1, "--cache-dir", shared_cache, "--no-progress")
    assert code == 0, err
    assert {p for p in tmp_path.rglob("*") if p.is_file() and not p.is_relative_to(out)} == before  # only in --out
    folders = sorted((out / "samples" / "pogdiff").iterdir())
    assert len(folders) == 3 and all(len(list(f.iterdir())) == 2 for f in folders)  # one folder per identity
    assert set(json.loads((out / "metrics.json").read_text())["methods"]["pogdiff"]["per_identity"]) == set(
        names.values())


def test_identities_missing_from_synth_json_are_not_scored_by_the_synth_judge(small_synth, tmp_path):
    from pogdiff.evaluation.evaluate import Evaluation
    from pogdiff.evaluation.features import DEFAULT_FEATURES

    data = shutil.copytree(small_synth[0], tmp_path / "data")
    text = (data / "metadata.jsonl").read_text()
    first = json.loads(text.splitlines()[0])["identity"]
    (data / "metadata.jsonl").write_text(text.replace(f'"identity": "{first}"', '"identity": "Zed"'))

    def evaluation(judge):
        return Evaluation(data, DEFAULT_FEATURES, None, judge, "hog", 5, tmp_path / "cache", progress=False)

    with pytest.warns(PogdiffWarning, match=r"1 of the dataset's identities are not in it \(Zed\).*features judge"):
        assert evaluation("auto").judge_kind == "features"
    with pytest.raises(PogdiffError, match=r"synth.json: 1 of the dataset's .*use --identity-judge features or faces"):
        evaluation("synth")
    assert not (tmp_path / "cache").exists()  # refused before a judge was trained


def test_file_stems_are_safe_distinct_and_readable_where_possible():
    names = ["Anna", "../../../../escaped", "AC/DC", "AC_DC", "ac/dc", ".hidden", "Zoë", "x" * 300, "Bob", "bob"]
    stems = file_stems(names)
    assert stems["Anna"] == "Anna" and stems["AC/DC"].startswith("AC_DC-")
    assert stems["AC_DC"].startswith("AC_DC-") and stems["bob"].startswith("bob-")  # would share a file otherwise
    assert len(set(stems.values())) == len(names) and len({s.lower() for s in stems.values()}) == len(names)
    for stem in stems.values():
        assert re.fullmatch(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,91}", stem), stem
    assert file_stems(names) == stems  # the same names, the same files


def test_overwrite_replaces_a_run_only_once_the_inputs_are_good(tmp_path, toy_data, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / MARK_FILE).write_text("")
    (out / "pogdiff_run.json").write_text("{}")
    (toy_data / "images" / "0_0.png").write_bytes(b"")
    code, _, err = run_cli(capsys, "train", toy_data, "--output-dir", out, "--overwrite", "--no-progress")
    assert_one_line_error(code, err, "0_0.png: cannot read this image")
    assert (out / "pogdiff_run.json").read_text() == "{}"  # the old run survives a failed start
    with output_folder(TrainConfig(str(toy_data), str(out), overwrite=True)).claimed() as claimed:
        assert claimed == out and entries(out) == []


def test_resume_without_a_checkpoint(tmp_path, toy_data, capsys):
    out = tmp_path / "run"
    out.mkdir()
    code, _, err = run_cli(capsys, "train", toy_data, "--output-dir", out, "--resume-from-checkpoint", "latest",
                           "--train-batch-size", 4, "--cache-dir", tmp_path / "cache", "--no-progress")
    assert_one_line_error(code, err, "no checkpoint to resume from", "drop --resume-from-checkpoint")
    assert list(out.iterdir()) == [] and not (tmp_path / "cache").exists()  # refused before any work


def test_output_folder_under_a_file(tmp_path, toy_data, capsys):
    (tmp_path / "notes.txt").write_text("mine")
    code, _, err = run_cli(capsys, "train", toy_data, "--output-dir", tmp_path / "notes.txt" / "run", "--no-progress")
    assert_one_line_error(code, err, "notes.txt is a file", "choose another --output-dir")
    code, _, err = run_cli(capsys, "train", toy_data, "--output-dir", tmp_path / "notes.txt", "--no-progress")
    assert_one_line_error(code, err, "--output-dir is a file")
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_unwritable_output_folder(tmp_path, toy_data, monkeypatch):
    locked = tmp_path / "locked"
    locked.mkdir()
    monkeypatch.setattr("pogdiff.training.train.os.access", lambda path, mode: False)  # root may write anywhere
    with pytest.raises(PogdiffError, match="locked is not writable.*choose another --output-dir"):
        output_folder(TrainConfig(str(toy_data), str(locked / "run"))).check()
    assert list(locked.iterdir()) == []


def test_output_folder_on_a_read_only_disk(tmp_path, toy_data, monkeypatch):
    def read_only(self, *args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr("pathlib.Path.touch", read_only)
    with pytest.raises(PogdiffError, match="cannot write to the output folder \\(Read-only file system\\)"):
        with output_folder(TrainConfig(str(toy_data), str(tmp_path / "run"))).claimed():
            pass


# --- a wrong or partial --pretrained folder (the Stable Diffusion backbone calls this check) ---

def write_pipeline(folder, components=("unet", "vae", "text_encoder", "tokenizer", "scheduler")):
    folder.mkdir()
    index = {"_class_name": "StableDiffusionPipeline"}
    for name in components:
        index[name] = ["diffusers", "X"]
        (folder / name).mkdir()
        config = "tokenizer_config.json" if name == "tokenizer" else (
            "scheduler_config.json" if name == "scheduler" else "config.json")
        (folder / name / config).write_text("{}")
        if name in ("unet", "vae", "text_encoder"):
            weights = "model.safetensors" if name == "text_encoder" else "diffusion_pytorch_model.safetensors"
            (folder / name / weights).write_bytes(b"\0" * 2048)
    (folder / "model_index.json").write_text(json.dumps(index))
    return folder


def test_a_complete_pipeline_folder_passes(tmp_path):
    check_pipeline_files(write_pipeline(tmp_path / "sd"))


@pytest.mark.parametrize("damage, expected", [
    (lambda f: (f / "model_index.json").unlink(), "not a diffusers pipeline folder (no model_index.json)"),
    (lambda f: (f / "model_index.json").write_text("{'unet':"), "model_index.json: not valid JSON"),
    (lambda f: __import__("shutil").rmtree(f / "unet"), "sd/unet: missing"),
    (lambda f: (f / "vae" / "config.json").unlink(), "sd/vae: no config.json"),
    (lambda f: (f / "unet" / "diffusion_pytorch_model.safetensors").unlink(), "sd/unet: no weights"),
    (lambda f: (f / "text_encoder" / "model.safetensors").write_text(
        "version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 492265168\n"), "Git LFS pointer"),
])
def test_a_partial_pipeline_folder_is_named(damage, expected, tmp_path):
    folder = write_pipeline(tmp_path / "sd")
    damage(folder)
    with pytest.raises(PogdiffError) as error:
        check_pipeline_files(folder)
    assert expected in str(error.value) and "\n" not in str(error.value)


def test_sample_refuses_an_unfinished_stable_diffusion_run(tmp_path, capsys):
    run = write_pipeline(tmp_path / "run")  # a full-weights SD run stopped before it wrote pogdiff_run.json
    (run / MARK_FILE).write_text("")
    code, _, err = run_cli(capsys, "sample", run, "--prompt", "An image of Anna.", "--out", tmp_path / "out")
    assert_one_line_error(code, err, "run: an unfinished run (no pogdiff_run.json)", "--overwrite")
    assert not (tmp_path / "out").exists()


def test_a_single_checkpoint_file_is_not_a_pipeline_folder(tmp_path):
    (tmp_path / "v1-5-pruned.safetensors").write_bytes(b"\0" * 16)
    with pytest.raises(PogdiffError, match="a single checkpoint file.*from_single_file"):
        check_pipeline_files(tmp_path / "v1-5-pruned.safetensors")


def test_dataset_errors_are_dataset_errors(toy_data):
    (toy_data / "metadata.jsonl").write_text("{")
    with pytest.raises(DatasetError):
        load_dataset(toy_data)


def test_an_identity_in_nfc_and_in_nfd_is_one_person(toy_data):
    lines = (toy_data / "metadata.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in lines]
    for i, row in enumerate(rows):
        if row["identity"] == "Chen":
            row["identity"] = unicodedata.normalize("NFC" if i % 2 else "NFD", "Zoë")
    (toy_data / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    dataset = load_dataset(toy_data)
    assert dataset.identity_counts()["Zo\u00eb"] == 2 and len(dataset.identity_counts()) == 3
