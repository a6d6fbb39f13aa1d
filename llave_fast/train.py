"""The LLaVE training loop: DeepSpeed ZeRO-3, GradCache, the fused loss across ranks.

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
from .evaluate import encode_all, retrieval_eval  # noqa: F401  (encode_all: re-exported)
from .gradcache import GradCache
from .loss import FusedHardnessLoss
from .errors import InvalidArgument, InvalidArgumentType, LlaveFastError

log = logging.getLogger("llave_fast.train")

def _config_dir() -> str:
    """The shipped presets: ``llave_fast/configs`` (in the source tree a link to the top-level
    ``configs/`` folder; in the wheel a copy of its JSON files)."""
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")


CONFIG_DIR = _config_dir()


def _opt(default, help: str):
    return field(default=default, metadata={"help": help})


@dataclass
class TrainConfig:
    """Every knob of a run. Defaults are the embedded CPU demo (tiny model, synthetic data).
    Each field is also a ``llave-fast train`` flag; its help is the metadata below."""

    output_dir: str | None = _opt(None, "run folder (checkpoints, logs, eval.json); default runs/<date-time>")
    model: str = _opt("tiny", "'tiny' (built from scratch), 'arch:llave-0.5b' (LLaVE-0.5B's real-size architecture "
                              "with random weights and a stand-in tokenizer: speed and memory, nothing downloaded) or "
                              "a checkpoint folder / hub id (llava_qwen, LLaVA-OneVision 'llava' or transformers format)")
    data: str = _opt("synthetic", "'synthetic' or MMEB-train files / folders (comma-separated) or a hub dataset name")
    image_dir: str | None = _opt(None, "folder MMEB image paths are relative to")
    allow_outside_image_dir: bool = _opt(False, "read MMEB image paths that lead outside the image folder (absolute "
                                                "paths elsewhere, '..', symbolic links out of it); off, such a row "
                                                "is bad data (--skip-bad-rows decides)")
    subsets: list[str] | None = _opt(None, "MMEB subsets to train on (comma-separated); default all found")
    mmeb_split: str | None = _opt(None, "MMEB shard split to read: 'original' (LLaVE) or 'diverse_instruction'; "
                                        "None: every local file (hub: original)")
    max_rows_per_subset: int | None = _opt(None, "keep the first N rows of each MMEB subset (LLaVE: 50000, "
                                                 "about 662K pairs over its 20 subsets)")
    use_negatives: bool = _opt(False, "also encode MMEB's hard negatives (neg_text/neg_image_path)")
    skip_bad_rows: bool = _opt(False, "skip and log unusable data rows instead of stopping")
    bad_images: str | None = _opt(None, "a missing or unreadable MMEB image: 'skip' (its row is left out, or, found "
                                        "during training, replaced by the next good row; logged and counted in the "
                                        "summary) or 'fail' (stop, after checkpointing the steps done); None: as "
                                        "--skip-bad-rows")
    check_images: bool = _opt(False, "decode every MMEB image before the model is built (progress bar); bad ones "
                                     "follow --bad-images")
    max_image_pixels: int = _opt(40_000_000, "an MMEB image with more pixels than this (width x height, read from "
                                             "its header before decoding) is a bad image (--bad-images decides); "
                                             "0: no limit of ours (Pillow's own still applies)")
    num_workers: int = _opt(2, "data-loading processes per rank: they read and decode images and run the "
                               "processor for the next steps while the model works; 0: in the training process")
    prefetch_batches: int = _opt(2, "steps' batches each data-loading process prepares ahead")
    resume: bool | None = _opt(None, "None (auto): resume when the run folder holds a complete checkpoint; true: "
                                     "must resume; false: refuse a run folder that holds checkpoints. A resumed "
                                     "run refuses options that would change it (lr, data, ...) and records the "
                                     "harmless ones (save_every, chunk_size, ...) in train_config.json's _history")
    num_train: int = _opt(6144, "synthetic train samples")
    num_eval: int = _opt(256, "held-out synthetic samples (queries and targets); 0 skips the held-out evaluation")
    synthetic_background: str = field(default="plain", metadata={"choices": ("plain", "varied"), "help": (
        "synthetic images' background: 'plain' (one grey) or 'varied' (a grey level per image, 100..156: a nuisance "
        "that makes the default job's tiny model learn to ignore the images; see the README)")})
    image_size: int = _opt(64, "synthetic image side and the tiny model's tile size, px")
    hard_family_size: int = _opt(1, "synthetic data: items come in families of this many scenes that differ in "
                                    "exactly one attribute of one object (hard negatives of each other), train and "
                                    "eval splits alike, and each global batch holds whole families; 1: independent "
                                    "scenes. At most 8; global_batch / ranks / accumulation_steps must be a "
                                    "multiple of it")
    vqa_questions_per_scene: int = _opt(1, "synthetic train data: VQA items come in groups of this many questions "
                                           "with different answers about one scene (the eval split keeps one "
                                           "question per scene), and each global batch holds whole groups, so the "
                                           "model must read the question; 1: one question per scene. At most 4; no "
                                           "effect with hard_family_size > 1; the loss batch must be a multiple of it")
    synthetic_tasks: list[str] | None = _opt(None, "task styles of the synthetic train split (i2t, t2i, vqa; "
                                                   "comma-separated), assigned round-robin, so a task listed twice "
                                                   "gets twice the items; the eval split keeps all three equally; "
                                                   "None: i2t,t2i,vqa")
    image_grid: str | None = _opt(None, "override the model's anyres grid: '(1x1),...,(2x2)' (tile counts, "
                                        "width x height, LLaVE's form) or a list of [width, height] px pairs; "
                                        "None keeps the checkpoint's (LLaVA-OneVision's own: 6x6)")
    max_length: int | None = _opt(None, "LLaVE's rule: cut each whole sequence, image tokens inserted, to this many "
                                        "tokens (LLaVE: 4096); None keeps the checkpoint's tokenizer_model_max_length "
                                        "(none for transformers-format folders)")
    max_text_tokens: int | None = _opt(None, "ours: cut each query/target's own text to this many tokens (the "
                                             "template and image tokens are never cut)")
    global_batch: int = _opt(64, "pairs per optimizer step over all ranks")
    chunk_size: int = _opt(32, "GradCache chunk: samples per forward with gradients (activation memory); when a "
                               "rank's whole step (queries + targets + negatives) fits in one chunk, GradCache "
                               "encodes once (its single pass: one forward fewer per step)")
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
    grad_clip: float = _opt(1.0, "largest global gradient norm (L2 over every parameter): a larger one is scaled down to it "
                                 "each step")
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
    stop_after: int | None = field(default=None, metadata={
        "help": "stop (as if killed) after this many steps of this run; tests", "hidden": True})

    @classmethod
    def from_json(cls, path: str) -> "TrainConfig":
        with open(_config_path(path)) as f:
            raw = json.load(f)
        for key in [k for k in raw if k.startswith("_")]:  # _comment; a run's _history and _data
            raw.pop(key)
        unknown = set(raw) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise InvalidArgument(f"{path}: unknown training options {sorted(unknown)}")
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
    elif int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1"))) > 1:
        # several CPU ranks on this machine: DeepSpeed's CPU communication op is built once,
        # ranks taking turns under a file lock, instead of every rank JIT-building it at once
        # into one folder on a cold machine (see llave_fast.testing)
        from .testing import warm_deepspeed_ops

        _log(int(os.environ.get("RANK", "0")), "DeepSpeed CPU op: " + warm_deepspeed_ops())
    quiet_deepspeed_op_probe()
    deepspeed.init_distributed(dist_backend=backend)
    return dist.get_rank(), dist.get_world_size()


def quiet_deepspeed_op_probe() -> None:
    """Run DeepSpeed's probe of which ops can build (``deepspeed.ops.__compatible_ops__``, first
    needed by ``init_distributed``) with file descriptor 2 pointed at a scratch file.

    The probe compiles and links small test programs; async_io's links ``-laio``, which fails on a
    machine without libaio. DeepSpeed silences the compiler by redirecting ``sys.stderr``'s file
    descriptor, which is not fd 2 when ``sys.stderr`` is redirected (``llave-fast ablate`` writes
    each run's output to its log): the linker's ``cannot find -laio`` then reached the terminal.
    The probe runs once a process; its result is kept by DeepSpeed, so later uses are silent."""
    import sys
    import tempfile

    ops = sys.modules.get("deepspeed.ops")
    if ops is not None and "__compatible_ops__" in vars(ops):  # probed already in this process
        return
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with tempfile.TemporaryFile() as sink:
            os.dup2(sink.fileno(), 2)
            try:
                import deepspeed.ops  # older DeepSpeed probes at this import, newer on the first use below

                getattr(deepspeed.ops, "__compatible_ops__", None)
            finally:
                os.dup2(saved, 2)
    finally:
        os.close(saved)


def deepspeed_config(cfg: TrainConfig, world: int, bf16: bool) -> dict:
    with open(_config_path(cfg.deepspeed_config)) as f:
        ds = json.load(f)
    if cfg.global_batch % world:
        raise InvalidArgument(f"global_batch={cfg.global_batch} must be divisible by the number of ranks ({world})")
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
        raise InvalidArgument(f"the dataset has {n} samples, fewer than one global batch of {global_batch}")
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

    With ``family_size=k > 1`` (opt-in; the synthetic data's ``hard_family_size``) the units
    shuffled are families, blocks of ``k`` consecutive indices (``i // k``), kept whole and in
    order; an incomplete last family is placed last. With ``global_batch`` a multiple of
    ``k``, every batch holds whole families. Grouped by modality, a family's group is its
    first member's (synthetic families share their task).
    """

    def __init__(self, n: int, global_batch: int, seed: int, query_has_image=None, family_size: int = 1):
        self.n, self.global_batch, self.seed = int(n), int(global_batch), int(seed)
        if not isinstance(family_size, int) or isinstance(family_size, bool) or family_size < 1:
            raise InvalidArgument(f"family_size must be a positive int, got {family_size!r}")
        self.family_size = family_size
        self.groups = None
        if query_has_image is not None:
            import numpy as np

            has = np.asarray(query_has_image, dtype=bool)
            if has.shape != (self.n,):
                raise InvalidArgument(f"query_has_image must have one flag per sample ({self.n}), got shape {has.shape}")
            if family_size > 1:  # a family goes where its first member goes
                has = has[np.arange(self.n) - np.arange(self.n) % family_size]
            self.groups = [torch.from_numpy(np.flatnonzero(has)), torch.from_numpy(np.flatnonzero(~has))]
            self.per_epoch = sum(len(g) // self.global_batch for g in self.groups)
        else:
            self.per_epoch = self.n // self.global_batch
        if self.per_epoch == 0:
            raise InvalidArgument(
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
        for members in self.groups if self.groups is not None else [torch.arange(self.n)]:
            order = self._shuffle(members, g)
            full = len(order) // self.global_batch
            batches += list(order[: full * self.global_batch].view(full, self.global_batch))
        return [batches[i] for i in torch.randperm(len(batches), generator=g).tolist()]

    def _shuffle(self, members: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        """``members`` in a random order: items, or (family_size > 1) whole families."""
        k = self.family_size
        if k == 1 or len(members) == 0:
            return members[torch.randperm(len(members), generator=g)]
        fam = members // k
        ids, counts = torch.unique(fam, return_counts=True)
        full = ids[counts == k]
        rank = torch.full((int(ids.max()) + 1,), len(full), dtype=torch.int64)  # incomplete families: last
        rank[full[torch.randperm(len(full), generator=g)]] = torch.arange(len(full))
        return members[torch.argsort(rank[fam] * k + members % k)]

    def __call__(self, step: int) -> list[int]:
        if self.groups is None and self.family_size == 1:
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
            raise InvalidArgument(f"accumulation_steps must be a positive int, got {steps!r}")
        self.loss_fn, self.steps = loss_fn, steps

    def forward(self, query, target, *, negatives=None, target_ids=None, query_ids=None):
        B = query.shape[0]
        if B % self.steps:
            raise InvalidArgument(f"the rank's batch of {B} pairs does not split into accumulation_steps={self.steps}")
        if negatives is not None and negatives.shape[0] != B:
            raise InvalidArgument(f"micro-step negatives need one hard negative per pair: {negatives.shape[0]} for {B}")
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


# options that describe the synthetic data: a preset's values do not apply to real data (the CLI drops
# them with a note when --data names files; given as flags, check_config refuses them)
SYNTHETIC_ONLY = ("synthetic_tasks", "synthetic_background", "hard_family_size", "vqa_questions_per_scene")


def synthetic_only_options(cfg: TrainConfig) -> dict:
    """{option: (value, default)} for each synthetic-only option set away from its default."""
    out = {}
    for name in SYNTHETIC_ONLY:
        value, default = getattr(cfg, name), TrainConfig.__dataclass_fields__[name].default
        if value != default:
            out[name] = (value, default)
    return out


def check_config(cfg: TrainConfig, world: int) -> None:
    """Refuse option values that cannot work, naming the option and what it got (before any
    data is read or any model built)."""
    if not isinstance(cfg.accumulation_steps, int) or cfg.accumulation_steps < 1:
        raise InvalidArgument(f"accumulation_steps must be a positive int, got {cfg.accumulation_steps!r}")
    for name in ("global_batch", "chunk_size", "eval_batch", "keep_checkpoints", "prefetch_batches"):
        v = getattr(cfg, name)
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise InvalidArgument(f"{name} must be a positive int, got {v!r}")
    for name in ("save_every", "warmup_steps", "num_workers", "num_eval", "max_image_pixels"):
        v = getattr(cfg, name)
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            raise InvalidArgument(f"{name} must be an int >= 0, got {v!r}")
    if cfg.epochs is None and (not isinstance(cfg.steps, int) or cfg.steps < 1):
        raise InvalidArgument(f"steps must be a positive int (or set epochs), got {cfg.steps!r}")
    if cfg.stop_after is not None and cfg.stop_after < 1:
        raise InvalidArgument(f"stop_after must be a positive int or None, got {cfg.stop_after!r}")
    for name in ("lr", "lr_projector", "lr_vision", "weight_decay"):
        v = getattr(cfg, name)
        if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0):
            raise InvalidArgument(f"{name} must be a finite number >= 0, got {v!r}")
    for name in ("grad_clip", "logit_scale"):
        v = getattr(cfg, name)
        if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
            raise InvalidArgument(f"{name} must be a finite number > 0, got {v!r}")
    if cfg.bad_images not in (None, "skip", "fail"):
        raise InvalidArgument(f"bad_images must be 'skip', 'fail' or None (follow --skip-bad-rows), got {cfg.bad_images!r}")
    if cfg.resume not in (None, True, False):
        raise InvalidArgument(f"resume must be true, false or None (auto), got {cfg.resume!r}")
    from ._checks import BACKENDS

    if cfg.loss_backend not in BACKENDS:
        raise InvalidArgument(f"loss_backend must be one of {list(BACKENDS)}, got {cfg.loss_backend!r}")
    if isinstance(cfg.model, str) and cfg.model.startswith("arch:"):
        from .model.arch import ARCHITECTURES

        if cfg.model[len("arch:"):] not in ARCHITECTURES:
            raise InvalidArgument(f"model={cfg.model!r}: unknown architecture; known are "
                             f"{['arch:' + k for k in sorted(ARCHITECTURES)]}")
    if cfg.data != "synthetic" and cfg.image_dir is not None and not os.path.isdir(cfg.image_dir):
        raise InvalidArgument(f"image_dir={cfg.image_dir!r} is not a folder")
    if cfg.global_batch % world:
        raise InvalidArgument(f"global_batch={cfg.global_batch} must be divisible by the number of ranks ({world})")
    per_rank = cfg.global_batch // world
    if per_rank % cfg.accumulation_steps:
        raise InvalidArgument(
            f"global_batch={cfg.global_batch} over {world} ranks gives {per_rank} pairs per rank, not divisible into "
            f"accumulation_steps={cfg.accumulation_steps} micro-batches"
        )
    k = cfg.hard_family_size
    if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= 8:
        raise InvalidArgument(f"hard_family_size must be an int in 1..8, got {k!r}")
    q = cfg.vqa_questions_per_scene
    if not isinstance(q, int) or isinstance(q, bool) or not 1 <= q <= 4:
        raise InvalidArgument(f"vqa_questions_per_scene must be an int in 1..4, got {q!r}")
    if cfg.data != "synthetic":
        for name, (value, default) in synthetic_only_options(cfg).items():
            raise InvalidArgument(f"{name}={value!r} applies to the synthetic data only, got data={cfg.data!r}: leave it "
                             f"at its default ({default!r}; on the command line, drop --{name.replace('_', '-')})")
    if (per_rank // cfg.accumulation_steps) % k:
        raise InvalidArgument(
            f"hard_family_size={k} does not divide the loss batch: global_batch={cfg.global_batch} over {world} "
            f"ranks and accumulation_steps={cfg.accumulation_steps} gives {per_rank // cfg.accumulation_steps} "
            "pairs per loss; families would straddle batches")
    if k == 1 and (per_rank // cfg.accumulation_steps) % q:
        raise InvalidArgument(
            f"vqa_questions_per_scene={q} does not divide the loss batch: global_batch={cfg.global_batch} over "
            f"{world} ranks and accumulation_steps={cfg.accumulation_steps} gives "
            f"{per_rank // cfg.accumulation_steps} pairs per loss; question groups would straddle batches")
    if cfg.synthetic_tasks is not None:
        bad = [t for t in cfg.synthetic_tasks if t not in ("i2t", "t2i", "vqa")]
        if not cfg.synthetic_tasks or bad:
            raise InvalidArgument(f"synthetic_tasks must list tasks among i2t, t2i, vqa, got {cfg.synthetic_tasks!r}")
    if cfg.epochs is not None and not cfg.epochs > 0:
        raise InvalidArgument(f"epochs must be positive or None, got {cfg.epochs!r}")
    if cfg.warmup_ratio is not None and not 0 <= cfg.warmup_ratio < 1:
        raise InvalidArgument(f"warmup_ratio must be in [0, 1) or None, got {cfg.warmup_ratio!r}")
    if cfg.epochs is None and cfg.warmup_ratio is None and cfg.warmup_steps >= cfg.steps:
        raise InvalidArgument(f"warmup_steps={cfg.warmup_steps} is not shorter than the run (steps={cfg.steps}): the "
                         "learning rate would never reach its peak and the cosine decay would never start")
    if cfg.max_length is not None and (not isinstance(cfg.max_length, int) or cfg.max_length < 1):
        raise InvalidArgument(f"max_length must be a positive int or None, got {cfg.max_length!r}")
    if cfg.max_rows_per_subset is not None and cfg.max_rows_per_subset < 1:
        raise InvalidArgument(f"max_rows_per_subset must be a positive int or None, got {cfg.max_rows_per_subset!r}")
    if not 0 <= cfg.min_lr_ratio <= 1:
        raise InvalidArgument(f"min_lr_ratio must be in [0, 1], got {cfg.min_lr_ratio!r}")


def check_data_fit(cfg: TrainConfig, rows: int, query_has_image=None) -> "BatchOrder":
    """The batch order of the run, or an error naming the option when the data cannot fill it:
    a global batch larger than the data (or than each modality, grouped)."""
    where = "the synthetic training set (--num-train)" if cfg.data == "synthetic" else f"--data {cfg.data}"
    if cfg.global_batch > rows:
        raise InvalidArgument(f"global_batch={cfg.global_batch} is larger than the training data: {rows} usable rows in "
                         f"{where}; lower --global-batch or add data")
    try:
        return BatchOrder(rows, cfg.global_batch, cfg.seed, query_has_image,
                          family_size=_family_size(cfg))
    except ValueError as exc:
        raise InvalidArgument(f"global_batch={cfg.global_batch}, group_by_modality={cfg.group_by_modality}: {exc} "
                         f"({where})") from exc


def _family_size(cfg: TrainConfig) -> int:
    """Consecutive items a batch keeps together: hard families, else VQA question groups (synthetic data)."""
    if cfg.data != "synthetic":
        return 1
    return cfg.hard_family_size if cfg.hard_family_size > 1 else cfg.vqa_questions_per_scene


def resolve_length(cfg: TrainConfig, order: "BatchOrder", rank: int = 0) -> None:
    """Steps from epochs and warm-up from warmup_ratio, in place; refuses a warm-up that is not
    shorter than the run."""
    if cfg.epochs is not None:
        cfg.steps = max(1, int(cfg.epochs * order.per_epoch))
        _log(rank, f"epochs={cfg.epochs}: {order.per_epoch} global batches of {cfg.global_batch} per epoch -> "
                   f"{cfg.steps} steps")
    if cfg.warmup_ratio is not None:
        cfg.warmup_steps = resolve_warmup(cfg)
        _log(rank, f"warmup_ratio={cfg.warmup_ratio}: {cfg.warmup_steps} warm-up steps of {cfg.steps}")
    if cfg.warmup_steps >= cfg.steps and not (cfg.warmup_steps == 0):
        given = (f"warmup_ratio={cfg.warmup_ratio} gives {cfg.warmup_steps} warm-up steps"
                 if cfg.warmup_ratio is not None else f"warmup_steps={cfg.warmup_steps}")
        length = f"epochs={cfg.epochs} gives steps={cfg.steps}" if cfg.epochs is not None else f"steps={cfg.steps}"
        raise InvalidArgument(f"{given}: not shorter than the run ({length}); the learning rate would never reach its "
                         "peak and the cosine decay would never start")


# -- resuming ------------------------------------------------------------------------------

# Options a resumed run may change: they decide how it is run or logged, not what it computes
# (GradCache's chunking, checkpointing and the loss backend change memory and speed; the
# gradients agree to rounding). Changes are applied and recorded in train_config.json's
# "_history". Every other option (model, data, batch, seed, learning rates, schedule, steps,
# loss, precision, ...) is fixed at the start: a resumed run refuses a new value.
RESUME_MAY_CHANGE = frozenset({
    "save_every", "keep_checkpoints", "eval_before", "eval_batch", "tensorboard", "progress", "stop_after",
    "chunk_size", "gradient_checkpointing", "loss_backend", "num_workers", "prefetch_batches", "bad_images",
    "check_images", "skip_bad_rows", "max_image_pixels",
})
RESUME_NOT_COMPARED = frozenset({"output_dir", "resume"})


def _may_change_flags() -> str:
    """The options a resumed run may change, as the flags a user types (test-only fields left out)."""
    hidden = {f.name for f in dataclasses.fields(TrainConfig) if f.metadata.get("hidden")}
    return ", ".join("--" + n.replace("_", "-") for n in sorted(RESUME_MAY_CHANGE - hidden))


class ResumeRefused(InvalidArgument):
    """A run folder cannot be resumed (or started) with the options given."""


def _jsonable(v):
    return json.loads(json.dumps(v))


def resume_changes(saved: dict, cfg: TrainConfig) -> tuple[dict, dict]:
    """``(refused, applied)``: ``{option: (the run's value, the new value)}`` for every option of
    ``cfg`` (steps and warm-up resolved) that differs from the run's saved config."""
    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    refused, applied = {}, {}
    for name, new in dataclasses.asdict(cfg).items():
        if name in RESUME_NOT_COMPARED:
            continue
        old = saved.get(name, defaults[name])  # an option newer than the run: it ran with the default
        new = _jsonable(new)
        if old == new:
            continue
        (applied if name in RESUME_MAY_CHANGE else refused)[name] = (old, new)
    return refused, applied


def plan_resume(cfg: TrainConfig, train_rows: int) -> tuple[str | None, list]:
    """Decide between a fresh start and a resume of ``cfg.output_dir``, before the model is built.

    Returns ``(tag, history)``: the complete checkpoint to resume from (None: fresh start) and
    the run's ``_history`` with this start appended. Raises ``ResumeRefused`` naming each
    option that would change a resumed run (with both values), or when ``cfg.resume`` cannot
    be honoured.
    """
    out = cfg.output_dir
    root = os.path.join(out, "checkpoints")
    tag = ckpt.latest_complete(root)
    if tag is None:
        if cfg.resume is True:
            raise ResumeRefused(f"resume=true but {root} holds no complete checkpoint to resume from")
        return None, [{"started": time.strftime("%Y-%m-%dT%H:%M:%S"), "at_step": 0}]
    if cfg.resume is False:
        raise ResumeRefused(
            f"resume=false but the run folder {out} holds checkpoints (newest complete: {tag}); pick a new "
            f"--output-dir, or remove {root} to start over there")
    path = os.path.join(out, "train_config.json")
    saved = {}
    if os.path.exists(path):
        with open(path) as f:
            saved = json.load(f)
    step = int(tag.split("-")[1])
    refused, applied = resume_changes(saved, cfg) if saved else ({}, {})
    if refused:
        lines = "\n".join(f"  {k}: {old!r} in the run, {new!r} now" for k, (old, new) in sorted(refused.items()))
        raise ResumeRefused(
            f"{out} holds a run (complete checkpoint {tag}) made with other values of options that cannot change "
            f"mid-run:\n{lines}\nRun it again without them to resume it as it was, or give a new --output-dir to "
            f"start a new run with them. Options a resumed run may change: {_may_change_flags()}.")
    rows_then = saved.get("_data", {}).get("train_rows")
    if rows_then is not None and rows_then != train_rows:
        raise ResumeRefused(
            f"{out} was trained on {rows_then} usable rows of --data {cfg.data}; {train_rows} now (the data, "
            "--skip-bad-rows, --bad-images or --check-images changed which rows are usable): the data order of the "
            "resumed run would differ. Restore the data or start a new run (--output-dir)")
    history = list(saved.get("_history", []))
    history.append({"resumed": time.strftime("%Y-%m-%dT%H:%M:%S"), "at_step": step,
                    "changed": {k: [old, new] for k, (old, new) in sorted(applied.items())}})
    return tag, history


def write_run_config(cfg: TrainConfig, history: list, data: dict) -> None:
    """train_config.json: the options as run (steps and warm-up resolved), every start and resume
    with the options it changed (``_history``), and what the data held (``_data``)."""
    raw = dataclasses.asdict(cfg)
    raw["_history"] = history
    raw["_data"] = data
    path = os.path.join(cfg.output_dir, "train_config.json")
    ckpt._atomic_write(path, json.dumps(raw, indent=2))


# -- the run -------------------------------------------------------------------------------


_HF_DS_CONFIG = None  # transformers reads the ZeRO-3 config through this object while it lives


def tiny_model_kwargs(cfg: TrainConfig) -> dict:
    """The tiny model's shape for a run: one tile of the run's image size in 4 x 4 patches."""
    return dict(image_size=cfg.image_size, patch_size=max(4, cfg.image_size // 4), max_grid=1)


def build_model(cfg: TrainConfig, ds_config: dict, bf16: bool):
    """The tiny demo model from scratch, or a checkpoint (partitioned at load under ZeRO-3)."""
    global _HF_DS_CONFIG
    from .model import LLaVEEmbedder, build_tiny_model

    dtype = torch.bfloat16 if bf16 else torch.float32
    if ds_config.get("zero_optimization", {}).get("stage") == 3:
        from transformers.integrations import HfDeepSpeedConfig

        _HF_DS_CONFIG = HfDeepSpeedConfig(ds_config)
    if cfg.model == "tiny":
        model = build_tiny_model(cfg.seed, torch_dtype=dtype, **tiny_model_kwargs(cfg))
    elif cfg.model.startswith("arch:"):  # a real-size architecture, random weights (llave_fast.model.arch)
        from .model.arch import build_arch_model

        model = build_arch_model(cfg.model, cfg.seed, torch_dtype=dtype)
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


def _datasets(cfg: TrainConfig, progress: bool = False):
    from .data import MMEBDataset, SyntheticDataset

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
                        allow_outside_image_dir=cfg.allow_outside_image_dir)
    return train, None


def default_output_dir() -> str:
    return os.path.join("runs", time.strftime("%Y%m%d-%H%M%S"))


# -- data loading --------------------------------------------------------------------------


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
        from .data import BadDataError

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
    )


# -- stops and the summary -----------------------------------------------------------------


class RunStopped(LlaveFastError, RuntimeError, ValueError):
    """The run stopped before its last step (a non-finite loss, bad data); ``step`` is the step
    that failed (1-based), ``checkpoint`` the newest complete checkpoint (None if none). Also a
    ValueError: the command reports it as a problem of the run's options or data, not a bug."""

    def __init__(self, msg: str, step: int, checkpoint: str | None):
        super().__init__(msg)
        self.step, self.checkpoint = step, checkpoint


def _last_checkpoint(root: str) -> str | None:
    tag = ckpt.latest_complete(root)
    return None if tag is None else os.path.abspath(os.path.join(root, tag))  # absolute, as run_dir and eval_json


def _non_finite_message(step: int, stats: torch.Tensor, directions: list, lr: float, root: str) -> str:
    """stats: (world, 5) float64: loss, then non-finite query / target / negative embedding
    values, and the embeddings' element count, per rank; directions: each rank's two
    directions over its own pairs (``_LossProbe.directions``)."""
    parts = []
    for r, (loss, nq, nt, nn, numel) in enumerate(stats.tolist()):
        emb = f"non-finite embedding values: query {int(nq)}, target {int(nt)}"
        emb += f", negatives {int(nn)}" if nn else ""
        dirs = ", ".join(f"{k} {v}" for k, v in directions[r].items())
        parts.append(f"  rank {r}: loss {loss} ({emb}, of {int(numel)} per side); over its own pairs: {dirs}")
    last = _last_checkpoint(root)
    where = (f"the last complete checkpoint is {last}: a rerun with the same options resumes from it and meets "
             "the same batch; a lower --lr or --grad-clip is a new run (--output-dir), as resuming refuses them"
             if last else "no complete checkpoint was saved yet (--save-every N saves every N steps)")
    return (f"non-finite loss at step {step} (learning rate {lr:.3g}); the step was not applied. The loss's parts "
            f"(each rank's loss over its queries against the whole batch):\n" + "\n".join(parts) + f"\n{where}")


def _gather_objects(obj, world: int) -> list:
    if world == 1:
        return [obj]
    out = [None] * world
    dist.all_gather_object(out, obj)
    return out


def _median(xs):
    xs = sorted(xs)
    if not xs:
        return None
    m = len(xs) // 2
    return xs[m] if len(xs) % 2 else 0.5 * (xs[m - 1] + xs[m])


# DeepSpeed's ZeRO-3 calls these every step; torch warns on each call, and each warning cuts
# the progress bar. Other warnings still show (written above the bar).
KNOWN_WARNINGS = (
    (FutureWarning, r"`torch\.distributed\.all_gather_into_tensor` is deprecated"),
    (FutureWarning, r"`torch\.distributed\.reduce_scatter_tensor` is deprecated"),
    (FutureWarning, r"`torch\.distributed\._all_gather_base` is a private function"),
    (FutureWarning, r"`torch\.distributed\._reduce_scatter_base` is a private function"),
)


def quiet_known_warnings() -> None:
    """Ignore the known repeated deprecation warnings of DeepSpeed's collectives (once, globally)."""
    import warnings

    for category, pattern in KNOWN_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern, category=category)


def progress_line(loss: float, step_s: float, pairs_per_s: float, data_wait_s: float) -> str:
    """The progress bar's postfix: every number with its unit."""
    return (f"loss {loss:.4f} | {step_s:.2f} s/step | {pairs_per_s:.0f} pairs/s | "
            f"data wait {data_wait_s * 1000:.0f} ms")


def train(cfg: TrainConfig) -> dict:
    """Run (or resume) training; returns the final metrics (also written to eval.json).

    A start that fails before its first step (a bad --model, an option DeepSpeed refuses, an
    interrupt) leaves no half-made run folder behind: what it wrote is removed (see
    :func:`_forget_failed_start`)."""
    out = cfg.output_dir
    # what was there before this start: only what the start itself made is ever removed
    existed = set() if out is None else {name for name in ("", *_START_FILES) if os.path.exists(os.path.join(out, name))}
    try:
        return _train(cfg)
    except RunFolderInUse:
        raise  # the folder is another run's: nothing of it is touched
    except BaseException:
        _release_run_folder()
        try:
            _forget_failed_start(cfg.output_dir, existed)
        except OSError as exc:  # never hide the error that stopped the run
            log.warning("could not clean up after the failed start in %s: %s", cfg.output_dir, exc)
        raise
    finally:
        _release_run_folder()


LOCK_FILE = ".llave_fast.lock"
# what a start writes before its first step
_START_FILES = ("train_config.json", "base", "train_log.jsonl", LOCK_FILE)
_HELD: list = []  # the open lock file of the run folder this process holds (rank 0)


class RunFolderInUse(InvalidArgument):
    """Another run (a live process) holds the run folder."""


def hold_run_folder(out: str, rank: int, world: int) -> None:
    """One run per folder: rank 0 takes an advisory lock (``flock``) on ``out/.llave_fast.lock`` for
    the run's life and writes who holds it there; every rank learns the outcome, and when another
    live process holds the folder all of them raise :class:`RunFolderInUse` naming it, before
    anything is read or written there. The kernel drops the lock when its holder dies, so a lock
    left by a killed run is free: taken over, with a note naming the run that left it."""
    message = note = None
    if rank == 0:
        message, note = _take_run_folder(out)
    if world > 1:
        box = [(message, note)]
        dist.broadcast_object_list(box, src=0)
        message, note = box[0]
    if note:
        _log(rank, note)
    if message:
        raise RunFolderInUse(message)


def _take_run_folder(out: str) -> tuple[str | None, str | None]:
    """(refusal message or None, note or None); on success the lock stays held in ``_HELD``."""
    try:
        import fcntl
    except ImportError:  # not POSIX
        return None, f"note: no file locks on this system; nothing stops a second run in {out}"
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, LOCK_FILE)
    f = open(path, "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.seek(0)
        holder = f.read().strip() or "a run that has not written its name yet"
        f.close()
        return (f"the run folder {out} is in use by another run ({holder}; lock file {path}): two runs in one "
                "folder would mix their checkpoints, logs and train_config.json. Give this run another "
                "--output-dir, or wait for that run to end"), None
    f.seek(0)
    previous = f.read().strip()
    f.truncate(0)
    f.write(f"pid {os.getpid()} on {socket.gethostname()}, started {time.strftime('%Y-%m-%dT%H:%M:%S')}\n")
    f.flush()
    _HELD.append(f)
    note = f"cleared a stale lock of {out} (its run is no longer running: {previous})" if previous else None
    return None, note


def _release_run_folder() -> None:
    """Empty the lock file (a run that ended, not a killed one) and let go of the lock."""
    while _HELD:
        f = _HELD.pop()
        try:
            f.truncate(0)
            f.close()
        except OSError:
            pass


def agreed_output_dir(rank: int, world: int) -> str:
    """The default run folder (``runs/<date-time>``), named by rank 0 and sent to every rank: ranks
    whose clocks read another second would otherwise write to different folders."""
    box = [default_output_dir() if rank == 0 else None]
    if world > 1:
        dist.broadcast_object_list(box, src=0)
    return box[0]


def _forget_failed_start(out: str | None, existed: set) -> None:
    """Remove what a start that never trained made (train_config.json, base/, an empty log, then the
    run folder itself when this start made it and nothing else is in it); ``existed`` names what was
    there before the start, which is never touched. A folder holding a logged step or a checkpoint
    is a run: nothing of it is touched. Rank 0 only (the one that writes; known from RANK before the
    process group exists)."""
    import shutil

    rank = dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", "0"))
    if out is None or rank != 0 or not os.path.isdir(out):
        return
    log_file = os.path.join(out, "train_log.jsonl")
    if os.path.exists(os.path.join(out, "checkpoints")) or (os.path.isfile(log_file) and os.path.getsize(log_file) > 0):
        return
    removed = []
    for name in _START_FILES:
        path = os.path.join(out, name)
        if name in existed or not os.path.exists(path):
            continue
        if os.path.isdir(path):
            shutil.rmtree(path)
        else:
            os.remove(path)
        removed.append(name)
    if "" not in existed and not os.listdir(out):
        os.rmdir(out)
        log.warning("the start failed before its first step: removed the run folder it had made (%s)", out)
    elif removed:
        log.warning("the start failed before its first step: removed what it had written in %s (%s)", out,
                    ", ".join(removed))


def _train(cfg: TrainConfig) -> dict:
    import deepspeed

    from .data import PairCollator

    quiet_known_warnings()
    rank, world = init_distributed()
    if cfg.output_dir is None:
        cfg.output_dir = agreed_output_dir(rank, world)
    out = cfg.output_dir
    _log(rank, f"run folder: {os.path.abspath(out)}")
    on_gpu = torch.cuda.is_available()
    bf16 = on_gpu if cfg.bf16 is None else cfg.bf16
    check_config(cfg, world)
    hold_run_folder(out, rank, world)
    ds_config = deepspeed_config(cfg, world, bf16)

    # the data, its fit to the batch, the run's length and the resume decision: all before the model
    train_set, eval_set = _datasets(cfg, progress=cfg.progress and rank == 0)
    if cfg.check_images and cfg.data == "synthetic":
        _log(rank, "check_images: synthetic images are drawn in memory, nothing to check")
    skipped_at_build = len(getattr(train_set, "skipped", []))
    order = check_data_fit(cfg, len(train_set), train_set.query_has_image() if cfg.group_by_modality else None)
    resolve_length(cfg, order, rank)
    tag, history = plan_resume(cfg, len(train_set))
    ckpt_root = os.path.join(out, "checkpoints")
    if rank == 0:
        os.makedirs(out, exist_ok=True)
        write_run_config(cfg, history, {"train_rows": len(train_set), "skipped_rows_at_build": skipped_at_build})
    if tag is not None and history[-1]["changed"]:
        _log(rank, "resuming with changed options (recorded in train_config.json): " + ", ".join(
            f"{k} {old!r} -> {new!r}" for k, (old, new) in history[-1]["changed"].items()))
    torch.manual_seed(cfg.seed)

    model = build_model(cfg, ds_config, bf16)
    # every rank must run the same modules each forward (ZeRO gathers weights per module)
    model.uniform_modules = world > 1
    if rank == 0:  # the architecture and processor, without weights: export rebuilds from it
        base = os.path.join(out, "base")
        model.config.save_pretrained(base)
        model.processor.save_pretrained(base)
    collator = PairCollator(model.processor, use_negatives=cfg.use_negatives)
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
    probe = _LossProbe(loss_fn)
    gc = GradCache(engine, probe, cfg.chunk_size)

    state = ckpt.load(engine, ckpt_root, tag) if tag is not None else None  # weights_only loads, files checked
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

    def save(at_step):
        ckpt.save(engine, ckpt_root, at_step,
                  {"step": at_step, "rng_cpu": torch.get_rng_state(), "p_at_1_before": before,
                   "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None},
                  keep=cfg.keep_checkpoints)

    writer = _tensorboard(out) if (cfg.tensorboard and rank == 0) else None
    b_local = cfg.global_batch // world
    end = cfg.steps if cfg.stop_after is None else min(cfg.steps, start + cfg.stop_after)
    loader = step_loader(train_set, collator, order, rank, b_local, start, end, cfg.num_workers,
                         cfg.prefetch_batches, cfg.seed)
    skipped_in_training: set = set()
    step_times, waits = [], []
    bar = _bar(rank, cfg, start)
    t_run = time.perf_counter()
    step = start
    engine.module.train()
    batches = iter(loader)
    try:
        while step < end:
            t0 = time.perf_counter()
            item = next(batches)
            wait = time.perf_counter() - t0
            assert item["step"] == step, (item["step"], step)
            for s in item["skipped"]:
                skipped_in_training.add(s)
                bar.write(f"step {step + 1}: skipped bad row: {train_set.where(s[0], s[1])}: {s[2]}")
            _stop_on_bad_data(item["error"], step, start, world, ckpt_root, save)
            batch = _to_device(item["batch"], engine.device)
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
            # every rank's loss and its embeddings' health, known to all ranks before the step
            stats = torch.zeros(world, 5, dtype=torch.float64)
            stats[rank] = torch.tensor([local_loss.item(), *probe.non_finite()], dtype=torch.float64)
            if world > 1:
                dist.all_reduce(stats)
            loss = stats[:, 0].mean().item()
            if not math.isfinite(loss):  # every rank sees it: all stop here, before the step
                directions = _gather_objects(probe.directions(cfg.logit_scale, cfg.alpha), world)
                raise RunStopped(_non_finite_message(step + 1, stats, directions, lr_used, ckpt_root), step + 1,
                                 _last_checkpoint(ckpt_root))
            probe.clear()
            engine.step()
            step += 1
            dt = time.perf_counter() - t0
            step_times.append(dt)
            waits.append(wait)
            entry = {"step": step, "loss": loss, "lr": lr_used, "step_time_s": dt, "data_wait_s": wait,
                     "pairs_per_s": cfg.global_batch / dt}
            if rank == 0:
                _append_log(log_path, entry, ckpt_root)
                if writer is not None:
                    writer.add_scalar("loss", loss, step)
                    writer.add_scalar("lr", entry["lr"], step)
            bar.set_postfix_str(progress_line(loss, dt, entry["pairs_per_s"], wait))
            bar.update(1)
            if (cfg.save_every and step % cfg.save_every == 0) or step == cfg.steps:
                save(step)
    finally:
        del batches  # stops the loader's worker processes
        bar.close()
    seconds = time.perf_counter() - t_run
    skipped_all = set().union(*_gather_objects(skipped_in_training, world))
    result = {"steps": step, "global_batch": cfg.global_batch, "seconds": seconds, "world_size": world,
              "steps_this_run": step - start, "resumed_at_step": start if tag is not None else None,
              "median_step_s": _median(step_times), "median_data_wait_s": _median(waits),
              "train_rows": len(train_set), "skipped_rows_at_build": skipped_at_build,
              "skipped_rows_in_training": len(skipped_all),
              "run_dir": os.path.abspath(out), "checkpoint": _last_checkpoint(ckpt_root), "eval_json": None}
    if step >= cfg.steps and rset is not None:
        engine.module.eval()
        after = retrieval_eval(embed, model.processor, rset, cfg.eval_batch)
        result.update(p_at_1_before=before["p_at_1"] if before else None, p_at_1_after=after["p_at_1"],
                      chance=after["chance"], num_candidates=after["num_candidates"],
                      p_at_1_after_by_subset=after["p_at_1_by_subset"], by_task=after["by_task"],
                      eval_json=os.path.abspath(metrics_path))
        b = "n/a" if before is None else f"{before['p_at_1']:.3f}"
        _log(rank, f"after {step} steps: precision@1 {after['p_at_1']:.3f} (before {b}, chance "
                   f"{after['chance']:.4f}, {after['num_candidates']} candidates); training took {seconds:.0f} s")
        if rank == 0:
            with ckpt.reporting_full_disk(metrics_path, ckpt_root):
                ckpt.write_atomic(metrics_path, json.dumps(result, indent=2))
    _log(rank, summary_text(result, cfg))
    return result


def summary_text(r: dict, cfg: TrainConfig) -> str:
    """The end-of-run summary: rows used and skipped, steps, time, where everything is."""
    med = r["median_step_s"]
    wait = r["median_data_wait_s"]
    resumed = "" if r["resumed_at_step"] is None else f", resumed at step {r['resumed_at_step']}"
    stopped = "" if r["steps"] >= cfg.steps else f" (stopped early: --stop-after {cfg.stop_after})"
    timing = (f"{r['seconds']:.1f} s, median {med:.3f} s/step, median data wait {wait * 1000:.0f} ms/step"
              if med is not None else f"{r['seconds']:.1f} s")
    skipped = r["skipped_rows_at_build"] + r["skipped_rows_in_training"]
    lines = [
        "run summary:",
        f"  steps:       {r['steps']} of {cfg.steps} ({r['steps_this_run']} in this run{resumed}){stopped}, "
        f"{r['global_batch']} pairs per step",
        f"  time:        {timing}",
        f"  rows:        {r['train_rows']} used, {skipped} skipped ({r['skipped_rows_at_build']} when the data was "
        f"read, {r['skipped_rows_in_training']} found unreadable during training)",
        f"  run folder:  {r['run_dir']}",
        f"  checkpoint:  {r['checkpoint'] or 'none saved'}",
        f"  eval.json:   {r['eval_json'] or 'not written (no held-out set, or the run stopped early)'}",
    ]
    if r.get("by_task"):
        lines += ["  precision@1 by task (each task's queries against its own task's distinct targets):",
                  task_table(r["by_task"])]
    return "\n".join(lines)


def task_table(by_task: dict, indent: str = "    ") -> str:
    """``by_task`` of an evaluation as a text table: P@1, chance, their ratio, queries, candidates."""
    rows = [f"{indent}{'task':<12} {'P@1':>6} {'chance':>7} {'x chance':>9} {'queries':>8} {'candidates':>11}"]
    for task, v in by_task.items():
        ratio = v["p_at_1"] / v["chance"] if v["chance"] else float("nan")
        rows.append(f"{indent}{task:<12} {v['p_at_1']:>6.3f} {v['chance']:>7.4f} {ratio:>8.1f}x "
                    f"{v['num_queries']:>8d} {v['num_candidates']:>11d}")
    return "\n".join(rows)


def _stop_on_bad_data(error, step: int, start: int, world: int, ckpt_root: str, save) -> None:
    """``bad_images="fail"``: when any rank's batch for this step hit bad data, every rank
    checkpoints the steps done (unless that checkpoint exists) and stops with the message."""
    flag = torch.tensor([0.0 if error is None else 1.0])
    if world > 1:
        dist.all_reduce(flag)
    if flag.item() == 0:
        return
    errors = [e for e in _gather_objects(error, world) if e is not None]
    last = ckpt.latest_complete(ckpt_root)
    if step > 0 and last != ckpt.tag_for(step):
        save(step)
    saved = _last_checkpoint(ckpt_root)
    where = (f"checkpoint of the {step} steps done: {saved}; fix or remove the image and rerun with the same "
             "--output-dir to resume, or rerun with --bad-images skip" if saved
             else "no step was done, nothing to checkpoint")
    raise RunStopped(f"bad data in the batch of step {step + 1}: {errors[0]}\n{where}", step + 1, saved)


class _LossProbe(torch.nn.Module):
    """The loss, keeping a look at this step's embeddings for the report a non-finite loss needs."""

    def __init__(self, loss_fn):
        super().__init__()
        self.loss_fn = loss_fn
        self._seen = self._embs = None

    def forward(self, query, target, **kw):
        neg = kw.get("negatives")
        self._seen = [(~torch.isfinite(x.detach())).sum().item() if x is not None else 0
                      for x in (query, target, neg)] + [query.numel()]
        self._embs = (query.detach(), target.detach())
        return self.loss_fn(query, target, **kw)

    def directions(self, logit_scale: float, alpha: float) -> dict:
        """The loss's two directions over this rank's own pairs (no collectives, no masks or
        negatives): where a non-finite loss comes from."""
        from .loss import hardness_weighted_loss

        if self._embs is None:
            return {}
        q, t = (x.float() for x in self._embs)
        try:
            with torch.no_grad():
                return {d: hardness_weighted_loss(a, b, logit_scale=logit_scale, alpha=alpha, symmetric=False,
                                                  backend="torch").item()
                        for d, (a, b) in (("query->target", (q, t)), ("target->query", (t, q)))}
        except Exception as exc:  # a diagnosis must not hide the error it diagnoses
            return {"not computed": f"{type(exc).__name__}: {exc}"}

    def non_finite(self) -> list:
        """[non-finite query, target, negative values, query elements] of the last call."""
        return self._seen or [0, 0, 0, 0]

    def clear(self):
        self._seen = self._embs = None


def _to_device(batch, device):
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, dict):
        return {k: _to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, list):
        return [_to_device(v, device) for v in batch]
    return batch


def _truncate_log(path: str, step: int) -> None:
    """On resume, drop log lines of steps after the checkpoint (they will be run again) and a torn
    last line (a write cut by a crash or a full disk: no newline, not a whole entry), rewriting the
    log atomically. Any other line that is not an entry stops the resume, naming FILE:LINE."""
    if not os.path.exists(path):
        return
    with open(path, "rb") as f:
        lines = f.read().split(b"\n")
    tail = lines.pop()  # after the last newline: empty unless the last write was cut
    keep = []
    for number, line in enumerate(lines + [tail], 1):
        if not line.strip():
            continue
        try:
            entry_step = json.loads(line)["step"]
            if not isinstance(entry_step, int):
                raise InvalidArgumentType(f"step is {entry_step!r}")
        except (ValueError, KeyError, TypeError) as exc:  # UnicodeDecodeError is a ValueError
            if line is tail:
                _log(0, f"cut the torn last line of {path} ({len(tail)} bytes, no newline: a write stopped by a "
                        "crash or a full disk)")
                continue
            raise InvalidArgument(f"{path}:{number}: not a log entry ({type(exc).__name__}: {exc}; the line starts "
                             f"{line[:60]!r}); only a torn last line is cut on resume: fix or remove that line, "
                             "then resume") from exc
        if entry_step <= step:
            keep.append(line + b"\n")
    with ckpt.reporting_full_disk(path, os.path.join(os.path.dirname(path), "checkpoints")):
        ckpt.write_atomic(path, b"".join(keep))


def _append_log(path: str, entry: dict, ckpt_root: str) -> None:
    """Append one log line, whole or not at all: a write that fails (a full disk) is cut back off, so
    the log never ends in a torn line, and a full disk raises DiskFull naming the log."""
    data = memoryview((json.dumps(entry) + "\n").encode())
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        size = os.fstat(fd).st_size
        try:
            while data:
                data = data[os.write(fd, data):]
        except OSError as exc:
            try:
                os.ftruncate(fd, size)
            except OSError:
                pass
            error = ckpt.disk_full(exc, path, ckpt_root)
            if error is None:
                raise
            raise error from exc
    finally:
        os.close(fd)


def _log(rank: int, msg: str) -> None:
    if rank == 0:
        print(msg, flush=True)


class _NoBar:
    def set_postfix(self, **kw):
        pass

    def set_postfix_str(self, s):
        pass

    def write(self, s):
        print(s, flush=True)

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
