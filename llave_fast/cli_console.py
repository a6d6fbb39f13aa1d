"""What the ``llave-fast`` command shows on stderr: the library's log records (INFO and up, the
message alone), and errors: a user error (one of llave-fast's own checks, a missing or unreadable
file, a bad command line) as one line, anything else as an internal error (the handling is in
:func:`llave_fast.cli.main`; which is which is decided here)."""

from __future__ import annotations

import argparse
import errno
import logging
import sys

from .errors import LlaveFastError

__all__ = ["PROG", "CommandParser", "UsageError", "configure_logging", "error_message", "is_user_error"]

PROG = "llave-fast"


class UsageError(LlaveFastError):
    """A user error found by the command itself (printed without a traceback)."""


class CommandParser(argparse.ArgumentParser):
    """argparse, but a bad command line prints one error line and where to read more, not the
    whole usage (train's has some fifty flags)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n(see '{self.prog} --help')\n")


# -------------------------------------------------------------------------- logging
class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is when a record comes (as logging's own last-resort
    handler does), so a redirected stderr (ablate's per-run train.log, pytest's capture) gets it."""

    def __init__(self):
        super().__init__(sys.stderr)

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):  # StreamHandler's __init__ sets it; the property always answers sys.stderr
        pass


def configure_logging() -> None:
    """What the library logs (``logging.getLogger("llave_fast....")``: progress, notes, warnings)
    shown to a command-line user: INFO and up, the message alone, on stderr. Done once per process;
    stdout stays for the results a command prints."""
    root = logging.getLogger("llave_fast")
    if any(isinstance(h, _StderrHandler) for h in root.handlers):
        return
    handler = _StderrHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    root.addHandler(handler)
    root.setLevel(logging.INFO)


# -------------------------------------------------------------------------- which errors are the user's
_FILE_ERRORS = (FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError, FileExistsError)
# what the machine's file system refuses, whatever the exception class: a read-only mount, no space
_FILE_ERRNOS = frozenset({errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOSPC, errno.EDQUOT, errno.EEXIST,
                          errno.ENOTDIR, errno.EISDIR, errno.ENOENT})


def is_user_error(exc: BaseException) -> bool:
    """True for an error the user can fix: one of llave-fast's own checks (every one raises a
    :class:`~llave_fast.errors.LlaveFastError`) or a file that is missing or unreadable. Any
    other exception, a ValueError from inside torch included, is a bug and gets a traceback."""
    return isinstance(exc, (LlaveFastError,) + _FILE_ERRORS) or (
        isinstance(exc, OSError) and exc.errno in _FILE_ERRNOS and exc.filename is not None)


def error_message(exc: BaseException) -> str:
    """An error as the one line the command prints after ``error: ``."""
    if isinstance(exc, OSError) and exc.filename is not None and exc.strerror:
        return f"{exc.strerror}: {exc.filename!r}"
    return str(exc) or type(exc).__name__

