"""The LLaVE training loop: DeepSpeed ZeRO-3, GradCache, the fused loss across ranks.

One step = one global batch: every rank takes its slice of the step's sample indices,
GradCache encodes it chunk by chunk, the fused loss makes every pair of the global batch a
negative for every query (cross-rank strip algorithm), the engine reduces the gradients
once and steps once. The data order is a pure function of (seed, step), so a resumed run
sees exactly the batches an uninterrupted one would.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import socket
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from . import checkpoint as ckpt
from .gradcache import GradCache
from .loss import FusedHardnessLoss

log = logging.getLogger("llave_fast.train")

CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


@dataclass
class TrainConfig:
    """Every knob of a run. Defaults are the embedded CPU demo (tiny model, synthetic data)."""

    output_dir: str | None = None
    model: str = "tiny"  # "tiny" (built from scratch) or a checkpoint folder / hub id
    data: str = "synthetic"  # "synthetic" or MMEB-train files / folder
    image_dir: str | None = None
    subsets: list[str] | None = None
    use_negatives: bool = False
    skip_bad_rows: bool = False
    num_train: int = 6144  # synthetic train samples
    num_eval: int = 256  # held-out synthetic samples (queries and targets)
    image_size: int = 64
    max_text_tokens: int | None = None  # cut each query/target text to this many tokens
    global_batch: int = 64
    chunk_size: int = 32
    steps: int = 160
    lr: float = 1e-3  # language model
    lr_projector: float = 1e-3
    lr_vision: float = 1e-3  # 0 freezes the vision tower
    weight_decay: float = 0.01
    warmup_steps: int = 10
    min_lr_ratio: float = 0.05
    grad_clip: float = 1.0
    logit_scale: float = 50.0
    alpha: float = 9.0
    loss_backend: str = "auto"
    deepspeed_config: str = "zero3.json"
    bf16: bool | None = None  # None: bf16 on CUDA, fp32 on CPU
    gradient_checkpointing: bool = False
    save_every: int = 0  # 0: only at the end
    keep_checkpoints: int = 2
    seed: int = 0
    eval_before: bool = True
    eval_batch: int = 64
    tensorboard: bool = False
    progress: bool = True
    stop_after: int | None = None  # stop (as if killed) after this many steps of this run; tests

    @classmethod
    def from_json(cls, path: str) -> "TrainConfig":
        with open(_config_path(path)) as f:
            raw = json.load(f)
        raw.pop("_comment", None)
        unknown = set(raw) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"{path}: unknown training options {sorted(unknown)}")
        return cls(**raw)


def _config_path(name: str) -> str:
    if os.path.exists(name):
        return name
    shipped = os.path.join(CONFIG_DIR, name)
    if os.path.exists(shipped):
        return shipped
    raise FileNotFoundError(f"config {name!r} not found (looked in the working directory and {CONFIG_DIR})")


# -- distributed setup -------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed() -> tuple[int, int]:
    """Join the launcher's process group (torchrun / deepspeed), or make a 1-process one."""
    import deepspeed

    if dist.is_available() and dist.is_initialized():  # a caller already joined a group
        os.environ.setdefault("RANK", str(dist.get_rank()))
        os.environ.setdefault("WORLD_SIZE", str(dist.get_world_size()))
        os.environ.setdefault("LOCAL_RANK", str(dist.get_rank()))
        deepspeed.init_distributed(dist_backend=dist.get_backend())
        return dist.get_rank(), dist.get_world_size()
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    deepspeed.init_distributed(dist_backend=backend)
    return dist.get_rank(), dist.get_world_size()


def deepspeed_config(cfg: TrainConfig, world: int, bf16: bool) -> dict:
    with open(_config_path(cfg.deepspeed_config)) as f:
        ds = json.load(f)
    if cfg.global_batch % world:
        raise ValueError(f"global_batch={cfg.global_batch} must be divisible by the number of ranks ({world})")
    # GradCache is the accumulation: one engine step per global batch
    ds["train_batch_size"] = cfg.global_batch
    ds["train_micro_batch_size_per_gpu"] = cfg.global_batch // world
    ds["gradient_accumulation_steps"] = 1
    ds["gradient_clipping"] = cfg.grad_clip
    ds["bf16"] = {"enabled": bool(bf16)}
    ds.setdefault("zero_allow_untested_optimizer", True)
    ds.setdefault("steps_per_print", 10**9)
    return ds


# -- optimisation --------------------------------------------------------------------------


def param_groups(model, cfg: TrainConfig) -> list[dict]:
    """AdamW groups: vision tower, projector, language model (LLaVE trains them at different rates)."""
    groups = {"vision": [], "projector": [], "language": []}
    for name, p in model.named_parameters():
        if "vision_tower" in name:
            part = "vision"
        elif "multi_modal_projector" in name or "image_newline" in name:
            part = "projector"
        else:
            part = "language"
        if part == "vision" and cfg.lr_vision == 0:
            p.requires_grad_(False)
            continue
        if p.requires_grad:
            groups[part].append(p)
    lrs = {"vision": cfg.lr_vision, "projector": cfg.lr_projector, "language": cfg.lr}
    return [{"params": ps, "lr": lrs[k], "name": k} for k, ps in groups.items() if ps]


def warmup_cosine(step: int, cfg: TrainConfig) -> float:
    """LR multiplier: linear warm-up, then cosine down to min_lr_ratio."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    span = max(1, cfg.steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


# -- data order ----------------------------------------------------------------------------


def batch_indices(step: int, n: int, global_batch: int, seed: int) -> list[int]:
    """Sample indices of global step ``step``: epoch-wise permutations, last partial batch dropped."""
    per_epoch = n // global_batch
    if per_epoch == 0:
        raise ValueError(f"the dataset has {n} samples, fewer than one global batch of {global_batch}")
    epoch, pos = divmod(step, per_epoch)
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(n, generator=g)
    return order[pos * global_batch : (pos + 1) * global_batch].tolist()


# -- evaluation ----------------------------------------------------------------------------


@torch.no_grad()
def encode_all(embed, processor, texts, images, batch: int = 64) -> torch.Tensor:
    """Embeddings of (text, image) inputs in batches; ``embed(batch_dict) -> (n, d)``."""
    out = []
    for i in range(0, len(texts), batch):
        out.append(embed(processor(texts[i : i + batch], images[i : i + batch])).float().cpu())
    return torch.cat(out)


def retrieval_eval(embed, processor, rset, batch: int = 64) -> dict:
    """Precision@1, MMEB-style: every query against all distinct targets of the split."""
    q = encode_all(embed, processor, rset.query_texts, rset.query_images, batch)
    c = encode_all(embed, processor, rset.cand_texts, rset.cand_images, batch)
    scores = q @ c.t()
    return {
        "p_at_1": rset.precision_at_1(scores),
        "p_at_1_by_subset": rset.precision_at_1_by_subset(scores),
        "chance": rset.chance,
        "num_candidates": rset.num_candidates,
        "num_queries": rset.num_queries,
    }


# -- the run -------------------------------------------------------------------------------


_HF_DS_CONFIG = None  # transformers reads the ZeRO-3 config through this object while it lives


def build_model(cfg: TrainConfig, ds_config: dict, bf16: bool):
    """The tiny demo model from scratch, or a checkpoint (partitioned at load under ZeRO-3)."""
    global _HF_DS_CONFIG
    from .model import LLaVEEmbedder, build_tiny_model

    dtype = torch.bfloat16 if bf16 else torch.float32
    if ds_config.get("zero_optimization", {}).get("stage") == 3:
        from transformers.integrations import HfDeepSpeedConfig

        _HF_DS_CONFIG = HfDeepSpeedConfig(ds_config)
    if cfg.model == "tiny":
        model = build_tiny_model(cfg.seed, torch_dtype=dtype, image_size=cfg.image_size,
                                 patch_size=max(4, cfg.image_size // 4), max_grid=1)
    else:
        model = LLaVEEmbedder.from_pretrained(cfg.model, torch_dtype=dtype)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    model.processor.max_text_tokens = cfg.max_text_tokens
    return model


def _datasets(cfg: TrainConfig):
    from .data import MMEBDataset, SyntheticDataset

    if cfg.data == "synthetic":
        train = SyntheticDataset(cfg.num_train, seed=cfg.seed, split="train", image_size=cfg.image_size)
        evals = SyntheticDataset(cfg.num_eval, seed=cfg.seed, split="eval", image_size=cfg.image_size)
        return train, evals
    paths = cfg.data.split(",")
    train = MMEBDataset(paths, cfg.image_dir, subsets=cfg.subsets, use_negatives=cfg.use_negatives,
                        skip_bad_rows=cfg.skip_bad_rows)
    return train, None


def default_output_dir() -> str:
    return os.path.join("runs", time.strftime("%Y%m%d-%H%M%S"))


def train(cfg: TrainConfig) -> dict:
    """Run (or resume) training; returns the final metrics (also written to eval.json)."""
    import deepspeed

    from .data import PairCollator

    rank, world = init_distributed()
    if cfg.output_dir is None:
        cfg.output_dir = default_output_dir()
    out = cfg.output_dir
    on_gpu = torch.cuda.is_available()
    bf16 = on_gpu if cfg.bf16 is None else cfg.bf16
    ds_config = deepspeed_config(cfg, world, bf16)
    if rank == 0:
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "train_config.json"), "w") as f:
            json.dump(dataclasses.asdict(cfg), f, indent=2)
    torch.manual_seed(cfg.seed)

    model = build_model(cfg, ds_config, bf16)
    # every rank must run the same modules each forward (ZeRO gathers weights per module)
    model.uniform_modules = world > 1
    if rank == 0:  # the architecture and processor, without weights: export rebuilds from it
        base = os.path.join(out, "base")
        model.config.save_pretrained(base)
        model.processor.save_pretrained(base)
    collator = PairCollator(model.processor, use_negatives=cfg.use_negatives)
    train_set, eval_set = _datasets(cfg)
    rset = None
    if eval_set is not None:
        from .data import retrieval_candidates

        rset = retrieval_candidates(eval_set)

    optimizer = torch.optim.AdamW(param_groups(model, cfg), weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: warmup_cosine(s, cfg))
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config
    )
    loss_fn = FusedHardnessLoss(cfg.logit_scale, cfg.alpha, backend=cfg.loss_backend, local_loss=True,
                                gather_with_grad=True, rank=rank, world_size=world)
    gc = GradCache(engine, loss_fn, cfg.chunk_size)

    ckpt_root = os.path.join(out, "checkpoints")
    state = ckpt.load(engine, ckpt_root)
    start = 0
    metrics_path = os.path.join(out, "eval.json")
    before = None
    if state is not None:
        start = state["step"]
        before = state.get("p_at_1_before")
        torch.set_rng_state(state["rng_cpu"])
        if state.get("rng_cuda") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng_cuda"])
        _log(rank, f"resumed from {os.path.join(ckpt_root, ckpt.tag_for(start))} at step {start}")
    log_path = os.path.join(out, "train_log.jsonl")
    if rank == 0:
        _truncate_log(log_path, start)

    def embed(batch):
        return engine.module(_to_device(batch, engine.device))

    if rset is not None and cfg.eval_before and before is None:
        engine.module.eval()
        before = retrieval_eval(embed, model.processor, rset, cfg.eval_batch)
        _log(rank, f"before training: precision@1 {before['p_at_1']:.3f} "
                   f"(chance {before['chance']:.3f}, {before['num_candidates']} candidates)")

    writer = _tensorboard(out) if (cfg.tensorboard and rank == 0) else None
    bar = _bar(rank, cfg, start)
    t_run = time.perf_counter()
    b_local = cfg.global_batch // world
    step = start
    engine.module.train()
    while step < cfg.steps:
        if cfg.stop_after is not None and step - start >= cfg.stop_after:
            break
        t0 = time.perf_counter()
        idx = batch_indices(step, len(train_set), cfg.global_batch, cfg.seed)
        records = [train_set[i] for i in idx[rank * b_local : (rank + 1) * b_local]]
        batch = _to_device(collator(records), engine.device)
        target_ids = batch["target_ids"]
        if batch.get("negatives") is not None and batch.get("negative_ids") is not None:
            target_ids = torch.cat([target_ids, batch["negative_ids"]])
        # duplicate targets (MMEB classification / VQA answers) are false negatives in both
        # directions: q->t masks candidate targets with the positive's id, and t->q masks
        # candidate queries whose own target carries that id (so the queries are labelled
        # with their targets' ids)
        local_loss = gc(batch["query"], batch["target"], batch.get("negatives"),
                        target_ids=target_ids, query_ids=batch["target_ids"])
        lr_used = scheduler.get_last_lr()[-1]  # the rate this step applies
        engine.step()
        step += 1
        loss = _global_mean(local_loss.detach().float(), world)
        dt = time.perf_counter() - t0
        entry = {"step": step, "loss": loss, "lr": lr_used, "step_time_s": dt,
                 "pairs_per_s": cfg.global_batch / dt}
        if rank == 0:
            with open(log_path, "a") as f:
                f.write(json.dumps(entry) + "\n")
            if writer is not None:
                writer.add_scalar("loss", loss, step)
                writer.add_scalar("lr", entry["lr"], step)
        bar.set_postfix(loss=f"{loss:.4f}", step_s=f"{dt:.2f}", pairs_s=f"{entry['pairs_per_s']:.0f}")
        bar.update(1)
        if (cfg.save_every and step % cfg.save_every == 0) or step == cfg.steps:
            ckpt.save(engine, ckpt_root, step,
                      {"step": step, "rng_cpu": torch.get_rng_state(), "p_at_1_before": before,
                       "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None},
                      keep=cfg.keep_checkpoints)
    bar.close()
    seconds = time.perf_counter() - t_run
    result = {"steps": step, "global_batch": cfg.global_batch, "seconds": seconds, "world_size": world}
    if step >= cfg.steps and rset is not None:
        engine.module.eval()
        after = retrieval_eval(embed, model.processor, rset, cfg.eval_batch)
        result.update(p_at_1_before=before["p_at_1"] if before else None, p_at_1_after=after["p_at_1"],
                      chance=after["chance"], num_candidates=after["num_candidates"],
                      p_at_1_after_by_subset=after["p_at_1_by_subset"])
        b = "n/a" if before is None else f"{before['p_at_1']:.3f}"
        _log(rank, f"after {step} steps: precision@1 {after['p_at_1']:.3f} (before {b}, chance "
                   f"{after['chance']:.4f}, {after['num_candidates']} candidates); training took {seconds:.0f} s")
        if rank == 0:
            with open(metrics_path, "w") as f:
                json.dump(result, f, indent=2)
    return result


def _to_device(batch, device):
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, dict):
        return {k: _to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, list):
        return [_to_device(v, device) for v in batch]
    return batch


def _global_mean(x: torch.Tensor, world: int) -> float:
    if world > 1:
        x = x.clone()
        dist.all_reduce(x)
        x /= world
    return x.item()


def _truncate_log(path: str, step: int) -> None:
    """On resume, drop log lines of steps after the checkpoint: they will be run again."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        keep = [ln for ln in f if ln.strip() and json.loads(ln)["step"] <= step]
    with open(path, "w") as f:
        f.writelines(keep)


def _log(rank: int, msg: str) -> None:
    if rank == 0:
        print(msg, flush=True)


class _NoBar:
    def set_postfix(self, **kw):
        pass

    def update(self, n=1):
        pass

    def close(self):
        pass


def _bar(rank, cfg, start):
    if rank != 0 or not cfg.progress:
        return _NoBar()
    from tqdm.auto import tqdm

    return tqdm(total=cfg.steps, initial=start, desc="train", unit="step")


def _tensorboard(out):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        log.warning("tensorboard is not installed: --tensorboard ignored")
        return None
    return SummaryWriter(os.path.join(out, "tb"))
