"""Rank bodies of the training-loop tests."""

from __future__ import annotations

import contextlib
import json
import os

from llave_fast.train import TrainConfig, train


LAUNCHER_KEYS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
#: what a run sets in os.environ: the launcher variables, and the tokenizers' switch before its loader forks
RUN_ENV_KEYS = (*LAUNCHER_KEYS, "TOKENIZERS_PARALLELISM")


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


def initial_weights_by_stage(rank, world, kw):
    """The tiny model (``kw["seed"]``) built as training builds it under ZeRO-2 and ZeRO-3, then handed to
    ``deepspeed.initialize``; saved from the ZeRO-2 build, the same checkpoint loaded under both stages.
    Rank 0 writes, per build, the parameter names whose gathered full weights differ from ZeRO-2's."""
    import deepspeed
    import torch

    from llave_fast.training import engine as E
    from llave_fast.training.deepspeed_setup import init_distributed

    init_distributed()
    ckpt = os.path.join(kw["out"], "ckpt")
    report = {}
    for model in ("tiny", ckpt):
        weights = {}
        for stage in (2, 3):
            ds = {"zero_optimization": {"stage": stage}, "train_micro_batch_size_per_gpu": 1,
                  "zero_allow_untested_optimizer": True}
            cfg = TrainConfig(model=model, seed=kw["seed"], image_size=64)
            torch.manual_seed(cfg.seed)  # as the training loop does before building
            built = E.build_model(cfg, ds, False)
            engine, _ = E.build_engine(built, cfg, ds)
            params = dict(engine.module.named_parameters())
            with deepspeed.zero.GatheredParameters(list(params.values())) if stage == 3 else contextlib.nullcontext():
                weights[stage] = {n: p.detach().clone() for n, p in params.items()}
            if model == "tiny" and stage == 2 and rank == 0:
                built.save_pretrained(ckpt)
            E.release_zero3_mode()  # ZeRO-3 mode off for the next build
            torch.distributed.barrier()
        a, b = weights[2], weights[3]
        report["tiny" if model == "tiny" else "checkpoint"] = {
            "params": len(a), "differ": sorted(n for n in a if not torch.equal(a[n], b[n])),
            "partitioned": any(p.ds_numel > p.numel() for p in engine.module.parameters() if hasattr(p, "ds_numel"))}
    if rank == 0:
        with open(os.path.join(kw["out"], "report.json"), "w") as f:
            json.dump(report, f)


def runs_in_one_process(out: str) -> None:
    """In a fresh process, with no launcher variables set: a failed start, a ZeRO-3 run, a ZeRO-2 run, then a
    run under a caller's own transformers ZeRO-3 config; after each, what the process looks like. The report
    goes to ``out/report.json``."""
    import warnings

    import torch
    import torch.distributed as dist
    from transformers.integrations import HfDeepSpeedConfig, is_deepspeed_zero3_enabled

    from transformers.integrations import deepspeed as hf_ds

    from llave_fast.model import build_tiny_model
    from llave_fast.training.console import KNOWN_WARNINGS

    keys = RUN_ENV_KEYS
    quieted = {pattern for _, pattern in KNOWN_WARNINGS}

    def state(tag, error=None):
        draw = torch.rand(1).item()  # the caller seeded 1234 before the run: the draw its seeding decides
        model = build_tiny_model(0)  # as a notebook would build or load a model after the run
        return {"tag": tag, "error": error, "env": {k: os.environ.get(k) for k in keys},
                "group": dist.is_initialized(), "zero3": is_deepspeed_zero3_enabled(),
                "params": sum(1 for _ in model.parameters()),
                "empty_params": sum(p.numel() == 0 for p in model.parameters()), "draw": draw,
                "quieted": sorted(f[1].pattern for f in warnings.filters
                                  if f[1] is not None and f[1].pattern in quieted)}

    torch.manual_seed(1234)
    report = [state("before")]
    try:
        torch.manual_seed(1234)
        train(tiny_cfg(os.path.join(out, "bad"), model=os.path.join(out, "no-such-model")))
        report.append(state("failed start", "none"))
    except Exception as exc:
        report.append(state("failed start", type(exc).__name__))
    for i, ds in enumerate(("zero3.json", "zero2.json")):
        torch.manual_seed(1234)
        r = train(tiny_cfg(os.path.join(out, f"run{i}"), steps=2, deepspeed_config=ds))
        report.append(state(f"{ds} run", None) | {"steps": r["steps"]})
    mine = HfDeepSpeedConfig({"zero_optimization": {"stage": 3}, "train_micro_batch_size_per_gpu": 1})
    r = train(tiny_cfg(os.path.join(out, "run2"), steps=2, deepspeed_config="zero3.json"))
    report.append({"tag": "caller's config", "steps": r["steps"], "caller_config_current": hf_ds._hf_deepspeed_config_weak_ref() is mine})
    with open(os.path.join(out, "report.json"), "w") as f:
        json.dump(report, f)


def tensorboard_writers(rank, world, kw) -> None:
    """Two runs with ``tensorboard=True`` in this process, the second resuming the first (stopped after 2 of
    4 steps), with a stand-in for ``torch.utils.tensorboard`` (not a test dependency) that records what each
    writer was given and whether it was closed: the report goes to ``kw["out"]/writers.json``."""
    import sys
    import types

    made = []

    class Writer:
        def __init__(self, log_dir, purge_step=None):
            self.rec = {"purge_step": purge_step, "steps": [], "closed": False}
            made.append(self.rec)

        def add_scalar(self, tag, value, step):
            if tag == "loss":
                self.rec["steps"].append(step)

        def close(self):
            self.rec["closed"] = True

    fake = types.ModuleType("torch.utils.tensorboard")
    fake.SummaryWriter = Writer
    sys.modules["torch.utils.tensorboard"] = fake
    run = os.path.join(kw["out"], "run")
    train(tiny_cfg(run, steps=4, stop_after=2, tensorboard=True, eval_before=False, num_eval=0))
    train(tiny_cfg(run, steps=4, tensorboard=True, eval_before=False, num_eval=0))
    with open(os.path.join(kw["out"], "writers.json"), "w") as f:
        json.dump(made, f)
