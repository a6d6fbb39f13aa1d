"""Rank bodies of the cross-rank tests (module level, so spawned ranks can import them)."""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
import torch.nn.functional as F

from llave_fast import FusedHardnessLoss, hardness_weighted_loss
from llave_fast.llave_compat import WeightedClipLoss
from llave_fast.reference import reference_per_row


def make_case(seed, b_sizes, m_sizes, d, with_tid, with_qid, neg_ids):
    """The global batch of every rank (identical on all ranks, from the seed)."""
    g = torch.Generator().manual_seed(seed)
    N, Mt = sum(b_sizes), sum(m_sizes)
    q = F.normalize(torch.randn(N, d, generator=g, dtype=torch.float64), dim=-1)
    t = F.normalize(q + 0.9 * torch.randn(N, d, generator=g, dtype=torch.float64), dim=-1)
    neg = F.normalize(torch.randn(Mt, d, generator=g, dtype=torch.float64), dim=-1)
    tid = torch.randint(0, 5, (N + (Mt if neg_ids else 0),), generator=g) if with_tid else None
    qid = torch.randint(0, 5, (N,), generator=g) if with_qid else None
    ups = [torch.randn((), generator=g, dtype=torch.float64) + 1.5 for _ in b_sizes]
    return q, t, neg, tid, qid, ups


def truth(q, t, neg, tid, qid, ups, b_sizes, m_sizes, symmetric, scale, alpha):
    """Float64, one process: sum over ranks r of ups[r] * LLaVE's per-rank local loss."""
    q = q.clone().requires_grad_()
    t = t.clone().requires_grad_()
    neg = neg.clone().requires_grad_()
    N = sum(b_sizes)
    total, losses = 0.0, []
    b0 = m0 = 0
    for r, (b, m) in enumerate(zip(b_sizes, m_sizes)):
        per_row = reference_per_row(
            q[b0 : b0 + b], t[b0 : b0 + b], logit_scale=scale, alpha=alpha, symmetric=symmetric,
            negatives=neg if neg.shape[0] else None,
            target_ids=tid, query_ids=qid, all_queries=q, all_targets=t, offset=b0,
        )
        loss = per_row.mean() if b else per_row.sum()  # an empty rank contributes nothing
        losses.append(loss.detach())
        total = total + ups[r] * loss
        b0 += b
        m0 += m
    total.backward()
    assert N == b0
    return losses, q.grad, t.grad, neg.grad


def truth_global(q, t, neg, tid, qid, ups, symmetric, scale, alpha, reduction="mean"):
    """Float64, one process: open_clip's global loss over the whole batch, the same on every
    rank; each rank backpropagates its own upstream gradient through the gather with grad,
    so every embedding's gradient is sum(ups) * dL/dx; and dL/ds for a scale replica."""
    q = q.clone().requires_grad_()
    t = t.clone().requires_grad_()
    neg = neg.clone().requires_grad_()
    s = torch.tensor(scale, dtype=torch.float64, requires_grad=True)
    per_row = reference_per_row(q, t, logit_scale=s, alpha=alpha, symmetric=symmetric,
                                negatives=neg if neg.shape[0] else None, target_ids=tid, query_ids=qid)
    loss = per_row.mean() if reduction == "mean" else per_row.sum()
    (dlds,) = torch.autograd.grad(loss, s, retain_graph=True)
    (sum(ups) * loss).backward()
    return loss.detach(), q.grad, t.grad, neg.grad, dlds


def check_global_cases(rank, world, cases):
    """local_loss=False: every rank's loss is the loss over the whole gathered batch; embedding
    gradients and the scale replica's gradient equal the float64 truth of open_clip's global loss."""
    for case in cases:
        b_sizes, m_sizes = case["b"], case["m"]
        q, t, neg, tid, qid, ups = make_case(case["seed"], b_sizes, m_sizes, case["d"], case["tid"],
                                             case["qid"], case["neg_ids"])
        red = case.get("reduction", "mean")
        loss_t, gq, gt, gneg, dlds = truth_global(q, t, neg, tid, qid, ups, case["sym"], 50.0, 9.0, red)
        rs, ms = rank_slices(b_sizes, m_sizes, rank)
        lq, lt, lneg, ltid, lqid = rank_inputs(case, rank, q, t, neg, tid, qid, torch.float32)
        scale = torch.tensor(50.0, requires_grad=True)
        if case.get("module"):
            # LLaVE's class by name, with LLaVE's constructor arguments (the global loss here)
            fn = WeightedClipLoss(local_loss=False, gather_with_grad=True, rank=rank, world_size=world,
                                  backend=case["backend"], symmetric=case["sym"], reduction=red)
            loss = fn(lq, lt, scale, 9.0, negatives=lneg, target_ids=ltid, query_ids=lqid)
        else:
            loss = hardness_weighted_loss(lq, lt, logit_scale=scale, alpha=9.0, symmetric=case["sym"],
                                          negatives=lneg, target_ids=ltid, query_ids=lqid, backend=case["backend"],
                                          distributed=True, local_loss=False, reduction=red)
        (ups[rank].float() * loss).backward()
        tol = 2e-5
        where = f"rank {rank}/{world} global case {case}"
        assert abs(loss.item() - loss_t.item()) <= tol * max(1.0, abs(loss_t.item())), (
            f"{where}: loss {loss.item()} vs truth {loss_t.item()}")
        if b_sizes[rank]:
            assert _rel(lq.grad, gq[rs]) < tol * 10, f"{where}: dq rel err {_rel(lq.grad, gq[rs]):.2e}"
            assert _rel(lt.grad, gt[rs]) < tol * 10, f"{where}: dt rel err {_rel(lt.grad, gt[rs]):.2e}"
        else:
            assert lq.grad.shape == (0, case["d"]) and lt.grad.shape == (0, case["d"]), where
        if lneg is not None:
            assert _rel(lneg.grad, gneg[ms]) < tol * 10, f"{where}: dneg rel err {_rel(lneg.grad, gneg[ms]):.2e}"
        want_ds = (ups[rank] * dlds).item()
        assert abs(scale.grad.item() - want_ds) <= 1e-4 * max(1.0, abs(want_ds)), (
            f"{where}: dscale {scale.grad.item()} vs truth {want_ds}")
        dist.barrier()


def rank_inputs(case, rank, q, t, neg, tid, qid, dtype):
    """This rank's leaves (queries, targets, negatives or None) and ids, cut from the global batch."""
    b_sizes, m_sizes = case["b"], case["m"]
    rs, ms = rank_slices(b_sizes, m_sizes, rank)
    lq = q[rs].to(dtype).requires_grad_()
    lt = t[rs].to(dtype).requires_grad_()
    lneg = neg[ms].to(dtype).requires_grad_() if m_sizes[rank] else None
    ltid = None
    if tid is not None:
        ltid = tid[rs]
        if case["neg_ids"] and m_sizes[rank]:
            N = sum(b_sizes)
            ltid = torch.cat([ltid, tid[N + ms.start : N + ms.stop]])
    lqid = None if qid is None else qid[rs]
    return lq, lt, lneg, ltid, lqid


def rank_slices(b_sizes, m_sizes, rank):
    b0, m0 = sum(b_sizes[:rank]), sum(m_sizes[:rank])
    return slice(b0, b0 + b_sizes[rank]), slice(m0, m0 + m_sizes[rank])


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def _case_loss(case, rank, world, lq, lt, lneg, ltid, lqid):
    if case.get("module"):
        fn = FusedHardnessLoss(local_loss=True, distributed=True, backend=case["backend"], symmetric=case["sym"])
        return fn(lq, lt, 50.0, 9.0, negatives=lneg, target_ids=ltid, query_ids=lqid)
    return hardness_weighted_loss(
        lq, lt, logit_scale=50.0, alpha=9.0, symmetric=case["sym"], negatives=lneg,
        target_ids=ltid, query_ids=lqid, backend=case["backend"], distributed=True, local_loss=True,
    )


def check_cases(rank, world, cases):
    """Each case: per-rank loss and embedding gradients equal the float64 truth."""
    for case in cases:
        b_sizes, m_sizes = case["b"], case["m"]
        q, t, neg, tid, qid, ups = make_case(case["seed"], b_sizes, m_sizes, case["d"], case["tid"],
                                             case["qid"], case["neg_ids"])
        losses, gq, gt, gneg = truth(q, t, neg, tid, qid, ups, b_sizes, m_sizes, case["sym"], 50.0, 9.0)
        rs, ms = rank_slices(b_sizes, m_sizes, rank)
        lq, lt, lneg, ltid, lqid = rank_inputs(case, rank, q, t, neg, tid, qid, case.get("dtype", torch.float32))
        cfg = case.get("kernel_config")
        ctx = contextlib.nullcontext()
        if cfg:
            from llave_fast.backends.triton_backend import kernel_config

            ctx = kernel_config(**cfg)
        with ctx:
            loss = _case_loss(case, rank, world, lq, lt, lneg, ltid, lqid)
            (ups[rank].to(loss.dtype) * loss).backward()
        tol = case.get("tol", 2e-5)
        where = f"rank {rank}/{world} case {case}"
        assert abs(loss.item() - losses[rank].item()) <= tol * max(1.0, abs(losses[rank].item())), (
            f"{where}: loss {loss.item()} vs truth {losses[rank].item()}")
        if b_sizes[rank] == 0:
            # an empty rank: loss 0, empty gradients, and it joined every collective (no hang)
            assert loss.item() == 0.0 and lq.grad is not None and lq.grad.shape == (0, case["d"]), where
        assert _rel(lq.grad, gq[rs]) < tol * 10, f"{where}: dq rel err {_rel(lq.grad, gq[rs]):.2e}"
        assert _rel(lt.grad, gt[rs]) < tol * 10, f"{where}: dt rel err {_rel(lt.grad, gt[rs]):.2e}"
        if lneg is not None:
            assert _rel(lneg.grad, gneg[ms]) < tol * 10, f"{where}: dneg rel err {_rel(lneg.grad, gneg[ms]):.2e}"
        dist.barrier()


def inconsistent_ids(rank, world):
    """ids on some ranks only: every rank raises the same clear error (no hang, no wrong mask)."""
    import pytest

    q = F.normalize(torch.randn(3, 8), dim=-1)
    t = F.normalize(torch.randn(3, 8), dim=-1)
    for backend in ("torch", "reference"):
        tid = torch.arange(3) if rank == 0 else None
        with pytest.raises(ValueError, match=r"target_ids must be given on every rank or on none; per rank: \[1, 0\]"):
            hardness_weighted_loss(q, t, target_ids=tid, backend=backend, distributed=True, local_loss=True)
        neg = F.normalize(torch.randn(2, 8), dim=-1)
        tid = torch.arange(5) if rank == 0 else torch.arange(3)
        with pytest.raises(ValueError, match="must cover the negatives on every rank"):
            hardness_weighted_loss(q, t, negatives=neg, target_ids=tid, backend=backend, distributed=True,
                                   local_loss=True)
        dist.barrier()
