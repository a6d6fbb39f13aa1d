"""Configuration checks: option values that cannot work are refused, naming the option and
what it got, before any data is read or any model built."""

from __future__ import annotations

import math
import os

from ..errors import InvalidArgument, LlaveFastError
from .config import TrainConfig


# options that describe the synthetic data: a preset's values do not apply to real data (the CLI drops
# them with a note when --data names files; given as flags, check_config refuses them)
SYNTHETIC_ONLY = ("synthetic_tasks", "synthetic_background", "hard_family_size", "vqa_questions_per_scene")
# int options that must be >= 1 and >= 0 (the command line refuses the same values as argparse errors)
POSITIVE_INTS = ("accumulation_steps", "global_batch", "chunk_size", "eval_batch", "keep_checkpoints",
                 "prefetch_batches", "steps")
NON_NEGATIVE_INTS = ("save_every", "warmup_steps", "num_workers", "num_eval", "max_image_pixels")


def synthetic_only_options(cfg: TrainConfig) -> dict:
    """{option: (value, default)} for each synthetic-only option set away from its default."""
    out = {}
    for name in SYNTHETIC_ONLY:
        value, default = getattr(cfg, name), TrainConfig.__dataclass_fields__[name].default
        if value != default:
            out[name] = (value, default)
    return out


def check_config(cfg: TrainConfig, world: int) -> None:
    """Refuse option values that cannot work, naming the option and what it got (before any
    data is read or any model built)."""
    if not isinstance(cfg.accumulation_steps, int) or cfg.accumulation_steps < 1:
        raise InvalidArgument(f"accumulation_steps must be a positive int, got {cfg.accumulation_steps!r}")
    for name in (n for n in POSITIVE_INTS if n not in ("accumulation_steps", "steps")):  # above; below (epochs)
        v = getattr(cfg, name)
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise InvalidArgument(f"{name} must be a positive int, got {v!r}")
    for name in NON_NEGATIVE_INTS:
        v = getattr(cfg, name)
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            raise InvalidArgument(f"{name} must be an int >= 0, got {v!r}")
    if cfg.epochs is None and (not isinstance(cfg.steps, int) or cfg.steps < 1):
        raise InvalidArgument(f"steps must be a positive int (or set epochs), got {cfg.steps!r}")
    if cfg.stop_after is not None and cfg.stop_after < 1:
        raise InvalidArgument(f"stop_after must be a positive int or None, got {cfg.stop_after!r}")
    for name in ("lr", "lr_projector", "lr_vision", "weight_decay"):
        v = getattr(cfg, name)
        if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0):
            raise InvalidArgument(f"{name} must be a finite number >= 0, got {v!r}")
    for name in ("grad_clip", "logit_scale"):
        v = getattr(cfg, name)
        if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
            raise InvalidArgument(f"{name} must be a finite number > 0, got {v!r}")
    if cfg.bad_images not in (None, "skip", "fail"):
        raise InvalidArgument(f"bad_images must be 'skip', 'fail' or None (follow --skip-bad-rows), got {cfg.bad_images!r}")
    if cfg.resume not in (None, True, False):
        raise InvalidArgument(f"resume must be true, false or None (auto), got {cfg.resume!r}")
    from .._checks import BACKENDS

    if cfg.loss_backend not in BACKENDS:
        raise InvalidArgument(f"loss_backend must be one of {list(BACKENDS)}, got {cfg.loss_backend!r}")
    _check_backend_runs_here(cfg.loss_backend)
    from .preempt import grace_seconds

    grace_seconds()  # LLAVE_FAST_SIGTERM_GRACE_S, refused before the run starts rather than at the signal
    if isinstance(cfg.model, str) and cfg.model.startswith("arch:"):
        from ..model.arch import ARCHITECTURES

        if cfg.model[len("arch:"):] not in ARCHITECTURES:
            raise InvalidArgument(f"model={cfg.model!r}: unknown architecture; known are "
                             f"{['arch:' + k for k in sorted(ARCHITECTURES)]}")
    if cfg.data != "synthetic" and cfg.image_dir is not None and not os.path.isdir(cfg.image_dir):
        raise InvalidArgument(f"image_dir={cfg.image_dir!r} is not a folder")
    if cfg.global_batch % world:
        raise InvalidArgument(f"global_batch={cfg.global_batch} must be divisible by the number of ranks ({world})")
    per_rank = cfg.global_batch // world
    if per_rank % cfg.accumulation_steps:
        raise InvalidArgument(
            f"global_batch={cfg.global_batch} over {world} ranks gives {per_rank} pairs per rank, not divisible into "
            f"accumulation_steps={cfg.accumulation_steps} micro-batches"
        )
    k = cfg.hard_family_size
    if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= 8:
        raise InvalidArgument(f"hard_family_size must be an int in 1..8, got {k!r}")
    q = cfg.vqa_questions_per_scene
    if not isinstance(q, int) or isinstance(q, bool) or not 1 <= q <= 4:
        raise InvalidArgument(f"vqa_questions_per_scene must be an int in 1..4, got {q!r}")
    if cfg.data != "synthetic":
        for name, (value, default) in synthetic_only_options(cfg).items():
            raise InvalidArgument(f"{name}={value!r} applies to the synthetic data only, got data={cfg.data!r}: leave it "
                             f"at its default ({default!r}; on the command line, drop --{name.replace('_', '-')})")
    if (per_rank // cfg.accumulation_steps) % k:
        raise InvalidArgument(
            f"hard_family_size={k} does not divide the loss batch: global_batch={cfg.global_batch} over {world} "
            f"ranks and accumulation_steps={cfg.accumulation_steps} gives {per_rank // cfg.accumulation_steps} "
            "pairs per loss; families would straddle batches")
    if k == 1 and (per_rank // cfg.accumulation_steps) % q:
        raise InvalidArgument(
            f"vqa_questions_per_scene={q} does not divide the loss batch: global_batch={cfg.global_batch} over "
            f"{world} ranks and accumulation_steps={cfg.accumulation_steps} gives "
            f"{per_rank // cfg.accumulation_steps} pairs per loss; question groups would straddle batches")
    if cfg.synthetic_tasks is not None:
        bad = [t for t in cfg.synthetic_tasks if t not in ("i2t", "t2i", "vqa")]
        if not cfg.synthetic_tasks or bad:
            raise InvalidArgument(f"synthetic_tasks must list tasks among i2t, t2i, vqa, got {cfg.synthetic_tasks!r}")
    if cfg.epochs is not None and not cfg.epochs > 0:
        raise InvalidArgument(f"epochs must be positive or None, got {cfg.epochs!r}")
    if cfg.warmup_ratio is not None and not 0 <= cfg.warmup_ratio < 1:
        raise InvalidArgument(f"warmup_ratio must be in [0, 1) or None, got {cfg.warmup_ratio!r}")
    if cfg.epochs is None and cfg.warmup_ratio is None and cfg.warmup_steps >= cfg.steps:
        raise InvalidArgument(f"warmup_steps={cfg.warmup_steps} is not shorter than the run (steps={cfg.steps}): the "
                         "learning rate would never reach its peak and the cosine decay would never start")
    for name in ("max_length", "max_text_tokens", "max_rows_per_subset"):
        v = getattr(cfg, name)
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
            raise InvalidArgument(f"{name} must be a positive int or None, got {v!r}")
    if not 0 <= cfg.min_lr_ratio <= 1:
        raise InvalidArgument(f"min_lr_ratio must be in [0, 1], got {cfg.min_lr_ratio!r}")


def training_device():
    """The device this rank trains on: its CUDA device when there is one (set by init_distributed),
    else the CPU."""
    import torch

    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def _check_backend_runs_here(name: str) -> None:
    """A loss backend that cannot run on this rank's device (triton on a CPU without TRITON_INTERPRET)
    is refused now, with the loss's own message (``backends.resolve_backend`` decides), not at step 1."""
    import torch

    from ..backends import resolve_backend

    if name != "auto":  # the embeddings are never float64 in training: only the device can refuse
        try:
            resolve_backend(name, training_device(), torch.float32)
        except LlaveFastError as exc:  # the loss's message, named by the option that chose the backend
            raise InvalidArgument(f"loss_backend (--loss-backend) {name!r}: {exc}") from exc


def cpu_size_warning(cfg: TrainConfig) -> str | None:
    """The warning for a model other than the built-in tiny one (a real-size architecture or checkpoint,
    though a small checkpoint of one's own fits the CPU) trained without a CUDA device: allowed (to debug),
    but at real size a step takes very long and the progress bar stays at 0 meanwhile."""
    if cfg.model == "tiny" or training_device().type == "cuda":
        return None
    return (f"warning: model {cfg.model!r} is not the built-in tiny one and no CUDA device is seen here: at real size "
            f"(LLaVE-0.5B and up) one step of {cfg.global_batch} pairs takes very long on the CPU (the progress bar "
            "stays at 0 until it ends); the tiny default job is --config tiny_cpu.json with --model tiny")
