"""Rank bodies of the LLaVE-recipe tests."""

from __future__ import annotations

import torch

from llave_fast.train import TrainConfig, train


def recipe_cfg(out: str) -> TrainConfig:
    """The LLaVE-recipe preset, on the tiny model and the synthetic data (CPU-sized)."""
    cfg = TrainConfig.from_json("llave_0.5b_recipe.json")
    cfg.output_dir = out
    cfg.model, cfg.data, cfg.subsets, cfg.mmeb_split, cfg.max_rows_per_subset = "tiny", "synthetic", None, None, None
    cfg.num_train, cfg.num_eval, cfg.image_size = 64, 16, 64
    cfg.global_batch, cfg.accumulation_steps, cfg.chunk_size = 16, 2, 4
    cfg.gradient_checkpointing, cfg.progress = False, False
    cfg.lr = cfg.lr_projector = 1e-3  # so that three steps move the weights visibly
    return cfg


def run_recipe(rank, world, out):
    train(recipe_cfg(out))


def micro_loss_rank(rank, world, steps):
    """MicroStepLoss across ranks, built as the training loop builds its loss: micro-batch i of every
    rank meets only micro-batch i of the others, and each rank's loss is over its own rows."""
    from llave_fast.reference import reference_loss
    from llave_fast.train import MicroStepLoss
    from llave_fast.training.step import build_loss

    g = torch.Generator().manual_seed(0)
    B, d = 8, 16
    q_all = torch.nn.functional.normalize(torch.randn(world, B, d, generator=g, dtype=torch.float64), dim=-1)
    t_all = torch.nn.functional.normalize(torch.randn(world, B, d, generator=g, dtype=torch.float64), dim=-1)
    cfg = TrainConfig(loss_backend="torch", logit_scale=50.0, alpha=9.0, accumulation_steps=steps)
    probe = build_loss(cfg, world)
    assert isinstance(probe.loss_fn, MicroStepLoss) and probe.loss_fn.steps == steps
    got = probe(q_all[rank], t_all[rank])
    m = B // steps
    want = []
    for i in range(steps):
        sl = slice(i * m, (i + 1) * m)
        q_i, t_i = q_all[:, sl].reshape(-1, d), t_all[:, sl].reshape(-1, d)  # the micro-step's pairs over all ranks
        per_row = reference_loss(q_i, t_i, logit_scale=50.0, alpha=9.0, reduction="none")
        want.append(per_row[rank * m:(rank + 1) * m].mean())  # this rank's rows (local loss)
    want = torch.stack(want).mean()
    assert abs(got.item() - want.item()) < 1e-9, (rank, got.item(), want.item())
