"""The run's step log (``train_log.jsonl``: one JSON line per step, whole or not at all; cut back to
the checkpoint on resume) and its optional TensorBoard writer."""

from __future__ import annotations

import json
import os

from .. import checkpoint as ckpt
from ..errors import InvalidArgument, InvalidArgumentType
from .console import _log, log


def _truncate_log(path: str, step: int) -> None:
    """On resume, drop log lines of steps after the checkpoint (they will be run again) and a torn
    last line (a write cut by a crash or a full disk: no newline, not a whole entry), rewriting the
    log atomically. Any other line that is not an entry stops the resume, naming FILE:LINE."""
    if not os.path.exists(path):
        return
    with open(path, "rb") as f:
        lines = f.read().split(b"\n")
    tail = lines.pop()  # after the last newline: empty unless the last write was cut
    keep = []
    for number, line in enumerate(lines + [tail], 1):
        if not line.strip():
            continue
        try:
            entry_step = json.loads(line)["step"]
            if not isinstance(entry_step, int):
                raise InvalidArgumentType(f"step is {entry_step!r}")
        except (ValueError, KeyError, TypeError) as exc:  # UnicodeDecodeError is a ValueError
            if line is tail:
                _log(0, f"cut the torn last line of {path} ({len(tail)} bytes, no newline: a write stopped by a "
                        "crash or a full disk)")
                continue
            raise InvalidArgument(f"{path}:{number}: not a log entry ({type(exc).__name__}: {exc}; the line starts "
                             f"{line[:60]!r}); only a torn last line is cut on resume: fix or remove that line, "
                             "then resume") from exc
        if entry_step <= step:
            keep.append(line + b"\n")
    with ckpt.reporting_full_disk(path, os.path.join(os.path.dirname(path), "checkpoints")):
        ckpt.write_atomic(path, b"".join(keep))


def _append_log(path: str, entry: dict, ckpt_root: str) -> None:
    """Append one log line, whole or not at all: a write that fails (a full disk) is cut back off, so
    the log never ends in a torn line, and a full disk raises DiskFull naming the log."""
    data = memoryview((json.dumps(entry) + "\n").encode())
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        size = os.fstat(fd).st_size
        try:
            while data:
                data = data[os.write(fd, data):]
        except OSError as exc:
            try:
                os.ftruncate(fd, size)
            except OSError:
                pass
            error = ckpt.disk_full(exc, path, ckpt_root)
            if error is None:
                raise
            raise error from exc
    finally:
        os.close(fd)


def _tensorboard(out, start: int = 0):
    """The run's TensorBoard writer in ``out/tb`` (None without tensorboard, said). A run resumed at step
    ``start`` purges the events of the steps after it that an earlier attempt logged (they run again)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        log.warning("tensorboard is not installed: --tensorboard ignored")
        return None
    return SummaryWriter(os.path.join(out, "tb"), purge_step=start + 1 if start else None)


def close_all(*things) -> None:
    """Close each of ``things`` that is not None: the progress bar, and the TensorBoard writer, whose last
    events reach its file only then (it writes every two minutes) and whose thread and file end then; left
    open, each run in a process that goes on (a notebook, ``ablate``) left both behind."""
    for thing in things:
        if thing is not None:
            thing.close()
