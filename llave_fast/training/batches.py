"""Batch order: the sample indices of every global step, a pure function of (seed, step), plain or
grouped by modality (LLaVE's sampler), with synthetic families kept whole; and the check that the
data can fill the run's global batches."""

from __future__ import annotations

import torch

from ..errors import InvalidArgument
from .config import TrainConfig


def batch_indices(step: int, n: int, global_batch: int, seed: int) -> list[int]:
    """Sample indices of global step ``step``: epoch-wise permutations, last partial batch dropped."""
    per_epoch = n // global_batch
    if per_epoch == 0:
        raise InvalidArgument(f"the dataset has {n} samples, fewer than one global batch of {global_batch}")
    epoch, pos = divmod(step, per_epoch)
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(n, generator=g)
    return order[pos * global_batch : (pos + 1) * global_batch].tolist()


class BatchOrder:
    """The sample indices of every global step, a pure function of (seed, step).

    Plain: an epoch is a permutation of the data cut into global batches (the partial last one
    dropped). Grouped by modality (``query_has_image`` given, LLaVE's sampler): each
    modality's samples are permuted and cut into global batches of their own (each
    modality's partial last batch dropped), and the epoch's batches are shuffled, so every
    global batch holds only image queries or only text-only queries.

    With ``family_size=k > 1`` (opt-in; the synthetic data's ``hard_family_size``) the units
    shuffled are families, blocks of ``k`` consecutive indices (``i // k``), kept whole and in
    order; an incomplete last family is placed last. With ``global_batch`` a multiple of
    ``k``, every batch holds whole families. Grouped by modality, a family's group is its
    first member's (synthetic families share their task).
    """

    def __init__(self, n: int, global_batch: int, seed: int, query_has_image=None, family_size: int = 1):
        self.n, self.global_batch, self.seed = int(n), int(global_batch), int(seed)
        if not isinstance(family_size, int) or isinstance(family_size, bool) or family_size < 1:
            raise InvalidArgument(f"family_size must be a positive int, got {family_size!r}")
        self.family_size = family_size
        self.groups = None
        if query_has_image is not None:
            import numpy as np

            has = np.asarray(query_has_image, dtype=bool)
            if has.shape != (self.n,):
                raise InvalidArgument(f"query_has_image must have one flag per sample ({self.n}), got shape {has.shape}")
            if family_size > 1:  # a family goes where its first member goes
                has = has[np.arange(self.n) - np.arange(self.n) % family_size]
            self.groups = [torch.from_numpy(np.flatnonzero(has)), torch.from_numpy(np.flatnonzero(~has))]
            self.per_epoch = sum(len(g) // self.global_batch for g in self.groups)
        else:
            self.per_epoch = self.n // self.global_batch
        if self.per_epoch == 0:
            raise InvalidArgument(
                f"the dataset has {self.n} samples"
                + ("" if self.groups is None else f" ({len(self.groups[0])} image queries, {len(self.groups[1])} "
                   f"text-only queries)")
                + f": fewer than one global batch of {self.global_batch}"
                + ("" if self.groups is None else " in either modality")
            )
        self._epoch, self._batches = None, None

    def _epoch_batches(self, epoch: int) -> list[torch.Tensor]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        batches = []
        for members in self.groups if self.groups is not None else [torch.arange(self.n)]:
            order = self._shuffle(members, g)
            full = len(order) // self.global_batch
            batches += list(order[: full * self.global_batch].view(full, self.global_batch))
        return [batches[i] for i in torch.randperm(len(batches), generator=g).tolist()]

    def _shuffle(self, members: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        """``members`` in a random order: items, or (family_size > 1) whole families."""
        k = self.family_size
        if k == 1 or len(members) == 0:
            return members[torch.randperm(len(members), generator=g)]
        fam = members // k
        ids, counts = torch.unique(fam, return_counts=True)
        full = ids[counts == k]
        rank = torch.full((int(ids.max()) + 1,), len(full), dtype=torch.int64)  # incomplete families: last
        rank[full[torch.randperm(len(full), generator=g)]] = torch.arange(len(full))
        return members[torch.argsort(rank[fam] * k + members % k)]

    def __call__(self, step: int) -> list[int]:
        if self.groups is None and self.family_size == 1:
            return batch_indices(step, self.n, self.global_batch, self.seed)
        epoch, pos = divmod(step, self.per_epoch)
        if epoch != self._epoch:
            self._epoch, self._batches = epoch, self._epoch_batches(epoch)
        return self._batches[pos].tolist()


def check_data_fit(cfg: TrainConfig, rows: int, query_has_image=None) -> "BatchOrder":
    """The batch order of the run, or an error naming the option when the data cannot fill it:
    a global batch larger than the data (or than each modality, grouped)."""
    where = "the synthetic training set (--num-train)" if cfg.data == "synthetic" else f"--data {cfg.data}"
    if cfg.global_batch > rows:
        raise InvalidArgument(f"global_batch={cfg.global_batch} is larger than the training data: {rows} usable rows in "
                         f"{where}; lower --global-batch or add data")
    try:
        return BatchOrder(rows, cfg.global_batch, cfg.seed, query_has_image,
                          family_size=_family_size(cfg))
    except ValueError as exc:
        raise InvalidArgument(f"global_batch={cfg.global_batch}, group_by_modality={cfg.group_by_modality}: {exc} "
                         f"({where})") from exc


def _family_size(cfg: TrainConfig) -> int:
    """Consecutive items a batch keeps together: hard families, else VQA question groups (synthetic data)."""
    if cfg.data != "synthetic":
        return 1
    return cfg.hard_family_size if cfg.hard_family_size > 1 else cfg.vqa_questions_per_scene
