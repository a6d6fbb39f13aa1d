"""Rank bodies of the cross-rank tests (module level, so spawned ranks can import them)."""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
import torch.nn.functional as F

from llave_fast import FusedHardnessLoss, hardness_weighted_loss
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
        loss = per_row.mean()
        losses.append(loss.detach())
        total = total + ups[r] * loss
        b0 += b
        m0 += m
    total.backward()
    assert N == b0
    return losses, q.grad, t.grad, neg.grad


def rank_slices(b_sizes, m_sizes, rank):
    b0, m0 = sum(b_sizes[:rank]), sum(m_sizes[:rank])
    return slice(b0, b0 + b_sizes[rank]), slice(m0, m0 + m_sizes[rank])


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def _case_loss(case, rank, world, lq, lt, lneg, ltid, lqid):
    if case.get("module"):
        fn = FusedHardnessLoss(local_loss=True, gather_with_grad=True, rank=rank, world_size=world,
                               backend=case["backend"], symmetric=case["sym"])
        return fn(lq, lt, 50.0, 9.0, negatives=lneg, target_ids=ltid, query_ids=lqid)
    return hardness_weighted_loss(
        lq, lt, logit_scale=50.0, alpha=9.0, symmetric=case["sym"], negatives=lneg,
        target_ids=ltid, query_ids=lqid, backend=case["backend"], distributed=True,
    )


def check_cases(rank, world, cases):
    """Each case: per-rank loss and embedding gradients equal the float64 truth."""
    for case in cases:
        b_sizes, m_sizes = case["b"], case["m"]
        q, t, neg, tid, qid, ups = make_case(case["seed"], b_sizes, m_sizes, case["d"], case["tid"],
                                             case["qid"], case["neg_ids"])
        losses, gq, gt, gneg = truth(q, t, neg, tid, qid, ups, b_sizes, m_sizes, case["sym"], 50.0, 9.0)
        rs, ms = rank_slices(b_sizes, m_sizes, rank)
        dtype = case.get("dtype", torch.float32)
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
            hardness_weighted_loss(q, t, target_ids=tid, backend=backend, distributed=True)
        neg = F.normalize(torch.randn(2, 8), dim=-1)
        tid = torch.arange(5) if rank == 0 else torch.arange(3)
        with pytest.raises(ValueError, match="must cover the negatives on every rank"):
            hardness_weighted_loss(q, t, negatives=neg, target_ids=tid, backend=backend, distributed=True)
        dist.barrier()
