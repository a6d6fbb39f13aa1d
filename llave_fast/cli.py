"""The ``llave-fast`` command: train, export, eval, eval-video, ablate.

    llave-fast train [--config tiny_cpu.json] [--output-dir DIR] [--steps 200 ...]
    llave-fast export --run DIR [--output DIR/export] [--dtype bf16]
    llave-fast eval --model PATH [--data synthetic | FILE_OR_DIR ... --image-dir DIR --output-dir OUT]
    llave-fast eval-video --model PATH --videos DIR --annotations FILE --output-dir OUT
    llave-fast ablate [--quick] [--alphas 0,9] [--batches 16,128] [--seeds 3] [--output-dir DIR]

``train`` with no other arguments trains the tiny demo model on the synthetic dataset
(CPU, a few minutes) and prints precision@1 before and after. Every field of the training
config is also a flag (``--global-batch 128``); flags override the config file, whose
values override the built-in ones (``llave-fast train --config X --help`` shows the value
that will apply). Under ``torchrun`` or the ``deepspeed`` launcher every rank runs the
same command.

Errors: a user error (a bad flag value, a missing file, bad data: an exception our own
checks raise, or a missing file wherever it is found) prints one line,
``llave-fast: error: ...``, and exits 1; anything else is an internal error and keeps its
traceback. ``--debug`` shows the traceback of every error.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import traceback
import types
import typing

from . import __version__
from ._checks import BACKENDS
from .errors import InvalidArgumentType, LlaveFastError

PROG = "llave-fast"
DEFAULT_CONFIG = "tiny_cpu.json"
# TrainConfig fields that only tests set: no flag in --help (they still parse). A field marks
# itself with metadata {"hidden": True} (stop_after does); more names can be listed here.
HIDDEN_FIELDS = frozenset({"stop_after"})
# choices of str fields, when the field's metadata does not give them ("choices")
FIELD_CHOICES = {"loss_backend": BACKENDS, "bad_images": ("skip", "fail")}


class UsageError(LlaveFastError):
    """A user error found by the command itself (printed without a traceback)."""


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad command line prints one error line and where to read more, not the
    whole usage (train's has some fifty flags)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n(see '{self.prog} --help')\n")


# -------------------------------------------------------------------------- logging
class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is when a record comes (as logging's own last-resort
    handler does), so a redirected stderr (ablate's per-run train.log, pytest's capture) gets it."""

    def __init__(self):
        super().__init__(sys.stderr)

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):  # StreamHandler's __init__ sets it; the property always answers sys.stderr
        pass


def configure_logging() -> None:
    """What the library logs (``logging.getLogger("llave_fast....")``: progress, notes, warnings)
    shown to a command-line user: INFO and up, the message alone, on stderr. Done once per process;
    stdout stays for the results a command prints."""
    root = logging.getLogger("llave_fast")
    if any(isinstance(h, _StderrHandler) for h in root.handlers):
        return
    handler = _StderrHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    root.addHandler(handler)
    root.setLevel(logging.INFO)


# -------------------------------------------------------------------------- which errors are the user's
_FILE_ERRORS = (FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError)


def is_user_error(exc: BaseException) -> bool:
    """True for an error the user can fix: one of llave-fast's own checks (every one raises a
    :class:`~llave_fast.errors.LlaveFastError`) or a file that is missing or unreadable. Any
    other exception, a ValueError from inside torch included, is a bug and gets a traceback."""
    return isinstance(exc, (LlaveFastError,) + _FILE_ERRORS)


def _message(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.filename is not None and exc.strerror:
        return f"{exc.strerror}: {exc.filename!r}"
    return str(exc) or type(exc).__name__


# -------------------------------------------------------------------------- train flags
def _optional_inner(tp):
    """(the type inside ``X | None``, True) or (tp, False)."""
    origin = typing.get_origin(tp)
    if origin is typing.Union or origin is getattr(types, "UnionType", None):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(tp)) == 2:
            return args[0], True
    return tp, False


def _bool(s: str) -> bool:
    low = s.lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {s!r}")


def _str_list(s: str) -> list[str]:
    items = [x.strip() for x in s.split(",")]
    if not all(items):
        raise argparse.ArgumentTypeError(f"expected a comma-separated list without empty items, got {s!r}")
    return items


def _named(fn, name):
    fn.__name__ = name  # argparse says "invalid <name> value: ..."
    return fn


def _flag_parser(tp, optional: bool):
    """The argparse ``type`` for a field of type ``tp``; 'none' unsets an optional field."""
    if typing.get_origin(tp) is list:
        base, name = _str_list, "comma-separated list"
    elif tp is bool:
        base, name = _bool, "true/false"
    elif tp in (int, float, str):
        base, name = tp, tp.__name__
    else:
        raise InvalidArgumentType(f"TrainConfig field type {tp!r} has no command-line form")
    if not optional:
        return _named(lambda s: base(s), name)
    return _named(lambda s: None if s.lower() == "none" else base(s), name + " or 'none'")


def _show(value) -> str:
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return ",".join(map(str, value))
    return str(value)


def _syntax(name: str, tp, optional: bool, choices) -> tuple[str, str]:
    """(metavar, a sentence on how to write the value)."""
    if choices:
        metavar, how = "{" + ",".join(choices) + "}", f"one of {', '.join(choices)}"
    elif typing.get_origin(tp) is list:
        metavar, how = "A,B,...", "a comma-separated list, e.g. A,B"
    elif tp is bool:
        metavar, how = "BOOL", "true or false (the flag alone means true)"
    else:
        metavar = {int: "INT", float: "FLOAT", str: "STR"}[tp]
        how = {int: "an integer", float: "a number", str: "text"}[tp]
    if optional:
        how += "; 'none' unsets it"
    return metavar, how


def _preset_for_help(argv: list[str]):
    """(config name, TrainConfig loaded from it or None, why not) for the train parser's help."""
    from .train import TrainConfig

    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", default=DEFAULT_CONFIG)
    known, _ = pre.parse_known_args(argv)
    try:
        return known.config, TrainConfig.from_json(known.config), None
    except Exception as e:  # noqa: BLE001 - help still works; the run itself reports the error
        return known.config, None, _message(e)


def _add_train_flags(p: argparse.ArgumentParser, argv: list[str]) -> None:
    from .train import TrainConfig

    config_name, preset, why = _preset_for_help(argv)
    p.add_argument("--config", default=DEFAULT_CONFIG, metavar="JSON",
                   help="training config JSON, a path or a shipped preset: tiny_cpu.json (the CPU demo), "
                        "llave_0.5b.json (ours: fine-tune LLaVE-0.5B, every pair of the global batch a negative), "
                        "llave_0.5b_recipe.json (LLaVE's published recipe for the 0.5B model). Its values replace "
                        f"the built-in defaults; flags replace both. Default: {DEFAULT_CONFIG}")
    if preset is None:
        p.description = (f"Defaults below are the built-in ones: the config {config_name!r} could not be read "
                         f"({why}).")
    else:
        p.description = (f"Each default below is the one that applies with --config {config_name}: the config's "
                         "value where it sets one, else the built-in one.")
    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        tp, optional = _optional_inner(hints[f.name])
        choices = f.metadata.get("choices") or FIELD_CHOICES.get(f.name)
        metavar, how = _syntax(f.name, tp, optional, choices)
        kind = _flag_parser(tp, optional)
        extra = {"nargs": "?", "const": True} if tp is bool else {}
        if f.metadata.get("hidden") or f.name in HIDDEN_FIELDS:
            text = argparse.SUPPRESS
        else:
            what = f.metadata.get("help", "").rstrip(".")
            applies = f.default if preset is None else getattr(preset, f.name)
            where = ""
            if preset is not None and applies != f.default:
                where = f" (from {config_name}; built-in {_show(f.default)})"
            text = f"{what}. Value: {how}. Default: {_show(applies)}{where}".replace("%", "%%")
        if choices:  # argparse checks the converted value: None is a choice of an optional field
            extra["choices"] = list(choices) + ([None] if optional else [])
        p.add_argument("--" + f.name.replace("_", "-"), dest=f.name, type=kind, default=argparse.SUPPRESS,
                       metavar=metavar, help=text, **extra)


def _check_types(cfg, source: str) -> None:
    """Refuse a config value of the wrong type (a preset file is not checked by argparse)."""
    hints = typing.get_type_hints(type(cfg))
    for f in dataclasses.fields(cfg):
        tp, optional = _optional_inner(hints[f.name])
        v = getattr(cfg, f.name)
        if v is None:
            ok = optional
        elif typing.get_origin(tp) is list:
            ok = isinstance(v, list) and all(isinstance(x, str) for x in v)
        elif tp is float:
            ok = isinstance(v, (int, float)) and not isinstance(v, bool)
        elif tp is int:
            ok = isinstance(v, int) and not isinstance(v, bool)
        else:
            ok = isinstance(v, tp)
        if not ok:
            want = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(tp, "a list of strings")
            raise UsageError(f"{source}: {f.name} must be {want}{' or null' if optional else ''}, got {v!r}")


def train_config_from_args(args):
    """The TrainConfig a ``train`` command line asks for: built-in < --config file < flags."""
    from .train import TrainConfig

    try:
        cfg = TrainConfig.from_json(args.config)
    except json.JSONDecodeError as e:
        raise UsageError(f"--config {args.config!r}: not valid JSON ({e})") from e
    except (FileNotFoundError, ValueError, TypeError) as e:
        raise UsageError(f"--config {args.config!r}: {_message(e)}") from e
    _check_types(cfg, f"--config {args.config!r}")
    for f in dataclasses.fields(TrainConfig):
        if hasattr(args, f.name):
            setattr(cfg, f.name, getattr(args, f.name))
    _drop_synthetic_only(cfg, args)
    _fit_preset_warmup(cfg, args)
    return cfg


def _drop_synthetic_only(cfg, args) -> None:
    """Real data (``--data FILES``) with a preset made for the synthetic data (the default
    tiny_cpu.json sets synthetic_tasks): the preset's synthetic-only options go back to their
    defaults, with a note naming them. Given as flags they stay, and check_config refuses them."""
    from .train import synthetic_only_options

    if cfg.data == "synthetic":
        return
    dropped = []
    for name, (value, default) in synthetic_only_options(cfg).items():
        if not hasattr(args, name):
            dropped.append(f"{name}={value!r}")
            setattr(cfg, name, default)
    if dropped:
        print(f"{PROG} train: note: --data is not synthetic; the config's synthetic-data options do not apply and "
              f"are left out: {', '.join(dropped)}", file=sys.stderr)


def _fit_preset_warmup(cfg, args) -> None:
    """A shorter run asked for on the command line (``--steps 2``) keeps working with a preset
    whose warm-up is longer than it: the preset's warm-up is cut to a tenth of the run, with a
    note. A warm-up the user gave as a flag is never changed (``check_config`` refuses it)."""
    if not hasattr(args, "steps") or hasattr(args, "warmup_steps") or hasattr(args, "warmup_ratio"):
        return
    if cfg.epochs is not None or cfg.warmup_ratio is not None or not isinstance(cfg.steps, int) or cfg.steps < 1:
        return
    if isinstance(cfg.warmup_steps, int) and cfg.warmup_steps >= cfg.steps:
        new = cfg.steps // 10
        print(f"{PROG} train: note: the config's warm-up ({cfg.warmup_steps} steps) is not shorter than --steps "
              f"{cfg.steps}; using --warmup-steps {new} (a tenth of the run). Give --warmup-steps to choose.",
              file=sys.stderr)
        cfg.warmup_steps = new


def _train(args) -> int:
    from .train import train

    train(train_config_from_args(args))
    return 0


def _existing(flag: str, path: str | None, kind: str = "folder") -> None:
    """Refuse a path flag that names nothing, naming the flag and what it got."""
    if path is None:
        return
    if not os.path.exists(path):
        raise UsageError(f"{flag} {path!r}: no such {kind}")
    if kind == "folder" and not os.path.isdir(path):
        raise UsageError(f"{flag} {path!r}: not a folder")


def _looks_local(path: str) -> bool:
    """A path, not a hub id (owner/name): absolute, relative with ./ or ../, or existing."""
    return os.path.isabs(path) or path.startswith((".", "~")) or os.path.exists(path) or path.count("/") != 1


def _export(args) -> int:
    from .export import export_run, is_run_dir

    _existing("--run", args.run)
    if not is_run_dir(args.run):
        raise UsageError(f"--run {args.run!r}: not a llave-fast training run folder (no train_config.json, base/ "
                         "or checkpoints/ inside; give the --output-dir of a training run)")

    path = export_run(args.run, args.output, dtype=args.dtype, tag=args.tag)
    print(f"exported to {path}")
    return 0


def _eval(args) -> int:
    from .data.mmeb import outside_image_dir_allowed
    from .data.mmeb_eval import find_eval_datasets
    from .evaluate import data_paths, evaluate_model, format_mmeb_table

    if _looks_local(args.model):
        _existing("--model", args.model)
    try:
        paths = data_paths(args.data)
    except ValueError as e:
        raise UsageError(f"--data: {e}") from e
    for path in paths:
        _existing("--data", path, kind="file or folder")
    _existing("--image-dir", args.image_dir)

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
    with outside_image_dir_allowed(args.allow_outside_image_dir):  # the readers' default, for this call
        result = evaluate_model(args.model, args.data, image_dir=args.image_dir,
                                num_eval=256 if num_eval is None else num_eval, seed=args.seed,
                                image_size=args.image_size, batch=args.batch, device=args.device, dtype=args.dtype,
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


def _positive_int(s: str) -> int:
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {s!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {s!r}")
    return v


def _ablate(args) -> int:
    from .ablate import format_report, run_ablation

    result = run_ablation(args.output_dir, config=args.config, alphas=args.alphas, batches=args.batches,
                          seeds=args.seeds, steps=args.steps, global_batch=args.global_batch, num_eval=args.num_eval,
                          family_size=args.family_size, quick=args.quick)
    print(format_report(result))
    return 0


def _add_ablate_flags(p: argparse.ArgumentParser) -> None:
    from . import ablate as A

    p.description = (
        "Train the tiny setting (--config, in this process, one rank) over alpha x pairs per loss x seeds and "
        "report held-out precision@1: OUT/ablation.json (one record per run; a rerun skips the runs recorded), "
        "OUT/ablation.png and a table of mean ± std over seeds. Every run has the same global batch (the largest "
        "of --batches), steps, schedule and data order per seed; a smaller --batches value b cuts each global "
        "batch into micro-batches of b pairs whose losses see only their own pairs (LLaVE's negatives), the "
        "largest makes every pair of the global batch a negative. The synthetic data come in families of "
        "--family-size scenes that differ in one attribute of one object, held together in batches, in the "
        "held-out split too.").replace("%", "%%")
    p.add_argument("--output-dir", default=A.DEFAULT_OUTPUT, metavar="DIR",
                   help=f"where ablation.json, ablation.png and the runs go. Default: {A.DEFAULT_OUTPUT}")
    try:
        q = A.plan(quick=True)
        now = (f"; with {A.DEFAULT_CONFIG} and the default --alphas/--batches: {len(A.grid(q))} runs of {q['steps']} "
               f"steps x {q['global_batch']} pairs (minutes on 2 CPU cores: README, Ablation)")
    except Exception:  # noqa: BLE001 - the help still works; a run reports the error
        now = ""
    p.add_argument("--quick", action="store_true",
                   help=f"the small grid: {A.QUICK_SEEDS} seed per cell, half the preset's training pairs per run, "
                        f"{A.QUICK_NUM_EVAL} held-out queries{now}. Explicit flags still override")
    p.add_argument("--alphas", default=",".join(f"{a:g}" for a in A.DEFAULT_ALPHAS), metavar="A,B,...",
                   help="hardness weights of the loss, comma-separated numbers (0: plain InfoNCE; LLaVE: 9). "
                        "Default: %(default)s")
    p.add_argument("--batches", default=",".join(map(str, A.DEFAULT_BATCHES)), metavar="B,C,...",
                   help="pairs per loss (each query's negatives: the other pairs of its loss batch), comma-separated "
                        "integers, each dividing the global batch and a multiple of --family-size. Default: "
                        "%(default)s")
    p.add_argument("--seeds", type=int, default=None, metavar="N",
                   help=f"seeds per cell (0..N-1: initialisation, data and data order). Default: {A.DEFAULT_SEEDS} "
                        f"({A.QUICK_SEEDS} with --quick)")
    p.add_argument("--steps", type=int, default=None, metavar="N",
                   help="optimizer steps per run. Default: as many training pairs as the preset's run "
                        "(steps x global_batch of --config; half with --quick); warm-up scales with it")
    p.add_argument("--global-batch", type=int, default=None, metavar="N",
                   help="pairs per optimizer step, every run. Default: the largest of --batches")
    p.add_argument("--num-eval", type=int, default=None, metavar="N",
                   help=f"held-out queries per run. Default: the preset's ({A.QUICK_NUM_EVAL} with --quick)")
    p.add_argument("--family-size", type=int, default=A.DEFAULT_FAMILY_SIZE, metavar="K",
                   help="scenes per hard-negative family (hard_family_size; 1: independent scenes). "
                        "Default: %(default)s")
    p.add_argument("--config", default=A.DEFAULT_CONFIG, metavar="JSON",
                   help="the training preset each run starts from (tiny model, synthetic data). Default: %(default)s")


def _positive_float(s: str) -> float:
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {s!r}") from None
    if not v > 0 or v == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {s!r}")
    return v


def _eval_video(args) -> int:
    from .eval_video import eval_video, format_metrics_table

    if _looks_local(args.model):
        _existing("--model", args.model)
    _existing("--videos", args.videos)
    _existing("--annotations", args.annotations, kind="file or folder")
    _existing("--video-list", args.video_list, kind="file")
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


def _text_cut(s: str):
    if s == "saved":
        return s
    try:
        return _positive_int(s)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected a positive integer or 'saved', got {s!r}") from None


def _dtype_spelling(s: str) -> str:
    """A precision's other spellings (bfloat16, torch.float16, half, ...) as its short name; anything
    else as it is, for argparse's choices to refuse."""
    from .dtypes import DTYPE_ALIASES

    key = s[len("torch."):] if s.startswith("torch.") else s
    return DTYPE_ALIASES.get(key, s)


def add_dtype_flag(p: argparse.ArgumentParser, *, choices, default: str, help: str) -> None:
    """The one ``--dtype`` flag of export, eval and eval-video: the short names (bf16, fp16, fp32,
    plus a command's own choices), the long ones (bfloat16, float16 / half, float32) accepted too."""
    from .dtypes import DTYPE_ALIASES

    also = ", ".join(f"{alias} = {short}" for alias, short in DTYPE_ALIASES.items() if short in choices)
    p.add_argument("--dtype", default=default, type=_dtype_spelling, choices=list(choices),
                   help=f"{help} (also accepted: {also}). Default: {default}")


def _add_precision_flags(p: argparse.ArgumentParser) -> None:
    """--device, --dtype and --max-text-tokens of the evaluation commands (see
    llave_fast.evaluate.eval_precision and apply_eval_protocol)."""
    from .evaluate import EVAL_PRECISIONS

    p.add_argument("--device", default="auto",
                   help="auto (CUDA when present, else CPU), cuda, cuda:N or cpu. Default: auto")
    add_dtype_flag(p, choices=EVAL_PRECISIONS, default="auto",
                   help="precision: auto = bf16 weights on CUDA, fp32 on CPU; llave = LLaVE's own evaluation "
                        "precision, fp16 weights with every forward under bf16 autocast (CUDA only): the one that "
                        "reproduces LLaVE's numbers")
    p.add_argument("--max-text-tokens", type=_text_cut, default=None, metavar="N|saved",
                   help="cut each text alone to N tokens, or 'saved': to the cut the model was trained with "
                        "(train's --max-text-tokens, saved with it). Default: no such cut, as LLaVE evaluates "
                        "(only the whole sequence is cut, at the model's max_length, e.g. 4096)")


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The whole command line; ``argv`` (the arguments) picks the preset whose defaults train's help shows."""
    from .dtypes import DTYPES

    argv = [] if argv is None else argv
    parser = _Parser(
        prog=PROG, description="Train and evaluate LLaVE-style multimodal embedding models at large batch.",
        epilog=f"'{PROG} COMMAND --help' describes each command's options.")
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    parser.add_argument("--debug", action="store_true", help="show the Python traceback of any error")
    sub = parser.add_subparsers(dest="command", metavar="{train,export,eval,eval-video,ablate}", parser_class=_Parser)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show the Python traceback of any error")

    train_argv = argv[argv.index("train") + 1:] if "train" in argv else []
    p_train = sub.add_parser("train", parents=[common], help="train (default job: tiny LLaVE on synthetic data, CPU)")
    _add_train_flags(p_train, train_argv)

    p_export = sub.add_parser("export", parents=[common],
                              help="consolidate a run's newest complete checkpoint into a 16-bit model folder")
    p_export.add_argument("--run", required=True, metavar="DIR", help="the training run's folder (its --output-dir)")
    p_export.add_argument("--output", default=None, metavar="DIR", help="destination folder. Default: RUN/export")
    add_dtype_flag(p_export, choices=tuple(DTYPES), default="bf16", help="precision of the saved weights")
    p_export.add_argument("--tag", default=None, metavar="TAG",
                          help="checkpoint folder name under RUN/checkpoints, e.g. step-00000050. "
                               "Default: the newest complete one")

    p_eval = sub.add_parser("eval", parents=[common], help="precision@1, MMEB-style")
    p_eval.add_argument("--model", required=True, metavar="PATH",
                        help="an exported folder (llave-fast export), a transformers or llava_qwen checkpoint folder, "
                             "a hub id, or a training run folder (its newest complete checkpoint is evaluated)")
    p_eval.add_argument("--data", nargs="+", default="synthetic", metavar="DATA",
                        help="'synthetic' (the held-out split of the synthetic dataset), or MMEB files and folders "
                             "(searched recursively), space- or comma-separated, .jsonl/.parquet: MMEB-eval files "
                             "(each query against its own candidate list; a dataset is named by its file's stem, or "
                             "by its folder for hub-style shards such as ImageNet-1K/test-00000-of-00001.parquet) or "
                             "MMEB-train files (each query against every distinct target). Default: synthetic")
    p_eval.add_argument("--image-dir", default=None, metavar="DIR",
                        help="folder the files' image paths are relative to. Default: each file's own folder")
    p_eval.add_argument("--allow-outside-image-dir", action="store_true",
                        help="read image paths that lead outside the image folder (absolute paths elsewhere, '..', "
                             "symbolic links out of it); without it such a row is an error naming FILE:LINE")
    p_eval.add_argument("--output-dir", default=None, metavar="DIR",
                        help="MMEB-eval files only: where mmeb_eval.json and the per-dataset resume cache "
                             "(DIR/mmeb_eval_cache/NAME.json) go; a rerun with the same model and settings reuses "
                             "the datasets already done. Default: none (nothing written, no resume)")
    p_eval.add_argument("--max-queries", type=_positive_int, default=None, metavar="N",
                        help="MMEB-eval files only: score the first N queries of each dataset. Default: every query")
    p_eval.add_argument("--num-eval", type=_positive_int, default=None, metavar="N",
                        help="queries evaluated for the synthetic split (the samples generated) and MMEB-train files "
                             "(their first N rows in all; their distinct targets are the candidates). Default: 256. "
                             "With MMEB-eval files (which are scored in full by default) it caps the queries per "
                             "dataset as --max-queries does")
    p_eval.add_argument("--seed", type=int, default=0, metavar="INT",
                        help="seed of the synthetic held-out split (training uses its --seed). Default: 0")
    p_eval.add_argument("--image-size", type=_positive_int, default=64, metavar="PX",
                        help="side of the synthetic images, px (training's --image-size). Default: 64")
    p_eval.add_argument("--batch", type=_positive_int, default=64, metavar="N",
                        help="samples per forward pass. Default: 64")
    p_eval.add_argument("--output", default=None, metavar="JSON",
                        help="also write the metrics JSON (printed to stdout) to this file")
    _add_precision_flags(p_eval)

    p_video = sub.add_parser("eval-video", parents=[common],
                             help="zero-shot text-video retrieval (MSR-VTT, MSVD): R@1/5/10, median and mean rank")
    p_video.add_argument("--model", required=True, metavar="PATH",
                         help="an exported folder, a transformers or llava_qwen checkpoint folder, a hub id, or a "
                              "training run folder (its newest complete checkpoint)")
    p_video.add_argument("--videos", required=True, metavar="DIR",
                         help="folder of the video files: <video id>.mp4 (or .avi, .webm, .mkv, .mov, ...), "
                              "sub-folders included")
    p_video.add_argument("--annotations", required=True, metavar="FILE",
                         help="captions: .csv with video_id and sentence columns (MSRVTT_JSFUSION_test.csv), .json "
                              "(video id -> captions, or a list of {video_id, caption} records), .jsonl, .txt "
                              "('<video id> <caption>' a line), CLIP4Clip's raw-captions.pkl, or CLIP4Clip's MSVD "
                              "folder (raw-captions.pkl + test_list.txt)")
    p_video.add_argument("--output-dir", required=True, metavar="DIR", help="where video_eval.json is written")
    p_video.add_argument("--video-list", default=None, metavar="FILE",
                         help="only these videos (one id a line, e.g. MSVD's test_list.txt), in this order. "
                              "Default: every video of --annotations")
    p_video.add_argument("--limit", type=_positive_int, default=None, metavar="N",
                         help="only the first N videos (and their captions): a quick check. Default: all")
    p_video.add_argument("--max-frames", type=_positive_int, default=32, metavar="N",
                         help="at most N frames a video, spread evenly over the clip when the --fps sampling gives "
                              "more (LLaVE: 32). Default: 32")
    p_video.add_argument("--fps", type=_positive_float, default=3.0, metavar="FPS",
                         help="frames per second sampled (every round(native fps / FPS)-th frame; LLaVE: 3). "
                              "Default: 3")
    p_video.add_argument("--max-length", type=_positive_int, default=8192, metavar="TOKENS",
                         help="longest sequence (visual tokens + prompt) allowed; a --max-frames whose videos would "
                              "not fit is refused before anything is decoded (LLaVE's video evaluation cuts at 8192). "
                              "Also capped by the model's max_position_embeddings. Default: 8192")
    p_video.add_argument("--batch", type=_positive_int, default=8, metavar="N",
                         help="videos (and captions) per forward pass. Default: 8")
    p_video.add_argument("--workers", type=_positive_int, default=2, metavar="N",
                         help="threads decoding videos ahead of the model (at most two batches ahead). Default: 2")
    _add_precision_flags(p_video)

    p_ablate = sub.add_parser("ablate", parents=[common],
                              help="hardness weighting (alpha) x negatives per loss on the tiny setting: P@1 table "
                                   "and plot")
    _add_ablate_flags(p_ablate)
    return parser


# flags of other trainers, and what this command calls them
_FLAG_ALIASES = {
    "--batch-size": "--global-batch (pairs per optimizer step over all ranks)",
    "--train-batch-size": "--global-batch (pairs per optimizer step over all ranks)",
    "--per-device-train-batch-size": "--global-batch (pairs per optimizer step over all ranks; per rank: "
                                     "global batch / ranks)",
    "--bs": "--global-batch (pairs per optimizer step over all ranks)",
    "--micro-batch-size": "--chunk-size (GradCache: samples per forward with gradients)",
    "--learning-rate": "--lr",
    "--max-steps": "--steps",
    "--num-train-epochs": "--epochs",
    "--gradient-accumulation-steps": "--accumulation-steps",
    "--temperature": "--logit-scale (the inverse temperature)",
}


def _command_parser(parser: argparse.ArgumentParser, command: str | None) -> argparse.ArgumentParser:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction) and command in action.choices:
            return action.choices[command]
    return parser


def _unrecognized(parser: argparse.ArgumentParser, command: str | None, extra: list[str]) -> str:
    """argparse's "unrecognized arguments", with what was probably meant for each unknown flag."""
    import difflib

    known = list(parser._option_string_actions) + list(_command_parser(parser, command)._option_string_actions)
    hints = []
    for arg in extra:
        flag = arg.split("=", 1)[0]
        if not flag.startswith("--"):
            continue
        if flag.replace("_", "-") in _FLAG_ALIASES:
            hints.append(f"{flag}: use {_FLAG_ALIASES[flag.replace('_', '-')]}")
        elif (close := difflib.get_close_matches(flag.replace("_", "-"), known, n=2, cutoff=0.6)):
            hints.append(f"{flag}: did you mean {' or '.join(close)}?")
    msg = f"unrecognized arguments: {' '.join(extra)}"
    return msg + (f" ({'; '.join(hints)})" if hints else "")


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    configure_logging()
    parser = build_parser(argv)
    if not argv:
        parser.print_help()
        return 0
    args, extra = parser.parse_known_args(argv)
    if extra:  # said by the command's own parser, so the message points at its --help
        _command_parser(parser, args.command).error(_unrecognized(parser, args.command, extra))
    if args.command is None:  # only --debug
        parser.print_help()
        return 0
    run = {"train": _train, "export": _export, "eval": _eval, "eval-video": _eval_video,
           "ablate": _ablate}[args.command]
    try:
        return run(args)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - sorted into user errors and internal errors below
        if args.debug:
            raise
        if is_user_error(exc):
            print(f"{PROG} {args.command}: error: {_message(exc)}", file=sys.stderr)
            print("(run with --debug for the traceback)", file=sys.stderr)
            return 1
        traceback.print_exc()
        print(f"{PROG} {args.command}: internal error ({type(exc).__name__}: {_message(exc)}); this is a bug, "
              "please report it with the traceback above", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
