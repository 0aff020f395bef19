"""The embedded synthetic people: determinism, preset sizes, captions, look-alikes, safety."""

import json
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from pogdiff.data.synth import PRESETS, load_identities, make_identities, render, write_dataset


def rows(folder):
    return [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]


def test_same_seed_writes_identical_files_and_another_seed_differs(tmp_path):
    a, b, c = (write_dataset(tmp_path / n, "small", seed=s) for n, s in (("a", 0), ("b", 0), ("c", 1)))
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files)
    assert (a / "metadata.jsonl").read_text() != (c / "metadata.jsonl").read_text()


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_counts_per_identity_follow_the_preset(preset):
    identities = make_identities(preset, seed=3)
    assert len(identities) == len(PRESETS[preset])
    assert len({i.name for i in identities}) == len(identities)
    expected = {"small": (2, 32), "medium": (10, 102), "large": (220, 1000)}[preset]
    assert (len(PRESETS[preset]), sum(PRESETS[preset])) == expected


def test_dataset_layout_counts_captions_and_heldout(tmp_path):
    out = write_dataset(tmp_path / "d", "medium", seed=0, heldout_per_identity=3)
    train = rows(out)
    counts = Counter(r["identity"] for r in train)
    names = [i["name"] for i in json.loads((out / "synth.json").read_text())["identities"]]
    assert [counts[n] for n in names] == list(PRESETS["medium"])
    for row in train:
        with Image.open(out / row["file_name"]) as image:
            assert image.mode == "RGB" and image.size == (32, 32)
        assert row["text"].startswith(f"An image of {row['identity']}")
    for name in names:  # captions describe each image: they differ within a person
        assert len({r["text"] for r in train if r["identity"] == name}) > 1
    held = rows(out / "heldout")
    assert Counter(r["identity"] for r in held) == {n: 3 for n in names}
    assert all((out / "heldout" / r["file_name"]).is_file() for r in held)


def test_identities_are_distinct_and_minorities_look_like_a_majority():
    identities = make_identities("large", seed=0)
    trait_sets = [tuple(sorted(i.traits.items())) for i in identities]
    assert len(set(trait_sets)) == len(identities)
    by_name = {i.name: i for i in identities}
    minorities = [i for i, count in zip(identities, PRESETS["large"]) if count == 2]
    for person in minorities:
        parent = by_name[person.look_alike_of]
        shared = sum(person.traits[t] == parent.traits[t] for t in person.traits)
        assert 1 <= shared < len(person.traits)


def test_load_identities_round_trip_renders_the_same_images(tmp_path):
    out = write_dataset(tmp_path / "d", "small", seed=5)
    for original, loaded in zip(make_identities("small", 5), load_identities(out / "synth.json")):
        assert loaded == original
        a, caption_a = render(original, np.random.default_rng(9))
        b, caption_b = render(loaded, np.random.default_rng(9))
        assert np.array_equal(np.asarray(a), np.asarray(b)) and caption_a == caption_b


def test_refuses_a_non_empty_folder_and_unknown_presets(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="pick an empty folder"):
        write_dataset(tmp_path / "d", "small")
    assert (tmp_path / "d" / "keep.txt").read_text() == "mine"
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == ["keep.txt"]
    with pytest.raises(ValueError, match="valid presets"):
        write_dataset(tmp_path / "e", "huge")
