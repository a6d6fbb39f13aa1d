"""The loss of one step: the fused cross-rank loss (every pair of the global batch a negative for
every query), LLaVE's micro-step negatives around it when ``accumulation_steps > 1``, and a probe
that keeps a look at the step's embeddings for the report a non-finite loss needs."""

from __future__ import annotations

import torch

from ..errors import InvalidArgument
from ..gradcache import split_batch
from ..loss import FusedHardnessLoss, hardness_weighted_loss
from .config import TrainConfig


def build_loss(cfg: TrainConfig, world: int) -> "_LossProbe":
    """The step's loss as GradCache calls it. Every argument that decides what it computes is given
    here, none left to a default: LLaVE's symmetric loss, averaged over this rank's queries; across
    ranks (``distributed``) each rank's queries meet the whole gathered batch with gradients through
    the gather, and ``local_loss=True`` keeps each rank's loss its own (LLaVE's), not open_clip's
    global one. The duplicate masks and negatives are passed per call."""
    loss_fn = FusedHardnessLoss(cfg.logit_scale, cfg.alpha, symmetric=True, reduction="mean",
                                backend=cfg.loss_backend, deterministic=False, local_loss=True,
                                distributed=world > 1)
    if cfg.accumulation_steps > 1:
        loss_fn = MicroStepLoss(loss_fn, cfg.accumulation_steps)
    return _LossProbe(loss_fn)


def duplicate_ids(batch: dict, mask_duplicates: bool) -> dict:
    """The ids that mask false negatives, as the loss takes them (``{}``: no masking).

    Duplicate targets (MMEB classification / VQA answers) are false negatives in both directions:
    q->t masks candidate targets with the positive's id, and t->q masks candidate queries whose own
    target carries that id (so the queries are labelled with their targets' ids)."""
    if not mask_duplicates:
        return {}
    target_ids = batch["target_ids"]
    if batch.get("negatives") is not None and batch.get("negative_ids") is not None:
        target_ids = torch.cat([target_ids, batch["negative_ids"]])
    return dict(target_ids=target_ids, query_ids=batch["target_ids"])


class MicroStepLoss(torch.nn.Module):
    """LLaVE's negatives: gradient accumulation where each micro-step's loss sees only its own pairs.

    The rank's share of a global batch is cut into ``steps`` consecutive micro-batches; the
    wrapped (cross-rank) loss is computed per micro-batch, so micro-batch i of every rank
    meets only micro-batch i of the others (LLaVE: 8 ranks x 4 pairs = 32 pairs per loss),
    and the mean over micro-steps is returned: the loss, hence the gradient, of gradient
    accumulation with 1/steps scaling. Hard negatives (one per pair) are cut alike; so are
    the duplicate-masking ids.
    """

    def __init__(self, loss_fn, steps: int):
        super().__init__()
        if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
            raise InvalidArgument(f"accumulation_steps must be a positive int, got {steps!r}")
        self.loss_fn, self.steps = loss_fn, steps

    def forward(self, query, target, *, negatives=None, target_ids=None, query_ids=None):
        B = query.shape[0]
        if B % self.steps:
            raise InvalidArgument(f"the rank's batch of {B} pairs does not split into accumulation_steps={self.steps}")
        if negatives is not None and negatives.shape[0] != B:
            raise InvalidArgument(f"micro-step negatives need one hard negative per pair: {negatives.shape[0]} for {B}")
        m = B // self.steps
        losses = []
        for i in range(self.steps):
            sl = slice(i * m, (i + 1) * m)
            tid = None
            if target_ids is not None:
                tid = target_ids[:B][sl] if negatives is None else torch.cat([target_ids[:B][sl], target_ids[B:][sl]])
            losses.append(self.loss_fn(
                query[sl], target[sl],
                negatives=None if negatives is None else negatives[sl],
                target_ids=tid,
                query_ids=None if query_ids is None else query_ids[sl],
            ))
        return torch.stack(losses).mean()


def by_length(side: dict | None, chunk_size: int | None = None) -> tuple[dict | None, torch.Tensor | None]:
    """(one side of the batch with its rows in order of real length, stable; that order).

    With ``chunk_size``, a side that fits one chunk comes back as it is (order None): one chunk is
    padded to the longest row whatever the order, so sorting would gain nothing and only change
    the rounding of a run that takes GradCache's single pass (the default job's numbers).

    The collator pads a side to its longest row, so with anyres images beside short texts most of a
    GradCache chunk is padding. Sorted, a chunk holds rows of like length, and :func:`chunks` pads
    each to its own longest row. Every row embeds the same whatever its padding (positions count
    real tokens, the last real token is pooled), and the loss puts the embeddings back in the
    batch's order first (``orders`` of :class:`_LossProbe`): the loss is the unsorted batch's."""
    if side is None:
        return None, None
    if chunk_size is not None and side["attention_mask"].shape[0] <= chunk_size:
        return side, None
    order = torch.sort(side["attention_mask"].sum(dim=1), stable=True).indices
    return _rows(side, order), order


def _rows(x, order: torch.Tensor):
    if isinstance(x, torch.Tensor) and x.dim() > 0:
        return x[order.to(x.device)]
    if isinstance(x, dict):
        return {k: _rows(v, order) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(x[i] for i in order.tolist())
    return x


def chunks(inputs: dict, chunk_size: int) -> list[dict]:
    """GradCache's ``split``: chunks of ``chunk_size`` rows (``split_batch``), each cut to the columns
    its own rows need (all-padding columns dropped, on either padding side)."""
    out = []
    for c in split_batch(inputs, chunk_size):
        used = torch.nonzero(c["attention_mask"].bool().any(dim=0)).flatten()
        lo, hi = int(used[0]), int(used[-1]) + 1
        if (lo, hi) != (0, c["attention_mask"].shape[1]):
            c = dict(c, input_ids=c["input_ids"][:, lo:hi], attention_mask=c["attention_mask"][:, lo:hi])
        out.append(c)
    return out


def _unsort(x, order):
    if x is None or order is None:
        return x
    return x[torch.argsort(order.to(x.device))]


class _LossProbe(torch.nn.Module):
    """The loss, keeping a look at this step's embeddings for the report a non-finite loss needs.

    ``orders``: (query, target, negative) row orders of :func:`by_length` (None: as batched); the
    embeddings are put back in the batch's order before anything else."""

    def __init__(self, loss_fn):
        super().__init__()
        self.loss_fn = loss_fn
        self._seen = self._embs = None

    def forward(self, query, target, *, orders=None, **kw):
        if orders is not None:
            query, target = _unsort(query, orders[0]), _unsort(target, orders[1])
            if kw.get("negatives") is not None:
                kw["negatives"] = _unsort(kw["negatives"], orders[2])
        neg = kw.get("negatives")
        self._seen = [(~torch.isfinite(x.detach())).sum().item() if x is not None else 0
                      for x in (query, target, neg)] + [query.numel()]
        self._embs = (query.detach(), target.detach())
        return self.loss_fn(query, target, **kw)

    def directions(self, logit_scale: float, alpha: float) -> dict:
        """The loss's two directions over this rank's own pairs (no collectives, no masks or
        negatives): where a non-finite loss comes from."""
        if self._embs is None:
            return {}
        q, t = (x.float() for x in self._embs)
        try:
            with torch.no_grad():
                return {d: hardness_weighted_loss(a, b, logit_scale=logit_scale, alpha=alpha, symmetric=False,
                                                  reduction="mean", backend="torch", distributed=False,
                                                  local_loss=True).item()
                        for d, (a, b) in (("query->target", (q, t)), ("target->query", (t, q)))}
        except Exception as exc:  # a diagnosis must not hide the error it diagnoses
            return {"not computed": f"{type(exc).__name__}: {exc}"}

    def non_finite(self) -> list:
        """[non-finite query, target, negative values, query elements] of the last call."""
        return self._seen or [0, 0, 0, 0]

    def clear(self):
        self._seen = self._embs = None


def _to_device(batch, device):
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, dict):
        return {k: _to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, list):
        return [_to_device(v, device) for v in batch]
    return batch
