"""``llave-fast eval``: precision@1 of a saved model, MMEB-style.

``--model`` is a model folder (an export, a transformers or llava_qwen checkpoint), a hub id, or
a training run folder, whose newest complete checkpoint is merged from its ZeRO shards in
memory (as ``llave-fast export`` does) and evaluated.

Each query is scored against the candidate set (for the synthetic data and for MMEB-train
style files: every distinct target of the split); a hit is a top-1 candidate with the
query's target id.
"""

from __future__ import annotations

import contextlib
import os
import sys

import torch

EVAL_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def eval_precision(device: str = "auto", dtype: str = "auto") -> tuple[torch.device, torch.dtype]:
    """Where and in what precision ``llave-fast eval`` runs the model.

    ``device``: "auto" (CUDA when present, else the CPU), "cuda", "cuda:N" or "cpu".
    ``dtype``: "auto" (bf16 on CUDA, as LLaVE evaluates with 16-bit weights; fp32 on the
    CPU), or one of bf16 / fp16 / fp32.
    """
    if not isinstance(device, str):
        raise TypeError(f"device must be a str ('auto', 'cuda', 'cuda:N' or 'cpu'), got {type(device).__name__}")
    if device == "auto":
        dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        try:
            dev = torch.device(device)
        except RuntimeError as e:
            raise ValueError(f"device must be 'auto', 'cuda', 'cuda:N' or 'cpu', got {device!r}") from e
        if dev.type not in ("cuda", "cpu"):
            raise ValueError(f"device must be 'auto', 'cuda', 'cuda:N' or 'cpu', got {device!r}")
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device={device!r} but CUDA is not available here (use --device cpu or auto)")
    if dtype == "auto":
        dt = torch.bfloat16 if dev.type == "cuda" else torch.float32
    elif dtype in EVAL_DTYPES:
        dt = EVAL_DTYPES[dtype]
    else:
        raise ValueError(f"dtype must be 'auto' or one of {sorted(EVAL_DTYPES)}, got {dtype!r}")
    return dev, dt


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


def evaluate_model(model_path: str, data: str = "synthetic", *, image_dir: str | None = None,
                   num_eval: int = 256, seed: int = 0, image_size: int = 64, batch: int = 64,
                   device: str = "auto", dtype: str = "auto") -> dict:
    """precision@1 of a saved model; on CUDA in bf16 by default (LLaVE's 16-bit evaluation),
    on the CPU in fp32 (see :func:`eval_precision`). The result names the device and dtype."""
    from .data import MMEBDataset, SyntheticDataset, retrieval_candidates
    from .data.mmeb_eval import is_eval_file
    from .export import is_run_dir
    from .model import LLaVEEmbedder

    dev, dt = eval_precision(device, dtype)
    where = {"device": str(dev), "dtype": str(dt).replace("torch.", "")}
    if is_run_dir(model_path):  # a training run: its newest complete checkpoint, merged in memory
        model, tag = run_model_for_eval(model_path, dt)
        where["checkpoint"] = tag
    else:
        model = LLaVEEmbedder.from_pretrained(model_path, torch_dtype=dt)
    model = model.to(dev).eval()
    paths = [] if data == "synthetic" else data.split(",")
    if paths and all(is_eval_file(x) for x in paths):
        result = candidate_list_eval(model, paths, image_dir=image_dir, limit=num_eval, batch=batch)
        result.update(model=model_path, data=data, **where)
        return result
    if data == "synthetic":
        ds = SyntheticDataset(num_eval, seed=seed, split="eval", image_size=image_size)
    else:
        ds = MMEBDataset(data.split(","), image_dir)
    rset = retrieval_candidates(ds, limit=num_eval)

    def embed(b):
        return model(b)

    with torch.no_grad():
        result = retrieval_eval(embed, model.processor, rset, batch)
    result.update(model=model_path, data=data, **where)
    return result


def run_model_for_eval(run_dir: str, dtype: torch.dtype):
    """(model, checkpoint tag) of a training run folder's newest complete checkpoint, or an error
    that says what to do instead."""
    from . import checkpoint as ckpt
    from .export import load_run_model

    root = os.path.join(run_dir, "checkpoints")
    if ckpt.latest_complete(root) is None:
        raise FileNotFoundError(
            f"{run_dir!r} is a training run folder without a complete checkpoint (none under {root} has the "
            f"{ckpt.MARKER} marker yet; the run saves one every --save-every steps and at its end). Evaluate it once "
            f"it has one, or evaluate an exported model: llave-fast export --run {run_dir}, then "
            f"llave-fast eval --model {os.path.join(run_dir, 'export')}")
    try:
        # deepspeed's shard merge prints its progress: keep stdout for the metrics JSON
        with contextlib.redirect_stdout(sys.stderr):
            return load_run_model(run_dir, dtype=dtype)
    except ImportError as e:
        raise ImportError(f"{e}; or export it on a machine with deepspeed (llave-fast export --run {run_dir}) "
                          "and evaluate the exported folder") from e


@torch.no_grad()
def candidate_list_eval(model, paths, *, image_dir=None, limit=None, batch: int = 64) -> dict:
    """MMEB's protocol: each query against its own candidates; a hit when the first scores highest."""
    from PIL import Image

    from .data.mmeb_eval import read_eval_file

    def load(path):
        if path is None:
            return None
        with Image.open(path) as im:
            return im.convert("RGB")

    per_file = {}
    for path in paths:
        rows = read_eval_file(path, image_dir, limit)
        q = encode_all(model, model.processor, [r.qry_text for r in rows], [load(r.qry_image) for r in rows], batch)
        hits = 0
        for r, qe in zip(rows, q):
            c = encode_all(model, model.processor, r.cand_texts, [load(x) for x in r.cand_images], batch)
            hits += int((c @ qe).argmax().item() == 0)
        per_file[path] = {"p_at_1": hits / max(1, len(rows)), "num_queries": len(rows)}
    mean = sum(v["p_at_1"] for v in per_file.values()) / max(1, len(per_file))
    return {"p_at_1": mean, "per_file": per_file, "protocol": "per-query candidate lists (MMEB eval)"}
