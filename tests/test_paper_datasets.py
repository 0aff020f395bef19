"""`pogdiff data agedb|digiface|vggface2`: the paper's sets, built from look-alike downloads made here."""

import io
import json
import re
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from pogdiff.cli import main
from pogdiff.data.dataset import load_dataset
from pogdiff.data.paper_datasets import (FEMALE_NAMES, MALE_NAMES, PAPER_SIZES, UNISEX_NAMES, SourceIdentity,
                                         build_paper_dataset, generated_caption, load_captioner, long_tailed_counts,
                                         mask_real_names, name_words)
from pogdiff.data.synth import NAMES

FIRST = ["Albert", "Marlon", "Audrey", "Grace", "Charles", "Clark", "Marilyn", "Humphrey", "Bette", "Orson", "Judy",
         "Spencer", "Vivien", "Gregory", "Lauren", "Ingmar"]
LAST = ["Einstein", "Brando", "Hepburn", "Kelly", "Chaplin", "Gable", "Monroe", "Bogart", "Davis", "Welles",
        "Garland", "Tracy", "Leigh", "Peck", "Bacall"]
REAL_NAMES = [first + last for last in LAST for first in FIRST]  # 240, "AlbertEinstein" as AgeDB spells them


def tiny_image(index: int, format: str) -> bytes:
    """A 4x4 image whose bytes differ from every other index's."""
    image = Image.new("RGB", (4, 4), (index % 256, index // 256 % 256, 7))
    buffer = io.BytesIO()
    image.save(buffer, format=format)
    return buffer.getvalue()


def image_counts(identities: int, images: int, spare: int = 3, extra: int = 10) -> list[int]:
    """Images per source identity: enough for the profile with ``spare`` left over each, plus ``extra`` identities
    of 4 images (never enough for a 30-image slot)."""
    return [count + spare for count in long_tailed_counts(identities, images)] + [4] * extra


def make_agedb(folder: Path, counts: list[int]) -> Path:
    """AgeDB's flat folder: ``<n>_<Name>_<age>_<gender>.jpg``, genders alternating."""
    folder.mkdir(parents=True)
    n = 0
    for person, count in enumerate(counts):
        for _ in range(count):
            name = f"{n}_{REAL_NAMES[person]}_{20 + n % 60}_{'mf'[person % 2]}.jpg"
            (folder / name).write_bytes(tiny_image(n, "JPEG"))
            n += 1
    (folder / "README.txt").write_text("not an image")
    return folder


def make_folders(folder: Path, counts: list[int], identity, file, format: str) -> Path:
    """``<identity(i)>/<file(k)>`` folders (DigiFace-1M, VGGFace2)."""
    n = 0
    for person, count in enumerate(counts):
        (folder / identity(person)).mkdir(parents=True)
        for k in range(count):
            (folder / identity(person) / file(k)).write_bytes(tiny_image(n, format))
            n += 1
    return folder


def make_digiface(folder: Path, counts: list[int]) -> Path:
    return make_folders(folder, counts, str, lambda k: f"{k}.png", "PNG")


def make_vggface2(root: Path, counts: list[int]) -> Path:
    """``root/train/n00000<i>/<nnnn_nn>.jpg`` and ``root/identity_meta.csv`` (VGGFace2's columns and quoting)."""
    train = make_folders(root / "train", counts, lambda i: f"n{i + 1:06d}", lambda k: f"{k + 1:04d}_01.jpg", "JPEG")
    lines = ["Class_ID, Name, Sample_Num, Flag, Gender"]
    lines += [f'n{i + 1:06d}, "{FIRST[i % 16]}_{LAST[i // 16]}", {count}, 1, {"mf"[i % 2]}'
              for i, count in enumerate(counts)]
    (root / "identity_meta.csv").write_text("\n".join(lines) + "\n")
    return train


MAKERS = {"agedb": make_agedb, "digiface": make_digiface, "vggface2": make_vggface2}


def source_folder(tmp_path: Path, source: str, preset: str, **kwargs) -> Path:
    return MAKERS[source](tmp_path / source, image_counts(*PAPER_SIZES[source][preset], **kwargs))


def build(source_dir: Path, out: Path, source: str, *options: str) -> int:
    return main(["data", source, str(source_dir), str(out), *options])


def rows(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]


def tree(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def real_words() -> set[str]:
    return {word for name in REAL_NAMES for word in name_words(name)}


def test_the_profile_hits_the_papers_totals_from_30_down_to_2():
    for sizes in PAPER_SIZES.values():
        for identities, images in sizes.values():
            counts = long_tailed_counts(identities, images)
            assert (len(counts), sum(counts), counts[0], counts[-1]) == (identities, images, 30, 2)
            assert list(counts) == sorted(counts, reverse=True)
    # the table in docs/dataset-format.md
    assert long_tailed_counts(10, 100) == (30, 22, 16, 11, 7, 5, 3, 2, 2, 2)
    large = Counter(long_tailed_counts(223, 976))
    assert (large[30], large[2], sum(n for count, n in large.items() if count <= 5)) == (1, 154, 184)
    for impossible in [(2, 40), (10, 40), (10, 300), (1, 30)]:
        with pytest.raises(ValueError):
            long_tailed_counts(*impossible)


# load_dataset's warning about single-image identities is about training; heldout/ may have them
@pytest.mark.filterwarnings("ignore::pogdiff.errors.PogdiffWarning")
@pytest.mark.parametrize("source,preset", [("agedb", "small"), ("agedb", "medium"), ("agedb", "large"),
                                           ("digiface", "large"), ("vggface2", "small")])
def test_each_preset_gives_the_papers_counts_with_pseudonyms_and_heldout(tmp_path, source, preset, capsys):
    source_dir = source_folder(tmp_path, source, preset)
    out = tmp_path / "out"
    assert build(source_dir, out, source, "--preset", preset, "--max-heldout", "2") == 0
    train = rows(out)
    identities, images = PAPER_SIZES[source][preset]
    per_identity = Counter(row["identity"] for row in train)
    assert (len(per_identity), len(train)) == (identities, images)
    assert tuple(sorted(per_identity.values(), reverse=True)) == long_tailed_counts(identities, images)
    assert set(per_identity) <= set(NAMES)
    assert load_dataset(out).identity_counts() == per_identity  # the project's own reader takes it

    record = json.loads((out / "names.json").read_text())
    by_pseudonym = {entry["identity"]: entry for entry in record["identities"]}
    assert set(by_pseudonym) == set(per_identity)
    heldout = rows(out / "heldout")
    assert len(load_dataset(out / "heldout")) == len(heldout)
    assert {row["identity"] for row in heldout} <= set(per_identity)
    for pseudonym, entry in by_pseudonym.items():
        train_sources = {item["source"] for item in entry["train"]}
        heldout_sources = {item["source"] for item in entry["heldout"]}
        assert len(train_sources) == per_identity[pseudonym] and not train_sources & heldout_sources
        own = {path for path in tree(source_dir) if re.match(rf"(.*_)?{entry['source_identity']}[_/]", path)}
        assert train_sources | heldout_sources <= own  # copies of the identity's own files, bytes unchanged
        assert len(heldout_sources) == min(2, len(own) - len(train_sources))  # --max-heldout caps it
        for item in entry["train"] + entry["heldout"]:
            assert (out / item["file_name"]).read_bytes() == (source_dir / item["source"]).read_bytes()
        if entry["gender"] is not None:
            assert pseudonym in (FEMALE_NAMES if entry["gender"] == "f" else MALE_NAMES) | UNISEX_NAMES
    assert sorted(row["file_name"] for row in heldout) == sorted(
        item["file_name"].removeprefix("heldout/") for entry in record["identities"] for item in entry["heldout"])

    if source != "digiface":  # no real name, nor a word of one, outside names.json
        assert record["identities"][0]["real_name"] in (out / "names.json").read_text()
        leak = re.compile("|".join(sorted(real_words())), re.IGNORECASE)
        for path, content in tree(out).items():
            assert not leak.search(path)
            if path.endswith(".jsonl"):
                assert not leak.search(content.decode())
    assert "wrote" in capsys.readouterr().out


def test_template_captions_come_from_the_files_metadata(tmp_path):
    agedb = source_folder(tmp_path, "agedb", "small")
    assert build(agedb, tmp_path / "a", "agedb", "--preset", "small") == 0
    record = json.loads((tmp_path / "a" / "names.json").read_text())
    texts = {row["file_name"]: row["text"] for row in rows(tmp_path / "a")}
    for entry in record["identities"]:
        for item in entry["train"]:
            age, gender = re.match(r"\d+_\w+_(\d+)_([mf])\.jpg", item["source"]).groups()
            who = {"m": "man", "f": "woman"}[gender]
            assert texts[item["file_name"]] == f"An image of {entry['identity']}, a {age}-year-old {who}."

    vggface2 = source_folder(tmp_path, "vggface2", "small")
    assert build(vggface2, tmp_path / "v", "vggface2") == 0
    record = json.loads((tmp_path / "v" / "names.json").read_text())
    genders = {entry["identity"]: entry["gender"] for entry in record["identities"]}
    assert {row["text"] for row in rows(tmp_path / "v")} == {
        f"An image of {name}, a {'woman' if gender == 'f' else 'man'}." for name, gender in genders.items()}

    (tmp_path / "vggface2" / "identity_meta.csv").unlink()  # without names and genders
    assert build(vggface2, tmp_path / "w", "vggface2") == 0
    assert all(re.fullmatch(r"An image of [A-Za-z]+\.", row["text"]) for row in rows(tmp_path / "w"))
    assert all(entry["real_name"] is None for entry in json.loads((tmp_path / "w" / "names.json").read_text())[
        "identities"])


def test_the_same_seed_writes_the_same_bytes_and_another_seed_chooses_others(tmp_path):
    source_dir = source_folder(tmp_path, "agedb", "medium", extra=20)
    for name, seed in [("a", "0"), ("b", "0"), ("c", "1")]:
        assert build(source_dir, tmp_path / name, "agedb", "--preset", "medium", "--seed", seed) == 0
    assert tree(tmp_path / "a") == tree(tmp_path / "b")

    def chosen(name):
        record = json.loads((tmp_path / name / "names.json").read_text())
        return [(e["source_identity"], e["identity"], [i["source"] for i in e["train"]]) for e in record["identities"]]

    assert chosen("a") != chosen("c")


def test_the_captioner_output_is_masked_and_combined_with_the_pseudonym(tmp_path):
    agedb = source_folder(tmp_path, "agedb", "medium")
    seen = []

    def captioner(paths):
        seen.extend(paths)
        return [f"{re.search(r'_([A-Za-z]+)_', p.name)[1]} (Albert Einstein) smiling.\nIn front of a white wall"
                for p in paths]

    out = build_paper_dataset("agedb", agedb, tmp_path / "out", "medium", captioner=captioner)
    train = rows(out)
    assert len(seen) == len(train) == 100
    for row in train:
        assert re.fullmatch(rf"An image of {row['identity']}, \S.*\.", row["text"]), row["text"]
        assert "\n" not in row["text"] and "white wall" in row["text"]
        assert not re.search("|".join(sorted(real_words())), row["text"], re.IGNORECASE)
    assert all(row["text"].startswith(f"An image of {row['identity']}, a ") for row in rows(out / "heldout"))


def write_tiny_captioner(folder: Path) -> Path:
    """A random LLaVA (1-layer CLIP vision tower, 1-layer Llama) with a word-level tokenizer and a chat template,
    saved as transformers saves one, built offline in a second. Its generation may not end nor emit the chat's
    own tokens, so it writes 60 words of its vocabulary, real names among them."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import (CLIPImageProcessor, CLIPVisionConfig, LlamaConfig, LlavaConfig,
                              LlavaForConditionalGeneration, LlavaProcessor, PreTrainedTokenizerFast)

    special = ["<unk>", "<pad>", "<s>", "</s>", "<image>", "USER:", "ASSISTANT:"]
    words = special + ["Albert", "Einstein", "EINSTEIN", "Grace", "smiling", "in", "front", "of", "a", "white", "wall"]
    tokenizer = Tokenizer(models.WordLevel({word: i for i, word in enumerate(words)}, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", pad_token="<pad>",
                                        bos_token="<s>", eos_token="</s>", padding_side="left",
                                        extra_special_tokens={"image_token": "<image>"})
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                       num_attention_heads=2, image_size=16, patch_size=8),
        text_config=LlamaConfig(vocab_size=len(words), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                num_attention_heads=2, num_key_value_heads=2, bos_token_id=2, eos_token_id=3,
                                pad_token_id=1),
        image_token_index=words.index("<image>"), vision_feature_layer=-1, vision_feature_select_strategy="default")
    model = LlavaForConditionalGeneration(config)
    model.generation_config.suppress_tokens = list(range(len(special)))
    after = {"white": "Albert", "smiling": "EINSTEIN"}  # a real name's words after some of its own
    model.generation_config.sequence_bias = [[[words.index(a), words.index(b)], 100.0] for a, b in after.items()]
    model.save_pretrained(folder)
    pixels = CLIPImageProcessor(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16})
    LlavaProcessor(image_processor=pixels, tokenizer=tokenizer, patch_size=8, vision_feature_select_strategy="default",
                   image_token="<image>", num_additional_image_tokens=1,
                   chat_template="{% for m in messages %}USER: {% for c in m['content'] %}{% if c['type'] == 'image' %}"
                   "<image> {% else %}{{ c['text'] }}{% endif %}{% endfor %} ASSISTANT:{% endfor %}",
                   ).save_pretrained(folder)
    return folder


def test_a_captioner_model_describes_the_training_images_without_real_names(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = write_tiny_captioner(tmp_path / "captioner")
    agedb = source_folder(tmp_path, "agedb", "small")
    raw = load_captioner(str(model))(sorted(agedb.glob("*.jpg"))[:1])[0]
    assert "Albert" in raw and "EINSTEIN" in raw  # it writes a real name
    for out in ("a", "b"):
        assert build(agedb, tmp_path / out, "agedb", "--preset", "small", "--captioner", str(model),
                     "--captioner-batch-size", "5") == 0
    train = rows(tmp_path / "a")
    assert train == rows(tmp_path / "b")  # greedy decoding on the CPU: the same captions
    leak = re.compile("|".join(sorted(real_words())), re.IGNORECASE)
    for row in train:
        assert row["text"].startswith(f"An image of {row['identity']}, ") and not leak.search(row["text"]), row
    assert any(re.search(r"\b(smiling|front|wall)\b", row["text"]) for row in train)  # the model's own words


def test_a_real_name_is_masked_in_every_spelling():
    assert name_words("J.P.Morgan") == ["J", "P", "Morgan"]
    assert name_words("14th_Dalai_Lama") == ["14th", "Dalai", "Lama"]
    assert name_words("AlbertEinstein") == ["Albert", "Einstein"]
    for text in ["Albert Einstein smiling", "ALBERT EINSTEIN smiling", "albert_einstein smiling",
                 "AlbertEinstein smiling", "Einstein smiling", "Albert, Einstein smiling", "EINSTEIN smiling"]:
        assert mask_real_names(text, ["AlbertEinstein"], "Lukas") == "Lukas smiling", text
    # another person's name too: the captioner took the person in the photo for them
    assert mask_real_names("Grace Kelly beside Monroe", ["AlbertEinstein", "GraceKelly", "MarilynMonroe", None],
                           "Lukas") == "Lukas beside Lukas"
    # lower-case words of the name are other words: "white" stays for Barry White
    assert mask_real_names("White shirt, white wall", ["BarryWhite"], "Lukas") == "Lukas shirt, white wall"
    assert mask_real_names("a man", [None], "Lukas") == "a man"
    assert generated_caption("Lukas", "  A man,\n smiling.  ", ["AlbertEinstein"]) == (
        "An image of Lukas, a man, smiling.")
    assert generated_caption("Lukas", "Albert Einstein.", ["AlbertEinstein"]) == "An image of Lukas, Lukas."
    assert generated_caption("Lukas", " . ", []) == "An image of Lukas."


def test_pseudonyms_are_distinct_gendered_and_never_a_word_of_a_real_name():
    from pogdiff.data.paper_datasets import draw_pseudonyms
    import numpy as np

    assert FEMALE_NAMES <= set(NAMES) and UNISEX_NAMES <= set(NAMES) and not FEMALE_NAMES & UNISEX_NAMES
    people = [SourceIdentity(f"p{i}", f"Emma{LAST[i % 15]}" if i % 3 else None, "mf"[i % 2] if i % 5 else None, ())
              for i in range(180)]
    names = draw_pseudonyms(people, np.random.default_rng(0))
    assert len(set(names)) == len(names) and "Emma" not in names
    for person, name in zip(people, names):
        if person.gender:
            assert name in (FEMALE_NAMES if person.gender == "f" else MALE_NAMES) | UNISEX_NAMES


@pytest.mark.parametrize("case", ["missing", "a_file", "no_pattern", "too_few", "out_not_empty", "bad_meta",
                                  "captioner_missing"])
def test_refusals_are_one_line_and_leave_nothing(tmp_path, capsys, monkeypatch, case):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    agedb = source_folder(tmp_path, "agedb", "small")
    out = tmp_path / "out"
    source, argv_source, preset, options = "agedb", agedb, "small", []
    if case == "missing":
        argv_source = tmp_path / "nowhere"
    elif case == "a_file":
        argv_source = agedb / "README.txt"
    elif case == "no_pattern":
        argv_source = tmp_path / "photos"
        argv_source.mkdir()
        (argv_source / "AlbertEinstein.jpg").write_bytes(tiny_image(0, "JPEG"))
    elif case == "too_few":
        preset = "medium"
    elif case == "out_not_empty":
        out.mkdir()
        (out / "notes.txt").write_text("mine")
    elif case == "bad_meta":
        source, argv_source = "vggface2", source_folder(tmp_path, "vggface2", "small")
        (tmp_path / "vggface2" / "identity_meta.csv").write_text("id;name\n")
    else:
        options = ["--captioner", str(tmp_path / "no-model")]
    named = {"out_not_empty": out, "bad_meta": tmp_path / "vggface2" / "identity_meta.csv",
             "captioner_missing": tmp_path / "no-model"}.get(case, argv_source)
    before = tree(tmp_path), sorted(tmp_path.rglob("*"))
    assert build(argv_source, out, source, "--preset", preset, *options) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and error.startswith(f"pogdiff: error: {named}: ")
    assert (tree(tmp_path), sorted(tmp_path.rglob("*"))) == before


def test_option_values_are_checked(tmp_path, capsys):
    agedb = source_folder(tmp_path, "agedb", "small")
    assert build(agedb, tmp_path / "out", "agedb", "--max-heldout", "-1") == 2
    assert "--max-heldout" in capsys.readouterr().err
    assert build(agedb, tmp_path / "out", "agedb", "--captioner-batch-size", "0") == 2
    assert "--captioner-batch-size" in capsys.readouterr().err
    assert build(agedb, tmp_path / "out", "digiface", "--preset", "small") == 2  # digiface has only large
    assert not (tmp_path / "out").exists()
    assert build(agedb, tmp_path / "out", "agedb", "--preset", "small", "--max-heldout", "0") == 0
    assert not (tmp_path / "out" / "heldout").exists()
