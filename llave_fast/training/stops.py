"""Stopping a run before its last step: bad data or a non-finite loss stops every rank at the same
step, naming the step, what went wrong on each rank and the newest complete checkpoint."""

from __future__ import annotations

import dataclasses
import os
import sys

import torch
import torch.distributed as dist

from .. import checkpoint as ckpt
from ..distributed import collective_device
from ..errors import InvalidArgument, LlaveFastError


class RunStopped(LlaveFastError, RuntimeError, ValueError):
    """The run stopped before its last step (a non-finite loss, bad data); ``step`` is the step
    that failed (1-based), ``checkpoint`` the newest complete checkpoint (None if none). Also a
    ValueError: the command reports it as a problem of the run's options or data, not a bug."""

    def __init__(self, msg: str, step: int, checkpoint: str | None):
        super().__init__(msg)
        self.step, self.checkpoint = step, checkpoint


def _last_checkpoint(root: str) -> str | None:
    tag = ckpt.latest_complete(root)
    return None if tag is None else os.path.abspath(os.path.join(root, tag))  # absolute, as run_dir and eval_json


def _non_finite_message(step: int, stats: torch.Tensor, directions: list, lr: float, root: str) -> str:
    """stats: (world, 5) float64: loss, then non-finite query / target / negative embedding
    values, and the embeddings' element count, per rank; directions: each rank's two
    directions over its own pairs (``_LossProbe.directions``)."""
    parts = []
    for r, (loss, nq, nt, nn, numel) in enumerate(stats.tolist()):
        emb = f"non-finite embedding values: query {int(nq)}, target {int(nt)}"
        emb += f", negatives {int(nn)}" if nn else ""
        dirs = ", ".join(f"{k} {v}" for k, v in directions[r].items())
        parts.append(f"  rank {r}: loss {loss} ({emb}, of {int(numel)} per side); over its own pairs: {dirs}")
    last = _last_checkpoint(root)
    where = (f"the last complete checkpoint is {last}: a rerun with the same options resumes from it and meets "
             "the same batch; a lower --lr or --grad-clip is a new run (--output-dir), as resuming refuses them"
             if last else "no complete checkpoint was saved yet (--save-every N saves every N steps)")
    return (f"non-finite loss at step {step} (learning rate {lr:.3g}); the step was not applied. The loss's parts "
            f"(each rank's loss over its queries against the whole batch):\n" + "\n".join(parts) + f"\n{where}")


def all_ranks_stats(values: list[float], rank: int, world: int) -> torch.Tensor:
    """(world, len(values)) float64 on the CPU, on every rank: row r holds rank r's ``values`` (one
    all-reduce, on the device the process group's backend takes)."""
    stats = torch.zeros(world, len(values), dtype=torch.float64)
    stats[rank] = torch.tensor(values, dtype=torch.float64)
    if world > 1:
        stats = stats.to(collective_device())
        dist.all_reduce(stats)
        stats = stats.cpu()
    return stats


def _gather_objects(obj, world: int) -> list:
    if world == 1:
        return [obj]
    out = [None] * world
    dist.all_gather_object(out, obj)
    return out


def _stop_if_asked(error, step: int, start: int, world: int, ckpt_root: str, save) -> None:
    """Before step ``step + 1`` (and once after the last): when any rank was sent SIGTERM
    (:mod:`.preempt`), or, under ``bad_images="fail"``, any rank's batch for this step hit bad data,
    every rank checkpoints the steps done (unless that checkpoint exists) and stops: with
    :class:`~.preempt.Terminated` (exit status 143) or with the bad data's message."""
    from .preempt import Terminated, sigterm_requested

    flags = torch.tensor([0.0 if error is None else 1.0, 1.0 if sigterm_requested() else 0.0])
    if world > 1:
        flags = flags.to(collective_device())  # NCCL takes CUDA tensors only
        dist.all_reduce(flags)
    bad, term = flags.tolist()
    if bad == 0 and term == 0:
        return
    errors = [e for e in _gather_objects(error, world) if e is not None] if bad else []
    need = step > 0 and ckpt.latest_complete(ckpt_root) != ckpt.tag_for(step)
    if world > 1:  # rank 0 writes the completion marker: its view decides, so every rank joins the same save
        need = bool(_gather_objects(need, world)[0])  # (a collective; a rank whose disk lacks the marker must agree)
    if need:
        save(step)
    if term:
        saved = _last_checkpoint(ckpt_root)
        if not dist.is_initialized() or dist.get_rank() == 0:
            reached = f" (it reached {int(term)} of the {world} ranks)" if world > 1 else ""
            print(f"llave-fast: stopped by SIGTERM{reached} after {step} steps; "
                  + (f"checkpoint of the steps done: {saved}" if saved else "no step was done, nothing to checkpoint"),
                  file=sys.stderr, flush=True)
        raise Terminated(f"stopped by SIGTERM after step {step}")
    saved = _last_checkpoint(ckpt_root)
    where = (f"checkpoint of the {step} steps done: {saved}; fix or remove the image and rerun with the same "
             "--output-dir to resume, or rerun with --bad-images skip" if saved
             else "no step was done, nothing to checkpoint")
    raise RunStopped(f"bad data in the batch of step {step + 1}: {errors[0]}\n{where}", step + 1, saved)


# options that may differ between ranks: where things are on each node, and how each shows or loads them
RANK_LOCAL_OPTIONS = frozenset({"output_dir", "model", "data", "image_dir", "deepspeed_config", "tensorboard",
                                "progress", "num_workers", "prefetch_batches"})


def check_ranks_agree(cfg, world: int, data: dict) -> None:
    """Every rank refuses the run, naming each difference, when the ranks resolved other options or read
    other data: each rank takes its slice of a batch order built from its own row count and options, so
    a rank with another --num-train, --seed or copy of the data would train on other rows, silently."""
    if world == 1:
        return
    mine = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in RANK_LOCAL_OPTIONS}
    mine.update({f"(data) {k}": v for k, v in data.items()})
    everyone = _gather_objects(mine, world)
    differ = sorted(k for k in mine if any(other.get(k) != everyone[0].get(k) for other in everyone))
    if differ:
        lines = "\n".join(f"  {k}: " + ", ".join(f"rank {r} {o.get(k)!r}" for r, o in enumerate(everyone))
                          for k in differ[:12])
        raise InvalidArgument(
            f"the {world} ranks disagree on options or data that every rank must share:\n{lines}\nStart every rank "
            "with the same options and the same data (what may differ per node: paths, display and loader options, "
            f"{', '.join(sorted(RANK_LOCAL_OPTIONS))})")
