"""``FusedHardnessLoss`` and ``hardness_weighted_loss``: the public face of the fused loss.

A call goes  FusedHardnessLoss.forward -> hardness_weighted_loss (checks, picks the
backend) -> <Backend>HardnessLoss.apply (autograd) -> strip_forward / strip_backward
(the kernel launches, or the chunked PyTorch loop).
"""

from __future__ import annotations

import warnings

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
    local_loss: bool = False,
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
    deterministic: accepted and changes nothing: every backend's backward is bitwise reproducible
        already (no atomics; a fixed strip, chunk and GEMM order).
    distributed: compute LLaVE's per-rank local loss across the ranks of ``process_group``
        (default: the world): this rank's queries against every rank's targets (and
        negatives), this rank's targets against every rank's queries. Backward follows
        LLaVE's gather-with-grad: each rank gets the sum over ranks of the gradients of
        their losses. The fused backends do it with one strip per rank (see
        ``llave_fast.distributed``); "reference" gathers with grad and computes both strips.
        A rank may hold an empty batch: it takes part in the collectives and contributes
        nothing (its local loss is 0).
    local_loss: across ranks, True: LLaVE's per-rank local loss as above (mean over this
        rank's B pairs); False (default, as in ``FusedHardnessLoss`` and LLaVE's
        ``WeightedClipLoss``): open_clip's global loss, the loss over the whole gathered batch
        (mean over all N pairs, or sum), the same value on every rank, with gradients through
        the gather (each rank's embeddings get the sum over ranks of their upstream gradient
        times d(global loss)); the fused backends compute it from the same one strip per rank.
        reduction="none" is refused there. LLaVE's own training passes local_loss=True
        (``llava/model/language_model/llava_qwen.py`` in DeepLearnXMU/LLaVE): pass it with
        ``distributed=True`` for LLaVE's loss. On one process both settings are the same loss.

    Returns a float32 loss for 16/32-bit inputs (float64 for float64), whatever the backend.
    """
    if not isinstance(distributed, bool):
        raise InvalidArgumentType(f"distributed must be a bool, got {distributed!r}")
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
    if across and not local_loss and reduction == "none":
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
    if scale_value is None:
        # the fused kernels take the scale as a number: the one host read of a device scale
        scale_value = _checks.read_scale(scale_t)
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
    b_sizes, m_sizes, neg_with_ids = comm.exchange_layout(B, M, target_ids, query_ids, query.device, d, query.dtype)
    Q = gather_with_grad(query, comm, b_sizes)
    T = gather_with_grad(target, comm, b_sizes)
    neg_all = None
    if sum(m_sizes):
        # a rank without negatives still joins the gather's backward collective
        local = negatives if negatives is not None else query.new_empty((0, d)).requires_grad_()
        neg_all = gather_with_grad(local, comm, m_sizes)
    tid, qid = comm.gather_ids(target_ids, query_ids, b_sizes, m_sizes, neg_with_ids)
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


# LLaVE's constructor keywords that FusedHardnessLoss still takes, deprecated: they live in
# ``llave_fast.llave_compat.WeightedClipLoss`` (LLaVE's class name and argument order)
_LLAVE_KEYWORDS = ("gather_with_grad", "cache_labels", "rank", "world_size", "use_horovod")


class FusedHardnessLoss(nn.Module):
    """LLaVE's hardness-weighted loss as a module: ``FusedHardnessLoss(logit_scale=50.0, alpha=9.0)``
    then ``loss_fn(query, target)``, or LLaVE's way ``loss_fn(query, target, logit_scale, alpha)``.

    To swap LLaVE's ``WeightedClipLoss`` by name (its keywords and argument order), use
    ``llave_fast.llave_compat.WeightedClipLoss``, a subclass of this one.

    The cross-rank knobs. ``distributed``, ``process_group`` and ``local_loss`` are this class's;
    the others are LLaVE's, taken by ``WeightedClipLoss`` only: ``rank`` and ``world_size``
    restate what ``torch.distributed`` knows and ``gather_with_grad`` has one accepted value, so
    here they reduce to ``distributed`` (passing them to this class still works, with a
    DeprecationWarning).

    ================  ==========================================  ===================  =========
    knob              what it does                                LLaVE's value        default
    ================  ==========================================  ===================  =========
    distributed       the loss across the ranks of                world_size > 1       False
                      torch.distributed (every rank's targets
                      and queries are candidates)
    process_group     those ranks (a sub-group); implies          (the world)          None
                      distributed
    local_loss        across ranks: True, this rank's pairs       True in LLaVE's      False
                      against every rank's candidates, mean over  training; the
                      this rank's B pairs (LLaVE's per-rank       class's own default
                      loss); False, the loss over the whole       is False
                      gathered batch, mean over all N pairs, the
                      same on every rank (open_clip's global
                      loss). One process: no effect
    gather_with_grad  gradients through the gather: always so     True in training,    False
                      here; False is refused across ranks         default False
    rank, world_size  world_size > 1 turns on distributed; both   the process's rank   0, 1
                      are checked against torch.distributed at    and the world size
                      each call
    cache_labels      no effect (no label tensor is built)        False                False
    use_horovod       only False (gathers use torch.distributed)  False                False
    ================  ==========================================  ===================  =========

    ``local_loss`` defaults to False, as in LLaVE's ``WeightedClipLoss``
    (``llava/model/language_model/loss.py`` in DeepLearnXMU/LLaVE), and so does
    ``hardness_weighted_loss``'s; LLaVE's own training builds the loss with
    ``local_loss=True, gather_with_grad=True`` (``llava/model/language_model/llava_qwen.py``,
    ``forward`` of the embedding model): pass ``local_loss=True, distributed=True`` for that.
    Backward, both settings follow LLaVE's gather-with-grad: each rank's embeddings get the sum
    over ranks of the gradients of their losses.
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
        distributed: bool = False,
        process_group=None,
        **llave_keywords,
    ):
        super().__init__()
        _checks.check_scale(logit_scale)
        self.logit_scale = logit_scale
        self.alpha = _checks.check_alpha(alpha)
        for name, value in (("symmetric", symmetric), ("deterministic", deterministic), ("local_loss", local_loss),
                            ("distributed", distributed)):
            if not isinstance(value, bool):
                raise InvalidArgumentType(f"{name} must be a bool, got {value!r}")
        self.symmetric = symmetric
        self.reduction = _checks.check_choice("reduction", reduction, _checks.REDUCTIONS)
        self.backend = _checks.check_choice("backend", backend, _checks.BACKENDS)
        self.deterministic = deterministic
        self.local_loss = local_loss
        self.process_group = process_group
        # (rank, world_size) a LLaVE-style construction promised; checked against torch.distributed
        self._llave_world = None
        if llave_keywords:
            unknown = sorted(set(llave_keywords) - set(_LLAVE_KEYWORDS))
            if unknown:
                raise InvalidArgumentType(
                    f"FusedHardnessLoss got unexpected keyword argument(s) {', '.join(unknown)}; it takes "
                    f"logit_scale, alpha, symmetric, reduction, backend, deterministic, local_loss, distributed, "
                    f"process_group (LLaVE's {', '.join(_LLAVE_KEYWORDS)}: llave_fast.llave_compat.WeightedClipLoss)"
                )
            warnings.warn(
                f"FusedHardnessLoss({', '.join(f'{k}=' for k in llave_keywords)}...): LLaVE's keywords are deprecated "
                "here; pass distributed=True (with local_loss=True for LLaVE's per-rank loss), or build "
                "llave_fast.llave_compat.WeightedClipLoss, which takes LLaVE's keywords",
                DeprecationWarning, stacklevel=2,
            )
            from .llave_compat import cross_rank_options

            llave_distributed, self._llave_world = cross_rank_options(
                local_loss=local_loss, process_group=process_group, **llave_keywords)
            distributed = distributed or llave_distributed
        self.distributed = distributed or process_group is not None

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
        """The loss of ``query`` and ``target`` (B x d, row i of each a positive pair): a 0-d float32
        tensor (float64 for float64 inputs), or per-pair losses (B,) with ``reduction="none"``.

        logit_scale, alpha: this call's values, LLaVE's way (``loss_fn(q, t, logit_scale, alpha)``;
            a 0-d tensor scale that requires grad gets its gradient); None: the constructor's.
        negatives: (M, d) extra hard-negative targets (candidates of the query->target direction).
        target_ids, query_ids: false-negative masks, as ``hardness_weighted_loss`` takes them.
        output_dict: return ``{"contrastive_loss": loss}``, as LLaVE's ``WeightedClipLoss`` can.

        Everything else is the constructor's; see ``hardness_weighted_loss`` for every argument.
        """
        if self._llave_world is not None and self.process_group is None:
            self._check_world(*self._llave_world)
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
            local_loss=self.local_loss,
        )
        return {"contrastive_loss": loss} if output_dict else loss

    @staticmethod
    def _check_world(rank: int, world_size: int):
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return  # the loss's own check says torch.distributed must be initialised
        got = (dist.get_rank(), dist.get_world_size())
        if got != (rank, world_size):
            raise InvalidArgument(
                f"the loss was built with rank={rank}, world_size={world_size} but torch.distributed reports "
                f"rank {got[0]} of {got[1]}"
            )

    def extra_repr(self) -> str:
        across = f", distributed=True, local_loss={self.local_loss}" if self.distributed else ""
        return (
            f"logit_scale={self.logit_scale}, alpha={self.alpha}, symmetric={self.symmetric}, "
            f"reduction={self.reduction!r}, backend={self.backend!r}, deterministic={self.deterministic}{across}"
        )
