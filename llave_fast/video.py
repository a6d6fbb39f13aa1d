"""Deprecated: ``llave_fast.video`` is now :mod:`llave_fast.eval_video` (the ``eval-video`` command and its
data; the model's video features are :mod:`llave_fast.model.video`). Every name is looked up there, with a
DeprecationWarning."""

from __future__ import annotations

import warnings

from . import eval_video as _eval_video


def __getattr__(name: str):
    value = getattr(_eval_video, name)  # AttributeError for a name eval_video does not have either
    warnings.warn(f"llave_fast.video.{name} is deprecated: import it from llave_fast.eval_video",
                  DeprecationWarning, stacklevel=2)
    return value


def __dir__():
    return dir(_eval_video)
