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
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from . import checkpoint as ckpt
from .gradcache import GradCache
from .loss import FusedHardnessLoss

log = logging.getLogger("llave_fast.train")

def _config_dir() -> str:
    """The shipped presets: the package ``llave_fast.configs`` (``configs/`` in the tree, mapped
    in by setup.py and shipped in the wheel); a source tree that was not installed falls back
    to the folder beside the package."""
    try:
        from llave_fast import configs

        return os.path.dirname(os.path.abspath(configs.__file__))
    except ImportError:
        return os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


CONFIG_DIR = _config_dir()


def _opt(default, help: str):
    return field(default=default, metadata={"help": help})


@dataclass
class TrainConfig:
    """Every knob of a run. Defaults are the embedded CPU demo (tiny model, synthetic data).
    Each field is also a ``llave-fast train`` flag; its help is the metadata below."""

    output_dir: str | None = _opt(None, "run folder (checkpoints, logs, eval.json); default runs/<date-time>")
    model: str = _opt("tiny", "'tiny' (built from scratch) or a checkpoint folder / hub id (llava_qwen, LLaVA-OneVision "
                              "'llava' or transformers format)")
    data: str = _opt("synthetic", "'synthetic' or MMEB-train files / folders (comma-separated) or a hub dataset name")
    image_dir: str | None = _opt(None, "folder MMEB image paths are relative to")
    subsets: list[str] | None = _opt(None, "MMEB subsets to train on (comma-separated); default all found")
    mmeb_split: str | None = _opt(None, "MMEB shard split to read: 'original' (LLaVE) or 'diverse_instruction'; "
                                        "None: every local file (hub: original)")
    max_rows_per_subset: int | None = _opt(None, "keep the first N rows of each MMEB subset (LLaVE: 50000, "
                                                 "about 662K pairs over its 20 subsets)")
    use_negatives: bool = _opt(False, "also encode MMEB's hard negatives (neg_text/neg_image_path)")
    skip_bad_rows: bool = _opt(False, "skip and log unusable data rows instead of stopping")
    num_train: int = _opt(6144, "synthetic train samples")
    num_eval: int = _opt(256, "held-out synthetic samples (queries and targets)")
    image_size: int = _opt(64, "synthetic image side and the tiny model's tile size, px")
    image_grid: str | None = _opt(None, "override the model's anyres grid: '(1x1),...,(2x2)' (tile counts, "
                                        "width x height, LLaVE's form) or a list of [width, height] px pairs; "
                                        "None keeps the checkpoint's (LLaVA-OneVision's own: 6x6)")
    max_length: int | None = _opt(None, "LLaVE's rule: cut each whole sequence, image tokens inserted, to this many "
                                        "tokens (LLaVE: 4096); None keeps the checkpoint's tokenizer_model_max_length "
                                        "(none for transformers-format folders)")
    max_text_tokens: int | None = _opt(None, "ours: cut each query/target's own text to this many tokens (the "
                                             "template and image tokens are never cut)")
    global_batch: int = _opt(64, "pairs per optimizer step over all ranks")
    chunk_size: int = _opt(32, "GradCache chunk: samples per forward with gradients (activation memory)")
    accumulation_steps: int = _opt(1, "LLaVE's negatives: cut each rank's share of a global batch into this many "
                                      "micro-batches; each micro-batch's loss sees only its own pairs across ranks "
                                      "(LLaVE: 8 ranks x 4 x 8 steps -> 32 pairs per loss) and the step's loss is "
                                      "their mean, as gradient accumulation gives. 1 (ours): every pair of the "
                                      "global batch is a negative for every query")
    mask_duplicates: bool = _opt(True, "mask in-batch candidates identical to the positive (same target text and "
                                       "image) as false negatives, both directions; LLaVE does not")
    group_by_modality: bool = _opt(False, "LLaVE's sampler: every global batch holds only image queries or only "
                                          "text-only queries (each modality's partial last batch is dropped)")
    steps: int = _opt(160, "optimizer steps (ignored when epochs is set)")
    epochs: float | None = _opt(None, "train for this many passes over the data (LLaVE: 1); sets steps = "
                                      "floor(epochs x full global batches per epoch)")
    lr: float = _opt(1e-3, "peak learning rate of the language model")
    lr_projector: float = _opt(1e-3, "peak learning rate of the projector and image_newline")
    lr_vision: float = _opt(1e-3, "peak learning rate of the vision tower; 0 freezes it (LLaVE)")
    weight_decay: float = _opt(0.01, "AdamW weight decay (LLaVE: 0)")
    warmup_steps: int = _opt(10, "linear warm-up steps (ignored when warmup_ratio is set)")
    warmup_ratio: float | None = _opt(None, "warm-up as a fraction of the steps, rounded up (LLaVE: 0.03)")
    min_lr_ratio: float = _opt(0.05, "cosine decay ends at this fraction of the peak (LLaVE: 0)")
    grad_clip: float = _opt(1.0, "gradient norm clipping")
    logit_scale: float = _opt(50.0, "the loss's inverse temperature (LLaVE: 50)")
    alpha: float = _opt(9.0, "hardness weight of the loss (LLaVE: 9)")
    loss_backend: str = _opt("auto", "fused loss backend: auto, triton, torch or reference")
    deepspeed_config: str = _opt("zero3.json", "DeepSpeed config (a shipped name or a path)")
    bf16: bool | None = _opt(None, "bf16 weights and compute; None: on CUDA yes, on CPU no")
    gradient_checkpointing: bool = _opt(False, "activation checkpointing of every vision and language layer")
    save_every: int = _opt(0, "checkpoint every N steps; 0: only at the end")
    keep_checkpoints: int = _opt(2, "complete checkpoints kept")
    seed: int = _opt(0, "data order and initialisation seed")
    eval_before: bool = _opt(True, "precision@1 before training too (synthetic data)")
    eval_batch: int = _opt(64, "samples per evaluation forward")
    tensorboard: bool = _opt(False, "write TensorBoard logs under the run folder")
    progress: bool = _opt(True, "progress bar")
    stop_after: int | None = _opt(None, "stop (as if killed) after this many steps of this run; tests")

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


def resolve_warmup(cfg: TrainConfig) -> int:
    """Warm-up steps: ``ceil(warmup_ratio x steps)`` when a ratio is given (as Hugging Face's
    Trainer rounds it), else ``warmup_steps``."""
    if cfg.warmup_ratio is None:
        return cfg.warmup_steps
    return math.ceil(cfg.warmup_ratio * cfg.steps)


def warmup_cosine(step: int, cfg: TrainConfig) -> float:
    """LR multiplier: linear warm-up over ``cfg.warmup_steps`` (resolved from warmup_ratio at
    the start of a run), then cosine down to min_lr_ratio."""
    if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
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


class BatchOrder:
    """The sample indices of every global step, a pure function of (seed, step).

    Plain: an epoch is a permutation of the data cut into global batches (the partial last one
    dropped). Grouped by modality (``query_has_image`` given, LLaVE's sampler): each
    modality's samples are permuted and cut into global batches of their own (each
    modality's partial last batch dropped), and the epoch's batches are shuffled, so every
    global batch holds only image queries or only text-only queries.
    """

    def __init__(self, n: int, global_batch: int, seed: int, query_has_image=None):
        self.n, self.global_batch, self.seed = int(n), int(global_batch), int(seed)
        self.groups = None
        if query_has_image is not None:
            import numpy as np

            has = np.asarray(query_has_image, dtype=bool)
            if has.shape != (self.n,):
                raise ValueError(f"query_has_image must have one flag per sample ({self.n}), got shape {has.shape}")
            self.groups = [torch.from_numpy(np.flatnonzero(has)), torch.from_numpy(np.flatnonzero(~has))]
            self.per_epoch = sum(len(g) // self.global_batch for g in self.groups)
        else:
            self.per_epoch = self.n // self.global_batch
        if self.per_epoch == 0:
            raise ValueError(
                f"the dataset has {self.n} samples"
                + ("" if self.groups is None else f" ({len(self.groups[0])} image queries, {len(self.groups[1])} "
                   f"text-only queries)")
                + f": fewer than one global batch of {self.global_batch}"
                + ("" if self.groups is None else " in either modality")
            )
        self._epoch, self._batches = None, None

    def _epoch_batches(self, epoch: int) -> list[torch.Tensor]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        batches = []
        for members in self.groups:
            order = members[torch.randperm(len(members), generator=g)]
            full = len(order) // self.global_batch
            batches += list(order[: full * self.global_batch].view(full, self.global_batch))
        return [batches[i] for i in torch.randperm(len(batches), generator=g).tolist()]

    def __call__(self, step: int) -> list[int]:
        if self.groups is None:
            return batch_indices(step, self.n, self.global_batch, self.seed)
        epoch, pos = divmod(step, self.per_epoch)
        if epoch != self._epoch:
            self._epoch, self._batches = epoch, self._epoch_batches(epoch)
        return self._batches[pos].tolist()


class MicroStepLoss(torch.nn.Module):
    """LLaVE's negatives: gradient accumulation where each micro-step's loss sees only its own pairs.

    The rank's share of a global batch is cut into ``steps`` consecutive micro-batches; the
    wrapped (cross-rank) loss is computed per micro-batch, so micro-batch i of every rank
    meets only micro-batch i of the others (LLaVE: 8 ranks x 4 pairs = 32 pairs per loss),
    and the mean over micro-steps is returned: the loss, hence the gradient, of gradient
    accumulation with 1/steps scaling. Hard negatives (one per pair) are cut alike; so are
    the duplicate-masking ids.
    """

    def __init__(self, loss_fn, steps: int):
        super().__init__()
        if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
            raise ValueError(f"accumulation_steps must be a positive int, got {steps!r}")
        self.loss_fn, self.steps = loss_fn, steps

    def forward(self, query, target, *, negatives=None, target_ids=None, query_ids=None):
        B = query.shape[0]
        if B % self.steps:
            raise ValueError(f"the rank's batch of {B} pairs does not split into accumulation_steps={self.steps}")
        if negatives is not None and negatives.shape[0] != B:
            raise ValueError(f"micro-step negatives need one hard negative per pair: {negatives.shape[0]} for {B}")
        m = B // self.steps
        losses = []
        for i in range(self.steps):
            sl = slice(i * m, (i + 1) * m)
            tid = None
            if target_ids is not None:
                tid = target_ids[:B][sl] if negatives is None else torch.cat([target_ids[:B][sl], target_ids[B:][sl]])
            losses.append(self.loss_fn(
                query[sl], target[sl],
                negatives=None if negatives is None else negatives[sl],
                target_ids=tid,
                query_ids=None if query_ids is None else query_ids[sl],
            ))
        return torch.stack(losses).mean()


def check_config(cfg: TrainConfig, world: int) -> None:
    """Refuse option values that cannot work, naming the option and what it got."""
    if not isinstance(cfg.accumulation_steps, int) or cfg.accumulation_steps < 1:
        raise ValueError(f"accumulation_steps must be a positive int, got {cfg.accumulation_steps!r}")
    if cfg.global_batch % world:
        raise ValueError(f"global_batch={cfg.global_batch} must be divisible by the number of ranks ({world})")
    per_rank = cfg.global_batch // world
    if per_rank % cfg.accumulation_steps:
        raise ValueError(
            f"global_batch={cfg.global_batch} over {world} ranks gives {per_rank} pairs per rank, not divisible into "
            f"accumulation_steps={cfg.accumulation_steps} micro-batches"
        )
    if cfg.epochs is not None and not cfg.epochs > 0:
        raise ValueError(f"epochs must be positive or None, got {cfg.epochs!r}")
    if cfg.warmup_ratio is not None and not 0 <= cfg.warmup_ratio < 1:
        raise ValueError(f"warmup_ratio must be in [0, 1) or None, got {cfg.warmup_ratio!r}")
    if cfg.max_length is not None and (not isinstance(cfg.max_length, int) or cfg.max_length < 1):
        raise ValueError(f"max_length must be a positive int or None, got {cfg.max_length!r}")
    if cfg.max_rows_per_subset is not None and cfg.max_rows_per_subset < 1:
        raise ValueError(f"max_rows_per_subset must be a positive int or None, got {cfg.max_rows_per_subset!r}")
    if not 0 <= cfg.min_lr_ratio <= 1:
        raise ValueError(f"min_lr_ratio must be in [0, 1], got {cfg.min_lr_ratio!r}")


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
    if cfg.image_grid is not None:
        model.set_image_grid(cfg.image_grid)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    model.processor.max_text_tokens = cfg.max_text_tokens
    if cfg.max_length is not None:
        model.processor.max_length = cfg.max_length
    return model


def _datasets(cfg: TrainConfig):
    from .data import MMEBDataset, SyntheticDataset

    if cfg.data == "synthetic":
        train = SyntheticDataset(cfg.num_train, seed=cfg.seed, split="train", image_size=cfg.image_size)
        evals = SyntheticDataset(cfg.num_eval, seed=cfg.seed, split="eval", image_size=cfg.image_size)
        return train, evals
    paths = cfg.data.split(",")
    train = MMEBDataset(paths, cfg.image_dir, subsets=cfg.subsets, use_negatives=cfg.use_negatives,
                        skip_bad_rows=cfg.skip_bad_rows, split=cfg.mmeb_split,
                        max_rows_per_subset=cfg.max_rows_per_subset)
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
    check_config(cfg, world)
    ds_config = deepspeed_config(cfg, world, bf16)
    if rank == 0:
        os.makedirs(out, exist_ok=True)
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
    order = BatchOrder(len(train_set), cfg.global_batch, cfg.seed,
                       train_set.query_has_image() if cfg.group_by_modality else None)
    if cfg.epochs is not None:
        cfg.steps = max(1, int(cfg.epochs * order.per_epoch))
        _log(rank, f"epochs={cfg.epochs}: {order.per_epoch} global batches of {cfg.global_batch} per epoch -> "
                   f"{cfg.steps} steps")
    if cfg.warmup_ratio is not None:
        cfg.warmup_steps = resolve_warmup(cfg)
        _log(rank, f"warmup_ratio={cfg.warmup_ratio}: {cfg.warmup_steps} warm-up steps of {cfg.steps}")
    if rank == 0:  # the options as run (steps and warm-up resolved)
        with open(os.path.join(out, "train_config.json"), "w") as f:
            json.dump(dataclasses.asdict(cfg), f, indent=2)
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
    if cfg.accumulation_steps > 1:
        loss_fn = MicroStepLoss(loss_fn, cfg.accumulation_steps)
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
        idx = order(step)
        records = [train_set[i] for i in idx[rank * b_local : (rank + 1) * b_local]]
        batch = _to_device(collator(records), engine.device)
        target_ids = batch["target_ids"]
        if batch.get("negatives") is not None and batch.get("negative_ids") is not None:
            target_ids = torch.cat([target_ids, batch["negative_ids"]])
        # duplicate targets (MMEB classification / VQA answers) are false negatives in both
        # directions: q->t masks candidate targets with the positive's id, and t->q masks
        # candidate queries whose own target carries that id (so the queries are labelled
        # with their targets' ids)
        ids = dict(target_ids=target_ids, query_ids=batch["target_ids"]) if cfg.mask_duplicates else {}
        local_loss = gc(batch["query"], batch["target"], batch.get("negatives"), **ids)
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
