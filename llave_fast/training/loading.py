"""The run's data: its datasets (synthetic or MMEB-train) and the DataLoader that reads, decodes and
collates each step's batch for this rank in worker processes, ahead of the model."""

from __future__ import annotations

import logging
import os

import torch

from .config import TrainConfig
from .preempt import loader_worker_ignores_sigterm


def _datasets(cfg: TrainConfig, progress: bool = False):
    from ..data import MMEBDataset, SyntheticDataset

    if cfg.data == "synthetic":
        train = SyntheticDataset(cfg.num_train, seed=cfg.seed, split="train", image_size=cfg.image_size,
                                 hard_family_size=cfg.hard_family_size, background=cfg.synthetic_background,
                                 vqa_questions_per_scene=cfg.vqa_questions_per_scene,
                                 **({} if cfg.synthetic_tasks is None else {"tasks": cfg.synthetic_tasks}))
        if cfg.num_eval == 0:  # no held-out evaluation (no eval.json)
            return train, None
        evals = SyntheticDataset(cfg.num_eval, seed=cfg.seed, split="eval", image_size=cfg.image_size,
                                 hard_family_size=cfg.hard_family_size, background=cfg.synthetic_background)
        return train, evals
    paths = cfg.data.split(",")
    train = MMEBDataset(paths, cfg.image_dir, subsets=cfg.subsets, use_negatives=cfg.use_negatives,
                        skip_bad_rows=cfg.skip_bad_rows, split=cfg.mmeb_split,
                        max_rows_per_subset=cfg.max_rows_per_subset,
                        check_images="decode" if cfg.check_images else "exists", bad_images=cfg.bad_images,
                        progress=progress, max_image_pixels=cfg.max_image_pixels,
                        allow_outside_image_dir=cfg.allow_outside_image_dir,
                        decode_across_ranks=True)  # --check-images: each rank decodes its share, all drop the same rows
    return train, None


class StepBatches(torch.utils.data.Dataset):
    """One item per training step: this rank's share of the step's global batch, read, decoded
    and collated (processor included), so a DataLoader worker can do all of it ahead of the model.

    An item is ``{"step", "batch", "skipped", "error"}``: ``skipped`` lists the rows the
    dataset replaced while reading it (``bad_images="skip"``), ``error`` is the message of a
    ``BadDataError`` that stopped it (``"fail"``; ``batch`` is None then). Errors travel as
    data so that every rank learns of them at the same step (see ``train``).
    """

    def __init__(self, dataset, collator):
        self.dataset, self.collator = dataset, collator

    def __len__(self):
        return 2**62  # keys are (step, indices) pairs from StepSampler

    def __getitem__(self, key):
        from ..data import BadDataError

        step, indices = key
        skipped = getattr(self.dataset, "skipped", None)
        before = len(skipped) if skipped is not None else 0
        quiet = logging.getLogger("llave_fast.data.mmeb")
        was, quiet.disabled = quiet.disabled, True  # the loop reports each skip itself, above the bar
        try:
            records = [self.dataset[i] for i in indices]
        except BadDataError as exc:
            return {"step": step, "batch": None, "skipped": [], "error": str(exc)}
        finally:
            quiet.disabled = was
        new = [tuple(s) for s in skipped[before:]] if skipped is not None else []
        return {"step": step, "batch": self.collator(records), "skipped": new, "error": None}


class StepSampler(torch.utils.data.Sampler):
    """Keys ``(step, this rank's indices)`` for steps ``start..end-1``: the order stays a pure
    function of (seed, step), whatever the number of workers."""

    def __init__(self, order, rank: int, per_rank: int, start: int, end: int):
        self.order, self.rank, self.per_rank, self.start, self.end = order, rank, per_rank, start, end

    def __len__(self):
        return max(0, self.end - self.start)

    def __iter__(self):
        for step in range(self.start, self.end):
            idx = self.order(step)
            yield step, idx[self.rank * self.per_rank : (self.rank + 1) * self.per_rank]


def _first(items):
    return items


def step_loader(dataset, collator, order, rank: int, per_rank: int, start: int, end: int, num_workers: int = 2,
                prefetch_batches: int = 2, seed: int = 0) -> torch.utils.data.DataLoader:
    """The batches of steps ``start..end-1`` for this rank, prepared by ``num_workers`` processes
    ``prefetch_batches`` steps ahead each (0 workers: in this process, when asked for)."""
    context = None
    if num_workers > 0:
        # the tokenizer may have run here already (evaluation): its threads do not survive a fork
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        import multiprocessing

        # fork where there is one: a spawned worker re-imports transformers and unpickles the
        # processor (about 10 s per start on the CPU here); workers never touch CUDA
        if "fork" in multiprocessing.get_all_start_methods():
            context = multiprocessing.get_context("fork")
    return torch.utils.data.DataLoader(
        StepBatches(dataset, collator),
        multiprocessing_context=context,
        sampler=StepSampler(order, rank, per_rank, start, end),
        batch_size=None,  # one key is one step's batch already
        collate_fn=_first,
        num_workers=num_workers,
        prefetch_factor=prefetch_batches if num_workers > 0 else None,
        pin_memory=torch.cuda.is_available(),
        # its own generator: creating the loader must not draw from the global RNG (resume is exact)
        generator=torch.Generator().manual_seed(seed),
        worker_init_fn=loader_worker_ignores_sigterm if num_workers > 0 else None,  # the run checkpoints on SIGTERM
    )


def stop_loader_workers(batches) -> None:
    """Stop the loader's worker processes now (what dropping its iterator does), then kill any worker
    still alive. The run's workers ignore SIGTERM (:func:`~.preempt.loader_worker_ignores_sigterm`), so
    the SIGTERM torch sends a worker that did not end in time did nothing: a worker hung in a read or
    a decode lived on, and the run's exit then waited on it for ever (multiprocessing joins its
    children at exit)."""
    workers = list(getattr(batches, "_workers", ()))  # torch's worker processes (none in-process)
    shutdown = getattr(batches, "_shutdown_workers", None)
    if shutdown is not None:
        shutdown()  # asks each to end, waits a few seconds, then sends SIGTERM
    for w in workers:
        if w.is_alive():
            logging.getLogger(__name__).warning("data-loader worker %s did not end; killing it", w.pid)
            w.kill()
            w.join(5)
