"""Where a data row's image paths may lead: :class:`ImageRoot` (a path must stay inside the image
folder: no absolute path elsewhere, no ``..`` that climbs out, no symbolic link that leads out),
and the process-wide default for readers, :func:`outside_image_dir_allowed`."""

from __future__ import annotations

import contextlib
import contextvars
import os

from ..errors import InvalidArgument

__all__ = ["ALLOW_OUTSIDE_FLAG", "ImageRoot", "allow_outside_default", "missing_image_hint", "outside_image_dir_allowed"]

ALLOW_OUTSIDE_FLAG = "allow_outside_image_dir=True / --allow-outside-image-dir"
_ALLOW_OUTSIDE = contextvars.ContextVar("llave_fast_allow_outside_image_dir", default=False)


def missing_image_hint(rel: str, root: str, image_dir_given: bool) -> str:
    """What to try when the image a row names by ``rel`` is not where ``root`` puts it ('' for an absolute
    path): the folder a relative path was looked up in, and ``--image-dir``. One wording for the MMEB-train
    and MMEB-eval readers."""
    if os.path.isabs(rel):
        return ""
    if image_dir_given:
        return f"image paths are relative to --image-dir {root!r}: is that the folder they are relative to?"
    return (f"image paths are relative and were looked up under the data file's folder {root!r}: pass --image-dir "
            "(image_dir=) naming the folder they are relative to")


@contextlib.contextmanager
def outside_image_dir_allowed(allow: bool = True):
    """Within the block, readers given ``allow_outside_image_dir=None`` (their default) take
    ``allow`` (outside any such block: False). ``llave-fast eval --allow-outside-image-dir``
    uses it; a library caller can pass ``allow_outside_image_dir=True`` to the reader instead."""
    token = _ALLOW_OUTSIDE.set(bool(allow))
    try:
        yield
    finally:
        _ALLOW_OUTSIDE.reset(token)


def allow_outside_default(allow: bool | None) -> bool:
    """``allow``, or when None the default in force (:func:`outside_image_dir_allowed`)."""
    if allow is None:
        return _ALLOW_OUTSIDE.get()
    if not isinstance(allow, bool):
        raise InvalidArgument(f"allow_outside_image_dir must be True, False or None, got {allow!r}")
    return allow


def _within(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


class ImageRoot:
    """The folder a data row's image paths are relative to, and the rule that they stay in it.

    :meth:`path` joins a row's path to the folder and says why it may not be read (None when it
    may): the joined path, normalised (``..`` folded, no file system access), must lie inside
    the folder, so an absolute path elsewhere or a ``..`` that climbs out is refused without
    the target ever being looked at; then its real path (symbolic links resolved,
    ``os.path.realpath``) must lie inside the folder's real path, so a link inside the folder
    that leads out of it is refused too (the folder itself may be a link). The reason never
    depends on whether the target exists. ``allow_outside=True`` accepts every path as joined
    (the behaviour before this check). Real paths of folders are cached; files are not (one
    ``lstat`` each, to see whether the file itself is a link).
    """

    def __init__(self, root: str, allow_outside: bool = False):
        self.root = str(root)
        self.allow_outside = bool(allow_outside)
        self._abs = os.path.abspath(self.root)
        self._real: str | None = None
        self._real_dirs: dict[str, str] = {}

    def __repr__(self) -> str:
        return f"ImageRoot({self.root!r}, allow_outside={self.allow_outside})"

    def _realdir(self, d: str) -> str:
        r = self._real_dirs.get(d)
        if r is None:
            r = self._real_dirs[d] = os.path.realpath(d)
        return r

    @property
    def real_root(self) -> str:
        """The folder's real path (symbolic links resolved), found once."""
        if self._real is None:
            self._real = os.path.realpath(self._abs)
        return self._real

    def real(self, rel: str) -> str:
        """The real path of the file ``rel`` names (as ``os.path.realpath``: every symbolic link on the
        way, the file's own included, resolved), with the real paths of folders cached: a file and a
        link to it, or two links to one file, give one path."""
        joined = os.path.join(self._abs, rel)
        head, base = os.path.split(joined)
        if base in ("", ".", ".."):
            return os.path.realpath(joined)
        real = os.path.join(self._realdir(head), base)
        return os.path.realpath(real) if os.path.islink(real) else real

    def path(self, rel: str, what: str) -> tuple[str, str | None]:
        """``(the joined path, why it may not be read or None)``; ``what`` names the column
        (or candidate) in the reason."""
        full = os.path.join(self.root, rel)
        if self.allow_outside:
            return full, None
        how = f"pass {ALLOW_OUTSIDE_FLAG} to read paths outside it"
        if "\0" in rel:
            return full, f"image path holds a NUL character: {rel!r} ({what})"
        if not _within(os.path.normpath(os.path.join(self._abs, rel)), self._abs):
            return full, f"image path outside the image folder: {rel!r} ({what}) is not under {self.root!r}; {how}"
        inside = self.real_root
        joined = os.path.join(self._abs, rel)  # not normalised: the kernel applies '..' after links
        head, base = os.path.split(joined)
        real = self._realdir(head)  # a folder that leads out: refused before its entry is looked at
        if _within(real, inside):
            if base in ("", ".", ".."):
                real = os.path.realpath(joined)
            else:
                real = os.path.join(real, base)
                if os.path.islink(real):  # the file itself a link
                    real = os.path.realpath(real)
        if not _within(real, inside):
            return full, (f"image path outside the image folder: {rel!r} ({what}) leads out of {self.root!r} "
                          f"through a symbolic link; {how}")
        return full, None
