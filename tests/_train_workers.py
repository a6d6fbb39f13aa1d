"""Rank bodies of the training-loop tests."""

from __future__ import annotations

from llave_fast.train import TrainConfig, train


def tiny_cfg(out, **kw) -> TrainConfig:
    base = dict(output_dir=out, num_train=64, num_eval=16, global_batch=16, chunk_size=4, steps=4,
                warmup_steps=1, save_every=2, eval_before=False, progress=False, seed=3)
    base.update(kw)
    return TrainConfig(**base)


def run_train(rank, world, cfg_kwargs):
    train(tiny_cfg(**cfg_kwargs))
