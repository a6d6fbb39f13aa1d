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


def agree_and_hold(rank, world, kw):
    """Rank 1's clock reads another second: the folder is rank 0's on both. Then both ask for the run
    folder in ``kw["busy"]`` (held by another process): both raise, with the same message."""
    import time

    from llave_fast import train as T

    if rank == 1:
        real = time.strftime
        time.strftime = lambda fmt, *a: real(fmt, time.localtime(time.time() + 1))  # this rank's process only
    name = T.agreed_output_dir(rank, world)
    try:
        T.hold_run_folder(kw["busy"], rank, world)
        refused = None
    except T.RunFolderInUse as exc:
        refused = str(exc)
    with open(os.path.join(kw["report"], f"rank{rank}.json"), "w") as f:
        json.dump({"name": name, "refused": refused}, f)
