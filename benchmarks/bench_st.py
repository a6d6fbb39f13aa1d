"""sentence-transformers' ranking losses against llave-fast's fused ones (benchmarks/README.md).

    python benchmarks/bench_st.py                     # CPU, B = 4096 and 8192, d = 768 (~10 min on 2 cores)
    python benchmarks/bench_st.py --sizes 1024 --repeats 2 --cached-batch 256   # a quick look
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

LOSS_VARIANTS = ("st_per_direction", "fused_per_direction", "st_joint", "fused_joint", "fused_symmetric_hardness")
# each fused variant against the sentence-transformers run it replaces
BASELINE = {"fused_per_direction": "st_per_direction", "fused_joint": "st_joint",
            "fused_symmetric_hardness": "st_per_direction", "fused_cached": "st_cached"}
WORDS = ("the a one two cat dog bird fish sat ran flew swam on under near mat rug tree pond red blue green big "
         "small old young house car road sky sea").split()
KW = dict(scale=20.0, directions=("query_to_doc", "doc_to_query"), hardness_mode="in_batch_negatives",
          hardness_strength=9.0)
CHECK_B = 512  # rows of the float64 check of each part-1 variant (at most the smallest size), at --d


def loss_fn(variant: str):
    """``fn(q, t) -> scalar loss`` of a part-1 variant."""
    kw = dict(KW, partition_mode="joint" if variant.endswith("joint") else "per_direction")
    if variant.startswith("st_"):
        from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss

        st = MultipleNegativesRankingLoss(None, **kw)
        return lambda q, t: st.compute_loss_from_embeddings([q, t], None)
    from llave_fast.integrations.sentence_transformers import fused_mnrl_loss

    return lambda q, t: fused_mnrl_loss(q, t, symmetric_hardness=variant == "fused_symmetric_hardness", **kw)


def truth_loss(variant: str, q: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """What a part-1 variant computes, by ``llave_fast.reference`` on the unit rows (KW: both directions, in-batch
    hardness on query_to_doc only, on doc_to_query too for fused_symmetric_hardness; per_direction averages the
    two directions' losses, joint takes one softmax over both rows)."""
    from llave_fast.reference import reference_per_row

    q, t = (torch.nn.functional.normalize(x, dim=-1) for x in (q, t))
    a = KW["hardness_strength"]
    kw = dict(logit_scale=KW["scale"], symmetric=False)
    q2d = reference_per_row(q, t, alpha=a, **kw)
    d2q = reference_per_row(t, q, alpha=a if variant == "fused_symmetric_hardness" else 0.0, **kw)
    return (torch.logaddexp(q2d, d2q) if variant.endswith("joint") else (q2d + d2q) / 2).mean()


def check_variants(B: int, d: int, seed: int = 0) -> dict:
    """{variant: record} of each part-1 variant against its float64 truth on the same (fp32, correlated) inputs:
    the loss and both gradients, bench_loss's fp32 tolerances; ``passed`` decides whether it is timed."""
    g = torch.Generator().manual_seed(seed + 4242)
    q0 = C.normalized_rows(B, d, dtype=torch.float32, device="cpu", generator=g)
    t0 = C.normalized_rows(B, d, dtype=torch.float32, device="cpu", generator=g, like=q0)
    tol_loss, tol_grad = C.TOLERANCES["fp32"]
    out = {}
    for v in LOSS_VARIANTS:
        rec = {"B": B, "d": d, "dtype": "fp32", "truth": "llave_fast.reference, float64, same inputs",
               "tol_loss": tol_loss, "tol_grad": tol_grad}
        try:
            x64 = [x.detach().double().requires_grad_() for x in (q0, t0)]
            x = [x.detach().clone().requires_grad_() for x in (q0, t0)]
            losses = [truth_loss(v, *x64), loss_fn(v)(*x)]
            for loss in losses:
                loss.backward()
            errs = {"loss": C.rel_err(losses[1], losses[0]), "dq": C.rel_err(x[0].grad, x64[0].grad),
                    "dt": C.rel_err(x[1].grad, x64[1].grad)}
            rec.update(errors=errs, passed=errs["loss"] <= tol_loss and max(errs["dq"], errs["dt"]) <= tol_grad)
            msg = ", ".join(f"{k} {e:.1e}" for k, e in errs.items()) + f"; tol {tol_loss:.0e}/{tol_grad:.0e}"
        except Exception as exc:  # noqa: BLE001 - a crash is a failure, reported
            rec.update(passed=False, error=f"{type(exc).__name__}: {exc}")
            msg = rec["error"]
        out[v] = rec
        print(f"  {v:26s} {'ok' if rec['passed'] else 'FAILED'} ({msg})", flush=True)
    return out


def tiny_model(hidden: int, seed: int = 0):
    """A 2-layer BERT of width ``hidden`` with a word-level tokenizer over WORDS, random weights."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.base.modules import Transformer
    from sentence_transformers.sentence_transformer.modules import Pooling
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

    vocab = {"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, "[SEP]": 3, **{w: i + 4 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.normalizer, tok.pre_tokenizer = normalizers.Lowercase(), pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]",
                                                       special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    with tempfile.TemporaryDirectory() as folder:
        PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                sep_token="[SEP]", model_max_length=32).save_pretrained(folder)
        torch.manual_seed(seed)
        BertModel(BertConfig(vocab_size=len(vocab), hidden_size=hidden, num_hidden_layers=2, num_attention_heads=2,
                             intermediate_size=2 * hidden, max_position_embeddings=64)).save_pretrained(folder)
        tr = Transformer(folder)
        return SentenceTransformer(modules=[tr, Pooling(tr.get_embedding_dimension(), "mean")], device="cpu").train()


def triplet_features(model, n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    return [model.preprocess([" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 8))) for _ in range(n)])
            for _ in range(3)]


def cached_step_fn(variant: str, model, mini_batch_size: int):
    """``fn(feats, _) -> loss`` of one cached step; its .backward() runs the re-encode, as the trainer's does."""
    from sentence_transformers.sentence_transformer.losses import CachedMultipleNegativesRankingLoss

    from llave_fast.integrations import FusedCachedMultipleNegativesRankingLoss

    cls = CachedMultipleNegativesRankingLoss if variant == "st_cached" else FusedCachedMultipleNegativesRankingLoss
    loss = cls(model, partition_mode="per_direction", mini_batch_size=mini_batch_size, **KW)

    def step(feats, _):
        model.zero_grad(set_to_none=True)
        torch.manual_seed(1)
        return loss(feats.value, None)

    step.loss = loss  # the fused one's last_pass: which of GradCache's paths the step took
    return step


def check_cached(model, feats, mini_batch_size: int) -> dict:
    """{variant: record} of each cached step against the same loss uncached in float64 on the same batch: a float64
    copy of ``model`` encodes every column in one forward, sentence-transformers' MultipleNegativesRankingLoss on those
    embeddings; the loss and the gradients of every parameter (one vector; the worst parameter named), at the
    tolerances of the parameters' dtype. Dropout is off in both (eval mode, then train mode again): the uncached
    forward cannot replay the mini-batches' dropout masks. ``passed`` decides whether the variant is timed."""
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss

    was_training, dtype = model.training, next(model.parameters()).dtype
    kind = C.DTYPE_NAMES.get(dtype, "fp32")
    tol_loss, tol_grad = C.TOLERANCES[kind]
    truth_model = copy.deepcopy(model).double().eval()
    truth_model.zero_grad(set_to_none=True)
    truth = MultipleNegativesRankingLoss(truth_model, partition_mode="per_direction", **KW)
    truth_loss_value = truth([dict(f) for f in feats], None)
    truth_loss_value.backward()
    truth_grads = {n: p.grad for n, p in truth_model.named_parameters() if p.grad is not None}
    out = {}
    model.eval()
    try:
        for v in ("st_cached", "fused_cached"):
            rec = {"triplets": len(feats[0]["input_ids"]), "mini_batch_size": mini_batch_size, "dtype": kind,
                   "truth": "the same loss uncached (sentence-transformers' MultipleNegativesRankingLoss), float64 "
                            "copy of the model, same batch, dropout off", "tol_loss": tol_loss, "tol_grad": tol_grad}
            try:
                loss = cached_step_fn(v, model, mini_batch_size)(SimpleNamespace(value=feats), None)
                loss.backward()
                grads = {n: p.grad for n, p in model.named_parameters() if n in truth_grads}
                if missing := [n for n, g in grads.items() if g is None]:  # an infinite error, named
                    rec["missing_gradients"] = missing
                    grads.update({n: torch.full_like(truth_grads[n], float("inf")) for n in missing})
                # one vector of every gradient: a parameter whose true gradient is zero (the attention keys'
                # biases: softmax ignores a shift) has only rounding, scaled by the largest gradient
                scale = max(g.abs().max().item() for g in truth_grads.values())
                per_param = {n: (grads[n].double() - g).abs().max().item() / scale for n, g in truth_grads.items()}
                worst = max(per_param, key=per_param.get)
                errs = {"loss": C.rel_err(loss, truth_loss_value),
                        "grad": C.rel_err(torch.cat([grads[n].flatten() for n in truth_grads]),
                                          torch.cat([g.flatten() for g in truth_grads.values()]))}
                rec.update(errors=errs, worst_param=worst, worst_param_error=per_param[worst],
                           params_checked=len(truth_grads),
                           loss=float(loss.detach()), truth_loss=float(truth_loss_value.detach()),
                           passed=errs["loss"] <= tol_loss and errs["grad"] <= tol_grad)
                msg = (f"loss {errs['loss']:.1e}, gradients {errs['grad']:.1e} (worst {worst}, of "
                       f"{len(truth_grads)} parameters); tol {tol_loss:.0e}/{tol_grad:.0e}")
            except Exception as exc:  # noqa: BLE001 - a crash is a failure, reported
                rec.update(passed=False, error=f"{type(exc).__name__}: {exc}")
                msg = rec["error"]
            out[v] = rec
            print(f"  {v:26s} {'ok' if rec['passed'] else 'FAILED'} ({msg})", flush=True)
    finally:
        model.zero_grad(set_to_none=True)
        model.train(was_training)
    return out


def mem_worker(spec: dict) -> None:
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    if spec["kind"] == "loss":
        fn = loss_fn(spec["variant"])
        for q, t in C.make_pairs(2, 256, 128, dtype=torch.float32, device="cpu", seed=1):  # loads the libraries
            fn(q, t).backward()
        del q, t
        (q, t), = C.make_pairs(1, spec["B"], spec["d"], dtype=torch.float32, device="cpu", seed=spec["seed"])
    else:  # the cached step: parameters' gradients are allocated by it, alike in both variants
        model = tiny_model(spec["hidden"])
        fn = cached_step_fn(spec["variant"], model, spec["mini_batch"])
        fn(SimpleNamespace(value=triplet_features(model, 2 * spec["mini_batch"], seed=4)), None).backward()  # warm-up
        q, t = SimpleNamespace(value=triplet_features(model, spec["batch"], seed=3)), None
    C.print_peak(fn, q, t)


def peak_mib(**spec) -> dict:
    rec = C.peak_in_fresh_process(Path(__file__).resolve(), spec, timeout=1200)
    return {"memory": rec, "peak_mib": rec["peak_bytes"] / C.MiB}


def rows_of(timing: dict, failed: dict | None = None) -> dict:
    """The rows of part 1: ``timing`` (time_interleaved's) and the ``failed`` ones ({variant: why}, not timed); a
    variant that errored, or was stopped before its timed runs were all taken (``partial``), keeps its raw times
    but gets no median, so no ratio."""
    rows = {v: {"fwd_bwd_ms": r["raw_ms"]["fwd_bwd"], "losses": r["losses"], "error": r["error"],
                **({"partial": True} if r.get("partial") else {}),
                **{f"median_{k}_ms": None if r["error"] or r.get("partial") else C.median(r["raw_ms"][k])
                   for k in C.PARTS}}
            for v, r in timing.items()}
    rows.update({v: {"fwd_bwd_ms": [], "losses": [], "error": why, "status": "FAILED",
                     **{f"median_{k}_ms": None for k in C.PARTS}} for v, why in (failed or {}).items()})
    return rows


def ratio(a, b):
    return a / b if a is not None and b else None  # None: not measured, or a zero peak (tiny sizes)


def ratios_of(rows: dict) -> dict:
    return {f"{v} / {b}": {"time": ratio(rows[v]["median_fwd_bwd_ms"], rows[b]["median_fwd_bwd_ms"]),
                           "memory": ratio(rows[v].get("peak_mib"), rows[b].get("peak_mib"))}
            for v, b in BASELINE.items() if v in rows}


def parse_args(argv) -> argparse.Namespace:
    """The command line, each bad value refused naming its flag and what it got: a size below its floor, a batch
    size named twice (timed twice, the second run's row written over the first's), --threads below 1 (0 was
    ignored, a negative count failed in torch.set_num_threads after the libraries loaded), an --out that is a
    folder (refused when the first part's results were written, minutes in)."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add = ap.add_argument
    add("--sizes", type=int, nargs="+", default=[4096, 8192], help="batch sizes B")
    add("--d", type=int, default=768, help="embedding width")
    add("--repeats", type=int, default=3, help="timed runs of each loss variant")
    add("--cached-batch", type=int, default=1024, help="triplets per cached step")
    add("--mini-batch", type=int, default=64, help="mini_batch_size of both cached losses")
    add("--hidden", type=int, default=64, help="the tiny BERT's width")
    add("--cached-repeats", type=int, default=5, help="timed cached steps of each")
    add("--no-memory", action="store_true", help="skip the fresh-process memory runs")
    add("--threads", type=int, default=None, help="torch CPU threads; None: torch's own")
    add("--out", default=None, help="result JSON; None: benchmarks/results/<device>/<date>-st.json")
    args = ap.parse_args(argv)
    if min(args.sizes) < 2:
        ap.error(f"--sizes takes integers >= 2, got {args.sizes}")
    if len(set(args.sizes)) < len(args.sizes):
        ap.error(f"--sizes names {sorted({x for x in args.sizes if args.sizes.count(x) > 1})} more than once, got "
                 f"{args.sizes}")
    for flag in ("d", "repeats", "cached_batch", "mini_batch", "hidden", "cached_repeats", "threads"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            ap.error(f"--{flag.replace('_', '-')} must be >= 1, got {value}")
    if args.out is not None and os.path.isdir(args.out):
        ap.error(f"--out {args.out!r} is a folder; give the result file's name")
    return args


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) == 2 and argv[0] == "--_mem-worker":
        mem_worker(json.loads(argv[1]))
        return 0
    args = parse_args(argv)
    C.start_script()
    if args.threads:
        torch.set_num_threads(args.threads)
    import sentence_transformers

    dev, t_start = torch.device("cpu"), time.perf_counter()
    out = {"benchmark": "sentence-transformers-mnrl", "command": "bench_st.py " + " ".join(argv),
           **C.run_meta(dev), "machine_load_before": C.machine_load(),
           "settings": {"d": args.d, "sizes": args.sizes, "dtype": "fp32", **KW, "repeats": args.repeats,
                        "torch_threads": torch.get_num_threads(),
                        "timing": "forward + backward, medians of interleaved (ABBA) runs after one warm-up each",
                        "memory": "peak RSS of one forward + backward in a fresh process minus the RSS before it"},
           "loss": {}}
    out["versions"]["sentence_transformers"] = sentence_transformers.__version__
    print(f"machine load before: {out['machine_load_before']}", flush=True)
    path = C.result_path(dev, args.out, "-st")  # rewritten after each part: a failure keeps what was measured
    try:
        run_parts(args, out, path, dev)
    except KeyboardInterrupt as exc:  # SIGINT or SIGTERM (start_script): what was measured is written
        out["interrupted"] = str(exc) or "KeyboardInterrupt (SIGINT)"
        print(f"\nINTERRUPTED ({out['interrupted']}): writing what was measured so far", flush=True)
    out.update(machine_load_after=C.machine_load(), total_wall_s=time.perf_counter() - t_start)
    C.write_json(path, out)
    print(f"machine load after: {out['machine_load_after']}; wall {out['total_wall_s']:.0f} s; wrote {path}")
    return 130 if "interrupted" in out else 0


def run_parts(args, out: dict, path, dev) -> None:
    """The float64 checks, part 1 at each size and part 2 into ``out``, written to ``path`` after each."""
    check_B = min(CHECK_B, *args.sizes)
    print(f"correctness vs llave_fast.reference (float64 truth), B = {check_B}, d = {args.d}:", flush=True)
    out["correctness"] = checks = check_variants(check_B, args.d)
    C.write_json(path, out)
    failed = {v: f"FAILED correctness, not timed: {c.get('error') or c['errors']}" for v, c in checks.items()
              if not c["passed"]}
    for B in args.sizes:
        fns = {v: loss_fn(v) for v in LOSS_VARIANTS if v not in failed}
        pairs = C.make_pairs(2, B, args.d, dtype=torch.float32, device=dev, seed=B)
        timing = {}  # filled in place: stopped, it keeps the runs taken (each unfinished variant marked partial)
        try:
            C.time_interleaved(fns, pairs, device=dev, warmup=1, repeats=args.repeats, into=timing)
        except KeyboardInterrupt:
            if any(r["raw_ms"]["fwd_bwd"] for r in timing.values()):
                out["loss"][str(B)] = {"variants": rows_of(timing, failed), "stopped": True}
            raise
        rows = rows_of(timing, failed)
        with torch.no_grad():  # the same numbers: each fused loss against sentence-transformers' on one pair
            same = {v: {"st": float(fns[BASELINE[v]](*pairs[0])), "fused": float(fns[v](*pairs[0]))}
                    for v in ("fused_per_direction", "fused_joint") if not (rows[v]["error"] or
                                                                            rows[BASELINE[v]]["error"])}
        for s in same.values():
            s["rel_diff"] = abs(s["fused"] - s["st"]) / abs(s["st"]) if s["st"] else float("inf")
        del pairs, fns
        for v in () if args.no_memory else [v for v in LOSS_VARIANTS if not rows[v]["error"]]:
            rows[v].update(peak_mib(kind="loss", variant=v, B=B, d=args.d, seed=B + 1, threads=args.threads))
        out["loss"][str(B)] = {"variants": rows, "ratios": ratios_of(rows), "same_loss_as_st": same}
        print(f"B = N = {B}, d = {args.d}:")
        for v, r in rows.items():
            print(f"  {v:26s} {C.fmt(r['median_fwd_bwd_ms'], '9.0f')} ms, peak {C.fmt(r.get('peak_mib'), '.0f')} MiB"
                  + (f"  FAILED: {r['error']}" if r["error"] else ""))
        for k, r in out["loss"][str(B)]["ratios"].items():
            print(f"  {k}: time {C.fmt(r['time'], '.3f')}, memory {C.fmt(r['memory'], '.3f')}")
        print("  loss vs sentence-transformers' (relative): "
              + ", ".join(f"{v} {r['rel_diff']:.1e}" for v, r in same.items()), flush=True)
        C.write_json(path, out)

    # part 2: the cached step
    model = tiny_model(args.hidden)
    feats = SimpleNamespace(value=triplet_features(model, args.cached_batch, seed=3), grad=None)
    print(f"cached step vs the same loss uncached in float64, {args.cached_batch} triplets:", flush=True)
    checks = check_cached(model, feats.value, args.mini_batch)
    out["cached_step"] = {"correctness": checks}
    C.write_json(path, out)
    fns = {v: cached_step_fn(v, model, args.mini_batch) for v in ("st_cached", "fused_cached") if checks[v]["passed"]}
    tm = {}  # filled in place, as part 1's
    try:
        C.time_interleaved(fns, [(feats, SimpleNamespace(grad=None))], device=dev, warmup=1,
                           repeats=args.cached_repeats, into=tm)
    except KeyboardInterrupt:
        out["cached_step"].update(stopped=True, timing={v: {"seconds": [x / 1e3 for x in r["raw_ms"]["fwd_bwd"]],
                                                            "partial": bool(r.get("partial")), "error": r["error"]}
                                                        for v, r in tm.items()})
        raise
    cached = {v: {"seconds": [x / 1e3 for x in r["raw_ms"]["fwd_bwd"]],
                  "median_s": r["median_ms"]["fwd_bwd"] / 1e3 if r["median_ms"] else None,
                  "loss": r["losses"][0] if r["losses"] else None, "error": r["error"]} for v, r in tm.items()}
    cached.update({v: {"seconds": [], "median_s": None, "loss": None, "status": "FAILED",
                       "error": f"FAILED correctness, not timed: {c.get('error') or c['errors']}"}
                   for v, c in checks.items() if not c["passed"]})
    st, fused = cached["st_cached"], cached["fused_cached"]
    both = st["loss"] is not None and fused["loss"] is not None and st["loss"] != 0
    cached.update(time_ratio=ratio(fused["median_s"], st["median_s"]),
                  loss_rel_diff=abs(fused["loss"] - st["loss"]) / abs(st["loss"]) if both else None)
    if not args.no_memory:
        for v in [v for v in ("st_cached", "fused_cached") if not cached[v]["error"]]:
            cached[v].update(peak_mib(kind="cached", variant=v, batch=args.cached_batch, hidden=args.hidden,
                                      mini_batch=args.mini_batch, threads=args.threads))
        cached["memory_ratio"] = ratio(fused.get("peak_mib"), st.get("peak_mib"))
    # the fused loss takes GradCache's single pass when the whole batch fits one mini-batch (no re-encode);
    # sentence-transformers' always encodes twice: then the two steps are not the same work
    fused_pass = getattr(getattr(fns.get("fused_cached"), "loss", None), "last_pass", None)
    unlike = (f"; NOTE: the fused loss took GradCache's single pass (the {3 * args.cached_batch} texts fit one "
              f"mini-batch of {args.mini_batch}) while sentence-transformers' encodes twice: not the same work"
              if fused_pass == "single" else "")
    out["cached_step"] = {"settings": {"model": f"BERT, 2 layers, hidden {args.hidden}, random init (built here)",
                                       "fused_cached_pass": fused_pass,
                                       "triplets": args.cached_batch, "mini_batch_size": args.mini_batch,
                                       "partition_mode": "per_direction", "repeats": args.cached_repeats,
                                       "what": "loss(features) + loss.backward() of one step (the re-encode included)"},
                          "correctness": checks, **cached}
    peaks = (f", peak {C.fmt(st.get('peak_mib'), '.0f')} vs {C.fmt(fused.get('peak_mib'), '.0f')} MiB"
             if "memory_ratio" in cached else "")
    print(f"cached step, {args.cached_batch} triplets, mini_batch_size {args.mini_batch}: sentence-transformers "
          f"{C.fmt(st['median_s'], '.2f')} s, fused {C.fmt(fused['median_s'], '.2f')} s (ratio "
          f"{C.fmt(cached['time_ratio'], '.3f')}; losses differ by {C.fmt(cached['loss_rel_diff'], '.1e')} "
          f"relative){peaks}" + "".join(f"; {v} FAILED: {cached[v]['error']}" for v in ("st_cached", "fused_cached")
                                          if cached[v]["error"]) + unlike, flush=True)
    C.write_json(path, out)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    raise SystemExit(main())
