"""SIGTERM in a training run. Before the first step it is Ctrl-C (the start cleans up what it made);
while steps run it checkpoints the steps done, then stops: a scheduler's preemption costs no
finished step.

From the first step to the last, SIGTERM (``kill``, SLURM or Kubernetes before it kills, torchrun
passing its own on) no longer ends the process at once: the step under way finishes, every rank learns
at the next step's start that one of them was asked to stop (the flag rides on the all-reduce that
step makes anyway), the steps done are checkpointed and the run ends with exit status 143, resumable
with the same command. A process stuck where no Python runs (a collective waiting on a dead rank)
still ends: ``LLAVE_FAST_SIGTERM_GRACE_S`` seconds (default 120) after the first SIGTERM it exits
with status 143 whatever it is doing, and a second SIGTERM ends it at once (one within
``SAME_REQUEST_S`` seconds of the first is the same one, delivered twice: a launcher passing it on). Only where SIGTERM had
Python's default (a handler someone installed is kept), in the main thread. The run's data-loader
workers ignore SIGTERM meanwhile (:func:`loader_worker_ignores_sigterm`).
"""

from __future__ import annotations

import math
import os
import signal
import threading
import time

from ..errors import InvalidArgument

# ---- before the first step: SIGTERM as Ctrl-C ------------------------------------------------

class Terminated(KeyboardInterrupt):
    """SIGTERM during a start: raised like Ctrl-C's KeyboardInterrupt, so the start cleans up alike."""


_SIGTERM_SAVED: list = []  # the SIGTERM handler to put back when the start is over


def _raise_terminated(signum, frame):
    raise Terminated(f"terminated (signal {signum})")


def sigterm_as_interrupt() -> None:
    """Until :func:`end_sigterm_as_interrupt` (training's first step): SIGTERM raises
    :class:`Terminated` in the main thread, so a start stopped by ``kill`` or a scheduler removes what
    it made, as Ctrl-C does. Only where SIGTERM has Python's default (a handler someone installed is
    kept), in the main thread (the only one that may set a handler), and in a process that is not one
    of several ranks: a Python handler runs only between bytecodes, so a rank blocked in a collective
    or the rendezvous (another rank dead) would ignore ``kill`` until the collective timed out; a rank
    keeps the default (it ends at once, its start files left for the next start, which takes them over)."""
    if threading.current_thread() is not threading.main_thread() or _SIGTERM_SAVED:
        return
    if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1:
        return
    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        _SIGTERM_SAVED.append(signal.signal(signal.SIGTERM, _raise_terminated))


def sigterm_ignored_while_cleaning_up() -> None:
    """A second SIGTERM (a scheduler's, then its launcher's) must not stop the clean-up of a start halfway:
    ignored from here until :func:`end_sigterm_as_interrupt` (only where the start's handler is in place)."""
    if _SIGTERM_SAVED:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)


def end_sigterm_as_interrupt() -> None:
    """Put SIGTERM's handler back: once training steps, SIGTERM ends the process as it did before."""
    while _SIGTERM_SAVED:
        signal.signal(signal.SIGTERM, _SIGTERM_SAVED.pop())


# ---- while steps run: SIGTERM checkpoints, then stops -------------------------------------------

GRACE_ENV = "LLAVE_FAST_SIGTERM_GRACE_S"
DEFAULT_GRACE_S = 120.0
# a SIGTERM this soon after the first is the same one delivered twice: a scheduler signals every process of
# the job (SLURM) or the process group, and the launcher above the rank (torchrun, DeepSpeed's) passes its
# own on as well
SAME_REQUEST_S = 5.0

_requested = threading.Event()
# this install's state: the grace read at install (a later change of the environment does not raise inside the
# handler), the event that cancels its watchdog (a watchdog of an earlier run never waits on a later run's), and
# when the first SIGTERM came (time.monotonic(); None before one)
_this_run: dict = {"grace": DEFAULT_GRACE_S, "cancel": threading.Event(), "first_at": None}
_installed: dict = {}  # pid -> the handler to put back


def grace_seconds() -> float:
    """The seconds from the first SIGTERM to the forced exit (``LLAVE_FAST_SIGTERM_GRACE_S``)."""
    raw = os.environ.get(GRACE_ENV, "")
    if not raw.strip():
        return DEFAULT_GRACE_S
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not (math.isfinite(value) and value > 0):
        raise InvalidArgument(f"{GRACE_ENV} must be a number of seconds > 0, got {raw!r}")
    return value


def _say(text: str) -> None:
    """A line on stderr's file descriptor, not through ``sys.stderr``: the handler runs wherever the main
    thread was, possibly inside a write to ``sys.stderr`` (a progress bar, a log line), and a second
    write to that buffered stream from there raises RuntimeError ("reentrant call")."""
    data = (text + "\n").encode(errors="backslashreplace")
    try:
        while data:
            data = data[os.write(2, data):]
    except OSError:  # stderr closed: the line is lost, the signal is still handled
        pass


def _forced_exit(grace: float, cancel: threading.Event) -> None:
    if not cancel.wait(grace):
        _say(f"llave-fast: SIGTERM {grace:g} s ago and the steps done are not checkpointed yet (a rank may wait on "
             "another): exiting now; a rerun resumes from the newest complete checkpoint")
        os._exit(143)


def _on_sigterm(signum, frame) -> None:
    if os.getpid() not in _installed:  # another process forked from this one: not the run's to stop
        return
    if _requested.is_set():
        first = _this_run["first_at"]
        if first is not None and time.monotonic() - first < SAME_REQUEST_S:
            _say(f"llave-fast: SIGTERM again within {SAME_REQUEST_S:g} s of the first: the same request (a launcher "
                 "passing it on); one later than that exits at once")
            return
        _say("llave-fast: a second SIGTERM: exiting now")
        os._exit(143)
    _this_run["first_at"] = time.monotonic()
    _requested.set()
    grace = _this_run["grace"]
    _say(f"llave-fast: SIGTERM: the step under way finishes, then the steps done are checkpointed and the run "
         f"stops (a forced exit in {grace:g} s otherwise; {GRACE_ENV})")
    threading.Thread(target=_forced_exit, args=(grace, _this_run["cancel"]), name="llave-fast-sigterm-grace",
                     daemon=True).start()


def checkpoint_on_sigterm() -> None:
    """From here to :func:`end_checkpoint_on_sigterm`: SIGTERM asks for a checkpoint and a stop (see the
    module's docstring). Also ends the start's handler (SIGTERM as Ctrl-C before the first step)."""
    end_sigterm_as_interrupt()
    if threading.current_thread() is not threading.main_thread() or _installed:
        return
    # read again here, though check_config refused a bad value before anything was built: the environment may
    # have changed since (a library call, a test), and a bad value must be refused now, never at the signal
    grace = grace_seconds()
    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        _requested.clear()
        _this_run.update(grace=grace, cancel=threading.Event(), first_at=None)
        _installed[os.getpid()] = signal.signal(signal.SIGTERM, _on_sigterm)


def loader_worker_ignores_sigterm(worker_id: int) -> None:
    """A data loader's ``worker_init_fn``: while the run checkpoints on SIGTERM, its loader workers
    ignore SIGTERM. Sent to the whole process group (SLURM's ``scancel``, DeepSpeed's launcher), it
    killed them (torch's workers end on any SIGTERM but their parent's), and the next batch failed
    before the checkpoint was saved. A worker still ends when the loader stops it or its parent dies
    (torch's worker loop watches the parent)."""
    if _installed:  # forked from a process with the handler in place (a spawned worker starts with none)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)


def sigterm_requested() -> bool:
    """Whether this process was sent SIGTERM since :func:`checkpoint_on_sigterm`."""
    return _requested.is_set()


def end_checkpoint_on_sigterm() -> None:
    """SIGTERM ends the process at once again (the steps are over, or the run stopped); ends the
    start's handler too, if it is still in place."""
    end_sigterm_as_interrupt()
    for pid, previous in list(_installed.items()):
        if pid == os.getpid():
            signal.signal(signal.SIGTERM, previous)
        del _installed[pid]
    _this_run["cancel"].set()
    _requested.clear()  # answered (or the steps are over): not a request to the next run in this process
