"""``llave-fast train``'s flags, one per TrainConfig field: each field's type, choices and help made
into an argparse option (its help showing the default that applies with the chosen ``--config``),
and the TrainConfig a command line asks for (built-in < ``--config`` file < flags)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import types
import typing

from ._checks import BACKENDS
from .training.checks import NON_NEGATIVE_INTS, POSITIVE_INTS
from .cli_console import PROG, UsageError, error_message
from .errors import InvalidArgumentType

__all__ = ["DEFAULT_CONFIG", "FIELD_CHOICES", "HIDDEN_FIELDS", "add_train_flags", "train_config_from_args"]

DEFAULT_CONFIG = "tiny_cpu.json"
# TrainConfig fields that only tests set: no flag in --help (they still parse). A field marks
# itself with metadata {"hidden": True} (stop_after does); more names can be listed here.
HIDDEN_FIELDS = frozenset({"stop_after"})
# choices of str fields, when the field's metadata does not give them ("choices")
FIELD_CHOICES = {"loss_backend": BACKENDS, "bad_images": ("skip", "fail")}


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


class _StoreNone(argparse.Action):
    """Stores the spelling 'none' (one of the listed choices) as None."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, None if values == "none" else values)


def _bounded_int(kind, low: int):
    """``kind`` (an int field's type) refusing a number below ``low`` as argparse refuses any bad value
    (exit status 2, naming the flag): the same bounds check_config applies to a config file."""
    def parse(s):
        v = kind(s)
        if v is not None and v < low:
            raise argparse.ArgumentTypeError(
                f"expected {'a positive integer' if low == 1 else 'an integer >= 0'}, got {s!r}")
        return v
    return _named(parse, kind.__name__)


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
        return known.config, None, error_message(e)


def add_train_flags(p: argparse.ArgumentParser, argv: list[str]) -> None:
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
        if choices:  # argparse checks the spelling; an optional field's 'none' is stored as None
            extra["choices"] = list(choices) + (["none"] if optional else [])
            if optional:
                kind, extra["action"] = _named(lambda s: "none" if s.lower() == "none" else s, "str"), _StoreNone
        elif f.name in POSITIVE_INTS or f.name in NON_NEGATIVE_INTS:  # check_config's bounds, said by argparse
            kind = _bounded_int(kind, 1 if f.name in POSITIVE_INTS else 0)
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
        raise UsageError(f"--config {args.config!r}: {error_message(e)}") from e
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

