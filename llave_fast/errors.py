"""The errors llave-fast raises on purpose, by type.

Every check in the library that rejects what a user passed (an argument, a config field, a
data row, a checkpoint, a run folder) raises a subclass of :class:`LlaveFastError`. The
command line prints those as one line without a traceback and treats everything else as a
bug; a library user can catch them all with ``except LlaveFastError``.

Each class also derives from the built-in type the check raised before the hierarchy
existed (``ValueError`` for a bad value, ``TypeError`` for a wrong type, ``ImportError`` for
a missing optional package, ``FileNotFoundError`` for a missing file, ``NotADirectoryError``
for a file where a folder belongs, ``KeyError`` for a missing key), so ``except ValueError``
keeps working.
"""

from __future__ import annotations


class LlaveFastError(Exception):
    """Base class: an input or action llave-fast refused, with a message naming what and why."""


class InvalidArgument(LlaveFastError, ValueError):
    """An argument, config field or option has a value llave-fast does not accept."""


class InvalidArgumentType(LlaveFastError, TypeError):
    """An argument has a type llave-fast does not accept."""


class DistributedNotReady(LlaveFastError, RuntimeError):
    """A cross-rank call was made before ``torch.distributed`` was initialised."""


class Unsupported(LlaveFastError, RuntimeError):
    """An operation llave-fast does not support on this path (a double backward through a fused
    backend); the message names the way out."""


class MissingDependency(LlaveFastError, ImportError):
    """An optional package a feature needs is not installed (the message says which extra)."""


class MissingFile(LlaveFastError, FileNotFoundError):
    """A file or folder llave-fast was asked to read does not exist (the message names it and the option)."""


class HubModelUnavailable(MissingFile):
    """A model named by a hub id (``owner/name``, not a local path) that the Hugging Face hub could not
    give (offline, no such repository, no access); ``model_id`` is the id as given."""

    def __init__(self, message: str, model_id: str):
        super().__init__(message)
        self.model_id = model_id


class NotAFolder(LlaveFastError, NotADirectoryError):
    """A path that must name a folder names a file."""


class MissingKey(LlaveFastError, KeyError):
    """A mapping (a batch, a data row) lacks a key llave-fast needs."""

    def __str__(self) -> str:  # KeyError's own str() quotes the message as a key
        return str(self.args[0]) if self.args else ""


__all__ = ["DistributedNotReady", "HubModelUnavailable", "InvalidArgument", "InvalidArgumentType", "LlaveFastError",
           "MissingDependency", "MissingFile", "MissingKey", "NotAFolder", "Unsupported"]
