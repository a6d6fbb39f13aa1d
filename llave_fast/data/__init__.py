"""Training data: the MMEB-train reader, the built-in synthetic dataset, the pair collator.

Every dataset yields records (``Record``: query, positive target, optional hard negative,
canonical id strings); ``PairCollator`` turns a list of them into processor inputs and
the int64 ``target_ids``/``query_ids`` the loss masks duplicates with.
"""

from .collate import IMAGE_PLACEHOLDER, PairCollator, Record, make_id, stable_id, stable_ids
from .mmeb import MMEB_COLUMNS, BadDataError, MMEBDataset
from .synthetic import (
    SYNTHETIC_TASKS,
    SYNTHETIC_VOCAB,
    RetrievalSet,
    SyntheticDataset,
    retrieval_candidates,
    synthetic_eval_candidates,
    synthetic_words,
)

__all__ = [
    "IMAGE_PLACEHOLDER",
    "MMEB_COLUMNS",
    "SYNTHETIC_TASKS",
    "SYNTHETIC_VOCAB",
    "BadDataError",
    "MMEBDataset",
    "PairCollator",
    "Record",
    "RetrievalSet",
    "SyntheticDataset",
    "make_id",
    "retrieval_candidates",
    "stable_id",
    "stable_ids",
    "synthetic_eval_candidates",
    "synthetic_words",
]
