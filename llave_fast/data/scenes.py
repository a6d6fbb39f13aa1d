"""The synthetic scenes: the closed vocabulary every synthetic text is written in, a scene (1 to 5
objects, each a shape, colour, size and slot) with its caption and its image, and the seeded draws
the synthetic dataset is made of: a scene, a one-attribute variant of it (a hard negative, a
family), a question about it and its answer. Item ``i``'s draws come from :func:`item_rng`, a pure
function of ``(seed, split, i, stream)``."""

from __future__ import annotations

import hashlib
import random
import re
from dataclasses import dataclass, replace

from PIL import Image, ImageDraw

from .collate import IMAGE_PLACEHOLDER

__all__ = [
    "ANSWERS",
    "BACKGROUNDS",
    "COLOURS",
    "COLOUR_RGB",
    "MAX_FAMILY_SIZE",
    "MAX_QUESTIONS_PER_SCENE",
    "POSITIONS",
    "QUESTION_KINDS",
    "SHAPES",
    "SIZES",
    "SLOT_CENTERS",
    "SYNTHETIC_TASKS",
    "SYNTHETIC_VOCAB",
    "Scene",
    "SceneObject",
    "describe_scene",
    "distinct_questions",
    "draw_question",
    "draw_scene",
    "family_question",
    "family_variation",
    "item_rng",
    "perturb_scene",
    "render_scene",
    "sorted_objects",
    "synthetic_words",
]

# ---------------------------------------------------------------- the closed vocabulary
COLOURS = ("red", "green", "blue", "yellow", "purple", "orange", "black", "white")
SHAPES = ("circle", "square", "triangle", "star")
SHAPE_PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles", "star": "stars"}
COUNT_WORDS = ("one", "two", "three", "four", "five")
POSITIONS = ("left", "right", "top", "bottom", "center")
SIZES = ("small", "large")
FUNCTION_WORDS = (
    "a", "an", "the", "of", "and", "in", "on", "at", "is", "are", "what", "which", "how",
    "many", "where", "colour", "color", "shape", "shapes", "size", "image", "picture",
    "there", "with", "represent", "given", "following", "question", "answer",
)  # fmt: skip
PUNCTUATION = (",", ".", ":", "?")

#: Every token a synthetic text can contain (besides ``IMAGE_PLACEHOLDER``), in a fixed order.
SYNTHETIC_VOCAB: tuple[str, ...] = tuple(
    dict.fromkeys(
        COLOURS + SHAPES + tuple(SHAPE_PLURALS.values()) + COUNT_WORDS + POSITIONS + SIZES + FUNCTION_WORDS
        + PUNCTUATION
    )
)  # fmt: skip

_WORD_RE = re.compile(r"[A-Za-z0-9_]+|[^\w\s]")


def synthetic_words(text: str) -> list[str]:
    """Split a text into the tokens ``SYNTHETIC_VOCAB`` is made of (the image placeholder dropped)."""
    return _WORD_RE.findall(text.replace(IMAGE_PLACEHOLDER, " "))


# ---------------------------------------------------------------- scenes
# Pure, saturated colours far from the grey background (128, or 100..156 when varied) and from each other.
COLOUR_RGB = {
    "red": (230, 25, 25),
    "green": (20, 170, 40),
    "blue": (30, 60, 230),
    "yellow": (245, 225, 20),
    "purple": (140, 40, 180),
    "orange": (250, 140, 0),
    "black": (10, 10, 10),
    "white": (245, 245, 245),
}
BACKGROUND_LEVELS = (100, 156)  # grey, R = G = B, drawn per image with background="varied"
PLAIN_BACKGROUND = 128  # the grey of every image with background="plain" (the default)
BACKGROUNDS = ("plain", "varied")

# Slot centres as fractions of the image side (x, y). Neighbouring slots are 0.34 apart; a
# large object's radius is at most 0.13 * 1.04 and jitter moves a centre by at most 0.01
# per axis, so objects stay at least 0.04 of the side (2.5 px at 64 px) apart.
SLOT_CENTERS = {
    "top": (0.5, 0.16),
    "left": (0.16, 0.5),
    "center": (0.5, 0.5),
    "right": (0.84, 0.5),
    "bottom": (0.5, 0.84),
}
SLOT_ORDER = ("top", "left", "center", "right", "bottom")  # reading order of captions
SLOT_PHRASE = {
    "top": "at the top",
    "bottom": "at the bottom",
    "left": "on the left",
    "right": "on the right",
    "center": "in the center",
}
RADIUS = {"small": 0.07, "large": 0.13}  # circumradius, fraction of the image side
_JITTER = 0.01
_SCALE_JITTER = 0.04

SYNTHETIC_TASKS = ("i2t", "t2i", "vqa")
I2T_QUERY = f"{IMAGE_PLACEHOLDER}\nrepresent the given image with the following question: what is in the image?"
VQA_PREFIX = f"{IMAGE_PLACEHOLDER}\nrepresent the given image with the following question: "
T2I_TARGET = f"{IMAGE_PLACEHOLDER}\nrepresent the given image."


@dataclass(frozen=True)
class SceneObject:
    shape: str
    colour: str
    size: str
    slot: str
    dx: float = 0.0  # centre jitter, fraction of the side
    dy: float = 0.0
    scale: float = 1.0  # radius jitter factor


@dataclass(frozen=True)
class Scene:
    objects: tuple[SceneObject, ...]  # in SLOT_ORDER
    background: int  # grey level

    @property
    def caption(self) -> str:
        return describe_scene(self)


def sorted_objects(objects) -> tuple[SceneObject, ...]:
    return tuple(sorted(objects, key=lambda o: SLOT_ORDER.index(o.slot)))


def describe_scene(scene: Scene) -> str:
    """The canonical caption: every object as "a <size> <colour> <shape> <position>", in reading order."""
    parts = [f"a {o.size} {o.colour} {o.shape} {SLOT_PHRASE[o.slot]}" for o in scene.objects]
    if len(parts) == 1:
        return parts[0] + "."
    return ", ".join(parts[:-1]) + " and " + parts[-1] + "."


# Unit polygons (circumradius 1, centred on (0, 0), y down).
def _polygon(n: int, inner: float | None) -> list[tuple[float, float]]:
    import math

    pts = []
    steps = n if inner is None else 2 * n
    for k in range(steps):
        a = -math.pi / 2 + 2 * math.pi * k / steps
        rad = 1.0 if inner is None or k % 2 == 0 else inner
        pts.append((rad * math.cos(a), rad * math.sin(a)))
    return pts


_TRIANGLE = _polygon(3, None)
_STAR = _polygon(5, 0.45)
_SQUARE_HALF = 0.85  # half side of the square, in radii (its area is close to the circle's)


def render_scene(scene: Scene, image_size: int = 64) -> Image.Image:
    """Draw ``scene`` on an ``image_size`` square RGB image (no antialiasing: exact colours)."""
    S = image_size
    g = scene.background
    img = Image.new("RGB", (S, S), (g, g, g))
    draw = ImageDraw.Draw(img)
    for o in scene.objects:
        fx, fy = SLOT_CENTERS[o.slot]
        cx, cy = (fx + o.dx) * S, (fy + o.dy) * S
        r = RADIUS[o.size] * o.scale * S
        fill = COLOUR_RGB[o.colour]
        if o.shape == "circle":
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
        elif o.shape == "square":
            h = _SQUARE_HALF * r
            draw.rectangle((cx - h, cy - h, cx + h, cy + h), fill=fill)
        else:
            unit = _TRIANGLE if o.shape == "triangle" else _STAR
            draw.polygon([(cx + r * x, cy + r * y) for x, y in unit], fill=fill)
    return img


def item_rng(seed: int, split: str, index: int, stream: str = "item") -> random.Random:
    # BLAKE2b of the full key: independent of Python's salted hash and of access order
    key = f"llave-fast/synthetic/v1/{seed}/{split}/{index}/{stream}".encode()
    return random.Random(int.from_bytes(hashlib.blake2b(key, digest_size=16).digest(), "little"))


def draw_scene(rng: random.Random, min_shapes: int, max_shapes: int, background: str = "plain") -> Scene:
    n = rng.randint(min_shapes, max_shapes)
    slots = rng.sample(POSITIONS, n)
    objects = [
        SceneObject(
            shape=rng.choice(SHAPES),
            colour=rng.choice(COLOURS),
            size=rng.choice(SIZES),
            slot=slot,
            dx=rng.uniform(-_JITTER, _JITTER),
            dy=rng.uniform(-_JITTER, _JITTER),
            scale=rng.uniform(1 - _SCALE_JITTER, 1 + _SCALE_JITTER),
        )
        for slot in slots
    ]
    level = rng.randint(*BACKGROUND_LEVELS)  # drawn either way: a plain scene differs from its varied twin only here
    return Scene(sorted_objects(objects), level if background == "varied" else PLAIN_BACKGROUND)


def perturb_scene(rng: random.Random, scene: Scene) -> Scene:
    """The same scene with one attribute of one object changed: a hard negative."""
    k = rng.randrange(len(scene.objects))
    o = scene.objects[k]
    free = [s for s in POSITIONS if s not in {x.slot for x in scene.objects}]
    attr = rng.choice(["shape", "colour", "size"] + (["slot"] if free else []))
    if attr == "slot":
        new = replace(o, slot=rng.choice(free))
    else:
        values = {"shape": SHAPES, "colour": COLOURS, "size": SIZES}[attr]
        new = replace(o, **{attr: rng.choice([v for v in values if v != getattr(o, attr)])})
    objects = list(scene.objects)
    objects[k] = new
    return Scene(sorted_objects(objects), scene.background)


#: largest hard_family_size: a family needs k distinct values of one attribute (8 colours)
MAX_FAMILY_SIZE = len(COLOURS)
_FAMILY_VALUES = {"shape": SHAPES, "colour": COLOURS, "size": SIZES}


def family_variation(rng: random.Random, base: Scene, k: int, vqa: bool) -> tuple[int, str, list]:
    """(object index, attribute, k distinct values, the base's own first) a family of ``k``
    varies: any attribute of any object with ``k`` values available (position: the free slots
    and its own; not for VQA, whose question names the object by its position)."""
    taken = {o.slot for o in base.objects}
    options = []
    for j, o in enumerate(base.objects):
        options += [(j, a) for a, values in _FAMILY_VALUES.items() if len(values) >= k]
        if not vqa and len(POSITIONS) - len(taken) + 1 >= k:
            options.append((j, "slot"))
    j, attr = rng.choice(options)
    current = getattr(base.objects[j], attr)
    pool = [s for s in POSITIONS if s not in taken] if attr == "slot" else [
        v for v in _FAMILY_VALUES[attr] if v != current]
    return j, attr, [current] + rng.sample(pool, k - 1)


def family_question(rng: random.Random, o: SceneObject, attr: str) -> tuple[str, str, str]:
    """(question, answer, kind) about attribute ``attr`` of object ``o``: a family's shared question."""
    if attr == "colour":
        return f"what {rng.choice(('colour', 'color'))} is the shape {SLOT_PHRASE[o.slot]}?", o.colour, "colour"
    if attr == "shape":
        return f"what shape is {SLOT_PHRASE[o.slot]}?", o.shape, "shape"
    return f"what is the size of the shape {SLOT_PHRASE[o.slot]}?", o.size, "size"


def draw_question(rng: random.Random, scene: Scene) -> tuple[str, str, str]:
    """(question, answer, kind) about ``scene``; kind is what the answer names."""
    objs = scene.objects
    colour_word = rng.choice(("colour", "color"))
    unique = [o for o in objs if sum((x.colour, x.shape) == (o.colour, o.shape) for x in objs) == 1]
    kinds = ["count_all", "count_colour", "count_shape", "colour_at", "shape_at", "size_at"]
    kinds += ["where"] if unique else []
    kind = rng.choice(kinds)
    o = rng.choice(objs)
    if kind == "count_all":
        return "how many shapes are there?", COUNT_WORDS[len(objs) - 1], "count"
    if kind == "count_colour":
        c = o.colour
        return f"how many {c} shapes are there?", COUNT_WORDS[sum(x.colour == c for x in objs) - 1], "count"
    if kind == "count_shape":
        s = o.shape
        return f"how many {SHAPE_PLURALS[s]} are there?", COUNT_WORDS[sum(x.shape == s for x in objs) - 1], "count"
    if kind == "colour_at":
        return f"what {colour_word} is the shape {SLOT_PHRASE[o.slot]}?", o.colour, "colour"
    if kind == "shape_at":
        return f"what shape is {SLOT_PHRASE[o.slot]}?", o.shape, "shape"
    if kind == "size_at":
        return f"what is the size of the shape {SLOT_PHRASE[o.slot]}?", o.size, "size"
    o = rng.choice(unique)
    return f"where is the {o.colour} {o.shape}?", o.slot, "position"


ANSWERS = {"count": COUNT_WORDS[:3], "colour": COLOURS, "shape": SHAPES, "size": SIZES, "position": POSITIONS}
#: the kinds of VQA question, named by what the answer names (the third element of
#: :func:`draw_question`'s and :func:`family_question`'s result): count, colour, shape, size, position
QUESTION_KINDS = tuple(ANSWERS)

#: largest vqa_questions_per_scene: a one-object scene has 5 distinct answers (count, colour,
#: shape, size, position), so 4 leaves the question draw room to avoid repeats
MAX_QUESTIONS_PER_SCENE = 4


def distinct_questions(rng: random.Random, scene: Scene, q: int) -> list[tuple[str, str, str]]:
    """``q`` questions about ``scene`` with pairwise different answers (and texts), drawn in turn."""
    out: list[tuple[str, str, str]] = []
    for _ in range(1000):
        question = draw_question(rng, scene)
        if all(question[0] != x[0] and question[1] != x[1] for x in out):
            out.append(question)
            if len(out) == q:
                return out
    raise RuntimeError(f"could not draw {q} questions with different answers about {describe_scene(scene)!r}")
