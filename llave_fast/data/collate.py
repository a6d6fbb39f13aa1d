"""Records to model inputs: the pair collator and the process-stable ids the loss masks with.

Every dataset in ``llave_fast.data`` yields a *record*, a plain dict (see ``Record``): the
query (text, optional image), the positive target, an optional hard negative, and string
ids naming the query and the target. ``PairCollator`` turns a list of records into the
three processor calls the training step needs and the int64 id tensors the loss takes
(``target_ids`` masks duplicate targets, ``query_ids`` duplicate queries).

Ids are hashed with BLAKE2b, never with Python's ``hash()``: ``hash(str)`` is salted per
process (PYTHONHASHSEED), and ranks must agree on every id for the cross-rank masks.
"""

from __future__ import annotations

import hashlib
from typing import Any, Callable, Sequence, TypedDict

import torch
from ..errors import InvalidArgument, InvalidArgumentType

__all__ = ["IMAGE_PLACEHOLDER", "PairCollator", "Record", "make_id", "stable_id", "stable_ids"]

# MMEB's image placeholder (Phi-3-V's token); the model's processor replaces it.
IMAGE_PLACEHOLDER = "<|image_1|>"


class Record(TypedDict):
    """What every dataset yields (one training pair).

    ``target_id``/``query_id`` are canonical strings: two records with equal ids have the
    same target (query) content, so the loss must not treat one as the other's negative.
    ``neg_id`` names the hard negative the same way (None when the record carries none).
    """

    qry: str
    qry_image: Any  # PIL.Image.Image | None
    pos_text: str
    pos_image: Any  # PIL.Image.Image | None
    neg_text: str | None
    neg_image: Any  # PIL.Image.Image | None
    target_id: str
    query_id: str
    neg_id: str | None
    subset: str
    row: int


def make_id(text: str, image_key: str | None) -> str:
    """The canonical id string of one side of a pair: its text, NUL, its image key ('' if none)."""
    return f"{text}\x00{image_key or ''}"


def stable_id(key: str) -> int:
    """int64 hash of ``key``, identical in every process and on every machine (BLAKE2b, 8 bytes)."""
    digest = hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little", signed=True)


def stable_ids(keys: Sequence[str]) -> torch.Tensor:
    """``stable_id`` of every key, as a LongTensor."""
    return torch.tensor([stable_id(k) for k in keys], dtype=torch.int64)


Processor = Callable[[list, list], Any]


class PairCollator:
    """Collate records into ``{"query", "target", "negatives", "target_ids", "query_ids"}``.

    ``processor(texts, images)`` is called once per side with parallel lists (an image
    entry is ``None`` for a text-only item; a missing text is ``""``). A processor with an
    ``image_without_placeholder`` rule (:class:`~llave_fast.model.LLaVEProcessor`) is called with
    ``image_without_placeholder=`` this collator's (default "drop"): an image whose text has no
    placeholder is dropped and the text alone embedded, as LLaVE's training does
    (``llava/train/train.py: LazySupervisedDataset.__getitem__`` keeps every image, and
    ``llava/model/llava_arch.py: prepare_inputs_labels_for_multimodal`` gives a text without
    ``<image>`` zero image features); its single non-leading placeholder moves to the front
    (``preprocess_multimodal``, in the processor). With
    ``use_negatives=True`` every record must carry a hard negative (text or image); the
    negatives go through the processor as a third call and their ids come back as
    ``negative_ids``, so ``torch.cat([target_ids, negative_ids])`` is the loss's full
    ``target_ids``. Without it, negatives in the records are ignored and ``"negatives"``
    and ``"negative_ids"`` are None.

    Each side is padded to its longest row. The training step does not run it so: it sorts each
    side's rows by length and pads each GradCache chunk to its own longest row
    (:func:`llave_fast.training.step.by_length`, :func:`~llave_fast.training.step.chunks`), which
    leaves the loss as it is (padding is masked) and most of the padding out.
    """

    def __init__(self, processor: Processor, *, use_negatives: bool = False, image_without_placeholder: str = "drop"):
        if not callable(processor):
            raise InvalidArgumentType(f"processor must be callable as processor(texts, images); got {type(processor).__name__}")
        if image_without_placeholder not in ("drop", "prepend"):
            raise InvalidArgument(f"image_without_placeholder must be 'drop' (LLaVE's rule) or 'prepend', "
                             f"got {image_without_placeholder!r}")
        self.processor = processor
        self.use_negatives = bool(use_negatives)
        self.image_without_placeholder = image_without_placeholder

    def _process(self, texts: list, images: list):
        if getattr(self.processor, "image_without_placeholder", None) is not None:  # an LLaVEProcessor
            return self.processor(texts, images, image_without_placeholder=self.image_without_placeholder)
        return self.processor(texts, images)

    def __call__(self, records: Sequence[Record]) -> dict:
        if len(records) == 0:
            raise InvalidArgument("PairCollator got an empty batch")
        query = self._process([r["qry"] or "" for r in records], [r["qry_image"] for r in records])
        target = self._process([r["pos_text"] or "" for r in records], [r["pos_image"] for r in records])
        negatives = negative_ids = None
        if self.use_negatives:
            for r in records:
                if not r.get("neg_text") and r.get("neg_image") is None:
                    raise InvalidArgument(
                        f"use_negatives=True but the record for subset {r.get('subset')!r} row {r.get('row')} "
                        "has no hard negative (neg_text and neg_image are both empty); build the dataset "
                        "with use_negatives=True (MMEB) or hard_negatives=True (synthetic)"
                    )
            negatives = self._process([r["neg_text"] or "" for r in records], [r["neg_image"] for r in records])
            negative_ids = stable_ids([_neg_key(r) for r in records])
        return {
            "query": query,
            "target": target,
            "negatives": negatives,
            "target_ids": stable_ids([r["target_id"] for r in records]),
            "query_ids": stable_ids([r["query_id"] for r in records]),
            "negative_ids": negative_ids,
        }


def _neg_key(r: Record) -> str:
    # a negative's id lives in the same namespace as target ids: a negative equal to some
    # other row's positive is masked for that row like any duplicate target
    neg_id = r.get("neg_id")
    if neg_id is None:
        raise InvalidArgument(f"record for subset {r.get('subset')!r} row {r.get('row')} has a negative but no neg_id")
    return neg_id
