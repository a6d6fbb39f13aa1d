"""Each ``llave-fast`` command's handler (``args`` -> exit status): train, export, eval, eval-video,
ablate. A handler checks the paths it is given, calls the library, and prints the results on
stdout (notes go to stderr); its errors go up to :func:`llave_fast.cli.main`."""

from __future__ import annotations

import contextlib
import json
import os
import sys

from .cli_console import PROG, UsageError
from .cli_train_flags import train_config_from_args

__all__ = ["COMMANDS"]


def _train(args) -> int:
    from .train import train

    cfg = train_config_from_args(args)
    if cfg.output_dir is not None and os.path.exists(cfg.output_dir) and not os.path.isdir(cfg.output_dir):
        raise UsageError(f"--output-dir {cfg.output_dir!r} is a file, not a folder")
    model = cfg.model
    if isinstance(model, str) and model != "tiny" and not model.startswith("arch:") and _looks_local(model):
        _existing("--model", model)  # before a run folder is made
        _model_folder("--model", model, run_ok=False)
    try:
        with _hub_model_named("--model", model if isinstance(model, str) else ""):
            train(cfg)
    except KeyboardInterrupt:
        _say_where_to_resume(cfg.output_dir)
        raise
    return 0


def _say_where_to_resume(out: str | None) -> None:
    """After an interrupt (rank 0): the newest complete checkpoint, and the command that resumes it."""
    from . import checkpoint as ckpt

    if out is None or os.environ.get("RANK", "0") != "0" or not os.path.isdir(out):
        return
    tag = ckpt.latest_complete(os.path.join(out, "checkpoints"))
    if tag is None:
        print(f"{PROG} train: no complete checkpoint in {out} yet: a rerun starts from step 0", file=sys.stderr)
        return
    print(f"{PROG} train: the newest complete checkpoint is {os.path.join(out, 'checkpoints', tag)} "
          f"(step {ckpt.step_of(tag)}); "
          f"rerun the same command with --output-dir {out} to resume from it", file=sys.stderr)


def _existing(flag: str, path: str | None, kind: str = "folder") -> None:
    """Refuse a path flag that names nothing, naming the flag and what it got."""
    if path is None:
        return
    if not os.path.exists(path):
        raise UsageError(f"{flag} {path!r}: no such {kind}")
    if kind == "folder" and not os.path.isdir(path):
        raise UsageError(f"{flag} {path!r}: not a folder")
    if kind == "file" and not os.path.isfile(path):
        raise UsageError(f"{flag} {path!r}: not a file")


def _writable_file(flag: str, path: str | None) -> None:
    """Refuse, before any work, a file flag the result could not be written to (a folder, a missing
    or read-only parent folder): the evaluation would run to its end and lose the file."""
    if path is None:
        return
    if os.path.isdir(path):
        raise UsageError(f"{flag} {path!r}: a folder; give a file name")
    if os.path.exists(path):  # an existing file (or /dev/stdout) is opened for writing: it alone must allow it
        if not os.access(path, os.W_OK):
            raise UsageError(f"{flag} {path!r}: not writable")
        return
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise UsageError(f"{flag} {path!r}: its folder {parent!r} does not exist")
    if not os.access(parent, os.W_OK):
        raise UsageError(f"{flag} {path!r}: its folder {parent!r} is not writable")


def _output_folder(flag: str, path: str | None) -> None:
    """Refuse, before any work, an output folder that is a file or cannot be made or written."""
    if path is None:
        return
    if os.path.exists(path) and not os.path.isdir(path):
        raise UsageError(f"{flag} {path!r}: a file, not a folder")
    probe = path
    while not os.path.exists(probe):  # the nearest folder that exists must be writable
        probe = os.path.dirname(os.path.abspath(probe))
    if not os.path.isdir(probe) or not os.access(probe, os.W_OK):
        raise UsageError(f"{flag} {path!r}: cannot be written ({probe} is not a writable folder)")


def _model_folder(flag: str, path: str, *, run_ok: bool = True) -> None:
    """Refuse, naming the flag, a folder that is no model (the loader would say "no config.json"):
    a run's checkpoints folder or one of its step folders (saying which run folder to give), a
    training run's folder where one is not taken (``run_ok=False``: train starts from weights), or
    any other folder (naming the model folders found below it)."""
    from .export import is_run_dir

    if not os.path.isdir(path) or os.path.isfile(os.path.join(path, "config.json")):
        return
    if is_run_dir(path):
        if run_ok:
            return
        raise UsageError(f"{flag} {path!r} is a training run folder, not a model: to continue that run, give "
                         f"--output-dir {path} (it resumes from its newest complete checkpoint); to start a new run "
                         f"from its weights, make them a model folder with '{PROG} export --run {path}' and give "
                         f"{flag} {os.path.join(path, 'export')}")
    here = os.path.abspath(path).rstrip(os.sep)
    parent, name = os.path.dirname(here), os.path.basename(here)
    if name == "checkpoints" and is_run_dir(parent):
        raise UsageError(f"{flag} {path!r} is a run's checkpoints folder, not a model: give the run folder "
                         f"{flag} {parent} (its newest complete checkpoint is used)")
    if os.path.basename(parent) == "checkpoints" and is_run_dir(os.path.dirname(parent)):
        run = os.path.dirname(parent)
        raise UsageError(f"{flag} {path!r} is a checkpoint of a training run, not a model: give the run folder "
                         f"{flag} {run} (its newest complete checkpoint is used), or make this step a model folder "
                         f"with '{PROG} export --run {run} --tag {name}' and give its output")
    inside = _model_folders_below(path, runs=run_ok)
    runs = "a training run's --output-dir, " if run_ok else ""
    hint = (f"; model folders inside it: {', '.join(inside[:3])}{' ...' if len(inside) > 3 else ''}" if inside else
            f": give a '{PROG} export' output, {runs}or a transformers-format LLaVE / LLaVA-OneVision folder")
    raise UsageError(f"{flag} {path!r} is not a model folder (no config.json in it){hint}")


def _model_folders_below(path: str, *, runs: bool, depth: int = 3, limit: int = 2000) -> list[str]:
    """Folders up to ``depth`` levels below ``path`` holding a config.json (a hub cache's
    ``snapshots/<hash>``, a parent of several exports), and training run folders if ``runs`` (else
    their ``export`` folders);
    breadth first, each level sorted, at most ``limit`` folders looked at (a home folder given by
    mistake answers at once)."""
    from .export import is_run_dir

    found, level, seen = [], [path], 0
    for _ in range(depth):
        nxt = []
        for folder in level:
            try:
                entries = sorted(os.scandir(folder), key=lambda e: e.name)
            except OSError:
                continue
            for e in entries:
                if e.name.startswith(".") or not e.is_dir():
                    continue
                seen += 1
                if seen > limit:
                    return found
                if is_run_dir(e.path):  # its base/ holds a config without weights: not looked into
                    export = os.path.join(e.path, "export")
                    if runs or os.path.isfile(os.path.join(export, "config.json")):
                        found.append(e.path if runs else export)
                elif os.path.isfile(os.path.join(e.path, "config.json")):
                    found.append(e.path)
                else:
                    nxt.append(e.path)
        level = nxt
    return found


@contextlib.contextmanager
def _hub_model_named(flag: str, model: str):
    """The hub id (owner/name) given as ``flag`` that the loader could not fetch: its message, naming the flag
    (it named the id alone). Another model the run loads (a checkpoint's base) keeps its own message."""
    from .errors import HubModelUnavailable

    try:
        yield
    except HubModelUnavailable as e:
        if e.model_id != model:
            raise
        raise UsageError(f"{flag} {e}") from e


def _looks_local(path: str) -> bool:
    """A path, not a hub id (owner/name): existing, or not of the hub's form (absolute, starting with ./, ../
    or ~, or not one slash); the loader's own test (``looks_like_hub_id``)."""
    from .model.embedder import looks_like_hub_id

    return os.path.exists(path) or not looks_like_hub_id(path)


def _one_process(command: str) -> None:
    """eval, eval-video, export and ablate run in one process: under torchrun or the deepspeed launcher
    every rank would do all of the work and write the same files."""
    world = os.environ.get("WORLD_SIZE", "1")
    if world.isdigit() and int(world) > 1:
        raise UsageError(f"{command} runs in one process (one device); it was started as one of {world} ranks "
                         f"(WORLD_SIZE={world}): every rank would do all of it and write the same files. Run "
                         f"'{PROG} {command} ...' without torchrun or the deepspeed launcher (train is the command "
                         "that runs across ranks)")


def _export(args) -> int:
    from .export import export_run, is_run_dir

    _one_process("export")
    _existing("--run", args.run)
    if not is_run_dir(args.run):
        raise UsageError(f"--run {args.run!r}: not a llave-fast training run folder (no train_config.json, base/ "
                         "or checkpoints/ inside; give the --output-dir of a training run)")

    path = export_run(args.run, args.output, dtype=args.dtype, tag=args.tag)
    print(f"exported to {path}")
    return 0


def _eval(args) -> int:
    from .data.image_root import outside_image_dir_allowed
    from .data.mmeb_eval import find_eval_datasets
    from .evaluate import data_paths, evaluate_model, format_mmeb_table

    _one_process("eval")
    if _looks_local(args.model):
        _existing("--model", args.model)
        _model_folder("--model", args.model)
    try:
        paths = data_paths(args.data)
    except ValueError as e:
        raise UsageError(f"--data: {e}") from e
    for path in paths:
        _existing("--data", path, kind="file or folder")
    _existing("--image-dir", args.image_dir)
    _writable_file("--output", args.output)
    _output_folder("--output-dir", args.output_dir)

    mmeb_eval_files = bool(paths) and find_eval_datasets(paths) is not None
    num_eval, max_queries = args.num_eval, args.max_queries
    if mmeb_eval_files:
        if num_eval is not None:
            if max_queries is not None:
                raise UsageError(f"--num-eval {num_eval} and --max-queries {max_queries}: with MMEB-eval files both "
                                 "cap the queries per dataset; give --max-queries alone")
            print(f"{PROG} eval: note: --num-eval {num_eval} with MMEB-eval files caps the queries of each dataset, "
                  f"as --max-queries {num_eval} does", file=sys.stderr)
            max_queries = num_eval
        if args.output_dir is None:
            print(f"{PROG} eval: note: no --output-dir, so no mmeb_eval.json and no per-dataset resume cache are "
                  "written (an interrupted evaluation starts over)", file=sys.stderr)
    else:
        if max_queries is not None:
            raise UsageError(f"--max-queries {max_queries} applies to MMEB-eval files (each query's own candidate "
                             "list); for the synthetic split and MMEB-train files use --num-eval")
        if args.output_dir is not None:
            raise UsageError(f"--output-dir {args.output_dir!r} applies to MMEB-eval files (mmeb_eval.json and its "
                             "resume cache); for the synthetic split and MMEB-train files use --output FILE")
    # stdout holds the JSON alone (`> metrics.json`): what a library prints while loading or encoding (DeepSpeed's
    # "Setting accelerator to CPU" on the stdout of the moment it is first imported) goes to stderr
    with outside_image_dir_allowed(args.allow_outside_image_dir), _no_training_hints(), \
            _hub_model_named("--model", args.model), contextlib.redirect_stdout(sys.stderr):
        result = evaluate_model(args.model, args.data, image_dir=args.image_dir,
                                num_eval=num_eval, seed=args.seed, image_size=args.image_size,
                                hard_family_size=args.hard_family_size, background=args.synthetic_background,
                                batch=args.batch, device=args.device, dtype=args.dtype,
                                max_queries=max_queries, output_dir=args.output_dir,
                                max_text_tokens=args.max_text_tokens)
    print(json.dumps(result, indent=2))
    if args.output:
        with open(args.output, "w") as f:
            json.dump(result, f, indent=2)
    if mmeb_eval_files:  # the table for people, after the JSON (stdout stays parseable: `> metrics.json`)
        where = f" (also in {os.path.join(args.output_dir, 'mmeb_eval.json')})" if args.output_dir else ""
        print(f"\nMMEB precision@1{where}:\n{format_mmeb_table(result)}", file=sys.stderr)
    return 0



@contextlib.contextmanager
def _no_training_hints():
    """A data error met by ``eval``, without the training reader's advice (--skip-bad-rows,
    --bad-images, --check-images are training flags: eval skips no row)."""
    from .data.bad_data import BadDataError

    try:
        yield
    except BadDataError as e:
        if e.hint is False:
            raise
        raise BadDataError(e.source, e.row, e.reason, e.line, hint=False) from e


def _ablate(args) -> int:
    from .ablate import format_report, run_ablation

    _one_process("ablate")
    result = run_ablation(args.output_dir, config=args.config, alphas=args.alphas, batches=args.batches,
                          seeds=args.seeds, steps=args.steps, global_batch=args.global_batch, num_eval=args.num_eval,
                          family_size=args.family_size, quick=args.quick)
    print(format_report(result))
    return 0


def _eval_video(args) -> int:
    from .eval_video import eval_video, format_metrics_table

    _one_process("eval-video")
    if _looks_local(args.model):
        _existing("--model", args.model)
        _model_folder("--model", args.model)
    _existing("--videos", args.videos)
    _existing("--annotations", args.annotations, kind="file or folder")
    _existing("--video-list", args.video_list, kind="file")
    _output_folder("--output-dir", args.output_dir)
    with _hub_model_named("--model", args.model):
        result = eval_video(args.model, args.videos, args.annotations, args.output_dir, max_frames=args.max_frames,
                            fps=args.fps, batch=args.batch, device=args.device, dtype=args.dtype,
                            max_length=args.max_length, video_list=args.video_list, limit=args.limit,
                            workers=args.workers, max_text_tokens=args.max_text_tokens)
    out = os.path.join(args.output_dir, "video_eval.json")
    print(f"zero-shot text-video retrieval: {result['num_videos']} videos, {result['num_captions']} captions, "
          f"{result['frames']['mean_frames']:.1f} frames a video on average ({result['device']}, {result['dtype']}; "
          f"videos {result['seconds']['videos']:.1f} s, captions {result['seconds']['captions']:.1f} s)")
    print(format_metrics_table(result))
    print(f"(R@k in % of queries, ranks 1-based; written to {out})")
    return 0


# what each command runs
COMMANDS = {"train": _train, "export": _export, "eval": _eval, "eval-video": _eval_video, "ablate": _ablate}
