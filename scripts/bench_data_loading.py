"""Median training-step time with and without data-loading workers (issue 14).

    python scripts/bench_data_loading.py [--steps 10] [--workers 0,2] [--out results.json]

Runs `llave-fast train` (one process, the CPU demo model) on two datasets, once per
worker count, in fresh processes one after another on the same machine:

* ``default``: the default job (synthetic data, images drawn in memory, 64 px);
* ``mmeb-jpeg``: an image-heavy MMEB-style set written here: MMEB-train jsonl rows whose
  images are 640 x 640 JPEG files on disk (one per pair), decoded and resized to the tiny
  model's 64-px tiles by the processor: reading is part of every step, as on MMEB.

Reports, per setting, the median step time (ms) and the median time the loop waited for
its batch (ms), over the steps after the first (worker start-up). Step times come from
the run's own ``train_log.jsonl``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time


def write_mmeb_jpeg(folder: str, n: int, side: int = 640, seed: int = 0) -> tuple[str, str]:
    from llave_fast.data.synthetic import write_mmeb_train

    return write_mmeb_train(folder, n, seed=seed, image_size=side, image_format="jpg", name="MMEBStyle")


def run(out: str, steps: int, workers: int, extra: list[str]) -> dict:
    cmd = [sys.executable, "-m", "llave_fast", "train", "--output-dir", out, "--steps", str(steps),
           "--warmup-steps", "1", "--save-every", "0", "--eval-before", "false", "--num-eval", "16",
           "--progress", "false", "--num-workers", str(workers)] + extra
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{p.stdout[-2000:]}\n{p.stderr[-3000:]}")
    with open(os.path.join(out, "train_log.jsonl")) as f:
        log = [json.loads(line) for line in f][1:]  # the first step includes worker start-up
    return {
        "workers": workers,
        "median_step_ms": 1000 * statistics.median(e["step_time_s"] for e in log),
        "median_data_wait_ms": 1000 * statistics.median(e["data_wait_s"] for e in log),
        "steps_measured": len(log),
        "wall_s": time.perf_counter() - t0,
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=10, help="steps per run (the first is not counted)")
    ap.add_argument("--workers", default="0,2", help="worker counts to compare (comma-separated)")
    ap.add_argument("--rows", type=int, default=768, help="rows of the image-heavy set")
    ap.add_argument("--out", default=None, help="also write the results as JSON here")
    ap.add_argument("--train-args", default="", help="more `llave-fast train` flags for every run, e.g. "
                                                     "'--deepspeed-config zero2.json'")
    args = ap.parse_args(argv)
    workers = [int(w) for w in args.workers.split(",")]
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        data, img = write_mmeb_jpeg(os.path.join(tmp, "mmeb"), args.rows)
        more = args.train_args.split()
        sets = {"default": more, "mmeb-jpeg": ["--data", data, "--image-dir", img] + more}
        for name, extra in sets.items():
            for w in workers:
                r = run(os.path.join(tmp, f"{name}-{w}"), args.steps, w, extra)
                r["dataset"] = name
                results.append(r)
                print(f"{name:10s} workers={w}: median step {r['median_step_ms']:.0f} ms, median data wait "
                      f"{r['median_data_wait_ms']:.0f} ms ({r['steps_measured']} steps)", flush=True)
    import torch

    meta = {"machine": platform.machine(), "cpus": os.cpu_count(), "torch": torch.__version__,
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "date": time.strftime("%Y-%m-%d"), "steps": args.steps, "global_batch": 64,
            "train_args": args.train_args}
    print("\n| dataset | workers | median step (ms) | median data wait (ms) |\n|---|---|---|---|")
    for r in results:
        print(f"| {r['dataset']} | {r['workers']} | {r['median_step_ms']:.0f} | {r['median_data_wait_ms']:.0f} |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"meta": meta, "results": results}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
