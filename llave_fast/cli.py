"""The ``llave-fast`` command: train, export, eval.

    llave-fast train [--config tiny_cpu.json] [--output-dir DIR] [--steps 200 ...]
    llave-fast export --run DIR [--output DIR/export] [--dtype bf16]
    llave-fast eval --model PATH [--data synthetic | FILES --image-dir DIR]

``train`` with no arguments trains the tiny demo model on the synthetic dataset (CPU,
a few minutes) and prints precision@1 before and after. Every field of the training
config is also a flag (``--global-batch 128``); flags override the config file. Under
``torchrun`` or the ``deepspeed`` launcher every rank runs the same command.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import typing

from .train import TrainConfig


def _flag_type(tp):
    origin = typing.get_origin(tp)
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if origin is typing.Union or origin is getattr(__import__("types"), "UnionType", None):
        tp = args[0]
        origin = typing.get_origin(tp)
    if origin is list:
        return lambda s: [x for x in s.split(",") if x]
    if tp is bool:
        return _bool
    return tp


def _bool(s: str) -> bool:
    low = s.lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {s!r}")


def _add_train_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default="tiny_cpu.json",
                   help="training config JSON, a path or a shipped preset: tiny_cpu.json (the CPU demo, default), "
                        "llave_0.5b.json (ours: fine-tune LLaVE-0.5B, every pair of the global batch a negative), "
                        "llave_0.5b_recipe.json (LLaVE's published recipe for the 0.5B model)")
    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        kind = _flag_type(hints[f.name])
        extra = {"nargs": "?", "const": True} if kind is _bool else {}
        what = f.metadata.get("help", "")
        p.add_argument("--" + f.name.replace("_", "-"), dest=f.name, type=kind, default=argparse.SUPPRESS,
                       help=f"{what} (built-in default {f.default!r}; the config file may set it)", **extra)


def _train(args) -> int:
    from .train import train

    cfg = TrainConfig.from_json(args.config)
    for f in dataclasses.fields(TrainConfig):
        if hasattr(args, f.name):
            setattr(cfg, f.name, getattr(args, f.name))
    train(cfg)
    return 0


def _export(args) -> int:
    from .export import export_run

    path = export_run(args.run, args.output, dtype=args.dtype, tag=args.tag)
    print(f"exported to {path}")
    return 0


def _eval(args) -> int:
    from .evaluate import evaluate_model

    result = evaluate_model(args.model, args.data, image_dir=args.image_dir, num_eval=args.num_eval,
                            seed=args.seed, image_size=args.image_size, batch=args.batch,
                            device=args.device, dtype=args.dtype)
    print(json.dumps(result, indent=2))
    if args.output:
        with open(args.output, "w") as f:
            json.dump(result, f, indent=2)
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="llave-fast", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command")
    p_train = sub.add_parser("train", help="train (default job: tiny LLaVE on synthetic data, CPU)")
    _add_train_flags(p_train)
    p_export = sub.add_parser("export", help="consolidate a run's last checkpoint into a 16-bit model folder")
    p_export.add_argument("--run", required=True, help="the run's output directory")
    p_export.add_argument("--output", default=None, help="destination folder (default: RUN/export)")
    p_export.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    p_export.add_argument("--tag", default=None, help="checkpoint tag (default: the newest complete one)")
    p_eval = sub.add_parser("eval", help="precision@1, MMEB-style")
    p_eval.add_argument("--model", required=True, help="model folder (an export, a transformers or llava_qwen checkpoint)")
    p_eval.add_argument("--data", default="synthetic", help="'synthetic' or MMEB eval files")
    p_eval.add_argument("--image-dir", default=None)
    p_eval.add_argument("--num-eval", type=int, default=256)
    p_eval.add_argument("--seed", type=int, default=0)
    p_eval.add_argument("--image-size", type=int, default=64)
    p_eval.add_argument("--batch", type=int, default=64)
    p_eval.add_argument("--output", default=None, help="write the metrics JSON here too")
    p_eval.add_argument("--device", default="auto",
                        help="auto (CUDA when present, else CPU), cuda, cuda:N or cpu (default: auto)")
    p_eval.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp16", "fp32"],
                        help="weights' precision: auto = bf16 on CUDA (LLaVE evaluates with 16-bit weights), "
                             "fp32 on CPU (default: auto)")
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        argv = ["train"]
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    return {"train": _train, "export": _export, "eval": _eval}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
