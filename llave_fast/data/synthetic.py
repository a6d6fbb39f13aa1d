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

The scenes themselves (vocabulary, drawing, captions, questions) are in :mod:`.scenes`; the
retrieval evaluation is in :mod:`.retrieval`; both stay importable from here.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Sequence

import numpy as np
import torch

from .collate import Record, make_id
from .retrieval import RetrievalSet, retrieval_candidates, task_name  # noqa: F401 - re-exported
from .scenes import (  # noqa: F401 - re-exported: llave_fast.data and tests import them from here
    ANSWERS,
    BACKGROUND_LEVELS,
    BACKGROUNDS,
    COLOUR_RGB,
    COLOURS,
    COUNT_WORDS,
    FUNCTION_WORDS,
    I2T_QUERY,
    MAX_FAMILY_SIZE,
    MAX_QUESTIONS_PER_SCENE,
    PLAIN_BACKGROUND,
    POSITIONS,
    PUNCTUATION,
    QUESTION_KINDS,
    RADIUS,
    SHAPE_PLURALS,
    SHAPES,
    SIZES,
    SLOT_CENTERS,
    SLOT_ORDER,
    SLOT_PHRASE,
    SYNTHETIC_TASKS,
    SYNTHETIC_VOCAB,
    T2I_TARGET,
    VQA_PREFIX,
    Scene,
    SceneObject,
    describe_scene,
    distinct_questions,
    draw_question,
    draw_scene,
    family_question,
    family_variation,
    item_rng,
    perturb_scene,
    render_scene,
    sorted_objects,
    synthetic_words,
)
from ..errors import InvalidArgument

__all__ = [
    "write_mmeb_train",
    "BACKGROUNDS",
    "COLOURS",
    "COLOUR_RGB",
    "POSITIONS",
    "QUESTION_KINDS",
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
        scene = draw_scene(item_rng(self.seed, self.split, first), self.min_shapes, self.max_shapes, self.background)
        return scene, distinct_questions(item_rng(self.seed, self.split, first, "questions"), scene, q)[i % q]

    def _grouped_vqa(self, i: int) -> bool:
        return self.hard_family_size == 1 and self.vqa_questions_per_scene > 1 and self.task(i) == "vqa"

    def _family_member(self, i: int) -> tuple[Scene, tuple[str, str, str] | None]:
        """Item ``i``'s scene as a member of its family, and the family's VQA question (None
        unless the task is VQA): the base scene is drawn as item ``i - i % k`` draws its own."""
        k = self.hard_family_size
        first = i - i % k
        base = draw_scene(item_rng(self.seed, self.split, first), self.min_shapes, self.max_shapes, self.background)
        frng = item_rng(self.seed, self.split, first, "family")
        vqa = self.task(i) == "vqa"
        j, attr, values = family_variation(frng, base, k, vqa)
        member = replace(base.objects[j], **{attr: values[i % k]})
        objects = list(base.objects)
        objects[j] = member
        return Scene(sorted_objects(objects), base.background), (family_question(frng, member, attr) if vqa else None)

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
        return draw_scene(item_rng(self.seed, self.split, self._index(i)), self.min_shapes, self.max_shapes,
                           self.background)

    def _scene_and_question(self, i: int) -> tuple[Scene, tuple[str, str, str] | None]:
        """Item ``i``'s scene and, for a VQA item, its ``(question, answer, kind)`` (None otherwise):
        the one place both are drawn, for :meth:`__getitem__` and :meth:`question_kind` alike."""
        rng = item_rng(self.seed, self.split, i)
        scene = draw_scene(rng, self.min_shapes, self.max_shapes, self.background)
        question = None
        if self.hard_family_size > 1:
            scene, question = self._family_member(i)
        elif self._grouped_vqa(i):
            scene, question = self._question_group(i)
        if self.task(i) == "vqa" and question is None:
            question = draw_question(rng, scene)  # the item's own stream, right after its scene
        return scene, question

    def question(self, i: int) -> tuple[str, str, str] | None:
        """VQA item ``i``'s ``(question, answer, kind)``: the question without the query's instruction
        (:data:`VQA_PREFIX`), its answer (the positive's text) and :meth:`question_kind`; None for an i2t
        or t2i item. Drawn as the item draws them, nothing rendered."""
        return None if self.task(i) != "vqa" else tuple(self._scene_and_question(self._index(i))[1])

    def question_kind(self, i: int) -> str | None:
        """What VQA item ``i``'s answer names, one of :data:`QUESTION_KINDS` (``"count"``,
        ``"colour"``, ``"shape"``, ``"size"``, ``"position"``: the kinds of :data:`ANSWERS`);
        None for an i2t or t2i item. Drawn as the item draws its question, nothing rendered."""
        q = self.question(i)
        return None if q is None else q[2]

    def __getitem__(self, i: int) -> Record:
        i = self._index(i)
        scene, question = self._scene_and_question(i)
        task = self.task(i)
        caption = describe_scene(scene)
        image = render_scene(scene, self.image_size)
        scene_key = "scene:" + caption  # image targets are keyed by what they show
        # negatives draw from their own stream: switching them on changes no positive
        neg_rng = item_rng(self.seed, self.split, i, "negative") if self.hard_negatives else None
        neg_text = neg_image = neg_id = None
        if task == "i2t":
            qry, qry_image, pos_text, pos_image = I2T_QUERY, image, caption, None
            query_id, target_id = make_id(qry, scene_key), make_id(caption, None)
            if neg_rng is not None:
                neg_text = describe_scene(perturb_scene(neg_rng, scene))
                neg_id = make_id(neg_text, None)
        elif task == "t2i":
            qry, qry_image, pos_text, pos_image = caption, None, T2I_TARGET, image
            query_id, target_id = make_id(caption, None), make_id(T2I_TARGET, scene_key)
            if neg_rng is not None:
                neg_scene = perturb_scene(neg_rng, scene)
                neg_text, neg_image = T2I_TARGET, render_scene(neg_scene, self.image_size)
                neg_id = make_id(T2I_TARGET, "scene:" + describe_scene(neg_scene))
        else:
            question, answer, kind = question
            qry, qry_image, pos_text, pos_image = VQA_PREFIX + question, image, answer, None
            query_id, target_id = make_id(qry, scene_key), make_id(answer, None)
            if neg_rng is not None:
                neg_text = neg_rng.choice([a for a in ANSWERS[kind] if a != answer])
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


def synthetic_eval_candidates(dataset: SyntheticDataset, limit: int | None = None) -> RetrievalSet:
    """The held-out retrieval evaluation: every query against all distinct targets of the split."""
    return retrieval_candidates(dataset, limit)


def write_mmeb_train(folder: str, n: int, *, seed: int = 0, image_size: int = 64, image_format: str = "png",
                     name: str = "Synth") -> tuple[str, str]:
    """Write ``n`` synthetic pairs as an MMEB-train file: ``folder/<name>.jsonl`` (columns
    ``qry``, ``qry_image_path``, ``pos_text``, ``pos_image_path``; image paths relative) and
    the images under ``folder/images`` ("png", or "jpg" at quality 90). Returns (data file,
    image folder), ready for ``MMEBDataset`` / ``llave-fast train --data FILE --image-dir FOLDER``."""
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
