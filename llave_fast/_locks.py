"""Advisory folder locks (``flock``): one live holder per lock file, released by the kernel when
its holder dies, so a lock left by a killed process is free. The lock file says who holds it."""
from __future__ import annotations

import os
import socket
import time


def take(path: str):
    """Try to take the lock at ``path`` without waiting. Returns ``(file, previous)`` on success
    (keep ``file`` open for as long as the lock is to be held; ``previous`` is what the file said,
    "" when empty: a holder that ended cleanly or none) or ``(None, holder)`` when a live process
    holds it. ``(None, None)``: no file locks on this system (not POSIX)."""
    try:
        import fcntl
    except ImportError:
        return None, None
    f = open(path, "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.seek(0)
        holder = f.read().strip() or "a process that has not written its name yet"
        f.close()
        return None, holder
    f.seek(0)
    previous = f.read().strip()
    f.seek(0)
    f.truncate(0)
    f.write(f"pid {os.getpid()} on {socket.gethostname()}, started {time.strftime('%Y-%m-%dT%H:%M:%S')}\n")
    f.flush()
    return f, previous


def release(f) -> None:
    """Empty the lock file (its holder ended, it was not killed) and let go of the lock."""
    try:
        f.truncate(0)
        f.close()
    except OSError:
        pass


def holder(path: str) -> str | None:
    """Who holds the lock at ``path`` now, or None (no lock file, nobody holds it, or no file locks)."""
    try:
        import fcntl

        with open(path) as f:
            try:
                fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except OSError:
                return f.read().strip() or "a process that has not written its name yet"
            fcntl.flock(f, fcntl.LOCK_UN)
    except (ImportError, OSError):
        return None
    return None
