"""The held-out evaluation of a run: precision@1 before training (unless a resumed run measured it
already) and after its last step, the latter added to the run's result and written to eval.json."""

from __future__ import annotations

import json
import os

from .. import checkpoint as ckpt
from ..evaluate import eval_processor, retrieval_eval
from .config import TrainConfig
from .console import _log


def heldout_eval(embed, processor, rset, cfg: TrainConfig) -> dict:
    """precision@1 of the held-out set, its inputs built as ``llave-fast eval`` builds them.

    The training processor cuts each text alone at ``max_text_tokens`` (256 in
    ``configs/llave_0.5b.json``); the eval command does not (LLaVE's protocol,
    :func:`~llave_fast.evaluate.apply_eval_protocol`: only the whole sequence is cut, at
    ``max_length``). The in-run score uses the eval command's inputs (a copy of the processor,
    :func:`~llave_fast.evaluate.eval_processor`), so ``p_at_1_after`` is the number ``llave-fast
    eval`` gives the exported run on the same data; the training processor is left untouched. The
    precision is the training's (the engine's weights, no autocast): the eval command's default
    ``--dtype`` on a GPU differs (LLaVE's fp16 weights under bf16 autocast), so on a GPU the two
    can differ in the last digits of a score.
    """
    return retrieval_eval(embed, eval_processor(processor), rset, cfg.eval_batch)


def evaluate_before(engine, embed, processor, rset, cfg: TrainConfig, rank: int) -> dict:
    """precision@1 of the model as it starts (the number the run's improvement is measured from),
    under the eval command's inputs (:func:`heldout_eval`)."""
    engine.module.eval()
    before = heldout_eval(embed, processor, rset, cfg)
    _log(rank, f"before training: precision@1 {before['p_at_1']:.3f} "
               f"(chance {before['chance']:.3f}, {before['num_candidates']} candidates)")
    return before


def evaluate_after(engine, embed, processor, rset, cfg: TrainConfig, rank: int, result: dict, before: dict | None,
                   metrics_path: str, ckpt_root: str) -> None:
    """precision@1 after training, overall, by subset and by task, into ``result``; rank 0 writes
    ``result`` to ``metrics_path`` (eval.json), a full disk named with the newest checkpoint. Scored
    under the eval command's inputs (:func:`heldout_eval`)."""
    engine.module.eval()
    after = heldout_eval(embed, processor, rset, cfg)
    result.update(p_at_1_before=before["p_at_1"] if before else None, p_at_1_after=after["p_at_1"],
                  chance=after["chance"], num_candidates=after["num_candidates"],
                  p_at_1_after_by_subset=after["p_at_1_by_subset"], by_task=after["by_task"],
                  eval_json=os.path.abspath(metrics_path))
    b = "n/a" if before is None else f"{before['p_at_1']:.3f}"
    _log(rank, f"after {result['steps']} steps: precision@1 {after['p_at_1']:.3f} (before {b}, chance "
               f"{after['chance']:.4f}, {after['num_candidates']} candidates); training took "
               f"{result['seconds']:.0f} s")
    if rank == 0:
        with ckpt.reporting_full_disk(metrics_path, ckpt_root):
            ckpt.write_atomic(metrics_path, json.dumps(result, indent=2))
