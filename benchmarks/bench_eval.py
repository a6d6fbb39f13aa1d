"""MMEB-eval: the encode-once path of ``llave-fast eval`` against the old per-query re-encoding.

One generated MMEB-eval-style set (``llave_fast.data.mmeb_eval.write_mmeb_eval``: synthetic
i2t and t2i datasets, each query with its own list of ``--candidates`` candidates drawn from
a shared pool of ``--pool`` targets, as MMEB's lists share candidates), one model (the tiny
LLaVE, or ``--model``), both paths in the same process, alternating, ``--repeats`` times:

* old: a faithful copy of ``candidate_list_eval`` as it was before the encode-once path
  (``OLD_candidate_list_eval`` below): queries encoded in batches, then every query's
  candidate list encoded again, query by query, and scored with ``argmax == 0``;
* new: ``llave_fast.evaluate.mmeb_eval`` (every distinct input encoded once, batches sorted
  by length, each distinct candidate scored once).

Prints the median wall time of each and their ratio, the encodings each made, and both
P@1s; writes ``benchmarks/results/<device>/<date>-eval-encode-once.json`` (the folder named
after the CPU or GPU, as the other benchmarks do).

    python benchmarks/bench_eval.py                      # CPU, tiny model, ~2 min on 2 cores
    python benchmarks/bench_eval.py --queries 64 --candidates 20 --repeats 5
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

from llave_fast.data.mmeb_eval import find_eval_datasets, read_eval_file, write_mmeb_eval  # noqa: E402
from llave_fast.evaluate import encode_all, eval_precision, mmeb_eval  # noqa: E402


# ----------------------------------------------------------------------- the old loop (kept for comparison)
@torch.no_grad()
def OLD_candidate_list_eval(model, paths, *, image_dir=None, limit=None, batch: int = 64) -> dict:
    """The pre-encode-once MMEB-eval loop of llave_fast.evaluate (commit 597eb65), unchanged in
    what it computes: each query's whole candidate list is encoded again for that query."""
    from PIL import Image

    def load(path):
        if path is None:
            return None
        with Image.open(path) as im:
            return im.convert("RGB")

    per_file, encodings = {}, 0
    for path in paths:
        rows = read_eval_file(path, image_dir, limit)
        q = encode_all(model, model.processor, [r.qry_text for r in rows], [load(r.qry_image) for r in rows], batch)
        encodings += len(rows)
        hits = 0
        for r, qe in zip(rows, q):
            c = encode_all(model, model.processor, r.cand_texts, [load(x) for x in r.cand_images], batch)
            encodings += len(r.cand_texts)
            hits += int((c @ qe).argmax().item() == 0)
        per_file[path] = {"p_at_1": hits / max(1, len(rows)), "num_queries": len(rows)}
    return {"per_file": per_file, "encodings": encodings}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--queries", type=int, default=48, help="queries per dataset. Default: 48")
    ap.add_argument("--candidates", type=int, default=16, help="candidates per query (the positive first). Default: 16")
    ap.add_argument("--pool", type=int, default=64, help="items whose targets form the shared pool. Default: 64")
    ap.add_argument("--tasks", default="i2t,t2i", help="one dataset per synthetic task. Default: i2t,t2i")
    ap.add_argument("--batch", type=int, default=16, help="inputs per forward pass, both paths. Default: 16")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs of each path, alternating. Default: 3")
    ap.add_argument("--model", default=None, help="a model folder; default: the tiny LLaVE (seed 0)")
    ap.add_argument("--device", default="auto", help="auto, cpu, cuda. Default: auto")
    ap.add_argument("--dtype", default="auto", help="auto (bf16 on CUDA, fp32 on CPU), bf16, fp16, fp32")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch CPU threads (1 steadies timings on a shared machine). Default: torch's own")
    ap.add_argument("--out", default=None,
                    help="result JSON. Default: benchmarks/results/<device>/<date>-eval-encode-once.json")
    args = ap.parse_args()
    C.start_script()
    if args.threads:
        torch.set_num_threads(args.threads)

    dev, dt = eval_precision(args.device, args.dtype)
    if args.model:
        from llave_fast.model import LLaVEEmbedder

        model = LLaVEEmbedder.from_pretrained(args.model, torch_dtype=dt)
    else:
        from llave_fast.model import build_tiny_model

        torch.manual_seed(0)
        model = build_tiny_model()
    model = model.to(device=dev, dtype=dt).eval()

    with tempfile.TemporaryDirectory() as tmp:
        paths = []
        for k, task in enumerate(args.tasks.split(",")):
            paths += write_mmeb_eval(tmp, f"Synth_{task}", args.queries, num_candidates=args.candidates,
                                     pool=args.pool, task=task, seed=k)[0]
        datasets = find_eval_datasets(paths)
        # warm-up, untimed: the first forward passes of a process pay one-off costs
        OLD_candidate_list_eval(model, paths[:1], image_dir=tmp, limit=2, batch=args.batch)
        mmeb_eval(model, datasets[:1], image_dir=tmp, max_queries=2, batch=args.batch, progress=False)
        old_s, new_s, old_res, new_res = [], [], None, None
        for r in range(args.repeats):
            order = ("old", "new") if r % 2 == 0 else ("new", "old")
            for which in order:
                C.sync(dev)
                t0 = time.perf_counter()
                if which == "old":
                    old_res = OLD_candidate_list_eval(model, paths, image_dir=tmp, batch=args.batch)
                else:
                    new_res = mmeb_eval(model, datasets, image_dir=tmp, batch=args.batch, progress=False)
                C.sync(dev)
                (old_s if which == "old" else new_s).append(time.perf_counter() - t0)
            print(f"repeat {r + 1}/{args.repeats}: old {old_s[-1]:.2f} s, new {new_s[-1]:.2f} s", file=sys.stderr)

    names = [d.name for d in datasets]
    old_p = {n: old_res["per_file"][p]["p_at_1"] for n, p in zip(names, paths)}
    new_p = {n: new_res["datasets"][n]["p_at_1"] for n in names}
    new_enc = sum(new_res["datasets"][n]["num_encoded"] for n in names)
    ratio = statistics.median(old_s) / statistics.median(new_s)
    result = {
        "benchmark": "eval-encode-once",
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        **C.now_stamps(),
        "machine": {"processor": platform.processor(), "cpu_model": C.cpu_model(), "cores": C.usable_cores(),
                    "device": C.device_name(dev), "torch": torch.__version__, **C.device_info(dev)},
        "versions": C.versions(),
        "git": C.git_info(),
        "settings": {"queries_per_dataset": args.queries, "candidates_per_query": args.candidates,
                     "pool": args.pool, "datasets": names, "batch": args.batch, "repeats": args.repeats,
                     "torch_threads": torch.get_num_threads(),
                     "model": args.model or "tiny (build_tiny_model, seed 0)", "device": str(dev),
                     "dtype": str(dt).replace("torch.", "")},
        "old_per_query_reencode": {"seconds": old_s, "median_s": statistics.median(old_s),
                                   "encodings": old_res["encodings"], "p_at_1": old_p},
        "new_encode_once": {"seconds": new_s, "median_s": statistics.median(new_s), "encodings": new_enc,
                            "p_at_1": new_p},
        "speedup_median": ratio,
        "encodings_ratio": old_res["encodings"] / new_enc,
        "same_p_at_1": old_p == new_p,
    }
    if args.out:
        out = Path(args.out)
    else:
        folder = C.REPO_ROOT / "benchmarks" / "results" / C.slugify(C.device_name(dev))
        out = folder / f"{result['date']}-eval-encode-once.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{len(names)} datasets x {args.queries} queries x {args.candidates} candidates (pool {args.pool}), "
          f"batch {args.batch}, {C.device_name(dev)}, {result['settings']['dtype']}:")
    print(f"  old per-query re-encoding: median {statistics.median(old_s):.2f} s, {old_res['encodings']} encodings")
    print(f"  new encode-once:           median {statistics.median(new_s):.2f} s, {new_enc} encodings")
    print(f"  speed-up {ratio:.1f}x (median of {args.repeats}); encodings {result['encodings_ratio']:.1f}x fewer; "
          f"P@1 old {old_p} new {new_p}")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
