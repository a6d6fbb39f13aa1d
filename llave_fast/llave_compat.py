"""LLaVE's loss class by name: swap ``WeightedClipLoss`` for llave-fast's fused loss.

LLaVE (DeepLearnXMU/LLaVE) builds its loss in ``llava/model/language_model/llava_qwen.py`` as
``WeightedClipLoss(local_loss=True, gather_with_grad=True, rank=..., world_size=...)`` and calls
it as ``loss_fct(query, target, logit_scale=..., alpha=...)``. Importing
``from llave_fast.llave_compat import WeightedClipLoss`` there instead is the only change:
the same constructor arguments, in LLaVE's order, and the same call.

``WeightedClipLoss`` is a :class:`llave_fast.FusedHardnessLoss`; LLaVE's keywords are
translated here, so the main class keeps only the knobs that do something (its docstring has
the table of all of them):

* ``world_size > 1`` turns on the cross-rank loss (``distributed=True``); ``rank`` and
  ``world_size`` are checked against ``torch.distributed`` at each call;
* ``gather_with_grad`` must be True across ranks (llave-fast always differentiates through the
  gather); on one process it has no effect;
* ``cache_labels`` has no effect (no label tensor is ever built) and is accepted for LLaVE's
  signature;
* ``use_horovod`` must be False (the gathers use ``torch.distributed``).

Each is checked for type. One difference: LLaVE's ``forward`` defaults ``alpha`` to 0.5, but its
training always passes the model config's alpha; here an omitted alpha is the constructor's
(9.0, LLaVE's published setting).
"""

from __future__ import annotations

from .errors import InvalidArgument, InvalidArgumentType
from .loss import FusedHardnessLoss

__all__ = ["WeightedClipLoss", "cross_rank_options"]


def _check_bool(name: str, value) -> None:
    if not isinstance(value, bool):
        raise InvalidArgumentType(f"{name} must be a bool, got {type(value).__name__} {value!r}")


def cross_rank_options(*, local_loss: bool = False, gather_with_grad: bool = False, cache_labels: bool = False,
                       rank: int = 0, world_size: int = 1, use_horovod: bool = False, process_group=None):
    """LLaVE's cross-rank keywords, checked, as (distributed, (rank, world_size) or None): whether
    the loss runs across ranks, and the rank and world size to check ``torch.distributed``
    against at each call (None on one process)."""
    for name, value in (("local_loss", local_loss), ("gather_with_grad", gather_with_grad),
                        ("cache_labels", cache_labels), ("use_horovod", use_horovod)):
        _check_bool(name, value)
    if use_horovod:
        raise InvalidArgument("use_horovod=True is not supported: llave-fast gathers with torch.distributed")
    for name, value in (("rank", rank), ("world_size", world_size)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise InvalidArgumentType(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if world_size < 1:
        raise InvalidArgument(f"world_size must be a positive int, got {world_size!r}")
    if not 0 <= rank < world_size:
        raise InvalidArgument(f"rank must be in [0, world_size={world_size}), got {rank!r}")
    distributed = world_size > 1 or process_group is not None
    if distributed and not gather_with_grad:
        raise InvalidArgument(
            "across ranks llave-fast computes the loss with gradients through the gather: pass "
            f"gather_with_grad=True, with local_loss=True (LLaVE) or False (the global loss); got "
            f"local_loss={local_loss}, gather_with_grad={gather_with_grad} (without gradients through the "
            "gather, each rank's embeddings would miss the other ranks' terms)"
        )
    return distributed, ((rank, world_size) if world_size > 1 else None)


class WeightedClipLoss(FusedHardnessLoss):
    """``WeightedClipLoss(local_loss=False, gather_with_grad=False, cache_labels=False, rank=0,
    world_size=1, use_horovod=False)``: LLaVE's constructor (same names, order and defaults),
    computed by :class:`llave_fast.FusedHardnessLoss`.

    ``cache_labels`` has no effect; ``gather_with_grad`` only matters across ranks, where it
    must be True; ``use_horovod`` must be False (see the module docstring). The fused loss's
    own options are keyword-only after LLaVE's: ``logit_scale`` (50.0), ``alpha`` (9.0),
    ``symmetric``, ``reduction``, ``backend``, ``deterministic``, ``process_group``.
    """

    def __init__(
        self,
        local_loss: bool = False,
        gather_with_grad: bool = False,
        cache_labels: bool = False,
        rank: int = 0,
        world_size: int = 1,
        use_horovod: bool = False,
        *,
        logit_scale=50.0,
        alpha: float = 9.0,
        symmetric: bool = True,
        reduction: str = "mean",
        backend: str = "auto",
        deterministic: bool = False,
        process_group=None,
    ):
        distributed, world = cross_rank_options(
            local_loss=local_loss, gather_with_grad=gather_with_grad, cache_labels=cache_labels, rank=rank,
            world_size=world_size, use_horovod=use_horovod, process_group=process_group,
        )
        super().__init__(logit_scale, alpha, symmetric=symmetric, reduction=reduction, backend=backend,
                         deterministic=deterministic, local_loss=local_loss, distributed=distributed,
                         process_group=process_group)
        self._llave_world = world

    def forward(self, query, target, logit_scale=None, alpha=None, output_dict=False, *, negatives=None,
                target_ids=None, query_ids=None):
        """LLaVE's call, ``forward(query, target, logit_scale, alpha, output_dict)`` (``output_dict``
        may come by position, as LLaVE's signature allows); None takes the constructor's scale or
        alpha. llave-fast's ``negatives``, ``target_ids`` and ``query_ids`` are keyword-only, as in
        :meth:`llave_fast.FusedHardnessLoss.forward`."""
        return super().forward(query, target, logit_scale, alpha, negatives=negatives, target_ids=target_ids,
                               query_ids=query_ids, output_dict=output_dict)
