"""The ``llave-fast`` command: train, export, eval.

    llave-fast train [--config tiny_cpu.json] [--output-dir DIR] [--steps 200 ...]
    llave-fast export --run DIR [--output DIR/export] [--dtype bf16]
    llave-fast eval --model PATH [--data synthetic | FILES --image-dir DIR]

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
import linecache
import os
import sys
import traceback
import types
import typing

from . import __version__
from ._checks import BACKENDS

PROG = "llave-fast"
DEFAULT_CONFIG = "tiny_cpu.json"
# TrainConfig fields that only tests set: no flag in --help (they still parse). A field can
# also mark itself with metadata {"hidden": True}.
HIDDEN_FIELDS = frozenset({"stop_after"})
# choices of str fields, when the field's metadata does not give them ("choices")
FIELD_CHOICES = {"loss_backend": BACKENDS, "bad_images": ("skip", "fail")}
_PKG_DIR = os.path.dirname(os.path.abspath(__file__))


class UsageError(Exception):
    """A user error found by the command itself (printed without a traceback)."""


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad command line prints one error line and where to read more, not the
    whole usage (train's has some fifty flags)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n(see '{self.prog} --help')\n")


# -------------------------------------------------------------------------- which errors are the user's
_FILE_ERRORS = (FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError)
_CHECK_ERRORS = (ValueError, TypeError, ImportError)


def _raised_by_our_check(exc: BaseException) -> bool:
    """True when ``exc`` comes from an explicit ``raise`` statement in llave_fast's own code.

    Our argument and data checks raise ValueError / TypeError (ImportError for a missing
    optional package) with a message naming the argument and what it got. The same types
    raised inside a library, or by a failed call in our code (a TypeError for a wrong
    number of arguments is raised at the call, not at a ``raise``), are bugs: not ours.
    """
    tb = exc.__traceback__
    if tb is None:
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    filename = os.path.abspath(tb.tb_frame.f_code.co_filename)
    if not filename.startswith(_PKG_DIR + os.sep):
        return False
    return linecache.getline(filename, tb.tb_lineno).lstrip().startswith("raise")


def is_user_error(exc: BaseException) -> bool:
    if isinstance(exc, (UsageError,) + _FILE_ERRORS):
        return True
    from .data.mmeb import BadDataError

    if isinstance(exc, BadDataError):
        return True
    return isinstance(exc, _CHECK_ERRORS) and _raised_by_our_check(exc)


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
        raise TypeError(f"TrainConfig field type {tp!r} has no command-line form")
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
    _fit_preset_warmup(cfg, args)
    return cfg


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
        raise UsageError(f"--run {args.run!r}: not a llave-fast training run folder (no base/ or checkpoints/ "
                         "inside; give the --output-dir of a training run)")

    path = export_run(args.run, args.output, dtype=args.dtype, tag=args.tag)
    print(f"exported to {path}")
    return 0


def _eval(args) -> int:
    from .evaluate import evaluate_model

    if _looks_local(args.model):
        _existing("--model", args.model)
    if args.data != "synthetic":
        for path in args.data.split(","):
            if not path:
                raise UsageError(f"--data {args.data!r}: an empty file name in the comma-separated list")
            _existing("--data", path, kind="file or folder")
    _existing("--image-dir", args.image_dir)

    result = evaluate_model(args.model, args.data, image_dir=args.image_dir, num_eval=args.num_eval,
                            seed=args.seed, image_size=args.image_size, batch=args.batch,
                            device=args.device, dtype=args.dtype)
    print(json.dumps(result, indent=2))
    if args.output:
        with open(args.output, "w") as f:
            json.dump(result, f, indent=2)
    return 0


def _positive_int(s: str) -> int:
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {s!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {s!r}")
    return v


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The whole command line; ``argv`` (the arguments) picks the preset whose defaults train's help shows."""
    argv = [] if argv is None else argv
    parser = _Parser(
        prog=PROG, description="Train and evaluate LLaVE-style multimodal embedding models at large batch.",
        epilog=f"'{PROG} COMMAND --help' describes each command's options.")
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    parser.add_argument("--debug", action="store_true", help="show the Python traceback of any error")
    sub = parser.add_subparsers(dest="command", metavar="{train,export,eval}", parser_class=_Parser)
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
    p_export.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"],
                          help="precision of the saved weights. Default: bf16")
    p_export.add_argument("--tag", default=None, metavar="TAG",
                          help="checkpoint folder name under RUN/checkpoints, e.g. step-00000050. "
                               "Default: the newest complete one")

    p_eval = sub.add_parser("eval", parents=[common], help="precision@1, MMEB-style")
    p_eval.add_argument("--model", required=True, metavar="PATH",
                        help="an exported folder (llave-fast export), a transformers or llava_qwen checkpoint folder, "
                             "a hub id, or a training run folder (its newest complete checkpoint is evaluated)")
    p_eval.add_argument("--data", default="synthetic", metavar="DATA",
                        help="'synthetic' (the held-out split of the synthetic dataset), or MMEB files, "
                             "comma-separated .jsonl/.parquet: MMEB-eval files (each query against its own "
                             "candidates) or MMEB-train files (each query against every distinct target). "
                             "Default: synthetic")
    p_eval.add_argument("--image-dir", default=None, metavar="DIR",
                        help="folder the files' image paths are relative to. Default: each file's own folder")
    p_eval.add_argument("--num-eval", type=_positive_int, default=256, metavar="N",
                        help="queries evaluated: the synthetic samples generated; the first N rows of each MMEB-eval "
                             "file; the first N rows of the MMEB-train files in all (their distinct targets are the "
                             "candidates). Default: 256")
    p_eval.add_argument("--seed", type=int, default=0, metavar="INT",
                        help="seed of the synthetic held-out split (training uses its --seed). Default: 0")
    p_eval.add_argument("--image-size", type=_positive_int, default=64, metavar="PX",
                        help="side of the synthetic images, px (training's --image-size). Default: 64")
    p_eval.add_argument("--batch", type=_positive_int, default=64, metavar="N",
                        help="samples per forward pass. Default: 64")
    p_eval.add_argument("--output", default=None, metavar="JSON", help="also write the metrics JSON to this file")
    p_eval.add_argument("--device", default="auto",
                        help="auto (CUDA when present, else CPU), cuda, cuda:N or cpu. Default: auto")
    p_eval.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp16", "fp32"],
                        help="weights' precision: auto = bf16 on CUDA (LLaVE evaluates with 16-bit weights), "
                             "fp32 on CPU. Default: auto")
    return parser


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(argv)
    if not argv:
        parser.print_help()
        return 0
    args = parser.parse_args(argv)
    if args.command is None:  # only --debug
        parser.print_help()
        return 0
    run = {"train": _train, "export": _export, "eval": _eval}[args.command]
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
