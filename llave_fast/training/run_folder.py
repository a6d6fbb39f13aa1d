"""The run folder: one run per folder (a lock held for the run's life), its default name agreed by
every rank, and what a start that failed before its first step made there, removed."""

from __future__ import annotations

import os
import time

import torch.distributed as dist

from .. import _locks
from ..errors import InvalidArgument
from .console import _log, log


def default_output_dir() -> str:
    """A new run's folder when none is given: ``runs/<YYYYmmdd-HHMMSS>`` (local time), under the working folder."""
    return os.path.join("runs", time.strftime("%Y%m%d-%H%M%S"))


LOCK_FILE = ".llave_fast.lock"
# what a start writes before its first step
_START_FILES = ("train_config.json", "base", "train_log.jsonl", LOCK_FILE)
_HELD: list = []  # the open lock file of the run folder this process holds (rank 0)


class RunFolderInUse(InvalidArgument):
    """Another run (a live process) holds the run folder."""


# the start's SIGTERM handling lives in preempt.py (one module for the signal); re-exported here for old imports
from .preempt import (  # noqa: E402,F401
    Terminated,
    end_sigterm_as_interrupt,
    sigterm_as_interrupt,
    sigterm_ignored_while_cleaning_up,
)


def hold_run_folder(out: str, rank: int, world: int) -> None:
    """One run per folder: rank 0 takes an advisory lock (``flock``) on ``out/.llave_fast.lock`` for
    the run's life and writes who holds it there; every rank learns the outcome, and when another
    live process holds the folder all of them raise :class:`RunFolderInUse` naming it, before
    anything is read or written there. The kernel drops the lock when its holder dies, so a lock
    left by a killed run is free: taken over, with a note naming the run that left it."""
    message = note = None
    if rank == 0:
        message, note = _take_run_folder(out)
    if world > 1:
        box = [(message, note)]
        dist.broadcast_object_list(box, src=0)
        message, note = box[0]
    if note:
        _log(rank, note)
    if message:
        raise RunFolderInUse(message)


def _take_run_folder(out: str) -> tuple[str | None, str | None]:
    """(refusal message or None, note or None); on success the lock stays held in ``_HELD``."""
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, LOCK_FILE)
    f, said = _locks.take(path)
    if f is None and said is None:  # not POSIX
        return None, f"note: no file locks on this system; nothing stops a second run in {out}"
    if f is None:
        return (f"the run folder {out} is in use by another run ({said}; lock file {path}): two runs in one "
                "folder would mix their checkpoints, logs and train_config.json. Give this run another "
                "--output-dir, or wait for that run to end"), None
    _HELD.append(f)
    note = f"cleared a stale lock of {out} (its run is no longer running: {said})" if said else None
    return None, note


def _release_run_folder() -> None:
    """Empty the lock file (a run that ended, not a killed one) and let go of the lock."""
    while _HELD:
        _locks.release(_HELD.pop())


def agreed_output_dir(rank: int, world: int) -> str:
    """The default run folder (``runs/<date-time>``), named by rank 0 and sent to every rank: ranks
    whose clocks read another second would otherwise write to different folders."""
    box = [default_output_dir() if rank == 0 else None]
    if world > 1:
        dist.broadcast_object_list(box, src=0)
    return box[0]


def _forget_failed_start(out: str | None, existed: set) -> None:
    """Remove what a start that never trained made (train_config.json, base/, an empty log, then the
    run folder itself when this start made it and nothing else is in it); ``existed`` names what was
    there before the start, which is never touched. A folder holding a logged step or a checkpoint
    is a run: nothing of it is touched. Rank 0 only (the one that writes; known from RANK before the
    process group exists)."""
    import shutil

    rank = dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", "0"))
    if out is None or rank != 0 or not os.path.isdir(out):
        return
    log_file = os.path.join(out, "train_log.jsonl")
    if os.path.exists(os.path.join(out, "checkpoints")) or (os.path.isfile(log_file) and os.path.getsize(log_file) > 0):
        return
    removed = []
    for name in _START_FILES:
        path = os.path.join(out, name)
        if name in existed or not os.path.exists(path):
            continue
        if os.path.isdir(path):
            shutil.rmtree(path)
        else:
            os.remove(path)
        removed.append(name)
    if "" not in existed and not os.listdir(out):
        os.rmdir(out)
        log.warning("the start failed before its first step: removed the run folder it had made (%s)", out)
    elif removed:
        log.warning("the start failed before its first step: removed what it had written in %s (%s)", out,
                    ", ".join(removed))
