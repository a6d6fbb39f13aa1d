"""Crash-safe DeepSpeed checkpoints: a run killed at any moment resumes from the last complete one.

Layout under ``<output_dir>/checkpoints``:

    step-00000040/           DeepSpeed's sharded checkpoint (one folder per save)
    step-00000040/COMPLETE   written by rank 0 only after every rank finished saving
    latest                   name of the newest complete folder, replaced atomically

A folder without COMPLETE is a torn save (the process died while writing) and is never
loaded. Resuming takes the newest folder that has the marker.
"""

from __future__ import annotations

import json
import os
import re
import shutil

import torch.distributed as dist

MARKER = "COMPLETE"
POINTER = "latest"
_TAG = re.compile(r"^step-(\d{8})$")


def tag_for(step: int) -> str:
    return f"step-{step:08d}"


def _atomic_write(path: str, text: str) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def complete_tags(root: str) -> list[str]:
    if not os.path.isdir(root):
        return []
    tags = [t for t in os.listdir(root) if _TAG.match(t) and os.path.exists(os.path.join(root, t, MARKER))]
    return sorted(tags)


def latest_complete(root: str) -> str | None:
    """The newest complete checkpoint's tag, or None."""
    # the marker is the truth; the pointer file is for people and may lag by one save
    tags = complete_tags(root)
    return tags[-1] if tags else None


def _barrier():
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _is_rank0() -> bool:
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def save(engine, root: str, step: int, client_state: dict, keep: int = 2) -> str:
    """Save a DeepSpeed checkpoint for ``step``; mark it complete only when every rank is done."""
    tag = tag_for(step)
    if _is_rank0():
        os.makedirs(root, exist_ok=True)
        stale = os.path.join(root, tag)
        if os.path.isdir(stale):  # a torn earlier attempt at this step
            shutil.rmtree(stale)
    _barrier()
    engine.save_checkpoint(root, tag=tag, client_state=client_state, save_latest=False)
    _barrier()
    if _is_rank0():
        _atomic_write(os.path.join(root, tag, MARKER), json.dumps({"step": step}))
        _atomic_write(os.path.join(root, POINTER), tag)
        for old in complete_tags(root)[:-keep] if keep > 0 else []:
            shutil.rmtree(os.path.join(root, old), ignore_errors=True)
    _barrier()
    return tag


def load(engine, root: str):
    """Load the newest complete checkpoint into ``engine``; returns its client state or None."""
    tag = latest_complete(root)
    if tag is None:
        return None
    _, client_state = engine.load_checkpoint(root, tag=tag)
    if client_state is None:
        raise RuntimeError(f"checkpoint {os.path.join(root, tag)} is marked complete but could not be loaded")
    return client_state
