"""A run's options: :class:`TrainConfig` (one field per ``llave-fast train`` flag) and the shipped presets.

The bottom of the training package: it imports nothing of it.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field

from ..errors import InvalidArgument, MissingFile


def _config_dir() -> str:
    """The shipped presets: ``llave_fast/configs`` (in the source tree a link to the top-level
    ``configs/`` folder; in the wheel a copy of its JSON files)."""
    return os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


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
                                      "global batch is a negative for every query. It decides the loss's negatives, "
                                      "not how often the optimizer steps: the run always makes one optimizer step "
                                      "per global batch (DeepSpeed's gradient_accumulation_steps is set to 1; "
                                      "GradCache and chunk_size bound the memory)")
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
    loss_backend: str = _opt("auto", "the loss's backend, passed as backend= to FusedHardnessLoss (and so to "
                                     "hardness_weighted_loss): auto, triton, torch or reference. Called loss_backend "
                                     "here, backend there: a run has other backends too (torch.distributed's "
                                     "nccl or gloo)")
    deepspeed_config: str = _opt("zero3.json", "DeepSpeed config (a shipped name or a path)")
    bf16: bool | None = _opt(None, "train in bf16: the model is built in bfloat16 and DeepSpeed's bf16 mode is on "
                                   "(else fp32); None: on CUDA yes, on CPU no. Training only: the evaluation "
                                   "commands' --dtype (auto, bf16, fp16, fp32, llave) and export's --dtype choose "
                                   "their own precision and do not read this")
    gradient_checkpointing: bool = _opt(False, "activation checkpointing of every vision and language layer")
    save_every: int = _opt(0, "checkpoint every N steps; 0: only at the end (and at SIGTERM: the steps done are "
                              "checkpointed, then the run exits 143, README Training)")
    keep_checkpoints: int = _opt(2, "complete checkpoints kept")
    seed: int = _opt(0, "data order and initialisation seed (a model from scratch starts from other weights "
                    "under ZeRO-3 than under stages 0-2, README Training)")
    eval_before: bool = _opt(True, "precision@1 before training too (synthetic data)")
    eval_batch: int = _opt(64, "samples per evaluation forward")
    tensorboard: bool = _opt(False, "write TensorBoard logs under the run folder")
    progress: bool = _opt(True, "progress bar")
    stop_after: int | None = field(default=None, metadata={
        "help": "stop (as if killed) after this many steps of this run; tests", "hidden": True})

    def __setattr__(self, name: str, value) -> None:
        # ``cfg.global_bach = 8`` would otherwise train with the default batch, silently
        if name not in type(self).__dataclass_fields__:
            import difflib

            near = difflib.get_close_matches(name, list(type(self).__dataclass_fields__), n=1)
            raise InvalidArgument(f"TrainConfig has no option {name!r}"
                                  + (f"; did you mean {near[0]!r}?" if near else " (see llave-fast train --help)"))
        object.__setattr__(self, name, value)

    @classmethod
    def from_json(cls, path: str) -> "TrainConfig":
        with open(_config_path(path)) as f:
            raw = json.load(f)
        if not isinstance(raw, dict):
            raise InvalidArgument(f"{path}: a training config is a JSON object of options ({{\"steps\": 100, ...}}), "
                                  f"got {_json_kind(raw)}")
        for key in [k for k in raw if k.startswith("_")]:  # _comment; a run's _history and _data
            raw.pop(key)
        unknown = set(raw) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise InvalidArgument(f"{path}: unknown training options {sorted(unknown)}")
        return cls(**raw)


def _json_kind(value) -> str:
    """How JSON calls a parsed value's type (for errors about a file that is not a JSON object)."""
    kinds = {list: "an array", str: "a string", bool: "true/false", int: "a number", float: "a number"}
    return "null" if value is None else kinds.get(type(value), type(value).__name__)


def _config_path(name: str, what: str = "config") -> str:
    if os.path.exists(name):
        return name
    shipped = os.path.join(CONFIG_DIR, name)
    if os.path.exists(shipped):
        return shipped
    raise MissingFile(f"{what} {name!r} not found (looked in the working directory and {CONFIG_DIR})")
