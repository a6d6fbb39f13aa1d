"""MMEB's 36 evaluation datasets: each one's meta-task and whether it is in or out of distribution.

Names are spelled as MMEB-eval ships them (the subsets of ``TIGER-Lab/MMEB-eval``, the
folder names of its parquet release, VLM2Vec's ``--subset_name`` list). The split follows
the MMEB paper (Jiang et al., 2024, "VLM2Vec"): 20 datasets in distribution (their
training splits are in MMEB-train), 16 out of distribution. Meta-tasks: 10 classification,
10 VQA, 12 retrieval, 4 visual grounding.

``llave-fast eval`` reports every dataset it scores; a file whose name is not here is
reported under its own name with ``meta_task`` None and counts in ``overall`` only.
"""

from __future__ import annotations

__all__ = ["META_TASKS", "MMEB_TASKS", "SPLITS", "meta_task_of", "split_of"]

META_TASKS = ("classification", "vqa", "retrieval", "grounding")
SPLITS = ("ind", "ood")

# name -> (meta_task, split); grouped by meta-task, in MMEB's table order
MMEB_TASKS: dict[str, tuple[str, str]] = {
    # classification: 5 in distribution, 5 out
    "ImageNet-1K": ("classification", "ind"),
    "N24News": ("classification", "ind"),
    "HatefulMemes": ("classification", "ind"),
    "VOC2007": ("classification", "ind"),
    "SUN397": ("classification", "ind"),
    "Place365": ("classification", "ood"),
    "ImageNet-A": ("classification", "ood"),
    "ImageNet-R": ("classification", "ood"),
    "ObjectNet": ("classification", "ood"),
    "Country211": ("classification", "ood"),
    # visual question answering: 6 in, 4 out
    "OK-VQA": ("vqa", "ind"),
    "A-OKVQA": ("vqa", "ind"),
    "DocVQA": ("vqa", "ind"),
    "InfographicsVQA": ("vqa", "ind"),
    "ChartQA": ("vqa", "ind"),
    "Visual7W": ("vqa", "ind"),
    "ScienceQA": ("vqa", "ood"),
    "VizWiz": ("vqa", "ood"),
    "GQA": ("vqa", "ood"),
    "TextVQA": ("vqa", "ood"),
    # retrieval: 8 in, 4 out
    "VisDial": ("retrieval", "ind"),
    "CIRR": ("retrieval", "ind"),
    "VisualNews_t2i": ("retrieval", "ind"),
    "VisualNews_i2t": ("retrieval", "ind"),
    "MSCOCO_t2i": ("retrieval", "ind"),
    "MSCOCO_i2t": ("retrieval", "ind"),
    "NIGHTS": ("retrieval", "ind"),
    "WebQA": ("retrieval", "ind"),
    "FashionIQ": ("retrieval", "ood"),
    "Wiki-SS-NQ": ("retrieval", "ood"),
    "OVEN": ("retrieval", "ood"),
    "EDIS": ("retrieval", "ood"),
    # visual grounding: 1 in, 3 out
    "MSCOCO": ("grounding", "ind"),
    "RefCOCO": ("grounding", "ood"),
    "RefCOCO-Matching": ("grounding", "ood"),
    "Visual7W-Pointing": ("grounding", "ood"),
}


def meta_task_of(name: str) -> str | None:
    """The meta-task of an MMEB-eval dataset (``classification``, ``vqa``, ``retrieval``,
    ``grounding``), or None for a name MMEB does not have."""
    entry = MMEB_TASKS.get(name)
    return None if entry is None else entry[0]


def split_of(name: str) -> str | None:
    """``ind`` or ``ood`` for an MMEB-eval dataset, None for a name MMEB does not have."""
    entry = MMEB_TASKS.get(name)
    return None if entry is None else entry[1]
