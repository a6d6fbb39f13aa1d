"""The eager LLaVE loss: the one copy of the formula that tests and benchmarks import.

This is what LLaVE's ``WeightedClipLoss`` computes on one process, written from the
maths (see README, "The loss") and extended with the options llave-fast adds
(hard negatives, id masks, reductions). It materialises the full logit matrices in
both directions, exactly like LLaVE's training code, so it is the baseline the fused
backends are measured against, and, run in float64, the truth they are tested against.

For queries ``q`` (B x d), targets ``t`` (B x d), candidates ``T`` (N x d, this rank's
targets at rows ``offset .. offset+B``) and ``Q`` (N x d):

    S_ij  = <q_i, T_j>,  p_i = offset + i
    z_ij  = s * S_ij + alpha * sg(S_ij)   (j != p_i)        # hardness weight exp(alpha S)
    z_ip  = s * S_ip                                        # the positive has weight 1
    L_q2t(i) = logsumexp_j z_ij - s * S_ip                  # and t->q the same with t, Q
"""

from __future__ import annotations

import torch

__all__ = ["reference_loss", "reference_per_row"]


def _direction(
    anchors: torch.Tensor,
    candidates: torch.Tensor,
    offset: int,
    scale,
    alpha: float,
    cand_ids: torch.Tensor | None = None,
    pos_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-anchor InfoNCE with detached hardness weights; anchor i's positive is column offset+i.

    ``cand_ids`` may be shorter than the candidate list: the candidates past its end
    (hard negatives given without ids) are never masked.
    """
    B = anchors.shape[0]
    sim = anchors @ candidates.t()  # B x C, materialised: this is the eager baseline
    rows = torch.arange(B, device=anchors.device)
    pos_cols = rows + offset
    is_pos = torch.zeros_like(sim, dtype=torch.bool)
    is_pos[rows, pos_cols] = True
    # log of the hardness weight exp(alpha * S), detached; the positive keeps weight 1
    log_w = torch.where(is_pos, torch.zeros_like(sim), alpha * sim.detach())
    logits = scale * sim + log_w
    if cand_ids is not None:
        # false negatives: a candidate carrying the positive's id, other than the positive
        same = torch.zeros_like(is_pos)
        n_ids = cand_ids.shape[0]
        same[:, :n_ids] = cand_ids[None, :] == pos_ids[:, None]
        logits = logits.masked_fill(same & ~is_pos, float("-inf"))
    return torch.logsumexp(logits, dim=1) - scale * sim[rows, pos_cols]


def reference_per_row(
    query: torch.Tensor,
    target: torch.Tensor,
    *,
    logit_scale,
    alpha: float,
    symmetric: bool = True,
    negatives: torch.Tensor | None = None,
    target_ids: torch.Tensor | None = None,
    query_ids: torch.Tensor | None = None,
    all_queries: torch.Tensor | None = None,
    all_targets: torch.Tensor | None = None,
    offset: int = 0,
) -> torch.Tensor:
    """Per-row loss ``(L_q2t + L_t2q) / 2`` (``L_q2t`` when one-way), shape (B,).

    ``all_queries``/``all_targets`` are the gathered candidates (default: the local
    batch at offset 0); ``negatives`` are appended to the q->t candidates only.
    ``target_ids`` holds one id per candidate target row (N), optionally followed by one
    per negative; ``query_ids`` one per candidate query row (N).
    """
    Q = query if all_queries is None else all_queries
    T = target if all_targets is None else all_targets
    B = query.shape[0]
    cand_t = T if negatives is None else torch.cat([T, negatives], dim=0)
    pos_tid = None if target_ids is None else target_ids[offset : offset + B]
    loss_q2t = _direction(query, cand_t, offset, logit_scale, alpha, target_ids, pos_tid)
    if not symmetric:
        return loss_q2t
    pos_qid = None if query_ids is None else query_ids[offset : offset + B]
    loss_t2q = _direction(target, Q, offset, logit_scale, alpha, query_ids, pos_qid)
    return (loss_q2t + loss_t2q) / 2


def reference_loss(query, target, *, logit_scale, alpha, symmetric=True, reduction="mean", **kw):
    """The eager loss with a reduction: "mean" (LLaVE), "sum" or "none"."""
    per_row = reference_per_row(
        query, target, logit_scale=logit_scale, alpha=alpha, symmetric=symmetric, **kw
    )
    if reduction == "mean":
        return per_row.mean()
    if reduction == "sum":
        return per_row.sum()
    return per_row
