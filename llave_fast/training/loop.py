"""The training loop: DeepSpeed ZeRO-3, GradCache, the fused loss across ranks.

One step = one global batch: every rank takes its slice of the step's sample indices,
GradCache encodes it chunk by chunk, the fused loss makes every pair of the global batch a
negative for every query (cross-rank strip algorithm), the engine reduces the gradients
once and steps once. The data order is a pure function of (seed, step), so a resumed run
sees exactly the batches an uninterrupted one would.

Around the step: the options and the data are checked, the run's length resolved and a
resume decided (refusing options that would change the run) before the model is built;
DataLoader workers read, decode and collate the next steps' batches while the model works;
bad data and a non-finite loss stop every rank at the same step, naming it and the newest
complete checkpoint; the run ends with a summary.

The top of the training package: :func:`_train` reads top to bottom and calls the rooms below it.
"""

from __future__ import annotations

import functools
import math
import os
import time
from dataclasses import dataclass

import torch

from ..gradcache import GradCache
from .batches import BatchOrder, check_data_fit
from .checks import check_config, cpu_size_warning
from .config import TrainConfig
from .console import _log, log, progress_bar, progress_line, quiet_known_warnings, say
from .deepspeed_setup import deepspeed_config, init_distributed
from .engine import build_engine, build_model, run_leaves_process_as_found, save_base
from .heldout import evaluate_after, evaluate_before
from .loading import _datasets, step_loader, stop_loader_workers
from .preempt import checkpoint_on_sigterm, end_checkpoint_on_sigterm
from .report import run_result, summary_text
from .resume import plan_resume, restore, save_checkpoint, write_run_config
from .run_folder import (
    _START_FILES,
    RunFolderInUse,
    _forget_failed_start,
    _release_run_folder,
    agreed_output_dir,
    sigterm_ignored_while_cleaning_up,
    hold_run_folder,
    sigterm_as_interrupt,
)
from .runlog import _append_log, _tensorboard, _truncate_log, close_all
from .schedule import resolve_length
from .step import _to_device, build_loss, by_length, chunks, duplicate_ids
from .stops import (
    RunStopped,
    _gather_objects,
    _last_checkpoint,
    _non_finite_message,
    _stop_if_asked,
    all_ranks_stats,
    check_ranks_agree,
)


def train(cfg: TrainConfig) -> dict:
    """Run (or resume) training; returns the final metrics (also written to eval.json).

    A start that fails before its first step (a bad --model, an option DeepSpeed refuses, an
    interrupt) leaves no half-made run folder behind: what it wrote is removed (see
    :func:`_forget_failed_start`)."""
    out = cfg.output_dir
    # what was there before this start: only what the start itself made is ever removed
    existed = set() if out is None else {name for name in ("", *_START_FILES) if os.path.exists(os.path.join(out, name))}
    with run_leaves_process_as_found():  # after the clean-up: what the run set in its process (engine.py)
        try:
            sigterm_as_interrupt()  # SIGTERM before the first step cleans up as Ctrl-C does
            return _train(cfg)
        except RunFolderInUse:
            raise  # the folder is another run's: nothing of it is touched
        except BaseException:
            sigterm_ignored_while_cleaning_up()
            _release_run_folder()
            try:
                _forget_failed_start(cfg.output_dir, existed)
            except OSError as exc:  # never hide the error that stopped the run
                log.warning("could not clean up after the failed start in %s: %s", cfg.output_dir, exc)
            raise
        finally:
            end_checkpoint_on_sigterm()  # and the start's handler
            _release_run_folder()


def _train(cfg: TrainConfig) -> dict:
    quiet_known_warnings()
    rank, world = init_distributed()
    run = start_run(cfg, rank, world)  # options, run folder, data, length, resume: all before the model
    done = finished_result(run)
    if done is not None:  # a rerun of a finished run: nothing to train, and its eval.json is left as it was
        return done
    torch.manual_seed(cfg.seed)
    model, collator, rset = prepare_model(run)
    engine, scheduler = build_engine(model, cfg, run.ds_config)
    probe = build_loss(cfg, world)
    gc = GradCache(engine, probe, cfg.chunk_size, split=chunks)  # each chunk padded to its own longest row
    start, before = restore(engine, run.ckpt_root, run.tag, rank)
    if rank == 0:
        _truncate_log(run.log_path, start)

    def embed(batch):
        return engine.module(_to_device(batch, engine.device))

    if rset is not None and cfg.eval_before and before is None:
        if start == 0:
            before = evaluate_before(engine, embed, model.processor, rset, cfg, rank)
        else:  # the weights restored are no longer the starting ones: no "before" score from them
            _log(rank, f"eval_before: not measured (the run started without it, and its weights at step {start} are "
                       "no longer the starting ones)")
    save = functools.partial(save_checkpoint, engine, run.ckpt_root, before=before, keep=cfg.keep_checkpoints)
    writer = _tensorboard(run.out, start) if (cfg.tensorboard and rank == 0) else None
    checkpoint_on_sigterm()  # steps start: SIGTERM now checkpoints the steps done and stops (training/preempt.py)
    end = cfg.steps if cfg.stop_after is None else min(cfg.steps, start + cfg.stop_after)
    loader = step_loader(run.train_set, collator, run.order, rank, cfg.global_batch // world, start, end,
                         cfg.num_workers, cfg.prefetch_batches, cfg.seed)
    bar = progress_bar(rank, cfg.steps, start, cfg.progress)
    t_run = time.perf_counter()
    step, step_times, waits, skipped = run_steps(run, engine, scheduler, gc, probe, loader, bar, writer, start, end,
                                                 save)
    seconds = time.perf_counter() - t_run
    skipped_all = set().union(*_gather_objects(skipped, world))
    result = run_result(cfg, steps=step, start=start, resumed=run.tag is not None, seconds=seconds, world=world,
                        step_times=step_times, waits=waits, train_rows=len(run.train_set),
                        skipped_at_build=run.skipped_at_build, skipped_in_training=len(skipped_all),
                        ckpt_root=run.ckpt_root,
                        rows_with_image_dropped=getattr(run.train_set, "rows_with_image_dropped", None))
    if step >= cfg.steps and rset is not None:
        evaluate_after(engine, embed, model.processor, rset, cfg, rank, result, before, run.metrics_path,
                       run.ckpt_root)
    _log(rank, summary_text(result, cfg))
    return result


def finished_result(run) -> dict | None:
    """The metrics of a run whose final checkpoint and eval.json exist (rank 0 decides, for every
    rank), said in one line; None when there is training or evaluation left to do."""
    import json

    from .. import checkpoint as ckpt

    result = None
    if run.rank == 0 and run.tag is not None and ckpt.step_of(run.tag) >= run.cfg.steps \
            and os.path.isfile(run.metrics_path):
        with open(run.metrics_path) as f:
            result = json.load(f)
    result = _gather_objects(result, run.world)[0]
    if result is not None:
        _log(run.rank, f"the run in {run.out} is complete ({run.cfg.steps} of {run.cfg.steps} steps): nothing to train; "
                       f"its results stay in {run.metrics_path} (another --output-dir starts a new run)")
    return result


@dataclass
class Run:
    """What a start decided before the model is built: the rank, precision and DeepSpeed config, the
    data and its batch order, and the checkpoint to resume from (``tag``; None: a fresh start)."""

    cfg: TrainConfig
    rank: int
    world: int
    bf16: bool
    ds_config: dict
    train_set: object
    eval_set: object
    skipped_at_build: int
    order: BatchOrder
    tag: str | None

    @property
    def out(self) -> str:
        return self.cfg.output_dir

    @property
    def ckpt_root(self) -> str:
        return os.path.join(self.out, "checkpoints")

    @property
    def log_path(self) -> str:
        return os.path.join(self.out, "train_log.jsonl")

    @property
    def metrics_path(self) -> str:
        return os.path.join(self.out, "eval.json")


def start_run(cfg: TrainConfig, rank: int, world: int) -> Run:
    """The run folder (named, held), the options checked, the data read and fitted to the batch, the
    run's length resolved and the resume decided; train_config.json written (rank 0)."""
    if cfg.output_dir is None:
        cfg.output_dir = agreed_output_dir(rank, world)
    out = cfg.output_dir
    bf16 = torch.cuda.is_available() if cfg.bf16 is None else cfg.bf16
    check_config(cfg, world)
    ds_config = deepspeed_config(cfg, world, bf16)  # a missing or broken file: refused before the folder is made
    hold_run_folder(out, rank, world)
    _log(rank, f"run folder: {os.path.abspath(out)}")  # said once the start is accepted
    if rank == 0 and (warning := cpu_size_warning(cfg)):
        log.warning(warning)
    train_set, eval_set = _datasets(cfg, progress=cfg.progress and rank == 0)
    if cfg.check_images and cfg.data == "synthetic":
        _log(rank, "check_images: synthetic images are drawn in memory, nothing to check")
    skipped_at_build = len(getattr(train_set, "skipped", []))
    order = check_data_fit(cfg, len(train_set), train_set.query_has_image() if cfg.group_by_modality else None)
    resolve_length(cfg, order, rank)
    check_ranks_agree(cfg, world, {"train_rows": len(train_set), "skipped_rows_at_build": skipped_at_build,
                                   "bf16": bool(bf16)})
    tag, history = plan_resume(cfg, len(train_set), bf16, world)
    if rank == 0:
        os.makedirs(out, exist_ok=True)
        write_run_config(cfg, history, {"train_rows": len(train_set), "skipped_rows_at_build": skipped_at_build,
                                        "bf16": bool(bf16),  # the precision resolved (bf16 None: by the machine)
                                        "world_size": world})
    if tag is not None and history[-1]["changed"]:
        _log(rank, "resuming with changed options (recorded in train_config.json): " + ", ".join(
            f"{k} {old!r} -> {new!r}" for k, (old, new) in history[-1]["changed"].items()))
    return Run(cfg, rank, world, bf16, ds_config, train_set, eval_set, skipped_at_build, order, tag)


def prepare_model(run: Run):
    """``(model, collator, held-out retrieval set or None)``; rank 0 saves the model's base (config and
    processor, no weights) in the run folder."""
    from ..data import PairCollator, retrieval_candidates

    model = build_model(run.cfg, run.ds_config, run.bf16)
    # every rank must run the same modules each forward (ZeRO gathers weights per module)
    model.uniform_modules = run.world > 1
    if run.rank == 0:
        save_base(model, run.out)
    collator = PairCollator(model.processor, use_negatives=run.cfg.use_negatives)
    rset = None if run.eval_set is None else retrieval_candidates(run.eval_set)
    return model, collator, rset


def run_steps(run: Run, engine, scheduler, gc, probe, loader, bar, writer, start: int, end: int, save):
    """Steps ``start..end-1``, checkpointing every ``save_every`` and at the last step; returns
    ``(steps done, step times, data waits, rows found bad during training)``."""
    cfg, rank = run.cfg, run.rank
    skipped, step_times, waits, step = set(), [], [], start
    engine.module.train()
    batches = iter(loader)
    try:
        while step < end:
            t0 = time.perf_counter()
            item = next(batches)
            wait = time.perf_counter() - t0
            assert item["step"] == step, (item["step"], step)
            for s in item["skipped"]:
                skipped.add(s)
                say(bar, f"step {step + 1}: skipped bad row: {run.train_set.where(s[0], s[1])}: {s[2]}")
            _stop_if_asked(item["error"], step, start, run.world, run.ckpt_root, save)
            loss, lr_used = train_step(run, engine, scheduler, gc, probe, item["batch"], step)
            step += 1
            dt = time.perf_counter() - t0
            step_times.append(dt)
            waits.append(wait)
            entry = {"step": step, "loss": loss, "lr": lr_used, "step_time_s": dt, "data_wait_s": wait,
                     "pairs_per_s": cfg.global_batch / dt}
            if rank == 0:
                _append_log(run.log_path, entry, run.ckpt_root)
                if writer is not None:
                    writer.add_scalar("loss", loss, step)
                    writer.add_scalar("lr", entry["lr"], step)
            bar.set_postfix_str(progress_line(loss, dt, entry["pairs_per_s"], wait))
            bar.update(1)
            if (cfg.save_every and step % cfg.save_every == 0) or step == cfg.steps:
                save(step)
        _stop_if_asked(None, step, start, run.world, run.ckpt_root, save)  # a SIGTERM in the last step
        end_checkpoint_on_sigterm()
    finally:
        stop_loader_workers(batches)  # and kills any that did not end (they ignore SIGTERM)
        close_all(bar, writer)
    return step, step_times, waits, skipped


def train_step(run: Run, engine, scheduler, gc, probe, batch, step: int) -> tuple[float, float]:
    """One global batch through GradCache and one engine step; ``(the loss averaged over ranks, the
    learning rate the step applied)``. A non-finite loss on any rank stops every rank before the step."""
    cfg, rank, world = run.cfg, run.rank, run.world
    batch = _to_device(batch, engine.device)
    (q, q_order), (t, t_order), (n, n_order) = (by_length(batch.get(k), cfg.chunk_size)
                                                    for k in ("query", "target", "negatives"))
    local_loss = gc(q, t, n, orders=(q_order, t_order, n_order), **duplicate_ids(batch, cfg.mask_duplicates))
    lr_used = scheduler.get_last_lr()[-1]  # the rate this step applies
    # every rank's loss and its embeddings' health, known to all ranks before the step
    stats = all_ranks_stats([local_loss.item(), *probe.non_finite()], rank, world)
    loss = stats[:, 0].mean().item()
    if not math.isfinite(loss):  # every rank sees it: all stop here, before the step
        directions = _gather_objects(probe.directions(cfg.logit_scale, cfg.alpha), world)
        raise RunStopped(_non_finite_message(step + 1, stats, directions, lr_used, run.ckpt_root), step + 1,
                         _last_checkpoint(run.ckpt_root))
    probe.clear()
    engine.step()
    return loss, lr_used
