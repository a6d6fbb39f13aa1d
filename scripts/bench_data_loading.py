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
the run's own ``train_log.jsonl``, its global batch from its ``train_config.json``. The JSON
(default ``benchmarks/results/<device>/<date>-data-loading.json``) is rewritten after every run;
a run that fails is recorded with its error and the others go on (exit status 1).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import _common as C  # noqa: E402


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
        raise RuntimeError(f"{' '.join(cmd)} failed (exit status {p.returncode}):\n{p.stdout[-2000:]}\n"
                           f"{p.stderr[-3000:]}")
    with open(os.path.join(out, "train_log.jsonl")) as f:
        log = [json.loads(line) for line in f][1:]  # the first step includes worker start-up
    with open(os.path.join(out, "train_config.json")) as f:
        global_batch = json.load(f)["global_batch"]  # as the run resolved it (--train-args may set it)
    return {
        "workers": workers, "global_batch": global_batch,
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
    ap.add_argument("--out", default=None,
                    help="result JSON; default benchmarks/results/<device>/<date>-data-loading.json")
    ap.add_argument("--train-args", default="", help="more `llave-fast train` flags for every run, e.g. "
                                                     "'--deepspeed-config zero2.json'")
    args = ap.parse_args(argv)
    try:
        workers = [int(w) for w in args.workers.split(",")]
    except ValueError:
        ap.error(f"--workers takes comma-separated integers >= 0, got {args.workers!r}")
    if min(workers) < 0 or args.steps < 2 or args.rows < 1:
        ap.error(f"--workers must be >= 0, --steps >= 2 (the first is not counted), --rows >= 1; got --workers "
                 f"{args.workers}, --steps {args.steps}, --rows {args.rows}")
    C.start_script()
    import torch

    device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    path, t_start = C.result_path(device, args.out, "-data-loading"), time.perf_counter()
    out = {"benchmark": "data-loading", "command": " ".join([Path(sys.argv[0]).name, *(argv or sys.argv[1:])]),
           "partial": True, **C.run_meta(device), "machine_load_before": C.machine_load(),
           "settings": {"steps": args.steps, "workers": workers, "rows": args.rows, "train_args": args.train_args},
           "results": []}
    results = out["results"]
    try:
        with tempfile.TemporaryDirectory() as tmp:
            data, img = write_mmeb_jpeg(os.path.join(tmp, "mmeb"), args.rows)
            more = args.train_args.split()
            sets = {"default": more, "mmeb-jpeg": ["--data", data, "--image-dir", img] + more}
            for name, extra in sets.items():
                for w in workers:
                    try:
                        r = {"dataset": name, **run(os.path.join(tmp, f"{name}-{w}"), args.steps, w, extra)}
                        print(f"{name:10s} workers={w}: median step {r['median_step_ms']:.0f} ms, median data wait "
                              f"{r['median_data_wait_ms']:.0f} ms ({r['steps_measured']} steps)", flush=True)
                    except Exception as exc:  # noqa: BLE001 - recorded, the other settings go on
                        r = {"dataset": name, "workers": w, "error": f"{type(exc).__name__}: {exc}"}
                        print(f"{name:10s} workers={w}: FAILED {r['error']}", flush=True)
                    results.append(r)
                    C.write_json(path, out, indent=2)
    except KeyboardInterrupt as exc:  # SIGINT or SIGTERM (start_script): what was measured is written
        out["interrupted"] = str(exc) or "KeyboardInterrupt (SIGINT)"
        print(f"\nINTERRUPTED ({out['interrupted']}): writing what was measured so far", flush=True)
    print("\n| dataset | workers | global batch | median step (ms) | median data wait (ms) |\n|---|---|---|---|---|")
    for r in results:
        cells = ("FAILED (its error is in the JSON) | | |" if "error" in r
                 else f"{r['global_batch']} | {r['median_step_ms']:.0f} | {r['median_data_wait_ms']:.0f} |")
        print(f"| {r['dataset']} | {r['workers']} | {cells}")
    del out["partial"]
    out.update(machine_load_after=C.machine_load(), total_wall_s=time.perf_counter() - t_start)
    C.write_json(path, out, indent=2)
    print(f"machine load before {out['machine_load_before']}, after {out['machine_load_after']}; wrote {path}")
    return 130 if "interrupted" in out else 1 if any("error" in r for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
