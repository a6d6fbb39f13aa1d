"""Resume planning: a fresh start or a resume of the run folder, decided before the model is built,
refusing options that would change a resumed run; the run's ``train_config.json``; and the state a
resumed run restores (its step, the RNGs, the precision@1 measured before training)."""

from __future__ import annotations

import dataclasses
import json
import os
import time

import torch

from .. import checkpoint as ckpt
from ..errors import InvalidArgument
from .config import TrainConfig
from .console import _log


# Options a resumed run may change: they decide how it is run or logged, not what it computes
# (GradCache's chunking, checkpointing and the loss backend change memory and speed; the
# gradients agree to rounding). Changes are applied and recorded in train_config.json's
# "_history". Every other option (model, data, batch, seed, learning rates, schedule, steps,
# loss, precision, ...) is fixed at the start: a resumed run refuses a new value.
RESUME_MAY_CHANGE = frozenset({
    "save_every", "keep_checkpoints", "eval_before", "eval_batch", "tensorboard", "progress", "stop_after",
    "chunk_size", "gradient_checkpointing", "loss_backend", "num_workers", "prefetch_batches", "bad_images",
    "check_images", "skip_bad_rows", "max_image_pixels",
})
RESUME_NOT_COMPARED = frozenset({"output_dir", "resume"})


def _may_change_flags() -> str:
    """The options a resumed run may change, as the flags a user types (test-only fields left out)."""
    hidden = {f.name for f in dataclasses.fields(TrainConfig) if f.metadata.get("hidden")}
    return ", ".join("--" + n.replace("_", "-") for n in sorted(RESUME_MAY_CHANGE - hidden))


class ResumeRefused(InvalidArgument):
    """A run folder cannot be resumed (or started) with the options given."""


def _jsonable(v):
    return json.loads(json.dumps(v))


def resume_changes(saved: dict, cfg: TrainConfig, bf16: bool | None = None) -> tuple[dict, dict]:
    """``(refused, applied)``: ``{option: (the run's value, the new value)}`` for every option of
    ``cfg`` (steps and warm-up resolved) that differs from the run's saved config.

    Compared as resolved where the run recorded it: the precision (``bf16``, this start's
    resolved value: ``--bf16 false`` is the fp32 an unset bf16 gave on a machine without CUDA,
    and an unset bf16 on a CUDA machine is not the fp32 the run trained in on a CPU one), and a
    DeepSpeed config named by another path to the same file."""
    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    refused, applied = {}, {}
    ran_bf16 = saved.get("_data", {}).get("bf16")
    for name, new in dataclasses.asdict(cfg).items():
        if name in RESUME_NOT_COMPARED:
            continue
        old = saved.get(name, defaults[name])  # an option newer than the run: it ran with the default
        new = _jsonable(new)
        if name == "bf16" and ran_bf16 is not None and bf16 is not None:
            if ran_bf16 != bf16:
                refused["bf16 (resolved precision)"] = ("bf16" if ran_bf16 else "fp32", "bf16" if bf16 else "fp32")
            continue
        if old == new or name == "deepspeed_config" and _same_file(old, new):
            continue
        (applied if name in RESUME_MAY_CHANGE else refused)[name] = (old, new)
    return refused, applied


def _same_file(a, b) -> bool:
    """Whether two config names (a shipped name, a path) are one file."""
    from .config import _config_path

    try:
        return os.path.samefile(_config_path(a), _config_path(b))
    except (OSError, TypeError):
        return False


def plan_resume(cfg: TrainConfig, train_rows: int, bf16: bool | None = None,
                world: int | None = None) -> tuple[str | None, list]:
    """Decide between a fresh start and a resume of ``cfg.output_dir``, before the model is built.

    ``bf16``: this start's resolved precision, compared with the one the run recorded.
    Returns ``(tag, history)``: the complete checkpoint to resume from (None: fresh start) and
    the run's ``_history`` with this start appended. Raises ``ResumeRefused`` naming each
    option that would change a resumed run (with both values), or when ``cfg.resume`` cannot
    be honoured.
    """
    out = cfg.output_dir
    root = os.path.join(out, "checkpoints")
    tag = ckpt.latest_complete(root)
    if tag is None:
        if cfg.resume is True:
            raise ResumeRefused(f"resume=true but {root} holds no complete checkpoint to resume from")
        return None, [{"started": time.strftime("%Y-%m-%dT%H:%M:%S"), "at_step": 0}]
    if cfg.resume is False:
        raise ResumeRefused(
            f"resume=false but the run folder {out} holds checkpoints (newest complete: {tag}); pick a new "
            f"--output-dir, or remove {root} to start over there")
    path = os.path.join(out, "train_config.json")
    saved = {}
    if os.path.exists(path):
        with open(path) as f:
            saved = json.load(f)
    step = ckpt.step_of(tag)
    refused, applied = resume_changes(saved, cfg, bf16) if saved else ({}, {})
    if refused:
        lines = "\n".join(f"  {k}: {old!r} in the run, {new!r} now" for k, (old, new) in sorted(refused.items()))
        raise ResumeRefused(
            f"{out} holds a run (complete checkpoint {tag}) made with other values of options that cannot change "
            f"mid-run:\n{lines}\nRun it again without them to resume it as it was, or give a new --output-dir to "
            f"start a new run with them. Options a resumed run may change: {_may_change_flags()}.")
    world_then = saved.get("_data", {}).get("world_size")
    if world is not None and world_then is not None and world_then != world:
        raise ResumeRefused(
            f"{out} was trained on {world_then} rank(s); {world} now. Its ZeRO checkpoints hold each rank's "
            f"partition of the weights and optimizer state, and each rank's share of a global batch changes with "
            f"the rank count: resume it with {world_then} rank(s) (torchrun --nproc_per_node / the deepspeed "
            "launcher's --num_gpus), or give a new --output-dir to start a new run")
    rows_then = saved.get("_data", {}).get("train_rows")
    if rows_then is not None and rows_then != train_rows:
        raise ResumeRefused(
            f"{out} was trained on {rows_then} usable rows of --data {cfg.data}; {train_rows} now (the data, "
            "--skip-bad-rows, --bad-images or --check-images changed which rows are usable): the data order of the "
            "resumed run would differ. Restore the data or start a new run (--output-dir)")
    history = list(saved.get("_history", []))
    history.append({"resumed": time.strftime("%Y-%m-%dT%H:%M:%S"), "at_step": step,
                    "changed": {k: [old, new] for k, (old, new) in sorted(applied.items())}})
    return tag, history


def write_run_config(cfg: TrainConfig, history: list, data: dict) -> None:
    """train_config.json: the options as run (steps and warm-up resolved), every start and resume
    with the options it changed (``_history``), and what the data held (``_data``)."""
    raw = dataclasses.asdict(cfg)
    raw["_history"] = history
    raw["_data"] = data
    path = os.path.join(cfg.output_dir, "train_config.json")
    ckpt._atomic_write(path, json.dumps(raw, indent=2))


def restore(engine, ckpt_root: str, tag: str | None, rank: int) -> tuple[int, dict | None]:
    """``(start step, precision@1 before training or None)``: from checkpoint ``tag`` (its files
    loaded weights-only and checked; the CPU and CUDA RNGs set back), or ``(0, None)`` for a fresh start."""
    if tag is None:
        return 0, None
    state = ckpt.load(engine, ckpt_root, tag)
    start = state["step"]
    torch.set_rng_state(state["rng_cpu"])
    if state.get("rng_cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng_cuda"])
    _log(rank, f"resumed from {os.path.join(ckpt_root, ckpt.tag_for(start))} at step {start}")
    return start, state.get("p_at_1_before")


def save_checkpoint(engine, ckpt_root: str, step: int, before: dict | None, keep: int) -> None:
    """A complete checkpoint of ``step``: the engine's state with what :func:`restore` reads back."""
    ckpt.save(engine, ckpt_root, step,
              {"step": step, "rng_cpu": torch.get_rng_state(), "p_at_1_before": before,
               "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None},
              keep=keep)
