"""Fuzz: random option values and random damage to a small dataset and run, fed to train, a resume of the run,
sample and evaluate.

Every case must end with exit code 0 (it worked) or 2 (one line, ``pogdiff: error: ...``), print
no traceback, change nothing outside its output folder and remove no file of the user's; a refused
resume changes nothing at all.
Each case is drawn from its own seeded generator, so a failure names a case to run again
(``CASES`` and its count in docs/bad-input.md go together).
"""

import hashlib
import json
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pogdiff.cli import main
from pogdiff.training.ownership import is_marked
from conftest import write_toy_dataset

CASES = 150
SEED = 14

# (flag, values): bad ones, good ones, and flags that pass without a value (None)
TRAIN_OPTIONS = [
    ("--train-batch-size", [0, -1, 3, "two", 100]), ("--gradient-accumulation-steps", [0, 2]),
    ("--learning-rate", [-1, 0, "nan", "inf", "1e-3"]), ("--lr-scheduler", ["foo", "cosine"]),
    ("--seed", [-1, 2**32, 7]), ("--max-train-steps", [0, -5, 2, 4]), ("--checkpointing-steps", [0, 1]),
    ("--checkpoints-total-limit", [-1, 0, 1]), ("--caption-dropout", [5, "nan", 0.5]),
    ("--resolution", [0, -8, 4, 8, 36]), ("--mixed-precision", ["fp16", "fp8", "no"]),
    ("--vae-latent-dim", [0, 2]), ("--k", [0, 1, 100]), ("--method", ["vanilla", "cbdm", "t2h", "resample", "magic"]),
    ("--a3", [0, "nan", 2]), ("--cbdm-tau", [-1, 0.5]),
    ("--resume-from-checkpoint", ["latest", "checkpoint-1", "../x"]),
    ("--overwrite", [None]), ("--use-ema", [None]), ("--random-flip", [None]), ("--ema-decay", [2, 0.9]),
    ("--validation-steps", [0]), ("--num-validation-images", [0]), ("--identity-column", ["person"]),
    ("--caption-column", ["caption"]), ("--snr-gamma", [0, 5]), ("--lora-rank", [0, 4]),
    ("--logging-dir", [".", "..", "eval/tb", "logs"]),
]
SAMPLE_OPTIONS = [
    ("--num-images", [0, -1, 2]), ("--num-inference-steps", [0, -3, 5000, 2]),
    ("--guidance-scale", ["nan", "inf", -1, 1.5]),
    ("--seed", [-1, 3]), ("--prompt", ["", "\u2028 \u0085 Zoë"]),
]
EVALUATE_OPTIONS = [
    ("--num-images", [0, -1, 2]), ("--num-images-few", [0, 1]), ("--num-inference-steps", [0, 5000, 2]),
    ("--guidance-scale", ["nan", 2]), ("--recall-threshold", [2, "nan", 0.5]), ("--few-max-images", [0, 1]),
    ("--identity-judge", ["synth", "psychic", "features"]), ("--seed", [-1, 3]),
]


# --- damage to the dataset (sandbox/data) and to a finished run (sandbox/run) ---

def rewrite_rows(data: Path, change) -> None:
    lines = (data / "metadata.jsonl").read_text(encoding="utf-8").split("\n")
    rows = [json.loads(line) for line in lines if line]
    change(rows)
    text = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)  # U+2028 raw, as editors write it
    (data / "metadata.jsonl").write_text(text, encoding="utf-8")


def first_image(data: Path) -> Path:
    return data / json.loads((data / "metadata.jsonl").read_text().splitlines()[0])["file_name"]


DATASET_DAMAGE = {  # applied in this order: rows and images first, then the bytes of metadata.jsonl
    "image deleted": lambda d: first_image(d).unlink(),
    "image truncated": lambda d: first_image(d).write_bytes(first_image(d).read_bytes()[:40]),
    "image garbage": lambda d: first_image(d).write_bytes(b"\x89PNG\r\n\x1a\n broken"),
    "image bomb": lambda d: Image.new("RGB", (3_000_000, 1)).save(first_image(d), format="PNG"),
    "NaN float image": lambda d: Image.fromarray(np.full((16, 16), np.nan, np.float32), "F").save(first_image(d),
                                                                                                 format="TIFF"),
    "image is a folder": lambda d: (first_image(d).unlink(), first_image(d).mkdir()),
    "U+2028 caption": lambda d: rewrite_rows(d, lambda rows: rows[0].update(text="An image of\u2028Anna.")),
    "duplicate line": lambda d: rewrite_rows(d, lambda rows: rows.append(dict(rows[0]))),
    "identity 1 and '1'": lambda d: rewrite_rows(d, lambda rows: (rows[0].update(identity=1),
                                                                  rows[1].update(identity="1"))),
    "empty caption": lambda d: rewrite_rows(d, lambda rows: rows[2].update(text=" ")),
    "path outside": lambda d: rewrite_rows(d, lambda rows: rows[0].update(file_name="../precious.txt")),
    "one row": lambda d: rewrite_rows(d, lambda rows: rows.__delitem__(slice(1, None))),
    "malformed line": lambda d: (d / "metadata.jsonl").write_bytes((d / "metadata.jsonl").read_bytes() + b"{oops\n"),
    "not UTF-8": lambda d: (d / "metadata.jsonl").write_bytes((d / "metadata.jsonl").read_bytes() + b"\xe9\n"),
    "CRLF and BOM": lambda d: (d / "metadata.jsonl").write_bytes(
        b"\xef\xbb\xbf" + (d / "metadata.jsonl").read_bytes().replace(b"\n", b"\r\n")),
    "metadata gone": lambda d: (d / "metadata.jsonl").unlink(),
}
RUN_DAMAGE = {
    "run file {}": lambda r: (r / "pogdiff_run.json").write_text("{}"),
    "run file broken": lambda r: (r / "pogdiff_run.json").write_text('{"backbone": '),
    "weights truncated": lambda r: (r / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"\0" * 100),
    "scheduler gone": lambda r: shutil.rmtree(r / "scheduler"),
    "run file gone": lambda r: (r / "pogdiff_run.json").unlink(),
    "checkpoint bytes changed": lambda r: zero_middle(r / "checkpoint-2" / "optimizer.bin"),
    "checkpoint record truncated": lambda r: (r / "checkpoint-2" / "pogdiff_checkpoint.json").write_text(
        (r / "checkpoint-2" / "pogdiff_checkpoint.json").read_text()[:100]),
    "checkpoint record gone": lambda r: (r / "checkpoint-2" / "pogdiff_checkpoint.json").unlink(),
}


def zero_middle(path: Path) -> None:
    """4 KiB zeroed in the middle of a file: its format still holds, only its sha256 tells."""
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 4096] = bytes(len(data[middle:middle + 4096]))
    path.write_bytes(bytes(data))


# --- the cases ---

@pytest.fixture(scope="module")
def originals(tmp_path_factory):
    """A small dataset (3 + 3 images, 16 px) and a 2-step run trained on it, with checkpoint-1 and checkpoint-2 (its
    final step); each case works on copies."""
    root = tmp_path_factory.mktemp("fuzz")
    data = write_toy_dataset(root / "data", counts=(3, 3), size=16)
    code = main(["train", str(data), "--output-dir", str(root / "run"), *train_basics(root / "cache"),
                 "--max-train-steps", "2", "--checkpointing-steps", "1"])
    assert code == 0
    return data, root / "run", root / "cache"


def train_basics(cache: Path) -> list[str]:
    return ["--from-scratch", "--max-train-steps", "1", "--train-batch-size", "2", "--k", "2", "--resolution", "16",
            "--cache-dir", str(cache), "--no-progress"]


def draw_case(number: int, sandbox: Path, cache: Path) -> tuple[list[str], Path, list[str]]:
    """(argv, output folder, what was damaged) of case ``number``, its files laid out in ``sandbox``."""
    rng = random.Random(SEED * 1000 + number)
    command = rng.choice(["train", "train", "resume", "sample", "evaluate"])
    damage = rng.sample(sorted(DATASET_DAMAGE), rng.choice([0, 0, 1, 2])) if command != "sample" else []
    if command != "train":
        damage += rng.sample(sorted(RUN_DAMAGE), rng.choice([0, 0, 1]))
    for name in sorted(damage, key=[*DATASET_DAMAGE, *RUN_DAMAGE].index):
        (DATASET_DAMAGE.get(name) or RUN_DAMAGE[name])(sandbox / ("run" if name in RUN_DAMAGE else "data"))
    out = sandbox / ("run" if command == "resume" else rng.choice(["out", "out", "theirs", "empty", "run", "data"]))
    data, run = str(sandbox / "data"), str(sandbox / "run")
    if command == "train":
        argv, pool = ["train", data, "--output-dir", str(out), *train_basics(cache)], TRAIN_OPTIONS
    elif command == "resume":  # the run's own options, continued a step further, then random changes to them
        argv = ["train", data, "--output-dir", run, *train_basics(cache), "--max-train-steps", "3",
                "--checkpointing-steps", "1", "--resume-from-checkpoint", "latest"]
        pool = TRAIN_OPTIONS
    elif command == "sample":
        argv = ["sample", run, "--prompt", "An image of Anna.", "--out", str(out), "--num-images", "1",
                "--num-inference-steps", "2", "--no-progress"]
        pool = SAMPLE_OPTIONS
    else:
        argv = ["evaluate", run, "--data", data, "--out", str(out), "--num-images", "1", "--num-inference-steps", "1",
                "--cache-dir", str(cache), "--no-progress"]
        pool = EVALUATE_OPTIONS
    for flag, values in rng.sample(pool, rng.choice([0, 1, 1, 2, 3])):
        value = rng.choice(values)
        argv += [flag] if value is None else [flag, str(value)]
    return argv, out, damage


def lay_out(sandbox: Path, data: Path, run: Path) -> None:
    """The user's world: a dataset, a finished run, their own files and a folder of theirs that looks like a run."""
    shutil.copytree(data, sandbox / "data")
    shutil.copytree(run, sandbox / "run")
    (sandbox / "precious.txt").write_text("mine")
    (sandbox / "theirs" / "checkpoint-500").mkdir(parents=True)
    (sandbox / "theirs" / "notes.txt").write_text("mine too")
    (sandbox / "empty").mkdir()


def snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_random_options_and_damage_end_in_success_or_one_line(originals, tmp_path, capsys):
    data, run, cache = originals
    outcomes = []
    for number in range(CASES):
        sandbox = tmp_path / f"case-{number}"
        lay_out(sandbox, data, run)
        argv, out, damage = draw_case(number, sandbox, cache)
        replaceable = is_marked(out)  # pogdiff's own run: --overwrite may replace what it holds
        before = snapshot(sandbox)
        what = f"case {number}: pogdiff {' '.join(argv)} (damage: {', '.join(damage) or 'none'})"
        code = main(argv)
        err = capsys.readouterr().err
        assert code in (0, 2), f"{what}: exit {code}\n{err}"
        assert "Traceback" not in err, f"{what}\n{err}"
        if code == 2:
            assert [line for line in err.splitlines() if line.startswith("pogdiff: error: ")] == \
                   [err.splitlines()[-1]], f"{what}\n{err}"
        after = snapshot(sandbox)
        if code == 2 and "--resume-from-checkpoint" in argv:
            assert after == before, f"{what}: a refused resume changed files"
        for path, digest in before.items():
            inside = (sandbox / path).is_relative_to(out)
            if not inside:
                assert after.get(path) == digest, f"{what}: {path} outside the output folder changed"
            elif not replaceable:
                assert path in after, f"{what}: the user's {path} was removed"
        outcomes.append(code)
        shutil.rmtree(sandbox)
    assert 0 < outcomes.count(0) < CASES  # the draw reaches both ends: finished runs, and refusals
