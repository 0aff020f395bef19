"""Procedural, offline stand-in for the paper's people datasets.

PoGDiff is evaluated on long-tailed sets of real people's photos (AgeDB-IT2I and
DigiFace-IT2I: a few identities with many images, many identities with one or two),
captioned by LLaVA as "An image of <name>, <expression>, in front of <background>".
Those sets cannot be downloaded here, so this module draws little face portraits
instead, deterministically and with nothing but PIL and numpy:

- every identity has fixed, visible traits (skin tone, hair colour and style, eye
  colour, glasses, beard, shirt colour, face shape), so a model must learn who the
  name stands for;
- every image varies what such a caption describes (expression, background colour,
  lighting) plus a small shift and zoom of the head;
- minority identities are look-alikes of a majority identity (they copy half of its
  traits), which is exactly the situation where a fine-tuned model tends to draw the
  majority person for a minority person's name.

:func:`write_dataset` writes the image-caption folder that training reads, a held-out
folder of further renders per identity ("real" images for the metrics), and
``synth.json``, from which :func:`load_identities` rebuilds the identities so an
evaluator can :func:`render` fresh images of anyone.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
from PIL import Image, ImageDraw

from pogdiff.errors import DatasetError

RGB = tuple[int, int, int]

PRESETS: dict[str, tuple[int, ...]] = {
    "small": (30, 2),
    "medium": (30, 30, 15, 10, 6, 3, 2, 2, 2, 2),
    "large": (30,) * 10 + (10,) * 20 + (4,) * 60 + (2,) * 130,
}
"""Training images per identity, majority first."""

# Common first names of many origins, ASCII only. No name contains another one (so a
# caption names exactly one person) and none is a word the captions use otherwise.
NAMES: tuple[str, ...] = (
    "Lukas", "Emma", "Noah", "Olivia", "Liam", "Sophia", "Mason", "Isabella", "Ethan", "Logan",
    "Charlotte", "Lucas", "Amelia", "Jackson", "Harper", "Aiden", "Evelyn", "Oliver", "Abigail",
    "Elijah", "Emily", "Grayson", "Madison", "Carter", "Avery", "Sebastian", "Scarlett", "Wyatt",
    "Victoria", "Owen", "Gabriel", "Chloe", "Julian", "Camila", "Isaac", "Penelope", "Nathan",
    "Layla", "Caleb", "Zoey", "Hunter", "Nora", "Connor", "Lily", "Jeremiah", "Eleanor", "Adrian",
    "Hannah", "Thomas", "Lillian", "Dylan", "Addison", "Ryan", "Aubrey", "Christopher", "Ellie",
    "Joshua", "Stella", "Andrew", "Natalie", "Hudson", "Christian", "Leah", "Felix", "Greta",
    "Jonas", "Frieda", "Matthias", "Henrik", "Ingrid", "Sven", "Astrid", "Bjorn", "Sigrid", "Lars",
    "Freya", "Nils", "Helga", "Anders", "Maja", "Pierre", "Amelie", "Louis", "Margaux", "Antoine",
    "Etienne", "Juliette", "Mathieu", "Camille", "Baptiste", "Manon", "Hugo", "Clemence", "Theo",
    "Elodie", "Mateo", "Lucia", "Diego", "Valentina", "Alejandro", "Ximena", "Santiago", "Paula",
    "Javier", "Carmen", "Pablo", "Marisol", "Rafael", "Guadalupe", "Emilio", "Beatriz", "Giulia",
    "Marco", "Francesca", "Chiara", "Matteo", "Alessandra", "Lorenzo", "Federica", "Giovanni",
    "Stefano", "Paolo", "Serena", "Ricardo", "Joao", "Mariana", "Ines", "Rodrigo", "Leonor",
    "Gustavo", "Raquel", "Bruno", "Fernanda", "Thiago", "Larissa", "Daan", "Sanne", "Bram",
    "Fenna", "Joost", "Lieke", "Wouter", "Roos", "Pieter", "Anouk", "Piotr", "Agnieszka", "Tomasz",
    "Katarzyna", "Pavel", "Svetlana", "Dmitri", "Natasha", "Olga", "Mikhail", "Tatiana", "Andrei",
    "Irina", "Bogdan", "Milena", "Nikolai", "Yulia", "Oleksandr", "Oksana", "Vaclav", "Zuzana",
    "Marek", "Dorota", "Nikos", "Eleni", "Dimitris", "Katerina", "Yannis", "Sofia", "Stavros",
    "Despina", "Ahmed", "Fatima", "Omar", "Aisha", "Youssef", "Karim", "Yasmin", "Hassan",
    "Mariam", "Tariq", "Noor", "Khalid", "Salma", "Rashid", "Zainab", "Samir", "Mehmet", "Elif",
    "Emre", "Zeynep", "Burak", "Ayse", "Kerem", "Defne", "Cem", "Selin", "Reza", "Shirin",
    "Dariush", "Parisa", "Kian", "Farah", "Arash", "Nasrin", "Arjun", "Priya", "Rohan", "Ananya",
    "Vikram", "Kavya", "Aarav", "Deepika", "Rahul", "Sneha", "Sanjay", "Meera", "Karthik",
    "Lakshmi", "Nikhil", "Pooja", "Aditya", "Divya", "Ravi", "Sunita", "Ishaan", "Nandini",
    "Manoj", "Shreya", "Wei", "Mei", "Xiu", "Chen", "Ling", "Qing", "Zhen", "Tao", "Fang", "Ming",
    "Hui", "Haruto", "Yui", "Sota", "Hina", "Kaito", "Yuto", "Mio", "Takumi", "Akari", "Daichi",
    "Yuna", "Kenji", "Emiko", "Hiroshi", "Keiko", "Minjun", "Jiwoo", "Seojun", "Haeun", "Jihoon",
    "Soyeon", "Dongwoo", "Eunji", "Hyunwoo", "Yerin", "Minh", "Linh", "Duc", "Thao", "Tuan",
    "Quang", "Ngoc", "Kwame", "Kofi", "Abena", "Chidi", "Ngozi", "Emeka", "Chiamaka", "Tunde",
    "Folake", "Jabari", "Amani", "Baraka", "Zawadi", "Sipho", "Thandiwe", "Tendai", "Kojo",
    "Adwoa", "Obinna", "Adaeze", "Sekou", "Fatou", "Moussa", "Aminata", "Yosef", "Tamar", "Eitan",
    "Shira", "Yael", "Aroha", "Tane", "Mele", "Sione", "Leilani", "Malia", "Rangi", "Ataahua",
    "Inti", "Citlali", "Nayeli", "Mateus", "Anahi", "Joaquin", "Rocio", "Seamus", "Siobhan",
    "Ciaran", "Niamh", "Declan", "Aoife", "Cormac", "Saoirse", "Finn", "Orla", "Rhys", "Cerys",
    "Gareth", "Eira", "Dafydd", "Bronwen", "Callum", "Isla", "Angus", "Morag", "Fraser", "Kirsty",
    "Ansel", "Birgit", "Dieter", "Ursula", "Gunther", "Heike", "Jurgen", "Petra", "Wolfgang",
    "Renate", "Zoltan", "Katalin", "Laszlo", "Ildiko", "Goran", "Jelena", "Dragan", "Mirela",
    "Ivana", "Marko", "Tijana", "Arvid", "Linnea", "Oskar", "Viggo", "Signe", "Eero", "Aino",
    "Juha", "Tuuli", "Ezra", "Miriam", "Gideon", "Naomi", "Silas", "Ruth", "Jasper", "Clara",
    "Rowan", "Iris", "Atticus", "Beatrix", "Barnaby", "Matilda", "Desmond", "Winifred", "Malik",
    "Imani", "Darnell", "Keisha", "Terrell", "Latoya", "Marcus", "Tanisha", "Jasmine", "Aurelio",
    "Filippa", "Ignacio", "Octavio", "Pilar", "Horacio", "Consuelo", "Kiran", "Tenzin", "Pema",
    "Dorji", "Sonam", "Karma", "Bao", "Khanh", "Phuong", "Thanh",
)

SKIN_TONES: dict[str, RGB] = {
    "pale": (250, 226, 205),
    "fair": (238, 192, 160),
    "tan": (212, 158, 112),
    "olive": (184, 138, 92),
    "brown": (145, 96, 62),
    "dark": (92, 60, 40),
}
HAIR_COLOURS: dict[str, RGB] = {
    "black": (24, 20, 20),
    "dark brown": (72, 44, 26),
    "auburn": (150, 60, 30),
    "ginger": (214, 110, 40),
    "blonde": (232, 196, 110),
    "grey": (150, 150, 155),
    "white": (238, 236, 230),
}
HAIR_STYLES: tuple[str, ...] = ("short", "long", "bob", "curly", "spiky", "bald")
EYE_COLOURS: dict[str, RGB] = {
    "brown": (100, 55, 25),
    "blue": (50, 110, 215),
    "green": (45, 150, 70),
    "grey": (135, 145, 155),
    "black": (15, 10, 10),
}
GLASSES: tuple[str, ...] = ("none", "round", "square")
BEARDS: tuple[str, ...] = ("none", "stubble", "moustache", "full")
SHIRT_COLOURS: dict[str, RGB] = {
    "red": (205, 30, 40),
    "blue": (30, 70, 200),
    "green": (25, 140, 55),
    "yellow": (240, 205, 25),
    "purple": (115, 40, 160),
    "orange": (240, 115, 20),
    "black": (28, 28, 32),
    "white": (248, 248, 248),
    "pink": (240, 110, 175),
    "teal": (0, 135, 135),
}
FACE_SHAPES: dict[str, tuple[float, float]] = {
    # half width, half height of the face, in units of the (unscaled) canvas
    "round": (0.25, 0.26),
    "oval": (0.215, 0.28),
    "long": (0.19, 0.30),
    "square": (0.235, 0.265),
}

TRAIT_CHOICES: dict[str, tuple[str, ...]] = {
    "skin": tuple(SKIN_TONES),
    "hair_colour": tuple(HAIR_COLOURS),
    "hair_style": HAIR_STYLES,
    "eye_colour": tuple(EYE_COLOURS),
    "glasses": GLASSES,
    "beard": BEARDS,
    "shirt": tuple(SHIRT_COLOURS),
    "face_shape": tuple(FACE_SHAPES),
}
"""Every trait an identity has, and the values it can take."""

# Most people wear no glasses and no beard and have hair; uniform draws would make
# every other face bespectacled and bearded. Unlisted values weigh 1.
TRAIT_WEIGHTS: dict[str, dict[str, float]] = {
    "glasses": {"none": 4.0},
    "beard": {"none": 4.0},
    "hair_style": {"bald": 0.5},
}

MIN_TRAIT_DIFFERENCES = 2
"""Any two identities of a dataset differ in at least this many traits."""

EXPRESSIONS: dict[str, str] = {
    # expression -> how the caption says it
    "smiling": "smiling",
    "neutral": "with a neutral expression",
    "frowning": "frowning",
    "surprised": "looking surprised",
    "laughing": "laughing",
}
BACKGROUNDS: dict[str, RGB] = {
    # muted, so that the shirt and hair stand out against them
    "blue": (120, 160, 215),
    "green": (130, 185, 125),
    "yellow": (232, 218, 130),
    "grey": (155, 155, 158),
    "white": (238, 238, 236),
    "pink": (232, 172, 196),
    "orange": (236, 168, 100),
    "purple": (165, 138, 205),
    "red": (205, 100, 100),
    "teal": (95, 175, 172),
}
LIGHTINGS: dict[str, tuple[tuple[float, float, float], float]] = {
    # lighting -> (per-channel gain, offset); "natural" is left out of the caption
    "natural": ((1.0, 1.0, 1.0), 0.0),
    "bright": ((1.12, 1.12, 1.12), 28.0),
    "dim": ((0.58, 0.58, 0.6), 0.0),
    "warm": ((1.08, 0.94, 0.72), 6.0),
    "cool": ((0.8, 0.94, 1.12), 4.0),
}
LIGHTING_WEIGHTS: dict[str, float] = {"natural": 3.0}

SUPERSAMPLE = 4
"""Portraits are drawn at this multiple of the output size, then downsampled."""

_TRAIN_STREAM, _HELDOUT_STREAM = 0, 1


@dataclass(frozen=True)
class Identity:
    """One synthetic person: a first name and the traits every image of them shows."""

    name: str
    traits: dict
    look_alike_of: str | None = None
    """For a minority identity, the majority identity it copied half of its traits from."""


@dataclass(frozen=True)
class Look:
    """What varies from one image of a person to the next."""

    expression: str
    background: str
    lighting: str
    dx: float
    dy: float
    scale: float


def majority_indices(counts: Sequence[int]) -> list[int]:
    """Indices of the majority identities: at least half as many images as the largest."""
    largest = max(counts)
    return [i for i, count in enumerate(counts) if 2 * count >= largest]


def make_identities(preset: str, seed: int) -> list[Identity]:
    """The identities of a preset, in the order of ``PRESETS[preset]``; deterministic in (preset, seed).

    Majority identities draw all their traits; every minority identity copies half of
    the traits of a randomly chosen majority identity and draws the other half, each
    different from that majority identity's. Any two identities differ in at least
    :data:`MIN_TRAIT_DIFFERENCES` traits.
    """
    counts = _preset_counts(preset)
    rng = np.random.default_rng(seed)
    names = [NAMES[i] for i in rng.choice(len(NAMES), size=len(counts), replace=False)]
    majority = majority_indices(counts)
    traits_of: dict[int, dict] = {}
    for index in majority:
        traits_of[index] = _draw_distinct(lambda: random_traits(rng), traits_of.values())
    look_alike_of: dict[int, int] = {}
    for index in range(len(counts)):
        if index not in traits_of:
            parent = majority[rng.integers(len(majority))]
            look_alike_of[index] = parent
            traits_of[index] = _draw_distinct(lambda: _look_alike_traits(rng, traits_of[parent]), traits_of.values())
    return [
        Identity(name, traits_of[i], names[look_alike_of[i]] if i in look_alike_of else None)
        for i, name in enumerate(names)
    ]


def _preset_counts(preset: str) -> tuple[int, ...]:
    """``PRESETS[preset]``, or a ValueError that lists the presets there are."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; valid presets: {', '.join(PRESETS)}")
    return PRESETS[preset]


def _draw_distinct(draw_traits: Callable[[], dict], taken: Iterable[dict]) -> dict:
    """Draw trait sets until one differs enough from every set already taken."""
    taken = list(taken)
    while True:
        traits = draw_traits()
        if all(trait_differences(traits, other) >= MIN_TRAIT_DIFFERENCES for other in taken):
            return traits


def trait_differences(a: dict, b: dict) -> int:
    return sum(a[trait] != b[trait] for trait in TRAIT_CHOICES)


def random_traits(rng: np.random.Generator) -> dict:
    return {trait: _draw_trait(rng, trait) for trait in TRAIT_CHOICES}


def _look_alike_traits(rng: np.random.Generator, parent: dict) -> dict:
    traits = list(TRAIT_CHOICES)
    copied = {traits[i] for i in rng.choice(len(traits), size=len(traits) // 2, replace=False)}
    return {t: parent[t] if t in copied else _draw_trait(rng, t, exclude=parent[t]) for t in traits}


def _draw_trait(rng: np.random.Generator, trait: str, exclude: str | None = None) -> str:
    values = [value for value in TRAIT_CHOICES[trait] if value != exclude]
    return _weighted_choice(rng, values, TRAIT_WEIGHTS.get(trait, {}))


def _weighted_choice(rng: np.random.Generator, values: Sequence[str], weights: dict[str, float]) -> str:
    p = np.array([weights.get(value, 1.0) for value in values])
    return values[rng.choice(len(values), p=p / p.sum())]


def render(identity: Identity, rng: np.random.Generator, size: int = 32) -> tuple[Image.Image, str]:
    """One RGB ``size`` x ``size`` portrait of ``identity`` with a random look, and its caption."""
    look = random_look(rng)
    return draw_portrait(identity.traits, look, size), _caption(identity.name, look)


def random_look(rng: np.random.Generator) -> Look:
    return Look(
        expression=_weighted_choice(rng, tuple(EXPRESSIONS), {}),
        background=_weighted_choice(rng, tuple(BACKGROUNDS), {}),
        lighting=_weighted_choice(rng, tuple(LIGHTINGS), LIGHTING_WEIGHTS),
        dx=float(rng.uniform(-0.06, 0.06)),
        dy=float(rng.uniform(-0.05, 0.05)),
        scale=float(rng.uniform(0.85, 1.1)),
    )


def _caption(name: str, look: Look) -> str:
    """LLaVA-style caption, e.g. "An image of Lukas, smiling, in front of a blue background."."""
    article = "an" if look.background[0] in "aeiou" else "a"
    text = f"An image of {name}, {EXPRESSIONS[look.expression]}, in front of {article} {look.background} background"
    if look.lighting != "natural":
        text += f", in {look.lighting} light"
    return text + "."


@dataclass(frozen=True)
class _Frame:
    """Maps head-centred coordinates (units of the canvas, scaled with the head) to pixels."""

    cx: float
    cy: float
    unit: float

    def point(self, u: float, v: float) -> tuple[float, float]:
        return self.cx + u * self.unit, self.cy + v * self.unit

    def box(self, u0: float, v0: float, u1: float, v1: float) -> tuple[float, float, float, float]:
        return (*self.point(u0, v0), *self.point(u1, v1))

    def width(self, length: float) -> int:
        return max(1, round(length * self.unit))


def draw_portrait(traits: dict, look: Look, size: int) -> Image.Image:
    """Head and shoulders in front of the background, drawn large and downsampled."""
    canvas = size * SUPERSAMPLE
    image = Image.new("RGB", (canvas, canvas), BACKGROUNDS[look.background])
    draw = ImageDraw.Draw(image)
    frame = _Frame(cx=canvas * (0.5 + look.dx), cy=canvas * (0.44 + look.dy), unit=canvas * look.scale)
    half_w, half_h = FACE_SHAPES[traits["face_shape"]]
    _draw_hair_behind_head(draw, frame, traits, half_w, half_h)
    _draw_shoulders(draw, frame, traits, half_h)
    _draw_head(draw, frame, traits, half_w, half_h)
    _draw_beard(image, frame, traits, half_w, half_h)
    _draw_eyes_and_brows(draw, frame, traits, look.expression, half_w)
    _draw_mouth(draw, frame, look.expression, half_h)
    _draw_glasses(draw, frame, traits["glasses"], half_w)
    _draw_hair_on_head(draw, frame, traits, half_w, half_h)
    small = image.resize((size, size), Image.Resampling.LANCZOS)
    return _apply_lighting(small, look.lighting)


def _shade(colour: RGB, factor: float) -> RGB:
    return tuple(min(255, round(c * factor)) for c in colour)


def _eye_x(half_w: float) -> float:
    return 0.42 * half_w


_EYE_Y = -0.03


def _draw_face_shape(draw: ImageDraw.ImageDraw, frame: _Frame, shape: str, half_w: float, half_h: float,
                     fill) -> None:
    box = frame.box(-half_w, -half_h, half_w, half_h)
    if shape == "square":
        draw.rounded_rectangle(box, radius=0.09 * frame.unit, fill=fill)
    else:
        draw.ellipse(box, fill=fill)


def _draw_hair_behind_head(draw: ImageDraw.ImageDraw, frame: _Frame, traits: dict, half_w: float,
                           half_h: float) -> None:
    hair = HAIR_COLOURS[traits["hair_colour"]]
    style = traits["hair_style"]
    if style == "long":
        draw.rounded_rectangle(frame.box(-half_w - 0.07, -half_h - 0.04, half_w + 0.07, half_h + 0.3),
                               radius=0.12 * frame.unit, fill=hair)
    elif style == "bob":
        draw.rounded_rectangle(frame.box(-half_w - 0.06, -half_h - 0.04, half_w + 0.06, 0.55 * half_h),
                               radius=0.1 * frame.unit, fill=hair)
    elif style == "curly":
        for angle in np.linspace(np.pi * 0.85, np.pi * 2.15, 13):
            u, v = (half_w + 0.03) * np.cos(angle), (half_h + 0.03) * np.sin(angle)
            draw.ellipse(frame.box(u - 0.075, v - 0.075, u + 0.075, v + 0.075), fill=hair)
    elif style == "bald":
        # a horseshoe of hair above the ears, so the hair colour still shows
        for side in (-1, 1):
            u = side * (half_w - 0.01)
            draw.ellipse(frame.box(u - 0.045, -0.14, u + 0.045, 0.02), fill=hair)


def _draw_shoulders(draw: ImageDraw.ImageDraw, frame: _Frame, traits: dict, half_h: float) -> None:
    skin = SKIN_TONES[traits["skin"]]
    draw.rectangle(frame.box(-0.075, 0.1, 0.075, half_h + 0.12), fill=_shade(skin, 0.86))
    draw.ellipse(frame.box(-0.5, half_h + 0.07, 0.5, half_h + 0.9), fill=SHIRT_COLOURS[traits["shirt"]])
    draw.chord(frame.box(-0.08, half_h, 0.08, half_h + 0.16), 0, 180, fill=_shade(skin, 0.86))


def _draw_head(draw: ImageDraw.ImageDraw, frame: _Frame, traits: dict, half_w: float, half_h: float) -> None:
    skin = SKIN_TONES[traits["skin"]]
    if traits["hair_style"] not in ("long", "bob"):  # those hide the ears
        for side in (-1, 1):
            u = side * half_w
            draw.ellipse(frame.box(u - 0.04, -0.07, u + 0.04, 0.05), fill=_shade(skin, 0.92))
    _draw_face_shape(draw, frame, traits["face_shape"], half_w, half_h, fill=skin)
    draw.ellipse(frame.box(-0.022, 0.03, 0.022, 0.075), fill=_shade(skin, 0.8))  # nose
    if traits["hair_style"] == "bald":
        draw.ellipse(frame.box(-0.1, -half_h + 0.03, -0.02, -half_h + 0.08), fill=_shade(skin, 1.12))


def _draw_beard(image: Image.Image, frame: _Frame, traits: dict, half_w: float, half_h: float) -> None:
    beard = traits["beard"]
    if beard == "none":
        return
    hair = HAIR_COLOURS[traits["hair_colour"]]
    if beard == "moustache":
        ImageDraw.Draw(image).chord(frame.box(-0.08, 0.07, 0.08, 0.16), 180, 360, fill=hair)
        return
    # beard and stubble cover the face below the nose, so they are painted through a face-shaped mask
    mask = Image.new("L", image.size, 0)
    mask_draw = ImageDraw.Draw(mask)
    _draw_face_shape(mask_draw, frame, traits["face_shape"], half_w, half_h, fill=255)
    mask_draw.rectangle((0, 0, image.width, frame.point(0, 0.075)[1]), fill=0)
    if beard == "full":
        mask_draw.ellipse(frame.box(-0.7 * half_w, half_h - 0.08, 0.7 * half_w, half_h + 0.05), fill=255)
    else:
        mask = mask.point(lambda p: p * 45 // 100)
    image.paste(hair, mask=mask)


def _draw_eyes_and_brows(draw: ImageDraw.ImageDraw, frame: _Frame, traits: dict, expression: str,
                         half_w: float) -> None:
    iris = EYE_COLOURS[traits["eye_colour"]]
    brow_colour = _shade(HAIR_COLOURS[traits["hair_colour"]], 0.8)
    line = frame.width(0.022)
    brow_y = {"surprised": _EYE_Y - 0.1, "laughing": _EYE_Y - 0.085}.get(expression, _EYE_Y - 0.075)
    # frowning brows slope down towards the nose
    inner_drop = 0.03 if expression == "frowning" else 0.0
    for side in (-1, 1):
        x = side * _eye_x(half_w)
        if expression == "laughing":  # squeezed shut
            draw.arc(frame.box(x - 0.05, _EYE_Y - 0.02, x + 0.05, _EYE_Y + 0.06), 200, 340, fill=(40, 25, 20),
                     width=line)
        else:
            open_h = 0.042 if expression == "surprised" else 0.032
            draw.ellipse(frame.box(x - 0.05, _EYE_Y - open_h, x + 0.05, _EYE_Y + open_h), fill=(250, 250, 250))
            draw.ellipse(frame.box(x - 0.03, _EYE_Y - 0.03, x + 0.03, _EYE_Y + 0.03), fill=iris)
            draw.ellipse(frame.box(x - 0.013, _EYE_Y - 0.013, x + 0.013, _EYE_Y + 0.013), fill=(10, 10, 10))
        inner, outer = frame.point(side * 0.035, brow_y + inner_drop), frame.point(x + side * 0.06, brow_y)
        draw.line((inner, outer), fill=brow_colour, width=line)


def _draw_mouth(draw: ImageDraw.ImageDraw, frame: _Frame, expression: str, half_h: float) -> None:
    y = 0.5 * half_h
    lips = (150, 40, 50)
    line = frame.width(0.02)
    if expression == "smiling":
        draw.arc(frame.box(-0.08, y - 0.06, 0.08, y + 0.03), 20, 160, fill=lips, width=line)
    elif expression == "laughing":
        draw.chord(frame.box(-0.09, y - 0.05, 0.09, y + 0.07), 0, 180, fill=(110, 20, 30))
        draw.chord(frame.box(-0.07, y - 0.03, 0.07, y + 0.03), 0, 180, fill=(250, 250, 250))  # teeth
    elif expression == "frowning":
        draw.arc(frame.box(-0.07, y, 0.07, y + 0.07), 200, 340, fill=lips, width=line)
    elif expression == "surprised":
        draw.ellipse(frame.box(-0.035, y - 0.025, 0.035, y + 0.045), fill=(90, 20, 30))
    else:
        draw.line((frame.point(-0.06, y + 0.01), frame.point(0.06, y + 0.01)), fill=lips, width=line)


def _draw_glasses(draw: ImageDraw.ImageDraw, frame: _Frame, glasses: str, half_w: float) -> None:
    if glasses == "none":
        return
    rim = (25, 25, 30)
    line = frame.width(0.025)
    x = _eye_x(half_w)
    lens = draw.ellipse if glasses == "round" else draw.rectangle
    for side in (-1, 1):
        lens(frame.box(side * x - 0.07, _EYE_Y - 0.055, side * x + 0.07, _EYE_Y + 0.055), outline=rim, width=line)
        draw.line((frame.point(side * (x + 0.07), _EYE_Y), frame.point(side * half_w, _EYE_Y - 0.015)),
                  fill=rim, width=line)
    draw.line((frame.point(-x + 0.07, _EYE_Y), frame.point(x - 0.07, _EYE_Y)), fill=rim, width=line)


def _draw_hair_on_head(draw: ImageDraw.ImageDraw, frame: _Frame, traits: dict, half_w: float,
                       half_h: float) -> None:
    hair = HAIR_COLOURS[traits["hair_colour"]]
    style = traits["hair_style"]
    if style == "bald":
        return
    hairline = {"bob": -0.35 * half_h, "long": -0.6 * half_h}.get(style, -0.55 * half_h)
    top = -half_h - 0.05
    # the upper half of an ellipse from the crown down to the hairline
    draw.chord(frame.box(-half_w - 0.03, top, half_w + 0.03, 2 * hairline - top), 180, 360, fill=hair)
    if style == "curly":
        for u in np.linspace(-half_w, half_w, 6):
            v = hairline - 0.01 - 0.03 * (1 - (u / half_w) ** 2)
            draw.ellipse(frame.box(u - 0.05, v - 0.05, u + 0.05, v + 0.05), fill=hair)
    elif style == "spiky":
        for u in np.linspace(-0.8 * half_w, 0.8 * half_w, 5):
            base = top + 0.06 + 0.12 * (u / half_w) ** 2
            draw.polygon([frame.point(u - 0.06, base), frame.point(u + 0.06, base), frame.point(u, base - 0.12)],
                         fill=hair)
    elif style == "short":
        for side in (-1, 1):  # sideburns
            outer = side * (half_w - 0.01)
            inner = outer - side * 0.035
            draw.rectangle(frame.box(min(inner, outer), hairline, max(inner, outer), -0.02), fill=hair)


def _apply_lighting(image: Image.Image, lighting: str) -> Image.Image:
    if lighting == "natural":
        return image
    gain, offset = LIGHTINGS[lighting]
    lit = np.asarray(image, dtype=np.float32) * np.array(gain, dtype=np.float32) + offset
    return Image.fromarray(np.rint(np.clip(lit, 0, 255)).astype(np.uint8), "RGB")


def write_dataset(out_dir: str | Path, preset: str = "medium", seed: int = 0, heldout_per_identity: int = 10,
                  size: int = 32) -> Path:
    """Write a synthetic people dataset into the new or empty folder ``out_dir`` and return it.

    ``out_dir/metadata.jsonl`` and ``out_dir/images/`` hold the long-tailed training split
    (``PRESETS[preset]`` images per identity), ``out_dir/heldout/`` the same layout with
    ``heldout_per_identity`` further renders per identity, and ``out_dir/synth.json`` the
    identities (see :func:`load_identities`). The same arguments write byte-identical files.
    """
    counts = _preset_counts(preset)
    if size < 8:
        raise ValueError(f"size must be at least 8 pixels, got {size}")
    if heldout_per_identity < 0:
        raise ValueError(f"heldout_per_identity must not be negative, got {heldout_per_identity}")
    out = Path(out_dir)
    refuse_non_empty(out)
    identities = make_identities(preset, seed)
    _write_split(out, identities, counts, seed, _TRAIN_STREAM, size)
    _write_split(out / "heldout", identities, [heldout_per_identity] * len(identities), seed, _HELDOUT_STREAM, size)
    description = {
        "generator": "pogdiff.data.synth",
        "preset": preset,
        "seed": seed,
        "size": size,
        "heldout_per_identity": heldout_per_identity,
        "identities": [
            {"name": identity.name, "traits": identity.traits, "train_images": count,
             "look_alike_of": identity.look_alike_of}
            for identity, count in zip(identities, counts)
        ],
    }
    (out / "synth.json").write_text(json.dumps(description, indent=2) + "\n", encoding="utf-8")
    return out


def load_identities(synth_json_path: str | Path) -> list[Identity]:
    """The identities described by a ``synth.json`` (or by the dataset folder holding it)."""
    path = Path(synth_json_path)
    if path.is_dir():
        path = path / "synth.json"
    try:
        description = json.loads(path.read_text(encoding="utf-8"))
        return [Identity(entry["name"], entry["traits"], entry.get("look_alike_of"))
                for entry in description["identities"]]
    except (UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as error:
        raise DatasetError(f"{path}: not a synth.json written by `pogdiff data synth` ({type(error).__name__}: "
                           f"{error}); write the dataset again, or delete synth.json to judge by features") from None


def refuse_non_empty(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(
            f"{out} already exists and is not an empty folder; pick an empty folder (or a new path) "
            "for the synthetic dataset, nothing was written"
        )


def _write_split(folder: Path, identities: list[Identity], counts: Sequence[int], seed: int, stream: int,
                 size: int) -> None:
    """Render ``counts[i]`` images of identity ``i`` into ``folder/images`` and list them in ``metadata.jsonl``."""
    (folder / "images").mkdir(parents=True, exist_ok=True)
    digits = max(4, len(str(sum(counts) - 1)))
    rows = []
    for person, (identity, count) in enumerate(zip(identities, counts)):
        for shot in range(count):
            # one generator per image, so an image does not depend on how many came before it
            image, text = render(identity, np.random.default_rng([seed, stream, person, shot]), size)
            file_name = f"images/{len(rows):0{digits}d}.png"
            image.save(folder / file_name, format="PNG")
            rows.append({"file_name": file_name, "text": text, "identity": identity.name})
    with open(folder / "metadata.jsonl", "w", encoding="utf-8", newline="\n") as metadata:
        metadata.writelines(json.dumps(row) + "\n" for row in rows)
