"""Rank bodies of the training-loop tests."""

from __future__ import annotations

import json
import os

from llave_fast.train import TrainConfig, train


def tiny_cfg(out, **kw) -> TrainConfig:
    base = dict(output_dir=out, num_train=64, num_eval=16, global_batch=16, chunk_size=4, steps=4,
                warmup_steps=1, save_every=2, eval_before=False, progress=False, seed=3)
    base.update(kw)
    return TrainConfig(**base)


def run_train(rank, world, cfg_kwargs):
    result = train(tiny_cfg(**cfg_kwargs))
    if rank == 0:
        with open(os.path.join(cfg_kwargs["out"], "result.json"), "w") as f:
            json.dump(result, f)


def write_mmeb(folder, n: int, seed: int = 3, image_size: int = 64) -> tuple[str, str]:
    """n MMEB-train rows (jsonl) made from synthetic records, images as PNG files under
    ``folder/images``; returns (data file, image folder)."""
    from llave_fast.data.synthetic import write_mmeb_train

    return write_mmeb_train(folder, n, seed=seed, image_size=image_size, image_format="png")
