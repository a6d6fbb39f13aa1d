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

The command is built from named pieces: :mod:`llave_fast.cli_console` (logging on stderr,
which errors are the user's), :mod:`llave_fast.cli_train_flags` (train's flags from TrainConfig),
:mod:`llave_fast.cli_commands` (each command's handler); this module builds the parser and runs
:func:`main`.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import traceback

from . import __version__
from .cli_commands import COMMANDS
from .cli_console import PROG, CommandParser, configure_logging, error_message, is_user_error
from .cli_console import UsageError  # noqa: F401 - re-exported: the command's own error, importable from here
from .cli_train_flags import (  # noqa: F401 - re-exported: tests import them from here
    DEFAULT_CONFIG,
    FIELD_CHOICES,
    HIDDEN_FIELDS,
    add_train_flags,
    train_config_from_args,
)


def _positive_int(s: str) -> int:
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {s!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {s!r}")
    return v


def _positive_float(s: str) -> float:
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {s!r}") from None
    if not v > 0 or v == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {s!r}")
    return v


def _text_cut(s: str):
    if s == "saved":
        return s
    try:
        return _positive_int(s)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected a positive integer or 'saved', got {s!r}") from None


def _dtype_spelling(s: str) -> str:
    """A precision's other spellings (bfloat16, torch.float16, half, ...) as its short name
    (``dtypes.dtype_name``, the library's one rule); anything else as it is, for argparse's
    choices to accept (a command's own, e.g. ``auto``) or refuse."""
    from .dtypes import dtype_name
    from .errors import InvalidArgument

    try:
        return dtype_name(s)
    except InvalidArgument:
        return s


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


def _checked_by(parse, flag: str):
    """An argparse type that checks a value with the library's own ``parse`` (its InvalidArgument said by
    argparse: exit status 2, naming the flag) and keeps the value as written."""
    from .errors import InvalidArgument

    def check(s: str) -> str:
        try:
            parse(s)
        except InvalidArgument as e:
            raise argparse.ArgumentTypeError(str(e).removeprefix(f"{flag}: ")) from None
        return s
    check.__name__ = flag.lstrip("-")
    return check


def _int_in(low: int, high: int):
    def parse(s: str) -> int:
        try:
            v = int(s)
        except ValueError:
            v = None
        if v is None or not low <= v <= high:
            raise argparse.ArgumentTypeError(f"expected an integer in {low}..{high}, got {s!r}")
        return v
    return parse


# a comma-separated list of numbers whose first is negative: argparse would read "-1,9" as a flag
_NUMBER_LIST = re.compile(r"-[0-9.]+([eE][-+]?[0-9]+)?(,\s*[-+]?[0-9.]+([eE][-+]?[0-9]+)?)*")


def _negative_list_values(argv: list[str]) -> list[str]:
    """``ablate --alphas -1,9`` as ``--alphas=-1,9`` (what argparse reads without help)."""
    out, i = [], 0
    while i < len(argv):
        if argv[i] == "--alphas" and i + 1 < len(argv) and _NUMBER_LIST.fullmatch(argv[i + 1]):
            out.append(f"--alphas={argv[i + 1]}")
            i += 2
            continue
        out.append(argv[i])
        i += 1
    return out


def _add_ablate_flags(p: argparse.ArgumentParser) -> None:
    from . import ablate as A
    from .data.synthetic import MAX_FAMILY_SIZE

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
                   type=_checked_by(A.parse_alphas, "--alphas"),
                   help="hardness weights of the loss, comma-separated numbers (0: plain InfoNCE; LLaVE: 9); a list "
                        "starting with a negative number is read too (--alphas -1,9, also written --alphas=-1,9). "
                        "Default: %(default)s")
    p.add_argument("--batches", default=",".join(map(str, A.DEFAULT_BATCHES)), metavar="B,C,...",
                   type=_checked_by(A.parse_batches, "--batches"),
                   help="pairs per loss (each query's negatives: the other pairs of its loss batch), comma-separated "
                        "integers, each dividing the global batch and a multiple of --family-size. Default: "
                        "%(default)s")
    p.add_argument("--seeds", type=_positive_int, default=None, metavar="N",
                   help=f"seeds per cell (0..N-1: initialisation, data and data order). Default: {A.DEFAULT_SEEDS} "
                        f"({A.QUICK_SEEDS} with --quick)")
    p.add_argument("--steps", type=_positive_int, default=None, metavar="N",
                   help="optimizer steps per run. Default: as many training pairs as the preset's run "
                        "(steps x global_batch of --config; half with --quick); warm-up scales with it")
    p.add_argument("--global-batch", type=_positive_int, default=None, metavar="N",
                   help="pairs per optimizer step, every run. Default: the largest of --batches")
    p.add_argument("--num-eval", type=_positive_int, default=None, metavar="N",
                   help=f"held-out queries per run. Default: the preset's ({A.QUICK_NUM_EVAL} with --quick)")
    p.add_argument("--family-size", type=_int_in(1, MAX_FAMILY_SIZE), default=A.DEFAULT_FAMILY_SIZE, metavar="K",
                   help="scenes per hard-negative family (hard_family_size; 1: independent scenes). "
                        "Default: %(default)s")
    p.add_argument("--config", default=A.DEFAULT_CONFIG, metavar="JSON",
                   help="the training preset each run starts from (tiny model, synthetic data). Default: %(default)s")


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The whole command line; ``argv`` (the arguments) picks the preset whose defaults train's help shows."""
    from .data.synthetic import MAX_FAMILY_SIZE
    from .dtypes import DTYPES
    from .train import TrainConfig

    # eval's --synthetic-background takes train's choices (TrainConfig's field)
    background_choices = TrainConfig.__dataclass_fields__["synthetic_background"].metadata["choices"]
    argv = [] if argv is None else argv
    parser = CommandParser(
        prog=PROG, description="Train and evaluate LLaVE-style multimodal embedding models at large batch.",
        epilog=f"'{PROG} COMMAND --help' describes each command's options.")
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    parser.add_argument("--debug", action="store_true", help="show the Python traceback of any error")
    sub = parser.add_subparsers(dest="command", metavar="{train,export,eval,eval-video,ablate}",
                                parser_class=CommandParser)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show the Python traceback of any error")

    train_argv = argv[argv.index("train") + 1:] if "train" in argv else []
    p_train = sub.add_parser("train", parents=[common], help="train (default job: tiny LLaVE on synthetic data, CPU)")
    add_train_flags(p_train, train_argv)

    p_export = sub.add_parser("export", parents=[common], help="consolidate a run's newest complete checkpoint "
                              "into one model folder (bf16 unless --dtype)")
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
    # the synthetic split's options default to None ("not given"): llave_fast.evaluate.synthetic_split_options
    # resolves them, from a training run folder's train_config.json or the fixed defaults below
    from .evaluate import SYNTHETIC_SPLIT_DEFAULTS as D

    run_default = "a training run folder's own (its train_config.json), else"
    p_eval.description = ("--data synthetic scores a training run folder on its own held-out split (the one of its "
                          "eval.json): --num-eval, --seed, --image-size, --hard-family-size and "
                          "--synthetic-background default to the run's; one given that differs is used, with a "
                          f"warning. Any other model: {D['num_eval']} queries, seed {D['seed']}, {D['image_size']} "
                          f"px, family size {D['hard_family_size']}, {D['background']} background.")
    p_eval.add_argument("--num-eval", type=_positive_int, default=None, metavar="N",
                        help="queries evaluated for the synthetic split (the samples generated) and MMEB-train files "
                             "(their first N rows in all; their distinct targets are the candidates). Default: "
                             f"synthetic: {run_default} {D['num_eval']}; MMEB-train files: {D['num_eval']}. "
                             "With MMEB-eval files (which are scored in full by default) it caps the queries per "
                             "dataset as --max-queries does")
    p_eval.add_argument("--seed", type=int, default=None, metavar="INT",
                        help="seed of the synthetic held-out split (training's --seed). "
                             f"Default: {run_default} {D['seed']}")
    p_eval.add_argument("--image-size", type=_positive_int, default=None, metavar="PX",
                        help="side of the synthetic images, px (training's --image-size). "
                             f"Default: {run_default} {D['image_size']}")
    p_eval.add_argument("--hard-family-size", type=_int_in(1, MAX_FAMILY_SIZE), default=None, metavar="INT",
                        help="scenes per hard-negative family of the synthetic split (training's --hard-family-size; "
                             f"1: independent scenes). Default: {run_default} {D['hard_family_size']}")
    p_eval.add_argument("--synthetic-background", choices=list(background_choices), default=None,
                        help="background of the synthetic images (training's --synthetic-background). "
                             f"Default: {run_default} {D['background']}")
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


def _launcher_local_rank(argv: list[str]) -> list[str]:
    """The arguments without the ``--local_rank=N`` DeepSpeed's launcher appends (``--local-rank=N``
    from torch.distributed.launch): the rank's device comes from LOCAL_RANK, which both launchers
    also set; the flag's value is checked against it (or stands in for it)."""
    out, i = [], 0
    while i < len(argv):
        arg = argv[i]
        flag, eq, value = arg.partition("=")
        if flag not in ("--local_rank", "--local-rank"):
            out.append(arg)
            i += 1
            continue
        if not eq:
            value = argv[i + 1] if i + 1 < len(argv) else ""
            i += 1
        i += 1
        if not value.isdigit():
            raise SystemExit(f"{PROG}: error: {flag} must be a device index (an int >= 0), got {value!r}")
        env = os.environ.get("LOCAL_RANK")
        if env is None:
            os.environ["LOCAL_RANK"] = value
        elif env != value:
            raise SystemExit(f"{PROG}: error: {flag}={value} disagrees with LOCAL_RANK={env} in the environment")
    return out


def main(argv=None) -> int:
    argv = _negative_list_values(_launcher_local_rank(list(sys.argv[1:] if argv is None else argv)))
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
    run = COMMANDS[args.command]
    try:
        return run(args)
    except KeyboardInterrupt as exc:  # Ctrl-C; SIGTERM during a training start comes as Terminated
        from .training.run_folder import Terminated

        if isinstance(exc, Terminated):
            print(f"{PROG}: terminated", file=sys.stderr)
            return 143  # 128 + SIGTERM, as a shell reports a process SIGTERM ended
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - sorted into user errors and internal errors below
        if args.debug:
            raise
        if is_user_error(exc):
            message = error_message(exc)
            rank = os.environ.get("RANK", "0")
            if rank.isdigit() and int(rank) > 0 and message.count("\n"):
                # the ranks mostly raise the same error together: rank 0 prints it whole, the others its first line
                message = message.splitlines()[0] + " [...] (the whole message: rank 0's, or --debug)"
            prefix = f"[rank {rank}] " if rank.isdigit() and int(rank) > 0 else ""
            print(f"{prefix}{PROG} {args.command}: error: {message}", file=sys.stderr)
            print("(run with --debug for the traceback)", file=sys.stderr)
            return 1
        traceback.print_exc()
        print(f"{PROG} {args.command}: internal error ({type(exc).__name__}: {error_message(exc)}); this is a bug, "
              "please report it with the traceback above", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
