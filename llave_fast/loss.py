"""``FusedHardnessLoss`` and ``hardness_weighted_loss``: the public face of the fused loss.

A call goes  FusedHardnessLoss.forward -> hardness_weighted_loss (checks, picks the
backend) -> <Backend>HardnessLoss.apply (autograd) -> strip_forward / strip_backward
(the kernel launches, or the chunked PyTorch loop).
"""

from __future__ import annotations

import torch
from torch import nn

from . import _checks
from .backends import get_backend_function, resolve_backend
from .backends.common import LossConfig
from .distributed import RankComm, gather_with_grad
from .reference import reference_loss
from .errors import InvalidArgument, InvalidArgumentType

__all__ = ["FusedHardnessLoss", "hardness_weighted_loss"]


def hardness_weighted_loss(
    query: torch.Tensor,
    target: torch.Tensor,
    *,
    logit_scale=50.0,
    alpha: float = 9.0,
    symmetric: bool = True,
    reduction: str = "mean",
    negatives: torch.Tensor | None = None,
    target_ids: torch.Tensor | None = None,
    query_ids: torch.Tensor | None = None,
    backend: str = "auto",
    deterministic: bool = False,
    distributed: bool = False,
    process_group=None,
    local_loss: bool = True,
) -> torch.Tensor:
    """LLaVE's hardness-weighted symmetric InfoNCE, without a B x N matrix.

    query, target: (B, d) embeddings (row i of each is a positive pair), bf16/fp16/fp32
        (fp64 with the torch and reference backends).
    logit_scale: float or 0-d tensor (its gradient is returned when it requires grad).
    alpha: hardness exponent; negative j of row i is weighted by exp(alpha * S_ij), detached
        (a float, or a tensor that does not require grad: alpha never gets a gradient).
    symmetric: add the target->query direction (LLaVE) and average the two.
    reduction: "mean" (LLaVE), "sum", or "none" (per pair, shape (B,)).
    negatives: (M, d) extra hard-negative targets, candidates of the query->target direction.
    target_ids: (B,) or (B + M,) int64; a candidate target with the positive's id is not
        used as a negative (the positive itself always counts). Negatives without ids
        (length B) are never masked.
    query_ids: (B,) int64; the same for candidate queries of the target->query direction.
    backend: "auto" (triton on CUDA, torch otherwise), "triton", "torch" or "reference".
    deterministic: triton backward without atomics, bitwise reproducible.
    distributed: compute LLaVE's per-rank local loss across the ranks of ``process_group``
        (default: the world): this rank's queries against every rank's targets (and
        negatives), this rank's targets against every rank's queries. Backward follows
        LLaVE's gather-with-grad: each rank gets the sum over ranks of the gradients of
        their losses. The fused backends do it with one strip per rank (see
        ``llave_fast.distributed``); "reference" gathers with grad and computes both strips.
        A rank may hold an empty batch: it takes part in the collectives and contributes
        nothing (its local loss is 0).
    local_loss: across ranks, True (LLaVE) as above; False: open_clip's global loss, the
        loss over the whole gathered batch (mean over all N pairs, or sum), the same value
        on every rank, with gradients through the gather (each rank's embeddings get the
        sum over ranks of their upstream gradient times d(global loss)); the fused backends
        compute it from the same one strip per rank. reduction="none" is refused there.

    Returns a float32 loss for 16/32-bit inputs (float64 for float64), whatever the backend.
    """
    across = distributed or process_group is not None
    _checks.check_embeddings("query", query, allow_empty=across)
    _checks.check_embeddings("target", target, like=query)
    if target.shape[0] != query.shape[0]:
        raise InvalidArgument(
            f"query and target must pair up row by row: query has {query.shape[0]} rows "
            f"(shape {tuple(query.shape)}), target has {target.shape[0]} (shape {tuple(target.shape)})"
        )
    scale_value, scale_t = _checks.check_scale(logit_scale, query.device)
    alpha = _checks.check_alpha(alpha)
    _checks.check_choice("reduction", reduction, _checks.REDUCTIONS)
    _checks.check_choice("backend", backend, _checks.BACKENDS)
    if not isinstance(symmetric, bool):
        raise InvalidArgumentType(f"symmetric must be a bool, got {symmetric!r}")
    if not isinstance(deterministic, bool):
        raise InvalidArgumentType(f"deterministic must be a bool, got {deterministic!r}")
    if not isinstance(local_loss, bool):
        raise InvalidArgumentType(f"local_loss must be a bool, got {local_loss!r}")
    if not local_loss and reduction == "none":
        raise InvalidArgument("local_loss=False (the global loss over every rank's pairs) takes reduction 'mean' or "
                         "'sum'; got reduction='none' (per-pair losses are this rank's: use local_loss=True)")
    B = query.shape[0]
    if negatives is not None:
        _checks.check_embeddings("negatives", negatives, like=query)
        if negatives.shape[0] == 0:
            negatives = None
    M = 0 if negatives is None else negatives.shape[0]
    tid_lengths = (B,) if M == 0 else (B, B + M)
    target_ids = _checks.check_ids("target_ids", target_ids, tid_lengths, query.device,
                                   "one per target row" + (", then optionally one per negative" if M else ""))
    query_ids = _checks.check_ids("query_ids", query_ids, (B,), query.device, "one per query row")

    comm = None
    if across:
        comm = RankComm(process_group)
        if comm.world == 1:
            comm = None
    if B == 0 and comm is None:
        raise InvalidArgument(f"query is an empty batch (shape {tuple(query.shape)}): the loss needs at least one pair")

    name = resolve_backend(backend, query.device, query.dtype)
    if name == "reference":
        scale = scale_t.reshape(()) if scale_t is not None else scale_value
        if comm is not None:
            return _as_loss_dtype(_reference_across_ranks(
                query, target, scale, alpha, symmetric, reduction, negatives, target_ids, query_ids, comm,
                local_loss,
            ))
        return _as_loss_dtype(reference_loss(
            query, target, logit_scale=scale, alpha=alpha, symmetric=symmetric, reduction=reduction,
            negatives=negatives, target_ids=target_ids, query_ids=query_ids,
        ))
    grad_scale = scale_t if (scale_t is not None and scale_t.requires_grad) else None
    # S is kept for a backward only when one can follow (inside the autograd function grad mode
    # is always off, so it is decided here)
    keep_s = torch.is_grad_enabled() and any(
        x is not None and x.requires_grad for x in (query, target, negatives, grad_scale))
    cfg = LossConfig(scale_value, alpha, symmetric, reduction, bool(deterministic), global_loss=not local_loss,
                     keep_s=keep_s)
    fn = get_backend_function(name)
    return fn.apply(query, target, negatives, grad_scale, target_ids, query_ids, cfg, comm)


def _as_loss_dtype(loss: torch.Tensor) -> torch.Tensor:
    """The reference computes in the input precision (as LLaVE does); its result is returned
    in float32 for 16-bit inputs, like the fused backends' (float64 stays float64)."""
    return loss.float() if loss.dtype in (torch.float16, torch.bfloat16) else loss


def _reference_across_ranks(query, target, scale, alpha, symmetric, reduction, negatives, target_ids, query_ids, comm,
                            local_loss=True):
    """LLaVE's own way across ranks: gather with grad, then two B x N strips per rank; or,
    with ``local_loss=False``, open_clip's: the whole gathered batch on every rank."""
    B, d = query.shape
    M = 0 if negatives is None else negatives.shape[0]
    b_sizes, m_sizes, neg_with_ids = comm.exchange_layout(B, M, target_ids, query_ids, query.device)
    has_neg_ids = neg_with_ids[comm.rank]
    Q = gather_with_grad(query, comm, b_sizes)
    T = gather_with_grad(target, comm, b_sizes)
    neg_all = None
    if sum(m_sizes):
        # a rank without negatives still joins the gather's backward collective
        local = negatives if negatives is not None else query.new_empty((0, d)).requires_grad_()
        neg_all = gather_with_grad(local, comm, m_sizes)
    tid = qid = None
    if target_ids is not None:
        tid = comm.gather_rows(target_ids[:B], b_sizes)
        if any(neg_with_ids):
            local = target_ids[B:] if has_neg_ids else target_ids.new_empty((0,))
            tid = torch.cat([tid, comm.gather_rows(local, m_sizes)])
    if query_ids is not None:
        qid = comm.gather_rows(query_ids, b_sizes)
    if not local_loss:
        return reference_loss(Q, T, logit_scale=scale, alpha=alpha, symmetric=symmetric, reduction=reduction,
                              negatives=neg_all, target_ids=tid, query_ids=qid)
    if B == 0 and reduction == "mean":
        reduction = "sum"  # an empty rank contributes 0 (the mean of nothing is not defined)
    return reference_loss(
        query, target, logit_scale=scale, alpha=alpha, symmetric=symmetric, reduction=reduction,
        negatives=neg_all, target_ids=tid, query_ids=qid, all_queries=Q, all_targets=T,
        offset=sum(b_sizes[: comm.rank]),
    )


class FusedHardnessLoss(nn.Module):
    """Drop-in replacement for LLaVE's ``WeightedClipLoss``.

    ``FusedHardnessLoss(logit_scale=50.0, alpha=9.0)`` then ``loss_fn(query, target)``, or
    LLaVE's way ``loss_fn(query, target, logit_scale=50.0, alpha=9.0)``. LLaVE's constructor
    arguments (local_loss, gather_with_grad, cache_labels, rank, world_size, use_horovod) are
    accepted, so swapping the class name is the only change in LLaVE's model file.
    """

    def __init__(
        self,
        logit_scale=50.0,
        alpha: float = 9.0,
        *,
        symmetric: bool = True,
        reduction: str = "mean",
        backend: str = "auto",
        deterministic: bool = False,
        local_loss: bool = False,
        gather_with_grad: bool = False,
        cache_labels: bool = False,
        rank: int = 0,
        world_size: int = 1,
        use_horovod: bool = False,
        process_group=None,
    ):
        super().__init__()
        _checks.check_scale(logit_scale)
        self.logit_scale = logit_scale
        self.alpha = _checks.check_alpha(alpha)
        self.symmetric = symmetric
        self.reduction = _checks.check_choice("reduction", reduction, _checks.REDUCTIONS)
        self.backend = _checks.check_choice("backend", backend, _checks.BACKENDS)
        self.deterministic = deterministic
        if use_horovod:
            raise InvalidArgument("use_horovod=True is not supported: llave-fast gathers with torch.distributed")
        if not isinstance(world_size, int) or world_size < 1:
            raise InvalidArgument(f"world_size must be a positive int, got {world_size!r}")
        if not isinstance(rank, int) or not 0 <= rank < world_size:
            raise InvalidArgument(f"rank must be in [0, world_size={world_size}), got {rank!r}")
        # LLaVE's flags. One process: they change nothing (labels are never materialised).
        # Several: gather_with_grad=True, with local_loss=True (LLaVE's per-rank loss) or
        # False (open_clip's global loss), both from one strip per rank (llave_fast.distributed).
        self.local_loss = local_loss
        self.gather_with_grad = gather_with_grad
        self.cache_labels = cache_labels
        self.rank = rank
        self.world_size = world_size
        self.process_group = process_group
        self.distributed = world_size > 1 or process_group is not None
        if self.distributed and not gather_with_grad:
            raise NotImplementedError(
                "across ranks llave-fast computes the loss with gradients through the gather: pass "
                f"gather_with_grad=True, with local_loss=True (LLaVE) or False (the global loss); got "
                f"local_loss={local_loss}, gather_with_grad={gather_with_grad} (without gradients through the "
                "gather, each rank's embeddings would miss the other ranks' terms)"
            )
        if not isinstance(local_loss, bool):
            raise InvalidArgumentType(f"local_loss must be a bool, got {local_loss!r}")

    def forward(
        self,
        query: torch.Tensor,
        target: torch.Tensor,
        logit_scale=None,
        alpha=None,
        *,
        negatives: torch.Tensor | None = None,
        target_ids: torch.Tensor | None = None,
        query_ids: torch.Tensor | None = None,
        output_dict: bool = False,
    ):
        if self.distributed and self.process_group is None:
            self._check_world()
        loss = hardness_weighted_loss(
            query,
            target,
            logit_scale=self.logit_scale if logit_scale is None else logit_scale,
            alpha=self.alpha if alpha is None else alpha,
            symmetric=self.symmetric,
            reduction=self.reduction,
            negatives=negatives,
            target_ids=target_ids,
            query_ids=query_ids,
            backend=self.backend,
            deterministic=self.deterministic,
            distributed=self.distributed,
            process_group=self.process_group,
            local_loss=self.local_loss or not self.distributed,
        )
        return {"contrastive_loss": loss} if output_dict else loss

    def _check_world(self):
        import torch.distributed as dist

        if dist.get_world_size() != self.world_size or dist.get_rank() != self.rank:
            raise InvalidArgument(
                f"FusedHardnessLoss was built with rank={self.rank}, world_size={self.world_size} but "
                f"torch.distributed reports rank {dist.get_rank()} of {dist.get_world_size()}"
            )

    def extra_repr(self) -> str:
        return (
            f"logit_scale={self.logit_scale}, alpha={self.alpha}, symmetric={self.symmetric}, "
            f"reduction={self.reduction!r}, backend={self.backend!r}, deterministic={self.deterministic}"
        )
