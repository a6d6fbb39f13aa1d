"""The model and its DeepSpeed engine: the tiny demo model, a real-size architecture or a checkpoint
(partitioned at load under ZeRO-3), AdamW's parameter groups at LLaVE's three learning rates, the
warm-up/cosine schedule, and ``deepspeed.initialize``."""

from __future__ import annotations

import contextlib
import os
import warnings

import torch

from .config import TrainConfig
from .console import forget_known_warnings
from .deepspeed_setup import LAUNCHER_VARS
from .schedule import warmup_cosine


_HF_DS_CONFIG = None  # transformers reads the ZeRO-3 config through this object while it lives
#: the first transformers release that builds a model from its config under ZeRO-3: from 5.3 to 5.22
#: its ZeRO-3 weight initialisation (``initialize_weights_zero3``) gathers each module's own parameters
#: but not its children's, which SigLIP's ``_init_weights`` sets (``q_proj.weight``): an empty shard,
#: "Fan in and fan out can not be computed". The [train] extra asks for it; fetch_wheels.sh carries it.
ZERO3_MIN_TRANSFORMERS = "5.23.0"
#: what a run sets in ``os.environ``: the launcher variables, and the tokenizers' switch set before the
#: data-loading processes fork (loading.step_loader)
RUN_ENV_VARS = (*LAUNCHER_VARS, "TOKENIZERS_PARALLELISM")


def check_zero3_transformers(version: str | None = None) -> None:
    """Refuse to build a model from its config under ZeRO-3 with a transformers older than
    :data:`ZERO3_MIN_TRANSFORMERS` (``version``: the installed one by default), naming the fix."""
    from packaging.version import Version

    from ..errors import MissingDependency

    if version is None:
        import transformers

        version = transformers.__version__
    if Version(version) < Version(ZERO3_MIN_TRANSFORMERS):
        raise MissingDependency(
            f"transformers {version} cannot build a model from its config under DeepSpeed ZeRO-3 (its ZeRO-3 "
            f"weight initialisation leaves SigLIP's attention weights partitioned; fixed in "
            f"{ZERO3_MIN_TRANSFORMERS}): pip install 'transformers>={ZERO3_MIN_TRANSFORMERS}' (the [train] extra "
            "asks for it), or train with a ZeRO stage 0-2 config (--deepspeed-config)")


def release_zero3_mode(previous=None) -> None:
    """Switch transformers' ZeRO-3 mode back to what it was before :func:`build_model` set it: while the
    run's ``HfDeepSpeedConfig`` lives, every model the process builds afterwards (``from_pretrained``,
    ``from_config``) is partitioned at birth, its weights of shape [0]. ``previous``: the config object a
    caller had set before the run (transformers keeps it behind a weak reference), made current again."""
    global _HF_DS_CONFIG
    _HF_DS_CONFIG = None
    from transformers.integrations import deepspeed as hf_ds

    if previous is not None:
        hf_ds.set_hf_deepspeed_config(previous)
    elif hf_ds.is_deepspeed_zero3_enabled():  # another reference kept the run's config alive
        hf_ds.unset_hf_deepspeed_config()


def current_zero3_config():
    """The ``HfDeepSpeedConfig`` transformers follows now (its weak reference's object), or None."""
    from transformers.integrations import deepspeed as hf_ds

    ref = getattr(hf_ds, "_hf_deepspeed_config_weak_ref", None)
    return None if ref is None else ref()


@contextlib.contextmanager
def run_leaves_process_as_found():
    """Around one ``train()``: what the run set in its process is undone when it returns or raises, so a
    later ``from_pretrained``, evaluation or run in the same process (a notebook, ``ablate``, a test)
    starts from the state the caller had.

    - transformers' ZeRO-3 mode (:func:`release_zero3_mode`): left on, every model built
      afterwards was partitioned at birth, its weights of shape [0] ("'weight' must be 2-D");
    - the launcher variables (:data:`LAUNCHER_VARS`): left set, a run after the group was destroyed
      took the old ``MASTER_PORT`` (EADDRINUSE) instead of a free one; ``TOKENIZERS_PARALLELISM``
      (:data:`RUN_ENV_VARS`): left "false", the caller's tokenizers ran on one thread;
    - the warning filters of DeepSpeed's collectives (console.quiet_known_warnings): left, a caller's own
      calls of those deprecated functions were silenced;
    - the global random state (CPU, and CUDA devices in use before the run): the run seeds it with
      ``cfg.seed``; left, a caller's own seeding no longer decided what it drew next.

    The process group a run joined or made stays for the life of the process: DeepSpeed keeps the groups
    it derives from it in module globals (``deepspeed.utils.groups``), so a destroyed group cannot be
    replaced in that process (a later engine fails: "Group ... is not registered"); a later run joins it
    as a caller's group."""
    env = {k: os.environ.get(k) for k in RUN_ENV_VARS}
    zero3_before = current_zero3_config()
    filters = list(warnings.filters)
    cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    try:
        with torch.random.fork_rng(devices=range(torch.cuda.device_count()) if cuda else [], device_type="cuda"):
            yield
    finally:
        release_zero3_mode(zero3_before)
        forget_known_warnings(filters)
        for k, v in env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def tiny_model_kwargs(cfg: TrainConfig) -> dict:
    """The tiny model's shape for a run: one tile of the run's image size in 4 x 4 patches."""
    return dict(image_size=cfg.image_size, patch_size=max(4, cfg.image_size // 4), max_grid=1)


def build_model(cfg: TrainConfig, ds_config: dict, bf16: bool):
    """The tiny demo model from scratch, or a checkpoint (partitioned at load under ZeRO-3)."""
    global _HF_DS_CONFIG
    from ..model import LLaVEEmbedder, build_tiny_model
    from ..model.video import set_trained_layout

    dtype = torch.bfloat16 if bf16 else torch.float32
    if ds_config.get("zero_optimization", {}).get("stage") == 3:
        from transformers.integrations import HfDeepSpeedConfig

        if cfg.model == "tiny" or cfg.model.startswith("arch:"):  # from a config: transformers' ZeRO-3 init
            check_zero3_transformers()

        _HF_DS_CONFIG = HfDeepSpeedConfig(ds_config)
    if cfg.model == "tiny":
        model = build_tiny_model(cfg.seed, torch_dtype=dtype, **tiny_model_kwargs(cfg))
    elif cfg.model.startswith("arch:"):  # a real-size architecture, random weights (llave_fast.model.arch)
        from ..model.arch import build_arch_model

        model = build_arch_model(cfg.model, cfg.seed, torch_dtype=dtype)
    else:
        model = LLaVEEmbedder.from_pretrained(cfg.model, torch_dtype=dtype)
    set_trained_layout(model.config)  # saved with the run (base/config.json) and every export, as LLaVE does
    if cfg.image_grid is not None:
        model.set_image_grid(cfg.image_grid)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    model.processor.max_text_tokens = cfg.max_text_tokens
    if cfg.max_length is not None:
        model.processor.max_length = cfg.max_length
    return model


def param_groups(model, cfg: TrainConfig) -> list[dict]:
    """AdamW groups: vision tower, projector, language model (LLaVE trains them at different rates)."""
    groups = {"vision": [], "projector": [], "language": []}
    for name, p in model.named_parameters():
        if "vision_tower" in name:
            part = "vision"
        elif "multi_modal_projector" in name or "image_newline" in name:
            part = "projector"
        else:
            part = "language"
        if part == "vision" and cfg.lr_vision == 0:
            p.requires_grad_(False)
            continue
        if p.requires_grad:
            groups[part].append(p)
    lrs = {"vision": cfg.lr_vision, "projector": cfg.lr_projector, "language": cfg.lr}
    return [{"params": ps, "lr": lrs[k], "name": k} for k, ps in groups.items() if ps]


def build_engine(model, cfg: TrainConfig, ds_config: dict):
    """``(engine, scheduler)``: AdamW over :func:`param_groups`, the warm-up/cosine schedule, both
    handed to ``deepspeed.initialize`` with the run's DeepSpeed config."""
    import deepspeed

    optimizer = torch.optim.AdamW(param_groups(model, cfg), weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: warmup_cosine(s, cfg))
    engine, _, _, scheduler = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config
    )
    return engine, scheduler


def save_base(model, out: str) -> None:
    """The architecture and processor, without weights, in ``out/base``: export rebuilds from it."""
    base = os.path.join(out, "base")
    model.config.save_pretrained(base)
    model.processor.save_pretrained(base)
