"""Opening a data image under a pixel limit: :data:`MAX_IMAGE_PIXELS`, :func:`open_rgb`, and why an
image file cannot be used (missing, unreadable, or over the limit), read from its header before
anything is decoded."""

from __future__ import annotations

import os

from PIL import Image

from ..errors import InvalidArgument

__all__ = ["MAX_IMAGE_PIXELS", "ImageTooLarge", "image_problem", "open_rgb"]

# The pixel limit of every image we open (width x height, from the header, before decoding): far
# above what the model looks at (LLaVE's largest anyres canvas, 2 x 2 tiles of 384 px, is 0.6 Mpx; a
# 12 Mpx photo passes), far below Pillow's own warning (89 Mpx) and error (179 Mpx). A 97 kB PNG can
# hold 10000 x 10000 pixels, ~480 MiB decoded: refused here as a bad image. --max-image-pixels changes it.
MAX_IMAGE_PIXELS = 40_000_000


class ImageTooLarge(InvalidArgument):
    """An image whose header promises more pixels than the limit (a decompression bomb, or a scan)."""


def _check_pixels(im, max_pixels: int | None) -> None:
    """Refuse an opened (not yet decoded) image whose header promises more than ``max_pixels``
    (default :data:`MAX_IMAGE_PIXELS`; 0: no limit of ours)."""
    limit = MAX_IMAGE_PIXELS if max_pixels is None else max_pixels
    w, h = im.size
    if limit and w * h > limit:
        raise ImageTooLarge(f"{w} x {h} = {w * h} pixels, over the limit of {limit} (--max-image-pixels; "
                            "llave_fast.data.mmeb.MAX_IMAGE_PIXELS)")


def open_rgb(path: str, max_pixels: int | None = None):
    """The image at ``path`` as RGB, refused before decoding when it is over the pixel limit."""
    from ..model.processor import warn_wide_range

    with Image.open(path) as im:
        _check_pixels(im, max_pixels)
        warn_wide_range(im, path)
        return im.convert("RGB")


def image_problem(path: str, decode: bool, max_pixels: int | None = None) -> str | None:
    """Why the image at ``path`` cannot be used (None if it can): missing, or (decode=True) unreadable
    or over the pixel limit."""
    if not os.path.isfile(path):
        return "image file not found"
    if decode:
        try:
            with Image.open(path) as im:
                _check_pixels(im, max_pixels)
                im.load()
        except Exception as exc:
            return f"unreadable image ({exc or type(exc).__name__})"
    return None
