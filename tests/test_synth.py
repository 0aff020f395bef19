"""The procedural people dataset: layout, counts, captions, traits, determinism, safety."""

import json
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pogdiff.data.synth import (
    NAMES,
    PRESETS,
    TRAIT_CHOICES,
    Identity,
    load_identities,
    majority_indices,
    make_identities,
    render,
    write_dataset,
)

HELDOUT = 3


def read_metadata(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]


def all_files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def medium(tmp_path_factory) -> Path:
    return write_dataset(tmp_path_factory.mktemp("synth") / "medium", preset="medium", seed=0,
                         heldout_per_identity=HELDOUT)


def test_presets_are_the_documented_long_tails():
    assert PRESETS["small"] == (30, 2)
    assert PRESETS["medium"] == (30, 30, 15, 10, 6, 3, 2, 2, 2, 2)
    assert Counter(PRESETS["large"]) == {30: 10, 10: 20, 4: 60, 2: 130}
    assert {name: (len(c), sum(c)) for name, c in PRESETS.items()} == {
        "small": (2, 32), "medium": (10, 102), "large": (220, 1000)}
    assert all(list(c) == sorted(c, reverse=True) for c in PRESETS.values())


def test_name_list_is_large_and_unambiguous():
    assert len(set(NAMES)) == len(NAMES) >= 300
    assert all(name.isascii() and name.isalpha() and name == name.capitalize() for name in NAMES)
    lowered = [name.lower() for name in NAMES]
    assert not [(a, b) for a in lowered for b in lowered if a != b and a in b]


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_every_preset_writes_its_counts(tmp_path, preset):
    out = write_dataset(tmp_path / "data", preset=preset, seed=3, heldout_per_identity=1, size=16)
    identities = make_identities(preset, 3)
    train = Counter(row["identity"] for row in read_metadata(out))
    assert [train[identity.name] for identity in identities] == list(PRESETS[preset])
    heldout = Counter(row["identity"] for row in read_metadata(out / "heldout"))
    assert heldout == {identity.name: 1 for identity in identities}
    described = json.loads((out / "synth.json").read_text())["identities"]
    assert [entry["train_images"] for entry in described] == list(PRESETS[preset])


def test_metadata_rows_point_at_rgb_pngs_of_the_right_size(medium):
    for folder in (medium, medium / "heldout"):
        rows = read_metadata(folder)
        assert len({row["file_name"] for row in rows}) == len(rows)
        for row in rows:
            assert set(row) == {"file_name", "text", "identity"}
            assert row["file_name"].startswith("images/") and row["file_name"].endswith(".png")
            with Image.open(folder / row["file_name"]) as image:
                assert (image.format, image.mode, image.size) == ("PNG", "RGB", (32, 32))
        assert len(list((folder / "images").iterdir())) == len(rows)


def test_heldout_split_has_renders_of_every_identity_unlike_training(medium):
    names = [identity.name for identity in load_identities(medium / "synth.json")]
    heldout = read_metadata(medium / "heldout")
    assert Counter(row["identity"] for row in heldout) == {name: HELDOUT for name in names}
    train_images = {(medium / row["file_name"]).read_bytes() for row in read_metadata(medium)}
    assert not train_images & {(medium / "heldout" / row["file_name"]).read_bytes() for row in heldout}


def test_captions_name_the_person_and_vary(medium):
    names = [identity.name for identity in load_identities(medium)]
    captions = defaultdict(list)
    for row in read_metadata(medium) + read_metadata(medium / "heldout"):
        text = row["text"]
        assert text.startswith(f"An image of {row['identity']}, ")
        assert " background" in text and text.endswith((" background.", " light."))
        assert [name for name in names if name in text] == [row["identity"]]
        captions[row["identity"]].append(text)
    assert all(len(set(texts)) > 1 for texts in captions.values())


def test_synth_json_describes_the_dataset(medium):
    description = json.loads((medium / "synth.json").read_text())
    assert {k: description[k] for k in ("generator", "preset", "seed", "size")} == {
        "generator": "pogdiff.data.synth", "preset": "medium", "seed": 0, "size": 32}
    assert [entry["name"] for entry in description["identities"]] == \
        [identity.name for identity in make_identities("medium", 0)]


def test_load_identities_round_trip_renders_identically(medium):
    loaded = load_identities(medium / "synth.json")
    assert loaded == make_identities("medium", 0)
    assert load_identities(medium) == loaded
    for original, restored in zip(make_identities("medium", 0), loaded):
        image_a, caption_a = render(original, np.random.default_rng(7))
        image_b, caption_b = render(restored, np.random.default_rng(7))
        assert caption_a == caption_b
        assert np.array_equal(np.asarray(image_a), np.asarray(image_b))


def test_same_seed_is_byte_identical_and_another_seed_differs(tmp_path, medium):
    again = write_dataset(tmp_path / "again", preset="medium", seed=0, heldout_per_identity=HELDOUT)
    assert all_files(again) == all_files(medium)
    other = write_dataset(tmp_path / "other", preset="medium", seed=1, heldout_per_identity=HELDOUT)
    assert {i.name for i in make_identities("medium", 1)} != {i.name for i in make_identities("medium", 0)}
    assert [i.traits for i in make_identities("medium", 1)] != [i.traits for i in make_identities("medium", 0)]
    assert (other / "images" / "0000.png").read_bytes() != (medium / "images" / "0000.png").read_bytes()


@pytest.mark.parametrize("preset", sorted(PRESETS))
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_identities_are_distinct_and_minorities_look_like_majorities(preset, seed):
    identities = make_identities(preset, seed)
    assert len({identity.name for identity in identities}) == len(identities)
    for identity in identities:
        assert set(identity.traits) == set(TRAIT_CHOICES)
        assert all(identity.traits[t] in TRAIT_CHOICES[t] for t in TRAIT_CHOICES)
        json.dumps(identity.traits)
    trait_sets = [tuple(sorted(identity.traits.items())) for identity in identities]
    assert len(set(trait_sets)) == len(trait_sets)
    for a in range(len(identities)):
        for b in range(a):
            assert sum(identities[a].traits[t] != identities[b].traits[t] for t in TRAIT_CHOICES) >= 2

    majority = [identities[i] for i in majority_indices(PRESETS[preset])]
    majority_names = {identity.name for identity in majority}
    for identity in identities:
        if identity.name in majority_names:
            assert identity.look_alike_of is None
            continue
        parent = next(m for m in majority if m.name == identity.look_alike_of)
        shared = sum(identity.traits[t] == parent.traits[t] for t in TRAIT_CHOICES)
        assert shared == len(TRAIT_CHOICES) // 2


def test_majority_is_the_head_of_each_preset():
    assert majority_indices(PRESETS["small"]) == [0]
    assert majority_indices(PRESETS["medium"]) == [0, 1, 2]
    assert majority_indices(PRESETS["large"]) == list(range(10))


def test_render_varies_per_image_and_honours_size():
    identity = make_identities("small", 0)[1]
    rng = np.random.default_rng(0)
    renders = [render(identity, rng, size=48) for _ in range(8)]
    assert all(image.mode == "RGB" and image.size == (48, 48) for image, _ in renders)
    assert len({np.asarray(image).tobytes() for image, _ in renders}) == 8
    assert len({text for _, text in renders}) > 1


def test_refuses_to_write_into_a_non_empty_folder(tmp_path):
    out = tmp_path / "precious"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="precious.*empty folder"):
        write_dataset(out, preset="small")
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    assert (out / "notes.txt").read_text() == "keep me"


def test_writes_into_an_existing_empty_folder(tmp_path):
    out = tmp_path / "empty"
    out.mkdir()
    assert write_dataset(str(out), preset="small", heldout_per_identity=0) == out
    assert len(read_metadata(out)) == 32 and read_metadata(out / "heldout") == []


def test_unknown_preset_names_the_valid_ones(tmp_path):
    with pytest.raises(ValueError, match="small, medium, large"):
        make_identities("huge", 0)
    with pytest.raises(ValueError, match="small, medium, large"):
        write_dataset(tmp_path / "out", preset="huge")
    assert not (tmp_path / "out").exists()


def test_identity_is_a_plain_record():
    identity = Identity("Lukas", {"skin": "fair"})
    assert identity.look_alike_of is None and identity.traits == {"skin": "fair"}
