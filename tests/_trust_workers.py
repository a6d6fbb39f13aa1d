"""Rank bodies and helpers of the trust and full-disk tests (issue 23, items 1 and 4).

Run as a script (``python tests/_trust_workers.py full-disk MOUNT REPORT``, as root inside
``unshare -m``), it mounts a small tmpfs at MOUNT, in that private mount namespace only, and
drives a tiny run into a real ENOSPC, once in a checkpoint and once in the log, writing what it
saw to REPORT (the tmpfs and everything on it vanish with the namespace).
"""

from __future__ import annotations

import errno
import json
import os
import shlex
import subprocess
import sys
import traceback

import torch

from _train_workers import run_train


class Evil:
    """Unpickling it runs a shell command that creates ``marker``: what a hostile checkpoint does."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {shlex.quote(self.marker)}",))


def plant(path: str, marker: str) -> None:
    """Add an :class:`Evil` object to the real checkpoint file ``path`` (the rest stays as it was)."""
    state = torch.load(path, map_location="cpu", weights_only=False)  # the test's own run wrote it
    state["planted"] = Evil(marker)
    torch.save(state, path)


def train_spying(rank, world, kw):
    """``run_train``, recording the path and ``weights_only`` of every ``torch.load`` in the rank, and
    the error it raised, to ``kw["report"] + f"-rank{rank}.json"`` (written even when training
    raises). ``no_precheck``: the checkpoint's files are not checked before DeepSpeed loads them, so
    its own (guarded) loads must refuse."""
    from llave_fast import checkpoint as ckpt

    kw = dict(kw)
    report = kw.pop("report")
    if kw.pop("no_precheck", False):
        ckpt.check_files = lambda folder: None
    loads = []
    real = torch.load

    def spy(f, *args, **kwargs):
        loads.append([str(f), kwargs.get("weights_only")])
        return real(f, *args, **kwargs)

    torch.load = spy
    error = None
    try:
        run_train(rank, world, kw)
    except BaseException as exc:
        error = f"{type(exc).__name__}: {exc}"
        raise
    finally:
        torch.load = real
        with open(f"{report}-rank{rank}.json", "w") as fh:
            json.dump({"loads": loads, "error": error}, fh)


def fill(path: str) -> None:
    """Write zeros to ``path`` until the file system has no byte left (ENOSPC)."""
    with open(path, "wb", buffering=0) as f:
        for size in (1 << 20, 4096, 1):
            block = b"\0" * size
            try:
                while True:
                    f.write(block)
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise


def train_filling_disk_after_log_cut(rank, world, kw):
    """``run_train``; once the resumed run has rewritten its log (on resume), the disk is filled to
    the last byte (``kw["filler"]``): the next log line meets a real ENOSPC part-way."""
    from llave_fast.training import loop as T  # the loop calls _truncate_log on resume

    kw = dict(kw)
    filler = kw.pop("filler")
    real = T._truncate_log

    def cut_then_fill(path, step):
        real(path, step)
        fill(filler)

    T._truncate_log = cut_then_fill
    run_train(rank, world, kw)


# ------------------------------------------------------------------------------ the full-disk script
LOG_PAGE_ROOM = 40  # bytes left in the log's last tmpfs page: a log line (~170 bytes) is cut after 40


def _attempt(fn) -> str | None:
    try:
        fn()
    except BaseException as exc:  # noqa: BLE001 - the report says what happened
        return f"{type(exc).__name__}: {exc}\n{traceback.format_exc()[-3000:]}"
    return None


def _read(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read()
    except OSError:
        return None


def _tags(root: str) -> list:
    return sorted(t for t in os.listdir(root) if t.startswith("step-")) if os.path.isdir(root) else []


def full_disk(mount: str, report: str) -> None:
    from llave_fast.testing import spawn_ranks

    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=12m", "tmpfs", mount], check=True)
    out = os.path.join(mount, "run")
    log, root = os.path.join(out, "train_log.jsonl"), os.path.join(out, "checkpoints")
    kw = dict(out=out, steps=3, save_every=1, num_workers=0)
    rep = {"mount": mount}
    # A: 12 MiB hold the run and step 1's checkpoint (~8.6 MB), not step 2's as well
    rep["checkpoint_error"] = _attempt(lambda: spawn_ranks(run_train, 1, kw))
    rep["tags_after_checkpoint_error"] = _tags(root)
    rep["free_after_checkpoint_error"] = os.statvfs(mount).f_bavail * os.statvfs(mount).f_frsize
    # B: room for checkpoints again, but the log's last page has 40 bytes left (step 1's line, padded
    # with spaces: the resume cuts step 2's), and the disk is filled once the resume has rewritten the log
    subprocess.run(["mount", "-o", "remount,size=40m", "tmpfs", mount], check=True)
    with open(log) as f:
        first = f.readline().rstrip("\n")
    rest = _read(log)[len(first) + 1:]
    page = os.statvfs(mount).f_frsize
    padded = first + " " * (page - LOG_PAGE_ROOM - len(first) - 1) + "\n"
    with open(log, "w") as f:
        f.write(padded + rest)
    rep["padded_first_line"] = padded
    filler = os.path.join(mount, "filler")
    rep["log_error"] = _attempt(lambda: spawn_ranks(train_filling_disk_after_log_cut, 1, dict(kw, filler=filler)))
    rep["log_after_log_error"] = _read(log)
    # C: space again: the same command resumes from the last complete checkpoint and finishes
    os.remove(filler)
    rep["resume_error"] = _attempt(lambda: spawn_ranks(run_train, 1, kw))
    rep["final_log"] = _read(log)
    rep["final_tags"] = _tags(root)
    rep["result"] = json.loads(_read(os.path.join(out, "result.json")) or "null")
    with open(report, "w") as f:
        json.dump(rep, f, indent=2)


if __name__ == "__main__":
    import _trust_workers  # the ranks' functions by their module's name, not __main__'s

    if sys.argv[1] == "full-disk":
        _trust_workers.full_disk(sys.argv[2], sys.argv[3])
    else:
        raise SystemExit(f"unknown scenario {sys.argv[1]!r}")
