"""``llave-fast export``: a run's sharded DeepSpeed checkpoint -> one model folder (bf16 by default, or fp32/fp16).

The folder is in transformers' format with the tokenizer and processor beside the
weights, so ``LLaVEEmbedder.from_pretrained(folder)`` loads it on any machine. Works on
the CPU, without the ranks that wrote the checkpoint: the ZeRO partitions are merged
from the files (deepspeed's zero_to_fp32), then cast.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import sys

import torch

from . import _locks
from . import checkpoint as ckpt
from .dtypes import DTYPES, dtype_name
from .errors import InvalidArgument, MissingDependency, MissingFile

log = logging.getLogger(__name__)


def is_run_dir(path: str) -> bool:
    """True for a training run's folder (``llave-fast train --output-dir``): it has
    ``train_config.json``, ``base/`` (the architecture, written when training starts) or
    ``checkpoints/``, and no model ``config.json``."""
    return (os.path.isdir(path) and not os.path.isfile(os.path.join(path, "config.json"))
            and any(os.path.exists(os.path.join(path, name)) for name in ("train_config.json", "base", "checkpoints")))


def no_checkpoint_message(run_dir: str) -> str:
    """What a run folder without a complete checkpoint means, and what can be done with it (eval and
    export need one: neither can help)."""
    root = os.path.join(run_dir, "checkpoints")
    log = os.path.join(run_dir, "train_log.jsonl")
    steps = 0
    if os.path.isfile(log):
        with open(log) as f:
            steps = sum(1 for line in f if line.strip())
    again = f"llave-fast train --output-dir {run_dir} with the run's options (it starts over there)"
    holder = _live_holder(run_dir)
    if holder is not None:
        return (f"{run_dir!r} is a training run folder whose run is still running ({holder}) and has saved no "
                f"complete checkpoint yet ({steps} step(s) logged): evaluate or export it once it has saved one "
                "(every --save-every steps and at its end)")
    if not os.path.isdir(root) and steps == 0:
        return (f"{run_dir!r} is a training run folder whose run never trained (no step logged, no checkpoint: it "
                f"stopped while starting); there is nothing to evaluate or export. Fix what stopped it and run "
                f"{again}")
    return (f"{run_dir!r} is a training run folder without a complete checkpoint (none under {root} has the "
            f"{ckpt.MARKER} marker; {steps} step(s) logged). A run saves one every --save-every steps and at its end: "
            f"if it is still running, evaluate or export it once it has saved; if it stopped before its first "
            f"save, nothing can be evaluated or exported: run {again}")


def _live_holder(run_dir: str) -> str | None:
    """Who holds the run folder's lock (a run still running), or None (no lock file, or its run ended)."""
    from .training.run_folder import LOCK_FILE

    return _locks.holder(os.path.join(run_dir, LOCK_FILE))


def consolidated_state_dict(run_dir: str, tag: str | None = None) -> tuple[dict, str]:
    """fp32 state dict of the embedder from the newest complete checkpoint (or ``tag``). Every file
    is read with ``torch.load(weights_only=True)`` (:func:`llave_fast.checkpoint.safe_load`): a file
    pickling anything else is refused, naming it, before anything in it runs."""
    root = os.path.join(run_dir, "checkpoints")
    tag = tag or ckpt.latest_complete(root)
    if tag is None:
        raise MissingFile(no_checkpoint_message(run_dir))
    try:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    except ImportError as e:
        raise MissingDependency(f"merging the ZeRO shards of {os.path.join(root, tag)} needs deepspeed "
                          "(pip install 'llave-fast[train]')") from e
    if not os.path.exists(os.path.join(root, tag, ckpt.MARKER)):
        done = ckpt.complete_tags(root)
        have = f"the complete ones are {', '.join(done)}" if done else "there is no complete one"
        what = "is not complete (no {} marker)".format(ckpt.MARKER) if os.path.isdir(os.path.join(root, tag)) else \
            "does not exist"
        raise MissingFile(f"checkpoint {os.path.join(root, tag)} {what}; {have} (tags are written "
                                f"{ckpt.tag_for(1)!r}, {ckpt.tag_for(200)!r}, ...)")
    ckpt.check_files(os.path.join(root, tag))
    # zero_to_fp32 loads with weights_only=False: within this block its loads are weights_only. It prints its
    # progress: to stderr, so that `export ... | head` or a caller parsing stdout sees only what llave-fast writes
    with ckpt.safe_zero_to_fp32(), contextlib.redirect_stdout(sys.stderr):
        return get_fp32_state_dict_from_zero_checkpoint(root, tag=tag), tag


def load_run_model(run_dir: str, *, dtype: torch.dtype = torch.float32, tag: str | None = None):
    """(the run's model with the weights of checkpoint ``tag``, the tag): ``tag`` None is the newest
    complete checkpoint, resolved once here, before anything is built, and loaded exactly (a run
    still training may complete another meanwhile). Every weight must land."""
    from .model import LLaVEEmbedder, LLaVEProcessor, load_config

    base = os.path.join(run_dir, "base")
    root = os.path.join(run_dir, "checkpoints")
    newest = tag is None
    tag = tag or ckpt.latest_complete(root)
    if tag is None:
        raise MissingFile(no_checkpoint_message(run_dir))
    if not os.path.isdir(base):
        raise MissingFile(f"{base} is missing: {run_dir!r} is not a llave-fast training run folder (training "
                                "writes base/ when it starts)")
    ckpt.check_files(os.path.join(root, tag))  # before the model is built
    config = load_config(base)
    processor = LLaVEProcessor.from_pretrained(base, config=config)
    model = LLaVEEmbedder.from_config(config, processor, torch_dtype=torch.float32)
    for _ in range(3):
        try:
            state, tag = consolidated_state_dict(run_dir, tag)
            break
        except (OSError, ValueError):
            # the newest checkpoint, removed meanwhile by the run still training (it keeps --keep-checkpoints):
            # the newest again; a tag the user named, or a checkpoint still there, fails as it is
            later = ckpt.latest_complete(root)
            if not newest or os.path.isdir(os.path.join(root, tag)) or later is None or later == tag:
                raise
            log.info("checkpoint %s was removed by the run still training while it was read: taking %s", tag, later)
            tag = later
    else:
        raise InvalidArgument(f"{run_dir}: the run still training removed three checkpoints in a row while they "
                              "were read; export once it has ended, or pass --tag of a checkpoint it keeps")
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise RuntimeError(f"checkpoint {tag} of {run_dir} does not match the model: missing {missing}, "
                           f"unexpected {unexpected}")
    return model.to(dtype).eval(), tag


def export_run(run_dir: str, output: str | None = None, *, dtype: str = "bf16", tag: str | None = None) -> str:
    """Write checkpoint ``tag`` (None: the newest complete one) of a run as one model folder in
    ``dtype`` (bf16, fp16 or fp32; also spelled bfloat16, float16 / half, float32) at ``output``
    (default ``RUN/export``); returns the folder."""
    dtype = dtype_name(dtype, name="dtype")
    output = output or os.path.join(run_dir, "export")
    _check_replaceable(output)
    model, tag = load_run_model(run_dir, dtype=DTYPES[dtype], tag=tag)
    new = f"{output.rstrip(os.sep)}.new-{os.getpid()}"
    _remove_dead_exports(output)
    try:
        if os.path.isdir(new):  # left by an earlier export of this process id
            shutil.rmtree(new)
        with ckpt.reporting_full_disk(new):
            model.save_pretrained(new)
            ckpt.write_atomic(os.path.join(new, EXPORT_NOTE),
                              f"run: {os.path.abspath(run_dir)}\ncheckpoint: {tag}\ndtype: {dtype}\n")
    except BaseException:
        shutil.rmtree(new, ignore_errors=True)
        raise
    _swap_in(new, output)
    return output


EXPORT_NOTE = "llave_fast_export.txt"


def _remove_dead_exports(output: str) -> None:
    """Remove ``OUTPUT.new-PID`` / ``OUTPUT.old-PID`` folders left by an export that was killed (its
    process is gone); one of a live export (another process) is left alone."""
    import re

    base = output.rstrip(os.sep) or output
    folder, name = os.path.split(os.path.abspath(base))
    pattern = re.compile(re.escape(name) + r"\.(new|old)-(\d+)$")
    for entry in os.listdir(folder) if os.path.isdir(folder) else []:
        m = pattern.match(entry)
        if m is None or int(m.group(2)) == os.getpid():
            continue
        try:
            os.kill(int(m.group(2)), 0)
            continue  # its export is still running
        except ProcessLookupError:
            pass
        except OSError:  # another user's process: alive
            continue
        shutil.rmtree(os.path.join(folder, entry), ignore_errors=True)
        log.info("removed %s, left by an export that was stopped", os.path.join(folder, entry))


def _check_replaceable(output: str) -> None:
    """An export replaces only a folder that is an earlier export (it has ``llave_fast_export.txt``)
    or empty: any other folder is refused, naming it, before anything is loaded."""
    if os.path.exists(output) and not os.path.isdir(output):
        raise InvalidArgument(f"--output {output!r} is a file, not a folder")
    if os.path.isdir(output) and os.listdir(output) and not os.path.isfile(os.path.join(output, EXPORT_NOTE)):
        raise InvalidArgument(f"--output {output!r} is a folder that holds other files and is not a llave-fast export "
                         f"(no {EXPORT_NOTE}): an export replaces its folder whole, so it refuses this one. Give a "
                         "new or empty folder, or an earlier export's")


def _swap_in(new: str, output: str) -> None:
    """Put the finished folder ``new`` at ``output``: the earlier export (if any) is renamed aside
    first and removed only once ``new`` is in place; a reader sees the old export or the new one,
    never a mix (between the two renames, for an instant, neither)."""
    output = output.rstrip(os.sep) or output  # rename "DIR/" as "DIR"
    old = None
    if os.path.exists(output):
        old = f"{output}.old-{os.getpid()}"
        if os.path.exists(old):
            shutil.rmtree(old)
        os.replace(output, old)
    try:
        os.replace(new, output)
    except BaseException:
        if old is not None:
            os.replace(old, output)  # put the earlier export back
        raise
    ckpt._fsync_dir(os.path.dirname(os.path.abspath(output)))
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
