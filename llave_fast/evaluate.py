"""``llave-fast eval``: precision@1 of a saved model, MMEB-style.

``--model`` is a model folder (an export, a transformers or llava_qwen checkpoint), a hub id, or
a training run folder, whose newest complete checkpoint is merged from its ZeRO shards in
memory (as ``llave-fast export`` does) and evaluated.

Each query is scored against the candidate set (for the synthetic data and for MMEB-train
style files: every distinct target of the split); a hit is a top-1 candidate with the
query's target id.

MMEB-eval files (:func:`mmeb_eval`) are scored as VLM2Vec and LLaVE score them: each query
against its own candidate list, a hit when the first candidate (the positive) scores
highest, ties going to the first (``numpy.argmax``'s rule). Every distinct (text, image)
input of a dataset is encoded once (:func:`encode_pairs`, batches sorted by length) and
each distinct candidate of a list is scored once, so copies of one candidate score
bit-identically. Per-dataset results are cached in the output folder, and a rerun resumes.

LLaVE's protocol, whatever options the model was trained with (:func:`apply_eval_protocol`):

* Texts are cut only as LLaVE cuts them: the whole sequence at the model's ``max_length``
  (LLaVE's ``tokenizer_model_max_length``, 4096 for its models). A training-time cut of the text
  alone (``max_text_tokens``, saved with the processor; 256 in ``configs/llave_0.5b.json``) is
  not applied unless asked for (``max_text_tokens="saved"`` or a number; ``--max-text-tokens``).
* Placeholders: LLaVE's ``preprocess_multimodal`` moves a single non-leading ``<image>`` to the
  front, and an image whose text has no placeholder is dropped (the text alone is embedded;
  counted per dataset as ``images_dropped`` and said in the log).
* Precision: ``dtype="llave"`` is LLaVE's own: fp16 weights, every forward under bf16 autocast
  (:meth:`~llave_fast.model.LLaVEEmbedder.autocast`), on CUDA. It is the setting that reproduces
  LLaVE's published numbers; "auto" (bf16 weights on CUDA) and "fp32" are close to it but not
  the same arithmetic.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import time

import torch

from .dtypes import DTYPES, dtype_label, dtype_name
from .errors import InvalidArgument, InvalidArgumentType, MissingDependency

logger = logging.getLogger(__name__)

#: LLaVE's evaluation precision: fp16 weights under bf16 autocast (see :func:`eval_precision`)
LLAVE_PRECISION = "llave"
#: the choices of an evaluation's ``dtype`` (``--dtype`` of eval and eval-video); bf16 / fp16 / fp32
#: may also be spelled as :mod:`llave_fast.dtypes` accepts (bfloat16, float16 / half, float32)
EVAL_PRECISIONS = ("auto", *DTYPES, LLAVE_PRECISION)


def eval_precision(device: str = "auto", dtype: str = "auto") -> tuple[torch.device, torch.dtype]:
    """Where and in what precision ``llave-fast eval`` runs the model: (device, weights' dtype).

    ``device``: "auto" (CUDA when present, else the CPU), "cuda", "cuda:N" or "cpu".
    ``dtype``: "auto" (bf16 on CUDA, 16-bit weights as LLaVE evaluates; fp32 on the CPU), one
    of bf16 / fp16 / fp32, or "llave": LLaVE's own precision, fp16 weights (returned here) with
    every forward under bf16 autocast (:func:`eval_autocast`), CUDA only. LLaVE loads its model
    with ``llava/model/builder.py: load_pretrained_model``'s default ``torch_dtype="float16"``
    and encodes under ``torch.autocast(dtype=torch.bfloat16, device_type="cuda")``
    (``llava/eval/model_embed.py: main``, ``CLIP4Clip/main_task_retrieval.py: eval_epoch``):
    "llave" is the setting that reproduces its numbers.
    """
    if not isinstance(device, str):
        raise InvalidArgumentType(f"device must be a str ('auto', 'cuda', 'cuda:N' or 'cpu'), got {type(device).__name__}")
    if device == "auto":
        dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        try:
            dev = torch.device(device)
        except RuntimeError as e:
            raise InvalidArgument(f"device must be 'auto', 'cuda', 'cuda:N' or 'cpu', got {device!r}") from e
        if dev.type not in ("cuda", "cpu"):
            raise InvalidArgument(f"device must be 'auto', 'cuda', 'cuda:N' or 'cpu', got {device!r}")
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise InvalidArgument(f"device={device!r} but CUDA is not available here (use --device cpu or auto)")
    dtype = dtype_name(dtype, name="dtype", choices=EVAL_PRECISIONS)
    if dtype == "auto":
        dt = torch.bfloat16 if dev.type == "cuda" else torch.float32
    elif dtype in DTYPES:
        dt = DTYPES[dtype]
    elif dtype == LLAVE_PRECISION:
        if dev.type != "cuda":
            raise InvalidArgument(f"dtype={dtype!r} (LLaVE's precision: fp16 weights under bf16 autocast) runs on CUDA "
                             f"only, as LLaVE's evaluation does; device is {str(dev)!r}. CPU autocast keeps fp16 "
                             "weights in layer_norm, which the CPU cannot run: use dtype fp32 on the CPU")
        dt = torch.float16
    return dev, dt


def eval_autocast(dtype: str = "auto") -> torch.dtype | None:
    """The autocast dtype of an evaluation precision: bf16 for "llave" (LLaVE's fp16 weights under
    bf16 autocast), None (no autocast) for the others."""
    return torch.bfloat16 if dtype == LLAVE_PRECISION else None


def precision_label(dt: torch.dtype, dtype: str = "auto") -> str:
    """The ``dtype`` field of a result: the weights' dtype, and the autocast when there is one."""
    name = dtype_label(dt)
    ac = eval_autocast(dtype)
    return name if ac is None else f"{name}+autocast-{dtype_label(ac)}"


def check_max_text_tokens(max_text_tokens) -> None:
    if max_text_tokens is None or max_text_tokens == "saved":
        return
    if isinstance(max_text_tokens, bool) or not isinstance(max_text_tokens, int) or max_text_tokens < 1:
        raise InvalidArgument(f"max_text_tokens must be None (no cut of the text alone: LLaVE's protocol), 'saved' (the "
                         f"cut saved with the model at training) or a positive int, got {max_text_tokens!r}")


def apply_eval_protocol(model, *, max_text_tokens=None, autocast: torch.dtype | None = None) -> dict:
    """Put a loaded model under LLaVE's evaluation protocol, whatever it was trained with; returns
    the settings applied (they go into the result).

    * ``max_text_tokens``: None (default) cuts no text on its own: LLaVE cuts only the whole
      sequence, at ``tokenizer_model_max_length`` (``llava_arch.py:
      prepare_inputs_labels_for_multimodal``; the processor's ``max_length``, read back from the
      model as before). "saved": the cut of the text alone saved with the model's processor at
      training (``max_text_tokens``, llave-fast's own training option). An int: that cut.
    * The processor drops an image whose text has no placeholder (LLaVE's rule, see
      :mod:`llave_fast.model.processor`).
    * ``autocast``: :attr:`~llave_fast.model.LLaVEEmbedder.autocast_dtype` (:func:`eval_autocast`).
    """
    proc = model.processor
    saved = proc.max_text_tokens
    _protocol_cut(proc, max_text_tokens)
    model.autocast_dtype = autocast
    return {"max_text_tokens": proc.max_text_tokens, "max_length": proc.max_length,
            "max_text_tokens_saved": saved}


def _protocol_cut(proc, max_text_tokens) -> None:
    """The processor's side of :func:`apply_eval_protocol`, in place."""
    check_max_text_tokens(max_text_tokens)
    proc.max_text_tokens = proc.max_text_tokens if max_text_tokens == "saved" else max_text_tokens
    proc.image_without_placeholder = "drop"


def eval_processor(processor, *, max_text_tokens=None):
    """A copy of ``processor`` under :func:`apply_eval_protocol`'s processor settings (no cut of the
    text alone unless asked; an image without a placeholder dropped); ``processor`` is left as it
    is, so a training run can score with the eval command's inputs and go on training with its own."""
    import copy

    proc = copy.copy(processor)
    _protocol_cut(proc, max_text_tokens)
    return proc


@torch.no_grad()
def encode_all(embed, processor, texts, images, batch: int = 64) -> torch.Tensor:
    """Embeddings of (text, image) inputs in batches; ``embed(batch_dict) -> (n, d)``."""
    out = []
    for i in range(0, len(texts), batch):
        out.append(embed(processor(texts[i : i + batch], images[i : i + batch])).float().cpu())
    return torch.cat(out)


def retrieval_eval(embed, processor, rset, batch: int = 64) -> dict:
    """Precision@1 of a :class:`~llave_fast.data.RetrievalSet`, two ways from one set of scores.

    ``p_at_1`` (and its split ``p_at_1_by_subset``): every query against all distinct targets
    of the split, chance ``1 / num_candidates``. ``by_task``: MMEB's way, each task scored on
    its own, its queries against only its own task's distinct targets (``{task: {"p_at_1",
    "chance", "num_queries", "num_candidates"}}``), so chance differs per task and a query
    cannot score by telling the modalities apart.
    """
    return retrieval_metrics(rset, retrieval_scores(embed, processor, rset, batch))


def retrieval_scores(embed, processor, rset, batch: int = 64) -> torch.Tensor:
    """The (num_queries, num_candidates) scores :func:`retrieval_eval` ranks: every query's embedding
    against every candidate's, each side encoded in batches of ``batch``."""
    q = encode_all(embed, processor, rset.query_texts, rset.query_images, batch)
    c = encode_all(embed, processor, rset.cand_texts, rset.cand_images, batch)
    return q @ c.t()


def retrieval_metrics(rset, scores: torch.Tensor) -> dict:
    """:func:`retrieval_eval`'s result from its scores (:func:`retrieval_scores`)."""
    return {
        "p_at_1": rset.precision_at_1(scores),
        "p_at_1_by_subset": rset.precision_at_1_by_subset(scores),
        "by_task": rset.precision_at_1_by_task(scores),
        "chance": rset.chance,
        "num_candidates": rset.num_candidates,
        "num_queries": rset.num_queries,
    }


def data_paths(data) -> list[str]:
    """``--data`` as a list of paths: a list of files/folders, each of which may itself be a
    comma-separated list (the old form); ``"synthetic"`` gives []."""
    if isinstance(data, (str, os.PathLike)):
        data = [data]
    out = []
    for item in data:
        item = os.fspath(item)
        if item == "synthetic" and len(data) == 1:
            return []
        for part in item.split(","):
            if not part:
                raise InvalidArgument(f"data {item!r}: an empty file name in the comma-separated list")
            out.append(part)
    return out


def load_eval_model(model_path: str, dev: torch.device, dt: torch.dtype, tag: str | None = None, *,
                    max_text_tokens=None, autocast: torch.dtype | None = None):
    """(model on ``dev`` in ``dt`` under LLaVE's protocol (:func:`apply_eval_protocol`), {"checkpoint":
    tag} for a run folder else {}, plus the protocol's settings). ``tag``: the run's checkpoint to
    load, as resolved earlier (a run still training may have saved a newer one since); None: its
    newest complete one."""
    from .export import is_run_dir
    from .model import LLaVEEmbedder

    check_max_text_tokens(max_text_tokens)
    extra = {}
    if is_run_dir(model_path):  # a training run: a complete checkpoint, merged in memory
        model, tag = run_model_for_eval(model_path, dt, tag)
        extra["checkpoint"] = tag
    else:
        model = LLaVEEmbedder.from_pretrained(model_path, torch_dtype=dt)
    extra.update(apply_eval_protocol(model, max_text_tokens=max_text_tokens, autocast=autocast))
    return model.to(dev).eval(), extra


# ------------------------------------------------------------------------------ the synthetic held-out split
#: the synthetic split's options, one row each: its default (for a model that is not a training run folder,
#: and for an option a run's train_config.json lacks: an older run), its field in a run's train_config.json
#: (TrainConfig's) and its flag of ``llave-fast eval``
_SPLIT_OPTIONS = {"num_eval": (256, "num_eval", "--num-eval"), "seed": (0, "seed", "--seed"),
                  "image_size": (64, "image_size", "--image-size"),
                  "hard_family_size": (1, "hard_family_size", "--hard-family-size"),
                  "background": ("plain", "synthetic_background", "--synthetic-background")}  # SyntheticDataset's
#: the query count, seed, image side, hard-family size and background of a split no run decided
SYNTHETIC_SPLIT_DEFAULTS = {name: row[0] for name, row in _SPLIT_OPTIONS.items()}
#: each option's field in a run's train_config.json and its flag
_SPLIT_FIELDS = {name: row[1:] for name, row in _SPLIT_OPTIONS.items()}


def run_split_options(model_path: str) -> dict | None:
    """The synthetic held-out split a training run folder scored in its eval.json, as its
    train_config.json records it: ``{option: value}`` for the options of :data:`SYNTHETIC_SPLIT_DEFAULTS`
    the file holds (an older run's file may lack some: that run used the default). None for anything
    else: not a run folder, a run folder without the file, a run trained on other data (it has no
    synthetic held-out split). ``num_eval`` is left out when the run skipped its held-out evaluation (0)."""
    from .export import is_run_dir

    path = os.path.join(model_path, "train_config.json")
    if not os.path.isdir(model_path) or not is_run_dir(model_path) or not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            saved = json.load(f)
    except ValueError as e:
        raise InvalidArgument(f"{path}: not readable as the run's JSON options ({e}), so the synthetic split its "
                              "eval.json was scored on cannot be known") from e
    if not isinstance(saved, dict):
        raise InvalidArgument(f"{path}: a run's options are a JSON object, got {type(saved).__name__}")
    if saved.get("data", "synthetic") != "synthetic":
        return None
    out = {}
    for name, (field_name, _) in _SPLIT_FIELDS.items():
        if field_name not in saved:
            continue
        value, default = saved[field_name], SYNTHETIC_SPLIT_DEFAULTS[name]
        if type(value) is not type(default):  # an int for the numbers (not a bool), a str for the background
            what = "an integer" if isinstance(default, int) else "a string"
            raise InvalidArgument(f"{path}: {field_name} must be {what}, got {value!r}")
        out[name] = value
    if out.get("num_eval") == 0:  # the run skipped its held-out evaluation (no eval.json)
        del out["num_eval"]
    return out


def synthetic_split_options(model_path: str, *, num_eval: int | None = None, seed: int | None = None,
                            image_size: int | None = None, hard_family_size: int | None = None,
                            background: str | None = None) -> dict:
    """The options of the synthetic held-out split ``model_path`` is scored on, resolved in this one
    place (each argument None when not given): a given one as given; for a training run folder, the
    others as the run's own split (:func:`run_split_options`: the one its eval.json's ``p_at_1_after``
    was scored on; an option an older run did not record: the default it ran with); else
    :data:`SYNTHETIC_SPLIT_DEFAULTS`. A given option that differs from the run's is kept (the user may
    mean it) and said in one warning line. Returns the options and ``from_run``: the names taken from
    the run's train_config.json."""
    given = {"num_eval": num_eval, "seed": seed, "image_size": image_size, "hard_family_size": hard_family_size,
             "background": background}
    run = run_split_options(model_path)
    out, from_run = {}, []
    for name, value in given.items():
        if run is None:
            run_value = None
        else:  # a run without num_eval skipped its held-out evaluation: it has no query count to differ from
            run_value = run.get(name, None if name == "num_eval" else SYNTHETIC_SPLIT_DEFAULTS[name])
        if value is None:
            out[name] = SYNTHETIC_SPLIT_DEFAULTS[name] if run_value is None else run_value
            if run is not None and name in run:
                from_run.append(name)
            continue
        out[name] = value
        if run_value is not None and value != run_value:
            field_name, flag = _SPLIT_FIELDS[name]
            logger.warning("warning: %s %s differs from the run's own %s %s (%s): the synthetic split scored is "
                           "not the one its eval.json's p_at_1_after was scored on", flag, value, field_name,
                           run_value, os.path.join(model_path, "train_config.json"))
    out["from_run"] = from_run
    return out


def evaluate_model(model_path: str, data="synthetic", *, image_dir: str | None = None,
                   num_eval: int | None = None, seed: int | None = None, image_size: int | None = None,
                   hard_family_size: int | None = None, background: str | None = None, batch: int = 64,
                   device: str = "auto", dtype: str = "auto", max_queries: int | None = None,
                   output_dir: str | None = None, progress: bool = True, max_text_tokens=None) -> dict:
    """precision@1 of a saved model under LLaVE's protocol (module docstring); on CUDA in bf16 by
    default, on the CPU in fp32; ``dtype="llave"`` is LLaVE's own precision, the one that
    reproduces its numbers (see :func:`eval_precision`). The result names the device and dtype.

    ``data``: "synthetic", or files/folders (a list, or one comma-separated string). MMEB-eval
    files go to :func:`mmeb_eval` (every query unless ``max_queries`` caps each dataset;
    ``output_dir`` holds ``mmeb_eval.json`` and the resume cache, None writes nothing);
    ``num_eval`` is the query count of the synthetic split and of MMEB-train files only (None: 256,
    or a run folder's own for the synthetic split).
    The synthetic split: ``num_eval``, ``seed``, ``image_size``, ``hard_family_size``, ``background``
    (SyntheticDataset's), each None unless given: a training run folder is scored on its own held-out
    split (the one of its eval.json), any other model on 256 queries, seed 0, 64 px, family size 1,
    the plain background (:func:`synthetic_split_options`); the result's ``synthetic_split`` says which.
    ``max_text_tokens``: None (LLaVE: no cut of a text on its own), "saved" (the training-time cut
    saved with the model) or a number (:func:`apply_eval_protocol`).
    """
    from .data import MMEBDataset, SyntheticDataset, retrieval_candidates
    from .data.mmeb_eval import find_eval_datasets

    dev, dt = eval_precision(device, dtype)
    check_max_text_tokens(max_text_tokens)
    autocast = eval_autocast(dtype)
    where = {"device": str(dev), "dtype": precision_label(dt, dtype)}
    protocol = {"max_text_tokens": max_text_tokens}
    paths = data_paths(data)
    synthetic_only = {"seed": seed, "image_size": image_size, "hard_family_size": hard_family_size,
                      "background": background}
    given = [f"{name}={value!r} ({_SPLIT_FIELDS[name][1]})" for name, value in synthetic_only.items()
             if value is not None]
    if paths and given:
        raise InvalidArgument(f"{', '.join(given)}: for the synthetic split only (data 'synthetic'), not for "
                              f"data {data!r}")
    # MMEB-eval files, or None: the synthetic split, MMEB-train files or a hub dataset name
    datasets = find_eval_datasets(paths) if paths and all(os.path.exists(p) for p in paths) else None
    if datasets is not None:
        loaded = {}

        def model_once():  # loaded on first use: a rerun whose every dataset is cached loads nothing
            if "model" not in loaded:
                # exactly the checkpoint the key names (the cache and mmeb_eval.json say which)
                loaded["model"] = load_eval_model(model_path, dev, dt, key.get("checkpoint"),
                                                  max_text_tokens=max_text_tokens, autocast=autocast)[0]
            return loaded["model"]

        key = {**model_key(model_path, dev, dt), "dtype": where["dtype"], **protocol}
        info = {"model": model_path, "data": data, **where, **protocol}
        if "checkpoint" in key:
            info["checkpoint"] = key["checkpoint"]
        return mmeb_eval(model_once, datasets, image_dir=image_dir, max_queries=max_queries, batch=batch,
                         output_dir=output_dir, key=key, info=info, progress=progress)
    if max_queries is not None:
        raise InvalidArgument(f"max_queries={max_queries} applies to MMEB-eval files (each query's own candidate list); "
                         "for the synthetic split and MMEB-train files use num_eval (--num-eval)")
    if output_dir is not None:
        raise InvalidArgument(f"output_dir={output_dir!r} applies to MMEB-eval files (mmeb_eval.json and its resume "
                         "cache); for the synthetic split and MMEB-train files write the metrics with --output")
    model, extra = load_eval_model(model_path, dev, dt, max_text_tokens=max_text_tokens, autocast=autocast)
    where.update(extra)
    if not paths:  # after the load: a run folder it refuses (no complete checkpoint) gets no warning first
        split = synthetic_split_options(model_path, num_eval=num_eval, seed=seed, image_size=image_size,
                                        hard_family_size=hard_family_size, background=background)
        num_eval = split["num_eval"]
        ds = SyntheticDataset(num_eval, seed=split["seed"], split="eval", image_size=split["image_size"],
                              hard_family_size=split["hard_family_size"], background=split["background"])
        where["synthetic_split"] = split
    else:
        num_eval = SYNTHETIC_SPLIT_DEFAULTS["num_eval"] if num_eval is None else num_eval
        ds = MMEBDataset(paths, image_dir)
    rset = retrieval_candidates(ds, limit=num_eval)

    def embed(b):
        return model(b)

    with torch.no_grad():
        result = retrieval_eval(embed, model.processor, rset, batch)
    result.update(model=model_path, data=data, **where)
    return result


def run_model_for_eval(run_dir: str, dtype: torch.dtype, tag: str | None = None):
    """(model, checkpoint tag) of a training run folder: checkpoint ``tag``, or the newest complete
    one, loaded exactly (:func:`~llave_fast.export.load_run_model`); or an error that says what to
    do instead."""
    from .export import load_run_model

    try:
        # deepspeed's shard merge prints its progress: keep stdout for the metrics JSON
        with contextlib.redirect_stdout(sys.stderr):
            return load_run_model(run_dir, dtype=dtype, tag=tag)
    except ImportError as e:
        raise MissingDependency(f"{e}; or export it on a machine with deepspeed (llave-fast export --run {run_dir}) "
                          "and evaluate the exported folder") from e


# ------------------------------------------------------------------------------ MMEB-eval files
MMEB_PROTOCOL = ("per-query candidate lists (MMEB eval, as VLM2Vec/LLaVE score it): a hit when the first "
                 "candidate scores highest, ties to the first")
MMEB_CACHE_DIR = "mmeb_eval_cache"
MMEB_RESULT_FILE = "mmeb_eval.json"
# what identifies a model folder's contents in the resume cache: weights, configs, tokenizer files
_MODEL_FILE_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".json", ".model", ".txt", ".tiktoken", ".jinja")
_RESULT_FILES = frozenset({MMEB_RESULT_FILE, "video_eval.json", "eval.json"})
_CACHE_VERSION = 2  # bump when a cached result would no longer mean the same thing (2: LLaVE's placeholder rule)
_TOKENIZE_CHUNK = 4096


def model_key(model_path: str, dev: torch.device, dt: torch.dtype) -> dict:
    """What identifies a model evaluation in the resume cache: the path as given and resolved,
    the names, sizes and modification times of the model folder's files (weights, config,
    preprocessor and tokenizer files: a re-saved or edited model is not reused), a run folder's
    newest complete checkpoint, and the device type and dtype."""
    from . import checkpoint as ckpt
    from .export import is_run_dir

    key = {"model": model_path, "device": dev.type, "dtype": dtype_label(dt)}
    if not os.path.exists(model_path):  # a hub id
        return key
    key["model_abspath"] = os.path.abspath(model_path)
    if is_run_dir(model_path):
        key["checkpoint"] = ckpt.latest_complete(os.path.join(model_path, "checkpoints"))
        return key
    files = []
    for name in sorted(os.listdir(model_path)):
        full = os.path.join(model_path, name)
        # the model's own files; not what an evaluation may have written there, nor hidden files
        if os.path.isfile(full) and name.endswith(_MODEL_FILE_SUFFIXES) and name not in _RESULT_FILES \
                and not name.startswith("."):
            st = os.stat(full)
            files.append([name, st.st_size, st.st_mtime_ns])
    key["model_files"] = files  # ("files" are the dataset's, in the cache key)
    return key


def _images_key(paths) -> list:
    """The images a dataset's rows name, as the cache key sees them: their count and a digest of
    each file's :func:`_file_key` (path, size, modification time: a replaced image is not reused; a
    missing one gives a key no cache holds)."""
    import hashlib

    h = hashlib.sha256()
    for path in paths:
        try:
            h.update(json.dumps(_file_key(path)).encode() + b"\n")
        except OSError:
            return [len(paths), f"missing: {path}"]
    return [len(paths), h.hexdigest()[:16]]


def _read_cache(path: str) -> dict | None:
    """A dataset's cache file, read once: ``{"key", "result", "image_paths"}`` (None: no file, or one
    that cannot be read as such, said in the log; either way the dataset is recomputed). A file that
    lists no image paths gets an empty list: its key then matches only a dataset without images."""
    if not os.path.exists(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            cached = json.load(f)
        entry = {"key": cached["key"], "result": cached["result"], "image_paths": cached.get("image_paths")}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        logger.info("%s: unreadable cache (%s: %s); recomputing", path, type(exc).__name__, exc)
        return None
    if not isinstance(entry["key"], dict):
        logger.info("%s: unreadable cache (its key is a %s); recomputing", path, type(entry["key"]).__name__)
        return None
    if not isinstance(entry["image_paths"], list):
        entry["image_paths"] = []
    return entry


def _file_key(path: str) -> list:
    st = os.stat(path)
    return [os.path.abspath(path), st.st_size, st.st_mtime_ns]


def _write_json_atomic(path: str, obj) -> None:
    """Write JSON to ``path`` through a temporary file, fsync and a rename: an interrupted or failed
    write never leaves a half file behind (nor its temporary file); a full disk is named as such."""
    from .checkpoint import write_atomic

    write_atomic(path, json.dumps(obj, indent=2))


def _cache_file(output_dir: str, name: str) -> str:
    safe = "".join(c if c.isalnum() or c in "-_.+" else "_" for c in name)
    return os.path.join(output_dir, MMEB_CACHE_DIR, f"{safe}.json")


def _cached_result(entry: dict | None, key: dict, path: str) -> dict | None:
    """The cached result of a :func:`_read_cache` entry if it was computed with ``key``; else None,
    saying why."""
    if entry is None:
        return None
    old = entry["key"]
    if old != key:
        diff = sorted(k for k in set(old) | set(key) if old.get(k) != key.get(k))
        what = "; ".join(f"{k}: {old.get(k)!r} -> {key.get(k)!r}" for k in diff)
        logger.info("%s: cached with other settings (%s); recomputing", path, what)
        return None
    return entry["result"]


def _image_size(path: str, origin) -> tuple[int, int]:
    """(height, width) from the image's header (the pixels are not decoded)."""
    from PIL import Image

    from .data.mmeb import BadDataError

    try:
        with Image.open(path) as im:
            width, height = im.size
    except Exception as exc:  # noqa: BLE001 - PIL raises many types for a bad file
        raise BadDataError(origin[0], origin[1], f"image {path} cannot be read ({type(exc).__name__}: {exc})",
                           origin[2] if len(origin) > 2 else None,
                           hint=False) from exc
    return height, width


def _load_image(path: str, origin):
    from .data.mmeb import BadDataError, open_rgb

    try:
        return open_rgb(path)  # the pixel limit (MAX_IMAGE_PIXELS) applies here too
    except Exception as exc:  # noqa: BLE001 - PIL raises many types for a bad file
        raise BadDataError(origin[0], origin[1], f"image {path} cannot be read ({type(exc).__name__}: {exc})",
                           origin[2] if len(origin) > 2 else None,
                           hint=False) from exc


def input_lengths(processor, pairs, origin=None) -> list[int]:
    """Approximate sequence length of each (text, image path) input: the text's tokens plus the
    image's visual tokens (from its header size), to sort inputs into batches of like length."""
    texts = [t for t, _ in pairs]
    lengths = []
    for lo in range(0, len(texts), _TOKENIZE_CHUNK):
        ids = processor.tokenizer(texts[lo:lo + _TOKENIZE_CHUNK], add_special_tokens=False)["input_ids"]
        lengths += [len(x) for x in ids]
    sizes: dict[str, int] = {}
    for k, (_, img) in enumerate(pairs):
        if img is not None:
            if img not in sizes:
                sizes[img] = processor.num_image_tokens(*_image_size(img, origin[k] if origin else (img, None)))
            lengths[k] += sizes[img]
    return lengths


def _processor_error(processor, texts, images, idx, origin, exc):
    """The row a processor error comes from, as a BadDataError, or None when no single input fails."""
    from .data.mmeb import BadDataError

    for j, k in enumerate(idx):
        try:
            processor.build_prompt(texts[j], images[j] is not None, 0)
        except (ValueError, TypeError) as one:
            src, row, line = (tuple(origin[k]) + (None,))[:3] if origin else ("input", k, None)
            return BadDataError(src, row, str(one).replace("texts[0]", "the text").replace("images[0]", "its image"),
                                line, hint=False)
    return None


@torch.no_grad()
def encode_pairs(model, pairs, *, batch: int = 64, origin=None, desc: str | None = None,
                 progress: bool = True) -> torch.Tensor:
    """Embeddings (n, d) float32 on the CPU of distinct (text, image path or None) inputs.

    Inputs are sorted by length (text-and-image inputs apart from text-only ones, longest
    first, so padding stays small and a batch too large for memory fails at once), images
    are opened per batch and let go after it. ``origin[k]`` = (file, row from 0[, line from 1]) names the row
    behind input k in errors. A tqdm bar counts encodings ("enc").
    """
    from tqdm.auto import tqdm

    n = len(pairs)
    if n == 0:
        return torch.empty(0, model.embed_dim)
    processor = model.processor
    # an image whose text has no placeholder is still opened (LLaVE opens every image: a broken one is an
    # error) and then dropped by the processor under LLaVE's rule (apply_eval_protocol)
    lengths = input_lengths(processor, pairs, origin)
    order = sorted(range(n), key=lambda k: (pairs[k][1] is not None, lengths[k]), reverse=True)
    out = None
    with tqdm(total=n, unit="enc", desc=desc, disable=not progress, file=sys.stderr) as bar:
        for lo in range(0, n, batch):
            idx = order[lo:lo + batch]
            texts = [pairs[k][0] for k in idx]
            images = [None if pairs[k][1] is None else _load_image(pairs[k][1], origin[k] if origin else (pairs[k][1], None))
                      for k in idx]
            try:
                inputs = processor(texts, images)
            except (ValueError, TypeError) as exc:
                bad = _processor_error(processor, texts, images, idx, origin, exc)
                if bad is None:
                    raise
                raise bad from exc
            emb = model(inputs).float().cpu()
            if out is None:
                out = torch.empty(n, emb.shape[1], dtype=torch.float32)
            out[torch.as_tensor(idx)] = emb
            bar.update(len(idx))
    return out


def drops_image(processor, text) -> bool:
    """Whether ``processor`` drops the image of an input with this text (LLaVE: no placeholder in it)."""
    from .model.processor import has_placeholder

    return (getattr(processor, "image_without_placeholder", "drop") == "drop" and isinstance(text, str)
            and not has_placeholder(text))


def candidate_list_hits(emb: torch.Tensor, queries, candidates) -> torch.Tensor:
    """MMEB's hit rule for each query: its first candidate (the positive) scores at least as
    high as every other (``score[0] >= max(score[1:])``: ties go to the first candidate, as
    ``numpy.argmax`` in VLM2Vec's scorer). ``emb``: (P, d) embeddings of the distinct inputs;
    ``queries[q]``: query q's row of ``emb``; ``candidates[q]``: its candidates' rows.

    Each distinct candidate embedding of a list is scored once and the scores are indexed back,
    so candidates with bit-identical embeddings (one input listed twice, the same image under two
    paths, images dropped under LLaVE's rule leaving the same text) get bit-identical scores: a
    matrix-vector product over the copies rounds them differently in the last bits, which
    decided such ties by the copies' positions in the batch.
    """
    emb = emb.float()
    hits = torch.zeros(len(queries), dtype=torch.bool)
    if emb.shape[0] == 0:
        return hits
    # one id per distinct embedding (by value), and a row holding each
    _, content = torch.unique(emb, dim=0, return_inverse=True)
    rep = torch.empty(int(content.max()) + 1, dtype=torch.long)
    rep[content.flip(0)] = torch.arange(emb.shape[0] - 1, -1, -1)  # the first row of each value
    for q, (qi, cands) in enumerate(zip(queries, candidates)):
        idx = torch.as_tensor(cands, dtype=torch.long)
        if idx.numel() == 1:
            hits[q] = True
            continue
        distinct, inverse = torch.unique(content[idx], return_inverse=True)
        scores = (emb[rep[distinct]] @ emb[qi])[inverse]
        hits[q] = bool(scores[0] >= scores[1:].max())
    return hits


def _mean(values) -> float | None:
    values = list(values)
    return sum(values) / len(values) if values else None


def summarize_mmeb(per_dataset: dict) -> dict:
    """``datasets`` plus the means MMEB reports: per meta-task, IND / OOD, overall. A mean over
    no dataset is None (null in the JSON); datasets outside MMEB's table count in overall only."""
    from .data.mmeb_tasks import META_TASKS, MMEB_TASKS

    scores = {n: r["p_at_1"] for n, r in per_dataset.items()}
    return {
        "datasets": per_dataset,
        "meta_tasks": {m: _mean(s for n, s in scores.items() if per_dataset[n]["meta_task"] == m) for m in META_TASKS},
        "ind": _mean(s for n, s in scores.items() if per_dataset[n]["split"] == "ind"),
        "ood": _mean(s for n, s in scores.items() if per_dataset[n]["split"] == "ood"),
        "overall": _mean(scores.values()),
        "num_datasets": len(scores),
        "mmeb_not_scored": [n for n in MMEB_TASKS if n not in scores],
    }


def _warn_near_mmeb_names(names) -> None:
    """A dataset named almost like one of MMEB's (``MSCOCO-i2t`` for ``MSCOCO_i2t``) counts as "other":
    outside the meta-task, IND and OOD means. Say so, with the name it was probably meant to be."""
    import difflib

    from .data.mmeb_tasks import MMEB_TASKS

    known = {n.lower().replace("-", "_"): n for n in MMEB_TASKS}
    for name in names:
        if name in MMEB_TASKS:
            continue
        near = known.get(name.lower().replace("-", "_")) or next(
            iter(difflib.get_close_matches(name, list(MMEB_TASKS), n=1, cutoff=0.85)), None)
        if near is not None:
            logger.warning("dataset %r is not one of MMEB's 36 (did you mean %r?): it is scored, but left out of the "
                           "meta-task, IND and OOD means; rename its file or folder to count it there", name, near)


def mmeb_eval(model, datasets, *, image_dir: str | None = None, max_queries: int | None = None, batch: int = 64,
              output_dir: str | None = None, key: dict | None = None, info: dict | None = None,
              progress: bool = True) -> dict:
    """Precision@1 of MMEB-eval datasets (:func:`llave_fast.data.mmeb_eval.find_eval_datasets`).

    ``model``: an embedder, or a zero-argument function returning one (called only when a
    dataset is not cached). Every query of each dataset unless ``max_queries`` caps it. With
    ``output_dir``, each dataset's result is written to ``output_dir/mmeb_eval_cache/<name>.json``
    as soon as it is done, with ``key`` (the model and precision, :func:`model_key`), the
    dataset's files and the settings; a rerun reuses a cached result only when all of these
    match, so an interrupted evaluation resumes where it stopped. The summary
    (:func:`summarize_mmeb`, plus ``info``) goes to ``output_dir/mmeb_eval.json``.
    """
    from .data.mmeb_eval import read_eval_set
    from .data.mmeb_tasks import meta_task_of, split_of

    get_model = model if callable(model) and not isinstance(model, torch.nn.Module) else (lambda: model)
    if max_queries is not None and (not isinstance(max_queries, int) or max_queries < 1):
        raise InvalidArgument(f"max_queries must be a positive integer or None (every query), got {max_queries!r}")
    if output_dir is not None:
        os.makedirs(os.path.join(output_dir, MMEB_CACHE_DIR), exist_ok=True)
    per_dataset = {}
    _warn_near_mmeb_names([ds.name for ds in datasets])
    for n_done, ds in enumerate(datasets):
        ds_key = json.loads(json.dumps({
            "version": _CACHE_VERSION, **(key or {}), "dataset": ds.name, "files": [_file_key(f) for f in ds.files],
            "image_dir": None if image_dir is None else os.path.abspath(image_dir), "max_queries": max_queries}))
        cache = None if output_dir is None else _cache_file(output_dir, ds.name)
        # the key also covers the images the rows name: checked from the paths the cache lists (no table read)
        entry = None if cache is None else _read_cache(cache)
        result = None if entry is None else _cached_result(entry, dict(ds_key, images=_images_key(entry["image_paths"])),
                                                          cache)
        tag = f"[{n_done + 1}/{len(datasets)}] {ds.name}"
        if result is not None:
            logger.info("%s: P@1 %.1f%% (%d queries), from %s", tag, 100 * result["p_at_1"], result["num_queries"],
                        cache)
        else:
            es = read_eval_set(ds, image_dir, max_queries)
            image_paths = sorted({img for _text, img in es.pairs if img is not None})
            ds_key["images"] = _images_key(image_paths)
            m = get_model()
            dropped = sum(1 for t, img in es.pairs if img is not None and drops_image(m.processor, t))
            if dropped:
                logger.info(f"{tag}: {dropped} of {len(es.pairs)} distinct inputs have an image but no image placeholder "
                     "(<|image_1|>) in their text: LLaVE drops such an image and embeds the text alone "
                     "(llava/model/llava_arch.py, prepare_inputs_labels_for_multimodal), and so does this evaluation")
            t0 = time.perf_counter()
            emb = encode_pairs(m, es.pairs, batch=batch, origin=es.origin, desc=ds.name, progress=progress)
            hits = candidate_list_hits(emb, es.queries, es.candidates)
            result = {
                "p_at_1": int(hits.sum()) / es.num_queries,
                "num_queries": es.num_queries,
                "num_hits": int(hits.sum()),
                "meta_task": meta_task_of(ds.name),
                "split": split_of(ds.name),
                "num_encoded": len(es.pairs),
                "images_dropped": dropped,
                "num_candidates": es.num_candidate_slots,
                "files": list(ds.files),
                "seconds": round(time.perf_counter() - t0, 3),
            }
            if cache is not None:
                _write_json_atomic(cache, {"key": ds_key, "result": result, "image_paths": image_paths})
            slots = result["num_queries"] + result["num_candidates"]
            logger.info(f"{tag}: P@1 {100 * result['p_at_1']:.1f}% ({result['num_queries']} queries, "
                 f"{result['num_encoded']} distinct inputs encoded for {slots} query and candidate slots, "
                 f"{result['seconds']:.1f} s)")
        per_dataset[ds.name] = result
    summary = summarize_mmeb(per_dataset)
    out = {"p_at_1": summary["overall"], **summary, "max_queries": max_queries, "protocol": MMEB_PROTOCOL,
           **(info or {})}
    if output_dir is not None:
        _write_json_atomic(os.path.join(output_dir, MMEB_RESULT_FILE), out)
    return out


def _pct(x) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}"


def format_mmeb_table(result: dict) -> str:
    """The result of :func:`mmeb_eval` as a markdown table: datasets grouped by meta-task (in
    MMEB's order; datasets outside MMEB last), P@1 in percent, then the means."""
    from .data.mmeb_tasks import META_TASKS, MMEB_TASKS

    ds = result["datasets"]
    rank = {n: i for i, n in enumerate(MMEB_TASKS)}
    lines = ["| meta-task | dataset | IND/OOD | queries | P@1 (%) |", "|---|---|---|---:|---:|"]
    for m in (*META_TASKS, None):
        names = [n for n in ds if ds[n]["meta_task"] == m]
        names.sort(key=lambda n: rank.get(n, len(rank)))
        for n in names:
            split = (ds[n]["split"] or "-").upper()
            lines.append(f"| {m or 'other'} | {n} | {split} | {ds[n]['num_queries']} | {_pct(ds[n]['p_at_1'])} |")
    for m in META_TASKS:
        k = sum(1 for n in ds if ds[n]["meta_task"] == m)
        if k:
            lines.append(f"| **{m}** | mean of {k} | | | **{_pct(result['meta_tasks'][m])}** |")
    for s in ("ind", "ood"):
        k = sum(1 for n in ds if ds[n]["split"] == s)
        if k:
            lines.append(f"| **{s.upper()}** | mean of {k} | | | **{_pct(result[s])}** |")
    lines.append(f"| **overall** | mean of {len(ds)} | | {sum(d['num_queries'] for d in ds.values())} | "
                 f"**{_pct(result['overall'])}** |")
    return "\n".join(lines)
