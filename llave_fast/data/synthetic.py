"""The built-in synthetic dataset: shapes drawn on the fly, captions and questions about them.

Each item is a *scene* of 1 to 3 objects on a plain grey background. An object has a shape
(circle, square, triangle, star), a colour (8 of them), a size (small, large) and a
position: one of five slots (top, left, center, right, bottom), each slot holding at most
one object, so objects never touch and a caption can name every one of them. Scenes come
in MMEB's task styles (``subset``):

* ``synthetic_i2t``: image + "represent the given image with the following question:
  what is in the image?" -> the caption;
* ``synthetic_t2i``: the caption -> image + "represent the given image.";
* ``synthetic_vqa``: image + a question about colour, shape, size, count or position ->
  the short answer ("red", "two", "left", ...).

Item ``i`` is a pure function of ``(seed, split, i)``: its random stream is seeded from a
BLAKE2b hash of those three, so it is the same on every access, in every process and in
any access order, and the eval split draws from a different stream than train. Every
word comes from ``SYNTHETIC_VOCAB`` (lowercase words and four punctuation marks), so a
tiny word-level tokenizer covers the texts exactly; ``IMAGE_PLACEHOLDER`` marks the image.

With ``hard_family_size=k > 1`` items come in *families* of ``k`` consecutive items
(``i // k``): one base scene and ``k - 1`` variants of it that change the same attribute
(shape, colour, size or position) of the same object to other values, so any two members
differ in exactly that one attribute; members share their task (and, for VQA, the question,
asked about the varied attribute, so their answers differ). A batch that holds a family
holds hard negatives for each of its members (``BatchOrder(family_size=k)`` keeps families
together). ``k = 1`` gives exactly the independent scenes.

With ``vqa_questions_per_scene=q > 1`` (opt-in, meant for the train split) items come in
*groups* of ``q`` consecutive items (``i // q``) that share their task; a VQA group shares one
scene (drawn as its first item draws its own) and asks ``q`` different questions about it whose
answers all differ, so a batch that holds the group (``BatchOrder(family_size=q)``) contrasts
one image under several questions: the query embedding must depend on the question. i2t and
t2i groups are ``q`` independent scenes. ``q = 1`` gives exactly the independent scenes;
with ``hard_family_size > 1`` it has no effect (a family already shares its question).

``target_id`` (``query_id``) is canonical: text targets are keyed by their text, image
targets by the scene's caption, so equal answers ("red") and equal scenes share an id.
"""

from __future__ import annotations

import hashlib
import random
import re
from dataclasses import dataclass, replace
from typing import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw

from .collate import IMAGE_PLACEHOLDER, Record, make_id
from ..errors import InvalidArgument

__all__ = [
    "write_mmeb_train",
    "BACKGROUNDS",
    "COLOURS",
    "COLOUR_RGB",
    "POSITIONS",
    "SHAPES",
    "SIZES",
    "SLOT_CENTERS",
    "SYNTHETIC_TASKS",
    "SYNTHETIC_VOCAB",
    "RetrievalSet",
    "Scene",
    "SceneObject",
    "SyntheticDataset",
    "describe_scene",
    "render_scene",
    "retrieval_candidates",
    "synthetic_eval_candidates",
    "synthetic_words",
    "task_name",
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


def _sorted(objects) -> tuple[SceneObject, ...]:
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


def _rng(seed: int, split: str, index: int, stream: str = "item") -> random.Random:
    # BLAKE2b of the full key: independent of Python's salted hash and of access order
    key = f"llave-fast/synthetic/v1/{seed}/{split}/{index}/{stream}".encode()
    return random.Random(int.from_bytes(hashlib.blake2b(key, digest_size=16).digest(), "little"))


def _draw_scene(rng: random.Random, min_shapes: int, max_shapes: int, background: str = "plain") -> Scene:
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
    return Scene(_sorted(objects), level if background == "varied" else PLAIN_BACKGROUND)


def _perturb(rng: random.Random, scene: Scene) -> Scene:
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
    return Scene(_sorted(objects), scene.background)


#: largest hard_family_size: a family needs k distinct values of one attribute (8 colours)
MAX_FAMILY_SIZE = len(COLOURS)
_FAMILY_VALUES = {"shape": SHAPES, "colour": COLOURS, "size": SIZES}


def _family_variation(rng: random.Random, base: Scene, k: int, vqa: bool) -> tuple[int, str, list]:
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


def _family_question(rng: random.Random, o: SceneObject, attr: str) -> tuple[str, str, str]:
    """(question, answer, kind) about attribute ``attr`` of object ``o``: a family's shared question."""
    if attr == "colour":
        return f"what {rng.choice(('colour', 'color'))} is the shape {SLOT_PHRASE[o.slot]}?", o.colour, "colour"
    if attr == "shape":
        return f"what shape is {SLOT_PHRASE[o.slot]}?", o.shape, "shape"
    return f"what is the size of the shape {SLOT_PHRASE[o.slot]}?", o.size, "size"


def _question(rng: random.Random, scene: Scene) -> tuple[str, str, str]:
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


_ANSWERS = {"count": COUNT_WORDS[:3], "colour": COLOURS, "shape": SHAPES, "size": SIZES, "position": POSITIONS}

#: largest vqa_questions_per_scene: a one-object scene has 5 distinct answers (count, colour,
#: shape, size, position), so 4 leaves the question draw room to avoid repeats
MAX_QUESTIONS_PER_SCENE = 4


def _distinct_questions(rng: random.Random, scene: Scene, q: int) -> list[tuple[str, str, str]]:
    """``q`` questions about ``scene`` with pairwise different answers (and texts), drawn in turn."""
    out: list[tuple[str, str, str]] = []
    for _ in range(1000):
        question = _question(rng, scene)
        if all(question[0] != x[0] and question[1] != x[1] for x in out):
            out.append(question)
            if len(out) == q:
                return out
    raise RuntimeError(f"could not draw {q} questions with different answers about {describe_scene(scene)!r}")


class SyntheticDataset(torch.utils.data.Dataset):
    """``num_samples`` synthetic pairs, item ``i`` a pure function of ``(seed, split, i)``.

    Args:
        num_samples: dataset length.
        seed: base seed; different seeds give different items.
        split: ``"train"`` or ``"eval"`` (held out: a different random stream).
        image_size: side of the square RGB images (>= 32).
        tasks: task styles, assigned round-robin (item ``i`` has ``tasks[i % len(tasks)]``).
        min_shapes, max_shapes: objects per scene (1..5; default 1..3).
        hard_negatives: also draw a hard negative per item (one attribute of one object
            changed for i2t/t2i, a wrong answer of the same kind for vqa); off by default,
            when ``neg_text``/``neg_image``/``neg_id`` are None.
        background: ``"plain"`` (default): every image on the same grey (``PLAIN_BACKGROUND``);
            ``"varied"``: a grey level drawn per image from ``BACKGROUND_LEVELS``, a nuisance
            the model must learn to ignore (a tiny model trained from scratch for a few
            minutes does not: it learns to ignore the images instead; see the README). The
            two differ only in the background's grey: every object, caption and question is
            the same.
        hard_family_size: items come in families of this many consecutive items (``i // k``)
            that differ in exactly one attribute of one object and share their task (see the
            module docstring); 1 (default): independent scenes, as without it. At most 8.
        vqa_questions_per_scene: items come in groups of this many consecutive items sharing
            their task; a VQA group asks this many questions with different answers about one
            scene (see the module docstring). 1 (default): one question per scene, as without
            it. At most 4; no effect with ``hard_family_size > 1``.
    """

    def __init__(
        self,
        num_samples: int,
        *,
        seed: int = 0,
        split: str = "train",
        image_size: int = 64,
        tasks: Sequence[str] = SYNTHETIC_TASKS,
        min_shapes: int = 1,
        max_shapes: int = 3,
        hard_negatives: bool = False,
        hard_family_size: int = 1,
        background: str = "plain",
        vqa_questions_per_scene: int = 1,
    ):
        if split not in ("train", "eval"):
            raise InvalidArgument(f"split must be 'train' or 'eval', got {split!r}")
        if num_samples < 0:
            raise InvalidArgument(f"num_samples must be >= 0, got {num_samples}")
        if image_size < 32:
            raise InvalidArgument(f"image_size must be >= 32 (shapes would not be recognisable), got {image_size}")
        tasks = tuple(tasks)
        bad = [t for t in tasks if t not in SYNTHETIC_TASKS]
        if not tasks or bad:
            raise InvalidArgument(f"tasks must be a non-empty subset of {SYNTHETIC_TASKS}, got {tasks}")
        if not 1 <= min_shapes <= max_shapes <= len(POSITIONS):
            raise InvalidArgument(f"need 1 <= min_shapes <= max_shapes <= {len(POSITIONS)}, got {min_shapes}, {max_shapes}")
        if background not in BACKGROUNDS:
            raise InvalidArgument(f"background must be one of {BACKGROUNDS}, got {background!r}")
        self.background = background
        self.num_samples = int(num_samples)
        self.seed = int(seed)
        self.split = split
        self.image_size = int(image_size)
        self.tasks = tasks
        self.min_shapes = int(min_shapes)
        self.max_shapes = int(max_shapes)
        self.hard_negatives = bool(hard_negatives)
        if (not isinstance(hard_family_size, int) or isinstance(hard_family_size, bool)
                or not 1 <= hard_family_size <= MAX_FAMILY_SIZE):
            raise InvalidArgument(f"hard_family_size must be an int in 1..{MAX_FAMILY_SIZE} (a family varies one "
                             f"attribute over distinct values; there are {MAX_FAMILY_SIZE} colours), got "
                             f"{hard_family_size!r}")
        self.hard_family_size = hard_family_size
        q = vqa_questions_per_scene
        if not isinstance(q, int) or isinstance(q, bool) or not 1 <= q <= MAX_QUESTIONS_PER_SCENE:
            raise InvalidArgument(f"vqa_questions_per_scene must be an int in 1..{MAX_QUESTIONS_PER_SCENE} (questions "
                             f"with different answers about one scene), got {q!r}")
        self.vqa_questions_per_scene = q
        # consecutive items sharing their task: a hard family, or a VQA question group
        self._group = hard_family_size if hard_family_size > 1 else q

    def __len__(self) -> int:
        return self.num_samples

    def _index(self, i: int) -> int:
        if not -self.num_samples <= i < self.num_samples:
            raise IndexError(f"index {i} out of range for SyntheticDataset of length {self.num_samples}")
        return i % self.num_samples

    def task(self, i: int) -> str:
        return self.tasks[(self._index(i) // self._group) % len(self.tasks)]

    def family(self, i: int) -> int:
        """The family of item ``i`` (``i // hard_family_size``; each item its own with size 1);
        with ``vqa_questions_per_scene=q > 1`` (and no families) its question group, ``i // q``."""
        return self._index(i) // self._group

    def _question_group(self, i: int) -> tuple[Scene, tuple[str, str, str]]:
        """VQA item ``i``'s scene, shared by its question group (drawn as item ``i - i % q``
        draws its own), and its own question, one of the group's ``q`` with different answers."""
        q = self.vqa_questions_per_scene
        first = i - i % q
        scene = _draw_scene(_rng(self.seed, self.split, first), self.min_shapes, self.max_shapes, self.background)
        return scene, _distinct_questions(_rng(self.seed, self.split, first, "questions"), scene, q)[i % q]

    def _grouped_vqa(self, i: int) -> bool:
        return self.hard_family_size == 1 and self.vqa_questions_per_scene > 1 and self.task(i) == "vqa"

    def _family_member(self, i: int) -> tuple[Scene, tuple[str, str, str] | None]:
        """Item ``i``'s scene as a member of its family, and the family's VQA question (None
        unless the task is VQA): the base scene is drawn as item ``i - i % k`` draws its own."""
        k = self.hard_family_size
        first = i - i % k
        base = _draw_scene(_rng(self.seed, self.split, first), self.min_shapes, self.max_shapes, self.background)
        frng = _rng(self.seed, self.split, first, "family")
        vqa = self.task(i) == "vqa"
        j, attr, values = _family_variation(frng, base, k, vqa)
        member = replace(base.objects[j], **{attr: values[i % k]})
        objects = list(base.objects)
        objects[j] = member
        return Scene(_sorted(objects), base.background), (_family_question(frng, member, attr) if vqa else None)

    def query_has_image(self) -> np.ndarray:
        """(len,) bool: which queries carry an image (i2t and vqa do, t2i does not), without
        drawing anything; what batches grouped by modality need."""
        has = np.array([t != "t2i" for t in self.tasks], dtype=bool)
        return has[(np.arange(self.num_samples) // self._group) % len(self.tasks)]

    def scene(self, i: int) -> Scene:
        """The scene of item ``i`` (what its image shows and its caption says)."""
        if self.hard_family_size > 1:
            return self._family_member(self._index(i))[0]
        if self._grouped_vqa(i):
            return self._question_group(self._index(i))[0]
        return _draw_scene(_rng(self.seed, self.split, self._index(i)), self.min_shapes, self.max_shapes,
                           self.background)

    def __getitem__(self, i: int) -> Record:
        i = self._index(i)
        rng = _rng(self.seed, self.split, i)
        scene = _draw_scene(rng, self.min_shapes, self.max_shapes, self.background)
        family_question = None
        if self.hard_family_size > 1:
            scene, family_question = self._family_member(i)
        elif self._grouped_vqa(i):
            scene, family_question = self._question_group(i)
        task = self.task(i)
        caption = describe_scene(scene)
        image = render_scene(scene, self.image_size)
        scene_key = "scene:" + caption  # image targets are keyed by what they show
        # negatives draw from their own stream: switching them on changes no positive
        neg_rng = _rng(self.seed, self.split, i, "negative") if self.hard_negatives else None
        neg_text = neg_image = neg_id = None
        if task == "i2t":
            qry, qry_image, pos_text, pos_image = I2T_QUERY, image, caption, None
            query_id, target_id = make_id(qry, scene_key), make_id(caption, None)
            if neg_rng is not None:
                neg_text = describe_scene(_perturb(neg_rng, scene))
                neg_id = make_id(neg_text, None)
        elif task == "t2i":
            qry, qry_image, pos_text, pos_image = caption, None, T2I_TARGET, image
            query_id, target_id = make_id(caption, None), make_id(T2I_TARGET, scene_key)
            if neg_rng is not None:
                neg_scene = _perturb(neg_rng, scene)
                neg_text, neg_image = T2I_TARGET, render_scene(neg_scene, self.image_size)
                neg_id = make_id(T2I_TARGET, "scene:" + describe_scene(neg_scene))
        else:
            question, answer, kind = _question(rng, scene) if family_question is None else family_question
            qry, qry_image, pos_text, pos_image = VQA_PREFIX + question, image, answer, None
            query_id, target_id = make_id(qry, scene_key), make_id(answer, None)
            if neg_rng is not None:
                neg_text = neg_rng.choice([a for a in _ANSWERS[kind] if a != answer])
                neg_id = make_id(neg_text, None)
        return {
            "qry": qry,
            "qry_image": qry_image,
            "pos_text": pos_text,
            "pos_image": pos_image,
            "neg_text": neg_text,
            "neg_image": neg_image,
            "target_id": target_id,
            "query_id": query_id,
            "neg_id": neg_id,
            "subset": f"synthetic_{task}",
            "row": i,
        }

    def __repr__(self) -> str:
        return (
            f"SyntheticDataset({self.num_samples}, seed={self.seed}, split={self.split!r}, "
            f"image_size={self.image_size}, tasks={self.tasks}, shapes={self.min_shapes}..{self.max_shapes}, "
            f"hard_negatives={self.hard_negatives}, background={self.background!r}"
            + (f", hard_family_size={self.hard_family_size}" if self.hard_family_size > 1 else "")
            + (f", vqa_questions_per_scene={self.vqa_questions_per_scene}" if self.vqa_questions_per_scene > 1
               else "")
            + ")"
        )


# ---------------------------------------------------------------- retrieval evaluation
@dataclass
class RetrievalSet:
    """Every query of a split against every distinct target of that split.

    Candidates are the split's targets deduplicated by ``target_id``, so each query has
    exactly one correct candidate (``positive[q]``) and a retrieved candidate is correct
    exactly when it has the query's ``target_id``. Chance precision@1 is ``1 / C``.
    """

    query_texts: list[str]
    query_images: list  # PIL.Image.Image | None
    query_subsets: list[str]
    cand_texts: list[str]
    cand_images: list  # PIL.Image.Image | None
    cand_ids: list[str]  # target_id of each candidate (unique)
    positive: torch.Tensor  # (Q,) int64 index into the candidates

    @property
    def num_queries(self) -> int:
        return len(self.query_texts)

    @property
    def num_candidates(self) -> int:
        return len(self.cand_texts)

    @property
    def chance(self) -> float:
        return 1.0 / max(self.num_candidates, 1)

    def _hits(self, scores: torch.Tensor) -> torch.Tensor:
        if tuple(scores.shape) != (self.num_queries, self.num_candidates):
            raise InvalidArgument(
                f"scores must be (num_queries, num_candidates) = ({self.num_queries}, {self.num_candidates}), "
                f"got {tuple(scores.shape)}"
            )
        return scores.argmax(dim=1).cpu() == self.positive

    def precision_at_1(self, scores: torch.Tensor) -> float:
        """Fraction of queries whose top-scored candidate is their target; ``scores`` is (Q, C)."""
        return self._hits(scores).float().mean().item() if self.num_queries else 0.0

    def precision_at_1_by_subset(self, scores: torch.Tensor) -> dict[str, float]:
        hits = self._hits(scores)
        out = {}
        for subset in sorted(set(self.query_subsets)):
            mask = torch.tensor([s == subset for s in self.query_subsets])
            out[subset] = hits[mask].float().mean().item()
        return out

    def precision_at_1_by_task(self, scores: torch.Tensor) -> dict[str, dict]:
        """Per task, as MMEB scores each dataset on its own: a task's queries against only the
        distinct targets of that task's queries (an image->text query never competes with
        VQA answers or t2i images). Returns ``{task: {"p_at_1", "chance", "num_queries",
        "num_candidates"}}``, chance being ``1 / num_candidates`` of that task; the task of
        a query is its subset (``synthetic_i2t`` -> ``i2t``; an MMEB-train subset keeps its name)."""
        self._hits(scores)  # checks the shape
        out = {}
        tasks = [task_name(s) for s in self.query_subsets]
        for task in sorted(set(tasks)):
            rows = torch.tensor([q for q, t in enumerate(tasks) if t == task], dtype=torch.int64)
            cols = torch.unique(self.positive[rows])  # sorted candidate indices of this task's targets
            sub = scores.cpu()[rows][:, cols]
            hit = cols[sub.argmax(dim=1)] == self.positive[rows]
            out[task] = {"p_at_1": hit.float().mean().item(), "chance": 1.0 / len(cols),
                         "num_queries": len(rows), "num_candidates": len(cols)}
        return out

    def precision_at_1_from_embeddings(self, query_emb: torch.Tensor, cand_emb: torch.Tensor) -> float:
        """Precision@1 of embeddings (Q, d) against (C, d) by dot product (cosine if normalised)."""
        return self.precision_at_1(query_emb.float() @ cand_emb.float().t())


def task_name(subset: str) -> str:
    """The task a query's subset names: ``synthetic_vqa`` -> ``vqa``; other subsets (MMEB-train's) as they are."""
    return subset[len("synthetic_"):] if subset.startswith("synthetic_") else subset


def retrieval_candidates(dataset, limit: int | None = None) -> RetrievalSet:
    """Build the retrieval evaluation of any record dataset (its first ``limit`` items)."""
    n = len(dataset) if limit is None else min(limit, len(dataset))
    q_texts, q_images, q_subsets, c_texts, c_images, c_ids, positive = [], [], [], [], [], [], []
    index: dict[str, int] = {}
    for i in range(n):
        r = dataset[i]
        q_texts.append(r["qry"])
        q_images.append(r["qry_image"])
        q_subsets.append(r["subset"])
        tid = r["target_id"]
        if tid not in index:
            index[tid] = len(c_ids)
            c_texts.append(r["pos_text"])
            c_images.append(r["pos_image"])
            c_ids.append(tid)
        positive.append(index[tid])
    return RetrievalSet(q_texts, q_images, q_subsets, c_texts, c_images, c_ids, torch.tensor(positive, dtype=torch.int64))


def synthetic_eval_candidates(dataset: SyntheticDataset, limit: int | None = None) -> RetrievalSet:
    """The held-out retrieval evaluation: every query against all distinct targets of the split."""
    return retrieval_candidates(dataset, limit)


def write_mmeb_train(folder: str, n: int, *, seed: int = 0, image_size: int = 64, image_format: str = "png",
                     name: str = "Synth") -> tuple[str, str]:
    """Write ``n`` synthetic pairs as an MMEB-train file: ``folder/<name>.jsonl`` (columns
    ``qry``, ``qry_image_path``, ``pos_text``, ``pos_image_path``; image paths relative) and
    the images under ``folder/images`` ("png", or "jpg" at quality 90). Returns (data file,
    image folder), ready for ``MMEBDataset`` / ``--data-files ... --image-dir``."""
    import json
    import os

    if image_format not in ("png", "jpg"):
        raise InvalidArgument(f"image_format must be 'png' or 'jpg', got {image_format!r}")
    ds = SyntheticDataset(n, seed=seed, image_size=image_size)
    img = os.path.join(folder, "images")
    os.makedirs(img, exist_ok=True)
    rows = []
    for i in range(n):
        r = ds[i]
        row = {"qry": r["qry"], "qry_image_path": "", "pos_text": r["pos_text"], "pos_image_path": ""}
        for side, col in (("qry_image", "qry_image_path"), ("pos_image", "pos_image_path")):
            if r[side] is not None:
                row[col] = f"{side}_{i}.{image_format}"
                extra = {"quality": 90} if image_format == "jpg" else {}
                r[side].save(os.path.join(img, row[col]), **extra)
        rows.append(row)
    path = os.path.join(folder, f"{name}.jsonl")
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return path, img
