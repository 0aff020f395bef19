"""The pretraining corpus of the small backbone: many anonymous people, described by what they look like.

The paper fine-tunes Stable Diffusion, a model that already draws people and follows
captions; its datasets' names (AgeDB, DigiFace) are new words it must bind to a person.
This corpus gives the small backbone the same starting point. It comes from the same
generator as the fine-tuning presets (:mod:`pogdiff.data.synth`), but

- it is balanced: ``people`` people with ``images_per_person`` images each;
- its people are not those of the presets: each differs in at least
  :data:`~pogdiff.data.synth.MIN_TRAIT_DIFFERENCES` traits from every identity of the
  small, medium and large presets at generator seeds ``0 .. EXCLUDED_PRESET_SEEDS - 1``;
- its captions name no one. They say what a captioning model would see (hair colour and
  style, skin, eyes, glasses, beard, shirt, face shape, expression, background, light),
  each trait with some probability and in varied phrasing, e.g. "A photo of a person with
  curly blonde hair and glasses, wearing a red shirt, smiling, in front of a blue
  background." Fine-tuning captions ("An image of Lukas, smiling, in front of ...")
  then use words the model knows around a name it does not.

``heldout/`` holds images of further people, never trained on, for a held-out loss.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from pogdiff.data.synth import (EXPRESSIONS, MIN_TRAIT_DIFFERENCES, PRESETS, Look, draw_portrait, make_identities,
                                random_look, random_traits, refuse_non_empty, trait_differences)

EXCLUDED_PRESET_SEEDS = 10
"""Pretraining people differ from the presets' identities at generator seeds 0..9."""

TRAIT_MENTION_PROBABILITY: dict[str, float] = {
    # how often a caption names each trait; the ones a prompt is most likely to ask for most often
    "hair": 0.85, "skin": 0.6, "eye_colour": 0.4, "glasses": 0.8, "beard": 0.7, "shirt": 0.8, "face_shape": 0.3,
    "expression": 0.8, "background": 0.85, "lighting": 0.8,
}
SUBJECTS = ("An image of a person", "A photo of a person", "A portrait of someone", "A picture of a person",
            "A headshot of a person", "An image of someone")
BACKGROUND_PHRASES = ("in front of {a} {c} background", "against {a} {c} backdrop", "on {a} {c} background")
_PRETRAIN_STREAM, _HELDOUT_STREAM = 2, 3


def write_pretraining_corpus(out_dir: str | Path, people: int = 5000, images_per_person: int = 4, seed: int = 0,
                             heldout_people: int = 100, size: int = 32) -> Path:
    """Write the corpus into the new or empty folder ``out_dir``; the same arguments write the same files.

    ``out_dir/metadata.jsonl`` + ``images/`` (``people * images_per_person`` rows, identity
    column = an anonymous person id), ``heldout/`` (``heldout_people`` further people, 2
    images each) and ``corpus.json`` (the arguments and every person's traits).
    """
    if people < 2 or images_per_person < 1 or heldout_people < 0:
        raise ValueError(f"need people >= 2, images_per_person >= 1, heldout_people >= 0; got {people}, "
                         f"{images_per_person}, {heldout_people}")
    if size < 8:
        raise ValueError(f"size must be at least 8 pixels, got {size}")
    out = Path(out_dir)
    refuse_non_empty(out)
    traits = draw_people(people + heldout_people, seed)
    _write_split(out, traits[:people], images_per_person, seed, _PRETRAIN_STREAM, size, first_id=0)
    _write_split(out / "heldout", traits[people:], 2, seed, _HELDOUT_STREAM, size, first_id=people)
    description = {"generator": "pogdiff.data.pretraining_corpus", "seed": seed, "people": people,
                   "images_per_person": images_per_person, "heldout_people": heldout_people, "size": size,
                   "excluded_preset_seeds": EXCLUDED_PRESET_SEEDS, "traits": traits}
    (out / "corpus.json").write_text(json.dumps(description) + "\n", encoding="utf-8")
    return out


def draw_people(count: int, seed: int) -> list[dict]:
    """``count`` trait sets, each far enough (in traits) from every preset identity of the excluded seeds."""
    excluded = [identity.traits for preset in PRESETS for preset_seed in range(EXCLUDED_PRESET_SEEDS)
                for identity in make_identities(preset, preset_seed)]
    rng = np.random.default_rng([seed, _PRETRAIN_STREAM])
    people = []
    while len(people) < count:
        traits = random_traits(rng)
        if all(trait_differences(traits, other) >= MIN_TRAIT_DIFFERENCES for other in excluded):
            people.append(traits)
    return people


def describe(traits: dict, look: Look, rng: np.random.Generator) -> str:
    """A name-free caption of one image: a random subset of what it shows, in a random phrasing."""
    mention = {part: rng.random() < p for part, p in TRAIT_MENTION_PROBABILITY.items()}
    features = []  # "with ..." phrases
    if mention["hair"]:
        features.append(_hair(traits, rng))
    if mention["skin"]:
        features.append(f"{traits['skin']} skin")
    if mention["eye_colour"]:
        features.append(f"{traits['eye_colour']} eyes")
    if mention["face_shape"]:
        features.append(f"{'an' if traits['face_shape'][0] in 'aeiou' else 'a'} {traits['face_shape']} face")
    if mention["beard"]:
        features.append({"none": "no beard", "stubble": "stubble", "moustache": "a moustache",
                         "full": "a full beard"}[traits["beard"]])
    wearing = []  # "wearing ..." phrases
    if mention["glasses"]:
        if traits["glasses"] == "none":
            features.append("no glasses")
        else:
            wearing.append(f"{traits['glasses']} glasses")
    if mention["shirt"]:
        wearing.append(f"a {traits['shirt']} {rng.choice(('shirt', 'top', 'sweater'))}")
    rng.shuffle(features)
    rng.shuffle(wearing)
    parts = [str(rng.choice(SUBJECTS))]
    if features:
        parts[0] += " with " + _join(features)
    if wearing:
        parts.append("wearing " + _join(wearing))
    if mention["expression"]:
        parts.append(EXPRESSIONS[look.expression])
    if mention["background"]:
        article = "an" if look.background[0] in "aeiou" else "a"
        parts.append(str(rng.choice(BACKGROUND_PHRASES)).format(a=article, c=look.background))
    if mention["lighting"] and look.lighting != "natural":
        parts.append(f"in {look.lighting} light")
    return ", ".join(parts) + "."


def _hair(traits: dict, rng: np.random.Generator) -> str:
    colour, style = traits["hair_colour"], traits["hair_style"]
    if style == "bald":
        return "a bald head" if rng.random() < 0.5 else f"a bald head and {colour} hair at the sides"
    return f"{style} {colour} hair" if rng.random() < 0.7 else f"{colour} hair"


def _join(phrases: list[str]) -> str:
    return phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]


def _write_split(folder: Path, people: list[dict], images_per_person: int, seed: int, stream: int, size: int,
                 first_id: int) -> None:
    (folder / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    digits = len(str(len(people) * images_per_person - 1))
    for person, traits in enumerate(people):
        for shot in range(images_per_person):
            rng = np.random.default_rng([seed, stream, person, shot])  # an image does not depend on the others
            look = random_look(rng)
            file_name = f"images/{len(rows):0{digits}d}.png"
            draw_portrait(traits, look, size).save(folder / file_name, format="PNG")
            rows.append({"file_name": file_name, "text": describe(traits, look, rng),
                         "identity": f"person-{first_id + person}"})
    with open(folder / "metadata.jsonl", "w", encoding="utf-8", newline="\n") as metadata:
        metadata.writelines(json.dumps(row) + "\n" for row in rows)
