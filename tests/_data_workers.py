"""Rank bodies of the multi-rank data tests (module level, so spawned ranks can import them)."""

from __future__ import annotations

import json
import os


def decode_share(rank, world, data, image_dir, out):
    """Build the run's MMEB data as training does with --check-images; write what this rank saw."""
    from llave_fast.data import mmeb
    from llave_fast.training.config import TrainConfig
    from llave_fast.training.loading import _datasets

    opened = []
    real = mmeb.image_problem

    def counting(path, decode, max_pixels=None):
        if decode:
            opened.append(os.path.basename(path))
        return real(path, decode, max_pixels)

    mmeb.image_problem = counting
    ds, _ = _datasets(TrainConfig(data=data, image_dir=image_dir, check_images=True, bad_images="skip"))
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump({"opened": opened, "here": getattr(ds, "images_decoded_here", None), "checked": ds.images_checked,
                   "skipped": [list(s) for s in ds.skipped], "rows": [r["row"] for r in ds]}, f)
