"""The default job's VQA-style precision@1 by question kind, from finished training runs.

For each run folder (``python3 -m llave_fast train --output-dir DIR [--seed S]``, trained to its last
step, synthetic data): the held-out split is rebuilt as training builds it (the run's
``train_config.json`` through the training's own dataset builder), scored with the run's final
checkpoint as the in-run evaluation scores it (the eval command's inputs, the run's batch size), and
the VQA-style task's queries (each against the task's own distinct answers, MMEB's per-task way) are
split by the generator's question kind (:data:`llave_fast.data.synthetic.QUESTION_KINDS`: what the answer
names, count, colour, shape, size or position). Per kind: queries, hits, p_at_1, the answers
retrieved most often and the commonest true answer (in the held-out split). Refused unless the rebuilt scores give the run's
own eval.json numbers exactly (overall, by subset, by task) and the kinds' hits sum to its VQA-style
hits.

    python3 benchmarks/vqa_by_kind.py RUN [RUN ...] --out FILE.json
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

from llave_fast.errors import InvalidArgument, MissingFile  # noqa: E402

TASK = "vqa"
TOP = 3  # the answers retrieved most often, per kind


def run_config(run_dir: str):
    """The run's options (its ``train_config.json``) and its in-run evaluation (``eval.json``); refused
    unless the run trained to its last step on the synthetic data and was evaluated."""
    from llave_fast import checkpoint as ckpt
    from llave_fast.train import TrainConfig

    paths = {name: os.path.join(run_dir, name) for name in ("train_config.json", "eval.json")}
    for name, path in paths.items():
        if not os.path.isfile(path):
            raise MissingFile(f"run folder {run_dir!r}: no {name} (a finished llave-fast training run has both)")
    cfg = TrainConfig.from_json(paths["train_config.json"])
    with open(paths["eval.json"]) as f:
        result = json.load(f)
    if cfg.data != "synthetic" or not cfg.num_eval:
        raise InvalidArgument(f"run folder {run_dir!r}: data {cfg.data!r}, num_eval {cfg.num_eval}; question kinds "
                              "exist for the synthetic data's held-out split only")
    tag = ckpt.latest_complete(os.path.join(run_dir, "checkpoints"))
    if tag is None or ckpt.step_of(tag) != cfg.steps or result.get("steps") != cfg.steps:
        raise InvalidArgument(f"run folder {run_dir!r}: newest complete checkpoint {tag}, eval.json after "
                              f"{result.get('steps')} steps; the run has {cfg.steps}: score a finished run")
    if TASK not in (result.get("by_task") or {}):
        raise InvalidArgument(f"run folder {run_dir!r}: its eval.json has no {TASK!r} task (by_task: "
                              f"{sorted(result.get('by_task') or {})}); train with VQA-style items in the eval split")
    return cfg, result, tag


def heldout_scores(run_dir: str, cfg, tag: str):
    """``(held-out eval dataset, its RetrievalSet, scores)``: the split training evaluated on, scored by
    checkpoint ``tag`` as the in-run evaluation scores it (:func:`llave_fast.training.heldout.heldout_eval`:
    the eval command's processor settings, the run's eval batch, the training's precision)."""
    from llave_fast.data import retrieval_candidates
    from llave_fast.evaluate import eval_processor, retrieval_scores
    from llave_fast.export import load_run_model
    from llave_fast.training.loading import _datasets

    _, evals = _datasets(cfg)  # the training's own builder: the split is the one the run evaluated on
    rset = retrieval_candidates(evals)
    with open(os.path.join(run_dir, "train_config.json")) as f:
        bf16 = json.load(f).get("_data", {}).get("bf16", False)
    model, _ = load_run_model(run_dir, dtype=torch.bfloat16 if bf16 else torch.float32, tag=tag)
    with torch.no_grad():
        scores = retrieval_scores(model, eval_processor(model.processor), rset, cfg.eval_batch)
    return evals, rset, scores


def by_kind(evals, rset, scores) -> tuple[dict, dict]:
    """``({kind: {queries, hits, p_at_1, most_retrieved, most_common_true_answer}}, {kind: query rows})`` of the
    VQA-style task, each query scored as :meth:`~llave_fast.data.RetrievalSet.precision_at_1_by_task`
    scores it; kinds in :data:`~llave_fast.data.synthetic.QUESTION_KINDS` order, those with no query left out."""
    from llave_fast.data.synthetic import QUESTION_KINDS

    rows, _, top = rset.top1_by_task(scores)[TASK]
    kinds = collections.defaultdict(list)
    for k, q in enumerate(rows.tolist()):
        kind = evals.question_kind(q)
        if kind not in QUESTION_KINDS:
            raise InvalidArgument(f"query {q} of the {TASK} task: question kind {kind!r}, not one of {QUESTION_KINDS}")
        kinds[kind].append(k)
    out, members = {}, {}
    for kind in [k for k in QUESTION_KINDS if k in kinds]:
        ks = kinds[kind]
        picked = [int(top[k]) for k in ks]
        truth = [int(rset.positive[rows[k]]) for k in ks]
        hits = sum(p == t for p, t in zip(picked, truth))
        out[kind] = {"queries": len(ks), "hits": hits, "p_at_1": hits / len(ks),
                     "most_retrieved": _commonest(rset.cand_texts[p] for p in picked)[:TOP],
                     "most_common_true_answer": _commonest(rset.cand_texts[t] for t in truth)[0]}
        members[kind] = [int(rows[k]) for k in ks]
    return out, members


def _commonest(texts) -> list:
    """``[[text, count], ...]``, most frequent first, ties in alphabetical order."""
    return [[t, n] for t, n in sorted(collections.Counter(texts).items(), key=lambda kv: (-kv[1], kv[0]))]


def score_run(run_dir: str) -> dict:
    """One run's VQA-style score by question kind, checked against the run's own eval.json: the rebuilt
    scores give its numbers exactly, and the kinds' queries and hits sum to its VQA-style task's."""
    from llave_fast.evaluate import retrieval_metrics

    cfg, result, tag = run_config(run_dir)
    evals, rset, scores = heldout_scores(run_dir, cfg, tag)
    again = retrieval_metrics(rset, scores)
    mine = {"p_at_1_after": again["p_at_1"], "p_at_1_after_by_subset": again["p_at_1_by_subset"],
            "by_task": again["by_task"]}
    theirs = {key: result.get(key) for key in mine}
    if mine != theirs:
        raise InvalidArgument(f"run folder {run_dir!r}: the rebuilt held-out scores give {mine}, its eval.json "
                              f"{theirs}: not the split or the model the run evaluated")
    kinds, members = by_kind(evals, rset, scores)
    vqa = result["by_task"][TASK]
    queries, hits = sum(k["queries"] for k in kinds.values()), sum(k["hits"] for k in kinds.values())
    if queries != vqa["num_queries"] or hits / queries != vqa["p_at_1"]:
        raise InvalidArgument(f"run folder {run_dir!r}: the question kinds hold {hits} hits in {queries} queries, "
                              f"its eval.json's {TASK} task {vqa['p_at_1']} of {vqa['num_queries']}")
    every = sorted(q for rows in members.values() for q in rows)
    if len(every) != len(set(every)):
        raise InvalidArgument(f"run folder {run_dir!r}: a query counted in two question kinds")
    return {"run": os.path.basename(os.path.normpath(run_dir)), "seed": cfg.seed, "checkpoint": tag,
            "steps": cfg.steps, "warmup_steps": cfg.warmup_steps,
            "by_task": result["by_task"], "p_at_1_after": result["p_at_1_after"],
            TASK: {"queries": queries, "hits": hits, "p_at_1": hits / queries,
                   "num_candidates": vqa["num_candidates"], "by_kind": kinds},
            "query_rows_by_kind": members}


def main(argv=None) -> tuple[dict, list[dict]]:
    """Writes ``--out``; returns what it wrote and each run's query rows by kind (not written: the file
    keeps the counts)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", help="finished training run folders (synthetic data)")
    p.add_argument("--out", required=True, help="the JSON file to write")
    args = p.parse_args(argv)
    runs = [score_run(r) for r in args.runs]
    rows = [r.pop("query_rows_by_kind") for r in runs]
    meta = C.run_meta(torch.device("cpu"))
    meta["load_average"] = [round(x, 2) for x in os.getloadavg()]
    out = {"what": "VQA-style precision@1 by question kind (benchmarks/vqa_by_kind.py): each run's held-out split "
                   "rebuilt as training builds it and scored by its final checkpoint as the in-run evaluation "
                   "scores it (every eval.json number reproduced exactly); a kind is what the answer names "
                   "(SyntheticDataset.question_kind); each VQA-style query against the task's distinct answers",
           "machine": meta, "runs": runs}
    C.write_json(args.out, out)
    for r in runs:
        v = r[TASK]
        kinds = ", ".join(f"{k} {x['hits']}/{x['queries']}" for k, x in v["by_kind"].items())
        print(f"{r['run']} (seed {r['seed']}): {TASK} {v['hits']}/{v['queries']} = {v['p_at_1']:.3f}; {kinds}")
    print(f"wrote {args.out}")
    return out, rows


if __name__ == "__main__":
    main()
