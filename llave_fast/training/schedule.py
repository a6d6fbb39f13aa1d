"""The learning-rate schedule: linear warm-up, then cosine decay to ``min_lr_ratio`` of the peak;
the run's length (steps from epochs, warm-up from warmup_ratio) resolved before it starts."""

from __future__ import annotations

import math

from ..errors import InvalidArgument
from .config import TrainConfig
from .console import _log


def resolve_warmup(cfg: TrainConfig) -> int:
    """Warm-up steps: ``ceil(warmup_ratio x steps)`` when a ratio is given (as Hugging Face's
    Trainer rounds it), else ``warmup_steps``."""
    if cfg.warmup_ratio is None:
        return cfg.warmup_steps
    return math.ceil(cfg.warmup_ratio * cfg.steps)


def warmup_cosine(step: int, cfg: TrainConfig) -> float:
    """LR multiplier: linear warm-up over ``cfg.warmup_steps`` (resolved from warmup_ratio at
    the start of a run), then cosine down to min_lr_ratio."""
    if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    span = max(1, cfg.steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def resolve_length(cfg: TrainConfig, order, rank: int = 0) -> None:
    """Steps from epochs (``order.per_epoch``: a :class:`~llave_fast.training.batches.BatchOrder`'s global
    batches per epoch) and warm-up from warmup_ratio, in place; refuses a warm-up that is not
    shorter than the run."""
    if cfg.epochs is not None:
        cfg.steps = max(1, int(cfg.epochs * order.per_epoch))
        _log(rank, f"epochs={cfg.epochs}: {order.per_epoch} global batches of {cfg.global_batch} per epoch -> "
                   f"{cfg.steps} steps")
    if cfg.warmup_ratio is not None:
        cfg.warmup_steps = resolve_warmup(cfg)
        _log(rank, f"warmup_ratio={cfg.warmup_ratio}: {cfg.warmup_steps} warm-up steps of {cfg.steps}")
    if cfg.warmup_steps >= cfg.steps and not (cfg.warmup_steps == 0):
        given = (f"warmup_ratio={cfg.warmup_ratio} gives {cfg.warmup_steps} warm-up steps"
                 if cfg.warmup_ratio is not None else f"warmup_steps={cfg.warmup_steps}")
        length = f"epochs={cfg.epochs} gives steps={cfg.steps}" if cfg.epochs is not None else f"steps={cfg.steps}"
        raise InvalidArgument(f"{given}: not shorter than the run ({length}); the learning rate would never reach its "
                         "peak and the cosine decay would never start")
