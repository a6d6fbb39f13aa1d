"""GradCache's single pass against its cached path, on the default job's model and batch.

    python benchmarks/bench_single_pass.py                 # CPU, ~1 min on 2 cores

benchmarks/README.md, "GradCache's single pass".
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

from llave_fast import FusedHardnessLoss, GradCache  # noqa: E402
from llave_fast.data import PairCollator, SyntheticDataset  # noqa: E402
from llave_fast.model import build_tiny_model  # noqa: E402
from llave_fast.train import TrainConfig, tiny_model_kwargs  # noqa: E402


def main(argv=None) -> int:
    preset = TrainConfig.from_json("tiny_cpu.json")
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--batch", type=int, default=preset.global_batch, help="pairs per step (the preset's global batch)")
    ap.add_argument("--repeats", type=int, default=7, help="timed steps of each path, alternating")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads; None: torch's own")
    ap.add_argument("--out", default=None, help="None: benchmarks/results/<device>/<date>-gradcache-single-pass.json")
    args = ap.parse_args(argv)
    if min(args.batch, args.repeats) < 1:
        ap.error(f"--batch and --repeats must be >= 1, got --batch {args.batch}, --repeats {args.repeats}")
    if args.threads is not None and args.threads < 1:
        ap.error(f"--threads must be >= 1, got {args.threads}")
    C.start_script()
    if args.threads:
        torch.set_num_threads(args.threads)
    dev, t_start = torch.device("cpu"), time.perf_counter()
    path = C.result_path(dev, args.out, "-gradcache-single-pass")
    result = {
        "benchmark": "gradcache-single-pass",
        "command": " ".join([Path(sys.argv[0]).name, *(sys.argv[1:] if argv is None else argv)]), "partial": True,
        **C.run_meta(dev), "machine_load_before": C.machine_load(),
        "settings": {"batch_pairs": args.batch, "chunk_size": 2 * args.batch, "repeats": args.repeats,
                     "torch_threads": torch.get_num_threads(),
                     "model": f"tiny (build_tiny_model, seed 0, {tiny_model_kwargs(preset)})",
                     "image_size": preset.image_size, "loss_backend": "torch",
                     "logit_scale": preset.logit_scale, "alpha": preset.alpha,
                     "what": "zero_grad + GradCache.__call__ (forward + backward of one step), plain module, fp32"},
    }
    paths = {"single": ("single_pass", True), "cached": ("cached_path", False)}  # name: (key in the file, single)
    errors, times = {}, {}
    try:
        step = build_step(preset, args.batch, result["settings"])

        def grads(single: bool) -> dict:
            step(single)
            return {n: p.grad.clone() for n, p in step.model.named_parameters() if p.grad is not None}

        g = {}
        for name, (_, single) in paths.items():  # also the warm-up, untimed; every step is seeded alike
            try:
                g[name] = grads(single)
            except Exception as exc:  # noqa: BLE001 - recorded, the other path goes on
                errors[name] = f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0]}"
        if len(g) == 2:
            result["max_rel_grad_diff"] = max(C.rel_err(g["single"][k], g["cached"][k]) for k in g["cached"])
        del g
        fill(result, paths, times, {}, errors)
        C.write_json(path, result, indent=2)
        runs = {name: (lambda s=single: step(s)) for name, (_, single) in paths.items() if name not in errors}
        _, loss = C.alternate(runs, args.repeats, dev, secs=times, errors=errors)
        fill(result, paths, times, loss, errors)
    except KeyboardInterrupt as exc:  # SIGINT or SIGTERM (start_script): what was measured is written
        result["interrupted"] = str(exc) or "KeyboardInterrupt (SIGINT)"
        fill(result, paths, times, {}, errors)
        print(f"INTERRUPTED ({result['interrupted']}): writing what was measured so far", flush=True)
    del result["partial"]
    result.update(machine_load_after=C.machine_load(), total_wall_s=time.perf_counter() - t_start)
    out = C.write_json(path, result, indent=2)
    med1, med0 = result["single_pass"]["median_s"], result["cached_path"]["median_s"]
    failed = {k: f"  FAILED: {v}" for k, v in errors.items()}
    print(f"one step of {args.batch} pairs, tiny LLaVE, {C.device_name(dev)}, {torch.get_num_threads()} threads:\n"
          f"  cached path: median {C.fmt(med0, '.3f')} s{failed.get('cached', '')}"
          f"\n  single pass: median {C.fmt(med1, '.3f')} s{failed.get('single', '')}"
          f"\n  speed-up {C.fmt(result.get('speedup_median'), '.2f')}x (median of {args.repeats}); largest relative "
          f"gradient difference {C.fmt(result.get('max_rel_grad_diff'), '.1e')}\nwrote {out}")
    return 130 if "interrupted" in result else 1 if errors else 0


def build_step(preset, batch_pairs: int, settings: dict):
    """``step(single) -> loss`` of one training step of the tiny LLaVE on the default job's batch (``step.model``)."""
    model = build_tiny_model(0, **tiny_model_kwargs(preset)).train()  # as the default job builds it
    tasks = preset.synthetic_tasks or ("i2t", "t2i", "vqa")
    settings["tasks"] = list(tasks)
    ds = SyntheticDataset(batch_pairs, seed=0, split="train", image_size=preset.image_size, tasks=tasks,
                          background=preset.synthetic_background)
    batch = PairCollator(model.processor)([ds[i] for i in range(batch_pairs)])
    ids = dict(target_ids=batch["target_ids"], query_ids=batch["target_ids"])
    loss_fn = FusedHardnessLoss(preset.logit_scale, preset.alpha, backend="torch")
    chunk = 2 * batch_pairs  # the whole step in one chunk: what the single pass needs

    def step(single: bool) -> float:
        model.zero_grad(set_to_none=True)
        torch.manual_seed(1)
        return GradCache(model, loss_fn, chunk, single_pass=single)(batch["query"], batch["target"], **ids).item()

    step.model = model
    return step


def fill(result: dict, paths: dict, times: dict, loss: dict, errors: dict) -> None:
    """Each path's record (its times so far, median, last loss, error) and the medians' ratio where both have one."""
    for name, (key, _) in paths.items():
        secs = times.get(name, [])
        result[key] = {"seconds": secs, "median_s": None if name in errors else C.median(secs),
                       "loss": loss.get(name, result.get(key, {}).get("loss")), "error": errors.get(name)}
    med1, med0 = result["single_pass"]["median_s"], result["cached_path"]["median_s"]
    result["speedup_median"] = med0 / med1 if med0 is not None and med1 else None


if __name__ == "__main__":
    sys.exit(main())
